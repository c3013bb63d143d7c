#!/usr/bin/env python3
"""Seeded generator of DICOM MR test studies made from a BraTS NIfTI case.

    make_study.py --case DIR --out DIR --variant NAME [--seed 7] [--crop X0:X1,Y0:Y1,Z0:Z1]
    make_study.py --list

Writes OUT/dicom/... (one study, four MR series T1c/T1/T2/FLAIR plus the variant's distractors),
OUT/expected/{t1c,t1n,t2w,t2f}.nii.gz (float32, RAS affine; only for variants that must succeed)
and OUT/manifest.json. Same seed, case, crop and variant -> byte-identical files.

Geometry (the Rust reader relies on it): NIfTI voxel (i,j,k) with RAS affine A -> LPS affine
M = diag(-1,-1,1,1) @ A. Rows = ny, Columns = nx, pixel (row r, column c) of slice k =
data[c, r, k], IPP_k = M @ [0,0,k,1], row cosine = M[:3,0]/|M[:3,0]|, column cosine =
M[:3,1]/|M[:3,1]|, PixelSpacing = [|M[:3,1]|, |M[:3,0]|], SliceThickness = |M[:3,2]|.
See scripts/dicom/README.md.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROLES = ("t1c", "t1n", "t2w", "t2f")
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
JPEG_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

STUDY_DATE = "20240102"
STUDY_TIME = "101500"

# Per role: how a scanner would describe it.
ROLE_INFO = {
    "t1c": dict(desc="T1 MPRAGE +C", protocol="t1_mprage_post", te=2.5, tr=2000.0, ti=900.0,
                seq=["GR", "IR"], var=["SP", "MP"], opt=[], etl=1, flip=9.0, number=5,
                time="104500", agent="Gadobutrol"),
    "t1n": dict(desc="T1 MPRAGE", protocol="t1_mprage", te=2.5, tr=2000.0, ti=900.0,
                seq=["GR", "IR"], var=["SP", "MP"], opt=[], etl=1, flip=9.0, number=2,
                time="102000"),
    "t2w": dict(desc="T2 TSE", protocol="t2_tse_3d", te=100.0, tr=3200.0, ti=None,
                seq=["SE"], var=["SK", "SP"], opt=[], etl=15, flip=120.0, number=3,
                time="102800"),
    "t2f": dict(desc="FLAIR 3D", protocol="t2_flair_3d", te=120.0, tr=5000.0, ti=1800.0,
                seq=["SE", "IR"], var=["SK", "SP", "MP"], opt=[], etl=200, flip=120.0,
                number=4, time="103600"),
}

GOOD = ["plain", "shuffled", "reversed", "rescale", "nonsquare", "oblique", "compressed",
        "enhanced", "extras", "mixed-grid"]
# variant -> (expected_error kind, role whose series is at fault, detail). The kinds are the
# error codes brats-gateway prints as `error[<kind>]` (tests/dicom.rs).
BAD = {
    "no-flair": ("no-candidate", "t2f", "no FLAIR series; a 3-plane localizer is present"),
    "tie": ("tie", "t1c", "two T1c series that look identical (different UIDs)"),
    "for-differs": ("frame-of-reference-differs", "t2f", "FLAIR has another FrameOfReferenceUID"),
    "patient-differs": ("patient-differs", "t2f", "FLAIR has PatientID PHIMARKER-ID-OTHER"),
    "mixed-orient": ("mixed-orientation", "t2w", "3 T2 slices have an IOP rotated by 10 degrees"),
    "gap": ("gap", "t2w", "one T2 slice missing in the middle (a 2-step)"),
    "uneven": ("uneven-spacing", "t2w", "one T2 step is 1.6 times the others"),
    "duplicate": ("duplicate-position", "t2w", "two T2 instances at one position, different pixels"),
    "few-slices": ("no-candidate", None, "every series has 12 slices (fewer than 20)"),
    "no-ipp": ("missing-attribute", "t2w", "one T2 slice lacks ImagePositionPatient"),
    "no-iop": ("missing-attribute", "t2w", "one T2 slice lacks ImageOrientationPatient"),
    "no-spacing": ("missing-attribute", "t2w", "PixelSpacing absent on every T2 slice"),
    "enhanced-no-positions": ("no-frame-positions", "t1c",
                              "T1c Legacy Converted Enhanced MR without PlanePositionSequence"),
    "undecodable": ("undecodable-transfer-syntax", "t2w", "T2 in JPEG-LS Lossless (1.2.840.10008.1.2.4.80)"),
    "truncated": ("unreadable", "t2w", "one T2 file cut to 60% of its bytes"),
    "monochrome1": ("photometric", "t2w", "T2 PhotometricInterpretation MONOCHROME1"),
    "rgb": ("photometric", "t2w", "T2 as RGB, SamplesPerPixel 3"),
}
VARIANTS = GOOD + list(BAD)


class Ctx:
    """Deterministic UIDs and random numbers for one (seed, variant)."""

    def __init__(self, seed: int, variant: str):
        self.seed, self.variant = seed, variant

    def uid(self, key: str) -> str:
        h = hashlib.sha256(f"brats-dicom-test|{self.seed}|{self.variant}|{key}".encode()).digest()
        return "2.25." + str(uuid.UUID(bytes=h[:16], version=4).int)

    def rng(self, key: str) -> random.Random:
        return random.Random(f"{self.seed}|{self.variant}|{key}")


# ---------------------------------------------------------------------------------------------
# Geometry helpers


def unit(v):
    return v / np.linalg.norm(v)


def with_zooms(M, zooms):
    """M with its three axis columns rescaled to the given lengths (same directions, origin)."""
    out = M.copy()
    for a in range(3):
        out[:3, a] = unit(M[:3, a]) * zooms[a]
    return out


def rotated_about_centre(M, shape, degrees):
    """M rotated by `degrees` about the LPS S axis through the volume centre."""
    t = math.radians(degrees)
    R = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1.0]])
    centre_vox = np.array([(shape[0] - 1) / 2, (shape[1] - 1) / 2, (shape[2] - 1) / 2, 1.0])
    centre = (M @ centre_vox)[:3]
    out = np.eye(4)
    out[:3, :3] = R @ M[:3, :3]
    out[:3, 3] = centre - out[:3, :3] @ centre_vox[:3]
    return out


def ds_num(x: float) -> str:
    """A DS string: shortest repr, at most 16 characters."""
    s = repr(float(x))
    if s.endswith(".0"):
        s = s[:-2]
    if s == "-0":
        s = "0"
    if len(s) > 16:
        s = f"{x:.10g}"
    return s


# ---------------------------------------------------------------------------------------------
# Dataset building


class Slice:
    """One single-frame image before it becomes a Dataset."""

    def __init__(self, pixels, ipp, row_cos, col_cos, spacing_rc, thickness, spacing_between):
        self.pixels = pixels  # 2-D (rows, cols)
        self.ipp = np.asarray(ipp, float)
        self.row_cos = np.asarray(row_cos, float)
        self.col_cos = np.asarray(col_cos, float)
        self.spacing_rc = spacing_rc  # [row spacing, column spacing]
        self.thickness = thickness
        self.spacing_between = spacing_between
        self.slope = None
        self.intercept = None


def volume_slices(vol, M, ks=None):
    """Axial-stack slices of vol (x, y, z) under LPS affine M, for slice indices ks."""
    nz = vol.shape[2]
    ks = range(nz) if ks is None else ks
    row_cos, col_cos = unit(M[:3, 0]), unit(M[:3, 1])
    spacing = [float(np.linalg.norm(M[:3, 1])), float(np.linalg.norm(M[:3, 0]))]
    dz = float(np.linalg.norm(M[:3, 2]))
    out = []
    for k in ks:
        ipp = (M @ np.array([0.0, 0.0, k, 1.0]))[:3]
        out.append(Slice(np.ascontiguousarray(vol[:, :, k].T), ipp, row_cos, col_cos, spacing, dz, dz))
    return out


class Series:
    def __init__(self, key, role, info, slices, number=None, image_type=None, desc=None,
                 protocol=None, acq_type="3D", extra=None):
        self.key = key  # unique name in the manifest (role or distractor name)
        self.role = role  # "t1c"... or None for distractors
        self.info = dict(info)
        self.slices = slices
        self.number = number if number is not None else info["number"]
        self.image_type = image_type or ["ORIGINAL", "PRIMARY", "M", "ND"]
        self.desc = desc or info["desc"]
        self.protocol = protocol or info["protocol"]
        self.acq_type = acq_type
        self.extra = extra or {}  # attribute name -> value, applied last
        self.patient_id = "PHIMARKER-ID-7F3A"
        self.for_key = "for"
        self.ts = EXPLICIT_LE
        self.instance_numbers = list(range(1, len(slices) + 1))
        self.datasets = None
        self.enhanced = False
        self.files = []
        self.window = (0, 1)


def build_dataset(ctx: Ctx, series: Series, idx: int, sl: Slice):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

    info = series.info
    sop_uid = ctx.uid(f"sop/{series.key}/{idx}")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(series.image_type)
    ds.InstanceCreationDate = STUDY_DATE
    ds.InstanceCreationTime = info["time"]
    ds.SOPClassUID = MR_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = STUDY_DATE
    ds.SeriesDate = STUDY_DATE
    ds.AcquisitionDate = STUDY_DATE
    ds.ContentDate = STUDY_DATE
    ds.StudyTime = STUDY_TIME
    ds.SeriesTime = info["time"]
    ds.AcquisitionTime = info["time"]
    ds.ContentTime = info["time"]
    ds.AccessionNumber = "PHIMRK-ACC7F3A"
    ds.Modality = "MR"
    ds.Manufacturer = "SyntheticScanner"
    ds.InstitutionName = "PHIMRK Test Hospital"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "MR BRAIN TUMOUR"
    ds.SeriesDescription = series.desc
    ds.ManufacturerModelName = "Synth MR 3T"
    ds.PatientName = "PHIMARKER^NAME7F3A"
    ds.PatientID = series.patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    if info.get("agent") and "agent" not in series.extra:
        ds.ContrastBolusAgent = info["agent"]
    ds.BodyPartExamined = "BRAIN"
    ds.ScanningSequence = list(info["seq"])
    ds.SequenceVariant = list(info["var"])
    ds.ScanOptions = list(info["opt"]) if info["opt"] else ""
    ds.MRAcquisitionType = series.acq_type
    ds.SliceThickness = ds_num(sl.thickness)
    ds.RepetitionTime = ds_num(info["tr"])
    ds.EchoTime = ds_num(info["te"])
    if info.get("ti") is not None:
        ds.InversionTime = ds_num(info["ti"])
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = "123.2"
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = "3"
    ds.SpacingBetweenSlices = ds_num(sl.spacing_between)
    ds.EchoTrainLength = str(info["etl"])
    ds.DeviceSerialNumber = "SYN0001"
    ds.SoftwareVersions = "make_study 1"
    ds.ProtocolName = series.protocol
    ds.FlipAngle = ds_num(info["flip"])
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = ctx.uid("study")
    ds.SeriesInstanceUID = ctx.uid(f"series/{series.key}")
    ds.StudyID = "1"
    ds.SeriesNumber = str(series.number)
    ds.AcquisitionNumber = "1"
    ds.InstanceNumber = str(series.instance_numbers[idx])
    ds.ImagePositionPatient = [ds_num(v) for v in sl.ipp]
    ds.ImageOrientationPatient = [ds_num(v) for v in np.concatenate([sl.row_cos, sl.col_cos])]
    ds.FrameOfReferenceUID = ctx.uid(series.for_key)
    ds.PositionReferenceIndicator = ""
    normal = np.cross(sl.row_cos, sl.col_cos)
    ds.SliceLocation = ds_num(round(float(np.dot(sl.ipp, normal)), 6))
    px = sl.pixels
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(px.shape[0]), int(px.shape[1])
    ds.PixelSpacing = [ds_num(v) for v in sl.spacing_rc]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    if px.dtype == np.uint16:
        ds.PixelRepresentation = 0
        raw = px.astype("<u2")
    else:
        ds.PixelRepresentation = 1
        raw = px.astype("<i2")
    ds.RescaleIntercept = ds_num(sl.intercept if sl.intercept is not None else 0)
    ds.RescaleSlope = ds_num(sl.slope if sl.slope is not None else 1)
    ds.WindowCenter = str(series.window[0])
    ds.WindowWidth = str(series.window[1])
    ds.PixelData = raw.tobytes()
    ds["PixelData"].VR = "OW"
    for name, value in series.extra.items():
        if value is None:
            if name in ds:
                delattr(ds, name)
        else:
            setattr(ds, name, value)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = EXPLICIT_LE
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MAKE_STUDY_1"
    ds.file_meta = meta
    return ds


def build_series(ctx, series: Series):
    lo = min(float(sl.pixels.min()) * (sl.slope or 1) + (sl.intercept or 0) for sl in series.slices)
    hi = max(float(sl.pixels.max()) * (sl.slope or 1) + (sl.intercept or 0) for sl in series.slices)
    series.window = (round((lo + hi) / 2), max(1, round(hi - lo)))
    series.datasets = [build_dataset(ctx, series, i, sl) for i, sl in enumerate(series.slices)]


def set_ts(ds, ts):
    ds.file_meta.TransferSyntaxUID = ts


def to_enhanced(ctx, series: Series):
    """Replace the series' datasets by one Legacy Converted Enhanced MR instance."""
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    sop = ctx.uid(f"sop/{series.key}/enhanced")
    # the classic images it is "converted" from belong to another (absent) series
    for ds in series.datasets:
        ds.SeriesInstanceUID = ctx.uid(f"series/{series.key}/classic-source")
    enh = LegacyConvertedEnhancedMRImage(
        legacy_datasets=series.datasets,
        series_instance_uid=ctx.uid(f"series/{series.key}"),
        series_number=series.number,
        sop_instance_uid=sop,
        instance_number=1,
        transfer_syntax_uid=EXPLICIT_LE,
    )
    # Deterministic: highdicom copies dates from the sources; pin anything time-like anyway.
    for name in ("InstanceCreationDate", "ContentDate"):
        if name in enh:
            setattr(enh, name, STUDY_DATE)
    for name in ("InstanceCreationTime", "ContentTime"):
        if name in enh:
            setattr(enh, name, series.info["time"])
    enh.file_meta.ImplementationVersionName = "MAKE_STUDY_1"
    # highdicom appends " (enhanced conversion)", whose "enhanCEd" would match the T1c regex
    enh.SeriesDescription = series.desc
    # highdicom stamps the conversion time and a random DimensionOrganizationUID: pin both
    for item in enh.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = STUDY_DATE + series.info["time"]
    dim_uid = ctx.uid(f"dimension-organization/{series.key}")
    for item in enh.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = dim_uid
    for item in enh.get("DimensionIndexSequence", []):
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = dim_uid
    # highdicom collects the referenced instances in a set: give them a stable order
    for ref in enh.get("ReferencedSeriesSequence", []):
        if "ReferencedInstanceSequence" in ref:
            ref.ReferencedInstanceSequence = sorted(
                ref.ReferencedInstanceSequence, key=lambda it: str(it.ReferencedSOPInstanceUID))
    series.datasets = [enh]
    series.enhanced = True


