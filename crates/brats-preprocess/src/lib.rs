//! MONAI-exact BraTS preprocessing, as a library: what the `Preprocessor` service
//! (`brats-preprocessor`), the trainer and the inference service run.
//!
//! - [`pipeline`]: the one code path (decode, validate, normalise, label channels, crop,
//!   augment) shared by the CLI, the service and the benchmarks.
//! - [`transforms`]: MONAI's transforms as small units with one documented behaviour each.
//! - [`synthetic`]: the deterministic generator of BraTS-like cases (the `brats-synthetic`
//!   crate, re-exported under its old path).
//! - [`jobs`]: one case between object stores, with reuse of earlier results; datalist
//!   parsing and checks.
//! - [`dataset`]: a whole datalist into cached cases and a manifest (the library behind
//!   `PreprocessDataset`, also run in-process by the trainer).

pub mod dataset;
pub mod jobs;
pub mod pipeline;
pub use brats_synthetic as synthetic;
pub mod transforms;
