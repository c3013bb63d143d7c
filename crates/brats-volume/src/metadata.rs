//! The metadata record that travels with every preprocessed tensor file.

use crate::labels::LabelConvention;
use serde::{Deserialize, Serialize};

/// A crop window in voxel coordinates of the original grid. `start` may be negative and
/// `start + size` may exceed the grid: those voxels were zero-padded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CropBox {
    /// First voxel of the window along X, Y, Z.
    pub start: [i64; 3],
    /// Window size along X, Y, Z.
    pub size: [usize; 3],
}

impl CropBox {
    /// The window covering a whole grid.
    pub fn full(shape: [usize; 3]) -> Self {
        CropBox { start: [0; 3], size: shape }
    }
}

/// Statistics of one input channel, taken over its non-zero voxels before normalisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ChannelStats {
    /// Modality name (t1c, t1, t2, flair).
    pub name: String,
    /// Mean of the non-zero voxels.
    pub mean: f64,
    /// Population standard deviation of the non-zero voxels (the divisor used: 1 when it was 0).
    pub std: f64,
    /// How many voxels were non-zero.
    pub nonzero_voxels: u64,
    /// Minimum of the output channel.
    pub min: f64,
    /// Maximum of the output channel.
    pub max: f64,
}

/// Everything needed to map a preprocessed tensor back onto its source grid, and to know how it
/// was produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CaseMetadata {
    /// Case identifier (never a patient name: callers choose it).
    pub case_id: String,
    /// Spatial shape of the source volumes, X, Y, Z.
    pub original_shape: [usize; 3],
    /// Spatial shape of the tensor, X, Y, Z (after cropping).
    pub shape: [usize; 3],
    /// Voxel-to-world affine of the source (row-major 4×4, RAS millimetres, as nibabel reports).
    pub affine: [[f64; 4]; 4],
    /// Voxel spacing in millimetres along X, Y, Z.
    pub spacing: [f64; 3],
    /// The crop window within the source grid.
    pub crop_box: CropBox,
    /// Label convention the label file was read with.
    pub label_convention: LabelConvention,
    /// Version of the preprocessing pipeline that produced the tensors.
    pub pipeline_version: String,
    /// Per-channel input statistics.
    pub channels: Vec<ChannelStats>,
    /// Which of the X, Y, Z axes were flipped by augmentation.
    pub flipped: [bool; 3],
    /// Multiplicative intensity factor applied (x · (1 + f)); 0 when none.
    pub intensity_scale: f64,
    /// Additive intensity offset applied; 0 when none.
    pub intensity_shift: f64,
    /// Whether a `label` tensor is present.
    pub has_label: bool,
    /// SHA-256 of each input object (images in order, then the label), for provenance and caching.
    #[serde(default)]
    pub input_sha256: Vec<String>,
}
