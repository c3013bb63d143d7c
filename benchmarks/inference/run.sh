#!/usr/bin/env bash
# CPU inference benchmark (issue 4 item 8): ours (`brats-inference segment`, ONNX Runtime CPU) vs
# MONAI's bundle inference on the same 4 files with the same (deterministic) weights.
#
# Usage: benchmarks/inference/run.sh [compare [ROUNDS] | options [X,Y,Z] | fast [ROUNDS] |
#                                    load [SECONDS=180] [CLIENTS=4] | all]
#        (default: compare 3)
#
# 1. builds brats-inference (release), write_reference_weights and brats-model (dev profile); creates the MONAI
#    venv if it is missing;
# 2. writes the detgen weights (tests/monai/detgen.py == brats_model::reference::det_state_dict) as
#    our safetensors, exports them to ONNX (default GroupNorm lowering, and --instance-norm);
# 3. generates the synthetic 240x240x155 float32 case (same as the preprocessing benchmark);
# 4. compare: ours and MONAI alternately, ROUNDS rounds, fresh processes; medians, ratio, stage
#    breakdown, peak RSS (/usr/bin/time -v), label-map check (bench.py, compare.py);
#    options: ONNX Runtime session options, ours only, one run each, roi X,Y,Z (default full);
#    ONLY=REGEX (environment) runs only the variants whose name matches;
#    fast: the opt-in fast mode (--foreground-crop) beside the exact mode and MONAI on two
#    synthetic cases (seeds 1, 2) and the real cases of ../shared/data/real (BRATS_REAL_ROOT)
#    when present: speed-ups and the fast label map's Dice per region against the exact one
#    (fast_mode.py);
#    load: CLIENTS clients stream the synthetic case to one running service (max_concurrent 1,
#    max_queue 2) for SECONDS: cases per minute, p50/p95 latency, refusals with their retry
#    hints, the service's peak RSS (examples/load.rs).
#    BEFORE_BIN=PATH BEFORE_MODEL=PATH (environment) add a third side to `compare` in the same
#    rounds, e.g. the previous release binary with its export, for before/after tables.
# The models are re-exported whenever brats-model was rebuilt after them (exporter changes).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
MODE="${1:-compare}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
export DATA="$ROOT/benchmarks/.data/inference" PY="$ROOT/tests/monai/.venv/bin/python"
mkdir -p "$DATA"
command -v /usr/bin/time >/dev/null || { echo "needs /usr/bin/time (apt-get install time)" >&2; exit 1; }
[ -x "$PY" ] || "$ROOT/tests/monai/setup.sh"

echo "== building" >&2
cargo build --release --quiet -p brats-inference -p brats-preprocessor
# weights + export: the dev profile (optimised in this workspace) avoids a release build of libtorch crates
cargo build --quiet -p brats-model --example write_reference_weights --bin brats-model
export BIN="$TARGET/release/brats-inference"
MODEL_TOOL="$TARGET/debug/brats-model"
if [ ! -f "$DATA/model.onnx" ] || [ ! -f "$DATA/model-in.onnx" ] || [ "$MODEL_TOOL" -nt "$DATA/model.onnx" ]; then
    "$TARGET/debug/examples/write_reference_weights" "$DATA/weights.safetensors" >&2
    "$MODEL_TOOL" export-onnx --weights "$DATA/weights.safetensors" --out "$DATA/model.onnx" >&2
    "$MODEL_TOOL" export-onnx --weights "$DATA/weights.safetensors" --out "$DATA/model-in.onnx" \
        --metadata "$DATA/metadata-in.json" --instance-norm >&2
fi
export MODEL="$DATA/model.onnx" MODEL_IN="$DATA/model-in.onnx"
SYN="$ROOT/benchmarks/.data/synth"
if [ ! -f "$SYN/synth-00001-t2f.nii.gz" ]; then
    "$TARGET/release/brats-preprocess" synth --shape 240,240,155 --seed 1 --out "$SYN" >&2
