//! Every file under a folder → parsed headers grouped into series.
//!
//! Any depth, any file names: archives and export tools name files arbitrarily. Files that are
//! not DICOM (DICOMDIR indices excepted, which parse but hold no image) are counted and skipped;
//! the same SOP instance found twice is read once.

use crate::error::DicomError;
use crate::instance::Instance;
use dicom_dictionary_std::tags;
use dicom_object::OpenFileOptions;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The instances of one series.
#[derive(Debug, Clone)]
pub struct Series {
    /// SeriesInstanceUID.
    pub uid: String,
    /// Its instances, in path order.
    pub instances: Vec<Instance>,
}

impl Series {
    /// The first instance (series-level attributes are read from it).
    pub fn first(&self) -> &Instance {
        &self.instances[0]
    }

    /// Frames over all instances (slices of a classic series).
    pub fn frame_count(&self) -> usize {
        self.instances.iter().map(|i| i.frames.len()).sum()
    }
}

/// What a folder holds.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    /// Series by UID order.
    pub series: Vec<Series>,
    /// Files that were not DICOM (or lacked the identifying UIDs).
    pub skipped: usize,
    /// Files read.
    pub files: usize,
}

impl Scan {
    /// The series with this UID.
    pub fn get(&self, uid: &str) -> Option<&Series> {
        self.series.iter().find(|s| s.uid == uid)
    }
}

/// Lists the regular files under `dir` (recursively, sorted), refusing more than `max_files`.
pub fn list_files(dir: &Path, max_files: usize) -> Result<Vec<PathBuf>, DicomError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|error| DicomError::Io { path: d.display().to_string(), error })?;
        for entry in entries {
            let entry = entry.map_err(|error| DicomError::Io { path: d.display().to_string(), error })?;
            let kind = entry
                .file_type()
                .map_err(|error| DicomError::Io { path: entry.path().display().to_string(), error })?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                out.push(entry.path());
                if out.len() > max_files {
                    return Err(DicomError::Limit {
                        what: "files under the input folder",
                        found: out.len(),
                        limit: max_files,
                        fix: "point the input at one study's folder",
                    });
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Parses one file's header (up to the pixel data); `None` when it is not a DICOM image file.
pub fn read_header(path: &Path) -> Option<Instance> {
    let obj = OpenFileOptions::new().read_until(tags::PIXEL_DATA).open_file(path).ok()?;
    let ts = obj.meta().transfer_syntax().to_string();
    Instance::parse(path.to_path_buf(), &ts, &obj)
}

/// Reads the headers of `files` (in parallel) and groups them into series.
pub fn scan_files(files: &[PathBuf]) -> Scan {
    let parsed: Vec<Option<Instance>> = files.par_iter().map(|p| read_header(p)).collect();
    let mut skipped = 0;
    let mut by_series: BTreeMap<String, Vec<Instance>> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for inst in parsed {
        match inst {
            None => skipped += 1,
            Some(i) => {
                if seen.insert(i.sop_instance.clone()) {
                    by_series.entry(i.series.clone()).or_default().push(i);
                }
            }
        }
    }
    Scan {
        series: by_series.into_iter().map(|(uid, instances)| Series { uid, instances }).collect(),
        skipped,
        files: files.len(),
    }
}

/// [`list_files`] then [`scan_files`].
pub fn scan_dir(dir: &Path, max_files: usize) -> Result<Scan, DicomError> {
    Ok(scan_files(&list_files(dir, max_files)?))
}