def strip_plane_positions(enh):
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for item in enh.get(group, []):
            if "PlanePositionSequence" in item:
                del item.PlanePositionSequence
    # the dimension index pointing at ImagePositionPatient would dangle
    if "DimensionIndexSequence" in enh:
        keep = [d for d in enh.DimensionIndexSequence
                if d.get("DimensionIndexPointer") != 0x00200032]
        if keep:
            enh.DimensionIndexSequence = keep
        else:
            del enh.DimensionIndexSequence
        for item in enh.get("PerFrameFunctionalGroupsSequence", []):
            fc = item.get("FrameContentSequence")
            if fc and "DimensionIndexValues" in fc[0] and not keep:
                del fc[0].DimensionIndexValues


# ---------------------------------------------------------------------------------------------
# Writing


def write_all(out_dir, series_list, naming, ctx):
    """Write every dataset; `naming` is "plain" or "shuffled". Returns nothing; fills .files."""
    dicom = os.path.join(out_dir, "dicom")
    os.makedirs(dicom, exist_ok=True)
    jobs = []
    if naming == "shuffled":
        rng = ctx.rng("names")
        folders = [""]
        for _ in range(7):
            depth = rng.randint(1, 3)
            folders.append("/".join(f"{rng.getrandbits(24):06x}" for _ in range(depth)))
        for s in series_list:
            for ds in s.datasets:
                folder = rng.choice(folders)
                name = f"{rng.getrandbits(64):016x}"
                path = os.path.join(dicom, folder, name) if folder else os.path.join(dicom, name)
                jobs.append((s, ds, path))
    else:
        for s in series_list:
            folder = f"{s.number:03d}_{s.key}"
            for n, ds in enumerate(s.datasets, start=1):
                jobs.append((s, ds, os.path.join(dicom, folder, f"{n}.dcm")))
    for s, ds, path in jobs:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        s.files.append(path)


