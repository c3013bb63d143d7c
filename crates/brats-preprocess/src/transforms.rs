//! MONAI's transforms, one small unit each, on C-order `[C, X, Y, Z]` buffers.
//!
//! Random transforms are split into a draw (from a seeded RNG, see [`crate::draws`]) and a
//! deterministic application, so the same draws give the same output as MONAI's.

use brats_core::metadata::{ChannelStats, CropBox};

/// Per-channel statistics used to normalise one channel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NonzeroStats {
    /// Mean of the non-zero voxels.
    pub mean: f64,
    /// Population standard deviation of the non-zero voxels.
    pub std: f64,
    /// Number of non-zero voxels.
    pub count: u64,
}

/// Independent min/max accumulators in the normalisation pass: `LANES` separate dependency
/// chains, so that loop runs at vector width instead of compare latency.
const LANES: usize = 8;

/// Mean and population std (ddof 0) over the voxels that are not zero (`-0.0` counts as zero,
/// negative values count), accumulated in f64 in two passes for accuracy.
///
/// The sums run in voxel order on purpose: split accumulators would be faster (≈ 10 ms per
/// 240×240×155 channel) but change the f64 `std` in the metadata in its last digits.
pub fn nonzero_stats(channel: &[f32]) -> NonzeroStats {
    let (mut sum, mut count) = (0f64, 0u64);
    for &v in channel {
        if v != 0.0 {
            sum += v as f64;
            count += 1;
        }
    }
    if count == 0 {
        return NonzeroStats { mean: 0.0, std: 0.0, count };
    }
    let mean = sum / count as f64;
    let mut ss = 0f64;
    for &v in channel {
        if v != 0.0 {
            let d = v as f64 - mean;
            ss += d * d;
        }
    }
    NonzeroStats { mean, std: (ss / count as f64).sqrt(), count }
}

/// MONAI `NormalizeIntensity(nonzero=True, channel_wise=True)` on one channel, in place:
/// non-zero voxels become `(x − mean) / std` (std 0 → 1), zeros stay exactly zero, and an
/// all-zero channel is left unchanged. Returns the statistics used and the output range.
pub fn normalize_nonzero(channel: &mut [f32], name: &str) -> ChannelStats {
    let s = nonzero_stats(channel);
    let divisor = if s.std == 0.0 { 1.0 } else { s.std };
    // MONAI subtracts and divides in float32 with float32 statistics. The output range is
    // taken in the same pass.
    let (min, max) = if s.count > 0 {
        apply_min_max::<true>(channel, s.mean as f32, divisor as f32)
    } else {
        apply_min_max::<false>(channel, 0.0, 1.0)
    };
    ChannelStats { name: name.to_string(), mean: s.mean, std: divisor, nonzero_voxels: s.count, min, max }
}

/// When `APPLY`, maps every non-zero `x` to `(x − mean) / div` (zeros, `-0.0` included, are
/// kept); returns the min and max of the (resulting) values, `(0, 0)` for an empty slice.
/// Like a sequential `f32::min`/`f32::max` fold, a zero extreme keeps the sign of the first
/// zero in the slice.
fn apply_min_max<const APPLY: bool>(v: &mut [f32], mean: f32, div: f32) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let f = |x: f32| if APPLY && x != 0.0 { (x - mean) / div } else { x };
    let (mut lo, mut hi) = ([f32::INFINITY; LANES], [f32::NEG_INFINITY; LANES]);
    let mut chunks = v.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            let y = f(c[l]);
            if APPLY {
                c[l] = y;
            }
            lo[l] = if y < lo[l] { y } else { lo[l] };
            hi[l] = if y > hi[l] { y } else { hi[l] };
        }
    }
    let (mut min, mut max) = (f32::INFINITY, f32::NEG_INFINITY);
    for l in 0..LANES {
        min = if lo[l] < min { lo[l] } else { min };
        max = if hi[l] > max { hi[l] } else { max };
    }
    for x in chunks.into_remainder() {
        let y = f(*x);
        if APPLY {
            *x = y;
        }
        min = if y < min { y } else { min };
        max = if y > max { y } else { max };
    }
    // Which zero (0.0 or −0.0) is the extreme depends on order: take the first, as a fold would.
    if min == 0.0 || max == 0.0 {
        let first_zero = v.iter().copied().find(|&x| x == 0.0).unwrap_or(0.0);
        if min == 0.0 {
            min = first_zero;
        }
        if max == 0.0 {
            max = first_zero;
        }
    }
    (min as f64, max as f64)
}

