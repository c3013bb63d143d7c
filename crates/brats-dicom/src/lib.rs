//! DICOM without a network: MR studies into the four volumes the model sees, and the model's
//! label map back out as a DICOM Segmentation.
//!
//! The path, in order (each step its own module):
//! - [`scan`]: every file under a directory → parsed headers ([`instance::Instance`]), grouped
//!   into series; files that are not DICOM are counted, never fatal.
//! - [`select`]: the four roles (T1c, T1, T2, FLAIR) chosen by rules and scores over
//!   description, protocol, contrast agent, sequence timing and image type, with explicit
//!   overrides; every choice and rejection is recorded with its reason.
//! - [`geometry`]: one series → one checked stack (one orientation, uniform spacing, no gaps,
//!   duplicates or shear, positions present), sorted by position along the normal, with its
//!   affine; [`pixels`] decodes it (rescale applied) into the canonical voxel order.
//! - [`grid`]: the four volumes on one grid — untouched when they already share one, else
//!   resampled (trilinear) onto a 1 mm grid covering the T1c's field of view.
//! - [`seg`]: a BINARY DICOM Segmentation on the T1c's own geometry; [`sc`]: the same result
//!   as a quick-look Secondary Capture picture, for viewers without SEG support.
//!
//! [`study::load_study`] runs the whole input side. Errors name a series by a salted hash of its
//! UID ([`phi::UidHasher`]) and never carry patient data.

pub mod error;
pub mod geometry;
pub mod grid;
pub mod instance;
pub mod phi;
pub mod pixels;
pub mod sc;
pub mod scan;
pub mod seg;
pub mod select;
pub mod study;
mod values;

pub use error::{DicomError, Problem};
pub use geometry::{Affine, Volume};
pub use select::Role;
pub use study::{LoadOptions, StudyVolumes, load_study};
