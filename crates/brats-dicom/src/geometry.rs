//! One series → one checked stack of slices with its affine, and the canonical voxel order.
//!
//! Conventions (PS3.3 C.7.6.2.1.1): world coordinates are DICOM patient coordinates (LPS, mm);
//! a slice's pixel (row r, column c) lies at `IPP + c·Δc·row_cosine + r·Δr·column_cosine`
//! where PixelSpacing = [Δr, Δc]. Slices are sorted by the projection of their position on the
//! normal `row_cosine × column_cosine`, never by InstanceNumber.
//!
//! The native voxel index is (column, row, slice). The canonical order permutes and flips those
//! axes so that they point, as closely as the orientation allows, to +L, +P, +S: the order of
//! BraTS NIfTI files (axis codes L, P, S; the MONAI bundle does not reorient), so a BraTS-like
//! axial series gives the same array as its NIfTI file. Volumes hold C-order `[X, Y, Z]` data.

use crate::error::{DicomError, Problem};
use crate::phi::UidHasher;
use crate::scan::Series;
use serde::Serialize;

/// Voxel index → patient coordinates (LPS, mm), row-major 4×4.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Affine(pub [[f64; 4]; 4]);

impl Affine {
    /// Maps a voxel index (may be fractional) to millimetres.
    pub fn apply(&self, p: [f64; 3]) -> [f64; 3] {
        let m = &self.0;
        std::array::from_fn(|r| m[r][0] * p[0] + m[r][1] * p[1] + m[r][2] * p[2] + m[r][3])
    }

    /// Column `axis` of the 3×3 part: the step in mm along a voxel axis.
    pub fn axis(&self, axis: usize) -> [f64; 3] {
        std::array::from_fn(|r| self.0[r][axis])
    }

    /// Voxel sizes (lengths of the axis columns).
    pub fn zooms(&self) -> [f64; 3] {
        std::array::from_fn(|a| norm(self.axis(a)))
    }

    /// The inverse map (mm → voxel index). The 3×3 part is invertible for any checked stack.
    pub fn inverse(&self) -> Affine {
        let m = &self.0;
        let a = [[m[0][0], m[0][1], m[0][2]], [m[1][0], m[1][1], m[1][2]], [m[2][0], m[2][1], m[2][2]]];
        let det = a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1]) - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
            + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]);
        let c = |r0: usize, c0: usize, r1: usize, c1: usize| a[r0][c0] * a[r1][c1] - a[r0][c1] * a[r1][c0];
        let inv = [
            [c(1, 1, 2, 2) / det, -c(0, 1, 2, 2) / det, c(0, 1, 1, 2) / det],
            [-c(1, 0, 2, 2) / det, c(0, 0, 2, 2) / det, -c(0, 0, 1, 2) / det],
            [c(1, 0, 2, 1) / det, -c(0, 0, 2, 1) / det, c(0, 0, 1, 1) / det],
        ];
        let t = [m[0][3], m[1][3], m[2][3]];
        let mut out = [[0.0; 4]; 4];
        for r in 0..3 {
            for k in 0..3 {
                out[r][k] = inv[r][k];
            }
            out[r][3] = -(inv[r][0] * t[0] + inv[r][1] * t[1] + inv[r][2] * t[2]);
        }
        out[3][3] = 1.0;
        Affine(out)
    }

    /// The NIfTI (RAS) form: x and y negated.
    pub fn to_ras(&self) -> [[f64; 4]; 4] {
        let mut m = self.0;
        for row in m.iter_mut().take(2) {
            for v in row.iter_mut() {
                *v = -*v;
            }
        }
        m
    }

    /// From a NIfTI (RAS) affine.
    pub fn from_ras(ras: &[[f64; 4]; 4]) -> Affine {
        let mut m = *ras;
        for row in m.iter_mut().take(2) {
            for v in row.iter_mut() {
                *v = -*v;
            }
        }
        Affine(m)
    }

    /// Whether every element is within `tol` of `other`'s.
    pub fn close_to(&self, other: &Affine, tol: f64) -> bool {
        self.0.iter().flatten().zip(other.0.iter().flatten()).all(|(a, b)| (a - b).abs() <= tol)
    }
}

pub(crate) fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

pub(crate) fn norm(a: [f64; 3]) -> f64 {
    dot(a, a).sqrt()
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
}

fn sub(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

/// A volume: C-order `[X, Y, Z]` voxels and the affine of that order.
#[derive(Debug, Clone, PartialEq)]
pub struct Volume {
    /// Shape X, Y, Z.
    pub shape: [usize; 3],
    /// Voxel → LPS mm.
    pub affine: Affine,
    /// Voxels, C order (Z fastest).
    pub data: Vec<f32>,
}

/// One slice of a checked stack.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceRef {
    /// Index of the instance in its series.
    pub instance: usize,
    /// Frame within the instance.
    pub frame: u32,
    /// ImagePositionPatient.
    pub position: [f64; 3],
    /// RescaleSlope, RescaleIntercept.
    pub rescale: (f64, f64),
}

