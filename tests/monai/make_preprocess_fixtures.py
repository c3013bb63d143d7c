#!/usr/bin/env python3
"""Generate the MONAI preprocessing parity fixtures in tests/fixtures/monai/preprocess/.

Usage (from the repository root):
    tests/monai/setup.sh && tests/monai/.venv/bin/python tests/monai/make_preprocess_fixtures.py

For every case this writes the INPUT NIfTI files (small, committed) and what MONAI
(the versions pinned in tests/monai/requirements.txt) produces from them, as
`expected.safetensors`, plus an index `cases.json`. Format: tests/fixtures/monai/README.md.

Tensor layout everywhere: C order, [C, X, Y, Z], with X, Y, Z the NIfTI voxel axes i, j, k,
i.e. exactly the numpy arrays nibabel returns, stacked on a new first axis.

Deterministic: numpy Generator seeded per case; re-running rewrites identical content
(gzip headers carry no timestamp: nibabel writes mtime 0).
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "monai" / "preprocess"
MODALITIES = ["t1c", "t1", "t2", "flair"]  # the bundle's channel order

import nibabel as nib  # noqa: E402
import torch  # noqa: E402
import monai  # noqa: E402
from monai.transforms import (  # noqa: E402
    CenterSpatialCropd,
    ConvertToMultiChannelBasedOnBratsClassesd,
    CropForegroundd,
    EnsureChannelFirstd,
    Flipd,
    LoadImaged,
    NormalizeIntensityd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityd,
    ShiftIntensityd,
    SpatialCropd,
)
from safetensors.numpy import save_file  # noqa: E402

torch.set_num_threads(1)
IMAGE_TOL = 1e-5


# --------------------------------------------------------------------------- synthetic volumes
def grid(shape):
    xs, ys, zs = shape
    i = np.arange(xs, dtype=np.float64)[:, None, None]
    j = np.arange(ys, dtype=np.float64)[None, :, None]
    k = np.arange(zs, dtype=np.float64)[None, None, :]
    return i, j, k


def ellipsoid(shape, center, radii):
    i, j, k = grid(shape)
    return ((i - center[0]) / radii[0]) ** 2 + ((j - center[1]) / radii[1]) ** 2 + (
        (k - center[2]) / radii[2]
    ) ** 2


def brain_case(shape, rng):
    """Four float64 modality volumes (0 outside a brain-like ellipsoid) and a BraTS-2018 label."""
    xs, ys, zs = shape
    c = np.array([xs * 0.48, ys * 0.52, zs * 0.5])
    brain = ellipsoid(shape, c, (xs * 0.42, ys * 0.42, zs * 0.42)) <= 1.0
    tc = c + np.array([xs * 0.12, -ys * 0.08, zs * 0.05])
    r_ed = ellipsoid(shape, tc, (xs * 0.22, ys * 0.2, zs * 0.22))
    r_core = ellipsoid(shape, tc, (xs * 0.13, ys * 0.12, zs * 0.14))
    r_enh = ellipsoid(shape, tc + np.array([1.0, 0.5, 0.0]), (xs * 0.07, ys * 0.07, zs * 0.09))
    label = np.zeros(shape, dtype=np.uint8)
    label[(r_ed <= 1.0) & brain] = 2
    label[(r_core <= 1.0) & brain] = 1
    label[(r_enh <= 1.0) & brain] = 4
    i, j, k = grid(shape)
    smooth = 40.0 * np.sin(i / 5.0) * np.cos(j / 7.0) + 25.0 * np.cos(k / 4.0)
    base = {"t1c": 400.0, "t1": 500.0, "t2": 700.0, "flair": 600.0}
    tumour = {
        "t1c": {2: 20.0, 1: -120.0, 4: 450.0},
        "t1": {2: -60.0, 1: -150.0, 4: 30.0},
        "t2": {2: 380.0, 1: 250.0, 4: 120.0},
        "flair": {2: 420.0, 1: 180.0, 4: 150.0},
    }
    vols = {}
    for m in MODALITIES:
        v = base[m] + smooth + rng.normal(0.0, 30.0, size=shape)
        for lab, dv in tumour[m].items():
            v = v + dv * (label == lab)
        v = np.round(v * 8.0) / 8.0  # limited precision: compresses well, exact in f32
        vols[m] = np.where(brain, np.maximum(v, 1.0), 0.0)
    return vols, label, brain


def affine_ras(spacing, origin, flip_x=False):
    a = np.diag([spacing[0] * (-1.0 if flip_x else 1.0), spacing[1], spacing[2], 1.0])
    a[:3, 3] = origin
    return a


def save_nifti(path, data, affine, dtype=None, slope_inter=None):
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(dtype or data.dtype)
    if slope_inter is not None:
        img.header.set_slope_inter(*slope_inter)
    img.to_filename(str(path))
    # check what nibabel wrote
    back = nib.load(str(path))
    assert back.get_data_dtype() == np.dtype(dtype or data.dtype)
    if slope_inter is not None:
        assert (back.dataobj.slope, back.dataobj.inter) == slope_inter


# --------------------------------------------------------------------------- MONAI pipelines
def np_out(t):
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        if hasattr(t, "as_tensor"):
            t = t.as_tensor()
        t = t.numpy()
    return np.ascontiguousarray(np.asarray(t))


def label_u8(t):
    a = np_out(t)
    assert a.dtype == np.bool_ or np.all((a == 0) | (a == 1)), a.dtype
    return np.ascontiguousarray(a.astype(np.uint8))


def channel_stats(loaded):
    """MONAI's own per-channel mean/std (float32 torch reductions, as NormalizeIntensity does)."""
    from monai.transforms import NormalizeIntensity

    stats = []
    t = torch.as_tensor(np_out(loaded), dtype=torch.float32)
    for ch in t:
        nz = ch[ch != 0]
        if nz.numel() == 0:
            stats.append({"count": 0, "mean": None, "std": None})
            continue
        stats.append(
            {
                "count": int(nz.numel()),
                "mean": NormalizeIntensity._mean(nz),
                "std": NormalizeIntensity._std(nz),
            }
        )
    return stats


