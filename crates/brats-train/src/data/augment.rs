//! MONAI's crop, flips, intensity scale and shift, drawn per sample and applied in one pass.

use super::{CachedCase, DataError, IMAGE_CHANNELS, LABEL_CHANNELS, Result};
use brats_core::metadata::CropBox;
use brats_preprocess::pipeline::{CropMode, Draws, Options};
use brats_preprocess::transforms;
use std::mem::MaybeUninit;

/// The training augmentation, in MONAI's order: crop, flip X, Y, Z, scale, shift.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augment {
    /// Output size X, Y, Z. Axes where the case is smaller are zero-padded symmetrically
    /// (`diff // 2` before, like MONAI's `SpatialPad`) so every sample of a batch has one shape.
    pub crop: [usize; 3],
    /// `true`: MONAI `RandSpatialCrop(random_size=False)`; `false`: `CenterSpatialCrop`.
    pub random_crop: bool,
    /// `RandFlip` probability, drawn once per axis; 0 = no flips (and no flip draws).
    pub flip_prob: f64,
    /// `RandScaleIntensity(factors)`: `x · (1 + f)`, f ~ U(−s, s); 0 = off. Held as f32 like
    /// the preprocessing options, so 0.1 draws exactly what the pipeline draws.
    pub intensity_scale: f64,
    /// `RandShiftIntensity(offsets)`: `x + o`, o ~ U(−s, s), background included; 0 = off.
    pub intensity_shift: f64,
}

impl Augment {
    /// The bundle's training augmentation at `crop` (the bundle uses 224×224×144).
    pub fn bundle(crop: [usize; 3]) -> Self {
        Augment { crop, random_crop: true, flip_prob: 0.5, intensity_scale: 0.1, intensity_shift: 0.1 }
    }

    /// A centre crop without any random transform.
    pub fn center(crop: [usize; 3]) -> Self {
        Augment { crop, random_crop: false, flip_prob: 0.0, intensity_scale: 0.0, intensity_shift: 0.0 }
    }

    /// Rejects values the preprocessing pipeline would reject, naming the field.
    pub fn validate(&self) -> Result<()> {
        self.options(0).validate().map_err(|e| DataError::InvalidConfig(format!("augmentation: {e}")))
    }

    /// The preprocessing options that draw exactly this augmentation from `seed`.
    pub(super) fn options(&self, seed: u64) -> Options {
        Options {
            crop: if self.random_crop { CropMode::Random } else { CropMode::Center },
            crop_size: self.crop,
            random_flip: self.flip_prob > 0.0,
            flip_prob: self.flip_prob,
            intensity_scale: self.intensity_scale as f32,
            intensity_shift: self.intensity_shift as f32,
            seed,
            ..Options::default()
        }
    }
}

/// One augmented training sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Image `[4, crop]`, C order.
    pub image: Vec<f32>,
    /// Label channels `[3, crop]` as 0.0/1.0 (DiceLoss needs float targets).
    pub label: Vec<f32>,
}

/// The crop window: the pipeline's centre or random box, then symmetric zero padding on every
/// axis where the case is smaller than the crop.
fn crop_box(shape: [usize; 3], augment: &Augment, draws: &Draws) -> CropBox {
    let mut b = if augment.random_crop {
        transforms::random_crop_box(shape, augment.crop, draws.crop_start)
    } else {
        transforms::center_crop_box(shape, augment.crop)
    };
    for (((start, size), &roi), &n) in b.start.iter_mut().zip(&mut b.size).zip(&augment.crop).zip(&shape) {
        if roi > n {
            *start = -(((roi - n) / 2) as i64);
            *size = roi;
        }
    }
    b
}

/// Draws and applies `augment` to a labelled case, bit for bit as `pipeline::preprocess` with
/// the same options and seed would (the library's draws from ChaCha8, then crop, flip X, Y, Z,
/// scale, shift with the same f32 operations); only the zero padding of crops larger than the
/// case is added. Same case and seed → same sample.
pub fn sample(case: &CachedCase, augment: &Augment, seed: u64) -> Result<Sample> {
    let n: usize = augment.crop.iter().product();
    let mut image = Vec::with_capacity(IMAGE_CHANNELS * n);
    let mut label = Vec::with_capacity(LABEL_CHANNELS * n);
    augment_into(
        case,
        augment,
        seed,
        &mut image.spare_capacity_mut()[..IMAGE_CHANNELS * n],
        &mut label.spare_capacity_mut()[..LABEL_CHANNELS * n],
    )?;
    // SAFETY: `augment_into` returned Ok, so `crop_flip_map` wrote every one of the first
    // `IMAGE_CHANNELS * n` (and `LABEL_CHANNELS * n`) elements, which lie within the capacity.
    unsafe {
        image.set_len(IMAGE_CHANNELS * n);
        label.set_len(LABEL_CHANNELS * n);
    }
    Ok(Sample { image, label })
}

