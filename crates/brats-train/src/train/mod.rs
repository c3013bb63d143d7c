//! The training loop: the bundle's recipe (SegResNet, DiceLoss, Adam, cosine LR, random crops
//! with flips and intensity jitter, sliding-window validation with MeanDice), data-parallel over
//! ranks, checkpointed every epoch, exported to ONNX at the end.
//!
//! One function, [`run`], serves the offline CLI (one process), every rank of a service job and
//! every rank of a torchrun-style multi-node launch; it drives a [`Trainer`] through its steps
//! (`new`, `resume`, then per epoch `train_epoch`, `validate`, `checkpoint`, and `finish`). Only
//! rank 0 writes checkpoints, artefacts and events; all ranks agree on every decision (stop, skip
//! a step) through the process group.

mod artifacts;
mod tracking;
mod trainer;
mod validation;

use tracking::Tracker;
pub use tracking::Tracking;
pub use trainer::{EpochTraining, Trainer};

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use brats_core::{StoreUri, Stores};
use brats_model::StateDict;
use brats_model::weights;
use tch::{Kind, Tensor, nn};
use tracing::{info, info_span};

use crate::checkpoint;
use crate::data::{self, Cases};
use crate::dist::{self, ProcessGroup};
use crate::events::{EventKind, TrainOutcome};
use crate::optim::{CosineSchedule, LrSchedule, WarmupCosineSchedule};
use crate::spec::{Device, Schedule, TrainConfig};

/// Why training stopped early.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Cancellation was requested (stdin closed, a signal, or a peer rank's request).
    #[error("cancelled at a step boundary")]
    Cancelled,
    /// Data that cannot be trained on.
    #[error("data: {0}")]
    Data(String),
    /// The object store failed. Not a `source`: the message already holds the store's whole
    /// sentence, and a source would print it twice in an error chain.
    #[error("store: {0}")]
    Store(brats_core::CoreError),
    /// A tensor operation failed (out of memory included).
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A collective failed (a peer died or timed out).
    #[error("distributed: {0}")]
    Dist(#[from] dist::DistError),
    /// A checkpoint could not be read or written.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    /// Weights or export failed.
    #[error("model: {0}")]
    Model(String),
    /// The loss became NaN/inf without AMP to absorb it.
    #[error(
        "the loss is not finite at epoch {epoch}, step {step}; lower the learning rate or enable gradient clipping"
    )]
    Diverged {
        /// Epoch.
        epoch: u32,
        /// Step.
        step: usize,
    },
}

impl From<brats_core::CoreError> for TrainError {
    fn from(e: brats_core::CoreError) -> Self {
        TrainError::Store(e)
    }
}

impl TrainError {
    /// Whether retrying later can succeed without changing anything: the store could not be
    /// reached. The worker exits with [`EXIT_UNAVAILABLE`] for these, so the job's failure code
    /// says UNAVAILABLE and `ResumeJob` is the fix.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, TrainError::Store(e) if e.kind() == brats_core::ErrorKind::Unavailable)
    }
}

/// Exit code of a worker stopped by a transient failure ([`TrainError::is_unavailable`]):
/// sysexits' `EX_TEMPFAIL`.
pub const EXIT_UNAVAILABLE: u8 = 75;

/// Where a run reads and writes.
pub struct RunEnv {
    /// Object stores.
    pub stores: Arc<Stores>,
    /// Runs store I/O from the (synchronous) loop.
    pub runtime: tokio::runtime::Handle,
    /// Folder of `latest.safetensors` and `best.safetensors`.
    pub checkpoints: StoreUri,
    /// Folder of the final artefacts (model.onnx, metadata.json, best.safetensors,
    /// metrics.csv, curves.png).
    pub artifacts: StoreUri,
    /// This rank's device.
    pub device: Device,
    /// The process group when world size > 1.
    pub group: Option<ProcessGroup>,
    /// A checkpoint to continue from when the job has no latest checkpoint of its own yet
    /// (the spec's `resume_from`).
    pub resume_from: Option<StoreUri>,
    /// Job id or run name, for provenance.
    pub run_name: String,
    /// TensorBoard and MLflow (rank 0 reports; off by default).
    pub tracking: Tracking,
}

impl RunEnv {
    pub(crate) fn rank(&self) -> usize {
        self.group.as_ref().map(|g| g.rank()).unwrap_or(0)
    }

    pub(crate) fn world_size(&self) -> usize {
        self.group.as_ref().map(|g| g.world_size()).unwrap_or(1)
    }