def load_and_normalise(image_files, label_file, case_dir, four_d=False, et_label=None):
    """LoadImaged(image_only) -> [EnsureChannelFirstd for 4D] -> NormalizeIntensityd; label -> 3 channels."""
    d = {"image": [str(case_dir / f) for f in image_files] if not four_d else str(case_dir / image_files[0])}
    if label_file is not None:
        d["label"] = str(case_dir / label_file)
    keys = list(d)
    d = LoadImaged(keys=keys, image_only=True)(d)
    info = {"loaded_image_shape": list(d["image"].shape), "loaded_image_dtype": str(d["image"].dtype)}
    if label_file is not None:
        info["loaded_label_shape"] = list(d["label"].shape)
        info["loaded_label_dtype"] = str(d["label"].dtype)
    if four_d:
        info["original_channel_dim"] = float(d["image"].meta["original_channel_dim"])
        d = EnsureChannelFirstd(keys=["image"])(d)
        info["after_ensure_channel_first_shape"] = list(d["image"].shape)
    info["affine"] = np_out(d["image"].affine).tolist()
    raw_image = np_out(d["image"]).copy()
    info["monai_channel_stats"] = channel_stats(raw_image)
    if label_file is not None:
        conv = ConvertToMultiChannelBasedOnBratsClassesd(keys="label", **({} if et_label is None else {"et_label": et_label}))
        d = conv(d)
    d = NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)(d)
    assert d["image"].dtype == torch.float32
    return d, raw_image, info


def with_f32(v):
    return {"value": float(v), "as_f32": float(np.float32(v))}


