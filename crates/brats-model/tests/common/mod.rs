//! Test helpers: the deterministic generators of tests/fixtures/monai/README.md
//! (tests/monai/detgen.py), reproduced bit for bit, and fixture loading.
#![allow(dead_code)]

use std::path::PathBuf;

use brats_model::tensors::parse_safetensors;
use brats_model::{RawTensor, SegResNetConfig, StateDict};
use sha2::{Digest, Sha256};

/// Stream id of network inputs (weights use the tensor index).
pub const INPUT_STREAM: u64 = 1000;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// tests/fixtures/monai/segresnet/<name>.
pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/monai/segresnet").join(name)
}

/// The MONAI venv's python, if the venv exists.
pub fn monai_python() -> Option<PathBuf> {
    let p = repo_root().join("tests/monai/.venv/bin/python");
    p.exists().then_some(p)
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// u[idx] in [-1, 1), multiples of 2^-23.
pub fn uniform(stream: u64, n: usize) -> Vec<f64> {
    (0..n as u64)
        .map(|i| {
            let t = (splitmix64((stream << 32).wrapping_add(i)) >> 40) as i64;
            (t - (1 << 23)) as f64 / (1u64 << 23) as f64
        })
        .collect()
}

/// The deterministic weights for `config`, in state_dict order.
pub fn det_state_dict(config: &SegResNetConfig) -> StateDict {
    let params = config.parameters();
    let mut sd = StateDict::new();
    for (k, p) in params.iter().enumerate() {
        let n: i64 = p.shape.iter().product();
        let u = uniform(k as u64, n as usize);
        let v: Vec<f32> = if p.shape.len() == 5 {
            let fan_in = n / p.shape[0];
            let a = (6.0 / fan_in as f64).sqrt();
            u.iter().map(|x| (x * a) as f32).collect()
        } else if p.name.ends_with(".weight") {
            u.iter().map(|x| (1.0 + 0.25 * x) as f32).collect()
        } else {
            u.iter().map(|x| (0.1 * x) as f32).collect()
        };
        let shape: Vec<usize> = p.shape.iter().map(|&d| d as usize).collect();
        sd.insert(p.name.clone(), RawTensor::from_f32(&shape, &v));
    }
    sd
}

/// The deterministic input [1, C, X, Y, Z] as a flat f32 vector.
pub fn det_input(c_n: usize, xs: usize, ys: usize, zs: usize) -> Vec<f32> {
    let u = uniform(INPUT_STREAM, c_n * xs * ys * zs);
    let mut out = Vec::with_capacity(u.len());
    for c in 0..c_n {
        let cf = c as f64;
        for i in 0..xs {
            let a = (2.0 * i as f64 + 1.0 - xs as f64) / xs as f64;
            for j in 0..ys {
                let b = (2.0 * j as f64 + 1.0 - ys as f64) / ys as f64;
                for k in 0..zs {
                    let d = (2.0 * k as f64 + 1.0 - zs as f64) / zs as f64;
                    let r2 = (a * a + b * b) + d * d;
                    let idx = ((c * xs + i) * ys + j) * zs + k;
                    let v =
                        if r2 < 1.0 { ((cf + 1.0) * (1.0 - r2) + 0.5 * a * (cf - 1.5)) + 0.25 * u[idx] } else { 0.0 };
                    out.push(v as f32);
                }
            }
        }
    }
    out
}

/// sha256 (hex) of f32 values as little-endian bytes.
pub fn sha256_f32(v: &[f32]) -> String {
    let mut h = Sha256::new();
    for x in v {
        h.update(x.to_le_bytes());
    }
    hex::encode(h.finalize())
}

/// Reads one tensor of a safetensors fixture as f32 with its shape.
pub fn read_fixture_tensor(file: &str, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(fixture(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    let f = parse_safetensors(&bytes).unwrap();
    let t = f.tensors.get(name).unwrap_or_else(|| panic!("{file} has no tensor {name}"));
    (t.shape.clone(), t.to_f32_vec().unwrap())
}

/// The small fixture configuration (tests/fixtures/monai/segresnet/manifest.json).
pub fn small_config() -> SegResNetConfig {
    SegResNetConfig { blocks_down: vec![1, 1, 1], blocks_up: vec![1, 1], init_filters: 8, ..Default::default() }
}

/// Max |a - b|.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Runs the network (eval mode, CPU, f32) on a flat input.
pub fn tch_forward(config: &SegResNetConfig, sd: &StateDict, shape: [i64; 5], x: &[f32]) -> Vec<f32> {
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
