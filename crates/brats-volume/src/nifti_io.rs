//! NIfTI-1 volumes in and out, fast enough for the inference path.
//!
//! Headers are parsed by the `nifti` crate; the voxel body is decoded here in one pass that
//! applies `scl_slope`/`scl_inter`, converts to `f32`, checks for NaN/Inf and reorders from the
//! file's Fortran order (i fastest) to the platform's C order `[X, Y, Z]` (k fastest), in
//! parallel over blocks of X. `.nii.gz` bodies are inflated in one shot by libdeflate.

use crate::error::{CoreError, Result};
use nifti::{Endianness, NiftiHeader};
use rayon::prelude::*;
use std::borrow::Cow;
use std::io::Read;

/// Upper bounds that reject absurd headers before any large allocation.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    /// Largest size accepted along any spatial axis.
    pub max_axis: usize,
    /// Largest number of voxels accepted in one volume (all frames together).
    pub max_voxels: usize,
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits { max_axis: 1024, max_voxels: 1 << 28 }
    }
}

/// A decoded NIfTI-1 image: spatial shape, frames (1 for 3D, the 4th axis for 4D files),
/// affine and voxels as `f32` in C order.
#[derive(Debug, Clone)]
pub struct NiftiVolume {
    /// The parsed header, kept so outputs can reuse it.
    pub header: NiftiHeader,
    /// Spatial shape X, Y, Z (NIfTI i, j, k).
    pub shape: [usize; 3],
    /// Number of 3D frames (the 4th NIfTI axis); 1 for 3D files.
    pub frames: usize,
    /// Voxel-to-world affine (row-major), chosen like nibabel: sform, else qform, else base.
    pub affine: [[f64; 4]; 4],
    /// Voxel spacing along X, Y, Z in the file's units.
    pub spacing: [f64; 3],
    /// Voxels, frame-major; each frame is C order `[X, Y, Z]`, scaling applied.
    pub data: Vec<f32>,
    /// The on-disk data type, e.g. `int16`.
    pub dtype: &'static str,
}

impl NiftiVolume {
    /// Number of voxels in one frame.
    pub fn frame_len(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(Debug, Clone, Copy)]
enum Dtype {
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    F32,
    F64,
}

impl Dtype {
    fn from_code(code: i16) -> Option<(Dtype, &'static str)> {
        Some(match code {
            2 => (Dtype::U8, "uint8"),
            256 => (Dtype::I8, "int8"),
            4 => (Dtype::I16, "int16"),
            512 => (Dtype::U16, "uint16"),
            8 => (Dtype::I32, "int32"),
            768 => (Dtype::U32, "uint32"),
            16 => (Dtype::F32, "float32"),
            64 => (Dtype::F64, "float64"),
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Dtype::U8 | Dtype::I8 => 1,
            Dtype::I16 | Dtype::U16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::F64 => 8,
        }
    }
}

fn data_type_name(code: i16) -> String {
    let name = match code {
        1 => "binary",
        32 => "complex64",
        128 => "rgb24",
        1024 => "int64",
        1280 => "uint64",
        1536 => "float128",
        1792 => "complex128",
        2048 => "complex256",
        2304 => "rgba32",
        _ => "unknown",
    };
    format!("{name} (datatype code {code})")
}

/// True when the bytes start with the gzip magic number.
pub fn is_gzip(bytes: &[u8]) -> bool {
    bytes.len() >= 2 && bytes[0] == 0x1f && bytes[1] == 0x8b
}

/// Inflates a gzip stream (or passes plain bytes through), refusing outputs over `max_out` bytes.
pub fn decompress<'a>(bytes: &'a [u8], file: &str, max_out: usize) -> Result<Cow<'a, [u8]>> {
    if !is_gzip(bytes) {
        return Ok(Cow::Borrowed(bytes));
    }
    let corrupt = |why: &str| {
        CoreError::invalid(format!("{file}: corrupt or truncated gzip data ({why}); re-export or re-download the file"))
    };
    if bytes.len() < 18 {
        return Err(corrupt("shorter than a gzip header"));
    }
    // ISIZE (the last 4 bytes) is the uncompressed size mod 2^32 of the last member: exact for
    // the single-member files every NIfTI writer produces, and bounded by `max_out` < 4 GiB.
    let isize = u32::from_le_bytes(bytes[bytes.len() - 4..].try_into().unwrap()) as usize;
    if isize >= 348 && isize <= max_out {
        let mut out = vec![0u8; isize];
        let mut d = libdeflater::Decompressor::new();
        if let Ok(n) = d.gzip_decompress(bytes, &mut out)
            && n == isize
        {
            return Ok(Cow::Owned(out));
        }
    }
    // Multi-member, truncated or corrupt: the streaming decoder tells which.
    let mut out = Vec::new();
    let mut dec = flate2::read::MultiGzDecoder::new(bytes).take(max_out as u64 + 1);
    dec.read_to_end(&mut out).map_err(|e| corrupt(&e.to_string()))?;
    if out.len() > max_out {
        return Err(CoreError::invalid(format!(
            "{file}: decompresses to more than {max_out} bytes, larger than any accepted volume"
        )));
    }
    Ok(Cow::Owned(out))
}