def train_aug(d, rng, roi, name_suffix="_aug"):
    """The bundle's random training transforms with draws made here, replayed with MONAI's
    deterministic counterparts: crop -> flip x,y,z (each p=0.5) -> scale -> shift."""
    spatial = list(d["image"].shape[1:])
    start = [int(rng.integers(0, s - r + 1)) for s, r in zip(spatial, roi)]  # inclusive upper bound
    end = [s + r for s, r in zip(start, roi)]
    flips = [ax for ax in range(3) if rng.random() < 0.5]
    f = float(rng.uniform(-0.1, 0.1))
    o = float(rng.uniform(-0.1, 0.1))
    x = {"image": d["image"].clone(), "label": d["label"].clone()}
    x = SpatialCropd(keys=["image", "label"], roi_start=start, roi_end=end)(x)
    for ax in flips:
        x = Flipd(keys=["image", "label"], spatial_axis=ax)(x)
    cropped_flipped = np_out(x["image"]).copy()
    # NB: ScaleIntensityd defaults to minv=0, maxv=1 (a min-max rescale that ignores `factor`);
    # RandScaleIntensityd uses minv=maxv=None, i.e. x * (1 + f). Same here.
    before_scale = {"image": x["image"].clone()}
    x = ScaleIntensityd(keys="image", minv=None, maxv=None, factor=f)(x)
    x = ShiftIntensityd(keys="image", offset=o)(x)
    img = np_out(x["image"])
    # the random transforms themselves, with a degenerate range, give the same result
    y = RandScaleIntensityd(keys="image", factors=(f, f), prob=1.0)(before_scale)
    y = RandShiftIntensityd(keys="image", offsets=(o, o), prob=1.0)(y)
    assert np.array_equal(np_out(y["image"]), img)
    assert img.dtype == np.float32
    # how the scalar arithmetic is done: float32 x * float32(1 + f), then + float32(o)
    mult = np.float32(1.0 + f)
    replay = (cropped_flipped * mult) + np.float32(o)
    exact = bool(np.array_equal(replay, img))
    assert exact
    draws = {
        "roi_size": list(roi),
        "roi_start": start,
        "roi_end": end,
        "flip_spatial_axes": flips,
        "scale_factor": f,
        "scale_multiplier_1_plus_f_as_f32": float(mult),
        "shift_offset": o,
        "shift_offset_as_f32": float(np.float32(o)),
        "replay_in_f32_is_bit_exact": exact,
        "arithmetic": "float32: x * float32(1 + f), then + float32(o) (torch casts the Python scalar to float32)",
    }
    return {"image" + name_suffix: img, "label" + name_suffix: label_u8(x["label"])}, draws


