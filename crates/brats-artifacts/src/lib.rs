//! The contracts the trainer, inference and preprocessing share through object storage, kept
//! apart from every runtime so each side can depend on them without linking the other's:
//! this crate links neither libtorch nor ONNX Runtime.
//!
//! - [`registry`]: model versions and aliases in the store (`models/<name>/<version>/`).
//! - [`metadata`]: `metadata.json`, the typed record that travels with every model.
//! - [`manifest`]: the dataset manifest preprocessing writes and training reads.
//! - [`window`]: MONAI's sliding-window geometry and blending, generic over the network.

#![warn(missing_docs)]

pub mod manifest;
pub mod metadata;
pub mod registry;
pub mod window;

pub use manifest::{Manifest, ManifestCase};
pub use metadata::ModelMetadata;
pub use registry::Registry;
