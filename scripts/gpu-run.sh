#!/usr/bin/env bash
# The one entry point for a GPU machine: the model checks of issue 3 and the inference benchmark
# of issue 4, in one call.
#
#   scripts/gpu-run.sh build        # here (cargo; CPU is enough): what to carry, into target/gpu/
#   scripts/gpu-run.sh run [OUT]    # there (CUDA; python3 with torch): results into OUT
#
# `build` fills target/gpu/ (git-ignored; checked to stay under 60 MiB):
#   bin/gpu_check         crates/brats-model/examples/gpu_check.rs, stripped. libtorch is linked
#                         dynamically: `run` points LD_LIBRARY_PATH at the device Python's torch/lib,
#                         whose libtorch.so loads libtorch_cuda.so.
#   bin/brats-preprocess  stripped; makes the full-size synthetic case there (the preprocessed
#                         case is ~140 MB, too much to carry).
#   py/monai              MONAI from tests/monai/.venv, pure Python (its import-time needs, numpy
#                         and torch, are the device's); put on PYTHONPATH there.
# `run` runs these parts, each under `timeout` and within one overall budget; a part that fails
# or hangs never stops the next:
#   env    nvidia-smi, python/torch/onnxruntime versions and execution providers, MONAI import,
#          ldd of our binaries against torch/lib (missing libraries are printed and looked for).
#   model  gpu_check (issue 3): CUDA fp32 forward vs CPU, autocast fp16 and pure bf16 vs CUDA fp32
#          on 96x96x64; writes the ONNX graphs (fp32, fp16) and the weights they come from
#          (weights.safetensors) to WORK/model.
#   ort    those graphs in ONNX Runtime's TensorRT and CUDA providers vs the CPU tch logits.
#          A provider missing from the installed onnxruntime is reported (that is a result).
#   case   synthetic 240x240x155 case (seed 1), preprocessed by our binary (inference path).
#   bench  (issue 4) MONAI torch fp32 and AMP sliding-window inference (roi 240x240x160, overlap
#          0.5) vs our ONNX graphs in ORT TensorRT fp16 / CUDA fp32 / CUDA fp16, the same weights,
#          p50/p95 over BENCH_RUNS runs after warm-up, label-map agreement. Without CUDA: a tiny
#          CPU smoke run on a 64x64x48 crop, labelled as such (it only exercises the code paths).
# Environment: PYTHON (python3), WORK (scratch, /tmp/brats-gpu-work), BENCH_RUNS (20), BENCH_MAX_S
# (seconds per timed configuration before its runs are reduced, 45), BUDGET_S (all parts, 330).
# OUT (default target/gpu/out) receives 7 small text files, under the device tool's 8: gpu-run.log
# (everything), env.txt, gpu_check.txt, onnxruntime.txt, bench_inference.txt,
# bench_inference.json, summary.txt. Exit status: 0 when every part passed.
set -uo pipefail
cd "$(dirname "$0")/.."
G=target/gpu
SELF="$PWD/scripts/gpu-run.sh"
PY="${PYTHON:-python3}"

build() {
    set -e
    cargo build -p brats-model --example gpu_check
    cargo build -p brats-preprocessor --bin brats-preprocess
    rm -rf "$G"
    mkdir -p "$G/bin" "$G/py"
    cp target/debug/examples/gpu_check target/debug/brats-preprocess "$G/bin/"
    strip "$G/bin/gpu_check" "$G/bin/brats-preprocess"
    local site
    site="$(ls -d tests/monai/.venv/lib/python3.*/site-packages | head -n1)"
    [ -d "$site/monai" ] || { echo "no MONAI in tests/monai/.venv (run tests/monai/setup.sh)" >&2; exit 1; }
    tar -C "$site" --exclude=__pycache__ --exclude='*.pyc' -cf - monai "$(cd "$site" && ls -d monai-*.dist-info)" | tar -C "$G/py" -xf -
    {
        echo "built: $(date -u +%FT%TZ) from $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates scripts || echo ' (with local changes)')"
        echo "monai: $(sed -n 's/^Version: //p' "$G"/py/monai-*.dist-info/METADATA) (requires: $(sed -n 's/^Requires-Dist: //p' "$G"/py/monai-*.dist-info/METADATA | grep -v extra | tr '\n' ' '))"
    } >"$G/BUILD.txt"
    ls -l "$G/bin"
    cat "$G/BUILD.txt"
    du -sh "$G"
    local bytes
    bytes=$(du -sb "$G" | cut -f1)
    if [ "$bytes" -ge $((60 * 1024 * 1024)) ]; then
        echo "target/gpu is $bytes bytes: over the 60 MiB carry budget" >&2
        exit 1
    fi
}