/// [`sample`] written into `image` (`[4, crop]`) and `label` (`[3, crop]`), which may be
/// uninitialised beforehand: the loader passes fresh batch tensor memory, saving a copy (and a
/// zero fill) of each item. On `Ok`, every element of both has been written.
///
/// The draws come from the preprocessing library's [`Draws::draw`]; crop, flips, scale and
/// shift are applied in one pass ([`crop_flip_map`]) with the same f32 operations in the same
/// order as `transforms::{crop, flip, scale_intensity, shift_intensity}`, so the result is
/// bit-identical (a test holds it so). The separate transforms make ~5 read-write passes
/// over the crop, and sampling is memory-bound: one pass samples several times faster.
pub(super) fn augment_into(
    case: &CachedCase,
    augment: &Augment,
    seed: u64,
    image: &mut [MaybeUninit<f32>],
    label: &mut [MaybeUninit<f32>],
) -> Result<()> {
    case.validate()?;
    augment.validate()?;
    let source_label = case.label.as_ref().ok_or_else(|| DataError::MissingLabel { case: case.id.clone() })?;
    let draws = Draws::draw(&augment.options(seed), case.shape);
    let b = crop_box(case.shape, augment, &draws);
    // The pipeline tests its f32 options against 0; a disabled step must not run at all
    // (`-0.0 + 0.0` is `+0.0`).
    let scale = (augment.intensity_scale as f32 > 0.0).then_some((1.0 + draws.scale) as f32);
    let shift = (augment.intensity_shift as f32 > 0.0).then_some(draws.shift as f32);
    let intensity = |v: f32| {
        let v = match scale {
            Some(m) => v * m,
            None => v,
        };
        match shift {
            Some(o) => v + o,
            None => v,
        }
    };
    crop_flip_map(&case.image, IMAGE_CHANNELS, case.shape, &b, draws.flips, image, intensity);
    crop_flip_map(source_label, LABEL_CHANNELS, case.shape, &b, draws.flips, label, f32::from);
    Ok(())
}

/// `transforms::crop` (zero outside the source) then `transforms::flip` on each axis in
/// `flips`, then `f` on every voxel — padding included, as the library's scale and shift
/// reach it — written into `out`, whose every element is set (each `z` row is either filled
/// with padding whole, or padding, the window and padding again over `[0, o0)`, `[o0, o1)`,
/// `[o1, sz)`), so `out` may start uninitialised.
pub(super) fn crop_flip_map<T: Copy + Default, U: Copy>(
    data: &[T],
    channels: usize,
    shape: [usize; 3],
    b: &CropBox,
    flips: [bool; 3],
    out: &mut [MaybeUninit<U>],
    f: impl Fn(T) -> U,
) {
    let [nx, ny, nz] = shape;
    let [sx, sy, sz] = b.size;
    assert_eq!(out.len(), channels * sx * sy * sz, "crop output length");
    let pad = MaybeUninit::new(f(T::default()));
    // The window offsets [z0, z1) of each z row lie inside the source; after a z flip they
    // land at [sz − z1, sz − z0), reversed.
    let z0 = ((-b.start[2]).max(0) as usize).min(sz);
    let z1 = ((nz as i64 - b.start[2]).min(sz as i64)).max(z0 as i64) as usize;
    let (o0, o1) = if flips[2] { (sz - z1, sz - z0) } else { (z0, z1) };
    for c in 0..channels {
        for x in 0..sx {
            let gx = b.start[0] + (if flips[0] { sx - 1 - x } else { x }) as i64;
            for y in 0..sy {
                let gy = b.start[1] + (if flips[1] { sy - 1 - y } else { y }) as i64;
                let dst = ((c * sx + x) * sy + y) * sz;
                let row = &mut out[dst..dst + sz];
                if gx < 0 || gx >= nx as i64 || gy < 0 || gy >= ny as i64 || z0 == z1 {
                    row.fill(pad);
                    continue;
                }
                let src = c * nx * ny * nz + (gx as usize * ny + gy as usize) * nz;
                let gz0 = (b.start[2] + z0 as i64) as usize;
                let inside = &data[src + gz0..src + gz0 + (z1 - z0)];
                row[..o0].fill(pad);
                if flips[2] {
                    row[o0..o1].iter_mut().zip(inside.iter().rev()).for_each(|(d, &v)| {
                        d.write(f(v));
                    });
                } else {
                    row[o0..o1].iter_mut().zip(inside).for_each(|(d, &v)| {
                        d.write(f(v));
                    });
                }
                row[o1..].fill(pad);
            }
        }
    }
}

/// splitmix64's finaliser: a bijection on u64 whose outputs pass BigCrush, so chained calls
/// decorrelate neighbouring seeds, epochs and indices.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The augmentation seed of dataset item `dataset_index` in `epoch`: a function of those and
/// the job seed only, so resumes, ranks and worker threads agree. (A padded duplicate of an
/// index in the same epoch therefore gets the same augmentation.)
pub fn sample_seed(job_seed: u64, epoch: u64, dataset_index: usize) -> u64 {
    splitmix64(splitmix64(splitmix64(job_seed) ^ epoch) ^ dataset_index as u64)
}
