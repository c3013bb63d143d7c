//! The in-process segmentation pipeline: preprocess (the same code as the preprocessing
//! service), sliding-window inference, sigmoid + threshold, label map on the source grid.

use crate::postprocess;
use crate::runtime::{InferenceError, SegmentationModel};
use brats_artifacts::window::{self, Extent, SlidingWindow};
use brats_core::error::CoreError;
use brats_core::nifti_io::ReadLimits;
use brats_core::tensors::CaseTensors;
use brats_preprocess::pipeline::{self, InputFile, Options};
use brats_preprocess::transforms;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Why a segmentation failed.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// The input volumes are wrong (names the file and the fix).
    #[error(transparent)]
    Input(#[from] CoreError),
    /// The model or the runtime failed.
    #[error(transparent)]
    Inference(#[from] InferenceError),
    /// The caller cancelled (or its deadline passed); the work stopped between windows.
    #[error("cancelled")]
    Cancelled,
}

/// A finished segmentation on the source grid.
pub struct Segmentation {
    /// Label map (0, 1 = TC not ET, 2 = WT only, 4 = ET), C order `[X, Y, Z]`.
    pub label: Vec<u8>,
    /// Stitched logits `[3, X, Y, Z]` before the sigmoid, when asked for.
    pub logits: Option<Vec<f32>>,
    /// Spatial shape X, Y, Z.
    pub shape: [usize; 3],
    /// The T1c file's affine.
    pub affine: [[f64; 4]; 4],
    /// The T1c file's header (so the label map carries its orientation).
    pub header: nifti::NiftiHeader,
    /// TC, WT, ET volumes in millilitres.
    pub volumes_ml: [f64; 3],
    /// Seconds per stage: decompress, convert, normalise, inference, postprocess.
    pub timings: Vec<(String, f64)>,
}

impl Segmentation {
    /// The label map as a uint8 `.nii.gz` with the T1c file's header and affine.
    pub fn label_nifti(&self) -> Result<Vec<u8>, CoreError> {
        brats_core::nifti_io::write_nifti(&self.label, self.shape, &self.affine, Some(&self.header), Some(6))
    }
}

/// Segments one case held in memory (4 modalities in T1c, T1, T2, FLAIR order, or one 4D file).
pub fn segment(
    model: &SegmentationModel,
    images: &[InputFile],
    window: &SlidingWindow,
    keep_logits: bool,
    limits: &ReadLimits,
) -> Result<Segmentation, SegmentError> {
    segment_cancellable(model, images, window, keep_logits, limits, &AtomicBool::new(false), &mut |_, _| {})
}

/// [`segment`] that stops between windows once `cancel` is set, and reports each finished
/// window to `progress(done, total)`.
pub fn segment_cancellable(
    model: &SegmentationModel,
    images: &[InputFile],
    window: &SlidingWindow,
    keep_logits: bool,
    limits: &ReadLimits,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Segmentation, SegmentError> {
    let (tensors, stages, header) = pipeline::preprocess_with_header(images, None, &Options::default(), limits)?;
    let timings: Vec<(String, f64)> =
        stages.stages().into_iter().filter(|(s, _)| *s != "crop_augment").map(|(s, v)| (s.to_string(), v)).collect();
    infer_impl(model, Tensors::Owned(Box::new(tensors)), header, window, keep_logits, cancel, progress, timings)
}

/// The preprocessed case, borrowed (from the preprocessing service's tensors) or owned (the
/// in-process pipeline: its image can be freed once the window holds it).
enum Tensors<'a> {
    Borrowed(&'a CaseTensors),
    Owned(Box<CaseTensors>),
}

/// The part of [`segment_cancellable`] after preprocessing: sliding window, mirroring,
/// post-processing — for tensors that came from the preprocessing service. `timings` holds
/// the stages already spent.
#[allow(clippy::too_many_arguments)]
pub fn infer_preprocessed(
    model: &SegmentationModel,
    tensors: &CaseTensors,
    header: nifti::NiftiHeader,
    window: &SlidingWindow,
    keep_logits: bool,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(usize, usize),
    timings: Vec<(String, f64)>,
) -> Result<Segmentation, SegmentError> {
    infer_impl(model, Tensors::Borrowed(tensors), header, window, keep_logits, cancel, progress, timings)
}

#[allow(clippy::too_many_arguments)]
fn infer_impl(
    model: &SegmentationModel,
    tensors: Tensors<'_>,
    header: nifti::NiftiHeader,
    window: &SlidingWindow,
    keep_logits: bool,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(usize, usize),
    mut timings: Vec<(String, f64)>,
) -> Result<Segmentation, SegmentError> {
    let (metadata, borrowed, owned) = match tensors {
        Tensors::Borrowed(t) => (t.metadata.clone(), &t.image[..], None),
        Tensors::Owned(t) => {
            let t = *t;
            (t.metadata, &[][..], Some(t.image))
        }
    };
    let shape = metadata.shape;
    if cancel.load(Ordering::Relaxed) {
        return Err(SegmentError::Cancelled);
    }
    let t = Instant::now();
    // The windows cover the whole volume, or with the fast mode only the foreground's box.
    let covered = match window.extent {
        Extent::Full => Some(shape),
        Extent::Foreground { .. } => {
            window.foreground_box(owned.as_deref().unwrap_or(borrowed), 4, shape).map(|b| b.size)
        }
    };
    let total = covered.map_or(0, |s| window::window_count(s, window));
    let mut done = 0;
    let mut run_model = |w: &[f32], roi: [usize; 3]| {
        if cancel.load(Ordering::Relaxed) {
            return Err(SegmentError::Cancelled);
        }
        let out = model.run(w, [1, 4, roi[0], roi[1], roi[2]])?;
        done += 1;
        progress(done, total);
        Ok(out)
    };
    let (mut logits, kept) = match owned {
        // Without mirroring nothing needs the image after the windows are gathered.
        Some(img) if !window.mirror => (window::infer_owned(img, 4, shape, 3, window, &mut run_model)?, None),
        Some(img) => (window::infer(&img, 4, shape, 3, window, &mut run_model)?, Some(img)),
        None => (window::infer(borrowed, 4, shape, 3, window, &mut run_model)?, None),
    };
    if window.mirror {
        let image: &[f32] = kept.as_deref().unwrap_or(borrowed);
        for axis in 0..3 {
            let mut flipped = image.to_vec();
            transforms::flip(&mut flipped, 4, shape, axis);
            let mut out = window::infer(&flipped, 4, shape, 3, window, &mut run_model)?;
            transforms::flip(&mut out, 3, shape, axis);
            logits.iter_mut().zip(&out).for_each(|(a, b)| *a += b);
        }
        logits.iter_mut().for_each(|a| *a /= 4.0);
    }
    timings.push(("inference".into(), t.elapsed().as_secs_f64()));
    let t = Instant::now();
    let label = postprocess::label_map(&logits);
    let m = &metadata;
    let voxel_mm3 = determinant3(&m.affine).abs();
    let volumes_ml = postprocess::region_volumes_ml(&logits, voxel_mm3);
    timings.push(("postprocess".into(), t.elapsed().as_secs_f64()));
    Ok(Segmentation {
        label,
        logits: keep_logits.then_some(logits),
        shape,
        affine: m.affine,
        header,
        volumes_ml,
        timings,
    })
}

/// Volume of one voxel in mm³: the determinant of the affine's 3×3 part.
fn determinant3(a: &[[f64; 4]; 4]) -> f64 {
    a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1]) - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
        + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{SessionOptions, default_library};
    use brats_preprocess::synthetic::{SyntheticSpec, generate};

    /// A pointwise (1×1×1) model commutes with flips, so mirrored logits must equal plain ones:
    /// this pins down that each flipped pass is flipped back on the right axis.
    #[test]
    fn mirroring_flips_back_on_the_right_axes() {
        let onnx = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/onnx/pointwise_head.onnx"),
        )
        .unwrap();
        let model = SegmentationModel::load(&default_library(), &onnx, &SessionOptions::default()).unwrap();
        let case = generate(&SyntheticSpec::new([24, 20, 16], 5));
        let images: Vec<InputFile> = case
            .modalities
            .iter()
            .map(|m| InputFile {
                name: "m.nii".into(),
                bytes: brats_core::nifti_io::write_nifti(m, case.shape, &case.affine, None, None).unwrap().into(),
            })
            .collect();
        let plain = SlidingWindow { roi: [16, 16, 16], overlap: 0.5, ..Default::default() };
        let mirrored = SlidingWindow { mirror: true, ..plain };
        let a = segment(&model, &images, &plain, true, &ReadLimits::default()).unwrap();
        let mut windows = 0;
        let b = segment_cancellable(
            &model,
            &images,
            &mirrored,
            true,
            &ReadLimits::default(),
            &AtomicBool::new(false),
            &mut |_, t| windows = t,
        )
        .unwrap();
        assert_eq!(windows, 4 * window::window_count([24, 20, 16], &plain));
        let diff = a.logits.unwrap().iter().zip(b.logits.unwrap()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-5, "mirrored logits differ by {diff}");
        assert_eq!(a.label, b.label);
    }
}
