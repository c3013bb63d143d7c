//! `torch.optim.Adam` and `AdamW`, op for op as torch runs them on CPU.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::OptimError;

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
