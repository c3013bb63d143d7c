//! MONAI's `DiceLoss` as the `brats_mri_segmentation` bundle configures it, in differentiable `tch`
//! ops.
//!
//! MONAI 1.6.1 (`monai.losses.DiceLoss.forward` with `compute_tp_fp_fn`), for `p` the input after
//! the optional sigmoid, `g` the target and sums over the spatial axes (and the batch axis when
//! `batch`), per batch item and channel:
//!
//! - `squared_pred = true`: `P = ‖p‖²`, `G = ‖g‖²`, `D = ‖p − g‖²` (each a `vector_norm`, then
//!   squared), `tp = (P + G − D) / 2`, `fp = P − tp`, `fn = G − tp`;
//! - `squared_pred = false`: `tp = Σ p·g`, `fp = Σ p − tp`, `fn = Σ g − tp`;
//! - then `fp *= 0.5`, `fn *= 0.5`, `f = 1 − (2·tp + smooth_nr) / (2·(tp + fp + fn) + smooth_dr)`,
//!   averaged over all (item, channel) values (`reduction = "mean"`).
//!
//! Mathematically `2·tp = 2·Σ p·g` and the denominator is `Σ p² + Σ g² + smooth_dr`, but the
//! squared form cancels in float32, so this module runs exactly MONAI's sequence of ATen ops (the
//! same kernels, forward and backward), which is what makes the result bit-identical rather than
//! merely close. An empty target channel gives `D == P` exactly, hence a loss of exactly 1 and a
//! zero gradient for that channel, as in MONAI.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use thiserror::Error;

/// Why a loss could not be computed: the inputs do not have the layout the loss is defined on.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum LossError {
    /// Logits and target must have the same `[B, C, spatial...]` shape (one 0/1 channel per output).
    #[error(
        "DiceLoss: target shape {target:?} differs from logits shape {logits:?}; give one target channel per output channel (TC, WT, ET)"
    )]
    ShapeMismatch {
        /// The logits' shape.
        logits: Vec<i64>,
        /// The target's shape.
        target: Vec<i64>,
    },
    /// The input has no spatial axis.
    #[error("DiceLoss: logits must be [B, C, spatial...] with at least one spatial axis, got shape {0:?}")]
    Rank(Vec<i64>),
    /// The logits are not a floating-point tensor.
    #[error("DiceLoss: logits must be floating point (f16, bf16, f32 or f64), got {0:?}")]
    NotFloat(Kind),
}

/// MONAI's `DiceLoss(smooth_nr, smooth_dr, squared_pred, sigmoid, include_background, batch,
/// to_onehot_y=False, reduction="mean")`: the bundle's training loss.
///
/// Half-precision logits (AMP) are converted to float32 before anything else, so the loss and its
/// reductions are always computed in float32 (MONAI under autocast would run the sigmoid in f16);
/// the gradient flows back to the caller's dtype. Float64 logits stay float64.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DiceLoss {
    /// Added to the numerator (`smooth_nr`; the bundle uses 0).
    pub smooth_nr: f64,
    /// Added to the denominator (`smooth_dr`; the bundle uses 1e-5), which keeps empty channels finite.
    pub smooth_dr: f64,
    /// Square the prediction and target in the denominator (the bundle: true).
    pub squared_pred: bool,
    /// Apply a sigmoid to the input first, i.e. the input is logits (the bundle: true).
    pub sigmoid: bool,
    /// Keep channel 0 (the bundle: true; TC is not a background channel). Ignored with one channel,
    /// as MONAI does.
    pub include_background: bool,
    /// Sum over the batch axis too, giving one value per channel instead of per (item, channel).
    pub batch: bool,
}

impl Default for DiceLoss {
    /// The bundle's loss: [`DiceLoss::bundle`].
    fn default() -> Self {
        Self::bundle()
    }
}

impl DiceLoss {
    /// The `brats_mri_segmentation` bundle's settings: `smooth_nr=0, smooth_dr=1e-5,
    /// squared_pred=True, sigmoid=True`, MONAI's defaults otherwise.
    pub fn bundle() -> Self {
        Self {
            smooth_nr: 0.0,
            smooth_dr: 1e-5,
            squared_pred: true,
            sigmoid: true,
            include_background: true,
            batch: false,
        }
    }

    /// The loss (a float32 scalar, differentiable w.r.t. `logits`) of logits `[B, C, spatial...]`
    /// against a 0/1 target of the same shape.
    ///
    /// # Panics
    /// When [`DiceLoss::try_forward`] would return an error: a shape mismatch is a programming error
    /// in the training loop, like a mismatched `tch` op.
    pub fn forward(&self, logits: &Tensor, target: &Tensor) -> Tensor {
        match self.try_forward(logits, target) {
            Ok(loss) => loss,
            Err(e) => panic!("{e}"),
        }
    }

