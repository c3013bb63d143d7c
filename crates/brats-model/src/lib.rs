//! SegResNet for BraTS, interchangeable with MONAI's `brats_mri_segmentation` bundle.
//!
//! - [`SegResNet`]: the network in libtorch (`tch`), layer for layer as MONAI builds it, with
//!   parameters under MONAI's `state_dict` keys ([`SegResNetConfig::parameters`]).
//! - [`weights`]: MONAI checkpoints in (`torch.save` zip read by [`pt`] without Python, or
//!   safetensors), checked key by key; our safetensors out, which MONAI loads back.
//! - [`onnx`]: ONNX (opset 18) export written directly as protobuf, plus `metadata.json`.

#![warn(missing_docs)]

pub mod config;
pub mod error;
pub mod metadata;
pub mod onnx;
pub mod pickle;
pub mod pt;
pub mod reference;
pub mod segresnet;
pub mod tensors;
pub mod weights;
pub mod zip;

pub use config::{ParamSpec, SegResNetConfig};
pub use error::{CheckpointError, ConfigError, ExportError, InputShapeError, KeyMismatch, MisShaped, WeightsError};
pub use segresnet::SegResNet;
pub use tensors::{DType, RawTensor, StateDict};
