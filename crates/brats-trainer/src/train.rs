//! The training loop: the bundle's recipe (SegResNet, DiceLoss, Adam, cosine LR, random crops
//! with flips and intensity jitter, sliding-window validation with MeanDice), data-parallel over
//! ranks, checkpointed every epoch, exported to ONNX at the end.
//!
//! One function, [`run`], serves the offline CLI (one process), every rank of a service job and
//! every rank of a torchrun-style multi-node launch. Only rank 0 writes checkpoints, artefacts
//! and events; all ranks agree on every decision (stop, skip a step) through the process group.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use brats_core::{StoreUri, Stores};
use brats_model::onnx::{ExportOptions, GroupNormLowering, Precision};
use brats_model::weights;
use brats_model::{SegResNet, StateDict};
use tch::{Kind, Tensor, nn};
use tracing::{info, info_span, warn};

use crate::checkpoint::{self, TrainState};
use crate::data::{self, Augment, Cases, DistributedSampler, Loader};
use crate::dist::{self, ProcessGroup};
use crate::events::{EpochMetrics, EventKind, StepMetrics, TrainOutcome};
use crate::loss::DiceLoss;
use crate::metric::{DiceAccumulator, DiceScores};
use crate::optim::{
    self, Adam, AdamConfig, CosineSchedule, GradScaler, GradScalerConfig, LrSchedule, WarmupCosineSchedule,
};
use crate::plot::{self, EpochRow};
use crate::spec::{Device, OptimizerKind, Schedule, TrainConfig};

/// Why training stopped early.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Cancellation was requested (stdin closed, a signal, or a peer rank's request).
    #[error("cancelled at a step boundary")]
    Cancelled,
    /// Data that cannot be trained on.
    #[error("data: {0}")]
    Data(String),
    /// The object store failed.
    #[error("store: {0}")]
    Store(#[from] brats_core::CoreError),
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
}

impl RunEnv {
    fn rank(&self) -> usize {
        self.group.as_ref().map(|g| g.rank()).unwrap_or(0)
    }

    fn world_size(&self) -> usize {
        self.group.as_ref().map(|g| g.world_size()).unwrap_or(1)
    }