/// MONAI `CenterSpatialCrop(roi)`: start = size // 2 − roi // 2 per axis; an roi larger than the
/// volume keeps the whole axis (no padding).
pub fn center_crop_box(shape: [usize; 3], roi: [usize; 3]) -> CropBox {
    let mut b = CropBox::full(shape);
    for a in 0..3 {
        if roi[a] > 0 && roi[a] < shape[a] {
            b.start[a] = (shape[a] / 2 - roi[a] / 2) as i64;
            b.size[a] = roi[a];
        }
    }
    b
}

/// MONAI `RandSpatialCrop(roi, random_size=False)` given the drawn start: the window is
/// `min(roi, size)` long, so it never pads.
pub fn random_crop_box(shape: [usize; 3], roi: [usize; 3], start: [usize; 3]) -> CropBox {
    let mut b = CropBox::full(shape);
    for a in 0..3 {
        if roi[a] > 0 && roi[a] < shape[a] {
            b.start[a] = start[a].min(shape[a] - roi[a]) as i64;
            b.size[a] = roi[a];
        }
    }
    b
}

/// MONAI `CropForeground(select_fn=x > 0 on any channel, margin=margin, k_divisible=k,
/// allow_smaller=False)`: the tight box of foreground voxels, first grown by `margin` on both
/// sides (not clamped to the volume), then grown to a multiple of `k` per axis by moving the
/// start back by half the growth (floor) — so it may reach outside the volume, where it is
/// zero-padded. `None` when there is no foreground.
pub fn foreground_box(image: &[f32], channels: usize, shape: [usize; 3], k: usize, margin: usize) -> Option<CropBox> {
    let [nx, ny, nz] = shape;
    let n = nx * ny * nz;
    let (mut lo, mut hi) = ([usize::MAX; 3], [0usize; 3]);
    let mut any = false;
    for i in 0..nx {
        for j in 0..ny {
            let row = (i * ny + j) * nz;
            for kk in 0..nz {
                if (0..channels).any(|c| image[c * n + row + kk] > 0.0) {
                    any = true;
                    for (a, v) in [i, j, kk].into_iter().enumerate() {
                        lo[a] = lo[a].min(v);
                        hi[a] = hi[a].max(v + 1);
                    }
                }
            }
        }
    }
    if !any {
        return None;
    }
    let mut b = CropBox::default();
    for a in 0..3 {
        // The margin box: may start before 0 and end past the volume.
        let start = lo[a] as i64 - margin as i64;
        let size = hi[a] - lo[a] + 2 * margin;
        let target = if k > 0 { size.div_ceil(k) * k } else { size };
        b.start[a] = start - ((target - size) / 2) as i64;
        b.size[a] = target;
    }
    Some(b)
}

/// Copies the window `b` out of each of `channels` C-order volumes of `shape`, zero-filling
/// whatever lies outside.
pub fn crop<T: Copy + Default + Send + Sync>(data: &[T], channels: usize, shape: [usize; 3], b: &CropBox) -> Vec<T> {
    let [nx, ny, nz] = shape;
    let [sx, sy, sz] = b.size;
    let mut out = vec![T::default(); channels * sx * sy * sz];
    // The z range that lies inside the source, as offsets into the window.
    let z0 = (-b.start[2]).max(0) as usize;
    let z1 = ((nz as i64 - b.start[2]).min(sz as i64)).max(0) as usize;
    for c in 0..channels {
        for x in 0..sx {
            let gx = b.start[0] + x as i64;
            if gx < 0 || gx >= nx as i64 {
                continue;
            }
            for y in 0..sy {
                let gy = b.start[1] + y as i64;
                if gy < 0 || gy >= ny as i64 || z0 >= z1 {
                    continue;
                }
                let src = c * nx * ny * nz + (gx as usize * ny + gy as usize) * nz;
                let gz0 = (b.start[2] + z0 as i64) as usize;
                let dst = ((c * sx + x) * sy + y) * sz;
                out[dst + z0..dst + z1].copy_from_slice(&data[src + gz0..src + gz0 + (z1 - z0)]);
            }
        }
    }
    out
}

