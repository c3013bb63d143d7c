# brats/trainer: the trainer service and its workers (one binary) with libtorch. No ONNX Runtime.
# Built by scripts/images.sh from a context it stages under target/images/trainer/.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
# The shared volume: a new named volume takes this ownership, so the service can write it.
RUN install -d -o 65532 -g 65532 /data
COPY etc/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
# libtorch first: the largest layer, reused while only the binary changes.
COPY lib/ /opt/brats/lib/
COPY etc/trainer.toml /etc/brats/trainer.toml
COPY bin/bratsctl bin/brats-trainer /usr/local/bin/
ENV BRATS_TRAINER_CONFIG=/etc/brats/trainer.toml \
    LD_LIBRARY_PATH=/opt/brats/lib \
    BRATS_HEALTH_SERVER=http://127.0.0.1:50053 \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
EXPOSE 50053 9466
USER 65532:65532
WORKDIR /data
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["bratsctl", "health", "--service", "brats.v1.Trainer"]
ENTRYPOINT ["brats-trainer", "serve"]
