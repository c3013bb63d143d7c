#!/usr/bin/env bash
# Our ONNX Runtime path on a GPU machine whose image lacks onnxruntime-gpu (issue 4): bundles
# onnxruntime-gpu 1.31.1 (CUDA 13 build, from PyPI) with `brats-inference`, `brats-preprocess` and
# the bundle model, split into parts that each fit one device call's 64 MiB carry.
#
#   scripts/gpu-ort-cuda.sh prepare        # here: writes target/ortgpu/part-NN/ (carry one per call)
#   scripts/gpu-ort-cuda.sh stash          # there, once per part (carrying target/ortgpu/part-NN)
#   scripts/gpu-ort-cuda.sh run            # there, after the last part: assemble and run
#   scripts/gpu-ort-cuda.sh serve          # there, after the last part: warm latency through
#                                          # the service beside MONAI (issue 14 item 5)
#
# `run` segments one synthetic 240x240x155 case with `brats-inference segment`: --provider
# tensorrt without fallback (must fail clearly where libnvinfer is missing), tensorrt,cuda with
# --allow-fallback, six fresh-process CUDA runs, and one CPU run; it compares CUDA and CPU logits.
# CUDA libraries (cuBLAS 13, cuDNN 9, cudart 13) come from the machine's Python torch (cu130).
# Needs benchmarks/.data/inference/model.onnx (written by benchmarks/inference/run.sh).
#
# `serve` starts `brats-inference serve` on the CUDA provider (PROVIDER overrides: the CPU dry
# run here is `B=DIR PROVIDER=cpu DEVICE=cpu WARMUP=1 REQUESTS=2`), waits for SERVING (model loaded and warmed), then
# sends 3 + 20 Segment requests with store URIs for the full-size case from one client
# (examples/load.rs) and reports p50/p95 of the 20; then MONAI's bundle inference end to end
# (benchmarks/gpu/monai_e2e.py: load, normalise, AMP sliding window, label map, write) warm in
# one process, 3 + 20 requests, on the same GPU. The target: ours <= 1/4 of MONAI AMP's.
# I/O binding of device buffers is not implemented (ONNX Runtime copies the window to the GPU
# and the logits back per run); TensorRT is refused where libnvinfer is missing (see `run`).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=target/ortgpu
stash=/tmp/ortgpu
case "${1:-}" in
prepare)
    [ -f benchmarks/.data/inference/model.onnx ] || { echo "run benchmarks/inference/run.sh first (it writes the model)" >&2; exit 1; }
    cargo build --release -p brats-inference -p brats-preprocessor
    rm -rf "$dir" && mkdir -p "$dir/bundle"
    pip download --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 \
        onnxruntime-gpu==1.31.1 -d "$dir/wheel"
    unzip -j -q "$dir"/wheel/onnxruntime_gpu-1.31.1-*.whl 'onnxruntime/capi/libonnxruntime*.so*' -d "$dir/bundle"
    cargo build --release -p brats-inference --example load
    cp target/release/brats-inference target/release/brats-preprocess target/release/examples/load "$dir/bundle/"
    strip "$dir/bundle/brats-inference" "$dir/bundle/brats-preprocess" "$dir/bundle/load"
    cp benchmarks/.data/inference/model.onnx scripts/gpu-ort-cuda.sh benchmarks/gpu/monai_e2e.py \
        tests/monai/detgen.py "$dir/bundle/"
    # MONAI itself is pure Python (torch, numpy and nibabel are the device's).
    mkdir -p "$dir/bundle/py" && cp -r tests/monai/.venv/lib/python3*/site-packages/monai "$dir/bundle/py/"
    find "$dir/bundle/py" -name __pycache__ -prune -exec rm -rf {} +
    tar -C "$dir/bundle" -cf - . | xz -T2 -3 >"$dir/bundle.tar.xz"
    (cd "$dir" && split -b 46M -d bundle.tar.xz bundle.part-)
    for p in "$dir"/bundle.part-*; do n=${p##*-}; mkdir -p "$dir/part-$n" && mv "$p" "$dir/part-$n/"; done
    rm -rf "$dir/bundle" "$dir/wheel" "$dir/bundle.tar.xz"
    du -sh "$dir"/part-*
    ;;
stash)
    mkdir -p "$stash" && cp "$dir"/part-*/bundle.part-* "$stash/" && ls -l "$stash"
    ;;
