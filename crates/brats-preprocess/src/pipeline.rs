//! The one preprocessing path that the CLI, the service and the benchmarks share: decode the
//! modalities, check they share a grid, normalise, convert the label, crop and augment.

use crate::transforms;
use brats_core::MODALITIES;
use brats_core::error::{CoreError, Result};
use brats_core::labels::LabelConvention;
use brats_core::metadata::{CaseMetadata, CropBox};
use brats_core::nifti_io::{self, NiftiInfo, ReadLimits};
use brats_core::tensors::CaseTensors;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::time::Instant;

/// Version of this pipeline; part of every cache key, so outputs of older versions are never
/// mistaken for current ones. Bump it whenever outputs could change.
pub const PIPELINE_VERSION: &str = "brats-preprocess/1";

/// How to crop the normalised case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CropMode {
    /// Keep the whole volume (the inference path).
    #[default]
    None,
    /// MONAI `CenterSpatialCrop`.
    Center,
    /// MONAI `RandSpatialCrop` (training), start drawn from the seed.
    Random,
    /// MONAI `CropForeground` on x > 0, size padded to a multiple of `foreground_multiple`.
    Foreground,
}

impl CropMode {
    /// Parses `none|center|random|foreground`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Self::None),
            "center" => Ok(Self::Center),
            "random" => Ok(Self::Random),
            "foreground" => Ok(Self::Foreground),
            _ => Err(CoreError::invalid(format!("crop '{s}' is unknown: use none, center, random or foreground"))),
        }
    }
}

/// Every knob of the pipeline; serialised into the cache key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Options {
    /// Label convention of the label file.
    pub label_convention: LabelConvention,
    /// Crop mode.
    pub crop: CropMode,
    /// Crop size X, Y, Z for center/random crops (MONAI bundle: 224, 224, 144).
    pub crop_size: [usize; 3],
    /// Foreground box size multiple (MONAI `k_divisible`).
    pub foreground_multiple: usize,
    /// Flip each axis with probability `flip_prob` (MONAI `RandFlipd`, one per axis).
    pub random_flip: bool,
    /// Flip probability per axis.
    pub flip_prob: f64,
    /// `RandScaleIntensity(factors)`: f ~ U(−s, s), x · (1 + f); 0 = off.
    pub intensity_scale: f32,
    /// `RandShiftIntensity(offsets)`: o ~ U(−s, s), x + o; 0 = off.
    pub intensity_shift: f32,
    /// Seed of every random draw.
    pub seed: u64,
    /// Largest grid affines may differ by (absolute, per element) and still count as one grid.
    pub affine_tolerance: f64,
}

/// The seed a case draws from when its request gives none: the first 8 bytes (little-endian) of
/// SHA-256 of its id. Every case of a dataset then draws differently but reproducibly, and a case
/// preprocessed alone draws as it does in its dataset.
pub fn case_seed(case_id: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(case_id.as_bytes());
    u64::from_le_bytes(digest[..8].try_into().expect("SHA-256 has 32 bytes"))
}

impl Default for Options {
    fn default() -> Self {
        Options {
            label_convention: LabelConvention::Brats2018,
            crop: CropMode::None,
            crop_size: [224, 224, 144],
            foreground_multiple: 8,
            random_flip: false,
            flip_prob: 0.5,
            intensity_scale: 0.0,
            intensity_shift: 0.0,
            seed: 0,
            affine_tolerance: 1e-3,
        }
    }
}

impl Options {
    /// Rejects values no caller could mean, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.crop_size.iter().any(|&s| s == 0 || s > 1024) {
            return Err(CoreError::invalid(format!(
                "crop_size {:?}: each size must be in 1..=1024 (MONAI bundle: 224,224,144)",
                self.crop_size
            )));
        }
        if !(0.0..=1.0).contains(&self.flip_prob) {
            return Err(CoreError::invalid(format!("flip_prob {} must be within 0..=1", self.flip_prob)));
        }
        for (name, v) in [("intensity_scale", self.intensity_scale), ("intensity_shift", self.intensity_shift)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(CoreError::invalid(format!("{name} {v} must be within 0..=1 (MONAI bundle: 0.1)")));
            }
        }
        if self.foreground_multiple == 0 || self.foreground_multiple > 256 {
            return Err(CoreError::invalid("foreground_multiple must be in 1..=256 (default 8)"));
        }
        Ok(())
    }
}

/// The random values one run used, recorded so a run can be reproduced or compared with MONAI.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Draws {
    /// Random crop start per axis (ignored by other crop modes).
    pub crop_start: [usize; 3],
    /// Which axes to flip.
    pub flips: [bool; 3],
    /// Intensity factor f (x · (1 + f)).
    pub scale: f64,
    /// Intensity offset o (x + o).
    pub shift: f64,
}