def run_tool(args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def transcode_with(tool_args, files):
    """Transcode each file in place with a dcmtk tool (in parallel)."""
    def one(path):
        tmp = path + ".tmp"
        run_tool(tool_args + [path, tmp])
        os.replace(tmp, path)
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as ex:
        list(ex.map(one, files))


# ---------------------------------------------------------------------------------------------
# Expected outputs


def save_nifti(path, arr, affine_ras):
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(arr, dtype=np.float32), affine_ras)
    img.set_sform(affine_ras, code=1)
    img.set_qform(affine_ras, code=1)
    img.header["descrip"] = b"make_study expected"
    data = img.to_bytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(data, compresslevel=1, mtime=0))


def resample_onto(src, src_lps, dst_shape, dst_lps):
    """Trilinear resampling of src (on src_lps) at the voxel centres of the dst grid, in world
    space: scipy map_coordinates order=1, mode='constant', cval=0; voxel coordinates within
    1e-6 of an integer are snapped to it first (so grid points on the source's edge planes count
    as inside)."""
    from scipy.ndimage import map_coordinates

    T = np.linalg.inv(src_lps) @ dst_lps
    ii, jj, kk = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in dst_shape), indexing="ij")
    pts = np.stack([ii.ravel(), jj.ravel(), kk.ravel(), np.ones(ii.size)])
    c = (T @ pts)[:3]
    r = np.round(c)
    c = np.where(np.abs(c - r) < 1e-6, r, c)
    out = map_coordinates(src.astype(np.float64), c, order=1, mode="constant", cval=0.0)
    return out.reshape(dst_shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The study


def load_case(case_dir, crop):
    import nibabel as nib

    vols, affine = {}, None
    suffix = {"t1c": "t1c", "t1n": "t1n", "t2w": "t2w", "t2f": "t2f"}
    for role in ROLES:
        found = sorted(glob.glob(os.path.join(case_dir, f"*{suffix[role]}.nii.gz")))
        if not found:
            sys.exit(f"make_study: no *{suffix[role]}.nii.gz in {case_dir}")
        img = nib.load(found[0])
        a = np.asanyarray(img.dataobj)
        if a.dtype != np.int16:
            if not np.array_equal(a, np.round(a)) or a.min() < -32768 or a.max() > 32767:
                sys.exit(f"make_study: {found[0]} is not integer int16-range data")
            a = a.astype(np.int16)
        A = img.affine.astype(np.float64)
        A[A == 0] = 0.0  # no negative zeros
        if affine is None:
            affine = A
        elif not np.allclose(affine, A, atol=1e-5):
            sys.exit("make_study: the four NIfTI files do not share one affine")
        vols[role] = a
    if crop:
        sl = tuple(slice(a, b) for a, b in crop)
        vols = {r: np.ascontiguousarray(v[sl]) for r, v in vols.items()}
        shift = np.eye(4)
        shift[:3, 3] = [a for a, _ in crop]
        affine = affine @ shift
    return vols, affine


def parse_crop(text):
    if not text:
        return None
    parts = text.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("--crop wants X0:X1,Y0:Y1,Z0:Z1")
    out = []
    for p in parts:
        a, b = p.split(":")
        out.append((int(a), int(b)))
    return out


def localizer_series(vol, M, info):
    """3 slices, axial / sagittal / coronal through the centre."""
    nx, ny, nz = vol.shape
    cx, cy, cz = nx // 2, ny // 2, nz // 2
    e0, e1, e2 = unit(M[:3, 0]), unit(M[:3, 1]), unit(M[:3, 2])
    d0, d1, d2 = (float(np.linalg.norm(M[:3, a])) for a in range(3))
    ax = Slice(np.ascontiguousarray(vol[:, :, cz].T), (M @ [0, 0, cz, 1])[:3], e0, e1, [d1, d0], 5.0, 5.0)
    # sagittal: rows go down (-S), columns go P
    sag_px = np.ascontiguousarray(vol[cx, :, ::-1].T)  # (nz rows, ny cols)
    sag = Slice(sag_px, (M @ [cx, 0, nz - 1, 1])[:3], e1, -e2, [d2, d1], 5.0, 5.0)
    cor_px = np.ascontiguousarray(vol[:, cy, ::-1].T)  # (nz rows, nx cols)
    cor = Slice(cor_px, (M @ [0, cy, nz - 1, 1])[:3], e0, -e2, [d2, d0], 5.0, 5.0)
    info = dict(info, desc="localizer", protocol="localizer", te=2.0, tr=8.6, ti=None,
                seq=["GR"], var=["SP"], opt=[], etl=1, flip=20.0, number=1, time="101600")
    info.pop("agent", None)
    return Series("localizer", None, info, [ax, sag, cor],
                  image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"], acq_type="2D")


def mip_series(vol, M, info):
    nz = vol.shape[2]
    mip = np.empty_like(vol)
    for k in range(nz):
        mip[:, :, k] = vol[:, :, max(0, k - 2):k + 3].max(axis=2)
    info = dict(info, number=501, time="104800")
    return Series("t1c_mip", None, info, volume_slices(mip, M),
                  image_type=["DERIVED", "SECONDARY", "MIP"], desc="T1 MPRAGE +C MIP",
                  protocol="t1_mprage_post")


def dwi_series(vol, M, info):
    nz = vol.shape[2]
    n = 25
    step = (nz - 1) / (n - 1)
    ks = [int(round(m * step)) for m in range(n)]
    sub = vol[::2, ::2, :]
    M2 = with_zooms(M, [2 * np.linalg.norm(M[:3, 0]), 2 * np.linalg.norm(M[:3, 1]), np.linalg.norm(M[:3, 2])])
    slices = []
    thick = step * float(np.linalg.norm(M[:3, 2]))
    for k in ks:
        sl = volume_slices(sub, M2, [k])[0]
        sl.thickness = thick
        sl.spacing_between = thick
        slices.append(sl)
    info = dict(info, desc="ep2d_diff", protocol="ep2d_diff_3scan_trace", te=90.0, tr=5000.0,
                ti=None, seq=["EP"], var=["SK", "SP"], opt=["PFP", "FS"], etl=1, flip=90.0,
                number=6, time="103000")
    return Series("dwi", None, info, slices, image_type=["ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW"],
                  acq_type="2D")


def make(case, out, variant, seed, crop):
    ctx = Ctx(seed, variant)
    vols, A = load_case(case, crop)
    M = LPS @ A
    shape = vols["t1c"].shape
    expected = {r: (vols[r].astype(np.float32), A) for r in ROLES}
    tolerance = {}
    naming = "plain"
    series = {r: Series(r, r, ROLE_INFO[r], volume_slices(vols[r], M)) for r in ROLES}
    extras = []

    if variant == "shuffled":
        naming = "shuffled"
        for r in ROLES:
            n = len(series[r].slices)
            perm = list(range(1, n + 1))
            ctx.rng(f"instances/{r}").shuffle(perm)
            series[r].instance_numbers = perm
    elif variant == "reversed":
        for r in ROLES:
            series[r].slices = series[r].slices[::-1]
    elif variant == "rescale":
        for r in ROLES:
            v = vols[r]
            vmin = int(v.min())
            for k, sl in enumerate(series[r].slices):
                vals = v[:, :, k].astype(np.int64)
                b = vmin - (k % 7)
                s = (0.5, 1.0, 2.0)[k % 3]
                if s == 2.0:
                    par = np.unique(vals % 2)
                    if len(par) == 1:
                        b -= (b - int(par[0])) % 2
                    else:
                        s = 1.0
                raw = (vals - b) / s
                if s == 0.5 and raw.max() > 65535:
                    s, raw = 1.0, vals - b
                assert raw.min() >= 0 and raw.max() <= 65535 and np.all(raw == np.round(raw))
                assert np.array_equal(raw * s + b, vals)
                sl.pixels = np.ascontiguousarray(raw.astype(np.uint16).T)
                sl.slope, sl.intercept = s, b
    elif variant == "nonsquare":
        M2 = with_zooms(M, [0.5, 0.8, 1.5])
        series = {r: Series(r, r, ROLE_INFO[r], volume_slices(vols[r], M2)) for r in ROLES}
        expected = {r: (vols[r].astype(np.float32), LPS @ M2) for r in ROLES}
    elif variant == "oblique":
        M2 = rotated_about_centre(M, shape, 10.0)
        series = {r: Series(r, r, ROLE_INFO[r], volume_slices(vols[r], M2)) for r in ROLES}
        expected = {r: (vols[r].astype(np.float32), LPS @ M2) for r in ROLES}
    elif variant == "extras":
        extras = [localizer_series(vols["t1n"], M, ROLE_INFO["t1n"]),
                  mip_series(vols["t1c"], M, ROLE_INFO["t1c"]),
                  dwi_series(vols["t2w"], M, ROLE_INFO["t2w"])]
    elif variant == "mixed-grid":
        ks = list(range(0, shape[2], 3))
        M3 = with_zooms(M, [np.linalg.norm(M[:3, 0]), np.linalg.norm(M[:3, 1]), 3 * np.linalg.norm(M[:3, 2])])
        sub = np.ascontiguousarray(vols["t2f"][:, :, ks])
        series["t2f"] = Series("t2f", "t2f", ROLE_INFO["t2f"], volume_slices(sub, M3))
        expected["t2f"] = (resample_onto(sub, M3, shape, M), A)
        tolerance["t2f"] = 1e-3
    elif variant == "no-flair":
        del series["t2f"]
        extras = [localizer_series(vols["t1n"], M, ROLE_INFO["t1n"])]
    elif variant == "tie":
        twin = Series("t1c_twin", "t1c", ROLE_INFO["t1c"], volume_slices(vols["t1c"], M), number=7)
        extras = [twin]
    elif variant == "for-differs":
        series["t2f"].for_key = "for-other"
    elif variant == "patient-differs":
        series["t2f"].patient_id = "PHIMARKER-ID-OTHER"
    elif variant == "mixed-orient":
        M2 = rotated_about_centre(M, shape, 10.0)
        mid = shape[2] // 2
        for k in (mid - 1, mid, mid + 1):
            sl = series["t2w"].slices[k]
            sl.row_cos, sl.col_cos = unit(M2[:3, 0]), unit(M2[:3, 1])
    elif variant == "gap":
        mid = shape[2] // 2
        s = series["t2w"]
        s.slices = s.slices[:mid] + s.slices[mid + 1:]
        s.instance_numbers = list(range(1, len(s.slices) + 1))
    elif variant == "uneven":
        mid = shape[2] // 2
        n = unit(np.cross(unit(M[:3, 0]), unit(M[:3, 1])))
        dz = float(np.linalg.norm(M[:3, 2]))
        for sl in series["t2w"].slices[mid:]:
            sl.ipp = sl.ipp + n * 0.6 * dz * np.sign(np.dot(M[:3, 2], n))
    elif variant == "duplicate":
        mid = shape[2] // 2
        s = series["t2w"]
        src = s.slices[mid]
        dup = Slice(np.ascontiguousarray(s.slices[mid + 1].pixels), src.ipp, src.row_cos, src.col_cos,
                    src.spacing_rc, src.thickness, src.spacing_between)
        s.slices = s.slices[:mid + 1] + [dup] + s.slices[mid + 1:]
        s.instance_numbers = list(range(1, len(s.slices) + 1))
    elif variant == "few-slices":
        mid = shape[2] // 2
        for r in ROLES:
            s = series[r]
            s.slices = s.slices[mid - 6:mid + 6]
            s.instance_numbers = list(range(1, 13))
    elif variant == "monochrome1":
        series["t2w"].extra["PhotometricInterpretation"] = "MONOCHROME1"

    for s in list(series.values()) + extras:
        build_series(ctx, s)

    if variant == "enhanced":
        for r in ROLES:
            to_enhanced(ctx, series[r])
    elif variant == "enhanced-no-positions":
        to_enhanced(ctx, series["t1c"])
        strip_plane_positions(series["t1c"].datasets[0])
    elif variant == "no-ipp":
        del series["t2w"].datasets[shape[2] // 2].ImagePositionPatient
    elif variant == "no-iop":
        del series["t2w"].datasets[shape[2] // 2].ImageOrientationPatient
    elif variant == "no-spacing":
        for ds in series["t2w"].datasets:
            del ds.PixelSpacing
    elif variant == "rgb":
        for ds in series["t2w"].datasets:
            px = np.frombuffer(ds.PixelData, "<i2").astype(np.int32)
            hi = max(1, int(vols["t2w"].max()))
            g = np.clip(px * 255 // hi, 0, 255).astype(np.uint8)
            ds.SamplesPerPixel = 3
            ds.PhotometricInterpretation = "RGB"
            ds.PlanarConfiguration = 0
            ds.BitsAllocated = 8
            ds.BitsStored = 8
            ds.HighBit = 7
            ds.PixelRepresentation = 0
            for name in ("RescaleIntercept", "RescaleSlope", "WindowCenter", "WindowWidth"):
                delattr(ds, name)
            ds.PixelData = np.repeat(g, 3).tobytes()
            ds["PixelData"].VR = "OB"
    elif variant == "compressed":
        from pydicom.uid import JPEG2000Lossless, RLELossless

        for ds in series["t1c"].datasets:
            ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
        for ds in series["t1n"].datasets:
            ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
        for ds in series["t2f"].datasets:
            set_ts(ds, IMPLICIT_LE)

    all_series = list(series.values()) + extras
    write_all(out, all_series, naming, ctx)

    if variant == "compressed":
        transcode_with(["dcmcjpeg", "+e1"], series["t2w"].files)
        series["t2w"].ts = JPEG_SV1
        series["t1c"].ts, series["t1n"].ts, series["t2f"].ts = J2K_LOSSLESS, RLE_LOSSLESS, IMPLICIT_LE
    elif variant == "undecodable":
        transcode_with(["dcmcjpls", "+el"], series["t2w"].files)
        series["t2w"].ts = JPEG_LS_LOSSLESS
    elif variant == "truncated":
        path = series["t2w"].files[shape[2] // 2]
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(int(size * 0.6))

    manifest = {
        "variant": variant,
        "seed": seed,
        "case": os.path.basename(os.path.normpath(case)),
        "crop": [list(c) for c in crop] if crop else None,
        "shape": list(shape),
        "study_instance_uid": ctx.uid("study"),
        "patient_id": "PHIMARKER-ID-7F3A",
        "frame_of_reference_uid": ctx.uid("for"),
        "series": {},
        "distractors": {},
        "expected_error": None,
    }
    for s in all_series:
        entry = {
            "series_instance_uid": ctx.uid(f"series/{s.key}"),
            "series_number": s.number,
            "series_description": s.desc,
            "files": len(s.files),
            "instances": len(s.datasets),
            "frames": len(s.slices),
            "transfer_syntax": s.ts,
            "sop_class_uid": str(s.datasets[0].SOPClassUID),
            "image_type": list(s.image_type),
            "folder": None if naming == "shuffled" else f"dicom/{s.number:03d}_{s.key}",
        }
        if s.key in series and series[s.key] is s:
            manifest["series"][s.key] = entry
        else:
            manifest["distractors"][s.key] = entry
    if variant in BAD:
        kind, role, detail = BAD[variant]
        err = {"kind": kind, "role": role, "detail": detail}
        if role and role in series:
            err["series_instance_uid"] = ctx.uid(f"series/{role}")
        if variant == "tie":
            err["series_instance_uids"] = [ctx.uid("series/t1c"), ctx.uid("series/t1c_twin")]
        if variant == "truncated":
            err["file"] = os.path.relpath(series["t2w"].files[shape[2] // 2], out)
        manifest["expected_error"] = err
    else:
        exp_dir = os.path.join(out, "expected")
        os.makedirs(exp_dir, exist_ok=True)
        manifest["expected"] = {}
        for r in ROLES:
            arr, aff = expected[r]
            save_nifti(os.path.join(exp_dir, f"{r}.nii.gz"), arr, aff)
            manifest["expected"][r] = {
                "path": f"expected/{r}.nii.gz",
                "tolerance": tolerance.get(r, 0.0),
                "affine_ras": [[float(x) + 0.0 for x in row] for row in aff],
            }
        if variant == "mixed-grid":
            manifest["expected"]["t2f"]["resampling"] = (
                "trilinear in world space onto the T1c grid: scipy.ndimage.map_coordinates "
                "order=1 mode=constant cval=0 at inv(M_t2f) @ M_t1c @ ijk, coordinates within "
                "1e-6 of an integer snapped to it (points on the edge planes are inside)")
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    return manifest


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", help="BraTS case dir with *t1c/*t1n/*t2w/*t2f.nii.gz")
    p.add_argument("--out", help="output dir (emptied first)")
    p.add_argument("--variant", choices=VARIANTS)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--crop", type=parse_crop, help="X0:X1,Y0:Y1,Z0:Z1 (voxel ranges, end exclusive)")
    p.add_argument("--list", action="store_true", help="print the variant names (good ones, then bad ones) and exit")
    a = p.parse_args(argv)
    if a.list:
        for v in GOOD:
            print(v)
        for v in BAD:
            print(v)
        return 0
    if not (a.case and a.out and a.variant):
        p.error("--case, --out and --variant are required (or --list)")
    if os.path.exists(a.out):
        for name in ("dicom", "expected", "manifest.json"):
            path = os.path.join(a.out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(a.out, exist_ok=True)
    make(a.case, a.out, a.variant, a.seed, a.crop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