# ---------------------------------------------------------------------------------------------
# Parts, run as `gpu-run.sh _PART ...` so that `timeout` can stop each with its children.

part_env() {
    echo "== host"
    uname -srm
    echo "cpus: $(nproc)"
    free -g | head -n 2
    echo "== nvidia-smi"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
        nvidia-smi || true
    else
        echo "nvidia-smi: not found"
    fi
    echo "== python ($PY: $(command -v "$PY" || echo 'not found'))"
    "$PY" - <<'PY'
import ctypes.util, importlib.metadata as md, sys
print("python:", sys.version.split()[0], sys.executable)
try:
    import numpy
    print("numpy:", numpy.__version__)
except Exception as e:
    print("numpy: import FAILED:", e)
try:
    import torch
    print("torch:", torch.__version__, "| built for CUDA", torch.version.cuda, "| cuda available:", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"torch device: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
        print("cudnn:", torch.backends.cudnn.version(), "| cudnn.allow_tf32:", torch.backends.cudnn.allow_tf32)
except Exception as e:
    print("torch: import FAILED:", e)
try:
    import onnxruntime as ort
    dists = []
    for d in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-training", "ort-nightly-gpu"):
        try:
            dists.append(f"{d}=={md.version(d)}")
        except md.PackageNotFoundError:
            pass
    av = ort.get_available_providers()
    print("onnxruntime:", ort.__version__, "| distributions:", dists, "| device:", ort.get_device())
    print("onnxruntime providers:", av)
    gpu = [p for p in av if p in ("TensorrtExecutionProvider", "CUDAExecutionProvider")]
    if gpu:
        print("onnxruntime_gpu_providers:", gpu)
    else:
        print("onnxruntime_gpu_providers: NONE -- this onnxruntime build has no CUDA or TensorRT execution"
              " provider, so our ONNX graphs cannot run on the GPU here (a result, not a script failure)")
except Exception as e:
    print("onnxruntime: import FAILED:", e)
print("tensorrt (libnvinfer):", ctypes.util.find_library("nvinfer") or "not found")
try:
    import monai
    print("monai:", monai.__version__, "from", monai.__file__)
except Exception as e:
    print("monai: import FAILED:", type(e).__name__, e)
try:
    import safetensors
    print("safetensors package:", safetensors.__version__, "(not needed: the benchmark reads safetensors itself)")
except Exception:
    print("safetensors package: not installed (not needed)")
PY
    echo "== ldd (LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-})"
    local b
    for b in "$G/bin/gpu_check" "$G/bin/brats-preprocess"; do
        echo "-- $b"
        if [ ! -e "$b" ]; then
            echo "MISSING: $b itself (was 'scripts/gpu-run.sh build' run and target/gpu carried?)"
            continue
        fi
        ldd "$b" || true
        if ldd "$b" 2>&1 | grep -q "not found"; then
            echo "MISSING for $b: $(ldd "$b" 2>&1 | awk '/not found/ {print $1}' | tr '\n' ' ')"
        else
            echo "all libraries of $b resolve"
        fi
    done
    if [ -n "${TORCH_LIB:-}" ] && [ -e "$TORCH_LIB/libtorch_cuda.so" ]; then
        echo "-- $TORCH_LIB/libtorch_cuda.so: $(ldd "$TORCH_LIB/libtorch_cuda.so" 2>&1 | grep -c 'not found') missing"
        ldd "$TORCH_LIB/libtorch_cuda.so" 2>&1 | grep "not found" || true
    else
        echo "-- no libtorch_cuda.so in torch/lib (${TORCH_LIB:-unknown}): a CPU-only torch"
    fi
}

part_model() {
    "$G/bin/gpu_check" "$WORK/model" 96 96 64
}

part_ort() {
    "$PY" - "$WORK/model" <<'PY'
import sys, time
import numpy as np
src = sys.argv[1]
try:
    import onnxruntime as ort
except ImportError as e:
    print(f"onnxruntime: not installed ({e})"); sys.exit(1)
av = ort.get_available_providers()
print("onnxruntime:", ort.__version__, "available providers:", av)
try:
    x = np.fromfile(f"{src}/input_f32le.bin", dtype="<f4").reshape(1, 4, 96, 96, 64)
    ref = np.fromfile(f"{src}/logits_cpu_f32le.bin", dtype="<f4").reshape(1, 3, 96, 96, 64)
except (OSError, ValueError) as e:
    print(f"gpu_check wrote no input/logits ({e}): nothing to compare"); sys.exit(1)
def check(model, ep, opts):
    try:
        s = ort.InferenceSession(f"{src}/{model}", providers=[(ep, opts)])
    except Exception as e:
        print(f"{model} {ep}: FAILED to create session: {str(e)[:400]}"); return False
    used = s.get_providers()
    if used[0] != ep:
        print(f"{model} {ep}: fell back to {used}"); return False
    s.run(None, {"image": x})
    t0 = time.perf_counter(); y = s.run(None, {"image": x})[0]; dt = time.perf_counter() - t0
    d = float(np.abs(y - ref).max())
    agree = float(((y >= 0) == (ref >= 0)).mean())
    print(f"{model} {ep}: accepted; max_abs_vs_cpu_tch={d:.3e} voxel_agreement={agree:.6f} run_ms={dt * 1e3:.1f}")
    return True
ok_any, gpu_any = False, False
for model in ("model_fp32.onnx", "model_fp16.onnx"):
    for ep in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
        if ep not in av:
            print(f"{model} {ep}: not available in this onnxruntime build"); continue
        gpu_any = True
        opts = {"trt_fp16_enable": "1" if "fp16" in model else "0"} if ep.startswith("Tensorrt") else {}
        ok_any |= check(model, ep, opts)
if not gpu_any:
    print("onnxruntime_gpu_result: NO_GPU_PROVIDER -- this onnxruntime has neither TensorrtExecutionProvider nor"
          " CUDAExecutionProvider (onnxruntime-gpu is not installed); GPU checks of the ONNX graphs not run")
    print("CPU reference instead (not a GPU check; shows the graphs themselves are sound):")
    for model in ("model_fp32.onnx", "model_fp16.onnx"):
        check(model, "CPUExecutionProvider", {})
    sys.exit(3)
print("onnxruntime_gpu_result:", "PASS" if ok_any else "FAIL")
sys.exit(0 if ok_any else 1)
PY
}

part_case() {
    local d="$WORK/case"
    mkdir -p "$d"
    "$G/bin/brats-preprocess" synth --shape 240,240,155 --seed 1 --out "$d" &&
        "$G/bin/brats-preprocess" run --image "$d"/synth-00001-{t1c,t1n,t2w,t2f}.nii.gz --out "$d/case.safetensors" &&
        rm -f "$d"/synth-00001-*.nii.gz &&
        ls -l "$d"
}

part_bench() {
    PYTHONUNBUFFERED=1 "$PY" - "$WORK/model" "$WORK/case/case.safetensors" "$1" "${BENCH_RUNS:-20}" <<'PY'
import hashlib, json, os, struct, sys, time
import numpy as np
import torch

def load_safetensors(path):
    """Pure-Python safetensors reader (the device may lack the package): a little-endian u64
    header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw data."""
    with open(path, "rb") as f:
        buf = bytearray(f.read())
    (n,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8:8 + n])
    dtypes = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
              "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}
    tensors = {}
    for name, v in header.items():
        if name == "__metadata__":
            continue
        b, e = v["data_offsets"]
        dt = np.dtype(dtypes[v["dtype"]])
        count = int(np.prod(v["shape"], dtype=np.int64))
        if count * dt.itemsize != e - b:
            raise ValueError(f"{path}: {name}: {v['dtype']}{v['shape']} does not fill bytes {b}..{e}")
        a = np.frombuffer(buf, dtype=dt, count=count, offset=8 + n + b).reshape(v["shape"])
        tensors[name] = torch.from_numpy(a).view(torch.bfloat16) if v["dtype"] == "BF16" else torch.from_numpy(a)
    return tensors, header.get("__metadata__", {})

src, case_path, out, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
max_s = float(os.environ.get("BENCH_MAX_S", "45"))
deadline = float(os.environ.get("BENCH_DEADLINE", time.time() + 1e9))
cuda = torch.cuda.is_available()
dev = torch.device("cuda" if cuda else "cpu")
res = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if cuda else "cpu", "rows": {}}
weights_path = f"{src}/weights.safetensors"
have_weights = os.path.exists(weights_path)
if have_weights:
    sd, wmeta = load_safetensors(weights_path)
    res["weights_sha256"] = hashlib.sha256(open(weights_path, "rb").read()).hexdigest()
    print(f"weights: {weights_path} ({len(sd)} tensors, sha256 {res['weights_sha256'][:16]}), the file gpu_check exported the ONNX graphs from")
    try:
        from safetensors.numpy import load_file
        ref = load_file(weights_path)
        same = ref.keys() == sd.keys() and all(np.array_equal(ref[k], sd[k].numpy()) for k in ref)
        print("pure-Python safetensors reader vs the safetensors package:", "identical" if same else "DIFFERENT")
    except ImportError:
        pass