/// Parses only the header of a `.nii` / `.nii.gz` byte buffer.
pub fn read_header(raw: &[u8], file: &str) -> Result<NiftiHeader> {
    if raw.len() < 348 {
        return Err(CoreError::invalid(format!(
            "{file}: {} bytes is too short for a NIfTI-1 header (348 bytes); is this a NIfTI file?",
            raw.len()
        )));
    }
    let header = NiftiHeader::from_reader(&raw[..348]).map_err(|e| {
        CoreError::invalid(format!("{file}: not a readable NIfTI-1 header ({e}); expected a .nii or .nii.gz file"))
    })?;
    if header.sizeof_hdr != 348 {
        return Err(CoreError::invalid(format!(
            "{file}: sizeof_hdr is {}, not 348: not a NIfTI-1 file (NIfTI-2 is not supported; convert with nibabel)",
            header.sizeof_hdr
        )));
    }
    if &header.magic != b"n+1\0" {
        return Err(CoreError::invalid(format!(
            "{file}: magic is {:?}, expected single-file NIfTI-1 'n+1' (.hdr/.img pairs are not supported)",
            String::from_utf8_lossy(&header.magic)
        )));
    }
    Ok(header)
}

/// A validated NIfTI-1 header: everything needed to decode the voxels, checked against the
/// [`ReadLimits`] and the size of the (decompressed) file, so that decoding can only fail on
/// the voxel values themselves (NaN/Inf).
#[derive(Debug, Clone)]
pub struct NiftiInfo {
    /// The parsed header.
    pub header: NiftiHeader,
    /// Spatial shape X, Y, Z (NIfTI i, j, k).
    pub shape: [usize; 3],
    /// Number of 3D frames (the 4th NIfTI axis); 1 for 3D files.
    pub frames: usize,
    /// Voxel-to-world affine (row-major), chosen like nibabel: sform, else qform, else base.
    pub affine: [[f64; 4]; 4],
    /// Voxel spacing along X, Y, Z in the file's units.
    pub spacing: [f64; 3],
    /// The on-disk data type, e.g. `int16`.
    pub dtype: &'static str,
    code: Dtype,
    offset: usize,
    big_endian: bool,
    slope: f64,
    inter: f64,
}

impl NiftiInfo {
    /// Number of voxels in one frame.
    pub fn frame_len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of voxels in the file (all frames): the length [`decode_into`] fills.
    pub fn len(&self) -> usize {
        self.frame_len() * self.frames
    }

