"""Sanity check of the benchmark: ours (safetensors `image`) vs MONAI (.npy) on the same case.

Usage: compare_outputs.py OURS.safetensors MONAI.npy [--tol 1e-5]
Prints one JSON line; exits 1 when the shapes differ or the max abs difference exceeds --tol.
"""

import argparse
import json
import sys

import numpy as np
from safetensors.numpy import load_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ours")
    ap.add_argument("monai")
    ap.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args()
    ours = load_file(args.ours)["image"]
    ref = np.load(args.monai)
    ok = ours.shape == ref.shape
    diff = float(np.max(np.abs(ours.astype(np.float64) - ref.astype(np.float64)))) if ok else float("inf")
    ok = ok and diff <= args.tol
    print(json.dumps({"ours_shape": list(ours.shape), "monai_shape": list(ref.shape), "max_abs_diff": diff,
                      "tol": args.tol, "ok": ok}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
