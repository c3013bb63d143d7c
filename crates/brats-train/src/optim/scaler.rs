//! `torch.amp.GradScaler`: dynamic loss scaling for float16 autocast.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::OptimError;

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
