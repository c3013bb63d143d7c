//! ONNX Runtime inference for SegResNet segmentation models.
//!
//! The runtime library is loaded at run time (`ort`'s `load-dynamic`: the ONNX Runtime 1.31
//! shared library that `scripts/bootstrap.sh` installs, named by `ORT_DYLIB_PATH`), so the
//! binaries build without it and report a clear error when it is missing.
//!
//! `brats_artifacts::window` places and blends sliding windows exactly like MONAI; [`postprocess`] turns
//! logits into the BraTS label map and region volumes.
//!
//! [`SegmentationModel`] enforces the platform's model contract: input `image`
//! `[N, 4, X, Y, Z]` float32, output `logits` `[N, 3, X, Y, Z]` float32.

/// The label map's file name under a request's output prefix (and in `SegmentStream`'s
/// `StreamOutputs`), as `inference.proto` documents it.
pub const LABEL_MAP_FILE: &str = "seg.nii.gz";
/// The probabilities' file name (`SegmentOptions.write_probabilities`): one float32 tensor
/// `probabilities` of shape [3, X, Y, Z], as `inference.proto` documents it.
pub const PROBABILITIES_FILE: &str = "probabilities.safetensors";

pub mod catalog;
pub mod cli;
pub mod config;
pub mod models;
pub mod postprocess;
pub mod runtime;
pub mod segment;
pub mod server;
pub mod service;
pub mod stream;
pub mod upload;

pub use runtime::{InferenceError, SegmentationModel, SessionOptions};
