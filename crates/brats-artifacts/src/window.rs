//! MONAI-compatible sliding-window inference (`monai.inferers.sliding_window_inference`).
//!
//! The volume is zero-padded to at least the window size (half before, `diff // 2`, the rest
//! after), windows start at `k · int(roi · (1 − overlap))` per axis with the last one moved back
//! to end at the border, overlapping outputs are averaged (equal weights, on logits), and the
//! padding is cropped away. GroupNorm statistics see the padding, so padding exactly like MONAI
//! is what makes the logits match.

/// How overlapping window outputs are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Blend {
    /// Equal weights (MONAI `mode="constant"`, the bundle's).
    #[default]
    Constant,
    /// Gaussian weights centred on each window, σ = 0.125 · roi per axis (MONAI `mode="gaussian"`).
    Gaussian,
}

/// Sliding-window settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlidingWindow {
    /// Window size X, Y, Z (bundle: 240, 240, 160).
    pub roi: [usize; 3],
    /// Fraction of overlap between neighbouring windows, in [0, 1) (bundle: 0.5).
    pub overlap: f64,
    /// Blending of overlapping windows.
    pub blend: Blend,
    /// Test-time mirroring: also segment the volume flipped along each axis (X, Y, Z), flip the
    /// logits back and average the four (costs 4× the inference time). Off by default, as in
    /// the bundle.
    pub mirror: bool,
    /// The part of the volume the windows cover: all of it (the default, the reference's
    /// result) or, opt-in, the foreground's bounding box.
    pub extent: Extent,
}

/// The part of the volume the windows cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Extent {
    /// The whole volume, padded exactly as MONAI pads it: the reference's logits.
    #[default]
    Full,
    /// A fast mode beyond the reference (opt-in): only the foreground's bounding box ([`ForegroundBox`]):
    /// the voxels where any input channel is non-zero (the skull-stripped brain; non-zero
    /// normalisation keeps the background at 0), grown by `margin` voxels per side, its ends on
    /// the grid of `multiple` voxels of the full extent's padded window (`multiple` a multiple of
    /// the network's downsampling factor, so that its strided convolutions sample the same voxels
    /// as on the full volume; a larger one lets fewer distinct shapes reach the runtime). The windows (their size clipped to the box)
    /// cover the box, zero-padded where it passes the volume's border; outside the box every
    /// output is [`BACKGROUND_LOGIT`]. nnU-Net crops to the non-zero region the same way. Inside
    /// the box the convolutions see the same values on the same grid as on the full volume (the
    /// background is 0 either way), but GroupNorm's statistics see less background, so the logits differ slightly
    /// from [`Extent::Full`]'s; benchmarks/README.md gives the agreement of the label maps.
    Foreground {
        /// Voxels added on each side of the tight box.
        margin: usize,
        /// The box's size along each axis is a multiple of this (at least 1).
        multiple: usize,
    },
}

impl Extent {
    /// The fast mode's settings in the services and the CLI: the tight box on a 16-voxel grid
    /// (twice SegResNet's downsampling factor of 8, so a case's box takes one of few shapes).
    pub const FOREGROUND: Extent = Extent::Foreground { margin: 0, multiple: 16 };
}

/// The output outside the foreground box in [`Extent::Foreground`]: a logit whose sigmoid is
/// 0 to single precision (so a thresholded mask is background there, and probabilities are 0).
pub const BACKGROUND_LOGIT: f32 = -40.0;

/// A box of the volume: `start` may be negative and `start + size` may pass the volume's end
/// (the box is zero-padded there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForegroundBox {
    /// The first voxel per axis.
    pub start: [isize; 3],
    /// The size per axis.
    pub size: [usize; 3],
}

