//! The CPU fast path of the export (the slab layout behind the `If` on Y, see `onnx.rs`) in ONNX
//! Runtime against tch: inside its Y range, at its bounds, with the input shape pinned the way
//! `brats-inference` pins it (the `If` folded away), with a batch of two, and the plain branch
//! just outside the range.

mod common;

use brats_model::SegResNetConfig;
use brats_model::onnx::{self, ExportOptions, FAST_PATH_MAX_Y, GroupNormLowering, Precision, fast_path_y_range};
use common::*;
use ort::session::Session;
use ort::value::Tensor;

/// Runs `model` on `x`; with `pin`, the symbolic input dimensions are fixed to `shape` first.
fn run_ort(model: &[u8], shape: [usize; 5], x: &[f32], pin: bool) -> Vec<f32> {
    let mut builder = Session::builder(ort_env()).unwrap().with_intra_threads(2).unwrap();
    if pin {
        for (name, v) in ["N", "X", "Y", "Z"].iter().zip([shape[0], shape[2], shape[3], shape[4]]) {
            builder = builder.with_dimension_override(*name, v as i64).unwrap();
        }
    }
    let mut session = builder.commit_from_memory(model).unwrap();
    let input = Tensor::from_array((shape.to_vec(), x.to_vec())).unwrap();
    let outputs = session.run(ort::inputs![onnx::INPUT_NAME => input]).unwrap();
    let (s, data) = outputs[onnx::OUTPUT_NAME].try_extract_tensor::<f32>().unwrap();
    assert_eq!(s.iter().map(|&d| d as usize).collect::<Vec<_>>(), vec![shape[0], 3, shape[2], shape[3], shape[4]]);
    data.to_vec()
}

fn check(cfg: &SegResNetConfig, model: &[u8], shape: [usize; 5], pin: bool) -> f32 {
    let sd = det_state_dict(cfg);
    let mut x = det_input(4, shape[2], shape[3], shape[4]);
    if shape[0] == 2 {
        let second: Vec<f32> = x.iter().map(|v| 0.5 - v).collect();
        x.extend(second);
    }
    let want = tch_forward(cfg, &sd, shape.map(|d| d as i64), &x);
    let got = run_ort(model, shape, &x, pin);
    let d = max_abs_diff(&got, &want);
    eprintln!("{shape:?} pinned={pin}: max |ort - tch| = {d:.3e}");
    d
}

#[test]
fn range_follows_the_configuration() {
    let bundle = SegResNetConfig::default();
    assert_eq!(fast_path_y_range(&bundle, Precision::Fp32), Some((128, FAST_PATH_MAX_Y)));
    assert_eq!(fast_path_y_range(&small_config(), Precision::Fp32), Some((124, FAST_PATH_MAX_Y)));
    assert_eq!(fast_path_y_range(&bundle, Precision::Fp16), None);
    let inorm = ExportOptions { precision: Precision::Fp32, group_norm: GroupNormLowering::InstanceNorm };
    assert_eq!(fast_path_y_range(&bundle, inorm), None);
    // 2^5 does not divide 240: no fast path for six levels.
    let deep = SegResNetConfig { blocks_down: vec![1; 6], blocks_up: vec![1; 5], ..Default::default() };
    assert_eq!(fast_path_y_range(&deep, Precision::Fp32), None);
}

#[test]
fn bundle_fast_path_matches_tch() {
    let cfg = SegResNetConfig::default();
    let model = onnx::to_onnx_bytes(&cfg, &det_state_dict(&cfg), Precision::Fp32).unwrap();
    // The bundle window's Y (fast path), pinned as brats-inference runs it and dynamic.
    assert!(check(&cfg, &model, [1, 4, 16, 240, 8], true) <= 1e-4);
    assert!(check(&cfg, &model, [1, 4, 8, 240, 16], false) <= 1e-4);
    // Lower bound of the range, and a batch of two.
    assert!(check(&cfg, &model, [2, 4, 8, 128, 8], true) <= 1e-4);
    // Just below the range: the plain branch.
    assert!(check(&cfg, &model, [1, 4, 8, 120, 8], true) <= 1e-4);
}

#[test]
fn small_config_fast_path_matches_tch() {
    let cfg = small_config();
    let model = onnx::to_onnx_bytes(&cfg, &det_state_dict(&cfg), Precision::Fp32).unwrap();
    assert!(check(&cfg, &model, [1, 4, 12, 200, 8], true) <= 1e-4);
    assert!(check(&cfg, &model, [1, 4, 4, 124, 4], false) <= 1e-4);
    assert!(check(&cfg, &model, [1, 4, 4, 244, 4], true) <= 1e-4, "above the range: plain branch");
}

/// Writes the bundle export (detgen weights) to `$BRATS_WRITE_ONNX` for manual runs.
#[test]
#[ignore]
fn write_bundle_model() {
    let cfg = SegResNetConfig::default();
    let path = std::env::var("BRATS_WRITE_ONNX").expect("BRATS_WRITE_ONNX=path");
    std::fs::write(&path, onnx::to_onnx_bytes(&cfg, &det_state_dict(&cfg), Precision::Fp32).unwrap()).unwrap();
}
