"""Where torch's CPU time goes for the bundle SegResNet (detgen weights): one forward (a cold first
run, like ort_profile.py) on a [1,4,X,Y,Z] input under torch.profiler; prints time per op.

Usage: torch_profile.py [--shape 128,128,96] [--threads 1]
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "monai"))
from detgen import det_state_dict  # noqa: E402
from monai.networks.nets import SegResNet  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="128,128,96")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, y, z = (int(v) for v in args.shape.split(","))
    m = SegResNet(spatial_dims=3, blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1], init_filters=16,
                  in_channels=4, out_channels=3, dropout_prob=0.2)
    m.load_state_dict(det_state_dict(m))
    m.eval()
    inp = torch.randn(1, 4, x, y, z)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        m(inp)
        t = time.perf_counter() - t0
    print(f"torch {torch.__version__}, input [1,4,{x},{y},{z}], {args.threads} threads, forward {t:.2f} s, "
          f"mkldnn {torch.backends.mkldnn.is_available()}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
