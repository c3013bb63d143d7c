//! The whole input side: a folder of DICOM files → the four volumes the model sees.

use crate::error::{DicomError, Problem};
use crate::geometry::{Stack, Volume, check_stack};
use crate::grid::{GridMethod, common_grid};
use crate::phi::UidHasher;
use crate::pixels::read_volume;
use crate::scan::{Scan, Series, scan_dir};
use crate::select::{Role, Rules, Selection, Selector, select};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// What the output's description must say: this version's limits.
pub const PROCESSING_NOTE: &str = "research use; inputs assumed co-registered (one frame of reference, no registration), not skull-stripped or bias-corrected here";

/// Everything [`load_study`] can be told.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Selection rules.
    pub rules: Rules,
    /// Role → SeriesInstanceUID, winning over the rules.
    pub overrides: BTreeMap<Role, String>,
    /// Salt of the hashed UIDs in messages.
    pub salt: String,
    /// Most files read from the folder.
    pub max_files: usize,
    /// Most voxels in one volume.
    pub max_voxels: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            rules: Rules::default(),
            overrides: BTreeMap::new(),
            salt: crate::phi::DEFAULT_SALT.into(),
            max_files: 20_000,
            max_voxels: 1 << 27,
        }
    }
}

/// One chosen series with its checked stack.
#[derive(Debug, Clone)]
pub struct RoleSeries {
    /// Its role.
    pub role: Role,
    /// The series (headers).
    pub series: Series,
    /// Its checked geometry.
    pub stack: Stack,
}

/// The four volumes and how they were made.
#[derive(Debug, Clone)]
pub struct StudyVolumes {
    /// Which series plays each role, and why.
    pub selection: Selection,
    /// The chosen series, T1c, T1, T2, FLAIR.
    pub sources: Vec<RoleSeries>,
    /// The four volumes on one grid, T1c, T1, T2, FLAIR.
    pub volumes: Vec<Volume>,
    /// The T1c's own grid in canonical order (shape, affine): where the SEG lives.
    pub t1c_grid: ([usize; 3], crate::geometry::Affine),
    /// How the grid was made.
    pub grid: GridMethod,
    /// Files read and skipped.
    pub files: usize,
    /// Files that were not DICOM images.
    pub skipped: usize,
    /// Things a user should know that do not stop the run.
    pub warnings: Vec<String>,
}

/// A record of the run for `selection.json` and job records (UIDs, hashes and reasons; no
/// patient attributes).
#[derive(Debug, Clone, Serialize)]
pub struct Report<'a> {
    /// The selection.
    pub selection: &'a Selection,
    /// Grid method.
    pub grid: &'a GridMethod,
    /// Shape of the volumes the model sees.
    pub shape: [usize; 3],
    /// Their affine (LPS).
    pub affine_lps: [[f64; 4]; 4],
    /// Files read / not DICOM.
    pub files: usize,
    /// Files skipped.
    pub skipped: usize,
    /// Warnings.
    pub warnings: &'a [String],
    /// This version's processing limits.
    pub processing: &'static str,
}

impl StudyVolumes {
    /// The serialisable record of this load.
    pub fn report(&self) -> Report<'_> {
        Report {
            selection: &self.selection,
            grid: &self.grid,
            shape: self.volumes[0].shape,
            affine_lps: self.volumes[0].affine.0,
            files: self.files,
            skipped: self.skipped,
            warnings: &self.warnings,
            processing: PROCESSING_NOTE,
        }
    }
}

/// Reads every DICOM file under `dir` and returns the four volumes.
pub fn load_study(dir: &Path, options: &LoadOptions) -> Result<StudyVolumes, DicomError> {
    let scan = scan_dir(dir, options.max_files)?;
    load_scan(&scan, options)
}

