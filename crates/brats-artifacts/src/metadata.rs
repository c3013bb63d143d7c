//! `metadata.json`, the file that travels with every model (beside `model.onnx` in a job's
//! artefacts and in every registry version), in the spirit of a MONAI bundle's
//! `configs/metadata.json`: network data format with channel definitions, post-processing,
//! checksums and training provenance.
//!
//! Only the types live here, so the trainer (which writes the file, through `brats-model`) and
//! inference (which reads it) share one definition without either linking the other's runtime.
//! The serialised form is the one `brats-model` has always written: the free-form parts
//! (`network_def`, `network_data_format`, `postprocessing`, `training`) stay JSON values, so
//! files already in registries parse and re-serialise unchanged, and typed views
//! ([`ModelMetadata::architecture`], [`ModelMetadata::sliding_window`],
//! [`ModelMetadata::provenance`]) read them.

use std::collections::BTreeMap;

use brats_core::labels::LabelConvention;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Identifies this file format.
pub const SCHEMA: &str = "brats-model-metadata/1";

/// Input channel names, in order (MONAI's bundle stacks the files in this order).
pub const INPUT_CHANNELS: [&str; 4] = ["T1c", "T1", "T2", "FLAIR"];
/// Output channel names, in order.
pub const OUTPUT_CHANNELS: [&str; 3] = ["TC", "WT", "ET"];

/// The ONNX file the metadata describes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OnnxInfo {
    /// File name, relative to the metadata's folder.
    pub file: String,
    /// sha256 of the ONNX file, hex.
    pub sha256: String,
    /// Operator set.
    pub opset: i64,
    /// IR version.
    pub ir_version: i64,
    /// `fp32` or `fp16` (input and output are float32 in both).
    pub precision: String,
    /// GroupNorm lowering: `staged_means` or `instance_norm`.
    pub group_norm: String,
    /// Input Y sizes `[min, max]` (inclusive) that take the graph's CPU fast path (slab layout,
    /// see `brats_model::onnx`), or null when the graph has none.
    #[serde(default)]
    pub cpu_fast_path_y: Option<[i64; 2]>,
    /// Input name.
    pub input: String,
    /// Output name.
    pub output: String,
}

/// The weights the model was exported from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightsInfo {
    /// sha256 of the weights file (safetensors bytes), hex.
    pub sha256: String,
    /// File name as given at export, when known.
    pub file: Option<String>,
}

/// What the trainer service adds when it registers a job's model (the job that produced it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TrainerJob {
    /// The training job's id.
    pub job_id: String,
    /// Free-form labels copied from the job spec.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The job's seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Epochs the job ran.
    #[serde(default)]
    pub epochs: Option<u64>,
    /// Epoch of the registered (best) weights.
    #[serde(default)]
    pub best_epoch: Option<u64>,
}

/// Contents of `metadata.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMetadata {
    /// [`SCHEMA`].
    pub schema: String,
    /// Model name.
    pub name: String,
    /// Version of the tool that wrote it.
    pub producer: String,
    /// One-line description.
    pub description: String,
    /// `{"name": "SegResNet", "config": …}` with MONAI's argument names (see
    /// [`ModelMetadata::architecture`]).
    pub network_def: serde_json::Value,
    /// MONAI-style `network_data_format` (inputs/outputs, channel_def, spatial shape rule).
    pub network_data_format: serde_json::Value,
    /// Every spatial size of the input must be a multiple of this.
    pub spatial_multiple: i64,
    /// Post-processing that turns logits into a label map, with the sliding window the model
    /// was validated with (see [`ModelMetadata::sliding_window`]).
    pub postprocessing: serde_json::Value,
    /// The ONNX file.
    pub onnx: OnnxInfo,
    /// The weights.
    pub weights: WeightsInfo,
    /// Training provenance when known, else null (see [`ModelMetadata::provenance`]).
    pub training: Option<serde_json::Value>,
    /// The job that produced the version, added by the trainer service at registration; absent
    /// in exported files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainer_job: Option<TrainerJob>,
}

/// Validation Dice as the trainer records it (the bundle's `val_mean_dice_tc/wt/et` and
/// `val_mean_dice`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct DiceScores {
    /// Tumour core.
    pub tc: f64,
    /// Whole tumour.
    pub wt: f64,
    /// Enhancing tumour.
    pub et: f64,
    /// The key metric `val_mean_dice`.
    pub mean: f64,
}

