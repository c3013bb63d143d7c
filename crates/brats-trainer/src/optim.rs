//! The bundle's optimiser, learning-rate schedule and AMP gradient scaler, numerically as PyTorch
//! 2.11 runs them, with the state a checkpoint needs to resume bit-exactly.
//!
//! - [`Adam`]: `torch.optim.Adam` (L2 weight decay added to the gradient) and `torch.optim.AdamW`
//!   (decoupled decay), the single-tensor algorithm torch uses on CPU, op for op;
//! - [`CosineSchedule`] / [`LrSchedule`]: `CosineAnnealingLR(T_max, eta_min)` stepped once per epoch,
//!   with torch's *recursive* formula (it differs from the closed form by ~1e-20);
//! - [`GradScaler`]: `torch.amp.GradScaler` (dynamic loss scaling for float16 autocast).
//!
//! `tch` 0.24 binds neither the foreach/fused optimiser kernels nor
//! `_amp_foreach_non_finite_check_and_unscale_`, nor `addcdiv_`/`addcmul_`/`add` with a `value` or
//! `alpha` scalar, so each is expressed with per-tensor ATen ops chosen to round exactly like the
//! kernel torch runs (explained where it matters; torch's CPU kernels fuse `v + a·b` into one FMA,
//! which an unfused rewrite misses by an ulp in up to a quarter of the elements). The parity tests find the
//! parameters and both moments bit-identical to torch 2.11's after 5 steps.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use thiserror::Error;

/// Why an optimiser, schedule or scaler could not be built or restored.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum OptimError {
    /// A hyper-parameter is outside the range torch accepts.
    #[error("invalid {name}: {value} ({why})")]
    InvalidHyperParameter {
        /// The parameter's name as torch spells it.
        name: &'static str,
        /// The value given.
        value: f64,
        /// What is allowed.
        why: &'static str,
    },
    /// Two parameters share a name, so their state could not be told apart in a checkpoint.
    #[error("parameter name {0:?} appears twice; optimiser state is keyed by name")]
    DuplicateParameter(String),
    /// Checkpointed optimiser state does not fit the parameters or the optimiser kind.
    #[error("optimiser state does not match this model: {0}")]
    StateMismatch(String),
    /// `GradScaler::unscale_` was called twice without `update` in between (torch raises too).
    #[error("GradScaler: unscale_() was already called since the last update(); call update() after each step")]
    AlreadyUnscaled,
    /// `GradScaler::update` (or `should_step`) without an `unscale_` since the last update.
    #[error("GradScaler: no inf checks were recorded: call unscale_() on the gradients before step/update")]
    NoInfCheck,
    /// Gradients in float16: unscaling them would lose precision (torch refuses as well).
    #[error("GradScaler: attempting to unscale float16 gradients; keep the parameters in float32 under AMP")]
    HalfGradients,
}

// ------------------------------------------------------------------------------------- Adam(W)

/// Hyper-parameters of [`Adam`] other than the learning rate, which each `step` takes (the
/// schedule owns it).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamConfig {
    /// `(beta1, beta2)`, the decay rates of the first and second moment estimates.
    pub betas: (f64, f64),
    /// Added to the bias-corrected `sqrt(v)` (after the square root, as torch does).
    pub eps: f64,
    /// Weight decay factor: L2 (`grad + wd·p`) for Adam, `p·(1 − lr·wd)` for AdamW.
    pub weight_decay: f64,
    /// `true` = AdamW's decoupled weight decay; `false` = Adam's L2 penalty in the gradient.
    pub decoupled_weight_decay: bool,
}

impl AdamConfig {
    /// `torch.optim.Adam(betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)`; the bundle uses wd 1e-5.
    pub fn adam(weight_decay: f64) -> Self {
        Self { betas: (0.9, 0.999), eps: 1e-8, weight_decay, decoupled_weight_decay: false }
    }

