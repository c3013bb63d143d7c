//! The brats.v1 gRPC contract compiled for tonic.
//!
//! The `.proto` files under `proto/brats/v1/` at the workspace root are the public API of the
//! platform's three services:
//!
//! - **Preprocessor** (`preprocess.proto`): NIfTI volumes in, normalised and cropped safetensors
//!   tensors plus a JSON metadata sidecar out, cached in the object store.
//! - **Trainer** (`trainer.proto`): SegResNet training jobs with the MONAI
//!   `brats_mri_segmentation` bundle's hyper-parameters as defaults, watched as event streams.
//! - **Inference** (`inference.proto`): segmentation of a case by URI or over a chunked stream,
//!   and discovery of registered models.
//! - **Gateway** (`gateway.proto`): the PACS gateway's study jobs (DICOM in, DICOM SEG out):
//!   submit a study from a DICOMweb archive, get, list and watch jobs, check a destination.
//!
//! Shared messages live in `common.proto`. Everything is generated into [`brats::v1`]: messages
//! at the module root, and for each service a `<service>_client` module (e.g.
//! [`brats::v1::preprocessor_client::PreprocessorClient`]) and a `<service>_server` module (e.g.
//! the [`brats::v1::preprocessor_server::Preprocessor`] trait and
//! [`brats::v1::preprocessor_server::PreprocessorServer`]).
//!
//! [`FILE_DESCRIPTOR_SET`] holds the encoded descriptors of all five files, for registering the
//! services with `tonic-reflection`.

#![warn(missing_docs)]

/// Generated protobuf packages, mirroring the proto package hierarchy.
pub mod brats {
    /// Version 1 of the brats API (proto package `brats.v1`): messages, enums, and the tonic
    /// clients and servers of the `Preprocessor`, `Trainer`, `Inference` and `Gateway` services.
    pub mod v1 {
        #![allow(missing_docs)]
        #![allow(clippy::all, clippy::pedantic, clippy::nursery)]
        tonic::include_proto!("brats.v1");
    }
}

/// Encoded `google.protobuf.FileDescriptorSet` of `proto/brats/v1/*.proto` (with their
/// imports), for `tonic_reflection::server::Builder::register_encoded_file_descriptor_set`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("brats_v1_descriptor");

pub use brats::v1;

/// A protobuf timestamp from milliseconds since the Unix epoch (the unit our job records and
/// object stores keep); negative values are before 1970, with `nanos` kept non-negative as the
/// Timestamp contract requires.
pub fn timestamp_from_ms(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}
