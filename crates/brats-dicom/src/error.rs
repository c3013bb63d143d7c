//! What can be wrong with a study, each with a stable code (for tests, metrics and job records)
//! and a message that names the series by its hashed UID and says what to do.

use crate::select::Role;

/// What is wrong with one series.
#[derive(Debug, Clone, PartialEq)]
pub enum Problem {
    /// A required attribute is absent (or unparsable) on some slices. Slices are never
    /// dropped silently.
    MissingAttribute {
        /// The attribute's keyword.
        attribute: &'static str,
        /// Slices (frames) without it.
        slices: usize,
        /// Slices in the series.
        total: usize,
    },
    /// Slices with different orientations (a localizer, or several stacks in one series).
    MixedOrientation {
        /// Slices whose orientation differs from the first.
        slices: usize,
        /// Slices in the series.
        total: usize,
    },
    /// Slices of different sizes or pixel spacings.
    MixedFormat {
        /// What differs: "rows/columns" or "pixel spacing".
        what: &'static str,
    },
    /// Row and column directions are not unit length and orthogonal.
    BadOrientation,
    /// Two slices at the same position (4D, multi-echo or a duplicated instance).
    DuplicatePosition {
        /// Position along the slice normal, mm.
        at_mm: f64,
    },
    /// A missing slice: one step is a multiple of the others.
    Gap {
        /// Position along the normal where the gap starts, mm.
        after_mm: f64,
        /// The step found, mm.
        step_mm: f64,
        /// The series' usual step, mm.
        usual_mm: f64,
    },
    /// Steps between slices differ by more than 1 %.
    UnevenSpacing {
        /// The deviating step, mm.
        step_mm: f64,
        /// The series' usual step, mm.
        usual_mm: f64,
    },
    /// Slice positions do not lie on the normal (a sheared or tilted stack).
    Shear {
        /// Largest off-normal displacement, mm.
        off_mm: f64,
    },
    /// Too few slices to be a volume.
    TooFewSlices {
        /// Slices found.
        slices: usize,
        /// The minimum.
        minimum: usize,
    },
    /// An Enhanced MR instance without per-frame positions.
    NoFramePositions,
    /// Pixel data in a transfer syntax this build cannot decode.
    UndecodableTransferSyntax {
        /// The transfer syntax UID.
        uid: String,
    },
    /// An instance whose pixel data cannot be read (truncated or corrupt).
    Unreadable {
        /// What the decoder said (no patient data: decoder messages name tags and lengths).
        reason: String,
    },
    /// Not a grey-scale MONOCHROME2 image.
    Photometric {
        /// The photometric interpretation found.
        value: String,
        /// Samples per pixel.
        samples: u16,
    },
    /// Bits allocated other than 8, 16 or 32.
    BitDepth {
        /// Bits allocated.
        bits: u16,
    },
}

impl Problem {
    /// A stable identifier, e.g. `gap`.
    pub fn code(&self) -> &'static str {
        match self {
            Problem::MissingAttribute { .. } => "missing-attribute",
            Problem::MixedOrientation { .. } => "mixed-orientation",
            Problem::MixedFormat { .. } => "mixed-format",
            Problem::BadOrientation => "bad-orientation",
            Problem::DuplicatePosition { .. } => "duplicate-position",
            Problem::Gap { .. } => "gap",
            Problem::UnevenSpacing { .. } => "uneven-spacing",
            Problem::Shear { .. } => "shear",
            Problem::TooFewSlices { .. } => "too-few-slices",
            Problem::NoFramePositions => "no-frame-positions",
            Problem::UndecodableTransferSyntax { .. } => "undecodable-transfer-syntax",
            Problem::Unreadable { .. } => "unreadable",
            Problem::Photometric { .. } => "photometric",
            Problem::BitDepth { .. } => "bit-depth",
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::MissingAttribute { attribute, slices, total } => write!(
                f,
                "{slices} of {total} slices lack {attribute}; slices are never dropped: re-export the series with its geometry, or choose another series for this role"
            ),
            Problem::MixedOrientation { slices, total } => write!(
                f,
                "{slices} of {total} slices have another orientation (a localizer or several stacks in one series); choose a single-stack series for this role"
            ),
            Problem::MixedFormat { what } => {
                write!(f, "slices differ in {what}; a volume needs one format; choose another series for this role")
            }
            Problem::BadOrientation => {
                write!(f, "ImageOrientationPatient is not two orthogonal unit vectors; the series' geometry is corrupt")
            }
            Problem::DuplicatePosition { at_mm } => write!(
                f,
                "two slices at {at_mm:.2} mm along the normal (4D, multi-echo or duplicated instances); send one echo/time point per series"
            ),
            Problem::Gap { after_mm, step_mm, usual_mm } => write!(
                f,
                "missing slice: a {step_mm:.2} mm step after {after_mm:.2} mm where slices are {usual_mm:.2} mm apart; resend the complete series"
            ),
            Problem::UnevenSpacing { step_mm, usual_mm } => write!(
                f,
                "uneven slice spacing: a {step_mm:.3} mm step where slices are {usual_mm:.3} mm apart (more than 1 % off); resample the series to uniform spacing or choose another"
            ),
            Problem::Shear { off_mm } => write!(
                f,
                "slice positions leave the slice normal by {off_mm:.2} mm (a sheared stack, e.g. gantry tilt); resample it to an orthogonal grid first"
            ),
            Problem::TooFewSlices { slices, minimum } => {
                write!(f, "{slices} slices, fewer than the {minimum} a volume needs; choose a volumetric series")
            }
            Problem::NoFramePositions => write!(
                f,
                "an Enhanced MR instance without per-frame PlanePositionSequence; re-export it with its functional groups, or as classic single-frame MR"
            ),
            Problem::UndecodableTransferSyntax { uid } => write!(
                f,
                "pixel data in transfer syntax {uid}, which this build does not decode; have the archive send Explicit VR Little Endian (or JPEG lossless, JPEG 2000, RLE)"
            ),
            Problem::Unreadable { reason } => {
                write!(f, "pixel data cannot be read ({reason}); the file is truncated or corrupt: resend the series")
            }
            Problem::Photometric { value, samples } => write!(
                f,
                "photometric interpretation {value} with {samples} sample(s) per pixel; only grey-scale MONOCHROME2 MR is accepted"
            ),
            Problem::BitDepth { bits } => write!(f, "{bits} bits allocated per pixel; only 8, 16 and 32 are read"),
        }
    }
}

