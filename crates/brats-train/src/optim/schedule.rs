//! Learning-rate schedules: `CosineAnnealingLR` (per epoch) and MONAI's `WarmupCosineSchedule` (per step).

use serde::{Deserialize, Serialize};

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
