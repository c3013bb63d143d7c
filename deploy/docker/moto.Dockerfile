# brats/moto: the S3-compatible server of the compose `s3` profile (the one the tests use,
# pinned as in scripts/bootstrap.sh), installed from the Debian and PyPI registries; its entry
# script makes the buckets MOTO_BUCKETS names (default brats).
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null \
 && rm -rf /var/lib/apt/lists/*
COPY etc/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
RUN python3 -m venv /opt/moto \
 && /opt/moto/bin/pip install --quiet --no-cache-dir --cert /etc/ssl/certs/ca-certificates.crt "moto[server]==5.1.22"
COPY etc/moto-entry.py /opt/moto/entry.py
EXPOSE 5000
USER 65532:65532
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=5 \
  CMD ["/opt/moto/bin/python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/moto-api/')"]
ENTRYPOINT ["/opt/moto/bin/python3", "/opt/moto/entry.py"]
