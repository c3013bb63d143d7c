#!/usr/bin/env bash
# GPU inference benchmark (issue 4, item 8): the bundle's end-to-end inference with MONAI/torch
# (fp32 and AMP) against our exported ONNX graph in ONNX Runtime's TensorRT (fp16) and CUDA
# providers, on the same GPU, same full-size case, same weights; latency p50/p95 over 20 runs
# after warm-up, and agreement of the label maps.
#
#   scripts/gpu-bench-inference.sh build      # here (cargo): case + model into target/gpu-bench/
#   scripts/gpu-bench-inference.sh run [OUT]  # there (CUDA, Python torch 2.11 + MONAI + onnxruntime-gpu)
#
# Our Rust service binary is not run on the GPU machine: ONNX Runtime's CUDA/TensorRT provider
# libraries (~300 MB + TensorRT) exceed what a device call carries; the graph and the
# preprocessing are ours, the provider libraries are the device Python's onnxruntime-gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=target/gpu-bench
case "${1:-}" in
build)
    mkdir -p "$dir"
    cargo build --release -p brats-preprocess -p brats-trainer
    target/release/brats-preprocess synth --shape 240,240,155 --seed 1 --out "$dir"
    target/release/brats-preprocess run --image "$dir"/synth-00001-{t1c,t1n,t2w,t2f}.nii.gz --out "$dir/case.safetensors"
    target/release/brats-trainer init --out "$dir/weights.safetensors" --seed 1
    target/release/brats-trainer export-onnx --weights "$dir/weights.safetensors" --out "$dir/model_fp32.onnx"
    target/release/brats-trainer export-onnx --weights "$dir/weights.safetensors" --out "$dir/model_fp16.onnx" --fp16 --metadata "$dir/metadata_fp16.json"
    rm -f "$dir"/synth-00001-*.nii.gz
    du -sh "$dir"
    ;;
run)
    out="${2:-${OUT:-$dir/out}}"
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    "${PYTHON:-python3}" - "$dir" "$out" <<'PY'
import json, sys, time
import numpy as np, torch
from safetensors.numpy import load_file
from monai.inferers import sliding_window_inference
from monai.networks.nets import SegResNet
src, out = sys.argv[1], sys.argv[2]
image = torch.from_numpy(load_file(f"{src}/case.safetensors")["image"])[None].cuda()
sd = {k: torch.from_numpy(v) for k, v in load_file(f"{src}/weights.safetensors").items()}
net = SegResNet(blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1], init_filters=16, in_channels=4, out_channels=3, dropout_prob=0.2)
net.load_state_dict(sd); net = net.cuda().eval()
def label(logits):
    p = torch.sigmoid(logits) >= 0.5
    return torch.where(p[:, 2], 4, torch.where(p[:, 0], 1, torch.where(p[:, 1], 2, 0))).to(torch.uint8)
def bench(name, fn, runs=20):
    for _ in range(3): fn()
    torch.cuda.synchronize(); t = []
    for _ in range(runs):
        s = time.perf_counter(); y = fn(); torch.cuda.synchronize(); t.append(time.perf_counter() - s)
    t = np.array(t) * 1000
    print(f"{name:28s} p50 {np.percentile(t, 50):8.1f} ms  p95 {np.percentile(t, 95):8.1f} ms")
    return y, {"p50_ms": float(np.percentile(t, 50)), "p95_ms": float(np.percentile(t, 95))}
results, labels = {}, {}
with torch.no_grad():
    y, results["monai_fp32"] = bench("MONAI torch fp32", lambda: label(sliding_window_inference(image, (240, 240, 160), 1, net, overlap=0.5)))
    labels["monai_fp32"] = y
    with torch.autocast("cuda", dtype=torch.float16):
        y, results["monai_amp"] = bench("MONAI torch AMP", lambda: label(sliding_window_inference(image, (240, 240, 160), 1, net, overlap=0.5)))
    labels["monai_amp"] = y
try:
    import onnxruntime as ort
    for model, ep, opts in [("model_fp16.onnx", "TensorrtExecutionProvider", {"trt_fp16_enable": "1", "trt_engine_cache_enable": "1", "trt_engine_cache_path": out}),
                            ("model_fp32.onnx", "CUDAExecutionProvider", {})]:
        if ep not in ort.get_available_providers():
            print(f"{ep}: not available in this onnxruntime ({ort.get_available_providers()})"); continue
        s = ort.InferenceSession(f"{src}/{model}", providers=[(ep, opts)])
        if s.get_providers()[0] != ep:
            print(f"{ep}: fell back to {s.get_providers()}; not timed"); continue
        def run(x, s=s):
            return torch.from_numpy(s.run(["logits"], {"image": x.float().cpu().numpy()})[0]).cuda()
        y, results[ep] = bench(f"ours ONNX {ep[:-17]}", lambda: label(sliding_window_inference(image, (240, 240, 160), 1, run, overlap=0.5)))
        labels[ep] = y
except ImportError as e:
    print("onnxruntime not installed:", e)
ref = labels["monai_fp32"]
for k, v in labels.items():
    results.setdefault(k, {})["voxels_differing_from_monai_fp32"] = int((v != ref).sum())
print(json.dumps(results, indent=1))
json.dump(results, open(f"{out}/gpu_bench_inference.json", "w"), indent=1)
PY
    ;;
*)
    echo "usage: $0 build | run [OUT]" >&2
    exit 2
    ;;
esac