    fn get(&self, uri: &StoreUri) -> Result<Option<bytes::Bytes>, TrainError> {
        match self.runtime.block_on(self.stores.get(uri)) {
            Ok(b) => Ok(Some(b)),
            Err(brats_core::CoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn put(&self, uri: &StoreUri, bytes: Vec<u8>) -> Result<(), TrainError> {
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
fn lr_schedule(config: &TrainConfig, steps_per_epoch: usize) -> LrSchedule {
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
fn derive_seed(seed: u64, parts: &[u64]) -> u64 {
    let mut x = seed;
    for &p in parts {
        x = data::sample_seed(x, p, 0x5eed);
    }
    x
}

/// Validation Dice of `cases` (this rank's shard), reduced over ranks.
fn validate(
    net: &SegResNet,
    cases: &Cases,
    shard: &[usize],
    config: &TrainConfig,
    env: &RunEnv,
) -> Result<DiceScores, TrainError> {
    let device = env.device.to_tch();
    let amp = config.amp && device.is_cuda();
    let window = brats_artifacts::window::SlidingWindow {
        roi: config.validation.roi,
        overlap: config.validation.overlap,
        blend: if config.validation.gaussian {
            brats_artifacts::window::Blend::Gaussian
        } else {
            brats_artifacts::window::Blend::Constant
        },
        mirror: false,
    };
    let mut acc = DiceAccumulator::default();
    // The next case is read (from the store, when streamed) while this one is inferred.
    std::thread::scope(|scope| -> Result<(), TrainError> {
        let (ready, next_case) = std::sync::mpsc::sync_channel(1);
        scope.spawn(move || {
            for &i in shard {
                // A send fails once the consumer gave up on an error: stop reading.
                if ready.send(cases.get(i)).is_err() {
                    break;
                }
            }
        });
        for case in next_case {
            let case = case.map_err(|e| TrainError::Data(format!("validation: {e}")))?;
            let label = case
                .label
                .as_ref()
                .ok_or_else(|| TrainError::Data(format!("validation case {} has no label", case.id)))?;
            let logits = brats_artifacts::window::infer(&case.image, 4, case.shape, 3, &window, |win, roi| {
                let x = Tensor::from_slice(win)
                    .reshape([1, 4, roi[0] as i64, roi[1] as i64, roi[2] as i64])
                    .to_device(device);
                let y = tch::no_grad(|| tch::autocast(amp, || net.forward(&x, false)));
                let y = y.to_kind(Kind::Float).to_device(tch::Device::Cpu).contiguous();
                Vec::<f32>::try_from(y.flatten(0, -1)).map_err(TrainError::from)
            })?;
            let [x, y, z] = case.shape.map(|d| d as i64);
            let logits = Tensor::from_slice(&logits).reshape([1, 3, x, y, z]);
            let label = Tensor::from_slice(label.as_slice()).reshape([1, 3, x, y, z]).to_kind(Kind::Float);
            acc.add(&logits, &label).map_err(|e| TrainError::Data(format!("validation case {}: {e}", case.id)))?;
        }
        Ok(())
    })?;
    if let Some(g) = &env.group {
        let mut stats = acc.to_stats();
        g.all_reduce_sum_f64(&mut stats)?;
        acc = DiceAccumulator::from_stats(&stats).map_err(|e| TrainError::Data(e.to_string()))?;
    }
    Ok(acc.finish())
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
    let rank = env.rank();
    let world = env.world_size();
    let lead = rank == 0;
    let device = env.device.to_tch();
    let amp = config.amp && device.is_cuda();
    if dataset.train.is_empty() {
        return Err(TrainError::Data("the training section has no cases".into()));
    }
    let all_train: Vec<usize> = (0..dataset.train.len()).collect();
    let all_validation: Vec<usize> = (0..dataset.validation.len()).collect();
    for (cases, all) in [(&dataset.train, &all_train), (&dataset.validation, &all_validation)] {
        cases.check_for_training(all).map_err(|e| TrainError::Data(e.to_string()))?;
    }

    // Network, identical on every rank: seeded init, then rank 0's weights broadcast.
    tch::manual_seed(derive_seed(config.seed, &[1]) as i64);
    let vs = nn::VarStore::new(device);
    let net = SegResNet::new(&vs.root(), &config.model).map_err(|e| TrainError::Model(e.to_string()))?;
    let names: Vec<String> = config.model.parameters().into_iter().map(|p| p.name).collect();
    let vars = vs.variables();
    let params: Vec<(String, Tensor)> = names.iter().map(|n| (n.clone(), vars[n].shallow_clone())).collect();
    let mut optimizer = Adam::new(
        params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(),
        match config.optimizer {
            OptimizerKind::Adam => AdamConfig::adam(config.weight_decay),
            OptimizerKind::AdamW => AdamConfig::adamw(config.weight_decay),
        },
    )
    .map_err(model_err)?;
    let mut scaler =
        if amp { GradScaler::new(GradScalerConfig::default()).map_err(model_err)? } else { GradScaler::disabled() };
    let loss_fn = DiceLoss {
        smooth_nr: config.loss.smooth_nr,
        smooth_dr: config.loss.smooth_dr,
        squared_pred: config.loss.squared_pred,
        sigmoid: config.loss.sigmoid,
        include_background: true,
        batch: false,
    };

    // Resume: our own latest checkpoint first, then the spec's resume_from, then init weights.
    let latest_uri = env.checkpoints.join("latest.safetensors");
    let best_uri = env.checkpoints.join("best.safetensors");
    let mut state = TrainState {
        epoch: 0,
        global_step: 0,
        optimizer: serde_json::Value::Null,
        scaler: serde_json::Value::Null,
        best: None,
        best_epoch: 0,
        history: Vec::new(),
        seed: config.seed,
    };
    let resume_bytes = match env.get(&latest_uri)? {
        Some(b) => Some((b, latest_uri.to_string())),
        None => match &env.resume_from {
            Some(u) => Some((
                env.get(u)?.ok_or_else(|| TrainError::Data(format!("resume_from {u} does not exist")))?,
                u.to_string(),
            )),
            None => None,
        },
    };
    if let Some((bytes, name)) = resume_bytes {
        let ck = checkpoint::from_bytes(&bytes, &name)?;
        if ck.config != config.model {
            return Err(TrainError::Model(format!(
                "checkpoint {name} is for a different network ({:?}); the job's is {:?}",
                ck.config, config.model
            )));
        }
        weights::load_into_var_store(&vs, &config.model, &ck.weights).map_err(|e| TrainError::Model(e.to_string()))?;
        let adam_state: optim::AdamState = serde_json::from_value(ck.state.optimizer.clone())
            .map_err(|e| TrainError::Model(format!("optimiser state in {name}: {e}")))?;
        let tensors: Vec<(String, Tensor)> =
            ck.optimizer_tensors.into_iter().map(|(n, t)| (format!("{}{n}", checkpoint::OPTIM_PREFIX), t)).collect();
        optimizer.load_state(&adam_state, &tensors).map_err(model_err)?;
        if amp && !ck.state.scaler.is_null() {
            let s: optim::GradScalerState = serde_json::from_value(ck.state.scaler.clone())
                .map_err(|e| TrainError::Model(format!("scaler state in {name}: {e}")))?;
            scaler.load_state(&s).map_err(model_err)?;
        }
        state = ck.state;
        state.seed = config.seed;
        if lead {
            emit(EventKind::info(format!(
                "resumed from {name} after epoch {} (global step {})",
                state.epoch, state.global_step
            )));
        }
    } else if let Some(w) = &config.init_weights_uri {
        let uri = StoreUri::parse(w)?;
        let bytes = env.get(&uri)?.ok_or_else(|| TrainError::Data(format!("init_weights_uri {w} does not exist")))?;
        let loaded = weights::load_weights_from_bytes(&bytes, w).map_err(|e| TrainError::Model(e.to_string()))?;
        weights::load_into_var_store(&vs, &config.model, &loaded.tensors)
            .map_err(|e| TrainError::Model(e.to_string()))?;
    }
    if let Some(g) = &env.group {
        let tensors: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
        g.broadcast(&tensors, 0)?;
    }

    let sampler = DistributedSampler::new(dataset.train.len(), world, rank, true, config.seed)
        .map_err(|e| TrainError::Data(e.to_string()))?;
    let per_rank = sampler.num_samples();
    let mut steps_per_epoch = per_rank.div_ceil(config.batch_size);
    if config.data.max_steps_per_epoch > 0 {
        steps_per_epoch = steps_per_epoch.min(config.data.max_steps_per_epoch);
    }
    let schedule = lr_schedule(config, steps_per_epoch);
    let augment = Augment {
        crop: config.data.crop,
        random_crop: config.data.random_crop,
        flip_prob: config.data.flip_prob,
        intensity_scale: config.data.intensity_scale,
        intensity_shift: config.data.intensity_shift,
    };
    let mut val_cases: Vec<usize> = (0..dataset.validation.len()).collect();
    if config.validation.max_cases > 0 {
        val_cases.truncate(config.validation.max_cases);
    }
    let val_shard: Vec<usize> =
        data::validation_shard(val_cases.len(), world, rank).into_iter().map(|i| val_cases[i]).collect();
    let trainable: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
    let run_started = Instant::now();
    let first_epoch = state.epoch + 1;
    let mut epoch_seconds: Vec<f64> = Vec::new();
    let start_loader = |epoch: u32| {
        let indices: Vec<usize> =
            sampler.indices(epoch as u64).into_iter().take(steps_per_epoch * config.batch_size).collect();
        Loader::start(
            dataset.train.clone(),
            indices,
            config.batch_size,
            augment,
            config.seed,
            epoch as u64,
            config.loader_workers(),
            2 * config.loader_workers(),
        )
        .map_err(|e| TrainError::Data(e.to_string()))
    };
    // The next epoch's first batches are built while this epoch validates and checkpoints (its
    // samples depend on the epoch and index only), so an epoch does not start with the loader
    // reading its first case.
    let mut next_loader: Option<Loader> = None;

    for epoch in first_epoch..=config.epochs {
        let span = info_span!("epoch", epoch, rank);
        let _enter = span.enter();
        // The epoch's rate as reported (per epoch); a step schedule moves within the epoch.
        let epoch_lr = schedule.lr_at(epoch as u64 - 1, state.global_step);
        tch::manual_seed(derive_seed(config.seed, &[2, epoch as u64, rank as u64]) as i64);
        let mut loader = match next_loader.take() {
            Some(loader) => loader,
            None => start_loader(epoch)?,
        };
        let epoch_started = Instant::now();
        let mut loss_sum = 0.0;
        let mut samples = 0usize;
        let mut step_in_epoch = 0usize;
        let mut recent = Instant::now();
        let mut recent_samples = 0usize;
        for batch in loader.by_ref() {
            let batch = batch.map_err(|e| TrainError::Data(e.to_string()))?;
            step_in_epoch += 1;
            let lr = schedule.lr_at(epoch as u64 - 1, state.global_step);
            let image = batch.image.to_device(device);
            let label = batch.label.to_device(device);
            let logits = tch::autocast(amp, || net.forward(&image, true));
            let loss = loss_fn.forward(&logits, &label);
            optimizer.zero_grad();
            scaler.scale(&loss).backward();
            if let Some(g) = &env.group {
                dist::average_gradients(g, &trainable)?;
            }
            let grads: Vec<Tensor> = trainable.iter().map(|t| t.grad()).filter(|g| g.defined()).collect();
            scaler.unscale_(&grads).map_err(model_err)?;
            if scaler.should_step().map_err(model_err)? {
                if let Some(max_norm) = config.grad_clip_norm {
                    clip_grad_norm(&grads, max_norm);
                }
                optimizer.step(lr);
            }
            scaler.update().map_err(model_err)?;
            let mut local = [loss.double_value(&[]), if cancel.load(Ordering::Relaxed) { 1.0 } else { 0.0 }];
            if let Some(g) = &env.group {
                g.all_reduce_sum_f64(&mut local)?;
                local[0] /= world as f64;
            }
            let step_loss = local[0];
            if !step_loss.is_finite() && !amp {
                return Err(TrainError::Diverged { epoch, step: step_in_epoch });
            }
            state.global_step += 1;
            let n = batch.indices.len() * world;
            samples += n;
            recent_samples += n;
            if step_loss.is_finite() {
                loss_sum += step_loss;
            }
            if lead {
                let elapsed = recent.elapsed().as_secs_f64();
                let sps = recent_samples as f64 / elapsed.max(1e-9);
                let remaining_steps =
                    (config.epochs - epoch) as usize * steps_per_epoch + (steps_per_epoch - step_in_epoch);
                let eta = remaining_steps as f64 * (config.batch_size * world) as f64 / sps.max(1e-9);
                emit(EventKind::Step(StepMetrics {
                    epoch,
                    step: step_in_epoch as u32,
                    steps_per_epoch: steps_per_epoch as u32,
                    global_step: state.global_step,
                    loss: step_loss,
                    learning_rate: lr,
                    samples_per_second: sps,
                    eta_seconds: eta,
                }));
                if elapsed > 10.0 {
                    recent = Instant::now();
                    recent_samples = 0;
                }
            }
            if local[1] > 0.0 {
                return Err(TrainError::Cancelled);
            }
        }
        let train_seconds = epoch_started.elapsed().as_secs_f64();
        let loader_wait_fraction = (loader.wait_seconds() / train_seconds.max(1e-9)).clamp(0.0, 1.0);
        drop(loader);
        if epoch < config.epochs {
            next_loader = Some(start_loader(epoch + 1)?);
        }
        let train_loss = loss_sum / step_in_epoch.max(1) as f64;

        // Validation.
        let validate_now =
            !val_cases.is_empty() && (epoch % config.validation.interval_epochs == 0 || epoch == config.epochs);
        let val_started = Instant::now();
        let scores =
            if validate_now { Some(validate(&net, &dataset.validation, &val_shard, config, env)?) } else { None };
        let validation_seconds = if validate_now { val_started.elapsed().as_secs_f64() } else { 0.0 };
        let is_best = scores.is_some() && checkpoint::score(scores.as_ref()) > checkpoint::score(state.best.as_ref());
        if is_best {
            state.best = scores;
            state.best_epoch = epoch;
        }
        state.epoch = epoch;
        state.history.push(EpochRow {
            epoch,
            train_loss,
            learning_rate: epoch_lr,
            dice: scores.map(|d| [d.tc, d.wt, d.et, d.mean]),
            seconds: train_seconds + validation_seconds,
        });
        epoch_seconds.push(train_seconds + validation_seconds);
        let mean_epoch = epoch_seconds.iter().sum::<f64>() / epoch_seconds.len() as f64;
        let eta_seconds = mean_epoch * (config.epochs - epoch) as f64;
        info!(epoch, train_loss, lr = epoch_lr, dice = ?scores, train_seconds, validation_seconds, "epoch done");

        // Checkpoints (rank 0). Best first, so a crash between the two never loses the best.
        if lead {
            let sd =
                weights::state_dict_from_var_store(&vs, &config.model).map_err(|e| TrainError::Model(e.to_string()))?;
            if is_best {
                let provenance = provenance(config, env, &state);
                let bytes = weights::weights_to_safetensors(&sd, &config.model, Some(&provenance))
                    .map_err(|e| TrainError::Model(e.to_string()))?;
                let sha = brats_model::metadata::sha256_hex(&bytes);
                env.put(&best_uri, bytes)?;
                emit(EventKind::Checkpoint { epoch, uri: best_uri.to_string(), best: true, sha256: sha });
            }
            if epoch % config.checkpoint_interval_epochs == 0 || epoch == config.epochs {
                state.optimizer = serde_json::to_value(optimizer.state()).expect("optimiser state serialises");
                state.scaler = serde_json::to_value(scaler.state()).expect("scaler state serialises");
                let tensors: Vec<(String, Tensor)> = optimizer
                    .state_tensors()
                    .into_iter()
                    .map(|(n, t)| (n.strip_prefix(checkpoint::OPTIM_PREFIX).unwrap_or(&n).to_string(), t))
                    .collect();
                let bytes = checkpoint::to_bytes(&config.model, &sd, &tensors, &state)?;
                let sha = brats_model::metadata::sha256_hex(&bytes);
                env.put(&latest_uri, bytes)?;
                emit(EventKind::Checkpoint { epoch, uri: latest_uri.to_string(), best: false, sha256: sha });
            }
            emit(EventKind::Epoch(EpochMetrics {
                epoch,
                train_loss,
                learning_rate: epoch_lr,
                validation: scores,
                is_best,
                train_seconds,
                validation_seconds,
                samples_per_second: samples as f64 / train_seconds.max(1e-9),
                eta_seconds,
                loader_wait_fraction,
            }));
        }
    }
    if let Some(g) = &env.group {
        g.barrier()?;
    }
    let outcome = if lead { finish(config, env, &vs, &state)? } else { outcome_of(env, &state) };
    info!(seconds = run_started.elapsed().as_secs_f64(), "training finished");
    Ok(outcome)
}

fn model_err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Model(e.to_string())
}

/// Scales gradients so their global L2 norm is at most `max_norm` (torch.nn.utils.clip_grad_norm_).
fn clip_grad_norm(grads: &[Tensor], max_norm: f64) {
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

fn provenance(config: &TrainConfig, env: &RunEnv, state: &TrainState) -> serde_json::Value {
    serde_json::json!({
        "trained": true,
        "run": env.run_name,
        "epoch": state.best_epoch.max(state.epoch.min(1)),
        "epochs": config.epochs,
        "best_epoch": state.best_epoch,
        "validation_dice": state.best,
        "seed": config.seed,
        "datalist": config.datalist_uri,
        "recipe": {
            "optimizer": config.optimizer, "learning_rate": config.learning_rate,
            "weight_decay": config.weight_decay, "schedule": config.schedule, "loss": config.loss,
            "crop": config.data.crop, "batch_size": config.batch_size, "amp": config.amp,
            "devices": config.devices.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
        },
        "labels": config.labels,
        "label_convention": config.data.label_convention,
        "pipeline_version": brats_preprocess::pipeline::PIPELINE_VERSION,
    })
}

fn outcome_of(env: &RunEnv, state: &TrainState) -> TrainOutcome {
    TrainOutcome {
        epochs: state.epoch,
        global_step: state.global_step,
        best_metrics: state.best,
        best_epoch: state.best_epoch,
        onnx_uri: env.artifacts.join("model.onnx").to_string(),
        metadata_uri: env.artifacts.join("metadata.json").to_string(),
    }
}

/// Exports the best weights (or the final ones when nothing was validated) and writes the
/// artefacts: best.safetensors, model.onnx, metadata.json, metrics.csv, curves.png.
fn finish(
    config: &TrainConfig,
    env: &RunEnv,
    vs: &nn::VarStore,
    state: &TrainState,
) -> Result<TrainOutcome, TrainError> {
    let model_err = |e: &dyn std::fmt::Display| TrainError::Model(e.to_string());
    let best_uri = env.checkpoints.join("best.safetensors");
    let weights_bytes = match env.get(&best_uri)? {
        Some(b) if state.best.is_some() => b.to_vec(),
        _ => {
            let sd = weights::state_dict_from_var_store(vs, &config.model).map_err(|e| model_err(&e))?;
            weights::weights_to_safetensors(&sd, &config.model, Some(&provenance(config, env, state)))
                .map_err(|e| model_err(&e))?
        }
    };
    let loaded = weights::load_weights_from_bytes(&weights_bytes, "best weights").map_err(|e| model_err(&e))?;
    let options = ExportOptions { precision: Precision::Fp32, group_norm: GroupNormLowering::StagedMeans };
    let onnx = brats_model::onnx::to_onnx_bytes(&loaded.config, &loaded.tensors, options).map_err(|e| model_err(&e))?;
    let mut metadata = brats_model::metadata::model_metadata(
        &loaded.config,
        options,
        "model.onnx",
        brats_model::metadata::sha256_hex(&onnx),
        brats_model::metadata::WeightsInfo {
            sha256: brats_model::metadata::sha256_hex(&weights_bytes),
            file: Some("best.safetensors".into()),
        },
        loaded.training.clone(),
    );
    // The roi the model was validated with is the one to segment with (small training volumes
    // give small rois; padding a 32³ case to 240×240×160 would change GroupNorm's statistics).
    metadata.postprocessing["sliding_window"]["roi_size"] = serde_json::json!(config.validation.roi);
    metadata.postprocessing["sliding_window"]["overlap"] = serde_json::json!(config.validation.overlap);
    let dir = env.artifacts.clone();
    env.put(&dir.join("best.safetensors"), weights_bytes)?;
    env.put(&dir.join("model.onnx"), onnx)?;
    env.put(&dir.join("metadata.json"), serde_json::to_vec_pretty(&metadata).expect("metadata serialises"))?;
    env.put(&dir.join("metrics.csv"), plot::metrics_csv(&state.history).into_bytes())?;
    match plot::plot_png(&state.history, &format!("SegResNet training - {}", env.run_name)) {
        Ok(png) => env.put(&dir.join("curves.png"), png)?,
        Err(e) => warn!(error = %e, "training curves not plotted"),
    }
    Ok(outcome_of(env, state))
}

/// The network's weights as a MONAI-ordered state dict (for callers that keep a VarStore).
pub fn state_dict(vs: &nn::VarStore, config: &brats_model::SegResNetConfig) -> Result<StateDict, TrainError> {
    weights::state_dict_from_var_store(vs, config).map_err(|e| TrainError::Model(e.to_string()))
}