impl ForegroundBox {
    /// The bounding box of the voxels where any channel of `image` (`[channels, shape]`, C
    /// order) is non-zero, grown by `margin`, with its start and end on the grid of `multiple`
    /// voxels that begins at `origin` (per axis); None when every voxel is zero. With `origin`
    /// the first voxel of the full extent's padded window, the network's strided convolutions
    /// sample the same voxels in the box as on the full volume.
    pub fn of(
        image: &[f32],
        channels: usize,
        shape: [usize; 3],
        margin: usize,
        multiple: usize,
        origin: [isize; 3],
    ) -> Option<Self> {
        let n: usize = shape.iter().product();
        let (mut lo, mut hi) = (shape, [0usize; 3]);
        for x in 0..shape[0] {
            for y in 0..shape[1] {
                let row = (x * shape[1] + y) * shape[2];
                // The first and last non-zero z of this row over all channels.
                let (mut first, mut last) = (shape[2], 0);
                for c in 0..channels {
                    let r = &image[c * n + row..c * n + row + shape[2]];
                    if let Some(f) = r.iter().position(|v| *v != 0.0) {
                        first = first.min(f);
                        last = last.max(r.iter().rposition(|v| *v != 0.0).unwrap_or(f) + 1);
                    }
                }
                if first < last {
                    lo = [lo[0].min(x), lo[1].min(y), lo[2].min(first)];
                    hi = [hi[0].max(x + 1), hi[1].max(y + 1), hi[2].max(last)];
                }
            }
        }
        if hi[0] == 0 {
            return None;
        }
        let m = multiple.max(1) as isize;
        let mut start = [0isize; 3];
        let mut size = [0usize; 3];
        for a in 0..3 {
            let l = lo[a].saturating_sub(margin) as isize - origin[a];
            let h = (hi[a] + margin).min(shape[a]) as isize - origin[a];
            let (first, end) = (l.div_euclid(m) * m, (h + m - 1).div_euclid(m) * m);
            start[a] = origin[a] + first;
            size[a] = (end - first) as usize;
        }
        Some(ForegroundBox { start, size })
    }

    /// The box's part of `image` (`[channels, shape]`) as `[channels, size]`, zeros outside the volume.
    pub fn crop(&self, image: &[f32], channels: usize, shape: [usize; 3]) -> Vec<f32> {
        let n: usize = shape.iter().product();
        let m: usize = self.size.iter().product();
        let mut out = vec![0f32; channels * m];
        self.for_each_row(shape, |src, dst, len| {
            for c in 0..channels {
                out[c * m + dst..c * m + dst + len].copy_from_slice(&image[c * n + src..c * n + src + len]);
            }
        });
        out
    }

    /// `[channels, shape]` holding `boxed` (`[channels, size]`) at the box and `fill` elsewhere.
    pub fn paste(&self, boxed: &[f32], channels: usize, shape: [usize; 3], fill: f32) -> Vec<f32> {
        let n: usize = shape.iter().product();
        let m: usize = self.size.iter().product();
        let mut out = vec![fill; channels * n];
        self.for_each_row(shape, |dst, src, len| {
            for c in 0..channels {
                out[c * n + dst..c * n + dst + len].copy_from_slice(&boxed[c * m + src..c * m + src + len]);
            }
        });
        out
    }

    /// Calls `f(volume offset, box offset, length)` for each z-run the box and the volume share
    /// (offsets within one channel).
    fn for_each_row(&self, shape: [usize; 3], mut f: impl FnMut(usize, usize, usize)) {
        let range = |a: usize| {
            let from = self.start[a].max(0) as usize;
            let to = (self.start[a] + self.size[a] as isize).clamp(0, shape[a] as isize) as usize;
            from..to.max(from)
        };
        let (zs, zlen) = (range(2).start, range(2).len());
        if zlen == 0 {
            return;
        }
        for x in range(0) {
            for y in range(1) {
                let bx = (x as isize - self.start[0]) as usize;
                let by = (y as isize - self.start[1]) as usize;
                let bz = (zs as isize - self.start[2]) as usize;
                f((x * shape[1] + y) * shape[2] + zs, (bx * self.size[1] + by) * self.size[2] + bz, zlen);
            }
        }
    }
}

impl Default for SlidingWindow {
    fn default() -> Self {
        SlidingWindow {
            roi: [240, 240, 160],
            overlap: 0.5,
            blend: Blend::Constant,
            mirror: false,
            extent: Extent::Full,
        }
    }
}

