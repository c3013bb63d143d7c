//! Volumes without storage: NIfTI-1 volumes in and out ([`nifti_io`]), tensors as safetensors
//! files with a JSON metadata record ([`tensors`], [`metadata`]), the BraTS label conventions
//! ([`labels`]), quick-look pictures of a label map ([`overlay`]), UTC calendar dates ([`time`])
//! and the classified error ([`error`]).
//!
//! Everything here is synchronous and touches no network or object store, so the client and
//! the synthetic generator can use it without the S3 client; `brats-core` adds the stores and
//! re-exports these modules under their old paths. A new volume format (a DICOM reader) goes
//! next to [`nifti_io`].

pub mod error;
pub mod labels;
pub mod metadata;
pub mod nifti_io;
pub mod overlay;
pub mod tensors;
pub mod time;

pub use error::{CoreError, ErrorKind};
pub use labels::LabelConvention;
pub use metadata::{CaseMetadata, ChannelStats, CropBox};
pub use nifti_io::{NiftiVolume, ReadLimits};

/// Names of the four input channels, in the order they are stacked.
pub const MODALITIES: [&str; 4] = ["t1c", "t1", "t2", "flair"];

/// Names of the three output channels, in tensor order.
pub const REGIONS: [&str; 3] = ["tc", "wt", "et"];
