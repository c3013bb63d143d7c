//! The run's artefacts, written by rank 0 at the end: best.safetensors, model.onnx,
//! metadata.json, metrics.csv, curves.png.

use brats_model::onnx::{ExportOptions, GroupNormLowering, Precision};
use brats_model::weights;
use tch::nn;
use tracing::warn;

use super::{RunEnv, TrainError};
use crate::checkpoint::TrainState;
use crate::events::TrainOutcome;
use crate::report;
use crate::spec::TrainConfig;

pub(crate) fn provenance(config: &TrainConfig, env: &RunEnv, state: &TrainState) -> serde_json::Value {
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

pub(crate) fn outcome_of(env: &RunEnv, state: &TrainState) -> TrainOutcome {
    TrainOutcome {
        epochs: state.epoch,
        global_step: state.global_step,
        best_metrics: state.best,
        best_epoch: state.best_epoch,
        onnx_uri: env.artifacts.join("model.onnx").to_string(),
        metadata_uri: env.artifacts.join("metadata.json").to_string(),
        mlflow_run_id: None,
    }
}

/// Exports the best weights (or the final ones when nothing was validated) and writes the
/// artefacts: best.safetensors, model.onnx, metadata.json, metrics.csv, curves.png.
pub(crate) fn write_artifacts(
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
    env.put(&dir.join("metrics.csv"), report::metrics_csv(&state.history).into_bytes())?;
    match report::plot_png(&state.history, &format!("SegResNet training - {}", env.run_name)) {
        Ok(png) => env.put(&dir.join("curves.png"), png)?,
        Err(e) => warn!(error = %e, "training curves not plotted"),
    }
    Ok(outcome_of(env, state))
}
