//! Sliding-window validation of this rank's shard, reduced over ranks.

use brats_model::SegResNet;
use tch::{Kind, Tensor};

use super::{RunEnv, TrainError};
use crate::data::Cases;
use crate::metric::{DiceAccumulator, DiceScores};
use crate::spec::TrainConfig;

/// Validation Dice of `cases` (this rank's shard), reduced over ranks.
pub(crate) fn validate(
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
        ..Default::default()
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
