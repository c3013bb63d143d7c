#!/usr/bin/env python3
"""Reference reader for make_study.py output: checks that a generated study decodes back to its
expected/ volumes under the project's conventions (a self-check of the generator, and a small
executable statement of the rules the Rust reader follows).

    read_study.py --study OUT [--quiet]

For each role in OUT/manifest.json: read every file under OUT/dicom (any names, any nesting),
group by SeriesInstanceUID, sort slices by IPP . (row x col) -- never by InstanceNumber --, apply
the per-slice rescale, build the LPS affine (i = row cosine x PixelSpacing[1], j = column cosine
x PixelSpacing[0], k = (IPP_N - IPP_1)/(N-1)), and compare the array and the RAS affine with
OUT/expected/<role>.nii.gz (exact, or within the manifest's tolerance; a role whose grid differs
from the T1c's is resampled onto it first, as make_study does). Enhanced MR instances are read
frame by frame from PlanePositionSequence. Prints one JSON line; exits 1 on any mismatch.
Only for variants that have expected/ (the good ones).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_study import LPS, resample_onto  # noqa: E402

JPEG_LOSSLESS = {"1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"}


def pixels(ds, path):
    import pydicom

    ts = str(ds.file_meta.TransferSyntaxUID)
    if ts in JPEG_LOSSLESS:  # pydicom needs pylibjpeg-libjpeg or GDCM for these: use dcmtk
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "d.dcm")
            subprocess.run(["dcmdjpeg", path, out], check=True)
            return pydicom.dcmread(out).pixel_array
    return ds.pixel_array


def read_series(files):
    import pydicom

    return read_series_datasets([pydicom.dcmread(f) for f in files], files)


def read_series_datasets(datasets, files=None):
    """(float32 array in (i, j, k) order, LPS affine) of one series' datasets."""
    dss = list(zip(datasets, files or [getattr(d, "filename", None) for d in datasets]))
    if len(dss) == 1 and "PerFrameFunctionalGroupsSequence" in dss[0][0]:
        ds, f = dss[0]
        sh = ds.SharedFunctionalGroupsSequence[0]
        iop = np.array(sh.PlaneOrientationSequence[0].ImageOrientationPatient, float)
        ps = [float(x) for x in sh.PixelMeasuresSequence[0].PixelSpacing]
        frames = pixels(ds, f)
        if frames.ndim == 2:
            frames = frames[None]
        items = []
        for n, pf in enumerate(ds.PerFrameFunctionalGroupsSequence):
            ipp = np.array(pf.PlanePositionSequence[0].ImagePositionPatient, float)
            slope, inter = 1.0, 0.0
            if "PixelValueTransformationSequence" in pf:
                t = pf.PixelValueTransformationSequence[0]
                slope, inter = float(t.RescaleSlope), float(t.RescaleIntercept)
            elif "PixelValueTransformationSequence" in sh:
                t = sh.PixelValueTransformationSequence[0]
                slope, inter = float(t.RescaleSlope), float(t.RescaleIntercept)
            items.append((ipp, iop, ps, frames[n], slope, inter))
    else:
        items = []
        for ds, f in dss:
            items.append((np.array(ds.ImagePositionPatient, float),
                          np.array(ds.ImageOrientationPatient, float),
                          [float(x) for x in ds.PixelSpacing], pixels(ds, f),
                          float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))))
    iop = items[0][1]
    for it in items:
        assert np.allclose(it[1], iop, atol=1e-4), "mixed orientation"
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    items.sort(key=lambda it: float(np.dot(it[0], normal)))
    d = [float(np.dot(b[0] - a[0], normal)) for a, b in zip(items, items[1:])]
    assert max(d) - min(d) < 0.01 * np.median(d), f"non-uniform spacing {min(d)}..{max(d)}"
    vol = np.stack([(it[3].astype(np.float64) * it[4] + it[5]).T for it in items], axis=2)
    ps = items[0][2]
    M = np.eye(4)
    M[:3, 0] = row * ps[1]
    M[:3, 1] = col * ps[0]
    M[:3, 2] = (items[-1][0] - items[0][0]) / (len(items) - 1)
    M[:3, 3] = items[0][0]
    return vol.astype(np.float32), M


def main(argv=None):
    import nibabel as nib
    import pydicom

    p = argparse.ArgumentParser()
    p.add_argument("--study", required=True)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    man = json.load(open(os.path.join(a.study, "manifest.json")))
    if "expected" not in man:
        sys.exit("read_study: this variant has no expected/ (a bad-input variant)")
    by_uid = {v["series_instance_uid"]: r for r, v in man["series"].items()}
    files = {}
    for root, _, names in os.walk(os.path.join(a.study, "dicom")):
        for n in names:
            f = os.path.join(root, n)
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            r = by_uid.get(str(ds.SeriesInstanceUID))
            if r:
                files.setdefault(r, []).append(f)
    vols = {r: read_series(sorted(fs)) for r, fs in files.items()}
    ref_shape, ref_M = vols["t1c"][0].shape, vols["t1c"][1]
    report, ok = {"variant": man["variant"]}, True
    for r, e in man["expected"].items():
        img = nib.load(os.path.join(a.study, e["path"]))
        exp = np.asanyarray(img.dataobj).astype(np.float32)
        vol, M = vols[r]
        if vol.shape != ref_shape or not np.allclose(M, ref_M, atol=1e-4):
            vol, M = resample_onto(vol, M, ref_shape, ref_M), ref_M
        aff_ok = bool(np.allclose(LPS @ M, img.affine, atol=1e-4))
        diff = float(np.abs(vol - exp).max()) if vol.shape == exp.shape else float("inf")
        good = aff_ok and diff <= e["tolerance"]
        ok &= good
        report[r] = {"files": len(files[r]), "shape": list(vol.shape), "max_abs_diff": diff,
                     "affine_ok": aff_ok, "ok": good}
    report["ok"] = bool(ok)
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
