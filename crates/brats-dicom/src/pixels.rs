//! Pixel data of a checked stack → the volume in canonical order, rescale applied.
//!
//! Stored values are masked to BitsStored and sign-extended per PixelRepresentation before
//! each frame's RescaleSlope/Intercept is applied (in f64, then rounded once to f32), so an
//! integer series with slope 1 gives exactly its stored values.

use crate::error::{DicomError, Problem};
use crate::geometry::{Stack, Volume};
use crate::phi::UidHasher;
use crate::scan::Series;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::OpenFileOptions;
use dicom_pixeldata::PixelDecoder;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use rayon::prelude::*;

/// Whether this build decodes pixel data in transfer syntax `uid`.
pub fn can_decode(uid: &str) -> bool {
    TransferSyntaxRegistry.get(uid).is_some_and(|ts| ts.can_decode_all())
}

/// Decodes every slice of `stack` (one file open per instance, instances in parallel) and
/// returns the volume in canonical order with its affine.
pub fn read_volume(series: &Series, stack: &Stack, hasher: &UidHasher) -> Result<Volume, DicomError> {
    let fail = |problem| DicomError::Series { series: hasher.hash(&series.uid), role: None, problem };
    if let Some(bad) = series.instances.iter().find(|i| !can_decode(&i.transfer_syntax)) {
        return Err(fail(Problem::UndecodableTransferSyntax { uid: bad.transfer_syntax.clone() }));
    }
    let (rows, columns) = (stack.rows, stack.columns);
    let plane = rows * columns;
    // Which sorted slice each (instance, frame) fills.
    let mut targets: Vec<Vec<(u32, usize)>> = vec![Vec::new(); series.instances.len()];
    for (k, s) in stack.slices.iter().enumerate() {
        targets[s.instance].push((s.frame, k));
    }
    let decoded: Vec<Vec<(usize, Vec<f32>)>> = series
        .instances
        .par_iter()
        .zip(targets.par_iter())
        .map(|(inst, wanted)| {
            if wanted.is_empty() {
                return Ok(Vec::new());
            }
            let obj = OpenFileOptions::new()
                .open_file(&inst.path)
                .map_err(|_| Problem::Unreadable { reason: "the file cannot be parsed to its end".into() })?;
            let pixels = obj
                .decode_pixel_data()
                .map_err(|_| Problem::Unreadable { reason: "its pixel data cannot be decoded".into() })?;
            wanted
                .iter()
                .map(|&(frame, k)| {
                    let bytes = pixels.frame_data(frame).map_err(|_| Problem::Unreadable {
                        reason: format!("frame {} is missing from the pixel data", frame + 1),
                    })?;
                    let rescale = stack.slices[k].rescale;
                    let values = convert(bytes, plane, inst.bits_allocated, inst.bits_stored, inst.signed, rescale)?;
                    Ok((k, values))
                })
                .collect::<Result<Vec<_>, Problem>>()
        })
        .collect::<Result<_, Problem>>()
        .map_err(fail)?;
    let mut native = vec![0f32; plane * stack.slices.len()];
    for (k, values) in decoded.into_iter().flatten() {
        native[k * plane..(k + 1) * plane].copy_from_slice(&values);
    }
    let layout = stack.layout();
    Ok(Volume {
        shape: layout.shape(),
        affine: layout.canonical_affine(&stack.affine),
        data: layout.to_canonical(&native),
    })
}

/// One frame's native little-endian samples → rescaled f32 values.
fn convert(
    bytes: &[u8],
    plane: usize,
    bits_allocated: u16,
    bits_stored: u16,
    signed: bool,
    (slope, intercept): (f64, f64),
) -> Result<Vec<f32>, Problem> {
    let width = (bits_allocated / 8) as usize;
    if bytes.len() < plane * width {
        return Err(Problem::Unreadable {
            reason: format!("a frame holds {} bytes where rows × columns needs {}", bytes.len(), plane * width),
        });
    }
    let stored = u32::from(bits_stored.clamp(1, bits_allocated));
    let mask: u64 = if stored >= 32 { u32::MAX as u64 } else { (1u64 << stored) - 1 };
    let value = |raw: u64| -> f64 {
        let v = raw & mask;
        if signed && v & (1 << (stored - 1)) != 0 { v as f64 - (mask + 1) as f64 } else { v as f64 }
    };
    let raw = |i: usize| -> u64 {
        let b = &bytes[i * width..(i + 1) * width];
        match width {
            1 => b[0] as u64,
            2 => u16::from_le_bytes([b[0], b[1]]) as u64,
            _ => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64,
        }
    };
    Ok((0..plane).map(|i| (value(raw(i)) * slope + intercept) as f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_sign_extends_and_rescales() {
        // 12 stored bits, signed: 0x0FFF is −1; high garbage bits are ignored.
        let bytes = [0xFF, 0xFF, 0x01, 0x00, 0x00, 0x08];
        let v = convert(&bytes, 3, 16, 12, true, (2.0, 10.0)).unwrap();
        assert_eq!(v, vec![8.0, 12.0, -4086.0]);
        let u = convert(&bytes, 3, 16, 16, false, (1.0, 0.0)).unwrap();
        assert_eq!(u, vec![65535.0, 1.0, 2048.0]);
        assert!(matches!(convert(&bytes, 4, 16, 16, false, (1.0, 0.0)), Err(Problem::Unreadable { .. })));
    }

    #[test]
    fn jpeg_ls_needs_charls_and_explicit_le_does_not() {
        assert!(can_decode("1.2.840.10008.1.2.1"));
        assert!(can_decode("1.2.840.10008.1.2.4.70"));
        assert!(can_decode("1.2.840.10008.1.2.5"));
        assert!(can_decode("1.2.840.10008.1.2.4.90"));
        assert!(!can_decode("1.2.840.10008.1.2.4.80"));
        assert!(!can_decode("1.2.3.4"));
    }
}