case, cmeta = load_safetensors(case_path)
image = case["image"][None].float()
print("case:", case_path, "image", tuple(image.shape), "min/max", float(image.min()), float(image.max()))
if cuda:
    mode, roi, warm = "GPU benchmark", (240, 240, 160), 3
else:
    mode, roi, warm = "CPU SMOKE RUN (no CUDA): 64x64x48 crop, 2 runs -- exercises the code paths, NOT a benchmark", (64, 64, 48), 1
    x0, y0, z0 = [(s - r) // 2 for s, r in zip(image.shape[2:], roi)]
    image = image[:, :, x0:x0 + roi[0], y0:y0 + roi[1], z0:z0 + roi[2]].contiguous()
    runs = min(runs, 2)
res.update(mode=mode, image_shape=list(image.shape), roi=list(roi), overlap=0.5)
print(f"== {mode}; image {tuple(image.shape)}, roi {roi}, overlap 0.5, {runs} timed runs after {warm} warm-up")
image = image.to(dev)
from monai.inferers import sliding_window_inference
from monai.networks.nets import SegResNet
import monai
res["monai"] = monai.__version__
net = SegResNet(blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1], init_filters=16, in_channels=4, out_channels=3, dropout_prob=0.2)
if have_weights:
    net.load_state_dict(sd)  # strict: every MONAI key present and shaped as ours
