//! The training data path: preprocessed cases held in memory or streamed from the store, the
//! bundle's augmentation drawn
//! per sample from a seed, torch's `DistributedSampler`, and loader threads that build batches
//! ahead of the training loop.
//!
//! Reproducibility is by construction rather than by scheduling: every sample's augmentation
//! comes from [`sample_seed`]`(job_seed, epoch, dataset_index)`, the sampler's permutation from
//! `(seed, epoch)` alone, and the loader hands batches out in sampler order whichever thread
//! finished first. A resumed job, a different worker count, or another rank asking for the same
//! `(epoch, index)` therefore sees the same voxels.

mod augment;
mod cases;
mod loader;
mod sampler;
#[cfg(test)]
mod tests;

pub use augment::{Augment, Sample, sample, sample_seed};
pub use cases::{CachedCase, CaseCache, Cases, load_cases};
pub use loader::{Batch, Loader};
pub use sampler::{DistributedSampler, validation_shard};

use brats_core::error::CoreError;

/// Image channels (T1c, T1, T2, FLAIR).
pub const IMAGE_CHANNELS: usize = 4;
/// Label channels (TC, WT, ET).
pub const LABEL_CHANNELS: usize = 3;

/// Errors of the data path; each names the case or setting and the fix.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Reading or decoding a case's tensors failed.
    #[error("case '{case}': {source}")]
    Load {
        /// The case id.
        case: String,
        /// The store or format error, which names the object.
        #[source]
        source: CoreError,
    },
    /// A case's buffers do not agree with its shape, or its label is not binary.
    #[error("case '{case}': {reason}")]
    InvalidCase {
        /// The case id.
        case: String,
        /// What is inconsistent.
        reason: String,
    },
    /// A training case without label channels.
    #[error("case '{case}' has no label; training needs the TC/WT/ET label channels (preprocess it with its label)")]
    MissingLabel {
        /// The case id.
        case: String,
    },
    /// A sampler, augmentation or loader setting no caller could mean.
    #[error("{0}")]
    InvalidConfig(String),
    /// A loader worker panicked or a blocking decode task failed.
    #[error("data loader: {0}")]
    Worker(String),
    /// Building a batch tensor failed.
    #[error("batch tensor: {0}")]
    Tensor(#[from] tch::TchError),
}

/// Result alias of this module.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