def center_crop(d, roi):
    x = CenterSpatialCropd(keys=["image", "label"], roi_size=roi)({"image": d["image"].clone(), "label": d["label"].clone()})
    spatial = list(d["image"].shape[1:])
    roi_eff = [s if r <= 0 else r for s, r in zip(spatial, roi)]  # MONAI fall_back_tuple: r <= 0 -> full size
    start = [max(s // 2 - r // 2, 0) for s, r in zip(spatial, roi_eff)]
    end = [min(st + r, s) for st, r, s in zip(start, roi_eff, spatial)]
    img = np_out(x["image"])
    assert np.array_equal(img, np_out(d["image"])[:, start[0] : end[0], start[1] : end[1], start[2] : end[2]])
    info = {
        "roi_size": list(roi),
        "start": start,
        "end": end,
        "roi_size_effective": roi_eff,
        "rule": "roi <= 0 means the full size; start = max(size//2 - roi//2, 0); end = min(start + roi, size) (no padding)",
        "naive_start_(size-roi)//2": [max((s - r) // 2, 0) for s, r in zip(spatial, roi)],
    }
    return {"image_center": img, "label_center": label_u8(x["label"])}, info


def fg_crop(d, k_divisible=8, margin=0):  # noqa: C901
    x = {"image": d["image"].clone(), "label": d["label"].clone()}
    cf = CropForegroundd(
        keys=["image", "label"],
        source_key="image",
        select_fn=lambda t: t > 0,
        channel_indices=None,
        margin=margin,
        k_divisible=k_divisible,
    )
    box_start, box_end = cf.cropper.compute_bounding_box(x["image"])
    x = cf(x)
    img = np_out(x["image"])
    # tight box of (image > 0).any(channel)
    mask = (np_out(d["image"]) > 0).any(axis=0)
    tight_start, tight_end = [], []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        nz = np.nonzero(mask.any(axis=other))[0]
        tight_start.append(int(nz[0]))
        tight_end.append(int(nz[-1]) + 1)
    box_start = [int(v) for v in box_start]
    box_end = [int(v) for v in box_end]
    spatial = list(d["image"].shape[1:])
    # replay: zero-pad then slice
    pad_before = [max(-s, 0) for s in box_start]
    pad_after = [max(e - n, 0) for e, n in zip(box_end, spatial)]
    full = np.pad(np_out(d["image"]), [(0, 0)] + list(zip(pad_before, pad_after)))
    sl = tuple(slice(s + pb, e + pb) for s, e, pb in zip(box_start, box_end, pad_before))
    assert np.array_equal(full[(slice(None),) + sl], img), "foreground crop replay mismatch"
    info = {
        "select_fn": "image > 0, any channel",
        "margin": margin,
        "k_divisible": k_divisible,
        "allow_smaller": False,
        "tight_box_start": tight_start,
        "tight_box_end": tight_end,
        "margin_box_start": [t - margin for t in tight_start],
        "margin_box_end": [t + margin for t in tight_end],
        "box_start": box_start,
        "box_end": box_end,
        "pad_before": pad_before,
        "pad_after": pad_after,
        "rule": "m = margin box (tight box of image > 0 over any channel, grown by margin on both sides, not "
        "clamped); size = ceil(m_size / k) * k; start = m_start - (size - m_size) // 2; end = start + size; "
        "parts outside the volume are zero-padded (constant 0)",
    }
    return {"image_fg": img, "label_fg": label_u8(x["label"])}, info


# --------------------------------------------------------------------------- cases
def write_case(name, tensors, meta, cases):
    case_dir = OUT / name
    for k, v in tensors.items():
        assert v.flags["C_CONTIGUOUS"], k
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(case_dir / "expected.safetensors"))
    meta["expected"] = "expected.safetensors"
    meta["tolerance"] = {
        k: ({"max_abs": IMAGE_TOL} if k.startswith("image") else "exact") for k in tensors
    }
    meta["tensors"] = {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in tensors.items()}
    cases.append(meta)


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    cases = []

    # ---- 1. basic: float32, 40x36x28, 1 mm RAS, non-trivial origin, training draws
    name = "basic"
    cd = OUT / name
    cd.mkdir()
    shape = (40, 36, 28)
    rng = np.random.default_rng(20261127)
    vols, label, _ = brain_case(shape, rng)
    aff = affine_ras((1.0, 1.0, 1.0), (-19.5, -21.0, 7.25))
    files = [f"{m}.nii.gz" for m in MODALITIES]
    for m, f in zip(MODALITIES, files):
        save_nifti(cd / f, vols[m].astype(np.float32), aff)
    save_nifti(cd / "seg.nii.gz", label, aff)
    d, raw, info = load_and_normalise(files, "seg.nii.gz", cd)
    tensors = {"image": np_out(d["image"]), "label": label_u8(d["label"])}
    aug, draws = train_aug(d, np.random.default_rng(1), roi=(24, 20, 12))
    tensors.update(aug)
    meta = {
        "name": name,
        "description": "float32 modalities, brain-like ellipsoid with noise, nested tumour "
        "(edema 2 > core 1 > enhancing 4), BraTS 2018 labels, 1 mm RAS affine with non-zero origin",
        "images": files,
        "image_dtypes_on_disk": ["float32"] * 4,
        "label": "seg.nii.gz",
        "label_dtype_on_disk": "uint8",
        "label_convention": "brats2018",
        "remapped_to_2018_before_monai": None,
        "augment": draws,
        **info,
    }
    write_case(name, tensors, meta, cases)

    # ---- 2. dtypes: int16 + scl_slope/inter, uint8, float64, float32; label float32
    name = "dtypes"
    cd = OUT / name
    cd.mkdir()
    shape = (24, 20, 16)
    rng = np.random.default_rng(2)
    vols, label, brain = brain_case(shape, rng)
    aff = affine_ras((1.2, 0.9, 2.0), (90.0, -126.0, -72.0))
    raw_i16 = np.round((vols["t1c"] + 5.0) / 2.0).astype(np.int16)  # stored; value = 2*raw - 5
    save_nifti(cd / "t1c.nii.gz", raw_i16, aff, dtype=np.int16, slope_inter=(2.0, -5.0))
    save_nifti(cd / "t1.nii.gz", np.clip(np.round(vols["t1"] / 4.0), 0, 255).astype(np.uint8), aff)
    t2 = np.where(brain, vols["t2"] + rng.uniform(0.0, 1.0, size=shape) / 3.0, 0.0)  # full f64 precision
    save_nifti(cd / "t2.nii.gz", t2.astype(np.float64), aff)
    save_nifti(cd / "flair.nii.gz", vols["flair"].astype(np.float32), aff)
    save_nifti(cd / "seg.nii.gz", label.astype(np.float32), aff)
    files = [f"{m}.nii.gz" for m in MODALITIES]
    d, raw, info = load_and_normalise(files, "seg.nii.gz", cd)
    # nibabel scales in float64 (2*raw - 5); MONAI then casts to float32
    assert np.array_equal(raw[0], (2.0 * raw_i16.astype(np.float64) - 5.0).astype(np.float32))
    assert np.array_equal(raw[2], t2.astype(np.float32))
    tensors = {"image": np_out(d["image"]), "label": label_u8(d["label"])}
    aug, draws = train_aug(d, np.random.default_rng(7), roi=(16, 16, 8))
    tensors.update(aug)
    cc, cinfo = center_crop(d, (15, 13, 9))
    tensors.update(cc)
    fg, finfo = fg_crop(d)
    tensors.update(fg)
    meta = {
        "name": name,
        "description": "t1c int16 with scl_slope=2, scl_inter=-5 (background raw 0 reads as -5, so the whole "
        "volume is 'non-zero' for NormalizeIntensity); t1 uint8; t2 float64 (full precision, MONAI rounds to "
        "float32); flair float32; label stored as float32; anisotropic spacing 1.2x0.9x2.0",
        "images": files,
        "image_dtypes_on_disk": ["int16 (scl_slope 2.0, scl_inter -5.0)", "uint8", "float64", "float32"],
        "scaling": "nibabel applies value = raw*slope + inter in float64, MONAI casts to float32",
        "label": "seg.nii.gz",
        "label_dtype_on_disk": "float32",
        "label_convention": "brats2018",
        "remapped_to_2018_before_monai": None,
        "augment": draws,
        "center_crop": cinfo,
        "foreground_crop": finfo,
        **info,
    }
    write_case(name, tensors, meta, cases)

    # ---- 3. edge: all-zero channel, constant channel, negative intensities (+ -0.0), 1-voxel label
    name = "edge"
    cd = OUT / name
    cd.mkdir()
    shape = (24, 20, 16)
    rng = np.random.default_rng(3)
    vols, _, brain = brain_case(shape, rng)
    aff = affine_ras((1.0, 1.0, 1.0), (11.0, -4.5, 0.0), flip_x=True)  # LAS: MONAI does not reorient
    zero = np.zeros(shape, dtype=np.float32)
    const = np.full(shape, 37.25, dtype=np.float32)
    neg = np.where(brain, vols["t2"] - 900.0, 0.0).astype(np.float32)  # mostly negative inside the brain
    neg[~brain & (np.indices(shape).sum(axis=0) % 2 == 0)] = -0.0  # half the background is -0.0
    neg[3, 3, 3] = 0.0
    # last channel: foreground only near the +x / +y corner, so the k_divisible box leaves the volume
    corner = ellipsoid(shape, (21.0, 17.0, 8.0), (5.0, 4.0, 6.0)) <= 1.0
    last = np.where(corner, vols["flair"], 0.0).astype(np.float32)
    chans = [zero, const, neg, last]
    files = [f"{m}.nii.gz" for m in MODALITIES]
    for c, f in zip(chans, files):
        save_nifti(cd / f, c, aff)
    lab = np.zeros(shape, dtype=np.int16)
    lab[20, 2, 13] = 4
    save_nifti(cd / "seg.nii.gz", lab, aff)
    d, raw, info = load_and_normalise(files, "seg.nii.gz", cd)
    img = np_out(d["image"])
    assert np.all(img[0] == 0) and np.all(img[1] == 0)
    tensors = {"image": img, "label": label_u8(d["label"])}
    cc, cinfo = center_crop(d, (30, 7, 0))  # 30 > 24: that axis is not cropped; 0: falls back to full size
    tensors.update(cc)
    fg, finfo = fg_crop(d, margin=1)
    assert any(finfo["pad_after"]) or any(finfo["pad_before"]), "expected the foreground box to leave the volume"
    tensors.update(fg)
    neg_zero_kept = bool(np.signbit(img[2][(neg == 0) & np.signbit(neg)]).all())
    meta = {
        "name": name,
        "description": "t1c all zeros (returned unchanged); t1 constant 37.25 everywhere (std 0 -> divisor 1 -> all 0); "
        "t2 mostly negative intensities, background half 0.0 and half -0.0 (-0.0 counts as zero and stays -0.0); "
        "flair foreground only in a corner blob; label int16 with a single voxel = 4; LAS affine (x flipped), "
        "no reorientation happens",
        "images": files,
        "image_dtypes_on_disk": ["float32"] * 4,
        "label": "seg.nii.gz",
        "label_dtype_on_disk": "int16",
        "label_convention": "brats2018",
        "remapped_to_2018_before_monai": None,
        "negative_zero_preserved_in_output": neg_zero_kept,
        "center_crop": cinfo,
        "foreground_crop": finfo,
        **info,
    }
    write_case(name, tensors, meta, cases)

    # ---- 4. label conventions: brats2023 (3 = enhancing) and brats2015 (3 = non-enhancing core)
    for name, seed, conv in (("brats2023", 4, "brats2023"), ("brats2015", 5, "brats2015")):
        cd = OUT / name
        cd.mkdir()
        shape = (20, 16, 12)
        rng = np.random.default_rng(seed)
        vols, label18, _ = brain_case(shape, rng)
        aff = affine_ras((1.0, 1.0, 1.0), (-12.0, -10.0, -8.0))
        files = [f"{m}.nii.gz" for m in MODALITIES]
        for m, f in zip(MODALITIES, files):
            save_nifti(cd / f, vols[m].astype(np.float32), aff)
        if conv == "brats2023":
            native = np.where(label18 == 4, 3, label18).astype(np.uint8)  # 1 NCR, 2 ED, 3 ET
            mapping = {"0": 0, "1": 1, "2": 2, "3": 4}
        else:
            # 1 necrosis, 2 edema, 3 non-enhancing core, 4 enhancing; put some 3 inside the core
            native = label18.copy()
            i, j, k = np.indices(shape)
            native[(label18 == 1) & ((i + j + k) % 3 == 0)] = 3
            mapping = {"0": 0, "1": 1, "2": 2, "3": 1, "4": 4}
        assert set(np.unique(native).tolist()) == {int(v) for v in mapping}, np.unique(native)
        save_nifti(cd / "seg_native.nii.gz", native, aff)
        remapped = np.zeros_like(native)
        for src, dst in mapping.items():
            remapped[native == int(src)] = dst
        save_nifti(cd / "seg_remapped_2018.nii.gz", remapped, aff)
        d, raw, info = load_and_normalise(files, "seg_remapped_2018.nii.gz", cd)
        lab = label_u8(d["label"])
        # our own definition of the regions, on the native labels
        if conv == "brats2023":
            want = np.stack([np.isin(native, [1, 3]), np.isin(native, [1, 2, 3]), native == 3]).astype(np.uint8)
            # MONAI 1.6 also has et_label=3 for this convention: check it agrees
            d2, _, _ = load_and_normalise(files, "seg_native.nii.gz", cd, et_label=3)
            assert np.array_equal(label_u8(d2["label"]), lab)
            extra = {"monai_et_label_3_on_native_agrees": True}
        else:
            want = np.stack([np.isin(native, [1, 3, 4]), np.isin(native, [1, 2, 3, 4]), native == 4]).astype(np.uint8)
            extra = {}
        assert np.array_equal(want, lab)
        tensors = {"image": np_out(d["image"]), "label": lab}
        regions = (
            {"TC": [1, 3], "WT": [1, 2, 3], "ET": [3]}
            if conv == "brats2023"
            else {"TC": [1, 3, 4], "WT": [1, 2, 3, 4], "ET": [4]}
        )
        meta = {
            "name": name,
            "description": f"{conv} label convention; MONAI's converter knows only BraTS 2018 labels, so the native "
            "label is remapped to 2018 values (mapping below) and the remapped file is what MONAI loads",
            "images": files,
            "image_dtypes_on_disk": ["float32"] * 4,
            "label": "seg_remapped_2018.nii.gz",
            "label_native": "seg_native.nii.gz",
            "label_dtype_on_disk": "uint8",
            "label_convention": conv,
            "remapped_to_2018_before_monai": mapping,
            "regions_on_native_labels": regions,
            **extra,
            **info,
        }
        write_case(name, tensors, meta, cases)

    # ---- 5. single 4D file (X, Y, Z, 4)
    name = "four_d"
    cd = OUT / name
    cd.mkdir()
    shape = (20, 16, 12)
    rng = np.random.default_rng(6)
    vols, label, _ = brain_case(shape, rng)
    aff = affine_ras((1.0, 1.0, 1.0), (-12.0, -10.0, -8.0))
    stack4 = np.stack([vols[m].astype(np.float32) for m in MODALITIES], axis=-1)  # X, Y, Z, 4
    save_nifti(cd / "image_4d.nii.gz", stack4, aff)
    save_nifti(cd / "seg.nii.gz", label, aff)
    d, raw, info = load_and_normalise(["image_4d.nii.gz"], "seg.nii.gz", cd, four_d=True)
    # same data as 4 separate 3D files?
    sep = cd / "_sep"
    sep.mkdir()
    for m in MODALITIES:
        save_nifti(sep / f"{m}.nii.gz", vols[m].astype(np.float32), aff)
    d_sep, _, _ = load_and_normalise([f"_sep/{m}.nii.gz" for m in MODALITIES], "seg.nii.gz", cd)
    same = bool(np.array_equal(np_out(d["image"]), np_out(d_sep["image"])))
    shutil.rmtree(sep)
    assert same
    # what the bundle's inference pipeline (no EnsureChannelFirstd) would do with it
    bundle = LoadImaged(keys="image", image_only=True)({"image": str(cd / "image_4d.nii.gz")})
    bundle_shape = list(bundle["image"].shape)
    tensors = {"image": np_out(d["image"]), "label": label_u8(d["label"])}
    meta = {
        "name": name,
        "description": "one 4D NIfTI of shape (X, Y, Z, 4) holding t1c, t1, t2, flair on the last axis",
        "images": ["image_4d.nii.gz"],
        "image_dtypes_on_disk": ["float32"],
        "pipeline": "LoadImaged(image_only) -> EnsureChannelFirstd -> NormalizeIntensityd(nonzero, channel_wise)",
        "monai_4d_handling": "LoadImaged returns (X, Y, Z, 4) with meta original_channel_dim = -1 (NIfTI spatial rank "
        "is min(dim[0], 3)); EnsureChannelFirstd moves that last axis to the front -> (4, X, Y, Z). Without "
        "EnsureChannelFirstd (the bundle's inference.json has none) NormalizeIntensityd(channel_wise) would treat "
        f"the X axis as channels; LoadImaged alone gives shape {bundle_shape}.",
        "equals_four_3d_files": same,
        "label": "seg.nii.gz",
        "label_dtype_on_disk": "uint8",
        "label_convention": "brats2018",
        "remapped_to_2018_before_monai": None,
        **info,
    }
    write_case(name, tensors, meta, cases)

    index = {
        "generator": "tests/monai/make_preprocess_fixtures.py",
        "command": "tests/monai/setup.sh && tests/monai/.venv/bin/python tests/monai/make_preprocess_fixtures.py",
        "versions": {
            "monai": monai.__version__,
            "torch": torch.__version__,
            "nibabel": nib.__version__,
            "numpy": np.__version__,
            "python": sys.version.split()[0],
        },
        "layout": "C order [C, X, Y, Z]; X, Y, Z = NIfTI voxel axes i, j, k (nibabel array order)",
        "image_pipeline": "LoadImaged(keys=image, image_only=True) on the list of 4 files (t1c, t1, t2, flair) "
        "-> NormalizeIntensityd(nonzero=True, channel_wise=True); output float32 [4, X, Y, Z]",
        "label_pipeline": "LoadImaged(label) -> ConvertToMultiChannelBasedOnBratsClassesd -> uint8 [3, X, Y, Z] "
        "(TC, WT, ET) from BraTS 2018 labels: TC = {1, 4}, WT = {1, 2, 4}, ET = {4}",
        "augment_pipeline": "on the normalised image and the 3-channel label: SpatialCropd(roi_start, roi_end) "
        "(= RandSpatialCropd at that start) -> Flipd(spatial_axis=a) for a in flip_spatial_axes (ascending, "
        "= RandFlipd on axes 0, 1, 2 in that order) -> image only: ScaleIntensityd(factor=f) (x * (1 + f)) -> "
        "ShiftIntensityd(offset=o) (x + o). Output image_aug float32, label_aug uint8",
        "tolerance": {
            "image": {"max_abs": IMAGE_TOL, "applies_to": ["image", "image_aug", "image_center", "image_fg"]},
            "label": "exact",
        },
        "cases": cases,
    }
    (OUT / "cases.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