fi
export IMAGES="$SYN/synth-00001-t1c.nii.gz $SYN/synth-00001-t1n.nii.gz $SYN/synth-00001-t2w.nii.gz $SYN/synth-00001-t2f.nii.gz"

echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), load average $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)"
echo
case "$MODE" in
    compare) "$PY" benchmarks/inference/bench.py compare --rounds "${2:-3}" ;;
    options) "$PY" benchmarks/inference/bench.py options --roi "${2:-240,240,160}" ;;
    fast)
        REAL="${BRATS_REAL_ROOT:-$ROOT/../shared/data/real}"
        [ -f "$SYN/synth-00002-t2f.nii.gz" ] || "$TARGET/release/brats-preprocess" synth --shape 240,240,155 --seed 2 --out "$SYN" >&2
        case_of() { local IFS=,; echo "$1=${*:2}"; }  # name=t1c,t1,t2,flair
        CASES="$(case_of synthetic-seed-1 "$SYN"/synth-00001-{t1c,t1n,t2w,t2f}.nii.gz)"
        CASES+=" $(case_of synthetic-seed-2 "$SYN"/synth-00002-{t1c,t1n,t2w,t2f}.nii.gz)"
        f="$REAL/BraTS-GLI-00001-000/BraTS-GLI-00001-000"
        [ -f "$f-t1c.nii.gz" ] && CASES+=" $(case_of BraTS-GLI-00001-000 "$f"-{t1c,t1n,t2w,t2f}.nii.gz)"
        f="$REAL/brainlesion-sri24-case"
        [ -f "$f/t1c.nii.gz" ] && CASES+=" $(case_of brainlesion-sri24 "$f"/{t1c,t1n,t2w,t2f}.nii.gz)"
        CASES="$CASES" "$PY" benchmarks/inference/fast_mode.py --rounds "${2:-1}" ;;
    load)
        # Throughput under load: CLIENTS clients stream the full-size synthetic case to one
        # inference service (release build, CPU, max_concurrent 1, max_queue 2) for SECONDS.
        secs="${2:-180}" clients="${3:-4}"
        cargo build --release --quiet -p brats-inference --example load
        work="$(mktemp -d)"; trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
        "$BIN" register --registry "file:$work/models" --model "$MODEL" --alias production >&2
        port=$((20000 + RANDOM % 20000))
        cat >"$work/inference.toml" <<TOML
registry = "file:$work/models"
output_root = "file:$work/predictions"
max_concurrent = 1
max_queue = 2
reload_interval_s = 0
[server]
listen = "127.0.0.1:$port"
metrics_listen = ""
TOML
        "$BIN" serve --config "$work/inference.toml" 2>"$work/serve.log" &
        pid=$!
        for _ in $(seq 600); do grep -q '"serving"\|serving' "$work/serve.log" 2>/dev/null && break; sleep 0.5; done
        grep -q serving "$work/serve.log" || { cat "$work/serve.log" >&2; exit 1; }
        rss0=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
        echo "service up (pid $pid, RSS after warm-up $((rss0 / 1024)) MiB); $clients clients for $secs s" >&2
        # shellcheck disable=SC2086
        "$TARGET/release/examples/load" --endpoint "http://127.0.0.1:$port" $(printf -- '--image %s ' $IMAGES) \
            --output-root "file:$work/predictions" --clients "$clients" --seconds "$secs"
        echo "service peak RSS (VmHWM): $(($(awk '/VmHWM/ {print $2}' "/proc/$pid/status") / 1024)) MiB; max_concurrent 1, max_queue 2"
        ;;
    all) "$PY" benchmarks/inference/bench.py compare --rounds "${2:-3}"; echo
         "$PY" benchmarks/inference/bench.py options --roi 240,240,160 ;;
    *) echo "usage: $0 [compare [ROUNDS] | options [X,Y,Z] | fast [ROUNDS] | load [SECONDS] [CLIENTS] | all]" >&2; exit 2 ;;
esac