/// Why a study cannot become four volumes, or a SEG cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum DicomError {
    /// No DICOM instance under the input.
    #[error(
        "no DICOM MR instances found ({skipped} files were not DICOM); point the input at the folder holding the study"
    )]
    NoInstances {
        /// Files that were not DICOM.
        skipped: usize,
    },
    /// One series is unusable.
    #[error("series {series}{}: {problem}", role.map(|r| format!(" (chosen as {})", r.label())).unwrap_or_default())]
    Series {
        /// Hashed series UID.
        series: String,
        /// The role it was chosen for, if any.
        role: Option<Role>,
        /// What is wrong.
        problem: Problem,
    },
    /// No series qualifies for a role.
    #[error("{}: no candidate series; {}; name one with an override ({}=SERIES_UID)", role.label(), if candidates.is_empty() { "the study has no other MR series".to_string() } else { format!("considered: {}", candidates.join("; ")) }, role.name())]
    NoCandidate {
        /// The role.
        role: Role,
        /// Each series considered, hashed, with why it was not taken.
        candidates: Vec<String>,
    },
    /// Two series score the same for a role and nothing separates them.
    #[error("{}: series {first} and {second} tie (score {score}, same acquisition type, voxel size and slice count); name one with an override ({}=SERIES_UID)", role.label(), role.name())]
    Tie {
        /// The role.
        role: Role,
        /// Hashed UID of one.
        first: String,
        /// Hashed UID of the other.
        second: String,
        /// Their score.
        score: i32,
    },
    /// An override names a series that is not in the input.
    #[error("override {}=… names series {series}, which is not in the input; series present: {}", role.name(), present.join(", "))]
    UnknownOverride {
        /// The role.
        role: Role,
        /// Hashed UID asked for.
        series: String,
        /// Hashed UIDs present.
        present: Vec<String>,
    },
    /// The four series do not belong together.
    #[error("series {series} ({}) has another {what} than the T1c series {t1c}; the four series must come from one study, one patient and one frame of reference (this version does not register images)", role.label())]
    Mismatch {
        /// "frame of reference", "patient" or "study".
        what: &'static str,
        /// The role of the odd series.
        role: Role,
        /// Its hashed UID.
        series: String,
        /// The T1c's hashed UID.
        t1c: String,
    },
    /// A limit was reached.
    #[error("{what}: {found} exceeds the limit of {limit}; {fix}")]
    Limit {
        /// What was counted.
        what: &'static str,
        /// How many.
        found: usize,
        /// The limit.
        limit: usize,
        /// What to do.
        fix: &'static str,
    },
    /// A label map does not fit the segmentation's geometry.
    #[error("label map: {0}")]
    Label(String),
    /// Writing or encoding a DICOM object failed.
    #[error("writing the DICOM object failed: {0}")]
    Encode(String),
    /// Reading the input folder failed.
    #[error("reading {path}: {error}")]
    Io {
        /// The path (the caller's own).
        path: String,
        /// The OS error.
        error: std::io::Error,
    },
}

impl DicomError {
    /// A stable identifier, e.g. `gap` or `no-candidate`.
    pub fn code(&self) -> &'static str {
        match self {
            DicomError::NoInstances { .. } => "no-instances",
            DicomError::Series { problem, .. } => problem.code(),
            DicomError::NoCandidate { .. } => "no-candidate",
            DicomError::Tie { .. } => "tie",
            DicomError::UnknownOverride { .. } => "unknown-override",
            DicomError::Mismatch { what: "frame of reference", .. } => "frame-of-reference-differs",
            DicomError::Mismatch { what: "patient", .. } => "patient-differs",
            DicomError::Mismatch { .. } => "study-differs",
            DicomError::Limit { .. } => "limit",
            DicomError::Label(_) => "label",
            DicomError::Encode(_) => "encode",
            DicomError::Io { .. } => "io",
        }
    }

    /// Whether the input (not this process) is at fault.
    pub fn is_input(&self) -> bool {
        !matches!(self, DicomError::Encode(_) | DicomError::Io { .. })
    }
}