    /// Always false: a validated header has no zero dimension.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Parses and validates the header of a decompressed `.nii` byte buffer (see [`decompress`]):
/// dimensions, limits, data type, `vox_offset` and that the body is complete.
pub fn read_info(raw: &[u8], file: &str, limits: &ReadLimits) -> Result<NiftiInfo> {
    let header = read_header(raw, file)?;

    let ndim = header.dim[0] as usize;
    let dims: Vec<usize> = header.dim[1..=ndim.min(7)].iter().map(|&d| d as usize).collect();
    let (shape, frames) = match (ndim, dims.as_slice()) {
        (3, [x, y, z]) => ([*x, *y, *z], 1),
        (4, [x, y, z, t]) => ([*x, *y, *z], *t),
        (5, [x, y, z, 1, c]) => ([*x, *y, *z], *c),
        _ => {
            return Err(CoreError::invalid(format!(
                "{file}: has {ndim} dimensions {dims:?}; expected a 3D volume (or one 4D file with the modalities on the 4th axis)"
            )));
        }
    };
    if shape.contains(&0) || frames == 0 {
        return Err(CoreError::invalid(format!("{file}: dimensions {dims:?} contain a zero")));
    }
    if shape.iter().any(|&d| d > limits.max_axis) {
        return Err(CoreError::invalid(format!(
            "{file}: dimensions {shape:?} exceed {} voxels per axis; this is not a brain MRI at ~1 mm, resample it first",
            limits.max_axis
        )));
    }
    let frame_len: usize = shape.iter().product();
    let total = frame_len * frames;
    if total > limits.max_voxels {
        return Err(CoreError::invalid(format!(
            "{file}: {total} voxels exceed the limit of {}; resample or crop the volume first",
            limits.max_voxels
        )));
    }
    let (code, dtype) = Dtype::from_code(header.datatype).ok_or_else(|| {
        CoreError::invalid(format!(
            "{file}: data type {} is not supported; use uint8, int8, int16, uint16, int32, uint32, float32 or float64",
            data_type_name(header.datatype)
        ))
    })?;
    let offset = header.vox_offset as usize;
    if header.vox_offset < 348.0 || (offset as f32) != header.vox_offset {
        return Err(CoreError::invalid(format!("{file}: vox_offset {} is invalid", header.vox_offset)));
    }
    let need = total * code.size();
    let have = raw.len().saturating_sub(offset);
    if have < need {
        return Err(CoreError::invalid(format!(
            "{file}: truncated NIfTI body: the header promises {need} bytes of voxels, the file has {have}; re-export or re-download it"
        )));
    }

    let (mut slope, mut inter) = (header.scl_slope as f64, header.scl_inter as f64);
    if slope == 0.0 || !slope.is_finite() {
        slope = 1.0;
        inter = 0.0;
    }
    if !inter.is_finite() {
        inter = 0.0;
    }
    let big_endian = header.endianness == Endianness::Big;
    let affine = best_affine(&header, shape);
    let spacing = [header.pixdim[1].abs() as f64, header.pixdim[2].abs() as f64, header.pixdim[3].abs() as f64];
    Ok(NiftiInfo { header, shape, frames, affine, spacing, dtype, code, offset, big_endian, slope, inter })
}

/// Decodes the voxels of `raw` (the buffer `info` was read from) into `out` (length
/// `info.len()`): scaling applied, f32, each frame in C order `[X, Y, Z]`, frame-major. Fails,
/// naming `file`, when a voxel is NaN or infinite.
pub fn decode_into(raw: &[u8], info: &NiftiInfo, file: &str, out: &mut [f32]) -> Result<()> {
    let (frame_len, size) = (info.frame_len(), info.code.size());
    if out.len() != info.len() {
        return Err(CoreError::Internal(format!(
            "{file}: decode_into given {} values for {} voxels",
            out.len(),
            info.len()
        )));
    }
    let body = &raw[info.offset..info.offset + info.len() * size];
    let mut non_finite = 0usize;
    for (src, dst) in body.chunks_exact(frame_len * size).zip(out.chunks_exact_mut(frame_len)) {
        non_finite += to_c_order(src, info.code, info.big_endian, info.slope, info.inter, info.shape, dst);
    }
    if non_finite > 0 {
        return Err(CoreError::invalid(format!(
            "{file}: {non_finite} voxels are NaN or infinite; fix or mask them (e.g. set them to 0) before segmentation"
        )));
    }
    Ok(())
}

/// Validates a decompressed `.nii` buffer and decodes its voxels straight into `out` (which
/// must hold `info.len()` values, e.g. one channel of a stacked image), returning the header
/// information. Same checks and errors as [`read_nifti`].
pub fn read_nifti_into(raw: &[u8], file: &str, limits: &ReadLimits, out: &mut [f32]) -> Result<NiftiInfo> {
    let info = read_info(raw, file, limits)?;
    decode_into(raw, &info, file, out)?;
    Ok(info)
}

/// Decodes a `.nii` or `.nii.gz` file held in memory. `file` names it in error messages.
pub fn read_nifti(bytes: &[u8], file: &str, limits: &ReadLimits) -> Result<NiftiVolume> {
    let max_out = max_decompressed(limits);
    let raw = decompress(bytes, file, max_out)?;
    let info = read_info(&raw, file, limits)?;
    let mut data = vec![0f32; info.len()];
    decode_into(&raw, &info, file, &mut data)?;
    let NiftiInfo { header, shape, frames, affine, spacing, dtype, .. } = info;
    Ok(NiftiVolume { header, shape, frames, affine, spacing, data, dtype })
}

/// The largest decompressed file [`read_nifti`] accepts under `limits`: header, extensions
/// and `max_voxels` float64 values.
pub fn max_decompressed(limits: &ReadLimits) -> usize {
    352 + limits.max_voxels.saturating_mul(8) + (1 << 20)
}

/// Converts one Fortran-order frame to f32 in C order; returns how many values were not finite.
fn to_c_order(
    src: &[u8],
    dtype: Dtype,
    big_endian: bool,
    slope: f64,
    inter: f64,
    shape: [usize; 3],
    out: &mut [f32],
) -> usize {
    macro_rules! go {
        ($t:ty, $n:expr) => {
            if big_endian {
                transpose::<$n>(src, |b| <$t>::from_be_bytes(b) as f64, slope, inter, shape, out)
            } else {
                transpose::<$n>(src, |b| <$t>::from_le_bytes(b) as f64, slope, inter, shape, out)
            }
        };
    }
    match dtype {
        Dtype::U8 => go!(u8, 1),
        Dtype::I8 => go!(i8, 1),
        Dtype::I16 => go!(i16, 2),
        Dtype::U16 => go!(u16, 2),
        Dtype::I32 => go!(i32, 4),
        Dtype::U32 => go!(u32, 4),
        Dtype::F32 => go!(f32, 4),
        Dtype::F64 => go!(f64, 8),
    }
}

/// The reorder for one element type (monomorphised, so the inner loop has no type dispatch):
/// parallel over blocks of X, which own contiguous parts of the output; within a block, tiles
/// of 16 along Z keep both the strided reads and the writes in L1.
fn transpose<const N: usize>(
    src: &[u8],
    decode: impl Fn([u8; N]) -> f64 + Sync,
    slope: f64,
    inter: f64,
    shape: [usize; 3],
    out: &mut [f32],
) -> usize {
    let [nx, ny, nz] = shape;
    let plane = ny * nz;
    let scaled = slope != 1.0 || inter != 0.0;
    const BLOCK: usize = 16;
    const TILE: usize = 16;
    out.par_chunks_mut(BLOCK * plane)
        .enumerate()
        .map(|(b, chunk)| {
            let i0 = b * BLOCK;
            let bx = chunk.len() / plane;
            let mut bad = 0usize;
            for j in 0..ny {
                for k0 in (0..nz).step_by(TILE) {
                    let k1 = (k0 + TILE).min(nz);
                    for di in 0..bx {
                        let dst = &mut chunk[di * plane + j * nz + k0..di * plane + j * nz + k1];
                        for (dk, d) in dst.iter_mut().enumerate() {
                            let idx = (i0 + di + nx * (j + ny * (k0 + dk))) * N;
                            let raw = decode(src[idx..idx + N].try_into().unwrap());
                            let v = if scaled { (raw * slope + inter) as f32 } else { raw as f32 };
                            bad += (!v.is_finite()) as usize;
                            *d = v;
                        }
                    }
                }
            }
            bad
        })
        .sum()
}

/// The affine nibabel reports: sform when `sform_code > 0`, else qform when `qform_code > 0`,
/// else the base affine from shape and zooms.
pub fn best_affine(h: &NiftiHeader, shape: [usize; 3]) -> [[f64; 4]; 4] {
    if h.sform_code > 0 {
        let r = |row: [f32; 4]| row.map(|v| v as f64);
        [r(h.srow_x), r(h.srow_y), r(h.srow_z), [0., 0., 0., 1.]]
    } else if h.qform_code > 0 {
        let (b, c, d) = (h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64);
        let a = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
        let rot = [
            [a * a + b * b - c * c - d * d, 2. * (b * c - a * d), 2. * (b * d + a * c)],
            [2. * (b * c + a * d), a * a + c * c - b * b - d * d, 2. * (c * d - a * b)],
            [2. * (b * d - a * c), 2. * (c * d + a * b), a * a + d * d - b * b - c * c],
        ];
        let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let z = [h.pixdim[1] as f64, h.pixdim[2] as f64, h.pixdim[3] as f64 * qfac];
        let t = [h.quatern_x as f64, h.quatern_y as f64, h.quatern_z as f64];
        let mut m = [[0.0; 4]; 4];
        for i in 0..3 {
            for j in 0..3 {
                m[i][j] = rot[i][j] * z[j];
            }
            m[i][3] = t[i];
        }
        m[3][3] = 1.0;
        m
    } else {
        let z = [-(h.pixdim[1] as f64), h.pixdim[2] as f64, h.pixdim[3] as f64];
        let mut m = [[0.0; 4]; 4];
        for i in 0..3 {
            m[i][i] = z[i];
            m[i][3] = -((shape[i] as f64 - 1.0) / 2.0) * z[i];
        }
        m[3][3] = 1.0;
        m
    }
}

/// Voxel types that can be written.
pub trait NiftiScalar: Copy + Send + Sync {
    /// NIfTI datatype code.
    const CODE: i16;
    /// Bits per voxel.
    const BITPIX: i16;
    /// Appends the little-endian bytes of `self`.
    fn put(self, out: &mut [u8]);
}

impl NiftiScalar for u8 {
    const CODE: i16 = 2;
    const BITPIX: i16 = 8;
    fn put(self, out: &mut [u8]) {
        out[0] = self;
    }
}

impl NiftiScalar for f32 {
    const CODE: i16 = 16;
    const BITPIX: i16 = 32;
    fn put(self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_le_bytes());
    }
}