    /// [`DiceLoss::forward`], with a typed error instead of a panic for inputs of the wrong layout.
    pub fn try_forward(&self, logits: &Tensor, target: &Tensor) -> Result<Tensor, LossError> {
        let shape = logits.size();
        if shape.len() < 3 {
            return Err(LossError::Rank(shape));
        }
        if target.size() != shape {
            return Err(LossError::ShapeMismatch { logits: shape, target: target.size() });
        }
        let kind = match logits.kind() {
            // AMP: reductions over ~7M voxels per channel must not run in half precision.
            Kind::Half | Kind::BFloat16 | Kind::Float => Kind::Float,
            Kind::Double => Kind::Double,
            other => return Err(LossError::NotFloat(other)),
        };
        let mut input = logits.to_kind(kind);
        if self.sigmoid {
            input = input.sigmoid();
        }
        let mut target = target.to_kind(kind);
        let channels = shape[1];
        if !self.include_background && channels > 1 {
            input = input.narrow(1, 1, channels - 1);
            target = target.narrow(1, 1, channels - 1);
        }

        let mut reduce_axis: Vec<i64> = (2..shape.len() as i64).collect();
        if self.batch {
            reduce_axis.insert(0, 0);
        }
        let (tp, fp, fn_) = if self.squared_pred {
            // MONAI's soft-label formulation (ord 2): `vector_norm` then `pow(2)`, in this order.
            // `norm.ScalarOpt_dim` forwards to `linalg_vector_norm` and shares its backward.
            let sq_norm = |t: &Tensor| t.norm_scalaropt_dim(2, reduce_axis.as_slice(), false).pow_tensor_scalar(2);
            let pred_o = sq_norm(&input);
            let ground_o = sq_norm(&target);
            let difference = sq_norm(&(&input - &target));
            let tp = (&pred_o + &ground_o - difference) / 2.0;
            let fp = pred_o - &tp;
            let fn_ = ground_o - &tp;
            (tp, fp, fn_)
        } else {
            let sum = |t: &Tensor| t.sum_dim_intlist(reduce_axis.as_slice(), false, None::<Kind>);
            let tp = sum(&(&input * &target));
            let fp = sum(&input) - &tp;
            let fn_ = sum(&target) - &tp;
            (tp, fp, fn_)
        };
        // Dice (not Jaccard): MONAI halves fp and fn before forming the denominator.
        let fp = fp * 0.5;
        let fn_ = fn_ * 0.5;
        let numerator = &tp * 2.0 + self.smooth_nr;
        let denominator = (tp + fp + fn_) * 2.0 + self.smooth_dr;
        let f = (numerator / denominator).rsub_scalar(1.0);
        Ok(f.mean(None::<Kind>))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], shape: &[i64]) -> Tensor {
        Tensor::from_slice(v).reshape(shape)
    }

    #[test]
    fn closed_form_on_a_tiny_case() {
        // One item, one channel, two voxels: p = sigmoid(0) = 0.5 both, g = [1, 0].
        let logits = t(&[0.0, 0.0], &[1, 1, 2]);
        let target = t(&[1.0, 0.0], &[1, 1, 2]);
        let loss = DiceLoss::bundle().forward(&logits, &target).double_value(&[]);
        // 1 - 2·0.5 / (0.25 + 0.25 + 1 + 1e-5)
        let expect = 1.0 - 1.0 / (1.5 + 1e-5);
        assert!((loss - expect).abs() < 1e-6, "{loss} vs {expect}");
    }

    #[test]
    fn empty_target_channel_gives_one_and_no_gradient() {
        let logits = t(&[0.3, -1.2, 2.0, 0.1], &[1, 1, 4]).set_requires_grad(true);
        let target = Tensor::zeros([1, 1, 4], (Kind::Float, tch::Device::Cpu));
        let loss = DiceLoss::bundle().forward(&logits, &target);
        assert_eq!(loss.double_value(&[]), 1.0);
        loss.backward();
        assert_eq!(logits.grad().abs().max().double_value(&[]), 0.0);
    }

    #[test]
    fn half_logits_compute_in_f32_and_return_f16_gradients() {
        let v: Vec<f32> = (0..24).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let target: Vec<f32> = (0..24).map(|i| (i % 3 == 0) as u8 as f32).collect();
        let target = t(&target, &[1, 2, 12]);
        let half = t(&v, &[1, 2, 12]).to_kind(Kind::Half).set_requires_grad(true);
        let loss = DiceLoss::bundle().forward(&half, &target);
        assert_eq!(loss.kind(), Kind::Float);
        let full = half.detach().to_kind(Kind::Float);
        let expect = DiceLoss::bundle().forward(&full, &target);
        assert_eq!(loss.double_value(&[]), expect.double_value(&[]));
        loss.backward();
        assert_eq!(half.grad().kind(), Kind::Half);
    }

    #[test]
    fn shape_errors_are_typed() {
        let loss = DiceLoss::bundle();
        let a = Tensor::zeros([1, 3, 4, 4, 4], (Kind::Float, tch::Device::Cpu));
        let b = Tensor::zeros([1, 2, 4, 4, 4], (Kind::Float, tch::Device::Cpu));
        assert!(matches!(loss.try_forward(&a, &b), Err(LossError::ShapeMismatch { .. })));
        let c = Tensor::zeros([3, 4], (Kind::Float, tch::Device::Cpu));
        assert!(matches!(loss.try_forward(&c, &c), Err(LossError::Rank(_))));
        let d = Tensor::zeros([1, 3, 4], (Kind::Int64, tch::Device::Cpu));
        assert!(matches!(loss.try_forward(&d, &d), Err(LossError::NotFloat(Kind::Int64))));
    }
}
