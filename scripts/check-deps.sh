#!/usr/bin/env bash
# Dependency layering the architecture promises (ARCHITECTURE.md, Invariants), checked on the
# resolved graph of normal (non-dev, non-build) dependencies:
# - the client (bratsctl) links neither the preprocessing library nor the S3 client;
# - the client and the preprocessing service link neither libtorch nor ONNX Runtime;
# - no crate depends on a service crate, and libraries link no gRPC server shell.
# Exits non-zero, naming each violation, when one is broken. Run by `make lint` and by the
# root test tests/dependency_layers.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}

status=0
# forbid PACKAGE CRATE... : fails when any CRATE is in PACKAGE's normal dependency tree.
forbid() {
    local package=$1
    shift
    local tree
    tree=$("$CARGO" tree -p "$package" -e normal --prefix none --format '{p}' --offline 2>/dev/null ||
        "$CARGO" tree -p "$package" -e normal --prefix none --format '{p}')
    for crate in "$@"; do
        if grep -q "^$crate v" <<<"$tree"; then
            echo "check-deps: $package depends on $crate (cargo tree -p $package -e normal -i $crate shows how)" >&2
            status=1
        fi
    done
}

forbid bratsctl brats-preprocess brats-dicom object_store tch torch-sys ort ort-sys
forbid brats-preprocess tch torch-sys ort ort-sys tonic brats-service brats-proto
forbid brats-preprocessor tch torch-sys ort ort-sys
forbid brats-artifacts tch torch-sys ort ort-sys tonic
forbid brats-train brats-preprocessor brats-inference brats-trainer brats-service ort ort-sys
forbid brats-inference brats-preprocessor brats-trainer brats-train tch torch-sys
forbid brats-trainer brats-preprocessor brats-inference ort ort-sys
forbid brats-cli tch torch-sys ort ort-sys object_store brats-core
forbid brats-volume object_store tch torch-sys ort ort-sys
forbid brats-dicom object_store tonic reqwest tch torch-sys ort ort-sys brats-core
forbid brats-synthetic object_store brats-core brats-preprocess tch torch-sys ort ort-sys

if [ "$status" -eq 0 ]; then
    echo "check-deps: dependency layers hold"
fi
exit "$status"
