#!/usr/bin/env python3
"""Reference BINARY DICOM SEG made with highdicom from a BraTS label map on a study's T1c series.

    make_reference_seg.py --dicom DIR --label LABEL.nii.gz --out SEG.dcm [--bug reversed|shifted]
                          [--make-label synthetic|empty]

DIR is a make_study.py output (OUT or OUT/dicom; roles come from OUT/manifest.json) or any
folder holding the four series (roles then come from SeriesDescription: the T1c is the series
whose description matches T1.*(+C|POST|GAD|GD|CE)). LABEL is on the T1c's grid (BraTS labels
0/1/2/4, RAS affine). Segments: 1 NCR (label 1), 2 ED (label 2), 3 ET (label 4), with the codes
of the PACS note (CID 7168); frames lie on the T1c instances, positions from the T1c's IPP,
and the other three series are referenced as further source images.

--make-label first writes LABEL (uint8, the T1c's grid and RAS affine, read from the DICOM):
`synthetic` = T1c intensity bands of its non-zero voxels (>= 50th percentile -> 2 ED, >= 80th
-> 1 NCR, >= 95th -> 4 ET; not symmetric, so reversed or shifted SEGs are caught), `empty` =
all zero.

--bug plants a known geometry error for testing check_seg.py: `reversed` pairs the mask of slice
k with the T1c instance of slice N-1-k (the sort-order trap of the note: dciodvfy still passes),
`shifted` moves the mask one voxel along +i (the column axis).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

# (segment number, label value, label, type code, meaning, scheme, RGB)
SEGMENTS = [
    (1, 1, "NCR", "6574001", "Necrosis", "SCT", (216, 191, 216)),
    (2, 2, "ED", "79654002", "Edema", "SCT", (140, 224, 228)),
    (3, 4, "ET", "C113842", "Enhancing Lesion", "NCIt", (128, 174, 128)),
]


def find_study(path):
    """-> ({role: [datasets]}) for the four roles."""
    import pydicom

    root = path
    manifest = None
    for cand in (os.path.join(path, "manifest.json"), os.path.join(os.path.dirname(os.path.normpath(path)), "manifest.json")):
        if os.path.exists(cand):
            manifest = json.load(open(cand))
            root = os.path.dirname(cand)
            break
    scan = os.path.join(root, "dicom") if manifest else path
    series = {}
    for d, _, names in os.walk(scan):
        for n in names:
            try:
                ds = pydicom.dcmread(os.path.join(d, n))
            except Exception:
                continue
            series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    roles = {}
    if manifest:
        for role, e in manifest["series"].items():
            roles[role] = series[e["series_instance_uid"]]
    else:
        pats = {"t1c": r"T1.*(\+C|POST|GAD|GD|CE)", "t2f": r"FLAIR|TIRM|DARK.?FL", "t2w": r"T2", "t1n": r"T1"}
        for uid, dss in series.items():
            desc = str(dss[0].get("SeriesDescription", ""))
            for role, pat in pats.items():
                if role not in roles and re.search(pat, desc, re.I):
                    roles[role] = dss
                    break
    if "t1c" not in roles:
        sys.exit("make_reference_seg: no T1c series found")
    return roles


def write_label(t1c, path, kind):
    import nibabel as nib

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from read_study import read_series_datasets

    vol, M = read_series_datasets(t1c)
    label = np.zeros(vol.shape, np.uint8)
    if kind == "synthetic":
        nz = vol[vol > 0]
        p50, p80, p95 = np.percentile(nz, [50, 80, 95])
        label[vol >= p50] = 2
        label[vol >= p80] = 1
        label[vol >= p95] = 4
    img = nib.Nifti1Image(label, LPS @ M)
    img.set_sform(LPS @ M, code=1)
    img.set_qform(LPS @ M, code=1)
    nib.save(img, path)


def main(argv=None):
    import highdicom as hd
    import nibabel as nib
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dicom", required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--bug", choices=["reversed", "shifted"])
    p.add_argument("--make-label", choices=["synthetic", "empty"])
    a = p.parse_args(argv)

    roles = find_study(a.dicom)
    t1c = roles["t1c"]
    if a.make_label:
        write_label(t1c, a.label, a.make_label)
    img = nib.load(a.label)
    label = np.rint(np.asanyarray(img.dataobj)).astype(np.int16)
    bad = sorted(set(np.unique(label).tolist()) - {0, 1, 2, 4})
    if bad:
        sys.exit(f"make_reference_seg: label values {bad} are not BraTS 0/1/2/4")
    Minv = np.linalg.inv(LPS @ img.affine)
    if a.bug == "shifted":
        label = np.roll(label, 1, axis=0)
        label[0] = 0
    # each T1c instance -> the label slice at its position
    ks = []
    for ds in t1c:
        v = Minv @ np.array([*map(float, ds.ImagePositionPatient), 1.0])
        if not np.allclose(v[:2], 0, atol=1e-3) or abs(v[2] - round(v[2])) > 1e-3:
            sys.exit("make_reference_seg: the T1c does not lie on the label map's grid")
        ks.append(int(round(v[2])))
    if a.bug == "reversed":
        ks = [len(t1c) - 1 - k for k in ks]
    frames = np.stack([label[:, :, k].T for k in ks])  # (n, rows, cols), pixel (r, c) = label[c, r, k]
    mask = np.stack([frames == lv for _, lv, *_ in SEGMENTS], axis=-1).astype(np.uint8)

    category = Code("49755003", "SCT", "Morphologically Abnormal Structure")
    algo = hd.AlgorithmIdentificationSequence(name="brats-reference", family=codes.cid7162.ArtificialIntelligence,
                                              version="1")
    descs = []
    for number, lv, name, code, meaning, scheme, rgb in SEGMENTS:
        descs.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name, segmented_property_category=category,
            segmented_property_type=Code(code, scheme, meaning), algorithm_type="AUTOMATIC",
            algorithm_identification=algo, anatomic_regions=[Code("12738006", "SCT", "Brain")],
            display_color=hd.color.CIELabColor.from_rgb(*rgb)))
    further = [ds for r, dss in roles.items() if r != "t1c" for ds in dss]
    seg = hd.seg.Segmentation(
        source_images=t1c, pixel_array=mask, segmentation_type="BINARY", segment_descriptions=descs,
        series_instance_uid=hd.UID(), series_number=900, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="brats reference (highdicom)", manufacturer_model_name="make_reference_seg",
        software_versions="1", device_serial_number="0", content_label="BRATS",
        further_source_images=further or None)
    seg.save_as(a.out)
    print(json.dumps({"out": a.out, "frames": int(seg.NumberOfFrames), "segments": len(descs),
                      "referenced_series": len(seg.ReferencedSeriesSequence), "bug": a.bug}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
