//! The bundle's validation metric: MONAI `MeanDice` over sigmoid-thresholded logits, TC/WT/ET and
//! their mean, accumulated over cases and mergeable across processes.
//!
//! What the bundle's evaluator does per validation case (`validate#postprocessing` and
//! `validate#key_metric` / `additional_metrics` in `configs/train.json`, MONAI 1.6.1):
//!
//! 1. `Activationsd(sigmoid=True)` then `AsDiscreted(threshold=0.5)`: positive is
//!    `sigmoid(logit) >= 0.5` in float32 (so logits slightly below 0, down to about −6e-8, count
//!    as positive);
//! 2. per item and channel, `DiceMetric(include_background=True, ignore_empty=True)`:
//!    `2·|pred ∧ label| / (|label| + |pred|)`, computed in float32, and **NaN when the label
//!    channel is empty** (whatever the prediction);
//! 3. `MeanDice(reduction="mean")`, i.e. `do_metric_reduction(MEAN)` over the `[items, channels]`
//!    table of every case seen (across ranks, MONAI gathers the table before reducing):
//!    - `val_mean_dice` (the key metric, [`DiceScores::mean`]): first each item's mean over its
//!      non-NaN channels, then the mean of those over the items that have at least one non-NaN
//!      channel. It is therefore a **mean of per-case means**, neither the mean over all non-NaN
//!      (case, channel) pairs nor the mean of the three channel means;
//!    - `val_mean_dice_tc/wt/et` (`SplitChanneld` + `MeanDice` on one channel,
//!      [`DiceScores::tc`]...): the mean over the items whose label channel is non-empty;
//!    - a mean with nothing to average (no valid value) is 0.0, as in MONAI.
//!
//! The accumulator keeps sums and counts (the sufficient statistics of those means), so ranks can
//! all-reduce (sum) [`DiceAccumulator::to_stats`] and rebuild one accumulator with
//! [`DiceAccumulator::from_stats`]. MONAI reduces in float32 and we sum in float64: results agree
//! to ~1e-7.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use thiserror::Error;

/// The output channels, in order: tumour core, whole tumour, enhancing tumour.
pub const CHANNELS: [&str; 3] = ["tc", "wt", "et"];

/// Why a case could not be scored or statistics could not be restored.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum MetricError {
    /// Logits must be `[B, 3, X, Y, Z]` (TC, WT, ET).
    #[error("DiceMetric: logits must be [B, 3, X, Y, Z] (TC, WT, ET), got shape {0:?}")]
    LogitsShape(Vec<i64>),
    /// The label must have the logits' shape.
    #[error(
        "DiceMetric: label shape {label:?} differs from logits shape {logits:?}; convert the label to TC/WT/ET channels first"
    )]
    LabelShape {
        /// The logits' shape.
        logits: Vec<i64>,
        /// The label's shape.
        label: Vec<i64>,
    },
    /// The statistics vector has the wrong length or impossible values.
    #[error("DiceMetric statistics: {0}")]
    BadStats(String),
}

/// Validation Dice as the bundle reports it: per channel (`val_mean_dice_tc/wt/et`) and the key
/// metric `val_mean_dice` (see the module documentation for exactly how each is averaged).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DiceScores {
    /// Tumour core: mean over the cases whose TC label is non-empty (0.0 if none is).
    pub tc: f64,
    /// Whole tumour: mean over the cases whose WT label is non-empty (0.0 if none is).
    pub wt: f64,
    /// Enhancing tumour: mean over the cases whose ET label is non-empty (0.0 if none is).
    pub et: f64,
    /// `val_mean_dice`: the mean over cases (with at least one non-empty label channel) of each
    /// case's mean over its non-empty channels; 0.0 if there is no such case.
    pub mean: f64,
}