impl Draws {
    /// Draws, in MONAI's order (crop, flip X, Y, Z, scale, shift), from a ChaCha8 stream seeded
    /// with `options.seed`; only the enabled transforms draw.
    pub fn draw(options: &Options, shape: [usize; 3]) -> Draws {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(options.seed);
        let mut d = Draws::default();
        if options.crop == CropMode::Random {
            for ((start, &size), &roi) in d.crop_start.iter_mut().zip(&shape).zip(&options.crop_size) {
                *start = if size > roi { rng.random_range(0..=size - roi) } else { 0 };
            }
        }
        if options.random_flip {
            for f in d.flips.iter_mut() {
                *f = rng.random::<f64>() < options.flip_prob;
            }
        }
        if options.intensity_scale > 0.0 {
            d.scale = rng.random_range(-(options.intensity_scale as f64)..options.intensity_scale as f64);
        }
        if options.intensity_shift > 0.0 {
            d.shift = rng.random_range(-(options.intensity_shift as f64)..options.intensity_shift as f64);
        }
        d
    }
}

/// One input file held in memory, with the name errors should use.
#[derive(Debug, Clone)]
pub struct InputFile {
    /// File name or URI, used in error messages only.
    pub name: String,
    /// The file's bytes (`.nii` or `.nii.gz`).
    pub bytes: bytes::Bytes,
}

/// Seconds spent in each stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Gzip inflation of all inputs.
    pub decompress: f64,
    /// Header parsing, type conversion, reordering and grid checks.
    pub convert: f64,
    /// Intensity normalisation and label conversion.
    pub normalise: f64,
    /// Crop and augmentations.
    pub crop_augment: f64,
}

impl Timings {
    /// Stage names and seconds, in pipeline order.
    pub fn stages(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("decompress", self.decompress),
            ("convert", self.convert),
            ("normalise", self.normalise),
            ("crop_augment", self.crop_augment),
        ]
    }
}

/// Runs the whole pipeline on files already in memory.
pub fn preprocess(
    images: &[InputFile],
    label: Option<&InputFile>,
    options: &Options,
    limits: &ReadLimits,
) -> Result<(CaseTensors, Timings)> {
    preprocess_with_header(images, label, options, limits).map(|(t, timings, _)| (t, timings))
}

