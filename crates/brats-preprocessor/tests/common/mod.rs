//! Fixture loading and comparison helpers of the MONAI parity tests: the committed cases of
//! `tests/fixtures/monai/preprocess/`, our pipeline run on them, and assertions that name the
//! case, the tensor, the max abs diff and the worst voxel.

use brats_core::labels::LabelConvention;
use brats_core::metadata::CropBox;
use brats_core::nifti_io::ReadLimits;
use brats_core::tensors::CaseTensors;
use brats_preprocess::pipeline::{CropMode, InputFile, Options, preprocess};
use brats_preprocess::transforms;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The fixtures' image tolerance (`cases.json` → `tolerance.image.max_abs`).
pub(crate) const IMAGE_TOL: f64 = 1e-5;

pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub(crate) fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures/monai/preprocess")
}

pub(crate) fn index() -> Value {
    let path = fixtures().join("cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub(crate) fn cases() -> Vec<Value> {
    let idx = index();
    assert_eq!(idx["tolerance"]["image"]["max_abs"].as_f64(), Some(IMAGE_TOL), "cases.json image tolerance changed");
    assert_eq!(idx["tolerance"]["label"].as_str(), Some("exact"), "cases.json label tolerance changed");
    let cases = idx["cases"].as_array().expect("cases.json: 'cases' is an array").clone();
    let names: Vec<&str> = cases.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["basic", "dtypes", "edge", "brats2023", "brats2015", "four_d"],
        "cases.json: unexpected case list"
    );
    cases
}

pub(crate) fn case(name: &str) -> Value {
    cases().into_iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no case '{name}' in cases.json"))
}

pub(crate) fn name(case: &Value) -> &str {
    case["name"].as_str().unwrap()
}

pub(crate) fn usizes(v: &Value) -> Vec<usize> {
    v.as_array().unwrap_or_else(|| panic!("{v} is not an array")).iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

pub(crate) fn i64s(v: &Value) -> Vec<i64> {
    v.as_array().unwrap_or_else(|| panic!("{v} is not an array")).iter().map(|x| x.as_i64().unwrap()).collect()
}

pub(crate) fn triple(v: &[usize]) -> [usize; 3] {
    v.try_into().unwrap_or_else(|_| panic!("{v:?} is not a triple"))
}

pub(crate) fn input(case: &Value, file: &str) -> InputFile {
    let path = fixtures().join(name(case)).join(file);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    InputFile { name: file.to_string(), bytes: bytes.into() }
}

pub(crate) fn convention(case: &Value) -> LabelConvention {
    LabelConvention::parse(case["label_convention"].as_str().unwrap()).unwrap()
}

/// The label file our pipeline reads: the native one where MONAI needed a remapped copy.
pub(crate) fn label_file(case: &Value) -> &str {
    case.get("label_native").and_then(Value::as_str).unwrap_or_else(|| case["label"].as_str().unwrap())
}

/// Runs our pipeline on a case's committed inputs (4 files, or the single 4D file).
pub(crate) fn run(case: &Value, options: &Options) -> CaseTensors {
    let images: Vec<InputFile> =
        case["images"].as_array().unwrap().iter().map(|f| input(case, f.as_str().unwrap())).collect();
    let label = input(case, label_file(case));
    let (t, _) = preprocess(&images, Some(&label), options, &ReadLimits::default())
        .unwrap_or_else(|e| panic!("case {}: preprocess failed: {e}", name(case)));
    t
}

/// The inference path: crop none, the case's label convention.
pub(crate) fn run_plain(case: &Value) -> CaseTensors {
    run(case, &Options { label_convention: convention(case), crop: CropMode::None, ..Options::default() })
}

/// One tensor of a case's `expected.safetensors`.
enum Data {
    F32(Vec<f32>),
    U8(Vec<u8>),
}

pub(crate) struct Tensor {
    shape: Vec<usize>,
    data: Data,
}

pub(crate) fn read_tensors(bytes: &[u8], what: &str) -> HashMap<String, Tensor> {
    let st = SafeTensors::deserialize(bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            let data = match v.dtype() {
                Dtype::F32 => {
                    Data::F32(v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect())
                }
                Dtype::U8 => Data::U8(v.data().to_vec()),
                d => panic!("{what}: tensor {k} has dtype {d:?}"),
            };
            (k, Tensor { shape: v.shape().to_vec(), data })
        })
        .collect()
}

pub(crate) fn expected(case: &Value) -> HashMap<String, Tensor> {
    let path = fixtures().join(name(case)).join(case["expected"].as_str().unwrap());
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let t = read_tensors(&bytes, &path.display().to_string());
    // The file and the index agree.
    for (k, spec) in case["tensors"].as_object().unwrap() {
        let got = t.get(k).unwrap_or_else(|| panic!("case {}: {k} missing from expected.safetensors", name(case)));
        assert_eq!(got.shape, usizes(&spec["shape"]), "case {}: {k} shape vs cases.json", name(case));
    }
    t
}

