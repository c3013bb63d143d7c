#!/usr/bin/env python3
"""Generate the MONAI end-to-end inference parity fixtures in tests/fixtures/monai/inference/.

Usage (from the repository root):
    tests/monai/setup.sh && tests/monai/.venv/bin/python tests/monai/make_inference_fixtures.py

For every case this writes the four INPUT modalities as float32 NIfTI files and what MONAI's
`brats_mri_segmentation` inference pipeline (the versions pinned in tests/monai/requirements.txt)
produces from them, with the bundle SegResNet carrying the DETERMINISTIC weights of
tests/monai/detgen.py (same as tests/fixtures/monai/segresnet/), in `expected.safetensors`:

    LoadImaged([t1c, t1, t2, flair]) -> NormalizeIntensityd(nonzero=True, channel_wise=True)
    -> SlidingWindowInferer(roi_size=ROI, sw_batch_size=1, overlap=0.5, mode="constant")
    -> logits -> sigmoid -> threshold 0.5 -> label map where(ET, 4, where(TC, 1, where(WT, 2, 0)))

ROI is [48, 48, 32] (not the bundle's [240, 240, 160]) so that a test runs in a second or two.
Case `large` also stores the logits of mode="gaussian" (sigma_scale 0.125).

The script also re-blends the windows MONAI actually ran (captured from the predictor) with the
rules written in tests/fixtures/monai/README.md, in numpy, and asserts the result equals MONAI's.

Deterministic: no randomness except detgen's integer hash; gzip headers carry mtime 0 (nibabel);
re-running rewrites byte-identical files. Format: tests/fixtures/monai/README.md.
"""

import json
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detgen import det_state_dict, uniform  # noqa: E402
from make_segresnet_fixtures import BUNDLE_CONFIG  # noqa: E402

import nibabel as nib  # noqa: E402
import torch  # noqa: E402
import monai  # noqa: E402
from monai.data.utils import compute_importance_map, dense_patch_slices  # noqa: E402
from monai.inferers import SlidingWindowInferer  # noqa: E402
from monai.inferers.utils import _get_scan_interval  # noqa: E402
from monai.networks.nets import SegResNet  # noqa: E402
from monai.transforms import Activations, AsDiscrete, LoadImaged, NormalizeIntensityd  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "monai" / "inference"
MODALITIES = ["t1c", "t1", "t2", "flair"]  # the bundle's channel order

ROI = [48, 48, 32]
OVERLAP = 0.5
SIGMA_SCALE = 0.125
LOGITS_TOL = 1e-4
NEAR_ZERO = 1e-4

# name, shape, origin, noise stream, gaussian?
CASES = [
    ("small", (40, 36, 24), (-19.5, -17.0, 9.25), 2000, False),
    ("large", (76, 56, 17), (-37.5, -28.0, -8.5), 2100, True),
]


# --------------------------------------------------------------------------- synthetic volumes
def ellipsoid(shape, center, radii):
    xs, ys, zs = shape
    i = np.arange(xs, dtype=np.float64)[:, None, None]
    j = np.arange(ys, dtype=np.float64)[None, :, None]
    k = np.arange(zs, dtype=np.float64)[None, None, :]
    return ((i - center[0]) / radii[0]) ** 2 + ((j - center[1]) / radii[1]) ** 2 + ((k - center[2]) / radii[2]) ** 2


def brain_volumes(shape, stream):
    """Four float32 modalities with integer values: 0 outside an ellipsoid brain, inside a smooth
    gradient + detgen noise + a nested tumour (edema > core > enhancing) with per-modality offsets."""
    xs, ys, zs = shape
    c = np.array([xs * 0.48, ys * 0.52, zs * 0.5])
    r_brain = ellipsoid(shape, c, (xs * 0.44, ys * 0.45, zs * 0.46))
    brain = r_brain <= 1.0
    tc = c + np.array([xs * 0.12, -ys * 0.08, zs * 0.04])
    ed = (ellipsoid(shape, tc, (xs * 0.22, ys * 0.21, zs * 0.26)) <= 1.0) & brain
    core = (ellipsoid(shape, tc, (xs * 0.13, ys * 0.13, zs * 0.17)) <= 1.0) & brain
    enh = (ellipsoid(shape, tc + np.array([1.0, 0.5, 0.0]), (xs * 0.07, ys * 0.08, zs * 0.11)) <= 1.0) & brain
    base = {"t1c": 400.0, "t1": 500.0, "t2": 700.0, "flair": 600.0}
    slope = {"t1c": 60.0, "t1": -40.0, "t2": 80.0, "flair": 30.0}
    tumour = {  # (edema, core, enhancing) offsets
        "t1c": (20.0, -120.0, 450.0),
        "t1": (-60.0, -150.0, 30.0),
        "t2": (380.0, 250.0, 120.0),
        "flair": (420.0, 180.0, 150.0),
    }
    i = np.arange(xs, dtype=np.float64)[:, None, None]
    n = xs * ys * zs
    vols = OrderedDict()
    for m_idx, m in enumerate(MODALITIES):
        noise = uniform(stream + m_idx, n).reshape(shape) * 12.0
        v = base[m] + slope[m] * (i / xs) - 150.0 * r_brain + noise
        e_off, c_off, x_off = tumour[m]
        v = v + e_off * ed + (c_off - e_off) * core + (x_off - c_off) * enh
        v = np.maximum(np.round(v), 1.0)
        vols[m] = np.where(brain, v, 0.0).astype(np.float32)
    truth = np.zeros(shape, dtype=np.uint8)
    truth[ed] = 2
    truth[core] = 1
    truth[enh] = 4
    return vols, truth, brain


