//! `metadata.json` written beside an exported model, in the spirit of a MONAI bundle's
//! `configs/metadata.json` (network data format with channel definitions, plus provenance).
//!
//! The types are `brats_artifacts::metadata`'s (shared with inference, which links no
//! libtorch); what needs the network — filling them from a configuration and an export — is
//! here.

use std::path::{Path, PathBuf};

pub use brats_artifacts::metadata::{
    INPUT_CHANNELS, ModelMetadata, OUTPUT_CHANNELS, OnnxInfo, SCHEMA, WeightsInfo, sha256_hex,
};
use serde_json::json;

use crate::config::SegResNetConfig;
use crate::error::{CheckpointError, ExportError, WeightsError};
use crate::onnx::{self, ExportOptions, GroupNormLowering};
use crate::tensors::write_atomically;
use crate::weights;

/// Metadata for a model exported with `config` and `options`.
pub fn model_metadata(
    config: &SegResNetConfig,
    options: ExportOptions,
    onnx_file: &str,
    onnx_sha256: String,
    weights: WeightsInfo,
    training: Option<serde_json::Value>,
) -> ModelMetadata {
    let m = config.spatial_multiple();
    let shape = json!([format!("{m}*n"), format!("{m}*n"), format!("{m}*n")]);
    let chans = |names: &[&str]| {
        names.iter().enumerate().map(|(i, n)| (i.to_string(), json!(n))).collect::<serde_json::Map<_, _>>()
    };
    ModelMetadata {
        schema: SCHEMA.into(),
        name: "brats_mri_segmentation (SegResNet)".into(),
        producer: format!("brats-model {}", env!("CARGO_PKG_VERSION")),
        description: "3D brain tumour segmentation of multimodal MRI (BraTS): tumour core, \
                      whole tumour and enhancing tumour"
            .into(),
        network_def: json!({"name": "SegResNet", "config": config}),
        network_data_format: json!({
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "MR",
                "num_channels": config.in_channels, "spatial_shape": shape,
                "dtype": "float32", "value_range": [],
                "preprocessing": "per channel: (x - mean) / std over non-zero voxels",
                "is_patch_data": true,
                "channel_def": chans(&INPUT_CHANNELS),
            }},
            "outputs": {"logits": {
                "type": "image", "format": "segmentation",
                "num_channels": config.out_channels, "spatial_shape": shape,
                "dtype": "float32", "value_range": [],
                "is_patch_data": true,
                "channel_def": chans(&OUTPUT_CHANNELS),
            }},
        }),
        spatial_multiple: m,
        postprocessing: json!({
            "activation": "sigmoid", "threshold": 0.5,
            "label_map": "ET -> 4, else TC -> 1, else WT -> 2, else 0",
            "sliding_window": {"roi_size": [240, 240, 160], "overlap": 0.5, "mode": "constant"},
        }),
        onnx: OnnxInfo {
            file: onnx_file.into(),
            sha256: onnx_sha256,
            opset: onnx::OPSET,
            ir_version: onnx::IR_VERSION,
            precision: options.precision.name().into(),
            group_norm: match options.group_norm {
                GroupNormLowering::StagedMeans => "staged_means",
                GroupNormLowering::InstanceNorm => "instance_norm",
            }
            .into(),
            cpu_fast_path_y: onnx::fast_path_y_range(config, options).map(|(lo, hi)| [lo, hi]),
            input: onnx::INPUT_NAME.into(),
            output: onnx::OUTPUT_NAME.into(),
        },
        weights,
        training,
        trainer_job: None,
    }
}

/// What [`export_onnx_file`] wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// The ONNX file.
    pub onnx_path: PathBuf,
    /// The metadata file.
    pub metadata_path: PathBuf,
    /// The metadata written.
    pub metadata: ModelMetadata,
}

/// Default metadata location: `metadata.json` in the ONNX file's folder.
pub fn default_metadata_path(onnx_path: &Path) -> PathBuf {
    onnx_path.with_file_name("metadata.json")
}

/// Loads a weights file, exports it to `onnx_path` and writes metadata beside it
/// (`metadata_path`, or [`default_metadata_path`]). Nothing is written if the weights are bad.
pub fn export_onnx_file(
    weights_path: &Path,
    onnx_path: &Path,
    metadata_path: Option<&Path>,
    options: impl Into<ExportOptions>,
) -> Result<ExportReport, ExportError> {
    let options = options.into();
    let bytes = std::fs::read(weights_path)
        .map_err(|source| WeightsError::Checkpoint(CheckpointError::Io { path: weights_path.to_path_buf(), source }))?;
    let w = weights::load_weights_from_bytes(&bytes, &weights_path.display().to_string())?;
    let model = onnx::to_onnx_bytes(&w.config, &w.tensors, options)?;
    let metadata = model_metadata(
        &w.config,
        options,
        &onnx_path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        sha256_hex(&model),
        WeightsInfo {
            sha256: sha256_hex(&bytes),
            file: weights_path.file_name().map(|s| s.to_string_lossy().into_owned()),
        },
        w.training,
    );
    let metadata_path = metadata_path.map(Path::to_path_buf).unwrap_or_else(|| default_metadata_path(onnx_path));
    let json = serde_json::to_vec_pretty(&metadata)?;
    write_atomically(onnx_path, &model)
        .map_err(|source| ExportError::Write { path: onnx_path.to_path_buf(), source })?;
    write_atomically(&metadata_path, &json)
        .map_err(|source| ExportError::Write { path: metadata_path.clone(), source })?;
    Ok(ExportReport { onnx_path: onnx_path.to_path_buf(), metadata_path, metadata })
}
