//! Quick-look pictures: the label map over the T1c in three orthogonal slices through the
//! tumour, for viewers that do not render DICOM SEG and for a person checking a result by eye.
//!
//! Panels, left to right: axial, coronal, sagittal, each through the centroid of the labelled
//! voxels (the volume centre when there are none), in radiological convention for arrays in
//! the BraTS order (+L, +P, +S): the patient's left on the image's right, anterior and
//! superior at the top. Grey levels window the T1c's non-zero voxels from their 1st to 99th
//! percentile; labels are blended at half opacity in the SEG's display colours (NCR 1, ED 2,
//! ET 4). Pixels are drawn square (voxel spacing is not applied).

/// An 8-bit RGB image, rows top to bottom.
#[derive(Debug, Clone, PartialEq)]
pub struct Rgb {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Row-major RGB triplets.
    pub pixels: Vec<u8>,
}

/// Display colour of a BraTS label (the DICOM SEG's recommended colours), `None` for 0.
pub fn label_colour(label: u8) -> Option<[u8; 3]> {
    match label {
        1 => Some([216, 191, 216]),
        2 => Some([140, 224, 228]),
        4 => Some([128, 174, 128]),
        0 => None,
        // Any other code (BraTS 2023's 3 for ET) still shows.
        _ => Some([255, 80, 80]),
    }
}

