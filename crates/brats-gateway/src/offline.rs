//! `volumes` and `segment`: the whole DICOM path in one process, on the code the service uses.

use brats_artifacts::window::SlidingWindow;
use brats_core::nifti_io::{ReadLimits, write_nifti};
use brats_dicom::geometry::{Affine, Volume};
use brats_dicom::grid::{GridMethod, resample};
use brats_dicom::seg::{SegOptions, WrittenSeg, write_seg};
use brats_dicom::{DicomError, Role, StudyVolumes};
use brats_inference::runtime::SegmentationModel;
use brats_inference::segment::{SegmentError, segment};
use brats_preprocess::pipeline::InputFile;
use std::path::Path;
use std::time::Instant;

/// Why the DICOM path failed.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The study is unusable as sent (a named, fixable problem).
    #[error(transparent)]
    Input(#[from] DicomError),
    /// The volumes were refused by the model's preprocessing (names the problem).
    #[error(transparent)]
    Segment(#[from] SegmentError),
    /// Writing outputs failed.
    #[error("{0}")]
    Output(String),
}

/// The four volumes as NIfTI files, T1c, T1, T2, FLAIR (float32, RAS affine: what the
/// preprocessing service reads). `gzip` compresses them (for files a person opens).
pub fn volume_files(study: &StudyVolumes, gzip: bool) -> Result<Vec<(String, Vec<u8>)>, GatewayError> {
    Role::ALL
        .iter()
        .zip(&study.volumes)
        .map(|(role, v)| {
            let bytes = write_nifti(&v.data, v.shape, &v.affine.to_ras(), None, gzip.then_some(6))
                .map_err(|e| GatewayError::Output(format!("encoding {}: {e}", role.name())))?;
            let name = format!("{}.nii{}", role.name(), if gzip { ".gz" } else { "" });
            Ok((name, bytes))
        })
        .collect()
}

/// Writes `files` into `dir` (created if needed), each through a temporary name and a rename,
/// so a reader never sees a half-written file.
pub fn write_files(dir: &Path, files: &[(String, Vec<u8>)]) -> Result<(), GatewayError> {
    std::fs::create_dir_all(dir).map_err(|e| GatewayError::Output(format!("creating {}: {e}", dir.display())))?;
    for (name, bytes) in files {
        write_atomically(&dir.join(name), bytes)?;
    }
    Ok(())
}

/// Writes one file through a temporary sibling and a rename.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), GatewayError> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, path)).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        GatewayError::Output(format!("writing {}: {e}", path.display()))
    })
}

/// A finished DICOM segmentation.
pub struct DicomSegmentation {
    /// The SEG.
    pub seg: WrittenSeg,
    /// The label map on the T1c's grid (canonical C order).
    pub label: Vec<u8>,
    /// Shape and affine of that grid.
    pub grid: ([usize; 3], Affine),
    /// TC, WT, ET in millilitres (on the T1c's grid).
    pub volumes_ml: [f64; 3],
    /// Seconds per stage.
    pub timings: Vec<(String, f64)>,
    /// The quick-look picture (labels over the T1c, three planes through the tumour).
    pub quick_look: brats_core::overlay::Rgb,
    /// The same picture as a DICOM Secondary Capture in the study.
    pub capture: brats_dicom::sc::WrittenCapture,
}

impl DicomSegmentation {
    /// The label map as a `.nii.gz` on the T1c's grid (RAS affine).
    pub fn label_nifti(&self) -> Result<Vec<u8>, GatewayError> {
        write_nifti(&self.label, self.grid.0, &self.grid.1.to_ras(), None, Some(6))
            .map_err(|e| GatewayError::Output(format!("encoding the label map: {e}")))
    }
}

/// What the model gave on the study's common grid (the grid of [`StudyVolumes::volumes`]).
pub struct ModelOutput {
    /// The label map (BraTS 2018 labels, canonical C order).
    pub label: Vec<u8>,
    /// Its shape.
    pub shape: [usize; 3],
    /// Sigmoid probabilities `[3, X, Y, Z]` (TC, WT, ET); needed only when the grids were
    /// resampled (to bring the labels back to the T1c's own grid).
    pub probabilities: Option<Vec<f32>>,
    /// Seconds per stage.
    pub timings: Vec<(String, f64)>,
}

