#!/usr/bin/env bash
# Builds the container images on a machine with no image registry (docker-compose.yml,
# deploy/docker/README.md):
#   brats/preprocess  brats-preprocess (no libtorch, no ONNX Runtime)
#   brats/inference   brats-inference + ONNX Runtime (no libtorch)
#   brats/trainer     brats-trainer (service and workers) + libtorch (no ONNX Runtime)
#   brats/bratsctl    the command-line client, as a tool image
#   brats/moto        the S3-compatible server of the compose `s3` profile (moto, pinned)
# Every service image also carries bratsctl, its HEALTHCHECK through grpc.health.v1.
#
#   scripts/images.sh [--profile release|debug] [--no-build] [--tag TAG] [--only NAME...]
#
# Steps, each skipped when its result exists and is current:
#   1. The base image the Dockerfiles name (BRATS_BASE_IMAGE, default debian:bookworm-slim).
#      Where it is missing it is made offline: debootstrap --variant=minbase of the Debian
#      release this machine runs, from the mirror its apt sources name, imported with
#      `docker import`. Online, the same Dockerfiles build on Docker Hub's image.
#   2. The binaries, built on the host with the project's bootstrap (.deps/): `release` by
#      default (make images); `debug` reuses the test build (the compose test in make test);
#      --no-build takes the binaries already in target/<profile>/ as they are.
#   3. One small build context per image under target/images/, then `docker build` with
#      --pull=false: nothing is ever pulled. Unchanged inputs reuse every layer.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

profile=${BRATS_IMAGE_PROFILE:-release}
tag=${BRATS_IMAGE_TAG:-dev}
base=${BRATS_BASE_IMAGE:-debian:bookworm-slim}
only=()
build=1
while [ $# -gt 0 ]; do
  case $1 in
    --profile) profile=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    --only) shift; while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do only+=("$1"); shift; done ;;
    *) echo "images: unknown argument $1 (scripts/images.sh [--profile release|debug] [--tag TAG] [--only NAME...])" >&2; exit 2 ;;
  esac
done
case $profile in release|debug) ;; *) echo "images: --profile must be release or debug, not $profile" >&2; exit 2 ;; esac
images=(preprocess inference trainer bratsctl moto)
[ ${#only[@]} -gt 0 ] && images=("${only[@]}")

log() { echo "images: $*" >&2; }
docker info >/dev/null 2>&1 || { log "no Docker engine answers (docker info failed)"; exit 1; }

# 1. The base image, made offline when missing.
make_base() {
  if docker image inspect "$base" >/dev/null 2>&1; then
    log "base image $base present"
    return
  fi
  if ! command -v debootstrap >/dev/null; then
    [ "$(id -u)" = 0 ] || { log "$base is missing and debootstrap is not installed: run as root or apt-get install debootstrap"; exit 1; }
    log "installing debootstrap (Debian package)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  fi
  [ "$(id -u)" = 0 ] || { log "making $base with debootstrap needs root"; exit 1; }
  local suite mirror dir started
  suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  # The mirror the machine's apt sources already use (deb822 or one-line format).
  mirror=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -1 || true)
  [ -n "$mirror" ] || mirror=$(grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | grep -v security | head -1 || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  dir=$(mktemp -d /tmp/brats-base.XXXXXX)
  started=$(date +%s)
  log "making $base offline: debootstrap --variant=minbase $suite from $mirror"
  debootstrap --variant=minbase "$suite" "$dir" "$mirror" >"$dir.log" 2>&1 || { tail -20 "$dir.log" >&2; rm -rf "$dir" "$dir.log"; exit 1; }
  # What a slim image leaves out: package lists, caches, documentation.
  rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb \
    "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/info/* "$dir"/var/log/*.log
  tar -C "$dir" --numeric-owner -c . | docker import \
    --change 'CMD ["bash"]' --change 'LABEL org.opencontainers.image.description="debootstrap minbase made offline by scripts/images.sh"' \
    - "$base" >/dev/null
  rm -rf "$dir" "$dir.log"
  log "made $base in $(( $(date +%s) - started )) s"
}

# 2. The binaries, built on the host.
target_dir=${CARGO_TARGET_DIR:-$root/target}
bin_dir=$target_dir/$profile
build_binaries() {
  local flags=() name
  if [ $build = 0 ]; then
    for name in brats-preprocess brats-inference brats-trainer bratsctl; do
      [ -x "$bin_dir/$name" ] || { log "--no-build: $bin_dir/$name is missing; build it (cargo build --workspace --bins) or drop --no-build"; exit 1; }
    done
    return
  fi
  [ "$profile" = release ] && flags=(--release)
  log "building the binaries ($profile)"
  bash scripts/bootstrap.sh
  cargo build "${flags[@]}" --workspace --bins
}

# 3. Build contexts: only what each image needs, copied so that unchanged inputs keep their
# timestamps out of it (docker compares contents, so an unchanged tree reuses its layers).
stage() { # stage NAME FILE... : copies into target/images/NAME/, replacing what was there
  local name=$1; shift
  local ctx=$target_dir/images/$name
  rm -rf "$ctx"
  mkdir -p "$ctx/bin" "$ctx/lib" "$ctx/etc"
  cp deploy/docker/"$name".Dockerfile "$ctx/Dockerfile"
  # The CA bundle for https object stores and identity providers (minbase has none).
  cp /etc/ssl/certs/ca-certificates.crt "$ctx/etc/ca-certificates.crt"
  echo "$ctx"
}

stage_binary() { # stage_binary CTX NAME : the binary, without debug info (debug builds carry GBs)
  objcopy --strip-debug "$bin_dir/$2" "$1/bin/$2"
}

docker_build() { # docker_build NAME CTX
  local started
  started=$(date +%s)
  docker build --pull=false -q --build-arg "BASE=$base" -t "brats/$1:$tag" "$2" >/dev/null
  log "brats/$1:$tag built in $(( $(date +%s) - started )) s, $(docker image inspect -f '{{.Size}}' "brats/$1:$tag" | awk '{printf "%.0f MB", $1/1e6}')"
}

make_base
needs_binaries=0
for i in "${images[@]}"; do [ "$i" != moto ] && needs_binaries=1; done
[ $needs_binaries = 1 ] && build_binaries

for name in "${images[@]}"; do
  case $name in
    preprocess)
      ctx=$(stage preprocess)
      stage_binary "$ctx" brats-preprocess
      stage_binary "$ctx" bratsctl
      cp deploy/preprocess.toml "$ctx/etc/" ;;
    inference)
      ctx=$(stage inference)
      stage_binary "$ctx" brats-inference
      stage_binary "$ctx" bratsctl
      cp -L .deps/onnxruntime/libonnxruntime.so.1.31.0 .deps/onnxruntime/libonnxruntime_providers_shared.so "$ctx/lib/"
      cp deploy/inference.toml "$ctx/etc/" ;;
    trainer)
      ctx=$(stage trainer)
      stage_binary "$ctx" brats-trainer
      stage_binary "$ctx" bratsctl
      cp -L .deps/libtorch/lib/*.so* "$ctx/lib/"
      cp deploy/trainer.toml "$ctx/etc/" ;;
    bratsctl)
      ctx=$(stage bratsctl)
      stage_binary "$ctx" bratsctl ;;
    moto)
      ctx=$(stage moto)
      cp deploy/docker/moto-entry.py "$ctx/etc/" ;;
    *) log "unknown image $name (preprocess, inference, trainer, bratsctl, moto)"; exit 2 ;;
  esac
  docker_build "$name" "$ctx"
done