/// A series that passed every geometry check, slices sorted along the normal.
#[derive(Debug, Clone)]
pub struct Stack {
    /// Rows per slice.
    pub rows: usize,
    /// Columns per slice.
    pub columns: usize,
    /// ImageOrientationPatient shared by all slices.
    pub orientation: [f64; 6],
    /// PixelSpacing [between rows, between columns], mm.
    pub spacing: [f64; 2],
    /// The slices, sorted by position along the normal.
    pub slices: Vec<SliceRef>,
    /// Native affine: index (column, row, slice) → LPS mm.
    pub affine: Affine,
    /// Distance between consecutive slices, mm.
    pub step_mm: f64,
}

impl Stack {
    /// Native shape (columns, rows, slices).
    pub fn native_shape(&self) -> [usize; 3] {
        [self.columns, self.rows, self.slices.len()]
    }

    /// The canonical layout of this stack.
    pub fn layout(&self) -> Layout {
        Layout::canonical(&self.affine, self.native_shape())
    }
}

/// Tolerances of the checks (pacs.md §3).
const ORIENTATION_TOL: f64 = 1e-4;
const ORTHONORMAL_TOL: f64 = 1e-3;
const DUPLICATE_MM: f64 = 1e-3;
const SPACING_REL_TOL: f64 = 0.01;

