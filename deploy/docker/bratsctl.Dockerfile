# brats/bratsctl: the command-line client as a tool image, e.g.
#   docker run --rm --network brats_default brats/bratsctl:dev health --server http://inference:50052
ARG BASE=debian:bookworm-slim
FROM ${BASE}
COPY etc/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY bin/bratsctl /usr/local/bin/
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
WORKDIR /work
ENTRYPOINT ["bratsctl"]