def affine_ras(origin):
    a = np.eye(4)
    a[:3, 3] = origin
    return a


def save_nifti(path, data, affine):
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(np.float32)
    img.to_filename(str(path))
    back = nib.load(str(path))
    assert back.get_data_dtype() == np.float32
    assert np.array_equal(np.asarray(back.dataobj), data)


# --------------------------------------------------------------------------- MONAI
def build_model():
    torch.manual_seed(0)
    model = SegResNet(**BUNDLE_CONFIG)
    model.load_state_dict(det_state_dict(model), strict=True)
    return model.eval()


def np_out(t):
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        if hasattr(t, "as_tensor"):
            t = t.as_tensor()
        t = t.numpy()
    return np.ascontiguousarray(np.asarray(t))


class Recorder:
    """Predictor wrapper: runs the model and records every window's input and output."""

    def __init__(self, model):
        self.model = model
        self.windows = []

    def __call__(self, x):
        with torch.no_grad():
            y = self.model(x)
        self.windows.append((np_out(x).copy(), np_out(y).copy()))
        return y


def window_plan(shape):
    """Padding, scan interval and window starts exactly as monai sliding_window_inference does."""
    pad_before, pad_after = [], []
    for s, r in zip(shape, ROI):
        diff = max(r - s, 0)
        pad_before.append(diff // 2)
        pad_after.append(diff - diff // 2)
    padded = [max(s, r) for s, r in zip(shape, ROI)]
    interval = list(_get_scan_interval(padded, ROI, 3, (OVERLAP,) * 3))
    slices = dense_patch_slices(padded, ROI, interval)
    starts = [[int(sl.start) for sl in w] for w in slices]
    per_axis = [sorted({w[a] for w in starts}) for a in range(3)]
    # our own rule (README): k * int(roi * (1 - overlap)), last one moved back to end at the border
    mine = []
    for s, r, itv in zip(padded, ROI, interval):
        ax = []
        k = 0
        while True:
            st = k * itv
            if st + r >= s:
                ax.append(s - r)
                break
            ax.append(st)
            k += 1
        mine.append(ax)
    assert mine == per_axis, (mine, per_axis)
    return OrderedDict(
        pad_before=pad_before,
        pad_after=pad_after,
        padded_shape=padded,
        scan_interval=interval,
        window_starts_per_axis=per_axis,
        num_windows=len(starts),
        window_starts=starts,
    )


def importance_map_np(mode):
    """compute_importance_map(ROI, mode, sigma_scale), re-done in numpy (float32 like torch)."""
    if mode == "constant":
        return np.ones(ROI, dtype=np.float32)
    m = None
    for i, n in enumerate(ROI):
        sigma = n * SIGMA_SCALE  # python float
        x = (np.arange(n, dtype=np.float32) - np.float32((n - 1) / 2.0)).astype(np.float32)
        g = np.exp((x * x) / np.float32(-2 * sigma**2)).astype(np.float32)
        m = g if i == 0 else (m[..., None] * g[(None,) * i]).astype(np.float32)
    return np.maximum(m, np.float32(max(float(m.min()), 1e-3))).astype(np.float32)


def reblend(image, windows, plan, wmap):
    """Our rules: zero-pad, sum(window_logits * w) / sum(w) in float32 in MONAI's window order, crop."""
    pads = [(0, 0)] + list(zip(plan["pad_before"], plan["pad_after"]))
    padded = np.pad(image, pads, mode="constant")
    out = np.zeros([3] + plan["padded_shape"], dtype=np.float32)
    cnt = np.zeros(plan["padded_shape"], dtype=np.float32)
    assert len(windows) == plan["num_windows"]
    for (x_in, y), st in zip(windows, plan["window_starts"]):
        sl = tuple(slice(s, s + r) for s, r in zip(st, ROI))
        assert np.array_equal(x_in[0], padded[(slice(None),) + sl]), "window input differs from padded crop"
        out[(slice(None),) + sl] += y[0] * wmap
        cnt[sl] += wmap
    out /= cnt
    crop = tuple(slice(b, b + s) for b, s in zip(plan["pad_before"], image.shape[1:]))
    return out[(slice(None),) + crop]


def label_map(logits_t):
    """The bundle's post-processing with MONAI transforms: sigmoid -> threshold 0.5 -> label map."""
    prob = Activations(sigmoid=True)(logits_t)
    onehot = AsDiscrete(threshold=0.5)(prob)  # >= 0.5
    oh = np_out(onehot).astype(bool)
    tc, wt, et = oh[0], oh[1], oh[2]
    lab = np.where(et, 4, np.where(tc, 1, np.where(wt, 2, 0))).astype(np.uint8)
    return lab, oh


def stats(a):
    a = np.asarray(a, dtype=np.float64)
    return OrderedDict(
        min=float(a.min()), max=float(a.max()), mean=float(a.mean()), std=float(a.std()),
        fraction_positive=float((a >= 0).mean()),
    )


def run_case(model, model64, name, shape, origin, stream, with_gauss):
    case_dir = OUT / name
    case_dir.mkdir(parents=True, exist_ok=True)
    vols, truth, brain = brain_volumes(shape, stream)
    aff = affine_ras(origin)
    files = []
    for m, v in vols.items():
        fn = f"{m}.nii.gz"
        save_nifti(case_dir / fn, v, aff)
        files.append(fn)

    d = {"image": [str(case_dir / f) for f in files]}
    d = LoadImaged(keys="image", image_only=True)(d)
    loaded_shape = list(d["image"].shape)
    loaded_dtype = str(d["image"].dtype)
    affine = np_out(d["image"].affine).tolist()
    d = NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)(d)
    img = d["image"]
    assert tuple(img.shape) == (4,) + shape and img.dtype == torch.float32
    image_np = np_out(img).copy()
    batch = img[None]  # the bundle's DataLoader adds the batch axis

    plan = window_plan(shape)
    res = OrderedDict()
    modes = ["constant"] + (["gaussian"] if with_gauss else [])
    for mode in modes:
        rec = Recorder(model)
        inferer = SlidingWindowInferer(roi_size=ROI, sw_batch_size=1, overlap=OVERLAP, mode=mode, sigma_scale=SIGMA_SCALE)
        t0 = time.time()
        with torch.no_grad():
            y = inferer(batch, rec)
        dt = time.time() - t0
        out_type = type(y).__name__
        y_np = np_out(y)
        assert y_np.dtype == np.float32 and y_np.shape == (1, 3) + shape, (y_np.dtype, y_np.shape)
        wmap_t = np_out(compute_importance_map(tuple(ROI), mode=mode, sigma_scale=SIGMA_SCALE))
        wmap = importance_map_np(mode)
        map_diff = float(np.abs(wmap.astype(np.float64) - wmap_t).max())
        mine = reblend(image_np, rec.windows, plan, wmap_t)  # MONAI's own map -> exact blend check
        blend_diff = float(np.abs(mine.astype(np.float64) - y_np[0]).max())
        blend_exact = bool(np.array_equal(mine, y_np[0]))
        print(f"{name} {mode}: {len(rec.windows)} windows in {dt:.1f} s; re-blend max diff {blend_diff:.3g} "
              f"(exact {blend_exact}); numpy map vs torch map {map_diff:.3g}")
        assert blend_diff <= 1e-6, blend_diff
        res[mode] = OrderedDict(
            logits=np.ascontiguousarray(y_np[0]),
            output_type=out_type,
            windows_run=len(rec.windows),
            reblend_max_abs_diff=blend_diff,
            reblend_bit_exact=blend_exact,
            importance_map=OrderedDict(
                min=float(wmap_t.min()),
                max=float(wmap_t.max()),
                voxels_at_clamp_floor=int((wmap_t == wmap_t.min()).sum()) if mode == "gaussian" else None,
                numpy_f32_rebuild_max_abs_diff=map_diff,
            ),
        )

    logits = res["constant"]["logits"]
    # precision reference: the same pipeline in float64 (model and normalised image cast to f64)
    with torch.no_grad():
        y64 = SlidingWindowInferer(roi_size=ROI, sw_batch_size=1, overlap=OVERLAP, mode="constant")(
            batch.double(), model64
        )
    err64 = float(np.abs(logits.astype(np.float64) - np_out(y64)[0]).max())
    print(f"{name}: |fp32 - fp64| max {err64:.3g}")
    lab, oh = label_map(torch.from_numpy(logits))
    # post-processing rule check: sigmoid(l) >= 0.5 in float32 vs l >= 0
    pos_by_sign = logits >= 0
    tensors = OrderedDict(logits=logits, label=lab)
    if with_gauss:
        tensors["logits_gaussian"] = res["gaussian"]["logits"]
    save_file(dict(tensors), str(case_dir / "expected.safetensors"))

    near = np.abs(logits) < NEAR_ZERO
    entry = OrderedDict()
    entry["shape"] = list(shape)
    entry["inputs"] = files
    entry["input_dtype"] = "float32"
    entry["affine"] = affine
    entry["loaded_image_shape"] = loaded_shape
    entry["loaded_image_dtype"] = loaded_dtype
    entry["synthetic_truth_label_counts"] = {str(v): int((truth == v).sum()) for v in (0, 1, 2, 4)}
    entry["brain_voxels"] = int(brain.sum())
    entry["roi_size"] = ROI
    entry["overlap"] = OVERLAP
    entry["sliding_window"] = plan
    entry["tensors"] = OrderedDict((k, {"dtype": str(v.dtype), "shape": list(v.shape)}) for k, v in tensors.items())
    entry["logits_stats"] = stats(logits)
    entry["max_abs_diff_fp32_vs_fp64"] = err64
    entry["near_zero_logits_per_channel"] = [int(near[c].sum()) for c in range(3)]
    entry["near_zero_logits_any_channel"] = int(near.any(0).sum())
    entry["label_counts"] = {str(v): int((lab == v).sum()) for v in (0, 1, 2, 4)}
    entry["region_counts"] = OrderedDict(TC=int(oh[0].sum()), WT=int(oh[1].sum()), ET=int(oh[2].sum()))
    entry["sigmoid_ge_half_equals_logit_ge_0"] = bool(np.array_equal(oh, pos_by_sign))
    entry["constant"] = OrderedDict((k, v) for k, v in res["constant"].items() if k != "logits")
    if with_gauss:
        g = res["gaussian"]["logits"]
        entry["gaussian"] = OrderedDict((k, v) for k, v in res["gaussian"].items() if k != "logits")
        entry["gaussian"]["sigma_scale"] = SIGMA_SCALE
        entry["gaussian"]["logits_stats"] = stats(g)
        entry["gaussian"]["max_abs_diff_vs_constant"] = float(np.abs(g.astype(np.float64) - logits).max())
        entry["gaussian"]["near_zero_logits_per_channel"] = [int((np.abs(g[c]) < NEAR_ZERO).sum()) for c in range(3)]
    return entry


def main():
    torch.set_num_threads(1)  # shared machine
    OUT.mkdir(parents=True, exist_ok=True)
    model = build_model()
    model64 = build_model().double()
    index = OrderedDict()
    index["generator"] = "tests/monai/make_inference_fixtures.py (weights: tests/monai/detgen.py det_state_dict)"
    index["command"] = "tests/monai/setup.sh && tests/monai/.venv/bin/python tests/monai/make_inference_fixtures.py"
    index["versions"] = OrderedDict(
        monai=monai.__version__, torch=torch.__version__, numpy=np.__version__, nibabel=nib.__version__,
        python=sys.version.split()[0],
    )
    index["device"] = "CPU, float32, model.eval() (dropout off), torch.no_grad(), 1 thread"
    index["model"] = OrderedDict(config=BUNDLE_CONFIG, weights="det_state_dict (tests/fixtures/monai/README.md)")
    index["pipeline"] = [
        "LoadImaged(keys=image, image_only=True) on [t1c, t1, t2, flair] -> float32 [4, X, Y, Z]",
        "NormalizeIntensityd(keys=image, nonzero=True, channel_wise=True)",
        "add batch axis -> SlidingWindowInferer(roi_size=%s, sw_batch_size=1, overlap=%s, mode='constant') "
        "(padding_mode='constant', cval=0)" % (ROI, OVERLAP),
        "logits [3, X, Y, Z] (batch axis dropped) -> Activations(sigmoid=True) -> AsDiscrete(threshold=0.5) (>= 0.5)",
        "label = where(ET, 4, where(TC, 1, where(WT, 2, 0))) uint8, channels (TC, WT, ET)",
    ]
    index["roi_size"] = ROI
    index["overlap"] = OVERLAP
    index["tolerance"] = OrderedDict(
        logits_max_abs=LOGITS_TOL,
        logits_gaussian_max_abs=LOGITS_TOL,
        label="equal, except voxels where some channel's |logit| < 1e-4 (MONAI's logits)",
        near_zero_threshold=NEAR_ZERO,
    )
    index["cases"] = OrderedDict()
    for name, shape, origin, stream, gauss in CASES:
        index["cases"][name] = run_case(model, model64, name, shape, origin, stream, gauss)
    (OUT / "cases.json").write_text(json.dumps(index, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT}: {total} bytes")


if __name__ == "__main__":
    main()
