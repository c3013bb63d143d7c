//! The deterministic weight and input generators of `tests/monai/detgen.py`, reproduced bit for
//! bit, so MONAI parity fixtures need no committed weights or large inputs
//! (`tests/fixtures/monai/README.md` states the formulas). Integer and correctly rounded f64
//! arithmetic only, so every platform produces the same values.

use crate::{RawTensor, SegResNetConfig, StateDict};

/// Stream id of network inputs (weights use the tensor index).
pub const INPUT_STREAM: u64 = 1000;

/// SplitMix64, the hash behind every generated value.
pub fn splitmix64(x: u64) -> u64 {
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
