#!/usr/bin/env bash
# GPU checks of the SegResNet model crate (issue 3, item 6).
#
#   scripts/gpu-check-model.sh build        # here, on a machine with cargo (CPU is enough)
#   scripts/gpu-check-model.sh run [OUT]    # there, on a CUDA machine with Python torch 2.11
#
# `build` compiles crates/brats-model/examples/gpu_check.rs against the CPU libtorch in .deps/
# and copies the (stripped) binary to target/gpu-check/. Carry that folder to the GPU machine.
# `run` points the binary at the GPU machine's own libtorch (Python torch's torch/lib, whose
# libtorch.so loads libtorch_cuda.so; see docs in the toolchain notes), then:
#   1. CUDA fp32 forward vs CPU fp32 (max abs diff; cuDNN may use TF32 for convolutions),
#      autocast fp16 and pure bf16 vs CUDA fp32, timings, voxel-decision agreement;
#   2. the exported ONNX graphs (fp32 and fp16) in ONNX Runtime's TensorRT and CUDA execution
#      providers (Python onnxruntime-gpu, whichever providers are installed), compared with the
#      CPU tch logits. A provider that cannot load is reported, not silently replaced by CPU.
# Everything is printed and written to OUT (default target/gpu-check/out; $OUT if set).
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
build)
    cargo build -p brats-model --example gpu_check
    mkdir -p target/gpu-check
    cp target/debug/examples/gpu_check target/gpu-check/gpu_check
    strip --strip-debug target/gpu-check/gpu_check 2>/dev/null || true
    ls -l target/gpu-check/gpu_check
    ;;
run)
    out="${2:-${OUT:-target/gpu-check/out}}"
    mkdir -p "$out"
    py="${PYTHON:-python3}"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    torch_lib="$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
    echo "torch_lib: $torch_lib"
    status=0
    LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        target/gpu-check/gpu_check "$out" 96 96 64 | tee "$out/gpu_check.txt" || status=$?
    "$py" - "$out" <<'PY' | tee "$out/onnxruntime.txt" || status=$?
import sys, time
import numpy as np
out = sys.argv[1]
try:
    import onnxruntime as ort
except ImportError as e:
    print(f"onnxruntime: not installed ({e})"); sys.exit(1)
print("onnxruntime:", ort.__version__, "available providers:", ort.get_available_providers())
x = np.fromfile(f"{out}/input_f32le.bin", dtype="<f4").reshape(1, 4, 96, 96, 64)
ref = np.fromfile(f"{out}/logits_cpu_f32le.bin", dtype="<f4").reshape(1, 3, 96, 96, 64)
ok_any = False
for model in ("model_fp32.onnx", "model_fp16.onnx"):
    for ep in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
        if ep not in ort.get_available_providers():
            print(f"{model} {ep}: not available in this onnxruntime build"); continue
        opts = {"trt_fp16_enable": "1" if "fp16" in model else "0"} if ep.startswith("Tensorrt") else {}
        try:
            s = ort.InferenceSession(f"{out}/{model}", providers=[(ep, opts)])
        except Exception as e:
            print(f"{model} {ep}: FAILED to create session: {str(e)[:300]}"); continue
        used = s.get_providers()
        if used[0] != ep:
            print(f"{model} {ep}: fell back to {used}"); continue
        s.run(None, {"image": x})
        t0 = time.time(); y = s.run(None, {"image": x})[0]; dt = time.time() - t0
        d = float(np.abs(y - ref).max())
        agree = float(((y >= 0) == (ref >= 0)).mean())
        print(f"{model} {ep}: accepted; max_abs_vs_cpu_tch={d:.3e} voxel_agreement={agree:.6f} run_ms={dt*1e3:.1f}")
        ok_any = True
print("onnxruntime_gpu_result:", "PASS" if ok_any else "FAIL")
sys.exit(0 if ok_any else 1)
PY
    echo "exit status: $status"
    exit "$status"
    ;;
*)
    echo "usage: $0 build | run [OUT_DIR]" >&2
    exit 64
    ;;
esac
