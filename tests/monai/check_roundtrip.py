#!/usr/bin/env python3
"""Check a SegResNet `.safetensors` written by the Rust side against MONAI.

Usage (from the repository root):
    tests/monai/.venv/bin/python tests/monai/check_roundtrip.py WEIGHTS.safetensors \
        [--config bundle|small] [--reference generator|REF.safetensors|REF.pt] [--forward]

1. Builds MONAI `SegResNet` with the bundle config (default) or the small fixture config and loads
   WEIGHTS with `load_state_dict(strict=True)` (so names, shapes and the set of keys must match
   MONAI's state_dict exactly; dtype must be float32).
2. Compares every tensor bit-exactly with the reference: `generator` (default) = the deterministic
   weights of tests/fixtures/monai/README.md, or a `.safetensors` / torch `.pt` file (a plain
   state_dict or one wrapped as {"model": ...} / {"state_dict": ...}).
3. With --forward, also runs MONAI on the deterministic input(s) of the committed fixtures and
   compares with the committed logits (max abs diff <= 1e-4).

Exit status 0 when everything matches, 1 otherwise.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import SegResNet
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from detgen import det_input, det_state_dict  # noqa: E402
from make_segresnet_fixtures import BUNDLE_CONFIG, BUNDLE_SHAPES, LOGITS_TOL, OUT, SMALL_CONFIG, SMALL_SHAPE  # noqa: E402


def load_any(path):
    path = str(path)
    if path.endswith(".safetensors"):
        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    return obj


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights", help=".safetensors written by the Rust side")
    ap.add_argument("--config", choices=["bundle", "small"], default="bundle")
    ap.add_argument("--reference", default="generator", help="'generator' or a .safetensors / .pt path")
    ap.add_argument("--forward", action="store_true", help="also compare MONAI logits with the committed fixtures")
    args = ap.parse_args()
    torch.set_num_threads(1)

    config = BUNDLE_CONFIG if args.config == "bundle" else SMALL_CONFIG
    model = SegResNet(**config).eval()
    expected_keys = list(model.state_dict().keys())

    sd = load_file(args.weights)
    ok = True
    bad_dtypes = [k for k, v in sd.items() if v.dtype != torch.float32]
    if bad_dtypes:
        print(f"FAIL: non-float32 tensors: {bad_dtypes[:5]}")
        ok = False
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        print(f"FAIL: load_state_dict(strict=True): {e}")
        return 1
    print(f"loaded {len(sd)} tensors into MONAI SegResNet({args.config}) with strict=True")

    ref = det_state_dict(SegResNet(**config)) if args.reference == "generator" else load_any(args.reference)
    if set(ref) != set(expected_keys):
        print(f"FAIL: reference keys differ from MONAI's: {sorted(set(ref) ^ set(expected_keys))[:5]}")
        return 1
    loaded = model.state_dict()
    n_bad = 0
    for k in expected_keys:
        a = loaded[k].detach().cpu().contiguous().numpy()
        b = ref[k].detach().cpu().to(torch.float32).contiguous().numpy()
        if a.shape != b.shape or a.view(np.uint32).tobytes() != b.view(np.uint32).tobytes():
            n_bad += 1
            if n_bad <= 5:
                diff = np.abs(a.astype(np.float64) - b.astype(np.float64)).max() if a.shape == b.shape else "shape"
                print(f"FAIL: {k}: not bit-identical to the reference (max abs diff {diff})")
    if n_bad:
        print(f"FAIL: {n_bad}/{len(expected_keys)} tensors differ from the reference ({args.reference})")
        ok = False
    else:
        print(f"OK: all {len(expected_keys)} tensors bit-identical to the reference ({args.reference})")

    if args.forward:
        cases = (
            [((1, 4) + s, OUT / f"logits_{'x'.join(map(str, s))}.safetensors", f"logits_{'x'.join(map(str, s))}") for s in BUNDLE_SHAPES]
            if args.config == "bundle"
            else [((1, 4) + SMALL_SHAPE, OUT / "small_logits.safetensors", "logits")]
        )
        for shape, f, name in cases:
            with torch.no_grad():
                y = model(torch.from_numpy(det_input(shape))).numpy()
            want = load_file(str(f))[name].numpy()
            err = float(np.abs(y.astype(np.float64) - want).max())
            status = "OK" if err <= LOGITS_TOL else "FAIL"
            ok &= err <= LOGITS_TOL
            print(f"{status}: forward {list(shape)} vs {f.name}: max abs diff {err:.3g} (tol {LOGITS_TOL})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
