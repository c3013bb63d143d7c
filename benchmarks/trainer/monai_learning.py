"""MONAI side of the learning benchmark (benchmarks/trainer/learning.sh): the demo's recipe,
trained in MONAI 1.6.1 on a decathlon datalist, for one seed; prints one JSON line with the
best validation Dice per region (each region's maximum over the validations, as
benchmarks/trainer/seeds.sh reports ours) and the best mean.

The recipe is the bundle's training (../../../shared/notes/monai-reference.md) with the demo's
sizes, the same values `brats-trainer train` gets from learning.sh:

    SegResNet(blocks_down=[1,1,1], blocks_up=[1,1], init_filters=8, in_channels=4,
              out_channels=3, dropout_prob=0.2)
    LoadImaged(image, label) -> EnsureChannelFirstd(label) -> ConvertToMultiChannelBasedOnBratsClassesd
    -> EnsureTyped(label, float32) -> NormalizeIntensityd(nonzero, channel_wise)
    -> RandSpatialCropd(CROP, random_size=False) -> RandFlipd p=0.5 on each axis
    -> RandScaleIntensityd(0.1, p=1) -> RandShiftIntensityd(0.1, p=1)
    DiceLoss(smooth_nr=0, smooth_dr=1e-5, squared_pred=True, to_onehot_y=False, sigmoid=True)
    Adam(lr, weight_decay=1e-5), CosineAnnealingLR(T_max=epochs) per epoch, batch 1, shuffled
    validation every VAL_INTERVAL epochs: sliding window (roi CROP, sw_batch 1, overlap 0.5),
    sigmoid, threshold 0.5, DiceMetric(include_background=True, reduction="mean_batch")

Usage: python monai_learning.py --datalist D.json --seed 0 [--epochs 25 --lr 5e-3 --crop 32 --val-interval 5]
"""

import argparse
import json
import os
import time

import torch

from monai.data import DataLoader, Dataset, load_decathlon_datalist
from monai.inferers import sliding_window_inference
from monai.losses import DiceLoss
from monai.metrics import DiceMetric
from monai.networks.nets import SegResNet
from monai.transforms import (
    Compose,
    ConvertToMultiChannelBasedOnBratsClassesd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
)
from monai.utils import set_determinism


def transforms(crop, train):
    steps = [
        LoadImaged(keys=["image", "label"]),
        EnsureChannelFirstd(keys="label", channel_dim="no_channel"),
        ConvertToMultiChannelBasedOnBratsClassesd(keys="label"),
        EnsureTyped(keys=["image", "label"], dtype=torch.float32),
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
    ]
    if train:
        steps += [
            RandSpatialCropd(keys=["image", "label"], roi_size=crop, random_size=False),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=2),
            RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
        ]
    return Compose(steps)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datalist", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--crop", type=int, default=32)
    ap.add_argument("--val-interval", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    set_determinism(seed=a.seed)
    base = os.path.dirname(os.path.abspath(a.datalist))
    train = load_decathlon_datalist(a.datalist, True, "training", base)
    val = load_decathlon_datalist(a.datalist, True, "validation", base)
    crop = [a.crop] * 3
    train_loader = DataLoader(Dataset(train, transforms(crop, True)), batch_size=1, shuffle=True, num_workers=0)
    val_loader = DataLoader(Dataset(val, transforms(crop, False)), batch_size=1, num_workers=0)
    net = SegResNet(spatial_dims=3, blocks_down=[1, 1, 1], blocks_up=[1, 1], init_filters=8,
                    in_channels=4, out_channels=3, dropout_prob=0.2)
    loss_fn = DiceLoss(smooth_nr=0, smooth_dr=1e-5, squared_pred=True, to_onehot_y=False, sigmoid=True)
    opt = torch.optim.Adam(net.parameters(), lr=a.lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=a.epochs)
    metric = DiceMetric(include_background=True, reduction="mean_batch")
    best = [0.0, 0.0, 0.0]
    best_mean = 0.0
    started = time.time()
    for epoch in range(1, a.epochs + 1):
        net.train()
        for batch in train_loader:
            opt.zero_grad(set_to_none=False)
            loss = loss_fn(net(batch["image"]), batch["label"])
            loss.backward()
            opt.step()
        sched.step()
        if epoch % a.val_interval:
            continue
        net.eval()
        with torch.no_grad():
            for batch in val_loader:
                logits = sliding_window_inference(batch["image"], crop, 1, net, overlap=0.5)
                metric(y_pred=(torch.sigmoid(logits) > 0.5).float(), y=batch["label"])
        tc, wt, et = (float(v) for v in metric.aggregate())
        metric.reset()
        best = [max(b, v) for b, v in zip(best, (tc, wt, et))]
        best_mean = max(best_mean, (tc + wt + et) / 3)
    print(json.dumps({"impl": "MONAI", "seed": a.seed, "tc": best[0], "wt": best[1], "et": best[2],
                      "mean": best_mean, "seconds": time.time() - started}))


if __name__ == "__main__":
    main()