/// [`preprocess`], also returning the first image's NIfTI header, so outputs written on the
/// source grid (label maps) can carry the input's orientation and description.
pub fn preprocess_with_header(
    images: &[InputFile],
    label: Option<&InputFile>,
    options: &Options,
    limits: &ReadLimits,
) -> Result<(CaseTensors, Timings, nifti::NiftiHeader)> {
    options.validate()?;
    if images.len() != 4 && images.len() != 1 {
        return Err(CoreError::invalid(format!(
            "image: {} files given; give 4 (T1c, T1, T2, FLAIR in that order) or one 4D file with 4 volumes",
            images.len()
        )));
    }
    let mut timings = Timings::default();
    let t = Instant::now();
    let max_out = nifti_io::max_decompressed(limits);
    let mut files: Vec<&InputFile> = images.iter().collect();
    files.extend(label);
    // Plain `.nii` inputs are borrowed, not copied.
    let raw: Vec<Cow<[u8]>> =
        files.par_iter().map(|f| nifti_io::decompress(&f.bytes, &f.name, max_out)).collect::<Result<_>>()?;
    timings.decompress = t.elapsed().as_secs_f64();

    let t = Instant::now();
    // Headers first (all validation but the voxel values), so the voxels can be decoded
    // straight into their channel of the stacked `[4, X, Y, Z]` image.
    let mut infos: Vec<NiftiInfo> = files
        .par_iter()
        .zip(raw.par_iter())
        .map(|(f, r)| nifti_io::read_info(r, &f.name, limits))
        .collect::<Result<_>>()?;
    let label_info = if label.is_some() { infos.pop() } else { None };
    let (shape, frames, affine, spacing) = (infos[0].shape, infos[0].frames, infos[0].affine, infos[0].spacing);
    let n: usize = shape.iter().product();
    // The layout every valid case has: 4 single-frame files or one 4-frame file, one shape.
    let stackable =
        if images.len() == 1 { frames == 4 } else { infos.iter().all(|i| i.frames == 1 && i.shape == shape) };
    let mut image = vec![0f32; if stackable { 4 * n } else { 0 }];
    // Cases that will be rejected below are still decoded (into scratch buffers), so that
    // NaN/Inf in a file is reported before a grid mismatch, as reading file by file would.
    let mut scratch: Vec<Vec<f32>> =
        if stackable { Vec::new() } else { infos.iter().map(|i| vec![0f32; i.len()]).collect() };
    let mut label_data = label_info.as_ref().map(|i| vec![0f32; i.len()]).unwrap_or_default();
    {
        let mut targets: Vec<&mut [f32]> = if stackable {
            image.chunks_mut(if images.len() == 1 { 4 * n } else { n }).collect()
        } else {
            scratch.iter_mut().map(|v| v.as_mut_slice()).collect()
        };
        let mut jobs: Vec<(&InputFile, &[u8], &NiftiInfo, &mut [f32])> = Vec::with_capacity(files.len());
        for (((f, r), i), out) in images.iter().zip(&raw).zip(&infos).zip(targets.drain(..)) {
            jobs.push((f, r, i, out));
        }
        if let (Some(lf), Some(li)) = (label, &label_info) {
            jobs.push((lf, &raw[images.len()], li, label_data.as_mut_slice()));
        }
        jobs.into_par_iter().try_for_each(|(f, r, i, out)| nifti_io::decode_into(r, i, &f.name, out))?;
    }
    drop(scratch);
    drop(raw);
    if images.len() == 1 && frames != 4 {
        return Err(CoreError::invalid(format!(
            "{}: a single image file must be 4D with 4 volumes (T1c, T1, T2, FLAIR); it has {frames}",
            images[0].name
        )));
    }
    for (f, v) in images.iter().zip(&infos) {
        if images.len() == 4 && v.frames != 1 {
            return Err(CoreError::invalid(format!(
                "{}: has {} volumes; each of the 4 modality files must be 3D",
                f.name, v.frames
            )));
        }
        check_same_grid(v, &f.name, &infos[0], &images[0].name, options.affine_tolerance)?;
    }
    if let (Some(li), Some(lf)) = (&label_info, label) {
        if li.frames != 1 {
            return Err(CoreError::invalid(format!(
                "{}: a label must be one 3D volume, it has {} volumes",
                lf.name, li.frames
            )));
        }
        check_same_grid(li, &lf.name, &infos[0], &images[0].name, options.affine_tolerance)?;
    }
    if !stackable {
        return Err(CoreError::Internal("image files of different layouts passed the grid checks".into()));
    }
    let header = infos.swap_remove(0).header;
    drop(infos);
    timings.convert = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let channels: Vec<_> = image
        .par_chunks_mut(n)
        .zip(MODALITIES.par_iter())
        .map(|(c, name)| transforms::normalize_nonzero(c, name))
        .collect();
    let mut label_channels = match (&label_info, label) {
        (Some(_), Some(lf)) => Some(options.label_convention.to_channels(&label_data, &lf.name)?),
        _ => None,
    };
    drop(label_data);
    timings.normalise = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let draws = Draws::draw(options, shape);
    let crop_box = match options.crop {
        CropMode::None => CropBox::full(shape),
        CropMode::Center => transforms::center_crop_box(shape, options.crop_size),
        CropMode::Random => transforms::random_crop_box(shape, options.crop_size, draws.crop_start),
        CropMode::Foreground => transforms::foreground_box(&image, 4, shape, options.foreground_multiple, 0)
            .ok_or_else(|| {
                CoreError::invalid(
                    "crop=foreground: the image has no voxel > 0 after normalisation; use crop=none or center",
                )
            })?,
    };
    if crop_box != CropBox::full(shape) {
        image = transforms::crop(&image, 4, shape, &crop_box);
        label_channels = label_channels.map(|l| transforms::crop(&l, 3, shape, &crop_box));
    }
    let out_shape = crop_box.size;
    for axis in 0..3 {
        if draws.flips[axis] {
            transforms::flip(&mut image, 4, out_shape, axis);
            if let Some(l) = label_channels.as_mut() {
                transforms::flip(l, 3, out_shape, axis);
            }
        }
    }
    if options.intensity_scale > 0.0 {
        transforms::scale_intensity(&mut image, draws.scale);
    }
    if options.intensity_shift > 0.0 {
        transforms::shift_intensity(&mut image, draws.shift);
    }
    timings.crop_augment = t.elapsed().as_secs_f64();

    let metadata = CaseMetadata {
        case_id: String::new(),
        original_shape: shape,
        shape: out_shape,
        affine,
        spacing,
        crop_box,
        label_convention: options.label_convention,
        pipeline_version: PIPELINE_VERSION.to_string(),
        channels,
        flipped: draws.flips,
        intensity_scale: draws.scale,
        intensity_shift: draws.shift,
        has_label: label_channels.is_some(),
        input_sha256: Vec::new(),
    };
    Ok((CaseTensors { image, label: label_channels, metadata }, timings, header))
}

