//! Test helpers: the deterministic generators of tests/fixtures/monai/README.md
//! (tests/monai/detgen.py), reproduced bit for bit, and fixture loading.
#![allow(dead_code)]

use std::path::PathBuf;

#[allow(unused_imports)]
pub(crate) use brats_model::reference::{INPUT_STREAM, det_input, det_state_dict, uniform};
use brats_model::tensors::parse_safetensors;
use brats_model::{SegResNetConfig, StateDict};
use sha2::{Digest, Sha256};

/// The repository root.
pub(crate) fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// tests/fixtures/monai/segresnet/<name>.
pub(crate) fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/monai/segresnet").join(name)
}

/// The MONAI venv's python, if the venv exists.
pub(crate) fn monai_python() -> Option<PathBuf> {
    let p = repo_root().join("tests/monai/.venv/bin/python");
    p.exists().then_some(p)
}

/// sha256 (hex) of f32 values as little-endian bytes.
pub(crate) fn sha256_f32(v: &[f32]) -> String {
    let mut h = Sha256::new();
    for x in v {
        h.update(x.to_le_bytes());
    }
    hex::encode(h.finalize())
}

/// Reads one tensor of a safetensors fixture as f32 with its shape.
pub(crate) fn read_fixture_tensor(file: &str, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(fixture(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    let f = parse_safetensors(&bytes).unwrap();
    let t = f.tensors.get(name).unwrap_or_else(|| panic!("{file} has no tensor {name}"));
    (t.shape.clone(), t.to_f32_vec().unwrap())
}

/// The small fixture configuration (tests/fixtures/monai/segresnet/manifest.json).
pub(crate) fn small_config() -> SegResNetConfig {
    SegResNetConfig { blocks_down: vec![1, 1, 1], blocks_up: vec![1, 1], init_filters: 8, ..Default::default() }
}

/// Max |a - b|.
pub(crate) fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Runs the network (eval mode, CPU, f32) on a flat input.
pub(crate) fn tch_forward(config: &SegResNetConfig, sd: &StateDict, shape: [i64; 5], x: &[f32]) -> Vec<f32> {
    let loaded = brats_model::weights::LoadedWeights { config: config.clone(), tensors: sd.clone(), training: None };
    let (_vs, net) = brats_model::weights::build_network(&loaded, tch::Device::Cpu).unwrap();
    let input = tch::Tensor::from_slice(x).reshape(shape);
    net.check_input_shape(&shape).unwrap();
    let y = tch::no_grad(|| net.forward(&input, false));
    let n = y.numel();
    let mut out = vec![0f32; n];
    y.contiguous().copy_data(&mut out, n);
    out
}

/// ONNX Runtime, loaded once from `ORT_DYLIB_PATH` (the ONNX tests' shared environment).
pub(crate) fn ort_env() -> &'static ort::environment::Environment {
    static ENV: std::sync::OnceLock<ort::environment::Environment> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let path = std::env::var("ORT_DYLIB_PATH")
            .expect("ORT_DYLIB_PATH (set by .cargo/config.toml; scripts/bootstrap.sh installs it)");
        ort::init_from(&path).unwrap_or_else(|e| panic!("loading ONNX Runtime from {path}: {e}")).build().unwrap()
    })
}
