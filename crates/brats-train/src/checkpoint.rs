//! Training checkpoints: everything a resumed job needs to continue as if it never stopped.
//!
//! A checkpoint is one safetensors file: the network's weights under MONAI's parameter names
//! (so the file also works as a weights file for `export-onnx` and MONAI), the optimiser's
//! moment tensors under `optim.…`, and in `__metadata__["brats_train"]` the [`TrainState`]:
//! epoch, global step, optimiser step counter, gradient-scaler state, best metric and the
//! per-epoch history. RNG state needs no bytes: every random draw of epoch `e` is derived from
//! (seed, e, rank, index), so the epoch number restores it exactly.

use std::collections::HashMap;

use brats_model::{RawTensor, SegResNetConfig, StateDict};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::metric::DiceScores;
use crate::report::EpochRow;

/// Metadata key of the training state.
pub const META_TRAIN_STATE: &str = "brats_train";
/// Prefix of optimiser tensors (the rest are the network's).
pub const OPTIM_PREFIX: &str = "optim.";

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Not a checkpoint of ours, or damaged.
    #[error("{source_name} is not a usable training checkpoint: {message}")]
    Invalid {
        /// Where it came from.
        source_name: String,
        /// What is wrong.
        message: String,
    },
    /// Weights that do not fit the network.
    #[error(transparent)]
    Weights(#[from] brats_model::WeightsError),
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Torch(#[from] tch::TchError),
}

/// Scalar training state stored alongside the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Epochs completed.
    pub epoch: u32,
    /// Optimiser steps completed.
    pub global_step: u64,
    /// The optimiser's scalar state (step counters), as the optimiser serialises it.
    pub optimizer: serde_json::Value,
    /// The gradient scaler's state, as it serialises it.
    pub scaler: serde_json::Value,
    /// Best validation scores so far.
    pub best: Option<DiceScores>,
    /// Epoch of `best` (0 = none).
    pub best_epoch: u32,
    /// One row per completed epoch (metrics.csv and the plot are rebuilt from it on resume).
    pub history: Vec<EpochRow>,
    /// The job's seed (a checkpoint from another seed still loads; draws follow the new job).
    pub seed: u64,
}

/// A checkpoint in memory.
pub struct Checkpoint {
    /// Network weights (MONAI names).
    pub weights: StateDict,
    /// Optimiser tensors, named as the optimiser exported them (without [`OPTIM_PREFIX`]).
    pub optimizer_tensors: Vec<(String, Tensor)>,
    /// Scalars.
    pub state: TrainState,
    /// Network configuration.
    pub config: SegResNetConfig,
}

fn raw(t: &Tensor) -> Result<RawTensor, CheckpointError> {
    Ok(brats_model::weights::tensor_to_raw(t)?)
}

/// Serialises a checkpoint (`weights` already in MONAI order, e.g. from
/// `weights::state_dict_from_var_store`).
pub fn to_bytes(
    config: &SegResNetConfig,
    weights: &StateDict,
    optimizer_tensors: &[(String, Tensor)],
    state: &TrainState,
) -> Result<Vec<u8>, CheckpointError> {
    let mut sd = weights.clone();
    for (name, t) in optimizer_tensors {
        sd.insert(format!("{OPTIM_PREFIX}{name}"), raw(t)?);
    }
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (brats_model::weights::META_MODEL.to_string(), "monai.networks.nets.SegResNet".to_string()),
        (brats_model::weights::META_CONFIG.to_string(), serde_json::to_string(config).expect("config serialises")),
        (META_TRAIN_STATE.to_string(), serde_json::to_string(state).expect("state serialises")),
    ]);
    brats_model::tensors::serialize_safetensors(&sd, &meta)
        .map_err(|e| CheckpointError::Invalid { source_name: "checkpoint".into(), message: e.to_string() })
}

/// Parses a checkpoint written by [`to_bytes`]; `source_name` names it in errors.
pub fn from_bytes(bytes: &[u8], source_name: &str) -> Result<Checkpoint, CheckpointError> {
    let invalid = |message: String| CheckpointError::Invalid { source_name: source_name.to_string(), message };
    let ck = brats_model::weights::parse_checkpoint(bytes, source_name)
        .map_err(|e| invalid(format!("cannot parse: {e}")))?;
    let state: TrainState = match ck.metadata.get(META_TRAIN_STATE) {
        Some(s) => serde_json::from_str(s).map_err(|e| invalid(format!("training state: {e}")))?,
        None => {
            return Err(invalid(
                "no training state (this is a weights file; pass it as init_weights_uri to fine-tune)".into(),
            ));
        }
    };
    let config: SegResNetConfig = match ck.metadata.get(brats_model::weights::META_CONFIG) {
        Some(s) => serde_json::from_str(s).map_err(|e| invalid(format!("network configuration: {e}")))?,
        None => SegResNetConfig::default(),
    };
    let mut weights = StateDict::new();
    let mut optimizer_tensors = Vec::new();
    for (name, t) in ck.tensors.iter() {
        match name.strip_prefix(OPTIM_PREFIX) {
            Some(rest) => {
                let v = t.to_f32_vec().ok_or_else(|| invalid(format!("optimiser tensor {name} is not float")))?;
                optimizer_tensors.push((rest.to_string(), Tensor::from_slice(&v).reshape(t.shape_i64())));
            }
            None => {
                weights.insert(name, t.clone());
            }
        }
    }
    let weights = brats_model::weights::conform(&config, &weights)?;
    Ok(Checkpoint { weights, optimizer_tensors, state, config })
}

/// The scores' mean, or −∞ when absent, for "is this better" comparisons.
pub fn score(d: Option<&DiceScores>) -> f64 {
    d.map(|d| d.mean).filter(|m| m.is_finite()).unwrap_or(f64::NEG_INFINITY)
}
