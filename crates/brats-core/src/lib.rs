//! Shared building blocks of the BraTS platform: NIfTI-1 volumes in and out, tensors as
//! safetensors files with a JSON metadata record, object-store handles built from URLs, and the
//! BraTS label conventions.
//!
//! Everything here is synchronous and free of network servers except [`store`], which wraps
//! `object_store` so the same code reads `file://` directories and `s3://` buckets.

pub mod error;
pub mod labels;
pub mod metadata;
pub mod nifti_io;
pub mod store;
pub mod tensors;
pub mod time;

pub use error::{CoreError, ErrorKind};
pub use labels::LabelConvention;
pub use metadata::{CaseMetadata, ChannelStats, CropBox};
pub use nifti_io::{NiftiVolume, ReadLimits};
pub use store::{StoreConfig, StoreUri, Stores};

/// Names of the four input channels, in the order they are stacked.
pub const MODALITIES: [&str; 4] = ["t1c", "t1", "t2", "flair"];

/// Names of the three output channels, in tensor order.
pub const REGIONS: [&str; 3] = ["tc", "wt", "et"];
