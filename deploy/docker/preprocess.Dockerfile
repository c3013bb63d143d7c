# brats/preprocess: the preprocessing service. Links neither libtorch nor ONNX Runtime.
# Built by scripts/images.sh from a context it stages under target/images/preprocess/ (binaries
# built on the host); BASE is made offline there when no registry can be reached.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
# The shared volume: a new named volume takes this ownership, so the service can write it.
RUN install -d -o 65532 -g 65532 /data
COPY etc/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY etc/preprocess.toml /etc/brats/preprocess.toml
COPY bin/bratsctl bin/brats-preprocess /usr/local/bin/
ENV BRATS_PREPROCESS_CONFIG=/etc/brats/preprocess.toml \
    BRATS_HEALTH_SERVER=http://127.0.0.1:50051 \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
# gRPC, Prometheus /metrics.
EXPOSE 50051 9464
# The distroless "nonroot" uid; the root filesystem is mounted read-only (compose, Kubernetes).
USER 65532:65532
WORKDIR /data
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["bratsctl", "health", "--service", "brats.v1.Preprocessor"]
ENTRYPOINT ["brats-preprocess", "serve"]
