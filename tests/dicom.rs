//! The DICOM path end to end, on studies generated from a real BraTS case by
//! `scripts/dicom/make_study.py` (pydicom, highdicom, dcmtk): `brats-gateway volumes` must give
//! the generator's expected arrays and affines for every well-formed variant (shuffled files,
//! reversed order, per-slice rescale, non-square pixels, oblique, compressed transfer syntaxes,
//! Enhanced MR, distractor series, differing grids), and for every bad input exit 2 with one
//! line naming the problem, no patient data, and nothing written. At full size the four arrays
//! equal the NIfTI files bit for bit, `brats-gateway segment`'s label map equals
//! `brats-inference segment` on those files, and the SEG passes `dciodvfy` and reads back in
//! world space equal to the label map (scripts/dicom/check_seg.py, highdicom).
//!
//! Skips (printing SKIP) only when no real case is found (`common::real_data_dir`).

mod common;

use brats_core::nifti_io::{ReadLimits, read_nifti};
use common::workspace_exe;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// 64 × 64 × 70: enough slices for the 3 mm FLAIR of `mixed-grid` to stay a volume (≥ 20).
const CROP: &str = "60:124,70:134,30:100";
/// Planted in PatientName, PatientID and AccessionNumber by the generator.
const MARKERS: [&str; 2] = ["PHIMARKER", "PHIMRK"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn real_case() -> Option<PathBuf> {
    common::real_data_dir("dicom").map(|d| d.join("BraTS-GLI-00001-000"))
}

fn python() -> PathBuf {
    let p = root().join(".deps/venv/bin/python");
    assert!(p.exists(), "{} missing: run `make bootstrap`", p.display());
    p
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    for stream in [&out.stdout, &out.stderr] {
        let text = String::from_utf8_lossy(stream);
        for m in MARKERS {
            assert!(!text.contains(m), "patient data ({m}) in the output of {cmd:?}:\n{text}");
        }
    }
    out
}

fn check(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Generates `variant` into `dir` and returns its manifest.
fn make_study(case: &Path, dir: &Path, variant: &str, crop: Option<&str>) -> Value {
    let mut cmd = Command::new(python());
    cmd.arg(root().join("scripts/dicom/make_study.py"))
        .arg("--case")
        .arg(case)
        .arg("--out")
        .arg(dir)
        .args(["--variant", variant]);
    if let Some(c) = crop {
        cmd.args(["--crop", c]);
    }
    let out = run(&mut cmd);
    check(&out, &format!("make_study.py --variant {variant}"));
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

fn gateway() -> PathBuf {
    static EXE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    EXE.get_or_init(|| workspace_exe("brats-gateway", "brats-gateway")).clone()
}

fn read(path: &Path) -> brats_core::NiftiVolume {
    read_nifti(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())), "x", &ReadLimits::default())
        .unwrap()
}

/// Compares `out/<role>.nii.gz` with the generator's expectation.
fn assert_volumes_match(study: &Path, out: &Path, manifest: &Value) {
    for role in ["t1c", "t1n", "t2w", "t2f"] {
        let expected = &manifest["expected"][role];
        let want = read(&study.join(expected["path"].as_str().unwrap()));
        let got = read(&out.join(format!("{role}.nii.gz")));
        let variant = manifest["variant"].as_str().unwrap();
        assert_eq!(got.shape, want.shape, "{variant} {role}: shape");
        for r in 0..3 {
            for c in 0..4 {
                assert!(
                    (got.affine[r][c] - want.affine[r][c]).abs() < 1e-4,
                    "{variant} {role}: affine {:?} vs expected {:?}",
                    got.affine,
                    want.affine
                );
            }
        }
        let tolerance = expected["tolerance"].as_f64().unwrap_or(0.0) as f32;
        let worst = got.data.iter().zip(&want.data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= tolerance, "{variant} {role}: largest difference {worst} > {tolerance}");
        assert!(want.data.iter().any(|&v| v != 0.0), "{variant} {role}: the expected volume is empty");
    }
    let selection: Value = serde_json::from_slice(&std::fs::read(out.join("selection.json")).unwrap()).unwrap();
    for role in ["t1c", "t1n", "t2w", "t2f"] {
        assert_eq!(
            selection["selection"]["roles"][role]["series_uid"], manifest["series"][role]["series_instance_uid"],
            "{role} chose the wrong series"
        );
    }
    let text = String::from_utf8_lossy(&std::fs::read(out.join("selection.json")).unwrap()).to_string();
    assert!(MARKERS.iter().all(|m| !text.contains(m)), "patient data in selection.json");
}

#[test]
fn every_well_formed_variant_gives_the_expected_volumes() {
    let Some(case) = real_case() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for variant in [
        "plain",
        "shuffled",
        "reversed",
        "rescale",
        "nonsquare",
        "oblique",
        "compressed",
        "enhanced",
        "extras",
        "mixed-grid",
    ] {
        let study = tmp.path().join(variant);
        let manifest = make_study(&case, &study, variant, Some(CROP));
        let out = tmp.path().join(format!("{variant}-out"));
        let o =
            run(Command::new(gateway()).args(["volumes", "--dicom"]).arg(study.join("dicom")).arg("--out").arg(&out));
        check(&o, &format!("brats-gateway volumes on {variant}"));
        assert_volumes_match(&study, &out, &manifest);
        if variant == "extras" {
            let selection: Value = serde_json::from_slice(&std::fs::read(out.join("selection.json")).unwrap()).unwrap();
            let rejected = selection["selection"]["rejected"].as_array().unwrap();
            assert_eq!(rejected.len(), manifest["distractors"].as_object().unwrap().len(), "{rejected:?}");
            assert!(rejected.iter().all(|r| !r["reason"].as_str().unwrap().is_empty()));
        }
        if variant == "mixed-grid" {
            assert!(String::from_utf8_lossy(&std::fs::read(out.join("selection.json")).unwrap()).contains("resampled"));
        }
        std::fs::remove_dir_all(&study).unwrap();
    }
}

#[test]
fn an_override_picks_the_series_and_an_unknown_one_is_named() {
    let Some(case) = real_case() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let study = tmp.path().join("tie");
    let manifest = make_study(&case, &study, "tie", Some(CROP));
    let twin = manifest["expected_error"]["series_instance_uids"][1].as_str().unwrap().to_string();
    let out = tmp.path().join("out");
    let o = run(Command::new(gateway())
        .args(["volumes", "--dicom"])
        .arg(study.join("dicom"))
        .arg("--out")
        .arg(&out)
        .arg("--role")
        .arg(format!("t1c={twin}")));
    check(&o, "volumes with --role t1c=…");
    let selection: Value = serde_json::from_slice(&std::fs::read(out.join("selection.json")).unwrap()).unwrap();
    assert_eq!(selection["selection"]["roles"]["t1c"]["series_uid"], twin.as_str());
    assert_eq!(selection["selection"]["roles"]["t1c"]["reasons"][0], "override");
    let o = run(Command::new(gateway())
        .args(["volumes", "--dicom"])
        .arg(study.join("dicom"))
        .arg("--out")
        .arg(tmp.path().join("out2"))
        .args(["--role", "t2f=1.2.3.4"]));
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("error[unknown-override]"));
    assert!(!tmp.path().join("out2").exists());
}

