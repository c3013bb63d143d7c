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

pub mod catalog;
pub mod config;
pub mod models;
pub mod postprocess;
pub mod runtime;
pub mod segment;
pub mod server;
pub mod service;
pub mod stream;

pub use runtime::{InferenceError, SegmentationModel, SessionOptions};