    /// `torch.optim.AdamW(betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)` (torch's default wd is 1e-2).
    pub fn adamw(weight_decay: f64) -> Self {
        Self { decoupled_weight_decay: true, ..Self::adam(weight_decay) }
    }

    /// The checks `torch.optim.Adam.__init__` makes.
    fn validate(&self) -> Result<(), OptimError> {
        let bad = |name, value, why| Err(OptimError::InvalidHyperParameter { name, value, why });
        if self.eps.is_nan() || self.eps < 0.0 {
            return bad("eps", self.eps, "must be >= 0");
        }
        if !(0.0..1.0).contains(&self.betas.0) {
            return bad("betas[0]", self.betas.0, "must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&self.betas.1) {
            return bad("betas[1]", self.betas.1, "must be in [0, 1)");
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return bad("weight_decay", self.weight_decay, "must be >= 0");
        }
        Ok(())
    }
}

/// The scalar part of [`Adam`]'s checkpoint: which algorithm, and how many steps each parameter
/// has taken (torch counts per parameter; a parameter without a gradient is not stepped).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamState {
    /// `true` for AdamW; a checkpoint of one cannot resume the other.
    pub decoupled_weight_decay: bool,
    /// Parameter name → steps taken; parameters never stepped are absent (no moments either).
    pub steps: BTreeMap<String, u64>,
}