pub(crate) fn f32_of<'a>(t: &'a HashMap<String, Tensor>, case: &str, k: &str) -> (&'a [usize], &'a [f32]) {
    match t.get(k) {
        Some(Tensor { shape, data: Data::F32(v) }) => (shape, v),
        _ => panic!("case {case}: expected tensor {k} (float32) is missing"),
    }
}

pub(crate) fn u8_of<'a>(t: &'a HashMap<String, Tensor>, case: &str, k: &str) -> (&'a [usize], &'a [u8]) {
    match t.get(k) {
        Some(Tensor { shape, data: Data::U8(v) }) => (shape, v),
        _ => panic!("case {case}: expected tensor {k} (uint8) is missing"),
    }
}

/// `[c, x, y, z]` of a flat C-order index.
pub(crate) fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for a in (0..shape.len()).rev() {
        idx[a] = i % shape[a];
        i /= shape[a];
    }
    idx
}

/// Max abs diff and the index of the worst voxel; NaN anywhere counts as an infinite diff.
pub(crate) fn max_abs_diff(got: &[f32], want: &[f32]) -> (f64, usize) {
    let mut worst = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = if g.is_nan() || w.is_nan() { f64::INFINITY } else { (g as f64 - w as f64).abs() };
        if d > worst.0 {
            worst = (d, i);
        }
    }
    worst
}

/// Asserts ours ≈ MONAI's within `IMAGE_TOL`; returns the max abs diff.
pub(crate) fn assert_image(
    case: &str,
    tensor: &str,
    got_shape: &[usize],
    got: &[f32],
    want_shape: &[usize],
    want: &[f32],
) -> f64 {
    assert_eq!(got_shape, want_shape, "case {case}, tensor {tensor}: shape differs from MONAI's");
    assert_eq!(got.len(), want.len(), "case {case}, tensor {tensor}: length differs from MONAI's");
    let (d, i) = max_abs_diff(got, want);
    assert!(
        d <= IMAGE_TOL,
        "case {case}, tensor {tensor}: max abs diff {d:e} > {IMAGE_TOL:e} at [c, x, y, z] = {:?} (ours {}, MONAI {})",
        unravel(i, want_shape),
        got[i],
        want[i]
    );
    println!("case {case:<9} {tensor:<12} max abs diff {d:.3e}  (worst at {:?})", unravel(i, want_shape));
    d
}

/// Asserts ours == MONAI's voxel for voxel.
pub(crate) fn assert_label(
    case: &str,
    tensor: &str,
    got_shape: &[usize],
    got: &[u8],
    want_shape: &[usize],
    want: &[u8],
) {
    assert_eq!(got_shape, want_shape, "case {case}, tensor {tensor}: shape differs from MONAI's");
    assert_eq!(got.len(), want.len(), "case {case}, tensor {tensor}: length differs from MONAI's");
    let bad: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
    if let Some(&i) = bad.first() {
        panic!(
            "case {case}, tensor {tensor}: {} voxels differ (max abs diff 1); first at [c, x, y, z] = {:?} (ours {}, MONAI {})",
            bad.len(),
            unravel(i, want_shape),
            got[i],
            want[i]
        );
    }
    println!(
        "case {case:<9} {tensor:<12} exact ({} voxels, {} set)",
        got.len(),
        got.iter().filter(|&&v| v != 0).count()
    );
}

pub(crate) fn shape4(c: usize, s: [usize; 3]) -> Vec<usize> {
    vec![c, s[0], s[1], s[2]]
}

/// Compares a pipeline result (image and label) with two expected tensors.
pub(crate) fn assert_case_tensors(
    case: &str,
    what: (&str, &str),
    t: &CaseTensors,
    exp: &HashMap<String, Tensor>,
) -> f64 {
    let (ws, w) = f32_of(exp, case, what.0);
    let d = assert_image(case, what.0, &shape4(4, t.metadata.shape), &t.image, ws, w);
    let (ls, l) = u8_of(exp, case, what.1);
    let label = t.label.as_ref().unwrap_or_else(|| panic!("case {case}: no label tensor"));
    assert_label(case, what.1, &shape4(3, t.metadata.shape), label, ls, l);
    d
}

/// Crops both tensors of a result with the same box.
pub(crate) fn crop_both(t: &CaseTensors, b: &CropBox) -> (Vec<f32>, Vec<u8>) {
    let shape = t.metadata.shape;
    (transforms::crop(&t.image, 4, shape, b), transforms::crop(t.label.as_ref().unwrap(), 3, shape, b))
}

/// Replays crop → flips (ascending axes) → scale → shift through the unit transforms.
pub(crate) fn replay_augment(
    t: &CaseTensors,
    b: &CropBox,
    flips: [bool; 3],
    scale: Option<f64>,
    shift: Option<f64>,
) -> (Vec<f32>, Vec<u8>) {
    let (mut image, mut label) = crop_both(t, b);
    for (axis, _) in flips.iter().enumerate().filter(|(_, f)| **f) {
        transforms::flip(&mut image, 4, b.size, axis);
        transforms::flip(&mut label, 3, b.size, axis);
    }
    if let Some(f) = scale {
        transforms::scale_intensity(&mut image, f);
    }
    if let Some(o) = shift {
        transforms::shift_intensity(&mut image, o);
    }
    (image, label)
}
