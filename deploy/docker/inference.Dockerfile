# brats/inference: the inference service with ONNX Runtime (CPU; the CUDA and TensorRT
# providers load from a GPU build of the library mounted over /opt/brats/lib). No libtorch.
# Built by scripts/images.sh from a context it stages under target/images/inference/.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
# The shared volume: a new named volume takes this ownership, so the service can write it.
RUN install -d -o 65532 -g 65532 /data
COPY etc/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY lib/ /opt/brats/lib/
COPY etc/inference.toml /etc/brats/inference.toml
COPY bin/bratsctl bin/brats-inference /usr/local/bin/
ENV BRATS_INFERENCE_CONFIG=/etc/brats/inference.toml \
    ORT_DYLIB_PATH=/opt/brats/lib/libonnxruntime.so.1.31.0 \
    LD_LIBRARY_PATH=/opt/brats/lib \
    BRATS_HEALTH_SERVER=http://127.0.0.1:50052 \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
EXPOSE 50052 9465
USER 65532:65532
WORKDIR /data
# NOT_SERVING (unhealthy) until the model alias exists and is loaded and warmed; with
# TensorRT the first engine build takes minutes (the compose gpu profile waits longer).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["bratsctl", "health", "--service", "brats.v1.Inference"]
ENTRYPOINT ["brats-inference", "serve"]
