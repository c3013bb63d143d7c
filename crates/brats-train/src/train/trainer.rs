//! [`Trainer`]: one rank's training state and the steps [`super::run`] drives.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use brats_core::StoreUri;
use brats_model::SegResNet;
use brats_model::weights;
use tch::{Tensor, nn};
use tracing::info;

use super::{Dataset, RunEnv, TrainError, artifacts, clip_grad_norm, derive_seed, lr_schedule, model_err, validation};
use crate::checkpoint::{self, TrainState};
use crate::data::{self, Augment, DistributedSampler, Loader};
use crate::dist;
use crate::events::{EpochMetrics, EventKind, StepMetrics, TrainOutcome};
use crate::loss::DiceLoss;
use crate::metric::DiceScores;
use crate::optim::{self, Adam, AdamConfig, GradScaler, GradScalerConfig, LrSchedule};
use crate::report::EpochRow;
use crate::spec::{OptimizerKind, TrainConfig};

/// What one epoch's training steps produced (before validation and checkpoints).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochTraining {
    /// The epoch (1-based).
    pub epoch: u32,
    /// Mean loss over the epoch's steps (non-finite AMP steps left out).
    pub train_loss: f64,
    /// The learning rate at the epoch's start, as reported per epoch.
    pub learning_rate: f64,
    /// Seconds spent in the training steps.
    pub train_seconds: f64,
    /// Share of `train_seconds` spent waiting for the loader.
    pub loader_wait_fraction: f64,
    /// Samples trained on over all ranks.
    pub samples: usize,
}

/// One rank's training: the network, optimiser, scaler and loss, the sampler and loaders, and
/// the [`TrainState`] a checkpoint captures.
///
/// The methods are the loop's steps, in the order [`super::run`] calls them: [`Trainer::new`]
/// (seeded initialisation, identical on every rank), [`Trainer::resume`] (the latest checkpoint,
/// the spec's `resume_from` or initial weights, then rank 0's weights broadcast), and per epoch
/// [`Trainer::train_epoch`], [`Trainer::validate`] when [`Trainer::validation_due`], and
/// [`Trainer::checkpoint`]; then [`Trainer::finish`]. Every rank calls every step: they hold
/// collectives.
pub struct Trainer<'a> {
    config: &'a TrainConfig,
    dataset: &'a Dataset,
    env: &'a RunEnv,
    rank: usize,
    world: usize,
    lead: bool,
    device: tch::Device,
    amp: bool,
    vs: nn::VarStore,
    net: SegResNet,
    params: Vec<(String, Tensor)>,
    optimizer: Adam,
    scaler: GradScaler,
    loss_fn: DiceLoss,
    state: TrainState,
    sampler: DistributedSampler,
    steps_per_epoch: usize,
    schedule: LrSchedule,
    augment: Augment,
    val_cases: Vec<usize>,
    val_shard: Vec<usize>,
    /// The next epoch's loader, started while this epoch validates and checkpoints (its samples
    /// depend on the epoch and index only), so an epoch does not start with the loader reading
    /// its first case.
    next_loader: Option<Loader>,
    epoch_seconds: Vec<f64>,
}

