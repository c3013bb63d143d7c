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

mod adam;
mod scaler;
mod schedule;
#[cfg(test)]
mod tests;

pub use adam::{Adam, AdamConfig, AdamState, EXP_AVG_PREFIX, EXP_AVG_SQ_PREFIX};
pub use scaler::{GradScaler, GradScalerConfig, GradScalerState};
pub use schedule::{CosineSchedule, LrSchedule, WarmupCosineSchedule};

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