/// Runs the in-process model on the study's four volumes (the same `brats_inference::segment`
/// as the NIfTI path, fed the same NIfTI-shaped files).
pub fn run_model(
    study: &StudyVolumes,
    model: &SegmentationModel,
    window: &SlidingWindow,
) -> Result<ModelOutput, GatewayError> {
    let mut timings = Vec::new();
    let t = Instant::now();
    let files: Vec<InputFile> =
        volume_files(study, false)?.into_iter().map(|(name, bytes)| InputFile { name, bytes: bytes.into() }).collect();
    timings.push(("encode_volumes".to_string(), t.elapsed().as_secs_f64()));
    let resampled = matches!(study.grid, GridMethod::Resampled { .. });
    let result = segment(model, &files, window, resampled, &ReadLimits::default())?;
    timings.extend(result.timings.iter().cloned());
    let probabilities = result.logits.as_ref().map(|l| l.iter().map(|&v| 1.0 / (1.0 + (-v).exp())).collect());
    Ok(ModelOutput { label: result.label, shape: result.shape, probabilities, timings })
}

/// Segments the loaded study in-process: [`run_model`], then [`finish`].
pub fn segment_study(
    study: &StudyVolumes,
    model: &SegmentationModel,
    window: &SlidingWindow,
    options: &SegOptions,
) -> Result<DicomSegmentation, GatewayError> {
    finish(study, run_model(study, model, window)?, options)
}

/// From the model's output to the DICOM results: labels brought back to the T1c's own grid
/// (exactly when the grids are shared; else the three probabilities are resampled trilinearly
/// and thresholded at 0.5), the SEG, the quick look, the volumes.
pub fn finish(
    study: &StudyVolumes,
    output: ModelOutput,
    options: &SegOptions,
) -> Result<DicomSegmentation, GatewayError> {
    let ModelOutput { label: model_label, shape: model_shape, probabilities, mut timings } = output;
    let t = Instant::now();
    let (shape, affine) = study.t1c_grid;
    let resampled = matches!(study.grid, GridMethod::Resampled { .. });
    let label = if resampled {
        let probabilities = probabilities.as_ref().ok_or_else(|| {
            GatewayError::Output("the grids were resampled but the model output has no probabilities".into())
        })?;
        let n = model_shape.iter().product::<usize>();
        let common = &study.volumes[0];
        let channel = |c: usize| {
            let data = probabilities[c * n..(c + 1) * n].to_vec();
            resample(&Volume { shape: common.shape, affine: common.affine, data }, shape, &affine).data
        };
        let (tc, wt, et) = (channel(0), channel(1), channel(2));
        (0..tc.len())
            .map(|i| {
                if et[i] >= 0.5 {
                    4
                } else if tc[i] >= 0.5 {
                    1
                } else if wt[i] >= 0.5 {
                    2
                } else {
                    0
                }
            })
            .collect()
    } else {
        model_label.clone()
    };
    timings.push(("to_t1c_grid".to_string(), t.elapsed().as_secs_f64()));
    let t = Instant::now();
    let seg = write_seg(&label, &study.sources, options)?;
    timings.push(("write_seg".to_string(), t.elapsed().as_secs_f64()));
    let t = Instant::now();
    let quick_look = brats_core::overlay::overlay(&study.volumes[0].data, &model_label, model_shape);
    let capture = brats_dicom::sc::write_secondary_capture(
        &quick_look,
        &study.sources[0],
        options.series_number + 1,
        &options.manufacturer,
    )?;
    timings.push(("quick_look".to_string(), t.elapsed().as_secs_f64()));
    let voxel_ml = affine.zooms().iter().product::<f64>() / 1000.0;
    let count = |f: &dyn Fn(u8) -> bool| label.iter().filter(|&&v| f(v)).count() as f64 * voxel_ml;
    let volumes_ml = [count(&|v| v == 1 || v == 4), count(&|v| v != 0), count(&|v| v == 4)];
    Ok(DicomSegmentation { seg, label, grid: (shape, affine), volumes_ml, timings, quick_look, capture })
}