/// One parameter's moments, created at its first step as torch does lazily.
struct Moments {
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// `torch.optim.Adam` / `torch.optim.AdamW` over named parameters (a VarStore's trainable
/// variables), updating them in place.
///
/// Per parameter with a defined gradient, exactly torch 2.11's `_single_tensor_adam` (its CPU
/// path): `step += 1`; L2: `g = g + wd·p` (AdamW: `p *= 1 − lr·wd`); `m.lerp_(g, 1 − β1)`;
/// `v = v·β2 + (1 − β2)·g·g`; `denom = sqrt(v) / sqrt(1 − β2^t) + eps`;
/// `p += (−lr / (1 − β1^t))·m / denom`. Bias corrections are computed in f64 with the same libm
/// `pow` Python uses. On CUDA torch would default to its foreach kernels, which compute the same
/// formulas (differences of an ulp at most).
pub struct Adam {
    config: AdamConfig,
    params: Vec<(String, Tensor)>,
    moments: Vec<Option<Moments>>,
}

/// Prefix of the first-moment tensors in [`Adam::state_tensors`].
pub const EXP_AVG_PREFIX: &str = "optim.exp_avg.";
/// Prefix of the second-moment tensors in [`Adam::state_tensors`].
pub const EXP_AVG_SQ_PREFIX: &str = "optim.exp_avg_sq.";

impl Adam {
    /// An optimiser over `params` (names must be unique: they key the checkpointed state).
    pub fn new(params: Vec<(String, Tensor)>, config: AdamConfig) -> Result<Self, OptimError> {
        config.validate()?;
        let mut seen = HashSet::new();
        for (name, _) in &params {
            if !seen.insert(name.as_str()) {
                return Err(OptimError::DuplicateParameter(name.clone()));
            }
        }
        let moments = params.iter().map(|_| None).collect();
        Ok(Self { config, params, moments })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamConfig {
        &self.config
    }

    /// The parameters, in the order given to [`Adam::new`].
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// The defined gradients of the parameters (what [`GradScaler::unscale_`] takes).
    pub fn grads(&self) -> Vec<Tensor> {
        self.params.iter().map(|(_, p)| p.grad()).filter(|g| g.defined()).collect()
    }

    /// Zeroes every defined gradient in place: MONAI's `SupervisedTrainer` calls
    /// `zero_grad(set_to_none=False)`, so a parameter keeps a (zero) gradient once it has had one.
    pub fn zero_grad(&mut self) {
        for (_, p) in self.params.iter_mut() {
            p.zero_grad();
        }
    }

    /// One optimisation step at learning rate `lr`; parameters whose gradient is undefined are
    /// skipped (their step count does not advance), as torch skips `grad is None`.
    pub fn step(&mut self, lr: f64) {
        let AdamConfig { betas: (beta1, beta2), eps, weight_decay, decoupled_weight_decay } = self.config;
        tch::no_grad(|| {
            for ((_, param), slot) in self.params.iter_mut().zip(self.moments.iter_mut()) {
                let grad = param.grad();
                if !grad.defined() {
                    continue;
                }
                let m = slot.get_or_insert_with(|| Moments {
                    step: 0,
                    exp_avg: param.zeros_like(),
                    exp_avg_sq: param.zeros_like(),
                });
                m.step += 1;
                let grad = if weight_decay != 0.0 {
                    if decoupled_weight_decay {
                        let _ = param.g_mul_scalar_(1.0 - lr * weight_decay);
                        grad
                    } else {
                        l2_gradient(&grad, param, weight_decay)
                    }
                } else {
                    grad
                };
                let _ = m.exp_avg.lerp_(&grad, 1.0 - beta1);
                // exp_avg_sq.mul_(β2).addcmul_(g, g, value=1 − β2): torch's kernel computes
                // `fma(value·g, g, v)` (the compiler contracts `v + value·g·g`, vector and scalar
                // loops alike). tch's addcmul_ has value 1, and `addcmul_(value·g, g)` is then
                // `fma(1·(value·g), g, v)`: the same single rounding.
                let _ = m.exp_avg_sq.g_mul_scalar_(beta2);
                let _ = m.exp_avg_sq.addcmul_(&grad.g_mul_scalar(1.0 - beta2), &grad);

                let step = m.step as f64;
                let bias_correction1 = 1.0 - beta1.powf(step);
                let bias_correction2 = 1.0 - beta2.powf(step);
                let step_size = lr / bias_correction1;
                // Python's `bias_correction2 ** 0.5` is libm pow, not sqrt.
                let bias_correction2_sqrt = bias_correction2.powf(0.5);
                let mut denom = m.exp_avg_sq.sqrt() / bias_correction2_sqrt;
                let _ = denom.g_add_scalar_(eps);
                // param.addcdiv_(m, denom, value=−step_size): the kernel evaluates
                // `p + ((value·m) / denom)` (no FMA: a division sits between); in place where
                // possible to spare allocations.
                let mut update = m.exp_avg.g_mul_scalar(-step_size);
                let _ = update.g_div_(&denom);
                let _ = param.g_add_(&update);
            }
        });
    }

    /// Steps taken by the parameter that has stepped most (0 before the first step).
    pub fn max_step(&self) -> u64 {
        self.moments.iter().flatten().map(|m| m.step).max().unwrap_or(0)
    }

    /// The scalar state for a checkpoint (goes with [`Adam::state_tensors`]).
    pub fn state(&self) -> AdamState {
        let steps = self
            .params
            .iter()
            .zip(&self.moments)
            .filter_map(|((name, _), m)| m.as_ref().map(|m| (name.clone(), m.step)))
            .collect();
        AdamState { decoupled_weight_decay: self.config.decoupled_weight_decay, steps }
    }

    /// The moment tensors for a checkpoint, `optim.exp_avg.<param>` and `optim.exp_avg_sq.<param>`
    /// for every parameter that has stepped (shallow handles: copy them before the next step if
    /// they are written asynchronously).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for ((name, _), m) in self.params.iter().zip(&self.moments) {
            if let Some(m) = m {
                out.push((format!("{EXP_AVG_PREFIX}{name}"), m.exp_avg.shallow_clone()));
                out.push((format!("{EXP_AVG_SQ_PREFIX}{name}"), m.exp_avg_sq.shallow_clone()));
            }
        }
        out
    }