/// MONAI `Flip(spatial_axis=axis)` on every channel, in place (axis 0 = X, 1 = Y, 2 = Z).
pub fn flip<T: Copy>(data: &mut [T], channels: usize, shape: [usize; 3], axis: usize) {
    let [nx, ny, nz] = shape;
    let n = nx * ny * nz;
    for c in 0..channels {
        let v = &mut data[c * n..(c + 1) * n];
        match axis {
            0 => {
                for x in 0..nx / 2 {
                    let (a, b) = (x * ny * nz, (nx - 1 - x) * ny * nz);
                    let (lo, hi) = v.split_at_mut(b);
                    lo[a..a + ny * nz].swap_with_slice(&mut hi[..ny * nz]);
                }
            }
            1 => {
                for x in 0..nx {
                    for y in 0..ny / 2 {
                        let (a, b) = ((x * ny + y) * nz, (x * ny + ny - 1 - y) * nz);
                        let (lo, hi) = v.split_at_mut(b);
                        lo[a..a + nz].swap_with_slice(&mut hi[..nz]);
                    }
                }
            }
            _ => v.chunks_exact_mut(nz).for_each(|row| row.reverse()),
        }
    }
}

/// MONAI `RandScaleIntensity` with drawn factor f: `x · (1 + f)` on every voxel, the
/// multiplier formed in f64 and applied in f32 as torch does.
pub fn scale_intensity(data: &mut [f32], factor: f64) {
    let m = (1.0 + factor) as f32;
    data.iter_mut().for_each(|v| *v *= m);
}