impl SlidingWindow {
    /// The box [`Extent::Foreground`] covers in `image` (`[channels, shape]`), on the grid of
    /// the full extent's padded window; None for [`Extent::Full`] or an all-zero image.
    pub fn foreground_box(&self, image: &[f32], channels: usize, shape: [usize; 3]) -> Option<ForegroundBox> {
        let Extent::Foreground { margin, multiple } = self.extent else { return None };
        let pad = padding(shape, self.roi);
        ForegroundBox::of(image, channels, shape, margin, multiple, std::array::from_fn(|a| -(pad[a].0 as isize)))
    }
}

/// Padding before and after along each axis so every axis is at least `roi` long.
pub fn padding(shape: [usize; 3], roi: [usize; 3]) -> [(usize, usize); 3] {
    std::array::from_fn(|a| {
        let diff = roi[a].saturating_sub(shape[a]);
        (diff / 2, diff - diff / 2)
    })
}

/// Window start offsets along one axis of (padded) length `size`, as MONAI places them.
pub fn starts(size: usize, roi: usize, overlap: f64) -> Vec<usize> {
    let interval = if roi == size { roi } else { ((roi as f64 * (1.0 - overlap)) as usize).max(1) };
    let mut count = 1;
    while (count - 1) * interval + roi < size {
        count += 1;
    }
    (0..count).map(|i| (i * interval).min(size - roi)).collect()
}

/// Every window's start in the padded volume, X-major like MONAI's `dense_patch_slices`.
pub fn windows(padded: [usize; 3], roi: [usize; 3], overlap: f64) -> Vec<[usize; 3]> {
    let s: [Vec<usize>; 3] = std::array::from_fn(|a| starts(padded[a], roi[a], overlap));
    let mut out = Vec::new();
    for &x in &s[0] {
        for &y in &s[1] {
            for &z in &s[2] {
                out.push([x, y, z]);
            }
        }
    }
    out
}

/// How many windows [`infer`] runs for a volume of `shape` (times 4 with mirroring).
///
/// With [`Extent::Foreground`], `shape` is the box's size ([`ForegroundBox::size`]).
pub fn window_count(shape: [usize; 3], cfg: &SlidingWindow) -> usize {
    let pad = padding(shape, cfg.roi);
    let per_pass: usize = (0..3)
        .map(|a| {
            let padded = shape[a] + pad[a].0 + pad[a].1;
            starts(padded, cfg.roi[a].min(padded), cfg.overlap).len()
        })
        .product();
    if cfg.mirror { 4 * per_pass } else { per_pass }
}

fn gaussian_weights(roi: [usize; 3]) -> Vec<f32> {
    let axis = |n: usize| -> Vec<f64> {
        let sigma = 0.125 * n as f64;
        let c = (n as f64 - 1.0) / 2.0;
        (0..n).map(|i| (-(i as f64 - c).powi(2) / (2.0 * sigma * sigma)).exp()).collect()
    };
    let (gx, gy, gz) = (axis(roi[0]), axis(roi[1]), axis(roi[2]));
    let mut w = Vec::with_capacity(roi.iter().product());
    for x in &gx {
        for y in &gy {
            for z in &gz {
                w.push(((x * y * z) as f32).max(1e-3));
            }
        }
    }
    w
}

/// Copies the window starting at `start` (padded coordinates) out of `image` (`[channels, shape]`,
/// C order) into `window` (`[channels, roi]`), zeros where it covers the padding.
fn gather(
    image: &[f32],
    channels: usize,
    shape: [usize; 3],
    pad: &[(usize, usize); 3],
    roi: [usize; 3],
    start: [usize; 3],
    window: &mut [f32],
) {
    window.iter_mut().for_each(|v| *v = 0.0);
    for c in 0..channels {
        for x in 0..roi[0] {
            let gx = (start[0] + x) as isize - pad[0].0 as isize;
            if gx < 0 || gx >= shape[0] as isize {
                continue;
            }
            for y in 0..roi[1] {
                let gy = (start[1] + y) as isize - pad[1].0 as isize;
                if gy < 0 || gy >= shape[1] as isize {
                    continue;
                }
                let z0 = pad[2].0.saturating_sub(start[2]);
                let z1 = (shape[2] + pad[2].0).saturating_sub(start[2]).min(roi[2]);
                if z0 >= z1 {
                    continue;
                }
                let gz0 = start[2] + z0 - pad[2].0;
                let src = ((c * shape[0] + gx as usize) * shape[1] + gy as usize) * shape[2] + gz0;
                let dst = ((c * roi[0] + x) * roi[1] + y) * roi[2] + z0;
                window[dst..dst + (z1 - z0)].copy_from_slice(&image[src..src + (z1 - z0)]);
            }
        }
    }
}