else:
    torch.manual_seed(0)
    print("weights.safetensors missing (gpu_check failed): MONAI rows use torch's seeded init, ONNX rows skipped")
net = net.to(dev).eval()

def sync():
    if cuda:
        torch.cuda.synchronize()

def label(logits):
    p = torch.sigmoid(logits.float()) >= 0.5
    return torch.where(p[:, 2], 4, torch.where(p[:, 0], 1, torch.where(p[:, 1], 2, 0))).to(torch.uint8)

logits, labels = {}, {}
def bench(key, name, fn):
    t = time.perf_counter()
    for _ in range(warm):
        y = fn(); lab = label(y)
    sync()
    per = (time.perf_counter() - t) / warm
    n = runs
    if per * runs > max_s:
        n = max(3, int(max_s / per))
        print(f"{name}: {per:.2f} s per run in warm-up; timed runs reduced from {runs} to {n}")
    if time.time() + per * n > deadline:
        n = max(1, int((deadline - time.time()) / per) - 1)
        print(f"{name}: near the time budget; timed runs reduced to {n}")
    ts = []
    for _ in range(n):
        s = time.perf_counter(); y = fn(); lab = label(y); sync(); ts.append(time.perf_counter() - s)
    ts = np.array(ts) * 1000
    row = {"p50_ms": float(np.percentile(ts, 50)), "p95_ms": float(np.percentile(ts, 95)), "min_ms": float(ts.min()), "runs": n}
    print(f"{name:34s} p50 {row['p50_ms']:9.1f} ms  p95 {row['p95_ms']:9.1f} ms  min {row['min_ms']:9.1f} ms  ({n} runs)")
    res["rows"][key] = row
    logits[key], labels[key] = y.float(), lab
    return row