#[test]
fn every_bad_input_fails_with_one_named_line_and_writes_nothing() {
    let Some(case) = real_case() else { return };
    let tmp = tempfile::tempdir().unwrap();
    // variant → the error code brats-gateway must print.
    let expected = [
        ("no-flair", "no-candidate"),
        ("tie", "tie"),
        ("for-differs", "frame-of-reference-differs"),
        ("patient-differs", "patient-differs"),
        ("mixed-orient", "mixed-orientation"),
        ("gap", "gap"),
        ("uneven", "uneven-spacing"),
        ("duplicate", "duplicate-position"),
        ("few-slices", "no-candidate"),
        ("no-ipp", "missing-attribute"),
        ("no-iop", "missing-attribute"),
        ("no-spacing", "missing-attribute"),
        ("enhanced-no-positions", "no-frame-positions"),
        ("undecodable", "undecodable-transfer-syntax"),
        ("truncated", "unreadable"),
        ("monochrome1", "photometric"),
        ("rgb", "photometric"),
    ];
    let hasher = brats_dicom::phi::UidHasher::default();
    for (variant, code) in expected {
        let study = tmp.path().join(variant);
        let manifest = make_study(&case, &study, variant, Some(CROP));
        let out = tmp.path().join(format!("{variant}-out"));
        let o =
            run(Command::new(gateway()).args(["volumes", "--dicom"]).arg(study.join("dicom")).arg("--out").arg(&out));
        let stderr = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(2), "{variant}: exit status {:?}, stderr:\n{stderr}", o.status);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{variant}: not one line:\n{stderr}");
        assert!(stderr.contains(&format!("error[{code}]")), "{variant}: expected {code}:\n{stderr}");
        assert!(!out.exists(), "{variant}: something was written");
        // The series at fault is named by its hashed UID, never by the UID itself.
        if let Some(uid) = manifest["expected_error"]["series_instance_uid"].as_str() {
            assert!(!stderr.contains(uid), "{variant}: a raw UID in the message:\n{stderr}");
            if code != "no-candidate" {
                assert!(stderr.contains(&hasher.hash(uid)), "{variant}: the series is not named:\n{stderr}");
            }
        }
        std::fs::remove_dir_all(&study).unwrap();
    }
}