/// Runs `model` over windows of `image` (`[channels, X, Y, Z]`, C order) and returns the
/// blended output `[out_channels, X, Y, Z]`. `model` receives one window `[channels, roi]` and
/// returns `[out_channels, roi]`.
pub fn infer<E>(
    image: &[f32],
    channels: usize,
    shape: [usize; 3],
    out_channels: usize,
    cfg: &SlidingWindow,
    model: impl FnMut(&[f32], [usize; 3]) -> Result<Vec<f32>, E>,
) -> Result<Vec<f32>, E> {
    infer_impl(ImageRef::Borrowed(image), channels, shape, out_channels, cfg, model)
}

/// [`infer`] on an image the caller hands over: when one window covers the padded volume (the
/// bundle's case), the image is freed as soon as the window is gathered, before the model runs,
/// so the two full-size copies never meet the model's peak memory.
pub fn infer_owned<E>(
    image: Vec<f32>,
    channels: usize,
    shape: [usize; 3],
    out_channels: usize,
    cfg: &SlidingWindow,
    model: impl FnMut(&[f32], [usize; 3]) -> Result<Vec<f32>, E>,
) -> Result<Vec<f32>, E> {
    infer_impl(ImageRef::Owned(image), channels, shape, out_channels, cfg, model)
}

enum ImageRef<'a> {
    Borrowed(&'a [f32]),
    Owned(Vec<f32>),
}

impl ImageRef<'_> {
    fn get(&self) -> &[f32] {
        match self {
            ImageRef::Borrowed(s) => s,
            ImageRef::Owned(v) => v,
        }
    }
}