/// [`load_study`] on headers already read.
pub fn load_scan(scan: &Scan, options: &LoadOptions) -> Result<StudyVolumes, DicomError> {
    let hasher = UidHasher::new(&options.salt);
    if scan.series.is_empty() {
        return Err(DicomError::NoInstances { skipped: scan.skipped });
    }
    let selector = Selector::new(options.rules.clone()).map_err(DicomError::Label)?;
    let selection = select(scan, &selector, &options.overrides, &hasher)?;
    load_selected(scan, selection, options)
}

/// [`load_scan`] with the series already chosen (by [`select`] on this scan), so a caller that
/// needed the selection first (the gateway derives its job id from it) does not choose twice.
pub fn load_selected(scan: &Scan, selection: Selection, options: &LoadOptions) -> Result<StudyVolumes, DicomError> {
    let hasher = UidHasher::new(&options.salt);
    let series: Vec<&Series> =
        Role::ALL.iter().map(|&r| scan.get(selection.uid(r)).expect("selected from the scan")).collect();
    check_same_study(&series, &hasher)?;
    let mut sources = Vec::with_capacity(4);
    for (&role, s) in Role::ALL.iter().zip(&series) {
        let stack = check_stack(s, &hasher, 2).map_err(|e| with_role(e, role))?;
        let voxels = stack.rows * stack.columns * stack.slices.len();
        if voxels > options.max_voxels {
            return Err(DicomError::Limit {
                what: "voxels in one series",
                found: voxels,
                limit: options.max_voxels,
                fix: "send a series of at most this size",
            });
        }
        sources.push(RoleSeries { role, series: (*s).clone(), stack });
    }
    let mut volumes = Vec::with_capacity(4);
    for src in &sources {
        volumes.push(read_volume(&src.series, &src.stack, &hasher).map_err(|e| with_role(e, src.role))?);
    }
    let t1c_grid = (volumes[0].shape, volumes[0].affine);
    let (volumes, grid) = common_grid(volumes);
    let mut warnings = Vec::new();
    let nonzero = volumes[0].data.iter().filter(|&&v| v != 0.0).count() as f64 / volumes[0].data.len() as f64;
    if nonzero > 0.5 {
        warnings.push(format!(
            "{:.0} % of the T1c's voxels are non-zero: the input looks not skull-stripped; the model was trained on skull-stripped BraTS data (0 outside the brain), so expect false positives outside the brain",
            nonzero * 100.0
        ));
    }
    Ok(StudyVolumes { selection, sources, volumes, t1c_grid, grid, files: scan.files, skipped: scan.skipped, warnings })
}

fn with_role(e: DicomError, role: Role) -> DicomError {
    match e {
        DicomError::Series { series, problem, .. } => DicomError::Series { series, role: Some(role), problem },
        other => other,
    }
}

/// The four series must share study, patient and frame of reference with the T1c.
fn check_same_study(series: &[&Series], hasher: &UidHasher) -> Result<(), DicomError> {
    let t1c = series[0].first();
    for (&role, s) in Role::ALL.iter().zip(series) {
        let first = s.first();
        if first.frame_of_reference.is_none() {
            return Err(DicomError::Series {
                series: hasher.hash(&s.uid),
                role: Some(role),
                problem: Problem::MissingAttribute {
                    attribute: "FrameOfReferenceUID",
                    slices: s.frame_count(),
                    total: s.frame_count(),
                },
            });
        }
        let mismatch =
            |what| DicomError::Mismatch { what, role, series: hasher.hash(&s.uid), t1c: hasher.hash(&t1c.series) };
        if s.instances.iter().any(|i| i.study != t1c.study) {
            return Err(mismatch("study"));
        }
        if s.instances.iter().any(|i| i.patient_id != t1c.patient_id) {
            return Err(mismatch("patient"));
        }
        if s.instances.iter().any(|i| i.frame_of_reference != t1c.frame_of_reference) {
            return Err(mismatch("frame of reference"));
        }
    }
    Ok(())
}
