"""MONAI side of the CPU training-step benchmark: one optimisation step of the
`brats_mri_segmentation` bundle, timed.

What one step is (the bundle's `SupervisedTrainer` iteration without AMP, which is CUDA-only):

    optimizer.zero_grad(set_to_none=False)      (MONAI's default optim_set_to_none=False)
    -> SegResNet(blocks_down=[1,2,2,4], blocks_up=[1,1,1], init_filters=16, in_channels=4,
                 out_channels=3, dropout_prob=0.2), train mode
    -> DiceLoss(smooth_nr=0, smooth_dr=1e-5, squared_pred=True, to_onehot_y=False, sigmoid=True)
    -> loss.backward()
    -> torch.optim.Adam(lr=1e-4, weight_decay=1e-5).step()

Batch 1. The input is `torch.randn(1, 4, X, Y, Z)` and the target `torch.rand(1, 3, X, Y, Z) < 0.5`
as float32, both made once from `--seed` (which also seeds the weights and dropout) and reused by
every step, so only the step is timed. `--warmup` untimed steps first. torch.set_num_threads(T).

Usage:

    tests/monai/.venv/bin/python benchmarks/trainer/monai_train_step.py \
        --crop 64,64,64 --steps 5 --warmup 1 --threads 2 --seed 0

Prints one JSON line: median_s and p90_s of the per-step wall times (p90 by linear interpolation,
numpy's default), every step's time (times_s), steps, crop, threads, seed, the final loss, the process's peak RSS (VmHWM, KiB),
torch_version, monai_version.
"""

import argparse
import json
import time

import numpy as np
import torch

import monai
from monai.losses import DiceLoss
from monai.networks.nets import SegResNet

BUNDLE_CONFIG = dict(
    spatial_dims=3, blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1], init_filters=16,
    in_channels=4, out_channels=3, dropout_prob=0.2,
)


def status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--crop", default="64,64,64", help="X,Y,Z (multiples of 8)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N")
    ap.add_argument("--amp", action="store_true", help="the bundle's AMP path on CUDA: autocast fp16 + GradScaler")
    args = ap.parse_args()
    crop = [int(v) for v in args.crop.split(",")]
    if len(crop) != 3 or any(c <= 0 or c % 8 for c in crop):
        ap.error("--crop must be three positive multiples of 8")
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    dev = torch.device(args.device)
    amp = args.amp and dev.type == "cuda"
    model = SegResNet(**BUNDLE_CONFIG).to(dev)
    model.train()
    loss_fn = DiceLoss(smooth_nr=0, smooth_dr=1e-5, squared_pred=True, to_onehot_y=False, sigmoid=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-5)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    x = torch.randn(1, 4, *crop).to(dev)
    y = (torch.rand(1, 3, *crop) < 0.5).float().to(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step():
        # MONAI's SupervisedTrainer iteration: zero_grad, forward under autocast when amp,
        # loss, scaler.scale(loss).backward(), scaler.step(opt), scaler.update().
        opt.zero_grad(set_to_none=False)
        with torch.autocast("cuda", enabled=amp):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.item()

    for _ in range(args.warmup):
        step()
    times = []
    loss = None
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)

    print(json.dumps(dict(
        median_s=float(np.median(times)),
        p90_s=float(np.percentile(times, 90)),
        times_s=[round(t, 4) for t in times],
        steps=args.steps,
        warmup=args.warmup,
        crop=crop,
        threads=args.threads,
        seed=args.seed,
        device=str(dev),
        amp=amp,
        final_loss=loss,
        peak_rss_kib=status_kib("VmHWM"),
        torch_version=torch.__version__,
        monai_version=monai.__version__,
    )))


if __name__ == "__main__":
    main()
