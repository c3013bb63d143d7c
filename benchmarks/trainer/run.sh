#!/usr/bin/env bash
# Training-step benchmark: one optimisation step of the bundle's recipe (SegResNet 16 filters,
# DiceLoss, Adam lr 1e-4 wd 1e-5, batch 1) — ours (`brats-trainer bench-step`, tch over libtorch
# 2.11) against MONAI 1.6.1 on torch 2.11 (`monai_train_step.py`), same crop, same threads, in one
# run, alternating sides each round so machine load hits both alike.
#
#   benchmarks/trainer/run.sh [ROUNDS] [CROP] [THREADS]     (defaults 3, 64,64,64, 2)
#
# Prints each round's medians and the ratio ours/MONAI of the median step time (< 1 = we are faster).
# On a CUDA machine: DEVICE=cuda:0 AMP=1 benchmarks/trainer/run.sh 3 224,224,144 (see scripts/gpu-train.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
ROUNDS="${1:-3}"; CROP="${2:-64,64,64}"; THREADS="${3:-2}"
DEVICE="${DEVICE:-cpu}"; AMP="${AMP:-0}"; STEPS="${STEPS:-5}"; WARMUP="${WARMUP:-2}"
PY="${PYTHON:-$ROOT/tests/monai/.venv/bin/python}"
OURS="${BRATS_TRAINER_BIN:-$ROOT/target/debug/brats-trainer}"
if [ -z "${BRATS_TRAINER_BIN:-}" ]; then
    [ -x "$PY" ] || tests/monai/setup.sh
    cargo build -q -p brats-trainer --bin brats-trainer
fi
amp_flag=(); [ "$AMP" = 1 ] && amp_flag=(--amp)
out=$(mktemp -d)
for r in $(seq 1 "$ROUNDS"); do
    "$OURS" bench-step --crop "$CROP" --steps "$STEPS" --warmup "$WARMUP" --threads "$THREADS" --device "$DEVICE" "${amp_flag[@]}" >>"$out/ours.jsonl"
    "$PY" "$ROOT/benchmarks/trainer/monai_train_step.py" --crop "$CROP" --steps "$STEPS" --warmup "$WARMUP" --threads "$THREADS" --device "$DEVICE" "${amp_flag[@]}" >>"$out/monai.jsonl"
done
"$PY" - "$out" "$CROP" "$THREADS" "$DEVICE" "$AMP" <<'PY'
import json, statistics, sys
out, crop, threads, device, amp = sys.argv[1:]
ours = [json.loads(l) for l in open(f"{out}/ours.jsonl")]
monai = [json.loads(l) for l in open(f"{out}/monai.jsonl")]
print(f"training step, crop {crop}, threads {threads}, device {device}, amp {amp}, {len(ours)} rounds")
for i, (a, b) in enumerate(zip(ours, monai), 1):
    print(f"  round {i}: ours {a['median_s']*1e3:8.1f} ms   MONAI {b['median_s']*1e3:8.1f} ms   ratio {a['median_s']/b['median_s']:.3f}")
mo, mm = statistics.median(a["median_s"] for a in ours), statistics.median(b["median_s"] for b in monai)
rss = lambda rows: max((r.get("peak_rss_kib") or 0) for r in rows) / 1024
print(f"median of rounds: ours {mo*1e3:.1f} ms, MONAI {mm*1e3:.1f} ms, ratio ours/MONAI {mo/mm:.3f}")
print(f"peak RSS: ours {rss(ours):.0f} MiB, MONAI {rss(monai):.0f} MiB")
print(json.dumps({"crop": crop, "device": device, "amp": amp == "1", "ours_median_s": mo, "monai_median_s": mm, "ratio": mo / mm}))
PY
rm -rf "$out"