/// Fails unless `v` has `reference`'s shape and (within `tol`) affine, naming both files.
fn check_same_grid(v: &NiftiInfo, name: &str, reference: &NiftiInfo, ref_name: &str, tol: f64) -> Result<()> {
    if v.shape != reference.shape {
        return Err(CoreError::invalid(format!(
            "{name}: shape {:?} differs from {ref_name}'s {:?}; all modalities must be co-registered on one grid (resample them first)",
            v.shape, reference.shape
        )));
    }
    let diff = v
        .affine
        .iter()
        .flatten()
        .zip(reference.affine.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    if diff > tol {
        return Err(CoreError::invalid(format!(
            "{name}: affine differs from {ref_name}'s by up to {diff:.4} (tolerance {tol}); the modalities are not on one grid (register/resample them first)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: [usize; 3] = [6, 5, 4];
    const AFFINE: [[f64; 4]; 4] = [[1., 0., 0., 0.], [0., 1., 0., 0.], [0., 0., 1., 0.], [0., 0., 0., 1.]];

    fn volume(c: usize) -> Vec<f32> {
        (0..120).map(|i| if i % 7 == 0 { 0.0 } else { (i * (c + 2)) as f32 * 0.5 - 10.0 }).collect()
    }

    fn file(name: &str, data: &[f32], shape: [usize; 3], gz: Option<i32>) -> InputFile {
        let bytes = nifti_io::write_nifti(data, shape, &AFFINE, None, gz).unwrap();
        InputFile { name: name.into(), bytes: bytes.into() }
    }

    fn four() -> Vec<InputFile> {
        (0..4).map(|c| file(&format!("m{c}.nii.gz"), &volume(c), SHAPE, Some(1))).collect()
    }

    fn run(images: &[InputFile], label: Option<&InputFile>) -> Result<CaseTensors> {
        preprocess(images, label, &Options::default(), &ReadLimits::default()).map(|(t, _)| t)
    }

    /// The stacked image equals each file decoded on its own then normalised, for 4 files
    /// (gzip or plain) and for the same data as one 4D file.
    #[test]
    fn decodes_each_modality_into_its_channel() {
        let mut want: Vec<f32> = Vec::new();
        for c in 0..4 {
            let mut v = volume(c);
            transforms::normalize_nonzero(&mut v, "x");
            want.extend(v);
        }
        let label_data: Vec<f32> = (0..120).map(|i| [0., 1., 2., 4.][i % 4]).collect();
        let label = file("seg.nii", &label_data, SHAPE, None);
        let t = run(&four(), Some(&label)).unwrap();
        assert_eq!(t.image, want);
        assert_eq!(t.label.as_deref().map(<[u8]>::len), Some(3 * 120));
        let plain: Vec<InputFile> = (0..4).map(|c| file(&format!("m{c}.nii"), &volume(c), SHAPE, None)).collect();
        assert_eq!(run(&plain, None).unwrap().image, want);

        // One 4D file: frame c is modality c.
        let mut bytes = nifti_io::write_nifti(&volume(0), SHAPE, &AFFINE, None, None).unwrap();
        bytes[40..42].copy_from_slice(&4i16.to_le_bytes());
        bytes[48..50].copy_from_slice(&4i16.to_le_bytes());
        for c in 1..4 {
            bytes.extend_from_slice(&nifti_io::write_nifti(&volume(c), SHAPE, &AFFINE, None, None).unwrap()[352..]);
        }
        let one = InputFile { name: "all.nii".into(), bytes: bytes.clone().into() };
        assert_eq!(run(&[one], None).unwrap().image, want);
        bytes[48..50].copy_from_slice(&3i16.to_le_bytes());
        let three = InputFile { name: "three.nii".into(), bytes: bytes.into() };
        let e = run(&[three], None).unwrap_err().to_string();
        assert!(e.contains("must be 4D with 4 volumes") && e.contains("it has 3"), "{e}");
    }

    #[test]
    fn rejects_mismatched_grids_after_reporting_bad_voxels() {
        let mut files = four();
        files[2] = file("small.nii", &volume(2)[..60], [3, 5, 4], None);
        let e = run(&files, None).unwrap_err().to_string();
        assert!(e.contains("small.nii: shape [3, 5, 4] differs from m0.nii.gz's [6, 5, 4]"), "{e}");
        let mut nan = volume(2)[..60].to_vec();
        nan[5] = f32::NAN;
        files[2] = file("small.nii", &nan, [3, 5, 4], None);
        let e = run(&files, None).unwrap_err().to_string();
        assert!(e.contains("small.nii: 1 voxels are NaN or infinite"), "{e}");
        let label = file("seg.nii", &vec![0.0; 60], [3, 5, 4], None);
        let e = run(&four(), Some(&label)).unwrap_err().to_string();
        assert!(e.contains("seg.nii: shape [3, 5, 4] differs"), "{e}");
    }
}
