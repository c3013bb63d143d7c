"""MONAI's bundle inference end to end, warm, for the GPU latency comparison (issue 14 item 5;
scripts/gpu-ort-cuda.sh serve): the same work one `Segment` request does in our service, in one
process that has already run it `--warmup` times.

Per request: LoadImaged(image: [t1c, t1, t2, flair]) -> NormalizeIntensityd(nonzero,
channel_wise) -> to DEVICE -> SlidingWindowInferer(roi 240x240x160, sw_batch 1, overlap 0.5)
under torch.autocast(float16) when --amp (the bundle's AMP inference) -> sigmoid >= 0.5 -> label
map where(ET, 4, where(TC, 1, where(WT, 2, 0))) -> uint8 .nii.gz written with the T1c affine.
The SegResNet carries tests/monai/detgen.py's deterministic weights (our model.onnx's).

Usage: monai_e2e.py T1C T1 T2 FLAIR --out DIR [--device cuda] [--amp] [--warmup 3] [--repeat 20]
Prints one JSON line: p50/p95/min of the per-request wall time (s) and every time.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.environ.get("DETGEN_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../tests/monai")))
from detgen import det_state_dict  # noqa: E402

import nibabel as nib  # noqa: E402
from monai.inferers import SlidingWindowInferer  # noqa: E402
from monai.networks.nets import SegResNet  # noqa: E402
from monai.transforms import LoadImaged, NormalizeIntensityd  # noqa: E402

BUNDLE_CONFIG = dict(spatial_dims=3, blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1], init_filters=16,
                     in_channels=4, out_channels=3, dropout_prob=0.2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs=4)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=20)
    a = ap.parse_args()
    device = torch.device(a.device)
    model = SegResNet(**BUNDLE_CONFIG)
    model.load_state_dict(det_state_dict(model), strict=True)
    model = model.to(device).eval()
    inferer = SlidingWindowInferer(roi_size=[240, 240, 160], sw_batch_size=1, overlap=0.5)
    load = LoadImaged(keys="image")
    norm = NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)
    os.makedirs(a.out, exist_ok=True)

    def request(i):
        d = norm(load({"image": list(a.files)}))
        img = torch.as_tensor(d["image"]).unsqueeze(0).to(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=a.amp):
            logits = inferer(img, model)[0]
        oh = (torch.sigmoid(logits.float()) >= 0.5).cpu().numpy()
        lab = np.where(oh[2], 4, np.where(oh[0], 1, np.where(oh[1], 2, 0))).astype(np.uint8)
        nib.save(nib.Nifti1Image(lab, np.asarray(d["image"].affine, dtype=np.float64)), f"{a.out}/seg-{i}.nii.gz")

    for i in range(a.warmup):
        request(i)
    times = []
    for i in range(a.repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        request(i)
        times.append(time.perf_counter() - t)
    s = sorted(times)
    print(json.dumps({"side": "monai", "device": a.device, "amp": a.amp, "requests": a.repeat,
                      "p50_s": float(np.percentile(s, 50)), "p95_s": float(np.percentile(s, 95)),
                      "min_s": s[0], "times_s": times}))


if __name__ == "__main__":
    main()
