#!/usr/bin/env python3
"""Checks a BINARY DICOM SEG against a BraTS label map, in world space.

    check_seg.py --seg SEG.dcm --label LABEL.nii.gz [--dciodvfy]

Reads the SEG with highdicom (segread) and checks: SOP Class Segmentation Storage, Segmentation
Type BINARY, a ReferencedSeriesSequence listing four series, and the segments: 1 <-> label 1
(6574001 SCT Necrosis), 2 <-> label 2 (79654002 SCT Edema), 3 <-> label 4 (C113842 NCIt
Enhancing Lesion), matched both by SegmentNumber and by SegmentedPropertyTypeCodeSequence.
Then rebuilds every segment's mask in world space from each frame's own PlanePositionSequence,
the shared (or per-frame) PlaneOrientationSequence and PixelMeasuresSequence -- frame order is
never used --, maps it onto the label map's voxel grid (NIfTI RAS affine -> LPS) and compares it
with the label map voxel by voxel. Frame pixels that do not fall on label-grid voxel centres, or
fall outside the grid while set, are problems. An empty label map is fine: its segments may have
no frames, or all-empty frames.

Prints one JSON line: {"segments", "frames", "equal", "mismatched_voxels": {segment: count},
"dciodvfy_errors", "dciodvfy_warnings", "problems", ...}. Exit 1 when not equal or any check
fails, or (with --dciodvfy) when `dciodvfy -new` prints an Error line; 2 on unusable input.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

import numpy as np

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
# segment number -> (label value, code value, coding scheme)
EXPECTED = {1: (1, "6574001", "SCT"), 2: (2, "79654002", "SCT"), 3: (4, "C113842", "NCIT")}
BY_CODE = {(code, scheme): number for number, (_, code, scheme) in EXPECTED.items()}


def run_dciodvfy(path):
    if not shutil.which("dciodvfy"):
        return None, None
    p = subprocess.run(["dciodvfy", "-new", path], capture_output=True, text=True)
    lines = (p.stdout + p.stderr).splitlines()
    errors = [l for l in lines if l.startswith("Error")]
    warnings = [l for l in lines if l.startswith("Warning")]
    return errors, warnings


def frame_item(seg, pf, name):
    """The functional group `name` for one frame: per-frame first, then shared."""
    if pf is not None and name in pf:
        return pf[name].value[0]
    sh = seg.get("SharedFunctionalGroupsSequence")
    if sh and name in sh[0]:
        return sh[0][name].value[0]
    return None


def main(argv=None):
    import highdicom as hd
    import nibabel as nib

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seg", required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--dciodvfy", action="store_true", help="also run dciodvfy -new; any Error line fails")
    a = p.parse_args(argv)

    problems = []
    try:
        seg = hd.seg.segread(a.seg)
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"equal": False, "problems": [f"unreadable SEG: {type(e).__name__}: {e}"]}))
        return 2
    img = nib.load(a.label)
    label = np.rint(np.asanyarray(img.dataobj)).astype(np.int32)
    if label.ndim != 3:
        print(json.dumps({"equal": False, "problems": [f"label map is {label.ndim}-D"]}))
        return 2
    unknown = sorted(set(np.unique(label).tolist()) - {0, 1, 2, 4})
    if unknown:
        problems.append(f"label map has values {unknown} besides 0/1/2/4")
    to_vox = np.linalg.inv(LPS @ img.affine.astype(np.float64))

    # --- attribute checks, through highdicom
    if str(seg.SOPClassUID) != SEG_STORAGE:
        problems.append(f"SOPClassUID {seg.SOPClassUID} is not Segmentation Storage")
    seg_type = getattr(seg.segmentation_type, "value", str(seg.segmentation_type))
    if seg_type != "BINARY" or seg.get("SegmentationType") != "BINARY":
        problems.append(f"SegmentationType {seg_type} is not BINARY")
    ref_series = [str(r.SeriesInstanceUID) for r in seg.get("ReferencedSeriesSequence", [])]
    if len(set(ref_series)) != 4:
        problems.append(f"ReferencedSeriesSequence lists {len(set(ref_series))} series, not 4")
    for attr, want in (("BitsAllocated", 1), ("BitsStored", 1), ("HighBit", 0)):
        if seg.get(attr) != want:
            problems.append(f"{attr} is {seg.get(attr)}, not {want}")

    # --- segments: number and code must agree
    seg_label = {}
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    for s in seg.SegmentSequence:
        n = int(s.SegmentNumber)
        t = s.SegmentedPropertyTypeCodeSequence[0]
        key = (str(t.CodeValue), str(t.CodingSchemeDesignator).upper())
        by_code = BY_CODE.get(key)
        if by_code is None:
            problems.append(f"segment {n}: type code {key} is none of NCR/ED/ET")
            continue
        if by_code != n:
            problems.append(f"segment {n}: type code {key} belongs to segment {by_code}")
            continue
        seg_label[n] = EXPECTED[n][0]
    missing = sorted(set(EXPECTED) - set(numbers))
    if missing:
        problems.append(f"segments {missing} are not listed")

    # --- rebuild masks in world space, frame by frame
    import pydicom

    raw = pydicom.dcmread(a.seg)
    n_frames = int(raw.get("NumberOfFrames", 1))
    frames = raw.pixel_array if "PixelData" in raw else np.zeros((0,), np.uint8)
    if n_frames == 1 and frames.ndim == 2:
        frames = frames[None]
    recon = {n: np.zeros(label.shape, bool) for n in EXPECTED}
    per_frame = raw.get("PerFrameFunctionalGroupsSequence", [None] * n_frames)
    rows, cols = int(raw.Rows), int(raw.Columns)
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    off_grid = 0
    outside = 0
    for f in range(n_frames):
        pf = per_frame[f] if f < len(per_frame) else None
        pos = frame_item(raw, pf, "PlanePositionSequence")
        ori = frame_item(raw, pf, "PlaneOrientationSequence")
        meas = frame_item(raw, pf, "PixelMeasuresSequence")
        ident = frame_item(raw, pf, "SegmentIdentificationSequence")
        if pos is None or ori is None or meas is None or ident is None:
            problems.append(f"frame {f + 1}: missing plane position/orientation/pixel measures/segment id")
            continue
        n = int(ident.ReferencedSegmentNumber)
        ipp = np.array([float(x) for x in pos.ImagePositionPatient])
        iop = np.array([float(x) for x in ori.ImageOrientationPatient])
        ps = [float(x) for x in meas.PixelSpacing]
        mask = frames[f].astype(bool)
        if not mask.any():
            continue
        # world of pixel (r, c) = IPP + c * PS[1] * row_cos + r * PS[0] * col_cos
        v0 = to_vox @ np.append(ipp, 1.0)
        dc = to_vox[:3, :3] @ (iop[:3] * ps[1])
        dr = to_vox[:3, :3] @ (iop[3:] * ps[0])
        r_idx, c_idx = rr[mask], cc[mask]
        vox = v0[:3, None] + dc[:, None] * c_idx[None] + dr[:, None] * r_idx[None]
        ijk = np.rint(vox)
        bad = np.abs(vox - ijk).max(axis=0) > 1e-3
        off_grid += int(bad.sum())
        ijk = ijk[:, ~bad].astype(np.int64)
        inside = np.all((ijk >= 0) & (ijk < np.array(label.shape)[:, None]), axis=0)
        outside += int((~inside).sum())
        ijk = ijk[:, inside]
        if n in recon:
            recon[n][ijk[0], ijk[1], ijk[2]] = True
        else:
            problems.append(f"frame {f + 1} belongs to unknown segment {n}")
    if off_grid:
        problems.append(f"{off_grid} set SEG pixels are not on label-grid voxel centres")
    if outside:
        problems.append(f"{outside} set SEG pixels fall outside the label grid")

    mismatched = {}
    for n, (lv, _, _) in EXPECTED.items():
        want = label == lv
        mismatched[str(n)] = int(np.count_nonzero(recon[n] != want))
    equal = all(v == 0 for v in mismatched.values()) and not off_grid and not outside

    result = {
        "segments": len(numbers),
        "frames": n_frames,
        "equal": bool(equal),
        "mismatched_voxels": mismatched,
        "label_voxels": {str(n): int(np.count_nonzero(label == lv)) for n, (lv, _, _) in EXPECTED.items()},
        "referenced_series": len(set(ref_series)),
        "problems": problems,
    }
    errors, warnings = run_dciodvfy(a.seg) if a.dciodvfy else ([], [])
    if errors is None:
        problems.append("dciodvfy not installed")
        errors, warnings = [], []
    result["dciodvfy_errors"] = errors
    result["dciodvfy_warnings"] = warnings
    print(json.dumps(result))
    failed = (not equal) or bool(problems) or (a.dciodvfy and bool(errors))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