    /// Restores a checkpoint's state. `tensors` may hold other entries (model weights) too: only
    /// names starting with `optim.` are considered, and each must be a moment of a parameter listed
    /// in `state.steps`, with the parameter's shape; every such parameter needs both moments. The
    /// values are copied onto the parameters' device and dtype. Nothing changes on error.
    pub fn load_state(&mut self, state: &AdamState, tensors: &[(String, Tensor)]) -> Result<(), OptimError> {
        let mismatch = |s: String| Err(OptimError::StateMismatch(s));
        if state.decoupled_weight_decay != self.config.decoupled_weight_decay {
            let name = |d: bool| if d { "AdamW" } else { "Adam" };
            return mismatch(format!(
                "checkpoint is {}, this optimiser is {}",
                name(state.decoupled_weight_decay),
                name(self.config.decoupled_weight_decay)
            ));
        }
        let index: BTreeMap<&str, usize> = self.params.iter().enumerate().map(|(i, (n, _))| (n.as_str(), i)).collect();
        for (name, &step) in &state.steps {
            if !index.contains_key(name.as_str()) {
                return mismatch(format!("checkpoint has state for unknown parameter {name:?}"));
            }
            if step == 0 {
                return mismatch(format!("parameter {name:?} has step 0 but listed state"));
            }
        }
        let mut found: BTreeMap<(usize, bool), &Tensor> = BTreeMap::new();
        for (key, t) in tensors.iter().filter(|(k, _)| k.starts_with("optim.")) {
            let (param, second) = if let Some(p) = key.strip_prefix(EXP_AVG_SQ_PREFIX) {
                (p, true)
            } else if let Some(p) = key.strip_prefix(EXP_AVG_PREFIX) {
                (p, false)
            } else {
                return mismatch(format!("unexpected optimiser tensor {key:?}"));
            };
            let Some(&i) = index.get(param) else {
                return mismatch(format!("{key:?} names no parameter of this model"));
            };
            if !state.steps.contains_key(param) {
                return mismatch(format!("{key:?} present but parameter {param:?} has no step count"));
            }
            let want = self.params[i].1.size();
            if t.size() != want {
                return mismatch(format!("{key:?} has shape {:?}, parameter has {want:?}", t.size()));
            }
            if found.insert((i, second), t).is_some() {
                return mismatch(format!("{key:?} appears twice"));
            }
        }
        let mut moments: Vec<Option<Moments>> = self.params.iter().map(|_| None).collect();
        for (name, &step) in &state.steps {
            let i = index[name.as_str()];
            let (Some(m), Some(v)) = (found.get(&(i, false)), found.get(&(i, true))) else {
                return mismatch(format!("parameter {name:?} has a step count but is missing a moment tensor"));
            };
            let p = &self.params[i].1;
            let copy = |t: &Tensor| tch::no_grad(|| t.to_device(p.device()).to_kind(p.kind()).contiguous().copy());
            moments[i] = Some(Moments { step, exp_avg: copy(m), exp_avg_sq: copy(v) });
        }
        self.moments = moments;
        Ok(())
    }
}

/// `grad.add(param, alpha=wd)` as torch's kernel computes it: one fused multiply-add
/// (`vec::fmadd(param, wd, grad)`; CUDA contracts to an FMA too). tch has no `alpha`, and
/// `grad + param·wd` would round the product first; `addcmul(param, wd)` with tch's implicit
/// value 1 is `fma(1·param, wd, grad)`, the same single rounding.
fn l2_gradient(grad: &Tensor, param: &Tensor, weight_decay: f64) -> Tensor {
    // The kernel multiplies by the scalar cast to the tensor's dtype.
    let wd = Tensor::from(weight_decay).to_kind(grad.kind()).to_device(grad.device());
    grad.addcmul(param, &wd)
}

// --------------------------------------------------------------------------------- LR schedule

/// `torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max, eta_min)` stepped once per epoch
/// (MONAI's `LrScheduleHandler` steps it at each epoch end), as a pure function of the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CosineSchedule {
    /// The optimiser's initial learning rate (`base_lrs`).
    pub base_lr: f64,
    /// Half period in epochs (the bundle: the number of epochs).
    pub t_max: u64,
    /// Floor of the schedule (the bundle: 0).
    pub eta_min: f64,
}

