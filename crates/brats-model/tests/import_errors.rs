//! Malformed and mismatched checkpoints: clear errors naming the keys, nothing written.

mod common;

use brats_model::pt;
use brats_model::weights::{self, parse_checkpoint};
use brats_model::{RawTensor, WeightsError};
use common::*;

#[test]
fn mismatches_are_listed_by_key_and_nothing_is_written() {
    let cfg = small_config();
    let mut sd = det_state_dict(&cfg);
    sd.remove("conv_final.2.conv.bias").unwrap();
    sd.remove("down_layers.1.0.conv.weight").unwrap();
    sd.insert("extra.weight", RawTensor::from_f32(&[1], &[0.0]));
    sd.insert("conv_final.0.weight", RawTensor::from_f32(&[4], &[1.0, 1.0, 1.0, 1.0]));
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("bad.pt");
    std::fs::write(&ckpt, pt::write_state_dict(&sd)).unwrap();
    let out = dir.path().join("out.safetensors");
    let err =
        weights::import_monai(&ckpt, &cfg).and_then(|sd| weights::save_weights(&out, &sd, &cfg, None)).unwrap_err();
    let WeightsError::Mismatch(m) = &err else { panic!("{err}") };
    assert_eq!(m.missing, vec!["conv_final.2.conv.bias", "down_layers.1.0.conv.weight"]);
    assert_eq!(m.unexpected, vec!["extra.weight"]);
    assert_eq!(m.mis_shaped.len(), 1);
    assert_eq!(m.mis_shaped[0].name, "conv_final.0.weight");
    assert_eq!(m.mis_shaped[0].expected, vec![8]);
    assert_eq!(m.mis_shaped[0].found, vec![4]);
    let msg = err.to_string();
    for k in ["conv_final.2.conv.bias", "down_layers.1.0.conv.weight", "extra.weight", "conv_final.0.weight"] {
        assert!(msg.contains(k), "{msg}");
    }
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    // The bundle configuration refuses the small network's weights.
    let err = weights::import_monai(&fixture("small_state_dict.pt"), &Default::default()).unwrap_err().to_string();
    assert!(err.contains("missing") && err.contains("down_layers.3"), "{err}");
}

#[test]
fn integer_tensors_are_refused() {
    let cfg = small_config();
    let mut sd = det_state_dict(&cfg);
    sd.insert(
        "conv_final.2.conv.bias",
        RawTensor { dtype: brats_model::DType::I32, shape: vec![3], data: vec![0; 12] },
    );
    let err = weights::conform(&cfg, &sd).unwrap_err().to_string();
    assert!(err.contains("conv_final.2.conv.bias is I32"), "{err}");
}

#[test]
fn data_parallel_prefix_is_removed_and_half_precision_is_widened() {
    let cfg = small_config();
    let det = det_state_dict(&cfg);
    let mut sd = det.clone();
    sd.rename_keys(|k| format!("module.{k}"));
    let ck = parse_checkpoint(&pt::write_state_dict(&sd), "mem").unwrap();
    assert_eq!(weights::conform(&cfg, &ck.tensors).unwrap(), det);

    let mut half = brats_model::StateDict::new();
    for (k, t) in det.iter() {
        let v = t.to_f32_vec().unwrap();
        half.insert(
            k,
            RawTensor {
                dtype: brats_model::DType::BF16,
                shape: t.shape.clone(),
                data: v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
            },
        );
    }
    let widened = weights::conform(&cfg, &half).unwrap();
    let a = widened.get("convInit.conv.weight").unwrap().to_f32_vec().unwrap();
    let b = det.get("convInit.conv.weight").unwrap().to_f32_vec().unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-2);
}

/// Every truncation and many corruptions of a real `torch.save` file give an error, never a
/// panic, and nothing that parses is silently different in shape.
#[test]
fn real_checkpoint_truncated_or_corrupted() {
    let bytes = std::fs::read(fixture("small_state_dict.pt")).unwrap();
    let cfg = small_config();
    let det = det_state_dict(&cfg);
    for n in (0..bytes.len()).step_by(997).chain([bytes.len() - 1, bytes.len() - 22]) {
        assert!(parse_checkpoint(&bytes[..n], "t").is_err(), "truncated at {n}");
    }
    // Flip bytes across the whole file (a deterministic stride through it).
    let mut caught = 0;
    let mut total = 0;
    let mut i = 7;
    while i < bytes.len() {
        let mut c = bytes.clone();
        c[i] ^= 0x5A;
        total += 1;
        match parse_checkpoint(&c, "c") {
            Err(_) => caught += 1,
            Ok(ck) => {
                // Accepted only when the flip hit bytes that carry no data (padding, unused
                // zip fields); then the tensors must be exactly the original ones.
                if let Ok(sd) = weights::conform(&cfg, &ck.tensors) {
                    assert_eq!(sd, det, "flip at {i} changed data silently");
                } else {
                    caught += 1;
                }
            }
        }
        i += 131;
    }
    eprintln!("corruptions detected: {caught} of {total}");
    assert!(caught > 0);
    // Not a checkpoint at all / legacy format.
    assert!(parse_checkpoint(b"hello world, not a model", "x").unwrap_err().to_string().contains("not a PyTorch"));
    assert!(parse_checkpoint(b"\x80\x02\x8a\x0alegacy", "x").unwrap_err().to_string().contains("legacy"));
}