swi = lambda predictor: sliding_window_inference(image, roi, 1, predictor, overlap=0.5)
amp_dtype = torch.float16 if cuda else torch.bfloat16
def amp():
    with torch.autocast(dev.type, dtype=amp_dtype):
        return swi(net)
with torch.no_grad():
    for key, name, fn in (("monai_fp32", "MONAI torch fp32", lambda: swi(net)),
                          ("monai_amp", f"MONAI torch AMP ({str(amp_dtype)[6:]})", amp)):
        try:
            bench(key, name, fn)
        except Exception as e:
            print(f"{name}: FAILED: {type(e).__name__}: {str(e)[:400]}")
    if cuda:
        res["cuda_max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30

try:
    import onnxruntime as ort
    av = ort.get_available_providers()
    res["onnxruntime"], res["onnxruntime_providers"] = ort.__version__, av
    print("onnxruntime:", ort.__version__, av)
except ImportError as e:
    ort, av = None, []
    print("onnxruntime: not installed:", e)
if ort is not None and have_weights:
    trt = {"trt_fp16_enable": "1", "trt_engine_cache_enable": "1", "trt_engine_cache_path": f"{src}/trt-cache"}
    rows = [("ort_trt_fp16", "model_fp16.onnx", "TensorrtExecutionProvider", trt),
            ("ort_cuda_fp32", "model_fp32.onnx", "CUDAExecutionProvider", {}),
            ("ort_cuda_fp16", "model_fp16.onnx", "CUDAExecutionProvider", {})]
    if cuda and not any(ep in av for _, _, ep, _ in rows):
        print("ONNX Runtime GPU rows: NOT RUN -- this onnxruntime has no TensorRT/CUDA execution provider"
              " (onnxruntime-gpu not installed). Our ONNX graph is checked once on the CPU provider for"
              " label agreement instead (not a GPU timing).")
        res["onnxruntime_gpu"] = "no CUDA/TensorRT execution provider in this onnxruntime build"
        rows, runs, warm = [("ort_cpu_fp32_once", "model_fp32.onnx", "CPUExecutionProvider", {})], 1, 0
    elif not cuda:
        rows = [("ort_cpu_fp32", "model_fp32.onnx", "CPUExecutionProvider", {}),
                ("ort_cpu_fp16", "model_fp16.onnx", "CPUExecutionProvider", {})]
    for key, model, ep, opts in rows:
        if ep not in av:
            print(f"ours ONNX {ep}: not available in this onnxruntime ({av})"); continue
        if warm == 0 and time.time() + 60 > deadline:
            print(f"ours ONNX {ep}: skipped, too little of the time budget left"); continue
        try:
            t = time.perf_counter()
            s = ort.InferenceSession(f"{src}/{model}", providers=[(ep, opts)])
            print(f"ours ONNX {model} {ep}: session in {time.perf_counter() - t:.1f} s" + (" (TensorRT engine build)" if "Tensorrt" in ep else ""))
            if s.get_providers()[0] != ep:
                print(f"ours ONNX {ep}: fell back to {s.get_providers()}; not timed"); continue
            def run(x, s=s):
                return torch.from_numpy(s.run(["logits"], {"image": np.ascontiguousarray(x.float().cpu().numpy())})[0]).to(dev)
            if warm == 0:
                t = time.perf_counter(); y = swi(run); lab = label(y); sync()
                print(f"ours ONNX {model} {ep}: one run {time.perf_counter() - t:.1f} s (CPU, for agreement only)")
                res["rows"][key] = {"one_run_s": time.perf_counter() - t}
                logits[key], labels[key] = y.float(), lab
            else:
                bench(key, f"ours ONNX {model[6:10]} {ep[:-17]}", lambda: swi(run))
                res["rows"][key]["note"] = "includes host<->device copies of each window (no IO binding)"
        except Exception as e:
            print(f"ours ONNX {model} {ep}: FAILED: {type(e).__name__}: {str(e)[:400]}")

if "monai_fp32" in labels:
    ref_l, ref_y = labels["monai_fp32"], logits["monai_fp32"]
    print(f"label-map agreement with MONAI fp32 ({ref_l.numel()} voxels):")
    for k in labels:
        r = res["rows"][k]
        r["voxels_differing_from_monai_fp32"] = int((labels[k] != ref_l).sum())
        r["max_abs_logit_diff_vs_monai_fp32"] = float((logits[k] - ref_y).abs().max())
        print(f"  {k:18s} differing voxels {r['voxels_differing_from_monai_fp32']:9d}  max |logit diff| {r['max_abs_logit_diff_vs_monai_fp32']:.3e}")
    counts = torch.bincount(ref_l.flatten().long().cpu(), minlength=5).tolist()
    res["monai_fp32_label_counts"] = {str(i): c for i, c in enumerate(counts) if c}
    print("  MONAI fp32 label counts:", res["monai_fp32_label_counts"])
print(json.dumps(res, indent=1))
json.dump(res, open(f"{out}/bench_inference.json", "w"), indent=1)
ok = "monai_fp32" in res["rows"] and (not cuda or any(k.startswith("ort_") and "p50_ms" in v for k, v in res["rows"].items()))
print("bench_result:", ("PASS" if ok else "INCOMPLETE") + ("" if cuda else " (CPU smoke run)"))
sys.exit(0 if ok else 1)
PY
}