/// MONAI `ShiftIntensity(offset=o)`: `x + o` on every voxel (background included), in f32.
pub fn shift_intensity(data: &mut [f32], offset: f64) {
    let o = offset as f32;
    data.iter_mut().for_each(|v| *v += o);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_matches_definition() {
        let mut v = vec![0.0, 1.0, 2.0, 3.0, -0.0, -2.0];
        let s = normalize_nonzero(&mut v, "t1c");
        let vals = [1.0f64, 2.0, 3.0, -2.0];
        let mean = vals.iter().sum::<f64>() / 4.0;
        let std = (vals.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 4.0).sqrt();
        assert_eq!(s.nonzero_voxels, 4);
        assert!((s.mean - mean).abs() < 1e-12 && (s.std - std).abs() < 1e-12);
        assert_eq!(v[0], 0.0);
        assert!((v[1] as f64 - (1.0 - mean) / std).abs() < 1e-6);
        let mut constant = vec![0.0, 5.0, 5.0];
        normalize_nonzero(&mut constant, "c");
        assert_eq!(constant, vec![0.0, 0.0, 0.0]);
        let mut zeros = vec![0.0f32; 4];
        assert_eq!(normalize_nonzero(&mut zeros, "z").nonzero_voxels, 0);
    }

    /// The fused apply + min/max pass gives the values and range of the plain loops it replaced.
    #[test]
    fn fused_normalise_matches_separate_passes() {
        fn reference(v: &mut [f32]) -> (f64, f64) {
            let s = nonzero_stats(v);
            let div = if s.std == 0.0 { 1.0 } else { s.std };
            if s.count > 0 {
                let (mean, div) = (s.mean as f32, div as f32);
                v.iter_mut().filter(|x| **x != 0.0).for_each(|x| *x = (*x - mean) / div);
            }
            let (lo, hi) = v.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            (lo as f64, hi as f64)
        }
        let mut state = 12345u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 40) as f32 / 16777216.0
        };
        for len in [1usize, 7, 8, 9, 63, 1000] {
            let v: Vec<f32> = (0..len)
                .map(|_| {
                    let r = next();
                    if r < 0.3 { if r < 0.15 { -0.0 } else { 0.0 } } else { (r - 0.5) * 1000.0 }
                })
                .collect();
            let (mut a, mut b) = (v.clone(), v.clone());
            let s = normalize_nonzero(&mut a, "c");
            let (lo, hi) = reference(&mut b);
            assert_eq!(
                a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            assert_eq!((s.min.to_bits(), s.max.to_bits()), (lo.to_bits(), hi.to_bits()), "len {len}");
        }
        // Only zeros: the range is the first zero, with its sign, and nothing changes.
        for first in [0.0f32, -0.0] {
            let mut v = vec![first, 0.0, -0.0, 0.0, -0.0, 0.0, -0.0, 0.0, -0.0, 0.0];
            let before = v.clone();
            let s = normalize_nonzero(&mut v, "z");
            assert_eq!(
                v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                before.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            assert_eq!((s.min.to_bits(), s.max.to_bits()), ((first as f64).to_bits(), (first as f64).to_bits()));
        }
        // A constant channel: every voxel becomes +0.0 after the zeros it keeps.
        let mut v = vec![-0.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0];
        let s = normalize_nonzero(&mut v, "c");
        assert_eq!((s.min.to_bits(), s.max.to_bits()), ((-0.0f64).to_bits(), (-0.0f64).to_bits()));
    }

    #[test]
    fn crops_follow_monai() {
        assert_eq!(center_crop_box([155, 10, 8], [144, 13, 8]).start, [5, 0, 0]);
        assert_eq!(
            random_crop_box([10, 10, 10], [4, 20, 10], [6, 3, 0]),
            CropBox { start: [6, 0, 0], size: [4, 10, 10] }
        );
        let shape = [6, 5, 4];
        let mut img = vec![0f32; 120];
        img[(2 * 5 + 1) * 4 + 3] = 1.0; // voxel (2,1,3)
        let b = foreground_box(&img, 1, shape, 8, 0).unwrap();
        assert_eq!(b, CropBox { start: [-1, -2, 0], size: [8, 8, 8] });
        // Margin 1 grows the 1-voxel box to 3 (start − 1) before rounding up to 8 (start − 5 / 2):
        // the same box here; with k = 1 the margin alone shows, unclamped.
        assert_eq!(foreground_box(&img, 1, shape, 8, 1).unwrap(), CropBox { start: [-1, -2, 0], size: [8, 8, 8] });
        assert_eq!(foreground_box(&img, 1, shape, 1, 2).unwrap(), CropBox { start: [0, -1, 1], size: [5, 5, 5] });
        assert_eq!(foreground_box(&[0f32; 120], 1, shape, 8, 1), None);
        let c = crop(&img, 1, shape, &b);
        assert_eq!(c.len(), 512);
        assert_eq!(c[(3 * 8 + 3) * 8 + 3], 1.0);
        assert_eq!(c.iter().sum::<f32>(), 1.0);
    }

    #[test]
    fn flips_reverse_one_axis() {
        let shape = [2, 3, 4];
        let orig: Vec<u32> = (0..24).collect();
        for axis in 0..3 {
            let mut v = orig.clone();
            flip(&mut v, 1, shape, axis);
            for x in 0..2 {
                for y in 0..3 {
                    for z in 0..4 {
                        let mut s = [x, y, z];
                        s[axis] = shape[axis] - 1 - s[axis];
                        assert_eq!(v[(x * 3 + y) * 4 + z], orig[(s[0] * 3 + s[1]) * 4 + s[2]]);
                    }
                }
            }
            flip(&mut v, 1, shape, axis);
            assert_eq!(v, orig);
        }
    }
}
