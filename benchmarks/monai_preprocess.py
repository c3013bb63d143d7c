"""MONAI side of the preprocessing benchmark.

Times the bundle's inference preprocessing, `LoadImaged(keys="image")` on the list of 4 modality
files followed by `NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)`, on the
same files as `bench_preprocess` (the Rust side), with torch limited to 2 threads.

Usage: monai_preprocess.py T1C T1 T2 FLAIR [--repeat N] [--warmup W] [--save OUT.npy]

Prints one JSON line per timed repeat ("kind": "repeat") and one with the medians and the
process's peak RSS (VmHWM, KiB) ("kind": "median"), with the RSS right after the imports
(torch + MONAI alone) for context. Imports and warm-up runs are not timed.
"""

import argparse
import json
import statistics
import time

import numpy as np
import torch
from monai.transforms import LoadImaged, NormalizeIntensityd


def vm_rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def vm_hwm_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs=4, help="T1c, T1, T2, FLAIR")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", help="write the last normalised image here (.npy, not timed)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rss_after_import = vm_rss_kib()

    load = LoadImaged(keys="image")
    norm = NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)
    rows = []
    out = None
    for i in range(args.warmup + args.repeat):
        c0 = time.process_time()
        t0 = time.perf_counter()
        d = load({"image": list(args.files)})
        t1 = time.perf_counter()
        d = norm(d)
        t2 = time.perf_counter()
        cpu = time.process_time() - c0
        out = d["image"]
        if i < args.warmup:
            continue
        row = {"kind": "repeat", "repeat": i - args.warmup, "load": t1 - t0, "normalise": t2 - t1, "total": t2 - t0, "cpu": cpu}
        rows.append(row)
        print(json.dumps(row), flush=True)
    shape = list(out.shape)
    if args.save:
        np.save(args.save, np.asarray(out.detach().cpu().numpy() if hasattr(out, "detach") else out, dtype=np.float32))
    med = {k: statistics.median(r[k] for r in rows) for k in ("load", "normalise", "total", "cpu")}
    print(
        json.dumps(
            {
                "kind": "median",
                "side": "monai",
                "repeats": args.repeat,
                "shape": shape,
                **med,
                "threads": torch.get_num_threads(),
                "vm_hwm_kib": vm_hwm_kib(),
                "rss_after_import_kib": rss_after_import,
                "torch": torch.__version__,
                "monai": __import__("monai").__version__,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