/// Per-channel Dice of every item of a batch: `sigmoid(logits) >= 0.5` against the label, NaN
/// where the label channel is empty (MONAI `ignore_empty=True`).
///
/// The value is MONAI's float32 `2·I / (G + P)` (exact integer counts up to 2^24 voxels per
/// channel, then one float32 division), widened to f64. Costs one host synchronisation per item.
pub fn item_dice(logits: &Tensor, label: &Tensor) -> Result<Vec<[f64; 3]>, MetricError> {
    let shape = logits.size();
    if shape.len() != 5 || shape[1] != 3 {
        return Err(MetricError::LogitsShape(shape));
    }
    if label.size() != shape {
        return Err(MetricError::LabelShape { logits: shape, label: label.size() });
    }
    tch::no_grad(|| {
        let mut out = Vec::with_capacity(shape[0] as usize);
        for b in 0..shape[0] {
            // Per item, as MONAI's post-processing runs on decollated items: the sigmoid kernel
            // then sees the same contiguous [3, X, Y, Z] block (same vectorised/tail split).
            let prob = logits.get(b).to_kind(Kind::Float).contiguous().sigmoid();
            let pred = prob.ge(0.5).to_kind(Kind::Double);
            let lab = label.get(b).to_kind(Kind::Double);
            let dims: &[i64] = &[1, 2, 3];
            // Label values are summed as MONAI does (`sum(y)`, `sum(masked_select(y, pred))`).
            let g = lab.sum_dim_intlist(dims, false, None::<Kind>);
            let i = (&lab * &pred).sum_dim_intlist(dims, false, None::<Kind>);
            let p = pred.sum_dim_intlist(dims, false, None::<Kind>);
            let stats = Tensor::stack(&[g, i, p], 0).to_device(Device::Cpu);
            let v: Vec<f64> = Vec::<f64>::try_from(stats.reshape([-1])).expect("f64 statistics");
            let mut dice = [f64::NAN; 3];
            for (c, d) in dice.iter_mut().enumerate() {
                let (g, i, p) = (v[c], v[3 + c], v[6 + c]);
                if g > 0.0 {
                    // float32 as MONAI: (2.0 * I) / (y_o + sum(pred)).
                    *d = ((2.0 * i as f32) / (g as f32 + p as f32)) as f64;
                }
            }
            out.push(dice);
        }
        Ok(out)
    })
}

/// Running sums and counts of the bundle's Dice metrics over validation cases; merge across ranks
/// by summing [`DiceAccumulator::to_stats`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DiceAccumulator {
    /// Σ Dice per channel over the items whose label channel is non-empty.
    channel_sum: [f64; 3],
    /// How many items have a non-empty label channel, per channel.
    channel_count: [f64; 3],
    /// Σ over items with ≥ 1 non-empty channel of the item's mean over those channels.
    item_mean_sum: f64,
    /// How many items have ≥ 1 non-empty channel.
    item_mean_count: f64,
    /// How many items were added (including all-empty ones), for reporting.
    items: f64,
}

impl DiceAccumulator {
    /// Length of [`DiceAccumulator::to_stats`]: `[Σtc, Σwt, Σet, n_tc, n_wt, n_et, Σitem_mean,
    /// n_item_mean, n_items]`.
    pub const STATS_LEN: usize = 9;

    /// An empty accumulator (its [`DiceAccumulator::finish`] is all zeros, like MONAI's).
    pub fn new() -> Self {
        Self::default()
    }

    /// Scores a batch of cases (`logits` and `label` `[B, 3, X, Y, Z]`, label 0/1 in any numeric
    /// dtype) and adds them; returns each item's per-channel Dice (NaN = empty label channel).
    pub fn add(&mut self, logits: &Tensor, label: &Tensor) -> Result<Vec<[f64; 3]>, MetricError> {
        let dice = item_dice(logits, label)?;
        for d in &dice {
            self.add_item(*d);
        }
        Ok(dice)
    }

    /// Adds one item's per-channel Dice, NaN meaning "empty label channel, skipped".
    pub fn add_item(&mut self, dice: [f64; 3]) {
        let mut sum = 0.0;
        let mut n = 0.0;
        for (c, &d) in dice.iter().enumerate() {
            if !d.is_nan() {
                self.channel_sum[c] += d;
                self.channel_count[c] += 1.0;
                sum += d;
                n += 1.0;
            }
        }
        if n > 0.0 {
            self.item_mean_sum += sum / n;
            self.item_mean_count += 1.0;
        }
        self.items += 1.0;
    }

    /// How many items (cases) were added.
    pub fn items(&self) -> u64 {
        self.items as u64
    }

    /// Adds another accumulator's cases to this one (what an all-reduce of the stats does).
    pub fn merge(&mut self, other: &DiceAccumulator) {
        for c in 0..3 {
            self.channel_sum[c] += other.channel_sum[c];
            self.channel_count[c] += other.channel_count[c];
        }
        self.item_mean_sum += other.item_mean_sum;
        self.item_mean_count += other.item_mean_count;
        self.items += other.items;
    }