fn infer_impl<E>(
    image: ImageRef<'_>,
    channels: usize,
    shape: [usize; 3],
    out_channels: usize,
    cfg: &SlidingWindow,
    mut model: impl FnMut(&[f32], [usize; 3]) -> Result<Vec<f32>, E>,
) -> Result<Vec<f32>, E> {
    if let Extent::Foreground { .. } = cfg.extent {
        let n: usize = shape.iter().product();
        let Some(region) = cfg.foreground_box(image.get(), channels, shape) else {
            return Ok(vec![BACKGROUND_LOGIT; out_channels * n]);
        };
        let boxed = region.crop(image.get(), channels, shape);
        drop(image);
        let roi = std::array::from_fn(|a| cfg.roi[a].min(region.size[a]));
        let inner = SlidingWindow { roi, extent: Extent::Full, ..*cfg };
        let out = infer_impl(ImageRef::Owned(boxed), channels, region.size, out_channels, &inner, model)?;
        return Ok(region.paste(&out, out_channels, shape, BACKGROUND_LOGIT));
    }
    let pad = padding(shape, cfg.roi);
    let padded: [usize; 3] = std::array::from_fn(|a| shape[a] + pad[a].0 + pad[a].1);
    let roi: [usize; 3] = std::array::from_fn(|a| cfg.roi[a].min(padded[a]));
    let n_roi: usize = roi.iter().product();
    let n_pad: usize = padded.iter().product();
    let n: usize = shape.iter().product();
    let starts = windows(padded, roi, cfg.overlap);
    if starts.len() == 1 && cfg.blend == Blend::Constant {
        // One window covering the whole padded volume (the bundle's 240×240×160 on a BraTS
        // case): MONAI divides its output by a count of 1, so the cropped output is the result,
        // without the accumulators.
        let mut window = vec![0f32; channels * n_roi];
        gather(image.get(), channels, shape, &pad, roi, starts[0], &mut window);
        drop(image);
        let out = model(&window, roi)?;
        drop(window);
        let mut result = vec![0f32; out_channels * n];
        for o in 0..out_channels {
            for x in 0..shape[0] {
                for y in 0..shape[1] {
                    let p = ((o * padded[0] + x + pad[0].0) * padded[1] + y + pad[1].0) * padded[2] + pad[2].0;
                    let r = ((o * shape[0] + x) * shape[1] + y) * shape[2];
                    result[r..r + shape[2]].copy_from_slice(&out[p..p + shape[2]]);
                }
            }
        }
        return Ok(result);
    }
    let weights = match cfg.blend {
        Blend::Constant => None,
        Blend::Gaussian => Some(gaussian_weights(roi)),
    };
    let mut acc = vec![0f32; out_channels * n_pad];
    let mut norm = vec![0f32; n_pad];
    let mut window = vec![0f32; channels * n_roi];
    for start in starts {
        gather(image.get(), channels, shape, &pad, roi, start, &mut window);
        let out = model(&window, roi)?;
        for x in 0..roi[0] {
            for y in 0..roi[1] {
                let p = ((start[0] + x) * padded[1] + start[1] + y) * padded[2] + start[2];
                let w = (x * roi[1] + y) * roi[2];
                for z in 0..roi[2] {
                    let wt = weights.as_ref().map_or(1.0, |g| g[w + z]);
                    norm[p + z] += wt;
                    for o in 0..out_channels {
                        acc[o * n_pad + p + z] += wt * out[o * n_roi + w + z];
                    }
                }
            }
        }
    }
    drop(window);
    // Average and crop the padding away.
    let mut result = vec![0f32; out_channels * n];
    for o in 0..out_channels {
        for x in 0..shape[0] {
            for y in 0..shape[1] {
                let p = ((x + pad[0].0) * padded[1] + y + pad[1].0) * padded[2] + pad[2].0;
                let r = (o * shape[0] + x) * shape[1] * shape[2] + y * shape[2];
                for z in 0..shape[2] {
                    result[r + z] = acc[o * n_pad + p + z] / norm[p + z];
                }
            }
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_follows_monai() {
        // One window along an axis that fits exactly; 240×240×155 with roi 160 on z pads 2 + 3.
        assert_eq!(starts(240, 240, 0.5), vec![0]);
        assert_eq!(padding([240, 240, 155], [240, 240, 160]), [(0, 0), (0, 0), (2, 3)]);
        // Larger than the roi: interval int(roi·(1−overlap)), last start moved back.
        assert_eq!(starts(300, 240, 0.5), vec![0, 60]);
        assert_eq!(starts(500, 160, 0.5), vec![0, 80, 160, 240, 320, 340]);
        assert_eq!(starts(10, 4, 0.0), vec![0, 4, 6]);
        assert_eq!(windows([300, 240, 160], [240, 240, 160], 0.5).len(), 2);
    }

    /// One window covering the padded volume: the model sees the padded image once and the
    /// result is its output cropped back.
    #[test]
    fn single_window_is_the_cropped_output() {
        let shape = [6, 5, 3];
        let image: Vec<f32> = (0..2 * 90).map(|v| (v as f32 * 0.37).sin()).collect();
        let cfg =
            SlidingWindow { roi: [8, 8, 4], overlap: 0.5, blend: Blend::Constant, mirror: false, extent: Extent::Full };
        let shift = |w: &[f32], _| Ok::<_, ()>(w.iter().map(|v| v * 2.0 + 1.0).collect::<Vec<f32>>());
        let direct = infer(&image, 2, shape, 2, &cfg, shift).unwrap();
        let want: Vec<f32> = image.iter().map(|v| v * 2.0 + 1.0).collect();
        assert_eq!(direct, want);
        let mut calls = 0;
        infer(&image, 2, shape, 2, &cfg, |w, roi| {
            calls += 1;
            assert_eq!(roi, [8, 8, 4]);
            // The window holds the padded image: 1 before and 2 after along X (6 → 8).
            assert_eq!(w[0], 0.0);
            Ok::<_, ()>(w.to_vec())
        })
        .unwrap();
        assert_eq!(calls, 1);
    }

    #[test]
    fn identity_model_round_trips_and_sees_padding() {
        let shape = [5, 7, 3];
        let image: Vec<f32> = (0..2 * 105).map(|v| v as f32 + 1.0).collect();
        let cfg =
            SlidingWindow { roi: [4, 4, 6], overlap: 0.5, blend: Blend::Constant, mirror: false, extent: Extent::Full };
        let mut seen = Vec::new();
        let out = infer(&image, 2, shape, 2, &cfg, |w, roi| {
            seen.push(roi);
            Ok::<_, ()>(w.to_vec())
        })
        .unwrap();
        assert_eq!(out, image, "averaging identical window outputs must give the input back");
        assert!(seen.iter().all(|r| *r == [4, 4, 6]), "windows are always roi-sized: {seen:?}");
        // With a model that reports the window mean, padding (zeros) lowers the mean.
        let means = infer(&image[..105], 1, shape, 1, &cfg, |w, _| {
            let m = w.iter().sum::<f32>() / w.len() as f32;
            Ok::<_, ()>(vec![m; w.len()])
        })
        .unwrap();
        let true_mean = image[..105].iter().sum::<f32>() / 105.0;
        assert!(means.iter().all(|&m| m < true_mean));
    }

    /// The box is the non-zero region grown, with its ends on the grid that starts at the origin.
    #[test]
    fn foreground_box_grows_onto_the_grid() {
        let shape = [20, 10, 6];
        let n: usize = shape.iter().product();
        let mut image = vec![0f32; 2 * n];
        // Channel 1 only: voxels (5, 2, 1) and (9, 3, 4).
        image[n + (5 * 10 + 2) * 6 + 1] = 1.0;
        image[n + (9 * 10 + 3) * 6 + 4] = -2.0;
        let b = ForegroundBox::of(&image, 2, shape, 1, 4, [0, 0, -1]).unwrap();
        // x 5..10 → 4..11 → 4..12; y 2..4 → 1..5 → 0..8; z 1..5 → 0..6 → -1..7 (grid from -1).
        assert_eq!(b, ForegroundBox { start: [4, 0, -1], size: [8, 8, 8] });
        assert!(ForegroundBox::of(&vec![0f32; n], 1, shape, 1, 4, [0; 3]).is_none());
    }

    /// Crop then paste is the identity inside the box and `fill` outside; a pointwise model on
    /// the foreground extent gives the full extent's output inside the box.
    #[test]
    fn foreground_extent_matches_full_inside_the_box() {
        let shape = [12, 9, 7];
        let n: usize = shape.iter().product();
        let mut image = vec![0f32; 2 * n];
        for x in 3..8 {
            for y in 2..6 {
                for z in 1..5 {
                    image[(x * 9 + y) * 7 + z] = (x + y + z) as f32;
                    image[n + (x * 9 + y) * 7 + z] = 1.0;
                }
            }
        }
        let pointwise = |w: &[f32], _| Ok::<_, ()>(w.iter().map(|v| v * 3.0 - 1.0).collect::<Vec<f32>>());
        let full = SlidingWindow { roi: [16, 16, 8], ..Default::default() };
        let fast = SlidingWindow { extent: Extent::Foreground { margin: 0, multiple: 2 }, ..full };
        let a = infer(&image, 2, shape, 2, &full, pointwise).unwrap();
        let mut rois = Vec::new();
        let b = infer(&image, 2, shape, 2, &fast, |w, roi| {
            rois.push(roi);
            pointwise(w, roi)
        })
        .unwrap();
        // Padding to the roi puts the grid's origin at (-2, -3, 0): x 3..8 → 2..8, y 2..6 →
        // 1..7, z 1..5 → 0..6.
        let region = fast.foreground_box(&image, 2, shape).unwrap();
        assert_eq!(region, ForegroundBox { start: [2, 1, 0], size: [6, 6, 6] });
        assert_eq!(rois, vec![[6, 6, 6]], "one window, the box's size");
        for x in 0..shape[0] {
            for y in 0..shape[1] {
                for z in 0..shape[2] {
                    let i = (x * 9 + y) * 7 + z;
                    let inside = (0..3).all(|k| {
                        let p = [x, y, z][k] as isize;
                        p >= region.start[k] && p < region.start[k] + region.size[k] as isize
                    });
                    for c in 0..2 {
                        let want = if inside { a[c * n + i] } else { BACKGROUND_LOGIT };
                        assert_eq!(b[c * n + i], want, "channel {c} at {x},{y},{z}");
                    }
                }
            }
        }
    }
}