/// The label map a NIfTI path run gives (brats-inference segment), and ours.
fn inference_label(images: &[PathBuf], model: &Path, out: &Path, roi: &str) -> brats_core::NiftiVolume {
    let qc = out.with_extension("png");
    let mut cmd = Command::new(workspace_exe("brats-inference", "brats-inference"));
    cmd.args(["segment", "--model"]).arg(model).arg("--image").args(images).arg("--out").arg(out).args(["--roi", roi]);
    cmd.arg("--qc").arg(&qc);
    check(&run(&mut cmd), "brats-inference segment");
    assert_png(&qc, [240 + 240 + 240 + 8, 240]);
    read(out)
}

/// A PNG of `[width, height]` whose pixels are not all one colour.
fn assert_png(path: &Path, size: [u32; 2]) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{} is not a PNG", path.display());
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!([w, h], size, "{}", path.display());
    let mut idat = Vec::new();
    let mut i = 8;
    while i + 12 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap()) as usize;
        if &bytes[i + 4..i + 8] == b"IDAT" {
            idat.extend_from_slice(&bytes[i + 8..i + 8 + len]);
        }
        i += 12 + len;
    }
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::ZlibDecoder::new(&idat[..]), &mut raw).unwrap();
    assert_eq!(raw.len(), (w as usize * 3 + 1) * h as usize, "{}: pixel data size", path.display());
    let colours: std::collections::BTreeSet<&[u8]> =
        raw.chunks(w as usize * 3 + 1).flat_map(|row| row[1..].chunks(3)).collect();
    assert!(colours.len() > 50, "{}: only {} colours", path.display(), colours.len());
}