impl CosineSchedule {
    /// The bundle's schedule: `CosineAnnealingLR(T_max=epochs, eta_min=0)` from `base_lr`.
    pub fn new(base_lr: f64, t_max: u64) -> Self {
        Self { base_lr, t_max, eta_min: 0.0 }
    }

    /// The learning rate of epoch `epoch` (0-based), i.e. after `epoch` scheduler steps.
    ///
    /// torch's `get_lr` is recursive — `lr_e = (1 + cos(π·e/T)) / (1 + cos(π·(e−1)/T)) ·
    /// (lr_{e−1} − η) + η`, with a special step when `(e − 1 − T) mod 2T == 0` — and its values
    /// differ from the closed form in the last bits, so this replays the recursion (O(epoch),
    /// trivial). Resuming a torch scheduler from its state_dict continues the same recursion.
    pub fn lr_at(&self, epoch: u64) -> f64 {
        if self.t_max == 0 {
            // torch would divide by zero; a zero-length schedule is a constant.
            return self.base_lr;
        }
        let t_max = self.t_max as f64;
        let period = 2 * self.t_max as i128;
        let mut lr = self.base_lr;
        for e in 1..=epoch {
            let ef = e as f64;
            if (e as i128 - 1 - self.t_max as i128).rem_euclid(period) == 0 {
                lr += (self.base_lr - self.eta_min) * (1.0 - (std::f64::consts::PI / t_max).cos()) / 2.0;
            } else {
                lr = (1.0 + (std::f64::consts::PI * ef / t_max).cos())
                    / (1.0 + (std::f64::consts::PI * (ef - 1.0) / t_max).cos())
                    * (lr - self.eta_min)
                    + self.eta_min;
            }
        }
        lr
    }
}

/// MONAI's `WarmupCosineSchedule(optimizer, warmup_steps, t_total)` with its defaults (`end_lr`
/// 0, `cycles` 0.5, `warmup_multiplier` 0), stepped once per optimiser step: a linear ramp from 0
/// to `base_lr` over `warmup_steps`, then half a cosine down to 0 at `t_total`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WarmupCosineSchedule {
    /// The optimiser's initial learning rate (`base_lrs`).
    pub base_lr: f64,
    /// Steps of the linear ramp (clamped to `t_total`, as MONAI does).
    pub warmup_steps: u64,
    /// All steps of the run.
    pub t_total: u64,
}

impl WarmupCosineSchedule {
    /// The schedule over `t_total` steps, warming up for `warmup_steps` of them.
    pub fn new(base_lr: f64, warmup_steps: u64, t_total: u64) -> Self {
        Self { base_lr, warmup_steps: warmup_steps.min(t_total), t_total }
    }

    /// The learning rate of step `step` (0-based: after `step` scheduler steps), MONAI's
    /// `lr_lambda` times the base rate.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let progress =
            (step - self.warmup_steps) as f64 / (self.t_total.saturating_sub(self.warmup_steps)).max(1) as f64;
        self.base_lr * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
    }
}

/// The learning-rate policy of a training job.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LrSchedule {
    /// The same learning rate every epoch.
    Constant {
        /// The learning rate.
        lr: f64,
    },
    /// Cosine annealing, the bundle's schedule.
    Cosine(CosineSchedule),
    /// Linear warm-up then cosine decay, per step.
    WarmupCosine(WarmupCosineSchedule),
}

impl LrSchedule {
    /// The learning rate of the step after `global_step` steps, in epoch `epoch` (both 0-based):
    /// epoch schedules read the epoch, step schedules the step.
    pub fn lr_at(&self, epoch: u64, global_step: u64) -> f64 {
        match self {
            LrSchedule::Constant { lr } => *lr,
            LrSchedule::Cosine(c) => c.lr_at(epoch),
            LrSchedule::WarmupCosine(w) => w.lr_at(global_step),
        }
    }
}

// --------------------------------------------------------------------------------- GradScaler