    /// The sufficient statistics as a flat vector of [`DiceAccumulator::STATS_LEN`] sums and counts;
    /// element-wise sums of these vectors over ranks describe the union of their cases.
    pub fn to_stats(&self) -> Vec<f64> {
        let mut v = Vec::with_capacity(Self::STATS_LEN);
        v.extend_from_slice(&self.channel_sum);
        v.extend_from_slice(&self.channel_count);
        v.extend_from_slice(&[self.item_mean_sum, self.item_mean_count, self.items]);
        v
    }

    /// Rebuilds an accumulator from (possibly all-reduced) [`DiceAccumulator::to_stats`], checking
    /// the length and that counts are non-negative whole numbers and sums are finite.
    pub fn from_stats(stats: &[f64]) -> Result<Self, MetricError> {
        if stats.len() != Self::STATS_LEN {
            return Err(MetricError::BadStats(format!("expected {} values, got {}", Self::STATS_LEN, stats.len())));
        }
        if let Some(i) = stats.iter().position(|v| !v.is_finite()) {
            return Err(MetricError::BadStats(format!("value {i} is not finite ({})", stats[i])));
        }
        for i in [3, 4, 5, 7, 8] {
            if stats[i] < 0.0 || stats[i].fract() != 0.0 {
                return Err(MetricError::BadStats(format!("count {i} is not a whole number >= 0 ({})", stats[i])));
            }
        }
        Ok(Self {
            channel_sum: [stats[0], stats[1], stats[2]],
            channel_count: [stats[3], stats[4], stats[5]],
            item_mean_sum: stats[6],
            item_mean_count: stats[7],
            items: stats[8],
        })
    }

    /// The bundle's metrics over every case added (0.0 where there is nothing to average).
    pub fn finish(&self) -> DiceScores {
        let mean = |s: f64, n: f64| if n > 0.0 { s / n } else { 0.0 };
        DiceScores {
            tc: mean(self.channel_sum[0], self.channel_count[0]),
            wt: mean(self.channel_sum[1], self.channel_count[1]),
            et: mean(self.channel_sum[2], self.channel_count[2]),
            mean: mean(self.item_mean_sum, self.item_mean_count),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_is_a_mean_of_case_means() {
        let mut acc = DiceAccumulator::new();
        acc.add_item([1.0, 0.5, f64::NAN]); // case mean 0.75
        acc.add_item([0.0, f64::NAN, f64::NAN]); // case mean 0
        acc.add_item([f64::NAN; 3]); // no valid channel: not counted
        let s = acc.finish();
        assert_eq!(s, DiceScores { tc: 0.5, wt: 0.5, et: 0.0, mean: 0.375 });
        assert_eq!(acc.items(), 3);
    }

    #[test]
    fn stats_round_trip_and_sum_like_an_all_reduce() {
        let mut a = DiceAccumulator::new();
        a.add_item([0.9, 0.8, 0.7]);
        let mut b = DiceAccumulator::new();
        b.add_item([0.1, f64::NAN, 0.3]);
        let summed: Vec<f64> = a.to_stats().iter().zip(b.to_stats()).map(|(x, y)| x + y).collect();
        let merged = DiceAccumulator::from_stats(&summed).unwrap();
        let mut direct = a.clone();
        direct.merge(&b);
        assert_eq!(merged, direct);
        assert_eq!(DiceAccumulator::from_stats(&a.to_stats()).unwrap(), a);
    }

    #[test]
    fn bad_stats_are_rejected() {
        assert!(DiceAccumulator::from_stats(&[0.0; 8]).is_err());
        let mut v = vec![0.0; 9];
        v[4] = 1.5;
        assert!(DiceAccumulator::from_stats(&v).is_err());
        v[4] = 1.0;
        v[0] = f64::NAN;
        assert!(DiceAccumulator::from_stats(&v).is_err());
    }

    #[test]
    fn shapes_are_checked() {
        let a = Tensor::zeros([1, 2, 4, 4, 4], (Kind::Float, Device::Cpu));
        assert!(matches!(item_dice(&a, &a), Err(MetricError::LogitsShape(_))));
        let l = Tensor::zeros([1, 3, 4, 4, 4], (Kind::Float, Device::Cpu));
        let y = Tensor::zeros([1, 3, 4, 4, 2], (Kind::Float, Device::Cpu));
        assert!(matches!(item_dice(&l, &y), Err(MetricError::LabelShape { .. })));
    }
}
