//! A freshly built network draws its parameters as MONAI's does (PyTorch's defaults): compared,
//! parameter by parameter, with the statistics `tests/monai/make_init_fixtures.py` recorded from
//! MONAI's SegResNet built with the bundle's configuration.

mod common;

use brats_model::{SegResNet, SegResNetConfig};
use common::fixture;
use tch::{Device, Kind, Tensor, nn};

/// Values of every parameter of networks built with `seeds`, pooled per parameter name.
fn pooled_parameters(seeds: &[i64]) -> std::collections::HashMap<String, Vec<f64>> {
    let mut pooled: std::collections::HashMap<String, Vec<f64>> = Default::default();
    for &seed in seeds {
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(Device::Cpu);
        let _net = SegResNet::new(&vs.root(), &SegResNetConfig::default()).unwrap();
        for (name, t) in vs.variables() {
            let flat = t.flatten(0, -1).to_kind(Kind::Double);
            let values = Vec::<f64>::try_from(&flat).unwrap();
            pooled.entry(name).or_default().extend(values);
        }
    }
    pooled
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[test]
fn fresh_weights_are_drawn_as_monai_draws_them() {
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(fixture("init_stats.json")).unwrap()).unwrap();
    let seeds: Vec<i64> = doc["seeds"].as_array().unwrap().iter().map(|s| s.as_i64().unwrap()).collect();
    let ours = pooled_parameters(&seeds);
    let params = doc["parameters"].as_array().unwrap();
    assert_eq!(params.len(), ours.len(), "parameter count");
    let _ = Tensor::zeros([1], (Kind::Float, Device::Cpu)); // libtorch loaded before the loop's messages
    let mut failures = Vec::new();
    for p in params {
        let name = p["name"].as_str().unwrap();
        let values = ours.get(name).unwrap_or_else(|| panic!("{name}: not in our network"));
        let (mean, std) = mean_std(values);
        let (lo, hi) = values.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        match p["init"].as_str().unwrap() {
            "constant" => {
                let want = p["min"].as_f64().unwrap();
                if lo != want || hi != want {
                    failures.push(format!("{name}: constant {want} in MONAI, ours spans {lo}..{hi}"));
                }
            }
            "uniform" => {
                let bound = p["bound"].as_f64().unwrap();
                let monai_std = p["std"].as_f64().unwrap();
                let n = values.len() as f64;
                // The std of n uniform draws has a relative standard error of √(0.2/n); two
                // independent estimates differ by √(0.4/n). Five of those, plus float slack.
                let tol = 5.0 * (0.4 / n).sqrt() + 1e-3;
                if lo < -bound * (1.0 + 1e-6) || hi > bound * (1.0 + 1e-6) {
                    failures.push(format!("{name}: values {lo}..{hi} outside MONAI's U(±{bound})"));
                }
                if (std / monai_std - 1.0).abs() > tol {
                    failures.push(format!("{name}: std {std:.5} against MONAI's {monai_std:.5} (tolerance {tol:.3})"));
                }
                if mean.abs() > 5.0 * bound / (3.0 * n).sqrt() + 1e-9 {
                    failures.push(format!("{name}: mean {mean:.5} is not centred (bound {bound})"));
                }
                // The draws fill the interval: the widest of n uniform draws is within ~1/n of it.
                if n >= 1000.0 && (hi < bound * (1.0 - 20.0 / n) || lo > -bound * (1.0 - 20.0 / n)) {
                    failures.push(format!("{name}: values {lo}..{hi} do not fill U(±{bound})"));
                }
            }
            other => panic!("{name}: unknown init kind {other}"),
        }
    }
    assert!(
        failures.is_empty(),
        "{} parameters differ from MONAI's initialisation:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