    pub(crate) fn get(&self, uri: &StoreUri) -> Result<Option<bytes::Bytes>, TrainError> {
        match self.runtime.block_on(self.stores.get(uri)) {
            Ok(b) => Ok(Some(b)),
            Err(brats_core::CoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) fn put(&self, uri: &StoreUri, bytes: Vec<u8>) -> Result<(), TrainError> {
        Ok(self.runtime.block_on(self.stores.put(uri, bytes::Bytes::from(bytes)))?)
    }
}

/// The training and validation cases.
pub struct Dataset {
    /// Training cases (with labels).
    pub train: Arc<Cases>,
    /// Validation cases (with labels); empty = no validation.
    pub validation: Arc<Cases>,
}

/// The job's learning-rate policy; step schedules span `steps_per_epoch` × epochs steps.
pub(crate) fn lr_schedule(config: &TrainConfig, steps_per_epoch: usize) -> LrSchedule {
    let total_steps = steps_per_epoch as u64 * config.epochs as u64;
    match config.schedule {
        Schedule::Cosine => LrSchedule::Cosine(CosineSchedule::new(config.learning_rate, config.epochs as u64)),
        Schedule::Constant => LrSchedule::Constant { lr: config.learning_rate },
        Schedule::WarmupCosine { warmup_steps } => {
            let warmup = warmup_steps.map_or((total_steps / 20).max(1), u64::from);
            LrSchedule::WarmupCosine(WarmupCosineSchedule::new(config.learning_rate, warmup, total_steps))
        }
    }
}

/// Mixes the job seed with a purpose and numbers, so every stream of draws is independent.
pub(crate) fn derive_seed(seed: u64, parts: &[u64]) -> u64 {
    let mut x = seed;
    for &p in parts {
        x = data::sample_seed(x, p, 0x5eed);
    }
    x
}

/// Trains as `config` says, resuming from the latest checkpoint in `env.checkpoints` when there
/// is one; `emit` receives events (rank 0 only), `cancel` is polled at every step boundary.
pub fn run(
    config: &TrainConfig,
    dataset: &Dataset,
    env: &RunEnv,
    emit: &mut dyn FnMut(EventKind),
    cancel: &AtomicBool,
) -> Result<TrainOutcome, TrainError> {
    let mut tracker = (env.rank() == 0).then(|| Tracker::start(config, env));
    let mut tracked = |e: EventKind| {
        if let Some(t) = tracker.as_mut() {
            t.on_event(env, &e);
        }
        emit(e)
    };
    let result = train_all(config, dataset, env, &mut tracked, cancel);
    match tracker {
        Some(t) => {
            let run_id = t.finish(env, &result);
            result.map(|outcome| TrainOutcome { mlflow_run_id: run_id, ..outcome })
        }
        None => result,
    }
}

fn train_all(
    config: &TrainConfig,
    dataset: &Dataset,
    env: &RunEnv,
    emit: &mut dyn FnMut(EventKind),
    cancel: &AtomicBool,
) -> Result<TrainOutcome, TrainError> {
    let mut trainer = Trainer::new(config, dataset, env)?;
    trainer.resume(emit)?;
    let run_started = Instant::now();
    for epoch in trainer.first_epoch()..=config.epochs {
        let span = info_span!("epoch", epoch, rank = env.rank());
        let _enter = span.enter();
        let trained = trainer.train_epoch(epoch, emit, cancel)?;
        let validation = if trainer.validation_due(epoch) {
            let started = Instant::now();
            Some((trainer.validate()?, started.elapsed().as_secs_f64()))
        } else {
            None
        };
        trainer.checkpoint(&trained, validation, emit)?;
    }
    let outcome = trainer.finish()?;
    info!(seconds = run_started.elapsed().as_secs_f64(), "training finished");
    Ok(outcome)
}

pub(crate) fn model_err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Model(e.to_string())
}

/// Scales gradients so their global L2 norm is at most `max_norm` (torch.nn.utils.clip_grad_norm_).
pub(crate) fn clip_grad_norm(grads: &[Tensor], max_norm: f64) {
    tch::no_grad(|| {
        let total: f64 = grads
            .iter()
            .map(|g| g.to_kind(Kind::Float).square().sum(Kind::Double).double_value(&[]))
            .sum::<f64>()
            .sqrt();
        let coef = max_norm / (total + 1e-6);
        if coef < 1.0 {
            for g in grads {
                let _ = g.shallow_clone().f_mul_scalar_(coef);
            }
        }
    });
}

/// The network's weights as a MONAI-ordered state dict (for callers that keep a VarStore).
pub fn state_dict(vs: &nn::VarStore, config: &brats_model::SegResNetConfig) -> Result<StateDict, TrainError> {
    weights::state_dict_from_var_store(vs, config).map_err(|e| TrainError::Model(e.to_string()))
}
