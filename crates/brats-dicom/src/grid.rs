//! The four volumes on one grid.
//!
//! When the four series already share a grid (same shape, affines equal within
//! [`SAME_GRID_MM`]) their arrays are used untouched — a BraTS-like study gives bit-identical
//! arrays to its NIfTI files. Otherwise every volume is resampled, trilinear in world space,
//! onto a 1 mm grid aligned with the patient axes (+L, +P, +S) covering the T1c's field of
//! view (the bounding box of its voxel centres); points outside a volume read 0, as outside
//! the brain in BraTS data. A volume whose grid already equals the target is copied, not
//! interpolated. No registration: the series are assumed co-registered by the scanner (one
//! frame of reference), which is checked before this step.

use crate::geometry::{Affine, Volume};
use rayon::prelude::*;
use serde::Serialize;

/// Largest difference (mm, per affine element) for two grids to count as one.
pub const SAME_GRID_MM: f64 = 1e-3;

/// How the volumes were put on one grid.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum GridMethod {
    /// All four shared the T1c's grid; arrays untouched.
    Shared,
    /// Resampled onto a common grid.
    Resampled {
        /// Voxel size of the common grid, mm.
        spacing_mm: f64,
        /// Interpolation used.
        interpolation: &'static str,
    },
}

/// Whether `a` and `b` are on the same grid.
pub fn same_grid(a: &Volume, b: &Volume) -> bool {
    a.shape == b.shape && a.affine.close_to(&b.affine, SAME_GRID_MM)
}

/// The 1 mm patient-aligned grid covering the voxel centres of a volume with this shape and
/// affine: (shape, affine).
pub fn covering_grid(shape: [usize; 3], affine: &Affine, spacing_mm: f64) -> ([usize; 3], Affine) {
    let mut lo = [f64::MAX; 3];
    let mut hi = [f64::MIN; 3];
    for corner in 0..8 {
        let c = [0, 1, 2].map(|a| if corner >> a & 1 == 1 { (shape[a] - 1) as f64 } else { 0.0 });
        let p = affine.apply(c);
        for a in 0..3 {
            lo[a] = lo[a].min(p[a]);
            hi[a] = hi[a].max(p[a]);
        }
    }
    let n = [0, 1, 2].map(|a| (((hi[a] - lo[a]) / spacing_mm) + 1e-6).floor() as usize + 1);
    let mut m = [[0.0; 4]; 4];
    for a in 0..3 {
        m[a][a] = spacing_mm;
        m[a][3] = lo[a];
    }
    m[3][3] = 1.0;
    (n, Affine(m))
}

/// `source` sampled (trilinear, 0 outside) at the voxel centres of the grid (`shape`, `affine`).
pub fn resample(source: &Volume, shape: [usize; 3], affine: &Affine) -> Volume {
    if source.shape == shape && source.affine.close_to(affine, SAME_GRID_MM) {
        return Volume { shape, affine: *affine, data: source.data.clone() };
    }
    // target voxel → source voxel, as one affine.
    let inv = source.affine.inverse();
    let to_source = compose(&inv, affine);
    let [sx, sy, sz] = source.shape;
    let at = |x: usize, y: usize, z: usize| source.data[(x * sy + y) * sz + z];
    let eps = 1e-6;
    let mut data = vec![0f32; shape.iter().product()];
    data.par_chunks_mut(shape[1] * shape[2]).enumerate().for_each(|(x, plane)| {
        for y in 0..shape[1] {
            for z in 0..shape[2] {
                let p = to_source.apply([x as f64, y as f64, z as f64]);
                let inside = (0..3).all(|a| p[a] >= -eps && p[a] <= (source.shape[a] - 1) as f64 + eps);
                if !inside {
                    continue;
                }
                let p = [0, 1, 2].map(|a| p[a].clamp(0.0, (source.shape[a] - 1) as f64));
                let i0 = p.map(|v| v.floor() as usize);
                let i1 = [0, 1, 2].map(|a| (i0[a] + 1).min([sx, sy, sz][a] - 1));
                let f = [0, 1, 2].map(|a| p[a] - i0[a] as f64);
                let mut v = 0.0f64;
                for corner in 0..8 {
                    let pick = |a: usize| corner >> a & 1 == 1;
                    let w: f64 = (0..3).map(|a| if pick(a) { f[a] } else { 1.0 - f[a] }).product();
                    if w != 0.0 {
                        let idx = [0, 1, 2].map(|a| if pick(a) { i1[a] } else { i0[a] });
                        v += w * at(idx[0], idx[1], idx[2]) as f64;
                    }
                }
                plane[y * shape[2] + z] = v as f32;
            }
        }
    });
    Volume { shape, affine: *affine, data }
}