/// Settings of [`GradScaler`]; the defaults are `torch.amp.GradScaler`'s (and MONAI's, which
/// constructs it with no arguments).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GradScalerConfig {
    /// The first loss scale (65536).
    pub init_scale: f64,
    /// Multiplier after `growth_interval` consecutive clean steps (2).
    pub growth_factor: f64,
    /// Multiplier after a step with inf/NaN gradients (0.5).
    pub backoff_factor: f64,
    /// Clean steps between growths (2000).
    pub growth_interval: u32,
    /// `false` makes the scaler a no-op (CPU / float32 training).
    pub enabled: bool,
}

impl Default for GradScalerConfig {
    /// `torch.amp.GradScaler()`'s settings, enabled.
    fn default() -> Self {
        Self { init_scale: 65536.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 2000, enabled: true }
    }
}

/// The scaler's checkpointed state (torch's `state_dict()` "scale" and "_growth_tracker").
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GradScalerState {
    /// The current loss scale (a float32 value).
    pub scale: f64,
    /// Consecutive clean steps since the last growth or backoff.
    pub growth_tracker: u32,
}

/// `torch.amp.GradScaler`: multiplies the loss by a scale before backward, unscales the gradients,
/// skips the optimiser step when any is inf/NaN, and adapts the scale.
///
/// Usage per iteration: `scaler.scale(&loss).backward()`; `let bad = scaler.unscale_(&opt.grads())?`;
/// `if scaler.should_step()? { opt.step(lr) }`; `scaler.update()?`. The scale is kept on the host
/// as the float32 value torch keeps on the device; checking for inf costs one synchronisation per
/// step, as torch's `step()` does (`found_inf.item()`).
#[derive(Debug, Clone)]
pub struct GradScaler {
    config: GradScalerConfig,
    scale: f32,
    growth_tracker: u32,
    found_inf: Option<bool>,
}

impl GradScaler {
    /// A scaler with `config` (validated as torch does: growth > 1, backoff in (0, 1), interval > 0).
    pub fn new(config: GradScalerConfig) -> Result<Self, OptimError> {
        let bad = |name, value, why| Err(OptimError::InvalidHyperParameter { name, value, why });
        if config.growth_factor.is_nan() || config.growth_factor <= 1.0 {
            return bad("growth_factor", config.growth_factor, "must be > 1");
        }
        if !(config.backoff_factor > 0.0 && config.backoff_factor < 1.0) {
            return bad("backoff_factor", config.backoff_factor, "must be in (0, 1)");
        }
        if config.growth_interval == 0 {
            return bad("growth_interval", 0.0, "must be > 0");
        }
        let scale = config.init_scale as f32;
        if !(scale.is_finite() && scale > 0.0) {
            return bad("init_scale", config.init_scale, "must be a positive finite float32");
        }
        Ok(Self { config, scale, growth_tracker: 0, found_inf: None })
    }

    /// A scaler that does nothing: `scale` returns the loss, every step is taken.
    pub fn disabled() -> Self {
        let config = GradScalerConfig { enabled: false, ..Default::default() };
        Self { config, scale: 1.0, growth_tracker: 0, found_inf: None }
    }

    /// The settings.
    pub fn config(&self) -> &GradScalerConfig {
        &self.config
    }

    /// Whether scaling is on.
    pub fn is_enabled(&self) -> bool {
        self.config.enabled
    }

    /// The current scale (`get_scale()`: 1.0 when disabled).
    pub fn current_scale(&self) -> f64 {
        if self.config.enabled { self.scale as f64 } else { 1.0 }
    }

    /// `loss · scale` (the loss itself when disabled), to call `backward` on.
    pub fn scale(&self, loss: &Tensor) -> Tensor {
        if !self.config.enabled {
            return loss.shallow_clone();
        }
        // torch multiplies by a 0-dim float32 tensor: the product keeps the loss's dtype.
        loss * Tensor::from(self.scale).to_device(loss.device())
    }

