//! Parity with MONAI 1.6.1 (torch 2.11, fp32 CPU) on the committed fixtures of
//! tests/fixtures/monai/segresnet (made by tests/monai/make_segresnet_fixtures.py).

mod common;

use std::time::Instant;

use brats_model::SegResNetConfig;
use brats_model::weights::{self, read_checkpoint};
use common::*;

const TOL: f32 = 1e-4;

fn manifest() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture("manifest.json")).unwrap()).unwrap()
}

#[test]
fn generators_reproduce_the_python_ones_bit_exactly() {
    // Weights: per-tensor sha256 of the bundle's deterministic weights.
    let keys: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("state_dict_keys.json")).unwrap()).unwrap();
    let sd = det_state_dict(&SegResNetConfig::default());
    let listed = keys["tensors"].as_array().unwrap();
    assert_eq!(listed.len(), sd.len());
    for (t, (name, ours)) in listed.iter().zip(sd.iter()) {
        assert_eq!(t["name"].as_str().unwrap(), name);
        assert_eq!(t["det_sha256_f32le"].as_str().unwrap(), sha256_f32(&ours.to_f32_vec().unwrap()), "{name}");
    }
    // Inputs.
    let m = manifest();
    for case in m["bundle"]["cases"].as_array().unwrap() {
        let s: Vec<usize> =
            case["input_shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        let x = det_input(s[1], s[2], s[3], s[4]);
        assert_eq!(case["input_sha256_f32le"].as_str().unwrap(), sha256_f32(&x), "{s:?}");
    }
    let x = det_input(4, 16, 16, 16);
    assert_eq!(m["small"]["input_sha256_f32le"].as_str().unwrap(), sha256_f32(&x));
    let (_, committed) = read_fixture_tensor("small_input.safetensors", "input");
    assert_eq!(committed, x);
}

#[test]
fn bundle_logits_match_monai() {
    let cfg = SegResNetConfig::default();
    let sd = det_state_dict(&cfg);
    for (x, y, z) in [(64, 64, 48), (48, 32, 40)] {
        let input = det_input(4, x, y, z);
        let t0 = Instant::now();
        let ours = tch_forward(&cfg, &sd, [1, 4, x as i64, y as i64, z as i64], &input);
        let secs = t0.elapsed().as_secs_f64();
        let name = format!("logits_{x}x{y}x{z}");
        let (shape, monai) = read_fixture_tensor(&format!("{name}.safetensors"), &name);
        assert_eq!(shape, vec![1, 3, x, y, z]);
        let d = max_abs_diff(&ours, &monai);
        eprintln!("bundle {x}x{y}x{z}: max |tch - MONAI| = {d:.3e} (forward {secs:.2} s)");
        assert!(d <= TOL, "{name}: max abs diff {d}");
    }
}

#[test]
fn real_torch_save_checkpoints_load_bit_exactly() {
    let cfg = small_config();
    let det = det_state_dict(&cfg);
    for file in ["small_state_dict.pt", "small_wrapped.pt", "small.safetensors"] {
        let ck = read_checkpoint(&fixture(file)).unwrap();
        let sd = weights::conform(&cfg, &ck.tensors).unwrap();
        assert_eq!(sd, det, "{file}");
    }
}

#[test]
fn small_logits_match_monai_from_the_pt_checkpoint() {
    let cfg = small_config();
    let sd = weights::import_monai(&fixture("small_state_dict.pt"), &cfg).unwrap();
    let (_, x) = read_fixture_tensor("small_input.safetensors", "input");
    let ours = tch_forward(&cfg, &sd, [1, 4, 16, 16, 16], &x);
    let (_, monai) = read_fixture_tensor("small_logits.safetensors", "logits");
    let d = max_abs_diff(&ours, &monai);
    eprintln!("small 16^3 from .pt: max |tch - MONAI| = {d:.3e}");
    assert!(d <= TOL, "max abs diff {d}");
}

#[test]
fn pt_and_safetensors_convert_to_our_safetensors_bit_exactly() {
    let cfg = small_config();
    let dir = tempfile::tempdir().unwrap();
    let reference = read_checkpoint(&fixture("small.safetensors")).unwrap().tensors;
    for file in ["small_state_dict.pt", "small_wrapped.pt", "small.safetensors"] {
        let out = dir.path().join(format!("{file}.safetensors"));
        let sd = weights::import_monai(&fixture(file), &cfg).unwrap();
        weights::save_weights(&out, &sd, &cfg, None).unwrap();
        let back = weights::load_weights(&out).unwrap();
        assert_eq!(back.config, cfg, "the configuration travels in the metadata");
        for (name, t) in reference.iter() {
            assert_eq!(back.tensors.get(name), Some(t), "{file}: {name}");
        }
        assert_eq!(back.tensors.len(), reference.len());
    }
}