#[test]
fn full_size_study_matches_the_nifti_path_and_its_seg_is_valid() {
    let Some(case) = real_case() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let study = tmp.path().join("plain");
    make_study(&case, &study, "plain", None);
    // The arrays equal the NIfTI files bit for bit (int16 stored, slope 1).
    let out = tmp.path().join("volumes");
    check(
        &run(Command::new(gateway()).args(["volumes", "--dicom"]).arg(study.join("dicom")).arg("--out").arg(&out)),
        "volumes",
    );
    let sources: Vec<PathBuf> =
        ["t1c", "t1n", "t2w", "t2f"].iter().map(|m| case.join(format!("BraTS-GLI-00001-000-{m}.nii.gz"))).collect();
    for (role, source) in ["t1c", "t1n", "t2w", "t2f"].iter().zip(&sources) {
        let (ours, theirs) = (read(&out.join(format!("{role}.nii.gz"))), read(source));
        assert_eq!(ours.shape, theirs.shape);
        assert!(ours.data == theirs.data, "{role}: arrays differ from the NIfTI file");
        assert!(ours.affine.iter().flatten().zip(theirs.affine.iter().flatten()).all(|(a, b)| (a - b).abs() < 1e-4));
    }
    // The label map equals the NIfTI path's, with the same model and window.
    let model = root().join("tests/fixtures/onnx/pointwise_head.onnx");
    let roi = "128,128,96";
    let theirs = inference_label(&sources, &model, &tmp.path().join("nifti-label.nii.gz"), roi);
    let seg = tmp.path().join("seg.dcm");
    let label = tmp.path().join("label.nii.gz");
    let o = run(Command::new(gateway())
        .args(["segment", "--dicom"])
        .arg(study.join("dicom"))
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(&seg)
        .arg("--label-map")
        .arg(&label)
        .arg("--qc")
        .arg(tmp.path().join("qc.png"))
        .arg("--qc-dicom")
        .arg(tmp.path().join("qc.dcm"))
        .args(["--roi", roi]));
    check(&o, "brats-gateway segment");
    assert_png(&tmp.path().join("qc.png"), [240 + 240 + 240 + 8, 240]);
    let verify = Command::new("dciodvfy").arg("-new").arg(tmp.path().join("qc.dcm")).output().unwrap();
    let report = String::from_utf8_lossy(&verify.stderr).to_string();
    assert!(!report.contains("Error"), "the quick-look Secondary Capture is not valid:\n{report}");
    println!("{}", String::from_utf8_lossy(&o.stdout));
    let ours = read(&label);
    assert_eq!(ours.shape, theirs.shape);
    assert!(ours.data == theirs.data, "the DICOM path's label map differs from the NIfTI path's");
    let distinct: std::collections::BTreeSet<u32> = ours.data.iter().map(|&v| v as u32).collect();
    assert!(distinct.len() >= 3, "a label map this uniform proves little: {distinct:?}");
    check_seg(&seg, &label);
}

/// dciodvfy reports no error and highdicom reads the SEG back equal to the label map in world
/// space (scripts/dicom/check_seg.py).
fn check_seg(seg: &Path, label: &Path) {
    let o = run(Command::new(python())
        .arg(root().join("scripts/dicom/check_seg.py"))
        .arg("--seg")
        .arg(seg)
        .arg("--label")
        .arg(label)
        .arg("--dciodvfy"));
    println!("{}", String::from_utf8_lossy(&o.stdout));
    check(&o, "check_seg.py");
}

#[test]
fn an_empty_result_is_still_a_valid_seg_and_geometry_survives_odd_grids() {
    let Some(case) = real_case() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for variant in ["plain", "nonsquare", "oblique", "reversed", "enhanced"] {
        let study = tmp.path().join(variant);
        make_study(&case, &study, variant, Some(CROP));
        let loaded = brats_dicom::load_study(&study.join("dicom"), &brats_dicom::LoadOptions::default()).unwrap();
        let (shape, affine) = loaded.t1c_grid;
        // A label map with all three labels in known places, and an empty one.
        let n: usize = shape.iter().product();
        let patterned: Vec<u8> = (0..n)
            .map(|i| {
                let (x, y, z) = (i / (shape[1] * shape[2]), i / shape[2] % shape[1], i % shape[2]);
                if x < shape[0] / 3 && y < shape[1] / 2 && z > 2 {
                    1
                } else if x > shape[0] / 2 && z < shape[2] / 2 {
                    2
                } else if y > shape[1] * 3 / 4 && z == shape[2] - 1 {
                    4
                } else {
                    0
                }
            })
            .collect();
        for (name, label) in [("patterned", patterned), ("empty", vec![0u8; n])] {
            let written = brats_dicom::seg::write_seg(&label, &loaded.sources, &Default::default()).unwrap();
            let seg = tmp.path().join(format!("{variant}-{name}.dcm"));
            std::fs::write(&seg, &written.bytes).unwrap();
            let nifti = tmp.path().join(format!("{variant}-{name}.nii.gz"));
            std::fs::write(
                &nifti,
                brats_core::nifti_io::write_nifti(&label, shape, &affine.to_ras(), None, Some(1)).unwrap(),
            )
            .unwrap();
            check_seg(&seg, &nifti);
        }
        std::fs::remove_dir_all(&study).unwrap();
    }
}