/// Encodes a 3D volume given in C order `[X, Y, Z]` as a single-file NIfTI-1 (`.nii`, or
/// `.nii.gz` when `gzip_level` is `Some`). The header is `template`'s (so the output carries
/// the input's orientation, units and description) with shape, type, scaling and the sform
/// replaced by `affine`.
pub fn write_nifti<T: NiftiScalar>(
    data: &[T],
    shape: [usize; 3],
    affine: &[[f64; 4]; 4],
    template: Option<&NiftiHeader>,
    gzip_level: Option<i32>,
) -> Result<Vec<u8>> {
    let n: usize = shape.iter().product();
    if data.len() != n {
        return Err(CoreError::Internal(format!("write_nifti: {} voxels for shape {shape:?}", data.len())));
    }
    if shape.iter().any(|&d| d == 0 || d > i16::MAX as usize) {
        return Err(CoreError::invalid(format!("cannot write a NIfTI-1 volume of shape {shape:?}")));
    }
    let mut h = template.cloned().unwrap_or_default();
    h.sizeof_hdr = 348;
    h.dim = [3, shape[0] as u16, shape[1] as u16, shape[2] as u16, 1, 1, 1, 1];
    h.datatype = T::CODE;
    h.bitpix = T::BITPIX;
    h.vox_offset = 352.0;
    h.scl_slope = 1.0;
    h.scl_inter = 0.0;
    h.cal_max = 0.0;
    h.cal_min = 0.0;
    h.intent_code = 0;
    h.magic = *b"n+1\0";
    if template.is_none() {
        h.xyzt_units = 2 | 8; // mm, s
        h.qform_code = 0;
        h.pixdim = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0];
    }
    for (axis, p) in h.pixdim[1..4].iter_mut().enumerate() {
        let col = (0..3).map(|r| affine[r][axis].powi(2)).sum::<f64>().sqrt();
        *p = col as f32;
    }
    h.sform_code = if h.sform_code > 0 { h.sform_code } else { 2 };
    let row = |r: usize| [affine[r][0] as f32, affine[r][1] as f32, affine[r][2] as f32, affine[r][3] as f32];
    h.srow_x = row(0);
    h.srow_y = row(1);
    h.srow_z = row(2);

    let size = (T::BITPIX / 8) as usize;
    let mut out = vec![0u8; 352 + n * size];
    encode_header(&h, &mut out[..348]);
    let body = &mut out[352..];
    let [nx, ny, nz] = shape;
    // Fortran order: i fastest. Parallel over k-slabs, which are contiguous in the file.
    body.par_chunks_mut(nx * ny * size).enumerate().for_each(|(k, slab)| {
        for j in 0..ny {
            for i in 0..nx {
                data[(i * ny + j) * nz + k].put(&mut slab[(i + nx * j) * size..(i + nx * j + 1) * size]);
            }
        }
    });
    match gzip_level {
        None => Ok(out),
        Some(level) => {
            let lvl = libdeflater::CompressionLvl::new(level.clamp(0, 12))
                .map_err(|_| CoreError::invalid(format!("gzip level {level} is out of range 0..=12")))?;
            let mut c = libdeflater::Compressor::new(lvl);
            let mut gz = vec![0u8; c.gzip_compress_bound(out.len())];
            let len = c
                .gzip_compress(&out, &mut gz)
                .map_err(|e| CoreError::Internal(format!("gzip compression failed: {e:?}")))?;
            gz.truncate(len);
            Ok(gz)
        }
    }
}