impl<'a> Trainer<'a> {
    /// Checks the data and builds the network (seeded, so identical on every rank), optimiser,
    /// scaler, loss and sampler for `config` on `env`'s device. Nothing is read yet.
    pub fn new(config: &'a TrainConfig, dataset: &'a Dataset, env: &'a RunEnv) -> Result<Self, TrainError> {
        let rank = env.rank();
        let world = env.world_size();
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

        // Network, identical on every rank: seeded init (rank 0's weights are broadcast in
        // `resume`).
        tch::manual_seed(derive_seed(config.seed, &[1]) as i64);
        let vs = nn::VarStore::new(device);
        let net = SegResNet::new(&vs.root(), &config.model).map_err(|e| TrainError::Model(e.to_string()))?;
        let names: Vec<String> = config.model.parameters().into_iter().map(|p| p.name).collect();
        let vars = vs.variables();
        let params: Vec<(String, Tensor)> = names.iter().map(|n| (n.clone(), vars[n].shallow_clone())).collect();
        let optimizer = Adam::new(
            params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(),
            match config.optimizer {
                OptimizerKind::Adam => AdamConfig::adam(config.weight_decay),
                OptimizerKind::AdamW => AdamConfig::adamw(config.weight_decay),
            },
        )
        .map_err(model_err)?;
        let scaler =
            if amp { GradScaler::new(GradScalerConfig::default()).map_err(model_err)? } else { GradScaler::disabled() };
        let loss_fn = DiceLoss {
            smooth_nr: config.loss.smooth_nr,
            smooth_dr: config.loss.smooth_dr,
            squared_pred: config.loss.squared_pred,
            sigmoid: config.loss.sigmoid,
            include_background: true,
            batch: false,
        };
        let state = TrainState {
            epoch: 0,
            global_step: 0,
            optimizer: serde_json::Value::Null,
            scaler: serde_json::Value::Null,
            best: None,
            best_epoch: 0,
            history: Vec::new(),
            seed: config.seed,
        };

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
        Ok(Trainer {
            config,
            dataset,
            env,
            rank,
            world,
            lead: rank == 0,
            device,
            amp,
            vs,
            net,
            params,
            optimizer,
            scaler,
            loss_fn,
            state,
            sampler,
            steps_per_epoch,
            schedule,
            augment,
            val_cases,
            val_shard,
            next_loader: None,
            epoch_seconds: Vec::new(),
        })
    }