    /// Divides the gradients by the scale in place and records whether any was inf or NaN (before
    /// unscaling, as `_amp_foreach_non_finite_check_and_unscale_` checks); returns that flag.
    /// Undefined gradients are skipped. Disabled: returns `false` and touches nothing.
    pub fn unscale_(&mut self, grads: &[Tensor]) -> Result<bool, OptimError> {
        if !self.config.enabled {
            return Ok(false);
        }
        if self.found_inf.is_some() {
            return Err(OptimError::AlreadyUnscaled);
        }
        if grads.iter().any(|g| g.defined() && g.kind() == Kind::Half) {
            return Err(OptimError::HalfGradients);
        }
        // torch: `self._scale.double().reciprocal().float()`.
        let inv_scale = (1.0f64 / self.scale as f64) as f32 as f64;
        let found = tch::no_grad(|| {
            let mut any_bad: Option<Tensor> = None;
            for g in grads.iter().filter(|g| g.defined()) {
                // Accumulated on the device; one host sync below instead of one per tensor.
                let bad = g.isfinite().all().logical_not();
                any_bad = Some(match any_bad {
                    None => bad,
                    Some(acc) => acc.logical_or(&bad),
                });
                let mut g = g.shallow_clone();
                let _ = g.g_mul_scalar_(inv_scale);
            }
            any_bad.is_some_and(|t| t.int64_value(&[]) != 0)
        });
        self.found_inf = Some(found);
        Ok(found)
    }

    /// Whether the optimiser should step (no inf/NaN in the last unscaled gradients); always true
    /// when disabled. Errors if `unscale_` was not called since the last `update`.
    pub fn should_step(&self) -> Result<bool, OptimError> {
        if !self.config.enabled {
            return Ok(true);
        }
        self.found_inf.map(|f| !f).ok_or(OptimError::NoInfCheck)
    }

    /// Adapts the scale as `torch._amp_update_scale_`: inf found → `scale·backoff`, tracker 0;
    /// otherwise tracker + 1, and at `growth_interval` → `scale·growth` (kept only if finite in
    /// float32), tracker 0. Errors if `unscale_` was not called since the last update.
    pub fn update(&mut self) -> Result<(), OptimError> {
        if !self.config.enabled {
            return Ok(());
        }
        let found_inf = self.found_inf.take().ok_or(OptimError::NoInfCheck)?;
        if found_inf {
            self.scale = (self.scale as f64 * self.config.backoff_factor) as f32;
            self.growth_tracker = 0;
        } else {
            let successful = self.growth_tracker + 1;
            if successful == self.config.growth_interval {
                let grown = (self.scale as f64 * self.config.growth_factor) as f32;
                if grown.is_finite() {
                    self.scale = grown;
                }
                self.growth_tracker = 0;
            } else {
                self.growth_tracker = successful;
            }
        }
        Ok(())
    }

    /// The state for a checkpoint.
    pub fn state(&self) -> GradScalerState {
        GradScalerState { scale: self.current_scale(), growth_tracker: self.growth_tracker }
    }

    /// Restores a checkpoint's state (ignored when disabled, as torch ignores it); the scale must be
    /// a positive finite float32 and the tracker below `growth_interval`.
    pub fn load_state(&mut self, state: &GradScalerState) -> Result<(), OptimError> {
        if !self.config.enabled {
            return Ok(());
        }
        let scale = state.scale as f32;
        if !(scale.is_finite() && scale > 0.0) {
            return Err(OptimError::StateMismatch(format!(
                "GradScaler scale {} is not a positive float32",
                state.scale
            )));
        }
        if state.growth_tracker >= self.config.growth_interval {
            return Err(OptimError::StateMismatch(format!(
                "GradScaler growth tracker {} is not below growth_interval {}",
                state.growth_tracker, self.config.growth_interval
            )));
        }
        self.scale = scale;
        self.growth_tracker = state.growth_tracker;
        self.found_inf = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

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
}
