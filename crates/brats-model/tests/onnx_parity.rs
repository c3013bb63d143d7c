//! The exported ONNX graph run in ONNX Runtime (CPU, the `ort` crate) against tch, and against
//! MONAI's logits.

mod common;

use std::time::Instant;

use brats_model::SegResNetConfig;
use brats_model::metadata::{ModelMetadata, export_onnx_file, sha256_hex};
use brats_model::onnx::{self, ExportOptions, GroupNormLowering, Precision};
use brats_model::weights;
use common::*;
use ort::session::Session;
use ort::value::Tensor;

fn run_ort(model: &[u8], shape: [usize; 5], x: &[f32]) -> (Vec<usize>, Vec<f32>) {
    let mut session =
        Session::builder(ort_env()).unwrap().with_intra_threads(2).unwrap().commit_from_memory(model).unwrap();
    let input = Tensor::from_array((shape.to_vec(), x.to_vec())).unwrap();
    let outputs = session.run(ort::inputs![onnx::INPUT_NAME => input]).unwrap();
    let (s, data) = outputs[onnx::OUTPUT_NAME].try_extract_tensor::<f32>().unwrap();
    (s.iter().map(|&d| d as usize).collect(), data.to_vec())
}

#[test]
fn onnx_runtime_matches_tch_and_monai_on_the_bundle() {
    let cfg = SegResNetConfig::default();
    let sd = det_state_dict(&cfg);
    let t0 = Instant::now();
    let model = onnx::to_onnx_bytes(&cfg, &sd, Precision::Fp32).unwrap();
    eprintln!("export: {:.2} s, {} bytes", t0.elapsed().as_secs_f64(), model.len());
    let (x, y, z) = (64, 64, 48);
    let input = det_input(4, x, y, z);
    let ours = tch_forward(&cfg, &sd, [1, 4, x as i64, y as i64, z as i64], &input);
    let t0 = Instant::now();
    let (shape, ort_out) = run_ort(&model, [1, 4, x, y, z], &input);
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(shape, vec![1, 3, x, y, z]);
    let d = max_abs_diff(&ort_out, &ours);
    let name = format!("logits_{x}x{y}x{z}");
    let (_, monai) = read_fixture_tensor(&format!("{name}.safetensors"), &name);
    let dm = max_abs_diff(&ort_out, &monai);
    eprintln!("bundle {x}x{y}x{z}: max |ort - tch| = {d:.3e}, max |ort - MONAI| = {dm:.3e} (ort {secs:.2} s)");
    assert!(d <= 1e-4, "ort vs tch {d}");
    assert!(dm <= 1e-4, "ort vs MONAI {dm}");

    // torch.onnx-style lowering: valid, but ONNX Runtime's long float32 reductions drift.
    let options = ExportOptions { precision: Precision::Fp32, group_norm: GroupNormLowering::InstanceNorm };
    let model = onnx::to_onnx_bytes(&cfg, &sd, options).unwrap();
    let (_, inorm) = run_ort(&model, [1, 4, x, y, z], &input);
    let di = max_abs_diff(&inorm, &ours);
    eprintln!("bundle {x}x{y}x{z}, InstanceNormalization lowering: max |ort - tch| = {di:.3e}");
    assert!(di <= 1e-3, "{di}");
}

#[test]
fn dynamic_batch_and_non_cubic_sizes() {
    let cfg = small_config();
    let sd = det_state_dict(&cfg);
    let model = onnx::to_onnx_bytes(&cfg, &sd, Precision::Fp32).unwrap();
    let one = det_input(4, 16, 8, 24);
    let mut two = one.clone();
    two.extend(one.iter().map(|v| -v));
    let (shape, out) = run_ort(&model, [2, 4, 16, 8, 24], &two);
    assert_eq!(shape, vec![2, 3, 16, 8, 24]);
    let ours = tch_forward(&cfg, &sd, [2, 4, 16, 8, 24], &two);
    let d = max_abs_diff(&out, &ours);
    eprintln!("small N=2 16x8x24: max |ort - tch| = {d:.3e}");
    assert!(d <= 1e-4, "{d}");
}

