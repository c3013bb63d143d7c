"""Where ONNX Runtime's CPU time goes: runs MODEL once (a cold first run) on a [1,4,X,Y,Z] input
with ORT's profiler (Python onnxruntime from the MONAI venv, same library family as ours) and
prints the time per operator type (and the share of each).

Usage: ort_profile.py MODEL.onnx [--shape 128,128,96] [--threads 2] [--dynamic]

By default the input dimensions N, X, Y, Z are pinned to the run's shape (free dimension
overrides, arena off), as `brats-inference` runs the CPU provider; --dynamic keeps them symbolic.
"""

import argparse
import collections
import json
import os
import tempfile

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--shape", default="128,128,96")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dynamic", action="store_true")
    args = ap.parse_args()
    x, y, z = (int(v) for v in args.shape.split(","))
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.enable_profiling = True
    if not args.dynamic:
        for name, v in zip("NXYZ", (1, x, y, z)):
            so.add_free_dimension_override_by_name(name, v)
        so.enable_cpu_mem_arena = False
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    sess = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    inp = np.random.default_rng(0).standard_normal((1, 4, x, y, z), dtype=np.float32)
    sess.run(None, {"image": inp})
    prof = sess.end_profiling()
    ev = json.load(open(prof))
    # second run only: keep events after the first model_run ends
    runs = [e for e in ev if e.get("name") == "model_run"]
    first_end = runs[0]["ts"] + runs[0]["dur"] if runs else 0
    by = collections.Counter()
    cnt = collections.Counter()
    for e in ev:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"].get("op_name", "?")
            by[op] += e["dur"]
            cnt[op] += 1
    total = sum(by.values())
    print(f"ORT {ort.__version__}, input [1,4,{x},{y},{z}] ({'symbolic' if args.dynamic else 'pinned'}), {args.threads} threads,"
          f" model run {runs[0]['dur']/1e6:.2f} s"
          f" (kernel sum {total/1e6:.2f} s)")
    print("| op type | nodes | time | share |\n|---|---:|---:|---:|")
    for op, d in by.most_common():
        print(f"| {op} | {cnt[op]} | {d/1e6:.2f} s | {100*d/total:.1f}% |")


if __name__ == "__main__":
    main()