/// The three panels side by side. `image` and `label` are C-order `[X, Y, Z]` of `shape`.
pub fn overlay(image: &[f32], label: &[u8], shape: [usize; 3]) -> Rgb {
    let [nx, ny, nz] = shape;
    let at = |x: usize, y: usize, z: usize| (x * ny + y) * nz + z;
    // Centre: centroid of the labelled voxels.
    let (mut sum, mut n) = ([0f64; 3], 0f64);
    for x in 0..nx {
        for y in 0..ny {
            for z in 0..nz {
                if label[at(x, y, z)] != 0 {
                    sum[0] += x as f64;
                    sum[1] += y as f64;
                    sum[2] += z as f64;
                    n += 1.0;
                }
            }
        }
    }
    let centre = if n > 0.0 { [0, 1, 2].map(|a| (sum[a] / n).round() as usize) } else { [nx / 2, ny / 2, nz / 2] };
    let (lo, hi) = window(image);
    let grey = |v: f32| -> f32 { if hi > lo { ((v - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0 } else { 0.0 } };
    let pixel = |i: usize| -> [u8; 3] {
        let g = grey(image[i]);
        match label_colour(label[i]) {
            Some(c) => c.map(|c| (0.5 * g + 0.5 * c as f32).round() as u8),
            None => [g.round() as u8; 3],
        }
    };
    // (width, height, voxel index of (column, row)).
    let axial = (nx, ny, Box::new(move |c: usize, r: usize| at(c, r, centre[2])) as Box<dyn Fn(usize, usize) -> usize>);
    let coronal = (
        nx,
        nz,
        Box::new(move |c: usize, r: usize| at(c, centre[1], nz - 1 - r)) as Box<dyn Fn(usize, usize) -> usize>,
    );
    let sagittal = (
        ny,
        nz,
        Box::new(move |c: usize, r: usize| at(centre[0], c, nz - 1 - r)) as Box<dyn Fn(usize, usize) -> usize>,
    );
    let panels = [axial, coronal, sagittal];
    let gap = 4;
    let width = panels.iter().map(|p| p.0).sum::<usize>() + gap * 2;
    let height = panels.iter().map(|p| p.1).max().unwrap_or(0);
    let mut pixels = vec![0u8; width * height * 3];
    let mut left = 0;
    for (w, h, index) in &panels {
        for r in 0..*h {
            for c in 0..*w {
                let o = (r * width + left + c) * 3;
                pixels[o..o + 3].copy_from_slice(&pixel(index(c, r)));
            }
        }
        left += w + gap;
    }
    Rgb { width, height, pixels }
}

/// The quick look of a T1c NIfTI file (3D, or the first volume of a 4D file) and a label map
/// NIfTI file on its grid, both held in memory; `.nii` or `.nii.gz`.
pub fn overlay_files(t1c: &[u8], label: &[u8]) -> crate::error::Result<Rgb> {
    use crate::nifti_io::{ReadLimits, read_nifti};
    let image = read_nifti(t1c, "T1c", &ReadLimits::default())?;
    let labels = read_nifti(label, "label map", &ReadLimits::default())?;
    if labels.shape != image.shape || labels.frames != 1 {
        return Err(crate::error::CoreError::invalid(format!(
            "label map: shape {:?} does not match the T1c's {:?}",
            labels.shape, image.shape
        )));
    }
    let n = image.frame_len();
    let label: Vec<u8> = labels.data.iter().map(|&v| v.clamp(0.0, 255.0) as u8).collect();
    Ok(overlay(&image.data[..n], &label, image.shape))
}

/// The 1st and 99th percentiles of the non-zero values (0, 0 when all are zero).
fn window(image: &[f32]) -> (f32, f32) {
    let mut v: Vec<f32> = image.iter().copied().filter(|&x| x != 0.0 && x.is_finite()).collect();
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let k = |q: f64| ((v.len() - 1) as f64 * q).round() as usize;
    let (lo_i, hi_i) = (k(0.01), k(0.99));
    let lo = *v.select_nth_unstable_by(lo_i, f32::total_cmp).1;
    let hi = *v.select_nth_unstable_by(hi_i, f32::total_cmp).1;
    (lo, hi)
}

/// Encodes `rgb` as a PNG (8-bit RGB, no filter, zlib level 6).
pub fn png(rgb: &Rgb) -> Vec<u8> {
    use std::io::Write;
    let mut raw = Vec::with_capacity((rgb.width * 3 + 1) * rgb.height);
    for row in rgb.pixels.chunks(rgb.width * 3).take(rgb.height) {
        raw.push(0);
        raw.extend_from_slice(row);
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(6));
    z.write_all(&raw).expect("writing to memory cannot fail");
    let idat = z.finish().expect("writing to memory cannot fail");
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&(rgb.width as u32).to_be_bytes());
    ihdr.extend_from_slice(&(rgb.height as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8 bits, RGB, deflate, no filter method, no interlace
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &idat);
    chunk(&mut out, b"IEND", &[]);
    out
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = crc32fast::Hasher::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(&crc.finalize().to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panels_cross_at_the_tumour_and_show_its_colour() {
        let shape = [20, 16, 12];
        let n: usize = shape.iter().product();
        let image: Vec<f32> = (0..n).map(|i| (i % 97) as f32 + 1.0).collect();
        let mut label = vec![0u8; n];
        // A small ET block around (5, 10, 8).
        for x in 4..7 {
            for y in 9..12 {
                for z in 7..10 {
                    label[(x * 16 + y) * 12 + z] = 4;
                }
            }
        }
        let rgb = overlay(&image, &label, shape);
        assert_eq!((rgb.width, rgb.height), (20 + 20 + 16 + 8, 16));
        let px = |c: usize, r: usize| &rgb.pixels[(r * rgb.width + c) * 3..(r * rgb.width + c) * 3 + 3];
        // Axial panel: column x = 5, row y = 10 is tumour (green-tinted), a far corner is grey.
        let t = px(5, 10);
        assert!(t[1] > t[0] && t[1] > t[2], "{t:?}");
        let g = px(19, 0);
        assert!(g[0] == g[1] && g[1] == g[2]);
        // Coronal panel (starts at 24): column x = 5, row nz-1-z = 3 for z = 8.
        let t = px(24 + 5, 3);
        assert!(t[1] > t[0], "{t:?}");
        let bytes = png(&rgb);
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&bytes[bytes.len() - 8..bytes.len() - 4], b"IEND");
    }
}
