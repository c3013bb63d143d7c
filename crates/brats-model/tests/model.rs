//! The network itself: parameter names and shapes, forward shapes, train/eval modes,
//! the upsampling formula, and weights in and out of a VarStore.

mod common;

use brats_model::weights::{load_into_var_store, state_dict_from_var_store};
use brats_model::{SegResNet, SegResNetConfig};
use common::*;
use tch::{Device, Kind, Tensor, nn};

#[test]
fn var_store_matches_monai_state_dict_keys() {
    let cfg = SegResNetConfig::default();
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = SegResNet::new(&vs.root(), &cfg).unwrap();
    let vars = vs.variables();
    let params = cfg.parameters();
    assert_eq!(vars.len(), 83);
    assert_eq!(params.len(), 83);
    for p in &params {
        let v = vars.get(&p.name).unwrap_or_else(|| panic!("missing {}", p.name));
        assert_eq!(v.size(), p.shape, "{}", p.name);
    }
    let total: i64 = vars.values().map(|t| t.numel() as i64).sum();
    assert_eq!(total, 4_702_227);

    // The committed MONAI key list, in state_dict order.
    let keys: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("state_dict_keys.json")).unwrap()).unwrap();
    let monai: Vec<(String, Vec<i64>)> = keys["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["shape"].as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect(),
            )
        })
        .collect();
    let ours: Vec<(String, Vec<i64>)> = params.into_iter().map(|p| (p.name, p.shape)).collect();
    assert_eq!(ours, monai);
}

#[test]
fn forward_shapes_and_modes() {
    let cfg = small_config();
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = SegResNet::new(&vs.root(), &cfg).unwrap();
    let x = Tensor::randn([2, 4, 16, 8, 24], (Kind::Float, Device::Cpu));
    let eval1 = tch::no_grad(|| net.forward(&x, false));
    let eval2 = tch::no_grad(|| net.forward(&x, false));
    assert_eq!(eval1.size(), vec![2, 3, 16, 8, 24]);
    assert!(eval1.equal(&eval2), "eval is deterministic");
    let train = tch::no_grad(|| net.forward(&x, true));
    assert!(!train.equal(&eval1), "Dropout3d is active in training");

    let no_dropout = SegResNetConfig { dropout_prob: None, ..cfg.clone() };
    let vs2 = nn::VarStore::new(Device::Cpu);
    let net2 = SegResNet::new(&vs2.root(), &no_dropout).unwrap();
    let a = tch::no_grad(|| net2.forward(&x, true));
    let b = tch::no_grad(|| net2.forward(&x, true));
    assert!(a.equal(&b), "without dropout_prob training mode is deterministic too");

    assert!(net.check_input_shape(&[1, 4, 16, 16, 10]).is_err());
    assert!(net.check_input_shape(&[1, 3, 16, 16, 16]).is_err());
    assert!(net.check_input_shape(&[1, 4, 16, 16]).is_err());
    net.check_input_shape(&[1, 4, 8, 16, 24]).unwrap();
}

#[test]
fn libtorch_upsampling_is_the_documented_formula() {
    let v: Vec<f32> = vec![1.0, -2.0, 4.5, 0.25, 3.0];
    let x = Tensor::from_slice(&v).reshape([1, 1, 5, 1, 1]);
    let y = x.upsample_trilinear3d([10, 2, 2], false, Some(2.0), Some(2.0), Some(2.0));
    let y = y.select(4, 1).select(3, 0).flatten(0, -1);
    let got: Vec<f32> = Vec::try_from(&y).unwrap();
    assert_eq!(got, brats_model::segresnet::upsample2_reference(&v));
}

#[test]
fn weights_go_in_and_out_of_a_var_store_bit_exactly() {
    let cfg = small_config();
    let sd = det_state_dict(&cfg);
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = SegResNet::new(&vs.root(), &cfg).unwrap();
    load_into_var_store(&vs, &cfg, &sd).unwrap();
    let back = state_dict_from_var_store(&vs, &cfg).unwrap();
    assert_eq!(back, sd);
}

#[test]
fn gradients_flow_to_every_parameter() {
    let cfg = small_config();
    let vs = nn::VarStore::new(Device::Cpu);
    let net = SegResNet::new(&vs.root(), &cfg).unwrap();
    let x = Tensor::randn([1, 4, 8, 8, 8], (Kind::Float, Device::Cpu));
    let loss = net.forward(&x, true).square().mean(Kind::Float);
    loss.backward();
    for (name, v) in vs.variables() {
        let g = v.grad();
        assert!(g.defined(), "{name} has no gradient");
    }
}