/// MONAI → ours → MONAI, checked by MONAI itself (`load_state_dict(strict=True)` and a bitwise
/// comparison). Needs the venv of tests/monai/setup.sh; skipped (with a message) without it.
#[test]
fn monai_loads_our_weights_back_bit_exactly() {
    let Some(python) = monai_python() else {
        eprintln!("SKIP: tests/monai/.venv not found (run tests/monai/setup.sh to enable)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config();
    let out = dir.path().join("small_ours.safetensors");
    let sd = weights::import_monai(&fixture("small_wrapped.pt"), &cfg).unwrap();
    weights::save_weights(&out, &sd, &cfg, None).unwrap();
    let bundle_out = dir.path().join("bundle_ours.safetensors");
    let bundle = SegResNetConfig::default();
    weights::save_weights(&bundle_out, &det_state_dict(&bundle), &bundle, None).unwrap();
    let script = repo_root().join("tests/monai/check_roundtrip.py");
    for args in [
        vec![
            out.to_str().unwrap().to_string(),
            "--config".into(),
            "small".into(),
            "--reference".into(),
            fixture("small_state_dict.pt").to_str().unwrap().to_string(),
        ],
        vec![bundle_out.to_str().unwrap().to_string()],
    ] {
        let o = std::process::Command::new(&python).arg(&script).args(&args).current_dir(repo_root()).output().unwrap();
        eprintln!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success(), "check_roundtrip.py {args:?} failed");
    }
}

/// Our `.pt` writer, read by `torch.load(weights_only=True)` and loaded by MONAI (venv only).
#[test]
fn torch_loads_our_pt_files() {
    let Some(python) = monai_python() else {
        eprintln!("SKIP: tests/monai/.venv not found (run tests/monai/setup.sh to enable)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config();
    let pt_path = dir.path().join("ours.pt");
    std::fs::write(&pt_path, brats_model::pt::write_state_dict(&det_state_dict(&cfg))).unwrap();
    let code = r#"
import sys, torch
sd = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
ref = torch.load(sys.argv[2], map_location="cpu", weights_only=True)
assert list(sd) == list(ref), "key order"
for k in ref:
    assert sd[k].dtype == ref[k].dtype and sd[k].shape == ref[k].shape, k
    assert torch.equal(sd[k], ref[k]), k
print("OK: torch.load(weights_only=True) of our .pt equals MONAI's state_dict,", len(sd), "tensors")
"#;
    let o = std::process::Command::new(&python)
        .args(["-c", code])
        .arg(&pt_path)
        .arg(fixture("small_state_dict.pt"))
        .output()
        .unwrap();
    eprintln!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success());
}

/// A full training checkpoint as MONAI's CheckpointSaver writes it (model, Adam state after a
/// step, scheduler, epoch, a numpy metric), made by torch at test time (venv only).
#[test]
fn full_training_checkpoint_from_torch() {
    let Some(python) = monai_python() else {
        eprintln!("SKIP: tests/monai/.venv not found (run tests/monai/setup.sh to enable)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("checkpoint.pt");
    let code = r#"
import sys, numpy as np, torch
from safetensors.torch import load_file
from monai.networks.nets import SegResNet
sys.path.insert(0, "tests/monai")
from make_segresnet_fixtures import SMALL_CONFIG
model = SegResNet(**SMALL_CONFIG)
model.load_state_dict(load_file("tests/fixtures/monai/segresnet/small.safetensors"))
opt = torch.optim.Adam(model.parameters(), lr=0.0, weight_decay=1e-5)  # lr 0: weights stay
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=300)
model(torch.ones(1, 4, 8, 8, 8)).mean().backward()
opt.step()  # populates exp_avg / exp_avg_sq / step tensors
sched.step()
assert len(opt.state_dict()["state"]) == 39
torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
            "lr_scheduler": sched.state_dict(), "epoch": 7,
            "best_metric": np.float64(0.8518), "note": b"bytes", "flags": {1, 2}}, sys.argv[1])
"#;
    let o =
        std::process::Command::new(&python).args(["-c", code]).arg(&ckpt).current_dir(repo_root()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg = small_config();
    let sd = weights::import_monai(&ckpt, &cfg).unwrap();
    assert_eq!(sd, det_state_dict(&cfg));
}