/// Checks `series` as one stack: attributes present, one format and orientation, positions on
/// the normal, no duplicates, uniform steps; then sorts it and computes the affine.
pub fn check_stack(series: &Series, hasher: &UidHasher, min_slices: usize) -> Result<Stack, DicomError> {
    let fail = |problem| DicomError::Series { series: hasher.hash(&series.uid), role: None, problem };
    let first = series.first();
    if first.samples_per_pixel != 1 || first.photometric != "MONOCHROME2" {
        return Err(fail(Problem::Photometric { value: first.photometric.clone(), samples: first.samples_per_pixel }));
    }
    if !matches!(first.bits_allocated, 8 | 16 | 32) {
        return Err(fail(Problem::BitDepth { bits: first.bits_allocated }));
    }
    let frames: Vec<(usize, &crate::instance::Frame)> =
        series.instances.iter().enumerate().flat_map(|(i, inst)| inst.frames.iter().map(move |f| (i, f))).collect();
    let total = frames.len();
    if total < min_slices.max(2) {
        return Err(fail(Problem::TooFewSlices { slices: total, minimum: min_slices.max(2) }));
    }
    let missing = |attribute: &'static str, count: usize| Problem::MissingAttribute { attribute, slices: count, total };
    let no_position = frames.iter().filter(|(_, f)| f.position.is_none()).count();
    if no_position > 0 {
        let enhanced_without =
            series.instances.iter().any(|i| i.enhanced && i.frames.iter().all(|f| f.position.is_none()));
        return Err(fail(if enhanced_without {
            Problem::NoFramePositions
        } else {
            missing("ImagePositionPatient", no_position)
        }));
    }
    let no_orientation = frames.iter().filter(|(_, f)| f.orientation.is_none()).count();
    if no_orientation > 0 {
        return Err(fail(missing("ImageOrientationPatient", no_orientation)));
    }
    let no_spacing = frames.iter().filter(|(_, f)| f.spacing.is_none()).count();
    if no_spacing > 0 {
        return Err(fail(missing("PixelSpacing", no_spacing)));
    }
    if series.instances.iter().any(|i| i.rows != first.rows || i.columns != first.columns)
        || first.rows == 0
        || first.columns == 0
    {
        return Err(fail(Problem::MixedFormat { what: "rows/columns" }));
    }
    let spacing = frames[0].1.spacing.expect("checked above");
    if frames.iter().any(|(_, f)| {
        let s = f.spacing.expect("checked above");
        (0..2).any(|k| (s[k] - spacing[k]).abs() > 1e-4 * spacing[k].abs().max(1.0))
    }) || spacing.iter().any(|&s| s <= 0.0)
    {
        return Err(fail(Problem::MixedFormat { what: "pixel spacing" }));
    }
    let orientation = frames[0].1.orientation.expect("checked above");
    let other = frames
        .iter()
        .filter(|(_, f)| {
            let o = f.orientation.expect("checked above");
            o.iter().zip(&orientation).any(|(a, b)| (a - b).abs() > ORIENTATION_TOL)
        })
        .count();
    if other > 0 {
        return Err(fail(Problem::MixedOrientation { slices: other, total }));
    }
    let row = [orientation[0], orientation[1], orientation[2]];
    let col = [orientation[3], orientation[4], orientation[5]];
    if (norm(row) - 1.0).abs() > ORTHONORMAL_TOL
        || (norm(col) - 1.0).abs() > ORTHONORMAL_TOL
        || dot(row, col).abs() > ORTHONORMAL_TOL
    {
        return Err(fail(Problem::BadOrientation));
    }
    let normal = cross(row, col);
    let mut slices: Vec<(f64, SliceRef)> = frames
        .iter()
        .map(|(i, f)| {
            let p = f.position.expect("checked above");
            (dot(p, normal), SliceRef { instance: *i, frame: f.index, position: p, rescale: f.rescale })
        })
        .collect();
    slices.sort_by(|a, b| a.0.total_cmp(&b.0));
    for w in slices.windows(2) {
        if (w[1].0 - w[0].0).abs() < DUPLICATE_MM {
            return Err(fail(Problem::DuplicatePosition { at_mm: w[0].0 }));
        }
    }
    let origin = slices[0].1.position;
    let mut off_mm: f64 = 0.0;
    let mut worst = 0.0;
    for (d, s) in &slices {
        let v = sub(s.position, origin);
        let along = d - slices[0].0;
        let off = norm(sub(v, normal.map(|n| n * along)));
        if off > off_mm {
            off_mm = off;
            worst = along.abs();
        }
    }
    if off_mm > 0.02f64.max(1e-3 * worst) {
        return Err(fail(Problem::Shear { off_mm }));
    }
    let steps: Vec<f64> = slices.windows(2).map(|w| w[1].0 - w[0].0).collect();
    let mut sorted = steps.clone();
    sorted.sort_by(f64::total_cmp);
    let usual = sorted[sorted.len() / 2];
    for (k, &step) in steps.iter().enumerate() {
        if (step - usual).abs() > SPACING_REL_TOL * usual {
            let after_mm = slices[k].0;
            // A step that is (close to) a whole multiple of the usual one is a missing slice.
            let ratio = step / usual;
            return Err(fail(if ratio > 1.5 && (ratio - ratio.round()).abs() < 0.1 {
                Problem::Gap { after_mm, step_mm: step, usual_mm: usual }
            } else {
                Problem::UnevenSpacing { step_mm: step, usual_mm: usual }
            }));
        }
    }
    let n = slices.len();
    let last = slices[n - 1].1.position;
    let k_axis = sub(last, origin).map(|v| v / (n - 1) as f64);
    let mut m = [[0.0; 4]; 4];
    for r in 0..3 {
        m[r][0] = row[r] * spacing[1];
        m[r][1] = col[r] * spacing[0];
        m[r][2] = k_axis[r];
        m[r][3] = origin[r];
    }
    m[3][3] = 1.0;
    Ok(Stack {
        rows: first.rows as usize,
        columns: first.columns as usize,
        orientation,
        spacing,
        slices: slices.into_iter().map(|(_, s)| s).collect(),
        affine: Affine(m),
        step_mm: (sorted.iter().sum::<f64>() / sorted.len() as f64),
    })
}

/// How the native axes (column, row, slice) map onto the canonical ones (+L, +P, +S).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Layout {
    /// Native shape (columns, rows, slices).
    pub native_shape: [usize; 3],
    /// Canonical axis `w` is native axis `perm[w]`…
    pub perm: [usize; 3],
    /// …reversed when `flip[w]`.
    pub flip: [bool; 3],
}

impl Layout {
    /// The closest canonical layout for a native affine: native axes are matched to world
    /// axes greedily by the largest direction-cosine component (nibabel's `io_orientation`).
    pub fn canonical(native: &Affine, native_shape: [usize; 3]) -> Layout {
        let dirs: Vec<[f64; 3]> = (0..3).map(|a| native.axis(a).map(|v| v / norm(native.axis(a)))).collect();
        let mut perm = [usize::MAX; 3];
        let mut flip = [false; 3];
        let mut used_native = [false; 3];
        for _ in 0..3 {
            let mut best = (f64::MIN, 0, 0);
            for (a, dir) in dirs.iter().enumerate() {
                for w in 0..3 {
                    if !used_native[a] && perm[w] == usize::MAX && dir[w].abs() > best.0 {
                        best = (dir[w].abs(), a, w);
                    }
                }
            }
            let (_, a, w) = best;
            used_native[a] = true;
            perm[w] = a;
            flip[w] = dirs[a][w] < 0.0;
        }
        Layout { native_shape, perm, flip }
    }

    /// The identity layout (canonical = native).
    pub fn identity(native_shape: [usize; 3]) -> Layout {
        Layout { native_shape, perm: [0, 1, 2], flip: [false; 3] }
    }