run | serve)
    work=/tmp/ortgpu-work && rm -rf "$work" && mkdir -p "$work"
    if [ -z "${B:-}" ]; then
        rm -rf "$stash/bundle" && mkdir -p "$stash/bundle"
        cat "$stash"/bundle.part-* | xz -d | tar -C "$stash/bundle" -xf -
        b="$stash/bundle"
        tp=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')
        export LD_LIBRARY_PATH="$b:$(ls -d "$(dirname "$tp")"/nvidia/*/lib 2>/dev/null | tr '\n' ':')$tp/lib:${LD_LIBRARY_PATH:-}"
        export ORT_DYLIB_PATH="$b/libonnxruntime.so.1.31.1"
        nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    else
        b="$B" # a dry run on a prepared directory (binaries, model.onnx, monai_e2e.py, detgen.py)
    fi
    "$b/brats-preprocess" synth --shape 240,240,155 --seed 1 --out "$work" >/dev/null
    images=()
    for m in t1c t1n t2w t2f; do images+=("$(ls "$work"/*-"$m".nii.gz)"); done
    if [ "$1" = serve ]; then
        provider="${PROVIDER:-cuda}" port=$((20000 + RANDOM % 20000))
        "$b/brats-inference" register --registry "file:$work/models" --model "$b/model.onnx" --alias production
        printf 'registry = "file:%s/models"\noutput_root = "file:%s/out"\nproviders = ["%s"]\nmax_concurrent = 1\nmax_queue = 4\nreload_interval_s = 0\n[server]\nlisten = "127.0.0.1:%s"\nmetrics_listen = ""\n' \
            "$work" "$work" "$provider" "$port" >"$work/inference.toml"
        "$b/brats-inference" serve --config "$work/inference.toml" 2>"$work/serve.log" &
        pid=$!
        trap 'kill $pid 2>/dev/null || true' EXIT
        for _ in $(seq 360); do grep -q serving "$work/serve.log" && break; sleep 0.5; done
        grep -q serving "$work/serve.log" || { tail -20 "$work/serve.log"; exit 1; }
        echo "== ours: brats-inference serve on $provider, one client, ${WARMUP:-3} warm-up + ${REQUESTS:-20} Segment requests (store URIs)"
        "$b/load" --endpoint "http://127.0.0.1:$port" $(printf -- '--image file:%s ' "${images[@]}") \
            --output-root "file:$work/out" --clients 1 --warmup "${WARMUP:-3}" --requests "${REQUESTS:-20}"
        kill $pid
        echo "== MONAI bundle inference end to end, warm, AMP on CUDA, same process, ${WARMUP:-3} warm-up + ${REQUESTS:-20}"
        PYTHONPATH="$b/py:${PYTHONPATH:-}" DETGEN_DIR="$b" python3 "$b/monai_e2e.py" "${images[@]}" \
            --out "$work/monai" --device "${DEVICE:-cuda}" $([ "${DEVICE:-cuda}" = cuda ] && echo --amp) \
            --warmup "${WARMUP:-3}" --repeat "${REQUESTS:-20}" | cut -c1-300
        exit 0
    fi
    seg() { timeout 200 "$b/brats-inference" segment --model "$b/model.onnx" --image "${images[@]}" "$@"; }
    set +e
    echo "== tensorrt requested, no fallback"
    seg --provider tensorrt --out "$work/trt.nii.gz"; echo "exit $?"
    echo "== tensorrt,cuda with fallback"
    seg --provider tensorrt,cuda --allow-fallback --out "$work/fallback.nii.gz" 2>&1 | tail -4; echo "exit $?"
    echo "== cuda, 6 fresh processes"
    for i in 1 2 3 4 5 6; do
        seg --provider cuda --out "$work/cuda.nii.gz" --logits "$work/cuda.safetensors" 2>&1 | grep -E "^wrote|timing|error"
    done
    echo "== cpu, all cores"
    seg --provider cpu --out "$work/cpu.nii.gz" --logits "$work/cpu.safetensors" 2>&1 | grep -E "^wrote|timing|error"
    python3 -c "
from safetensors.torch import load_file
a, b = (load_file(f'$work/{s}.safetensors')['logits'] for s in ('cuda', 'cpu'))
print(f'logits cuda vs cpu: max abs diff {(a - b).abs().max().item():.3e}; thresholded voxels differing {int(((a > 0) != (b > 0)).sum())} of {a.numel()}')
"
    ;;
*)
    echo "usage: $0 prepare | stash | run | serve" >&2
    exit 64
    ;;
esac
