"""MONAI side of the CPU inference benchmark (issue 4 item 8).

The `brats_mri_segmentation` bundle's inference on four modality files, with the bundle SegResNet
carrying the deterministic weights of tests/monai/detgen.py (the same weights the Rust side
exports to ONNX with `write_reference_weights` + `brats-trainer export-onnx`):

    LoadImaged(keys="image") on [t1c, t1, t2, flair]
    -> NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)
    -> SlidingWindowInferer(roi_size=[240, 240, 160], sw_batch_size=1, overlap=0.5)  (eval, no_grad)
    -> sigmoid -> threshold 0.5 -> label map where(ET, 4, where(TC, 1, where(WT, 2, 0)))
    -> uint8 .nii.gz with the T1c file's affine (nibabel; what SaveImaged does, without resampling)

torch.set_num_threads(THREADS) (default 2). Usage:

    monai_inference.py T1C T1 T2 FLAIR --out SEG.nii.gz [--logits LOGITS.safetensors] [--threads 2]
        [--roi 240,240,160]

Prints one JSON line: the stage times (s), the total (the stages, without imports / model
construction), the process's peak RSS (VmHWM, KiB) and the RSS after importing torch + MONAI.
Writing --logits is not timed.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "monai"))
from detgen import det_state_dict  # noqa: E402

import nibabel as nib  # noqa: E402
import monai  # noqa: E402
from monai.inferers import SlidingWindowInferer  # noqa: E402
from monai.networks.nets import SegResNet  # noqa: E402
from monai.transforms import LoadImaged, NormalizeIntensityd  # noqa: E402

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
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs=4, help="T1c, T1, T2, FLAIR")
    ap.add_argument("--out", required=True)
    ap.add_argument("--logits")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--roi", default="240,240,160")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rss_import = status_kib("VmRSS")

    model = SegResNet(**BUNDLE_CONFIG)
    model.load_state_dict(det_state_dict(model), strict=True)
    model.eval()
    roi = [int(v) for v in args.roi.split(",")]
    inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=1, overlap=0.5)
    load = LoadImaged(keys="image")
    norm = NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)

    t = {}
    t0 = time.perf_counter()
    d = load({"image": list(args.files)})
    t1 = time.perf_counter()
    t["load"] = t1 - t0
    d = norm(d)
    t2 = time.perf_counter()
    t["normalise"] = t2 - t1
    img = d["image"]
    with torch.no_grad():
        logits = inferer(torch.as_tensor(img).unsqueeze(0), model)[0]
    t3 = time.perf_counter()
    t["inference"] = t3 - t2
    with torch.no_grad():
        oh = torch.sigmoid(torch.as_tensor(logits)) >= 0.5
        oh = oh.numpy()
    tc, wt, et = oh[0], oh[1], oh[2]
    lab = np.where(et, 4, np.where(tc, 1, np.where(wt, 2, 0))).astype(np.uint8)
    t4 = time.perf_counter()
    t["postprocess"] = t4 - t3
    affine = np.asarray(img.affine if hasattr(img, "affine") else nib.load(args.files[0]).affine, dtype=np.float64)
    nib.save(nib.Nifti1Image(lab, affine), args.out)
    t5 = time.perf_counter()
    t["encode"] = t5 - t4
    t["total"] = t5 - t0
    if args.logits:
        from safetensors.numpy import save_file

        save_file({"logits": np.ascontiguousarray(np.asarray(logits, dtype=np.float32))}, args.logits)
    print(json.dumps({
        "side": "monai", "threads": args.threads, "roi": roi, "stages_s": t,
        "peak_rss_kib": status_kib("VmHWM"), "rss_after_import_kib": rss_import,
        "torch": torch.__version__, "monai": monai.__version__,
    }))


if __name__ == "__main__":
    main()