/// The part of the training provenance (`training` in `metadata.json`, also stored in the
/// weights' safetensors header) that readers rely on; the trainer writes more (recipe, seed,
/// datalist), which stays in [`Provenance::other`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Provenance {
    /// Best validation Dice (the registered weights'), when the run validated.
    #[serde(default)]
    pub validation_dice: Option<DiceScores>,
    /// Free-form labels copied from the job spec.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Label convention of the training labels.
    #[serde(default)]
    pub label_convention: Option<LabelConvention>,
    /// Preprocessing pipeline version the training data went through.
    #[serde(default)]
    pub pipeline_version: Option<String>,
    /// The run's name (the job id for service jobs).
    #[serde(default)]
    pub run: Option<String>,
    /// Everything else the trainer recorded.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// The sliding window recorded under `postprocessing.sliding_window`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowInfo {
    /// Window size X, Y, Z.
    pub roi_size: [u32; 3],
    /// Overlap fraction.
    #[serde(default)]
    pub overlap: Option<f64>,
    /// MONAI blend mode name.
    #[serde(default)]
    pub mode: Option<String>,
}

/// The network architecture under `network_def.config`, MONAI's SegResNet argument names
/// (fields the reader does not know are ignored; missing ones are None/empty).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Architecture {
    /// ResBlocks per encoder level.
    pub blocks_down: Vec<u32>,
    /// ResBlocks per decoder level.
    pub blocks_up: Vec<u32>,
    /// Channels of the first level.
    pub init_filters: Option<u32>,
    /// Input channels.
    pub in_channels: Option<u32>,
    /// Output channels.
    pub out_channels: Option<u32>,
    /// Dropout after the first convolution (None = no dropout layer).
    pub dropout_prob: Option<f64>,
}

/// Hex sha256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl ModelMetadata {
    /// Parses `metadata.json` bytes (`source` names the file in the error).
    pub fn from_slice(bytes: &[u8], source: &str) -> brats_core::error::Result<Self> {
        serde_json::from_slice(bytes)
            .map_err(|e| brats_core::CoreError::invalid(format!("{source}: not a {SCHEMA} metadata.json ({e})")))
    }

    /// The architecture from `network_def.config`, if it parses.
    pub fn architecture(&self) -> Option<Architecture> {
        serde_json::from_value(self.network_def.get("config")?.clone()).ok()
    }

    /// The sliding window under `postprocessing.sliding_window`, if recorded.
    pub fn sliding_window(&self) -> Option<WindowInfo> {
        serde_json::from_value(self.postprocessing.get("sliding_window")?.clone()).ok()
    }

    /// The training provenance, typed (default when the model was not trained here or the
    /// record does not parse).
    pub fn provenance(&self) -> Provenance {
        self.training.clone().and_then(|t| serde_json::from_value(t).ok()).unwrap_or_default()
    }

    /// The id of the job that produced the version: the registration record's, else the
    /// provenance's run name.
    pub fn training_job_id(&self) -> Option<String> {
        self.trainer_job.as_ref().map(|j| j.job_id.clone()).or_else(|| self.provenance().run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registry version's metadata.json as written before the types moved here: the trainer's
    /// export (trained provenance included) with the trainer service's registration record.
    const OLD: &str = include_str!("../tests/fixtures/metadata-v1.json");

    #[test]
    fn a_file_written_before_the_move_parses_and_reserialises_unchanged() {
        let m = ModelMetadata::from_slice(OLD.as_bytes(), "fixture").unwrap();
        assert_eq!(m.schema, SCHEMA);
        assert_eq!(m.onnx.file, "model.onnx");
        assert_eq!(m.spatial_multiple, 8);
        // Same JSON document back: nothing lost, nothing added (key order is the writer's).
        let again: serde_json::Value = serde_json::to_value(&m).unwrap();
        let before: serde_json::Value = serde_json::from_str(OLD).unwrap();
        assert_eq!(again, before);
    }

    #[test]
    fn typed_views_read_what_the_trainer_writes() {
        let m = ModelMetadata::from_slice(OLD.as_bytes(), "fixture").unwrap();
        let a = m.architecture().unwrap();
        assert_eq!(a.blocks_down, [1, 2, 2, 4]);
        assert_eq!(a.init_filters, Some(16));
        assert_eq!(a.dropout_prob, Some(0.2));
        assert_eq!(m.sliding_window().unwrap().roi_size, [32, 32, 32]);
        let p = m.provenance();
        assert_eq!(p.validation_dice.unwrap().wt, 0.5);
        assert_eq!(p.labels.get("team").map(String::as_str), Some("neuro"));
        // Written before the trainer recorded them.
        assert_eq!(p.label_convention, None);
        assert_eq!(p.pipeline_version, None);
        assert!(p.other.contains_key("recipe"));
        assert_eq!(m.training_job_id().as_deref(), Some("job-7"));
    }

    #[test]
    fn a_file_that_is_not_metadata_is_refused_with_its_name() {
        let e = ModelMetadata::from_slice(b"{\"schema\": 1}", "models/x/1/metadata.json").unwrap_err();
        assert!(e.to_string().contains("models/x/1/metadata.json"), "{e}");
    }
}
