#!/usr/bin/env python3
"""Validate an ONNX export of SegResNet against MONAI.

Usage (from the repository root):
    tests/monai/.venv/bin/python tests/monai/check_onnx.py MODEL.onnx \
        [--config bundle|small] [--weights generator|W.safetensors|W.pt] [--shape X,Y,Z] [--atol 1e-4]

1. `onnx.checker.check_model(MODEL, full_check=True)` (structure + shape inference).
2. If onnxruntime is importable: runs the model on CPU on the deterministic input (README) of
   shape [1, 4, X, Y, Z] and compares with MONAI SegResNet (torch fp32 CPU, eval) carrying the
   given weights (default: the deterministic weights). The shape defaults to the model's static
   input shape, or 64,64,48 when that is dynamic. Without onnxruntime this step is skipped.

Exit status 0 on success, 1 on a checker failure or a mismatch above --atol.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from monai.networks.nets import SegResNet

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from check_roundtrip import load_any  # noqa: E402
from detgen import det_input, det_state_dict  # noqa: E402
from make_segresnet_fixtures import BUNDLE_CONFIG, SMALL_CONFIG  # noqa: E402


def static_shape(model_proto):
    inp = model_proto.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    return dims if dims and all(d for d in dims) else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--config", choices=["bundle", "small"], default="bundle")
    ap.add_argument("--weights", default="generator")
    ap.add_argument("--shape", default=None, help="X,Y,Z (multiples of 8 for the bundle config)")
    ap.add_argument("--atol", type=float, default=1e-4)
    args = ap.parse_args()
    torch.set_num_threads(1)

    onnx.checker.check_model(args.model, full_check=True)  # the path form also handles >2 GB models
    print(f"OK: onnx.checker.check_model(full_check=True) on {args.model}")
    proto = onnx.load(args.model, load_external_data=False)
    print("  opsets:", {o.domain or "ai.onnx": o.version for o in proto.opset_import})

    try:
        import onnxruntime as ort
    except ImportError:
        print("SKIP: onnxruntime not installed; numeric comparison skipped")
        return 0

    if args.shape:
        spatial = tuple(int(v) for v in args.shape.split(","))
    else:
        st = static_shape(proto)
        spatial = tuple(st[2:]) if st else (64, 64, 48)
    x = det_input((1, 4) + spatial)

    config = BUNDLE_CONFIG if args.config == "bundle" else SMALL_CONFIG
    model = SegResNet(**config).eval()
    sd = det_state_dict(model) if args.weights == "generator" else load_any(args.weights)
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    got = sess.run(None, {name: x})[0]
    if got.shape != want.shape:
        print(f"FAIL: onnxruntime output shape {got.shape} != MONAI {want.shape}")
        return 1
    err = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
    ok = err <= args.atol
    print(
        f"{'OK' if ok else 'FAIL'}: onnxruntime {ort.__version__} vs MONAI on [1, 4, {', '.join(map(str, spatial))}]: "
        f"max abs diff {err:.3g} (atol {args.atol})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