    /// Canonical shape.
    pub fn shape(&self) -> [usize; 3] {
        self.perm.map(|a| self.native_shape[a])
    }

    /// The native index of canonical voxel `c`.
    pub fn native_index(&self, c: [usize; 3]) -> [usize; 3] {
        let mut n = [0; 3];
        for (w, (&a, &flip)) in self.perm.iter().zip(&self.flip).enumerate() {
            n[a] = if flip { self.native_shape[a] - 1 - c[w] } else { c[w] };
        }
        n
    }

    /// The affine of the canonical order.
    #[allow(clippy::needless_range_loop)] // matrix indices read clearer than iterator chains
    pub fn canonical_affine(&self, native: &Affine) -> Affine {
        let mut m = [[0.0; 4]; 4];
        let origin = native.apply(self.native_index([0, 0, 0]).map(|v| v as f64));
        for w in 0..3 {
            let axis = native.axis(self.perm[w]);
            for r in 0..3 {
                m[r][w] = if self.flip[w] { -axis[r] } else { axis[r] };
            }
        }
        for r in 0..3 {
            m[r][3] = origin[r];
        }
        m[3][3] = 1.0;
        Affine(m)
    }

    /// Reorders native data (slice-major, then row, then column) into canonical C order.
    pub fn to_canonical<T: Copy + Default + Send>(&self, native: &[T]) -> Vec<T> {
        let [nc, nr, _] = self.native_shape;
        let shape = self.shape();
        let mut out = vec![T::default(); native.len()];
        for x in 0..shape[0] {
            for y in 0..shape[1] {
                for z in 0..shape[2] {
                    let [c, r, s] = self.native_index([x, y, z]);
                    out[(x * shape[1] + y) * shape[2] + z] = native[(s * nr + r) * nc + c];
                }
            }
        }
        out
    }

    /// The inverse of [`Layout::to_canonical`].
    pub fn to_native<T: Copy + Default + Send>(&self, canonical: &[T]) -> Vec<T> {
        let [nc, nr, _] = self.native_shape;
        let shape = self.shape();
        let mut out = vec![T::default(); canonical.len()];
        for x in 0..shape[0] {
            for y in 0..shape[1] {
                for z in 0..shape[2] {
                    let [c, r, s] = self.native_index([x, y, z]);
                    out[(s * nr + r) * nc + c] = canonical[(x * shape[1] + y) * shape[2] + z];
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn affine(cols: [[f64; 3]; 3], t: [f64; 3]) -> Affine {
        let mut m = [[0.0; 4]; 4];
        for r in 0..3 {
            for a in 0..3 {
                m[r][a] = cols[a][r];
            }
            m[r][3] = t[r];
        }
        m[3][3] = 1.0;
        Affine(m)
    }

    #[test]
    fn inverse_round_trips() {
        let a = affine([[0.5, 0.1, 0.0], [0.0, 0.8, 0.2], [0.1, 0.0, 1.5]], [10.0, -20.0, 3.0]);
        let p = [3.0, 4.5, 7.25];
        let q = a.inverse().apply(a.apply(p));
        assert!(p.iter().zip(q).all(|(x, y)| (x - y).abs() < 1e-9));
    }

    #[test]
    fn axial_lps_is_already_canonical() {
        let a = affine([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], [0.0; 3]);
        let l = Layout::canonical(&a, [4, 3, 2]);
        assert_eq!(l, Layout::identity([4, 3, 2]));
        assert_eq!(l.canonical_affine(&a), a);
    }

    #[test]
    fn sagittal_series_is_permuted_and_flipped_consistently() {
        // Columns run anterior→posterior (+P), rows superior→inferior (−S), slices +L.
        let a = affine([[0.0, 0.5, 0.0], [0.0, 0.0, -0.8], [1.5, 0.0, 0.0]], [-70.0, -100.0, 90.0]);
        let l = Layout::canonical(&a, [4, 3, 5]);
        assert_eq!(l.perm, [2, 0, 1]);
        assert_eq!(l.flip, [false, false, true]);
        assert_eq!(l.shape(), [5, 4, 3]);
        let c = l.canonical_affine(&a);
        // Every canonical voxel lands where its native voxel does.
        for x in 0..5 {
            for y in 0..4 {
                for z in 0..3 {
                    let n = l.native_index([x, y, z]).map(|v| v as f64);
                    let (p, q) = (a.apply(n), c.apply([x as f64, y as f64, z as f64]));
                    assert!(p.iter().zip(q).all(|(u, v)| (u - v).abs() < 1e-9));
                }
            }
        }
        let native: Vec<u32> = (0..60).collect();
        assert_eq!(l.to_native(&l.to_canonical(&native)), native);
    }
}
