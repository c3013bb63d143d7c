//! Unit tests of the optimiser, schedules and scaler (the parity with torch is in tests/monai_parity.rs).

use super::*;
use tch::Device;
use tch::{Kind, Tensor};

fn param(v: &[f32]) -> Tensor {
    Tensor::from_slice(v).set_requires_grad(true)
}

fn backward_with(p: &Tensor, g: &[f32]) {
    (p * Tensor::from_slice(g)).sum(Kind::Float).backward();
}

#[test]
fn state_round_trip_resumes_identically() {
    let run = |split: Option<usize>| {
        let p = param(&[0.1, -0.2, 0.3]);
        let mut opt = Adam::new(vec![("w".into(), p.shallow_clone())], AdamConfig::adam(1e-5)).unwrap();
        for s in 0..5 {
            if split == Some(s) {
                let state = opt.state();
                let tensors: Vec<(String, Tensor)> =
                    opt.state_tensors().into_iter().map(|(n, t)| (n, t.copy())).collect();
                opt = Adam::new(vec![("w".into(), p.shallow_clone())], AdamConfig::adam(1e-5)).unwrap();
                opt.load_state(&state, &tensors).unwrap();
            }
            opt.zero_grad();
            backward_with(&p, &[0.5 - s as f32, 0.25, -1.0]);
            opt.step(1e-3);
        }
        Vec::<f32>::try_from(p.detach()).unwrap()
    };
    assert_eq!(run(None), run(Some(3)));
}

#[test]
fn load_state_rejects_mismatches() {
    let p = param(&[1.0, 2.0]);
    let mut opt = Adam::new(vec![("w".into(), p.shallow_clone())], AdamConfig::adam(0.0)).unwrap();
    backward_with(&p, &[1.0, 1.0]);
    opt.step(1e-3);
    let state = opt.state();
    let tensors = opt.state_tensors();
    assert_eq!(tensors.len(), 2);
    assert_eq!(tensors[0].0, "optim.exp_avg.w");

    let mut other = Adam::new(vec![("w".into(), param(&[1.0, 2.0]))], AdamConfig::adamw(0.0)).unwrap();
    assert!(matches!(other.load_state(&state, &tensors), Err(OptimError::StateMismatch(_))));
    let mut other = Adam::new(vec![("w".into(), param(&[1.0, 2.0, 3.0]))], AdamConfig::adam(0.0)).unwrap();
    let err = other.load_state(&state, &tensors).unwrap_err().to_string();
    assert!(err.contains("shape"), "{err}");
    let mut other = Adam::new(vec![("v".into(), param(&[1.0, 2.0]))], AdamConfig::adam(0.0)).unwrap();
    assert!(other.load_state(&state, &tensors).is_err());
    let mut other = Adam::new(vec![("w".into(), param(&[1.0, 2.0]))], AdamConfig::adam(0.0)).unwrap();
    assert!(other.load_state(&state, &tensors[..1]).is_err());
    // Unrelated checkpoint entries are ignored.
    let mut with_weights = tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect::<Vec<_>>();
    with_weights.push(("w".into(), Tensor::zeros([2], (Kind::Float, Device::Cpu))));
    other.load_state(&state, &with_weights).unwrap();
    assert_eq!(other.state(), state);
}

#[test]
fn duplicate_names_and_bad_hyper_parameters_are_rejected() {
    let p = param(&[1.0]);
    let two = vec![("a".to_string(), p.shallow_clone()), ("a".to_string(), p.shallow_clone())];
    assert!(matches!(Adam::new(two, AdamConfig::adam(0.0)), Err(OptimError::DuplicateParameter(_))));
    let cfg = AdamConfig { betas: (1.0, 0.999), ..AdamConfig::adam(0.0) };
    assert!(Adam::new(vec![], cfg).is_err());
    let cfg = GradScalerConfig { backoff_factor: 1.5, ..Default::default() };
    assert!(GradScaler::new(cfg).is_err());
}

#[test]
fn cosine_endpoints_and_constant() {
    let c = CosineSchedule::new(1e-4, 10);
    assert_eq!(c.lr_at(0), 1e-4);
    assert_eq!(c.lr_at(10), 0.0);
    assert!((c.lr_at(5) - 5e-5).abs() < 1e-18);
    assert_eq!(LrSchedule::Constant { lr: 3e-4 }.lr_at(123, 7), 3e-4);
    assert_eq!(LrSchedule::Cosine(c).lr_at(5, 999), c.lr_at(5), "an epoch schedule ignores the step");
    let w = WarmupCosineSchedule::new(1e-2, 10, 110);
    assert_eq!((w.lr_at(0), w.lr_at(5), w.lr_at(10), w.lr_at(110)), (0.0, 5e-3, 1e-2, 0.0));
    assert!((w.lr_at(60) - 5e-3).abs() < 1e-15);
    assert_eq!(LrSchedule::WarmupCosine(w).lr_at(0, 60), w.lr_at(60), "a step schedule ignores the epoch");
    let json = serde_json::to_string(&LrSchedule::Cosine(c)).unwrap();
    assert_eq!(serde_json::from_str::<LrSchedule>(&json).unwrap(), LrSchedule::Cosine(c));
}

#[test]
fn disabled_scaler_is_a_no_op() {
    let mut s = GradScaler::disabled();
    let loss = Tensor::from(2.5f32);
    assert_eq!(s.scale(&loss).double_value(&[]), 2.5);
    let p = param(&[1.0]);
    backward_with(&p, &[f32::INFINITY]);
    assert!(!s.unscale_(&[p.grad()]).unwrap());
    assert!(s.should_step().unwrap());
    s.update().unwrap();
    assert_eq!(p.grad().double_value(&[0]), f64::INFINITY);
    assert_eq!(s.current_scale(), 1.0);
}

#[test]
fn scaler_call_order_is_enforced() {
    let mut s = GradScaler::new(GradScalerConfig::default()).unwrap();
    let scaled = s.scale(&Tensor::from(0.5f32));
    assert_eq!((scaled.size(), scaled.kind(), scaled.double_value(&[])), (vec![], Kind::Float, 32768.0));
    assert_eq!(s.update(), Err(OptimError::NoInfCheck));
    assert_eq!(s.should_step(), Err(OptimError::NoInfCheck));
    let g = Tensor::from_slice(&[65536.0f32]);
    assert!(!s.unscale_(&[g.shallow_clone()]).unwrap());
    assert_eq!(g.double_value(&[0]), 1.0);
    assert_eq!(s.unscale_(&[g.shallow_clone()]), Err(OptimError::AlreadyUnscaled));
    s.update().unwrap();
    assert_eq!(s.state(), GradScalerState { scale: 65536.0, growth_tracker: 1 });
    let h = Tensor::from_slice(&[1.0f32]).to_kind(Kind::Half);
    assert_eq!(s.unscale_(&[h]), Err(OptimError::HalfGradients));
}
