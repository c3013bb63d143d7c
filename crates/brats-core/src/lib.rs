//! Shared building blocks of the BraTS platform: the volume layer of `brats-volume` (NIfTI-1
//! volumes, safetensors tensors with their metadata record, BraTS label conventions, dates,
//! the classified error), re-exported here under the same paths, plus object-store handles
//! built from URLs ([`store`]).
//!
//! [`store`] wraps `object_store` so the same code reads `file://` directories and `s3://`
//! buckets; it is the only part that needs the S3 client, which is why the rest lives in
//! `brats-volume` for crates that must not link it (the client).

pub mod store;

pub use brats_volume::{MODALITIES, REGIONS, error, labels, metadata, nifti_io, overlay, tensors, time};
pub use error::{CoreError, ErrorKind};
pub use labels::LabelConvention;
pub use metadata::{CaseMetadata, ChannelStats, CropBox};
pub use nifti_io::{NiftiVolume, ReadLimits};
pub use store::{StoreConfig, StoreUri, Stores};