/// `a ∘ b` (apply `b`, then `a`).
#[allow(clippy::needless_range_loop)] // matrix indices read clearer than iterator chains
pub fn compose(a: &Affine, b: &Affine) -> Affine {
    let mut m = [[0.0; 4]; 4];
    for r in 0..4 {
        for c in 0..4 {
            m[r][c] = (0..4).map(|k| a.0[r][k] * b.0[k][c]).sum();
        }
    }
    Affine(m)
}

/// Puts `volumes` (T1c first) on one grid; returns them with the method used.
pub fn common_grid(volumes: Vec<Volume>) -> (Vec<Volume>, GridMethod) {
    if volumes.iter().all(|v| same_grid(v, &volumes[0])) {
        return (volumes, GridMethod::Shared);
    }
    let (shape, affine) = covering_grid(volumes[0].shape, &volumes[0].affine, 1.0);
    let out = volumes.iter().map(|v| resample(v, shape, &affine)).collect();
    (out, GridMethod::Resampled { spacing_mm: 1.0, interpolation: "trilinear" })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diag(z: [f64; 3], t: [f64; 3]) -> Affine {
        let mut m = [[0.0; 4]; 4];
        for a in 0..3 {
            m[a][a] = z[a];
            m[a][3] = t[a];
        }
        m[3][3] = 1.0;
        Affine(m)
    }

    #[test]
    fn resampling_a_linear_ramp_is_exact_inside_and_zero_outside() {
        // v = 2x + 3y + 5z (world mm), sampled on a 3 mm-slice grid.
        let affine = diag([1.0, 1.0, 3.0], [10.0, 20.0, 30.0]);
        let shape = [4, 5, 3];
        let mut data = Vec::new();
        for x in 0..4 {
            for y in 0..5 {
                for z in 0..3 {
                    let p = affine.apply([x as f64, y as f64, z as f64]);
                    data.push((2.0 * p[0] + 3.0 * p[1] + 5.0 * p[2]) as f32);
                }
            }
        }
        let src = Volume { shape, affine, data };
        let target = diag([1.0; 3], [10.0, 20.0, 30.0]);
        let out = resample(&src, [4, 5, 8], &target);
        for x in 0..4 {
            for y in 0..5 {
                for z in 0..8 {
                    let p = target.apply([x as f64, y as f64, z as f64]);
                    let want = if z <= 6 { 2.0 * p[0] + 3.0 * p[1] + 5.0 * p[2] } else { 0.0 };
                    let got = out.data[(x * 5 + y) * 8 + z] as f64;
                    assert!((got - want).abs() < 1e-3, "{x} {y} {z}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn covering_grid_of_an_lps_1mm_volume_is_its_own_grid() {
        let affine = diag([1.0; 3], [-5.0, 7.0, 2.0]);
        assert_eq!(covering_grid([3, 4, 5], &affine, 1.0), ([3, 4, 5], affine));
        let flipped = diag([-1.0, 1.0, 1.0], [-3.0, 7.0, 2.0]);
        let (shape, a) = covering_grid([3, 4, 5], &flipped, 1.0);
        assert_eq!(shape, [3, 4, 5]);
        assert_eq!(a.apply([0.0; 3]), [-5.0, 7.0, 2.0]);
    }
}
