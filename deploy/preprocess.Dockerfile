# The preprocessing service. Links neither libtorch nor ONNX Runtime, so the image is small.
# Build from the repository root: docker build -f deploy/preprocess.Dockerfile -t brats-preprocess .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
 && BOOTSTRAP_SKIP_VENV=1 bash scripts/bootstrap.sh \
 && cargo build --release -p brats-preprocessor

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/brats-preprocess /usr/local/bin/brats-preprocess
COPY deploy/preprocess.toml /etc/brats/preprocess.toml
ENV BRATS_PREPROCESS_CONFIG=/etc/brats/preprocess.toml
EXPOSE 50051 9464
USER 65534
ENTRYPOINT ["brats-preprocess", "serve"]
