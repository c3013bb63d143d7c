//! `metadata.json` written beside an exported model, in the spirit of a MONAI bundle's
//! `configs/metadata.json` (network data format with channel definitions, plus provenance).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::config::SegResNetConfig;
use crate::error::{CheckpointError, ExportError, WeightsError};
use crate::onnx::{self, ExportOptions, GroupNormLowering};
use crate::tensors::write_atomically;
use crate::weights;

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
    /// `{"name": "SegResNet", "config": …}` with MONAI's argument names.
    pub network_def: serde_json::Value,
    /// MONAI-style `network_data_format` (inputs/outputs, channel_def, spatial shape rule).
    pub network_data_format: serde_json::Value,
    /// Every spatial size of the input must be a multiple of this.
    pub spatial_multiple: i64,
    /// Post-processing that turns logits into a label map.
    pub postprocessing: serde_json::Value,
    /// The ONNX file.
    pub onnx: OnnxInfo,
    /// The weights.
    pub weights: WeightsInfo,
    /// Training provenance (datalist, epochs, metrics, …) when known, else null.
    pub training: Option<serde_json::Value>,
}

/// Hex sha256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl ModelMetadata {
    /// Metadata for a model exported with `config` and `options`.
    pub fn new(
        config: &SegResNetConfig,
        options: ExportOptions,
        onnx_file: &str,
        onnx_sha256: String,
        weights: WeightsInfo,
        training: Option<serde_json::Value>,
    ) -> Self {
        let m = config.spatial_multiple();
        let shape = json!([format!("{m}*n"), format!("{m}*n"), format!("{m}*n")]);
        let chans = |names: &[&str]| {
            names.iter().enumerate().map(|(i, n)| (i.to_string(), json!(n))).collect::<serde_json::Map<_, _>>()
        };
        Self {
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
        }
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
    let metadata = ModelMetadata::new(
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
