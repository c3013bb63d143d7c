#!/usr/bin/env bash
# Preprocessing benchmark: ours (Rust, `pipeline::preprocess`) vs MONAI (`LoadImaged` +
# `NormalizeIntensityd(nonzero=True, channel_wise=True)`) on the same 4 modality files.
#
# Usage: benchmarks/run.sh [ROUNDS]      (default 5; or ROUNDS=N in the environment)
#
# 1. builds the release CLI and the bench example, creates the MONAI venv if it is missing
#    (tests/monai/setup.sh);
# 2. generates one synthetic 240x240x155 float32 case into benchmarks/.data/ (git-ignored);
# 3. runs the two sides alternately, ROUNDS times, each round one fresh process per side
#    (1 untimed warm-up pass, then 1 timed pass; peak RSS is that process's VmHWM);
# 4. prints the table (medians over rounds, stage breakdown, ratio, peak RSS) and checks that the
#    two outputs agree within 1e-5;
# 5. does the same for the real int16 case BraTS-GLI-00001-000 when it is present
#    (BRATS_REAL_DIR overrides where to look).
#
# benchmarks/run.sh --inference [compare [ROUNDS] | options [X,Y,Z] | all] runs the CPU inference
# benchmark instead (benchmarks/inference/run.sh; README.md, "Inference").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${1:-}" = "--inference" ]; then
    shift
    exec "$ROOT/benchmarks/inference/run.sh" "$@"
fi
cd "$ROOT"
ROUNDS="${1:-${ROUNDS:-5}}"
DATA="$ROOT/benchmarks/.data"
REAL_DIR="${BRATS_REAL_DIR:-$ROOT/../shared/data/real/BraTS-GLI-00001-000}"
PY="$ROOT/tests/monai/.venv/bin/python"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
mkdir -p "$DATA"

if [ ! -x "$PY" ]; then
    echo "== MONAI venv missing: running tests/monai/setup.sh" >&2
    "$ROOT/tests/monai/setup.sh"
fi
echo "== building (release)" >&2
cargo build --release --quiet -p brats-preprocessor --bin brats-preprocess && cargo build --release --quiet -p brats-preprocess --example bench_preprocess
BIN="$TARGET/release/brats-preprocess"
BENCH="$TARGET/release/examples/bench_preprocess"

SYN="$DATA/synth"
if [ ! -f "$SYN/synth-00001-t2f.nii.gz" ]; then
    echo "== generating the synthetic 240x240x155 case" >&2
    "$BIN" synth --shape 240,240,155 --seed 1 --out "$SYN" >&2
fi

# bench NAME TITLE T1C T1 T2 FLAIR
bench() {
    local name="$1" title="$2"; shift 2
    local ours="$DATA/$name-ours.jsonl" monai="$DATA/$name-monai.jsonl" cmp="$DATA/$name-compare.json"
    : >"$ours"; : >"$monai"
    for r in $(seq 1 "$ROUNDS"); do
        echo "== $title: round $r/$ROUNDS" >&2
        "$BENCH" "$@" --warmup 1 --repeat 1 --out "$DATA/$name-ours.safetensors" | grep '"kind":"median"' >>"$ours"
        local save=()
        [ "$r" = "$ROUNDS" ] && save=(--save "$DATA/$name-monai.npy")
        "$PY" "$ROOT/benchmarks/monai_preprocess.py" "$@" --warmup 1 --repeat 1 "${save[@]}" \
            | grep '"kind": "median"' >>"$monai"
    done
    "$PY" "$ROOT/benchmarks/compare_outputs.py" "$DATA/$name-ours.safetensors" "$DATA/$name-monai.npy" >"$cmp" || true
    "$PY" "$ROOT/benchmarks/report.py" "$title" "$ours" "$monai" "$cmp"
    rm -f "$DATA/$name-ours.safetensors" "$DATA/$name-monai.npy"
}

echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo
bench synth "synthetic 240x240x155 float32" "$SYN"/synth-00001-{t1c,t1n,t2w,t2f}.nii.gz
if [ -f "$REAL_DIR/BraTS-GLI-00001-000-t1c.nii.gz" ]; then
    bench real "real BraTS-GLI-00001-000 int16" "$REAL_DIR"/BraTS-GLI-00001-000-{t1c,t1n,t2w,t2f}.nii.gz
else
    echo "(real case skipped: $REAL_DIR/BraTS-GLI-00001-000-t1c.nii.gz not found; set BRATS_REAL_DIR)"
fi