#[test]
fn fp16_graph_runs_and_stays_close() {
    let cfg = small_config();
    let sd = det_state_dict(&cfg);
    let model = onnx::to_onnx_bytes(&cfg, &sd, Precision::Fp16).unwrap();
    let (_, x) = read_fixture_tensor("small_input.safetensors", "input");
    let (shape, out) = run_ort(&model, [1, 4, 16, 16, 16], &x);
    assert_eq!(shape, vec![1, 3, 16, 16, 16]);
    let (_, monai) = read_fixture_tensor("small_logits.safetensors", "logits");
    let d = max_abs_diff(&out, &monai);
    eprintln!("small fp16 graph in ort CPU: max |ort fp16 - MONAI fp32| = {d:.3e}");
    assert!(d < 0.05, "{d}");
    let fp32 = onnx::to_onnx_bytes(&cfg, &sd, Precision::Fp32).unwrap();
    assert!(model.len() < fp32.len() * 6 / 10, "weights are stored as fp16");
}

#[test]
fn export_writes_model_and_metadata() {
    let cfg = small_config();
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("w.safetensors");
    weights::save_weights(&w, &det_state_dict(&cfg), &cfg, None).unwrap();
    let out = dir.path().join("model.onnx");
    let report = export_onnx_file(&w, &out, None, Precision::Fp32).unwrap();
    let model = std::fs::read(&out).unwrap();
    let meta: ModelMetadata =
        serde_json::from_slice(&std::fs::read(dir.path().join("metadata.json")).unwrap()).unwrap();
    assert_eq!(meta, report.metadata);
    assert_eq!(meta.onnx.sha256, sha256_hex(&model));
    assert_eq!(meta.weights.sha256, sha256_hex(&std::fs::read(&w).unwrap()));
    assert_eq!(meta.spatial_multiple, 4);
    assert_eq!(meta.onnx.cpu_fast_path_y, Some([124, 240]));
    assert_eq!(meta.network_def["config"]["init_filters"], 8);
    assert_eq!(meta.network_data_format["inputs"]["image"]["channel_def"]["3"], "FLAIR");
    let proto = onnx::decode(&model).unwrap();
    assert_eq!(proto.opset_import[0].version, 18);
    let g = proto.graph.unwrap();
    assert_eq!(g.input[0].name, "image");
    assert_eq!(g.output[0].name, "logits");
    assert_eq!(g.initializer.iter().filter(|t| !t.name.starts_with("const.")).count(), cfg.parameters().len());

    // Bad weights: nothing written.
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ").unwrap();
    let out2 = dir.path().join("other/model.onnx");
    assert!(export_onnx_file(&bad, &out2, None, Precision::Fp32).is_err());
    assert!(!out2.exists());
}

/// `onnx.checker.check_model(full_check=True)` and ONNX Runtime (Python) vs MONAI on the
/// exported bundle graph at a non-cubic size (venv only; CI has none).
#[test]
fn onnx_checker_and_monai_accept_the_export() {
    let Some(python) = monai_python() else {
        eprintln!("SKIP: tests/monai/.venv not found (run tests/monai/setup.sh to enable)");
        return;
    };
    let cfg = SegResNetConfig::default();
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("w.safetensors");
    weights::save_weights(&w, &det_state_dict(&cfg), &cfg, None).unwrap();
    let out = dir.path().join("model.onnx");
    export_onnx_file(&w, &out, None, Precision::Fp32).unwrap();
    let o = std::process::Command::new(&python)
        .arg(repo_root().join("tests/monai/check_onnx.py"))
        .arg(&out)
        .args(["--shape", "48,32,40"])
        .current_dir(repo_root())
        .output()
        .unwrap();
    eprintln!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "check_onnx.py failed");
}