    /// Restores what a run continues from — the job's own latest checkpoint first, then the
    /// spec's `resume_from`, then `init_weights_uri` — and broadcasts rank 0's weights so every
    /// replica starts identical. `emit` hears where it resumed (rank 0).
    pub fn resume(&mut self, emit: &mut dyn FnMut(EventKind)) -> Result<(), TrainError> {
        let (config, env) = (self.config, self.env);
        let latest_uri = env.checkpoints.join("latest.safetensors");
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
            weights::load_into_var_store(&self.vs, &config.model, &ck.weights)
                .map_err(|e| TrainError::Model(e.to_string()))?;
            let adam_state: optim::AdamState = serde_json::from_value(ck.state.optimizer.clone())
                .map_err(|e| TrainError::Model(format!("optimiser state in {name}: {e}")))?;
            let tensors: Vec<(String, Tensor)> = ck
                .optimizer_tensors
                .into_iter()
                .map(|(n, t)| (format!("{}{n}", checkpoint::OPTIM_PREFIX), t))
                .collect();
            self.optimizer.load_state(&adam_state, &tensors).map_err(model_err)?;
            if self.amp && !ck.state.scaler.is_null() {
                let s: optim::GradScalerState = serde_json::from_value(ck.state.scaler.clone())
                    .map_err(|e| TrainError::Model(format!("scaler state in {name}: {e}")))?;
                self.scaler.load_state(&s).map_err(model_err)?;
            }
            self.state = ck.state;
            self.state.seed = config.seed;
            if self.lead {
                emit(EventKind::info(format!(
                    "resumed from {name} after epoch {} (global step {})",
                    self.state.epoch, self.state.global_step
                )));
            }
        } else if let Some(w) = &config.init_weights_uri {
            let uri = StoreUri::parse(w)?;
            let bytes =
                env.get(&uri)?.ok_or_else(|| TrainError::Data(format!("init_weights_uri {w} does not exist")))?;
            let loaded = weights::load_weights_from_bytes(&bytes, w).map_err(|e| TrainError::Model(e.to_string()))?;
            weights::load_into_var_store(&self.vs, &config.model, &loaded.tensors)
                .map_err(|e| TrainError::Model(e.to_string()))?;
        }
        if let Some(g) = &env.group {
            g.broadcast(&self.trainable(), 0)?;
        }
        Ok(())
    }

    /// The first epoch still to train (1 after a fresh start).
    pub fn first_epoch(&self) -> u32 {
        self.state.epoch + 1
    }

    /// What a checkpoint of this run holds so far.
    pub fn state(&self) -> &TrainState {
        &self.state
    }

    fn trainable(&self) -> Vec<Tensor> {
        self.params.iter().map(|(_, t)| t.shallow_clone()).collect()
    }

    fn start_loader(&self, epoch: u32) -> Result<Loader, TrainError> {
        let config = self.config;
        let indices: Vec<usize> =
            self.sampler.indices(epoch as u64).into_iter().take(self.steps_per_epoch * config.batch_size).collect();
        Loader::start(
            self.dataset.train.clone(),
            indices,
            config.batch_size,
            self.augment,
            config.seed,
            epoch as u64,
            config.loader_workers(),
            2 * config.loader_workers(),
        )
        .map_err(|e| TrainError::Data(e.to_string()))
    }

    /// Trains one epoch: every step's gradients averaged over the ranks, a step event per step
    /// (rank 0), `cancel` polled (and agreed on by all ranks) at every step boundary. The next
    /// epoch's loader starts before this returns.
    pub fn train_epoch(
        &mut self,
        epoch: u32,
        emit: &mut dyn FnMut(EventKind),
        cancel: &AtomicBool,
    ) -> Result<EpochTraining, TrainError> {
        let (config, env, world) = (self.config, self.env, self.world);
        let steps_per_epoch = self.steps_per_epoch;
        // The epoch's rate as reported (per epoch); a step schedule moves within the epoch.
        let epoch_lr = self.schedule.lr_at(epoch as u64 - 1, self.state.global_step);
        tch::manual_seed(derive_seed(config.seed, &[2, epoch as u64, self.rank as u64]) as i64);
        let mut loader = match self.next_loader.take() {
            Some(loader) => loader,
            None => self.start_loader(epoch)?,
        };
        let trainable = self.trainable();
        let epoch_started = Instant::now();
        let mut loss_sum = 0.0;
        let mut samples = 0usize;
        let mut step_in_epoch = 0usize;
        let mut recent = Instant::now();
        let mut recent_samples = 0usize;
        for batch in loader.by_ref() {
            let batch = batch.map_err(|e| TrainError::Data(e.to_string()))?;
            step_in_epoch += 1;
            let lr = self.schedule.lr_at(epoch as u64 - 1, self.state.global_step);
            let image = batch.image.to_device(self.device);
            let label = batch.label.to_device(self.device);
            let logits = tch::autocast(self.amp, || self.net.forward(&image, true));
            let loss = self.loss_fn.forward(&logits, &label);
            self.optimizer.zero_grad();
            self.scaler.scale(&loss).backward();
            if let Some(g) = &env.group {
                dist::average_gradients(g, &trainable)?;
            }
            let grads: Vec<Tensor> = trainable.iter().map(|t| t.grad()).filter(|g| g.defined()).collect();
            self.scaler.unscale_(&grads).map_err(model_err)?;
            if self.scaler.should_step().map_err(model_err)? {
                if let Some(max_norm) = config.grad_clip_norm {
                    clip_grad_norm(&grads, max_norm);
                }
                self.optimizer.step(lr);
            }
            self.scaler.update().map_err(model_err)?;
            let mut local = [loss.double_value(&[]), if cancel.load(Ordering::Relaxed) { 1.0 } else { 0.0 }];
            if let Some(g) = &env.group {
                g.all_reduce_sum_f64(&mut local)?;
                local[0] /= world as f64;
            }
            let step_loss = local[0];
            if !step_loss.is_finite() && !self.amp {
                return Err(TrainError::Diverged { epoch, step: step_in_epoch });
            }
            self.state.global_step += 1;
            let n = batch.indices.len() * world;
            samples += n;
            recent_samples += n;
            if step_loss.is_finite() {
                loss_sum += step_loss;
            }
            if self.lead {
                let elapsed = recent.elapsed().as_secs_f64();
                let sps = recent_samples as f64 / elapsed.max(1e-9);
                let remaining_steps =
                    (config.epochs - epoch) as usize * steps_per_epoch + (steps_per_epoch - step_in_epoch);
                let eta = remaining_steps as f64 * (config.batch_size * world) as f64 / sps.max(1e-9);
                emit(EventKind::Step(StepMetrics {
                    epoch,
                    step: step_in_epoch as u32,
                    steps_per_epoch: steps_per_epoch as u32,
                    global_step: self.state.global_step,
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
            self.next_loader = Some(self.start_loader(epoch + 1)?);
        }
        Ok(EpochTraining {
            epoch,
            train_loss: loss_sum / step_in_epoch.max(1) as f64,
            learning_rate: epoch_lr,
            train_seconds,
            loader_wait_fraction,
            samples,
        })
    }

    /// Whether `epoch` validates: every `interval_epochs` and at the last epoch, when there
    /// are validation cases.
    pub fn validation_due(&self, epoch: u32) -> bool {
        !self.val_cases.is_empty()
            && (epoch.is_multiple_of(self.config.validation.interval_epochs) || epoch == self.config.epochs)
    }

    /// Validation Dice of this rank's shard of the validation cases (sliding window), summed
    /// over the ranks.
    pub fn validate(&self) -> Result<DiceScores, TrainError> {
        validation::validate(&self.net, &self.dataset.validation, &self.val_shard, self.config, self.env)
    }

    /// Ends an epoch: records it (best Dice, history), and on rank 0 writes `best.safetensors`
    /// when the Dice improved (first, so a crash between the two never loses the best), the
    /// latest checkpoint when due, and the epoch's events. `validation` is the epoch's Dice and
    /// the seconds it took, when it validated.
    pub fn checkpoint(
        &mut self,
        trained: &EpochTraining,
        validation: Option<(DiceScores, f64)>,
        emit: &mut dyn FnMut(EventKind),
    ) -> Result<(), TrainError> {
        let (config, env) = (self.config, self.env);
        let EpochTraining { epoch, train_loss, learning_rate: epoch_lr, train_seconds, loader_wait_fraction, samples } =
            *trained;
        let scores = validation.map(|(d, _)| d);
        let validation_seconds = validation.map_or(0.0, |(_, s)| s);
        let state = &mut self.state;
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
        self.epoch_seconds.push(train_seconds + validation_seconds);
        let mean_epoch = self.epoch_seconds.iter().sum::<f64>() / self.epoch_seconds.len() as f64;
        let eta_seconds = mean_epoch * (config.epochs - epoch) as f64;
        info!(epoch, train_loss, lr = epoch_lr, dice = ?scores, train_seconds, validation_seconds, "epoch done");

        if !self.lead {
            return Ok(());
        }
        let latest_uri = env.checkpoints.join("latest.safetensors");
        let best_uri = env.checkpoints.join("best.safetensors");
        let sd = weights::state_dict_from_var_store(&self.vs, &config.model)
            .map_err(|e| TrainError::Model(e.to_string()))?;
        if is_best {
            let provenance = artifacts::provenance(config, env, state);
            let bytes = weights::weights_to_safetensors(&sd, &config.model, Some(&provenance))
                .map_err(|e| TrainError::Model(e.to_string()))?;
            let sha = brats_model::metadata::sha256_hex(&bytes);
            env.put(&best_uri, bytes)?;
            emit(EventKind::Checkpoint { epoch, uri: best_uri.to_string(), best: true, sha256: sha });
        }
        if epoch % config.checkpoint_interval_epochs == 0 || epoch == config.epochs {
            state.optimizer = serde_json::to_value(self.optimizer.state()).expect("optimiser state serialises");
            state.scaler = serde_json::to_value(self.scaler.state()).expect("scaler state serialises");
            let tensors: Vec<(String, Tensor)> = self
                .optimizer
                .state_tensors()
                .into_iter()
                .map(|(n, t)| (n.strip_prefix(checkpoint::OPTIM_PREFIX).unwrap_or(&n).to_string(), t))
                .collect();
            let bytes = checkpoint::to_bytes(&config.model, &sd, &tensors, state)?;
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
        Ok(())
    }

    /// Ends the run once every rank is here: rank 0 exports the best weights (or the final ones
    /// when nothing was validated) and writes the artefacts; every rank returns the outcome.
    pub fn finish(self) -> Result<TrainOutcome, TrainError> {
        if let Some(g) = &self.env.group {
            g.barrier()?;
        }
        if self.lead {
            artifacts::write_artifacts(self.config, self.env, &self.vs, &self.state)
        } else {
            Ok(artifacts::outcome_of(self.env, &self.state))
        }
    }
}