# ---------------------------------------------------------------------------------------------

run_all() {
    local out="$1"
    echo "gpu-run: $(date -u +%FT%TZ) on $(uname -n); out=$out work=$WORK python=$PY budget=${BUDGET_S}s"
    cat "$G/BUILD.txt" 2>/dev/null || echo "WARNING: no $G/BUILD.txt: was 'scripts/gpu-run.sh build' run and target/gpu carried?"
    # The device Python's torch/lib: our binaries load libtorch (and through it libtorch_cuda) there.
    TORCH_LIB="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null || true)"
    echo "torch_lib: ${TORCH_LIB:-NOT FOUND (python torch does not import)}"
    local ldp="$TORCH_LIB"
    if [ -n "$TORCH_LIB" ] && [ -x "$G/bin/gpu_check" ]; then
        # A library torch/lib does not resolve: look for it next to torch (site-packages) and in CUDA.
        local lib found
        for lib in $(LD_LIBRARY_PATH="$ldp" ldd "$G/bin/gpu_check" 2>/dev/null | awk '/not found/ {print $1}' | sort -u); do
            found="$(find "$(dirname "$(dirname "$TORCH_LIB")")" /usr/local/cuda*/lib64 /usr/lib /usr/lib64 -name "$lib" -print -quit 2>/dev/null || true)"
            echo "ldd: $lib not found with torch/lib; ${found:+found at $found, added to LD_LIBRARY_PATH}${found:-nowhere}"
            [ -n "$found" ] && ldp="$ldp:$(dirname "$found")"
        done
    fi
    export TORCH_LIB
    export LD_LIBRARY_PATH="$ldp${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export PYTHONPATH="$PWD/$G/py${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1 PYTHON="$PY" WORK
    local start=$SECONDS names=() rcs=()
    part() { # part NAME CAP_S LOG_FILE|- SUBCOMMAND [ARGS]
        local name="$1" cap="$2" log="$3" left t rc
        shift 3
        left=$((BUDGET_S - (SECONDS - start)))
        t=$((cap < left ? cap : left))
        echo
        echo "================ $name (timeout ${t}s; $((SECONDS - start))s used of ${BUDGET_S}s)"
        if [ "$t" -lt 15 ]; then
            echo "$name: SKIPPED, the time budget is spent"
            rc=125
        else
            local t0=$SECONDS
            export BENCH_DEADLINE=$(($(date +%s) + t - 10))
            if [ "$log" = - ]; then
                timeout -k 5 "$t" bash "$SELF" "$@" 2>&1
                rc=$?
            else
                timeout -k 5 "$t" bash "$SELF" "$@" 2>&1 | tee "$out/$log"
                rc=${PIPESTATUS[0]}
            fi
            [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "$name: TIMED OUT after ${t}s"
            echo "---- $name: exit $rc in $((SECONDS - t0))s"
        fi
        names+=("$name")
        rcs+=("$rc")
    }
    part env 60 env.txt _env
    part model 150 gpu_check.txt _model
    part ort 150 onnxruntime.txt _ort
    part case 120 - _case
    part bench 300 bench_inference.txt _bench "$out"
    (
        echo "gpu-run summary ($((SECONDS - start))s; exit 124 = timed out, 125 = skipped)"
        local i status=0
        for i in "${!names[@]}"; do
            printf '  %-6s exit %s\n' "${names[$i]}" "${rcs[$i]}"
            [ "${rcs[$i]}" = 0 ] || status=1
        done
        echo "key lines:"
        grep -hE '^(torch:|torch device:|onnxruntime:|onnxruntime providers:|onnxruntime_gpu_providers:|monai:|MISSING|ldd: )' "$out/env.txt" 2>/dev/null | sed 's/^/  /'
        grep -hE '^(cuda_available|max_abs|voxel_agreement|cuda_.*_forward_ms|result:)' "$out/gpu_check.txt" 2>/dev/null | sed 's/^/  /'
        grep -hE '(accepted|FAILED|fell back|onnxruntime_gpu_result)' "$out/onnxruntime.txt" 2>/dev/null | sed 's/^/  /'
        grep -hE '(^== | p50 +[0-9]|NOT RUN|FAILED|reduced|one run|differing voxels|label counts|bench_result)' "$out/bench_inference.txt" 2>/dev/null | sed 's/^/  /'
        echo "overall: $([ $status = 0 ] && echo PASS || echo 'NOT ALL PARTS PASSED (see above)')"
        exit $status
    ) | tee "$out/summary.txt"
    return "${PIPESTATUS[0]}"
}

case "${1:-}" in
build)
    build
    ;;
run)
    OUT_DIR="${2:-${OUT:-$G/out}}"
    mkdir -p "$OUT_DIR"
    OUT_DIR="$(cd "$OUT_DIR" && pwd)"
    WORK="${WORK:-/tmp/brats-gpu-work}"
    BUDGET_S="${BUDGET_S:-330}"
    rm -rf "$WORK"
    mkdir -p "$WORK"
    run_all "$OUT_DIR" 2>&1 | tee "$OUT_DIR/gpu-run.log"
    exit "${PIPESTATUS[0]}"
    ;;
_env) part_env ;;
_model) part_model ;;
_ort) part_ort ;;
_case) part_case ;;
_bench) part_bench "$2" ;;
*)
    echo "usage: $0 build | run [OUT_DIR]" >&2
    exit 64
    ;;
esac
