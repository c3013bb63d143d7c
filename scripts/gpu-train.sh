#!/usr/bin/env bash
# GPU checks and benchmark of the trainer (issue 5, item 9), for a CUDA machine with Python
# torch 2.11 but no cargo:
#
#   scripts/gpu-train.sh build        # here: binaries + MONAI into target/gpu-train/ (carry it)
#   scripts/gpu-train.sh run [OUT]    # there
#   scripts/gpu-train.sh stream [OUT] # there: case_cache memory vs stream on full-size cases
#
# `run` does, each part under its own timeout, never stopping at a failed part:
#   1. nccl   — c10d ProcessGroupNCCL through our shim, world size 1 (all-reduce, broadcast);
#   2. step   — the bundle's training step at 224x224x144, batch 1: ours (tch, autocast fp16 +
#               our GradScaler) vs MONAI (torch.autocast + torch GradScaler), and both in fp32,
#               alternating, samples/s = 1 / median step time;
#   3. train  — `brats-trainer train` on CUDA with AMP and NCCL (WORLD_SIZE=1) on synthetic
#               full-size cases: crop 224x224x144, sliding-window validation at 240x240x160,
#               checkpoints, ONNX export — the whole job path on the GPU.
# Our binaries use the device's own libtorch (Python torch's torch/lib, which has CUDA).
set -uo pipefail
cd "$(dirname "$0")/.."
dir=target/gpu-train
case "${1:-}" in
build)
    set -e
    cargo build -p brats-trainer -p brats-preprocessor --bins
    cargo test -p brats-train --test dist --no-run 2>&1 | tail -1
    rm -rf "$dir" && mkdir -p "$dir/bin" "$dir/py"
    cp target/debug/brats-trainer target/debug/brats-preprocess "$dir/bin/"
    dist_test=$(ls -t target/debug/deps/dist-* | grep -v '\.d$' | head -1)
    cp "$dist_test" "$dir/bin/dist-test"
    strip --strip-debug "$dir"/bin/*
    shim=$(find target/debug/build -name libbrats_nccl_shim.so -newer crates/brats-train/csrc/nccl_shim.cpp | head -1)
    [ -n "$shim" ] && cp "$shim" "$dir/bin/" || echo "warning: NCCL shim not built (BOOTSTRAP_NCCL=1 scripts/bootstrap.sh)"
    cp -r tests/monai/.venv/lib/python3.11/site-packages/monai "$dir/py/"
    find "$dir/py" -name __pycache__ -prune -exec rm -rf {} +
    du -sh "$dir"
    ;;
run | stream)
    out="${2:-${OUT:-$dir/out}}"
    mkdir -p "$out"
    work=/tmp/brats-gpu-train && rm -rf "$work" && mkdir -p "$work"
    py="${PYTHON:-python3}"
    tl="$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
    export LD_LIBRARY_PATH="$tl${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export PYTHONPATH="$PWD/$dir/py${PYTHONPATH:+:$PYTHONPATH}"
    export BRATS_NCCL_SHIM="$PWD/$dir/bin/libbrats_nccl_shim.so"
    bin="$PWD/$dir/bin"
    log() { echo "== $*" | tee -a "$out/summary.txt"; }
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/summary.txt"
    "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version())' | tee -a "$out/summary.txt"
    nproc | sed 's/^/cpu cores /' | tee -a "$out/summary.txt"
    if [ "$1" = stream ]; then
        # The loader's share of step time when every sample is read and decoded from the store
        # (case_cache stream) against cases held in memory, same job otherwise: 8 training
        # cases of 240x240x155 (≈ 180 MB each in the store), crop 224x224x144, AMP, 4 loader
        # threads, 3 epochs (the first reads a cold page cache).
        log "case_cache memory vs stream: 8 + 2 synthetic 240x240x155 cases, crop 224x224x144, AMP, 3 epochs"
        timeout 120 "$bin/brats-preprocess" synth --shape 240,240,155 --seed 7 --count 10 --validation 2 --out "$work/data" >/dev/null
        for cache in stream memory; do
            sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null
            start=$SECONDS
            timeout 240 "$bin/brats-trainer" train \
                --datalist "$work/data/datalist.json" --epochs 3 --lr 1e-4 --crop 224,224,144 --val-roi 240,240,160 \
                --devices 0 --loader-workers 4 --case-cache "$cache" --out "$work/run-$cache" >"$out/train-$cache.txt" 2>&1
            echo "$cache exit $?, wall $((SECONDS - start)) s" | tee -a "$out/summary.txt"
            grep -E "^training on|^epoch [0-9]+ loss|^done|error" "$out/train-$cache.txt" | tee -a "$out/summary.txt"
        done
        exit 0
    fi

    log "1. NCCL world size 1 (c10d ProcessGroupNCCL via the shim)"
    timeout 120 "$bin/dist-test" --exact nccl_single_rank_smoke_on_cuda --nocapture >"$out/nccl.txt" 2>&1
    echo "nccl exit $?" | tee -a "$out/summary.txt"; grep -E "NCCL|ok|FAILED|panicked" "$out/nccl.txt" | grep -v "^frame" | head -5 | tee -a "$out/summary.txt"

    log "2. training step 224x224x144, batch 1 (ours tch vs MONAI torch), median of 20 steps after 5 warm-up"
    for round in 1 2; do
        for amp in 1 0; do
            flag=(); [ $amp = 1 ] && flag=(--amp)
            timeout 150 "$bin/brats-trainer" bench-step --crop 224,224,144 --steps 20 --warmup 5 --device cuda:0 "${flag[@]}" >>"$out/step.jsonl" 2>>"$out/step.err"
            timeout 150 "$py" benchmarks/trainer/monai_train_step.py --crop 224,224,144 --steps 20 --warmup 5 --device cuda:0 "${flag[@]}" >>"$out/step.jsonl" 2>>"$out/step.err"
        done
    done
    "$py" - "$out/step.jsonl" <<'PY' | tee -a "$out/summary.txt"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for amp in (True, False):
    o = [r["median_s"] for r in rows if r.get("amp") == amp and r.get("impl", "").startswith("brats")]
    m = [r["median_s"] for r in rows if r.get("amp") == amp and "monai_version" in r]
    if o and m:
        mo, mm = statistics.median(o), statistics.median(m)
        print(f"{'AMP fp16' if amp else 'fp32    '}: ours {mo*1e3:7.1f} ms ({1/mo:5.2f} samples/s)  MONAI {mm*1e3:7.1f} ms ({1/mm:5.2f} samples/s)  ratio ours/MONAI {mo/mm:.3f}")
    else:
        print(f"amp={amp}: missing rows (ours {len(o)}, MONAI {len(m)})")
PY
    tail -3 "$out/step.err" 2>/dev/null | grep -v "^\[W" | tee -a "$out/summary.txt"

    log "3. brats-trainer train on cuda:0, AMP, NCCL world size 1, 6 synthetic 240x240x155 cases"
    timeout 90 "$bin/brats-preprocess" synth --shape 240,240,155 --seed 7 --count 6 --validation 2 --out "$work/data" >/dev/null
    MASTER_ADDR=127.0.0.1 MASTER_PORT=29533 WORLD_SIZE=1 RANK=0 LOCAL_RANK=0 \
        timeout 300 "$bin/brats-trainer" train --datalist "$work/data/datalist.json" --epochs 2 --max-steps-per-epoch 12 \
        --lr 1e-4 --crop 224,224,144 --val-roi 240,240,160 --devices 0 --verbose --out "$work/run" >"$out/train.txt" 2>&1
    echo "train exit $?" | tee -a "$out/summary.txt"
    grep -E "^epoch [0-9]+ loss|^done|resumed|error" "$out/train.txt" | tee -a "$out/summary.txt"
    cp "$work/run/metrics.csv" "$out/" 2>/dev/null
    ls -la "$work/run" | tee -a "$out/summary.txt"
    ;;
*)
    echo "usage: $0 build | run [OUT] | stream [OUT]" >&2
    exit 64
    ;;
esac