/// Serialises a NIfTI-1 header, little-endian, into 348 bytes.
fn encode_header(h: &NiftiHeader, out: &mut [u8]) {
    fn put(out: &mut [u8], at: usize, bytes: &[u8]) {
        out[at..at + bytes.len()].copy_from_slice(bytes);
    }
    put(out, 0, &h.sizeof_hdr.to_le_bytes());
    put(out, 4, &h.data_type);
    put(out, 14, &h.db_name);
    put(out, 32, &h.extents.to_le_bytes());
    put(out, 36, &h.session_error.to_le_bytes());
    out[38] = h.regular;
    out[39] = h.dim_info;
    for (i, d) in h.dim.iter().enumerate() {
        put(out, 40 + 2 * i, &(*d as i16).to_le_bytes());
    }
    put(out, 56, &h.intent_p1.to_le_bytes());
    put(out, 60, &h.intent_p2.to_le_bytes());
    put(out, 64, &h.intent_p3.to_le_bytes());
    put(out, 68, &h.intent_code.to_le_bytes());
    put(out, 70, &h.datatype.to_le_bytes());
    put(out, 72, &h.bitpix.to_le_bytes());
    put(out, 74, &h.slice_start.to_le_bytes());
    for (i, p) in h.pixdim.iter().enumerate() {
        put(out, 76 + 4 * i, &p.to_le_bytes());
    }
    put(out, 108, &h.vox_offset.to_le_bytes());
    put(out, 112, &h.scl_slope.to_le_bytes());
    put(out, 116, &h.scl_inter.to_le_bytes());
    put(out, 120, &h.slice_end.to_le_bytes());
    out[122] = h.slice_code;
    out[123] = h.xyzt_units;
    put(out, 124, &h.cal_max.to_le_bytes());
    put(out, 128, &h.cal_min.to_le_bytes());
    put(out, 132, &h.slice_duration.to_le_bytes());
    put(out, 136, &h.toffset.to_le_bytes());
    put(out, 140, &h.glmax.to_le_bytes());
    put(out, 144, &h.glmin.to_le_bytes());
    let mut descrip = [0u8; 80];
    let n = h.descrip.len().min(79);
    descrip[..n].copy_from_slice(&h.descrip[..n]);
    put(out, 148, &descrip);
    put(out, 228, &h.aux_file);
    put(out, 252, &h.qform_code.to_le_bytes());
    put(out, 254, &h.sform_code.to_le_bytes());
    put(out, 256, &h.quatern_b.to_le_bytes());
    put(out, 260, &h.quatern_c.to_le_bytes());
    put(out, 264, &h.quatern_d.to_le_bytes());
    put(out, 268, &h.quatern_x.to_le_bytes());
    put(out, 272, &h.quatern_y.to_le_bytes());
    put(out, 276, &h.quatern_z.to_le_bytes());
    for (i, v) in h.srow_x.iter().chain(&h.srow_y).chain(&h.srow_z).enumerate() {
        put(out, 280 + 4 * i, &v.to_le_bytes());
    }
    put(out, 328, &h.intent_name);
    put(out, 344, &h.magic);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn affine() -> [[f64; 4]; 4] {
        [[-1.0, 0.0, 0.0, 90.0], [0.0, -1.0, 0.0, 126.0], [0.0, 0.0, 1.0, -72.0], [0.0, 0.0, 0.0, 1.0]]
    }

    #[test]
    fn float_roundtrip_keeps_values_order_and_affine() {
        let shape = [5, 4, 3];
        let data: Vec<f32> = (0..60).map(|v| v as f32 * 0.5 - 3.0).collect();
        for gz in [None, Some(6)] {
            let bytes = write_nifti(&data, shape, &affine(), None, gz).unwrap();
            assert_eq!(is_gzip(&bytes), gz.is_some());
            let v = read_nifti(&bytes, "t.nii", &ReadLimits::default()).unwrap();
            assert_eq!(v.shape, shape);
            assert_eq!(v.frames, 1);
            assert_eq!(v.data, data);
            assert_eq!(v.affine, affine());
            assert_eq!(v.dtype, "float32");
        }
    }

    #[test]
    fn read_into_a_slice_matches_read_nifti() {
        let shape = [5, 4, 3];
        let data: Vec<f32> = (0..60).map(|v| v as f32 * 0.25 - 7.0).collect();
        let bytes = write_nifti(&data, shape, &affine(), None, None).unwrap();
        let lim = ReadLimits::default();
        let mut stacked = vec![f32::NAN; 3 * 60];
        let info = read_nifti_into(&bytes, "t.nii", &lim, &mut stacked[60..120]).unwrap();
        assert_eq!((info.shape, info.frames, info.len(), info.dtype), (shape, 1, 60, "float32"));
        assert_eq!(info.affine, affine());
        assert_eq!(&stacked[60..120], read_nifti(&bytes, "t.nii", &lim).unwrap().data.as_slice());
        assert!(stacked[..60].iter().chain(&stacked[120..]).all(|v| v.is_nan()), "wrote outside its slice");
        let e = read_nifti_into(&bytes, "t.nii", &lim, &mut stacked[..59]).unwrap_err().to_string();
        assert!(e.contains("59 values for 60 voxels"), "{e}");
        let e = read_nifti_into(&bytes[..bytes.len() - 4], "cut.nii", &lim, &mut stacked[..60]).unwrap_err();
        assert!(e.to_string().contains("truncated NIfTI body"), "{e}");
    }

    #[test]
    fn fortran_order_on_disk() {
        // Voxel (i=1, j=0, k=0) is the second value in the file.
        let shape = [2, 2, 2];
        let mut data = vec![0u8; 8];
        data[4] = 7; // C index of (1,0,0) = (1*2+0)*2+0
        let bytes = write_nifti(&data, shape, &affine(), None, None).unwrap();
        assert_eq!(bytes[352 + 1], 7);
    }

    #[test]
    fn scaling_is_applied() {
        let shape = [2, 2, 2];
        let data: Vec<u8> = (0..8).collect();
        let mut bytes = write_nifti(&data, shape, &affine(), None, None).unwrap();
        bytes[112..116].copy_from_slice(&2.0f32.to_le_bytes());
        bytes[116..120].copy_from_slice(&(-5.0f32).to_le_bytes());
        let v = read_nifti(&bytes, "s.nii", &ReadLimits::default()).unwrap();
        assert_eq!(v.data, (0..8).map(|x| x as f32 * 2.0 - 5.0).collect::<Vec<_>>());
    }

    #[test]
    fn bad_inputs_are_named() {
        let data = vec![1.0f32; 24];
        let good = write_nifti(&data, [2, 3, 4], &affine(), None, None).unwrap();
        let lim = ReadLimits::default();
        let e = read_nifti(&good[..good.len() - 10], "cut.nii", &lim).unwrap_err().to_string();
        assert!(e.contains("cut.nii") && e.contains("truncated NIfTI body"), "{e}");
        let gz = write_nifti(&data, [2, 3, 4], &affine(), None, Some(6)).unwrap();
        let e = read_nifti(&gz[..gz.len() / 2], "cut.nii.gz", &lim).unwrap_err().to_string();
        assert!(e.contains("corrupt or truncated gzip"), "{e}");
        let mut nan = good.clone();
        nan[352..356].copy_from_slice(&f32::NAN.to_le_bytes());
        let e = read_nifti(&nan, "nan.nii", &lim).unwrap_err().to_string();
        assert!(e.contains("NaN"), "{e}");
        let mut absurd = good.clone();
        absurd[42..44].copy_from_slice(&2000i16.to_le_bytes());
        let e = read_nifti(&absurd, "big.nii", &lim).unwrap_err().to_string();
        assert!(e.contains("exceed"), "{e}");
        let mut complex = good.clone();
        complex[70..72].copy_from_slice(&32i16.to_le_bytes());
        let e = read_nifti(&complex, "c.nii", &lim).unwrap_err().to_string();
        assert!(e.contains("complex64") && e.contains("not supported"), "{e}");
        let e = read_nifti(b"hello world", "txt.nii", &lim).unwrap_err().to_string();
        assert!(e.contains("too short"), "{e}");
        let mut two_d = good.clone();
        two_d[40..42].copy_from_slice(&2i16.to_le_bytes());
        let e = read_nifti(&two_d, "2d.nii", &lim).unwrap_err().to_string();
        assert!(e.contains("expected a 3D volume"), "{e}");
    }
}
