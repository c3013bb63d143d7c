//! A deterministic generator of BraTS-like cases for tests, benchmarks and the demo.
//!
//! A case is an ellipsoidal "brain" (exactly zero outside, like skull-stripped BraTS data) with
//! a smooth tissue texture, and a tumour of three nested regions — edema (2) around an
//! enhancing rim (4) around a necrotic core (1), BraTS 2018 codes — whose position, radii and
//! lobulation come from the seed. Each modality has its own contrast for each tissue, plus
//! Gaussian noise. Each region has a minimum size in voxels (a necrotic core of radius 2, rims
//! of 1.75), so that small volumes still hold learnable tumour core and enhancing regions.
//! The affine is RAS at 1 mm with the origin at the volume centre. The same
//! seed and shape give bit-identical volumes on every machine and thread count (the MONAI
//! parity fixtures and the trainer's tests depend on it: change nothing that moves a draw).
//!
//! A crate of its own, over `brats-volume` alone, so the client's demo can generate data
//! without the preprocessing library or the S3 client; `brats_preprocess::synthetic`
//! re-exports it.

use brats_volume::error::Result;
use brats_volume::nifti_io::write_nifti;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyntheticSpec {
    /// Volume shape X, Y, Z.
    pub shape: [usize; 3],
    /// Seed of every random choice.
    pub seed: u64,
    /// Noise standard deviation relative to the tissue intensity scale (default 0.03).
    pub noise: f32,
}

impl SyntheticSpec {
    /// A spec with the default noise.
    pub fn new(shape: [usize; 3], seed: u64) -> Self {
        SyntheticSpec { shape, seed, noise: 0.03 }
    }
}

/// A generated case: four modalities and the label, C order `[X, Y, Z]`.
#[derive(Debug, Clone)]
pub struct SyntheticCase {
    /// T1c, T1, T2, FLAIR intensities.
    pub modalities: [Vec<f32>; 4],
    /// BraTS 2018 label codes 0, 1, 2, 4.
    pub label: Vec<u8>,
    /// Shape X, Y, Z.
    pub shape: [usize; 3],
    /// Voxel-to-world affine (RAS, 1 mm, centred).
    pub affine: [[f64; 4]; 4],
}

// Tissue contrast per modality (T1c, T1, T2, FLAIR), on a 0..1 scale times INTENSITY.
const BRAIN: [f32; 4] = [0.45, 0.60, 0.40, 0.45];
const EDEMA: [f32; 4] = [0.50, 0.45, 0.85, 0.95];
const ENHANCING: [f32; 4] = [1.00, 0.50, 0.70, 0.75];
const NECROSIS: [f32; 4] = [0.20, 0.30, 0.95, 0.55];
const INTENSITY: f32 = 1000.0;
/// Smallest necrotic-core radius, in voxels.
const MIN_NECROSIS_RADIUS: f64 = 2.0;
/// Thinnest enhancing rim (core radius − necrosis radius) and edema shell, in voxels.
const MIN_RIM: f64 = 1.75;

/// Generates a case.
pub fn generate(spec: &SyntheticSpec) -> SyntheticCase {
    let [nx, ny, nz] = spec.shape;
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let dims = [nx as f64, ny as f64, nz as f64];
    let brain_r = [dims[0] * 0.42, dims[1] * 0.45, dims[2] * 0.42];
    let center = [dims[0] / 2.0, dims[1] / 2.0, dims[2] / 2.0];
    let min_r = brain_r.iter().cloned().fold(f64::INFINITY, f64::min);
    // The tumour sits inside the brain, away from its edge.
    let edema_r = min_r * rng.random_range(0.30..0.45);
    let core_r = edema_r * rng.random_range(0.50..0.65);
    let necrosis_r = core_r * rng.random_range(0.40..0.65);
    // Floors in voxels, applied after the draws (so no later draw moves): in a 32³ volume the
    // drawn necrotic core can be ~1 voxel across and the enhancing rim thinner than a voxel,
    // regions of a few dozen voxels that a small network at the demo's learning rate may never
    // find (TC or ET collapsing to Dice 0 for some seeds). From ~96³ up the floors never bind.
    let necrosis_r = necrosis_r.max(MIN_NECROSIS_RADIUS);
    let core_r = core_r.max(necrosis_r + MIN_RIM);
    let edema_r = edema_r.max(core_r + MIN_RIM);
    let mut tumour_c = [0.0; 3];
    for a in 0..3 {
        let slack = (brain_r[a] - edema_r).max(0.0) * 0.5;
        tumour_c[a] = center[a] + rng.random_range(-slack..=slack);
    }
    // 6.28 is a range bound (≈ 2π, not meant exactly): TAU would change every synthetic case.
    #[allow(clippy::approx_constant)]
    let lobes: [f64; 3] = [rng.random_range(0.0..6.28), rng.random_range(0.0..6.28), rng.random_range(0.08..0.18)];
    #[allow(clippy::approx_constant)]
    let texture_phase: f64 = rng.random_range(0.0..6.28);
    let noise_seed: u64 = rng.random();

    let plane = ny * nz;
    let mut label = vec![0u8; nx * plane];
    let mut mods: [Vec<f32>; 4] = std::array::from_fn(|_| vec![0f32; nx * plane]);
    let sigma = (spec.noise * INTENSITY).max(0.0);
    let normal = Normal::new(0.0f32, sigma.max(f32::MIN_POSITIVE)).expect("finite sigma");
    // One slab of X per task, each with its own noise stream keyed by (seed, x).
    let slabs: Vec<(Vec<u8>, [Vec<f32>; 4])> = (0..nx)
        .into_par_iter()
        .map(|x| {
            let mut noise_rng = ChaCha8Rng::seed_from_u64(noise_seed ^ (x as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut lab = vec![0u8; plane];
            let mut m: [Vec<f32>; 4] = std::array::from_fn(|_| vec![0f32; plane]);
            for y in 0..ny {
                for z in 0..nz {
                    let p = [x as f64 + 0.5, y as f64 + 0.5, z as f64 + 0.5];
                    let b: f64 = (0..3).map(|a| ((p[a] - center[a]) / brain_r[a]).powi(2)).sum();
                    if b > 1.0 {
                        continue;
                    }
                    let d = [p[0] - tumour_c[0], p[1] - tumour_c[1], p[2] - tumour_c[2]];
                    let r = (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt();
                    let theta = d[1].atan2(d[0]);
                    let phi = if r > 0.0 { (d[2] / r).acos() } else { 0.0 };
                    let wobble = 1.0 + lobes[2] * ((3.0 * theta + lobes[0]).sin() * (2.0 * phi + lobes[1]).cos());
                    let rr = r / wobble;
                    let (code, tissue) = if rr < necrosis_r {
                        (1u8, NECROSIS)
                    } else if rr < core_r {
                        (4, ENHANCING)
                    } else if rr < edema_r {
                        (2, EDEMA)
                    } else {
                        (0, BRAIN)
                    };
                    let texture = 1.0
                        + 0.12
                            * ((p[0] * 0.21 + texture_phase).sin() * (p[1] * 0.17).cos() * (p[2] * 0.23 + 1.0).sin())
                                as f32;
                    let edge = (1.0 - b).sqrt().min(0.25) as f32 * 4.0; // darker rim near the brain edge
                    let i = y * nz + z;
                    lab[i] = code;
                    for (c, mc) in m.iter_mut().enumerate() {
                        let v = INTENSITY * tissue[c] * texture * (0.6 + 0.4 * edge) + normal.sample(&mut noise_rng);
                        // Stays non-zero inside the brain, as real skull-stripped data does.
                        mc[i] = v.max(1.0);
                    }
                }
            }
            (lab, m)
        })
        .collect();
    for (x, (lab, m)) in slabs.into_iter().enumerate() {
        label[x * plane..(x + 1) * plane].copy_from_slice(&lab);
        for c in 0..4 {
            mods[c][x * plane..(x + 1) * plane].copy_from_slice(&m[c]);
        }
    }
    let affine = [
        [1.0, 0.0, 0.0, -(nx as f64) / 2.0],
        [0.0, 1.0, 0.0, -(ny as f64) / 2.0],
        [0.0, 0.0, 1.0, -(nz as f64) / 2.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    SyntheticCase { modalities: mods, label, shape: spec.shape, affine }
}

/// Paths of a case written by [`write_case`].
#[derive(Debug, Clone)]
pub struct CaseFiles {
    /// T1c, T1, T2, FLAIR.
    pub images: [PathBuf; 4],
    /// The label file.
    pub label: PathBuf,
}

/// Writes a case as BraTS-style `.nii.gz` files `<dir>/<case_id>-{t1c,t1n,t2w,t2f,seg}.nii.gz`
/// (float32 images, uint8 label, gzip level 6).
pub fn write_case(case: &SyntheticCase, dir: &Path, case_id: &str) -> Result<CaseFiles> {
    std::fs::create_dir_all(dir).map_err(|e| brats_volume::CoreError::Internal(format!("{}: {e}", dir.display())))?;
    let names = ["t1c", "t1n", "t2w", "t2f"];
    let images: [PathBuf; 4] = std::array::from_fn(|i| dir.join(format!("{case_id}-{}.nii.gz", names[i])));
    let label = dir.join(format!("{case_id}-seg.nii.gz"));
    let write = |path: &Path, bytes: Vec<u8>| {
        std::fs::write(path, bytes).map_err(|e| brats_volume::CoreError::Internal(format!("{}: {e}", path.display())))
    };
    let encoded: Vec<Result<Vec<u8>>> =
        case.modalities.par_iter().map(|m| write_nifti(m, case.shape, &case.affine, None, Some(6))).collect();
    for (path, bytes) in images.iter().zip(encoded) {
        write(path, bytes?)?;
    }
    write(&label, write_nifti(&case.label, case.shape, &case.affine, None, Some(6))?)?;
    Ok(CaseFiles { images, label })
}

/// Writes `training + validation` cases (seeds `seed`, `seed + 1`, …) into `dir` and a MONAI
/// decathlon datalist `dir/datalist.json` with relative paths (the first `training` cases in
/// `"training"`, the rest in `"validation"`); returns the datalist's path. The datasets of the
/// trainer's tests, demo and benchmarks.
pub fn write_dataset(dir: &Path, shape: [usize; 3], seed: u64, training: usize, validation: usize) -> Result<PathBuf> {
    let mut sections: [Vec<serde_json::Value>; 2] = [Vec::new(), Vec::new()];
    for i in 0..training + validation {
        let id = format!("synth-{:05}", seed + i as u64);
        let files = write_case(&generate(&SyntheticSpec::new(shape, seed + i as u64)), dir, &id)?;
        let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        sections[usize::from(i >= training)].push(serde_json::json!({
            "image": files.images.iter().map(|p| name(p)).collect::<Vec<_>>(),
            "label": name(&files.label),
        }));
    }
    let [train, val] = sections;
    let path = dir.join("datalist.json");
    let body = serde_json::to_vec_pretty(&serde_json::json!({"training": train, "validation": val})).expect("json");
    std::fs::write(&path, body).map_err(|e| brats_volume::CoreError::Internal(format!("{}: {e}", path.display())))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_nested() {
        let spec = SyntheticSpec::new([48, 40, 32], 7);
        let a = generate(&spec);
        let b = generate(&spec);
        assert_eq!(a.modalities, b.modalities);
        assert_eq!(a.label, b.label);
        let c = generate(&SyntheticSpec::new([48, 40, 32], 8));
        assert_ne!(a.label, c.label);
        for code in [1u8, 2, 4] {
            assert!(a.label.contains(&code), "label {code} missing");
        }
        // Background is exactly zero, brain is non-zero, in every modality.
        let n = a.label.len();
        let brain = (0..n).filter(|&i| a.modalities[0][i] != 0.0).count();
        assert!(brain > n / 4 && brain < n);
        for m in &a.modalities {
            assert_eq!((0..n).filter(|&i| m[i] != 0.0).count(), brain);
        }
        // Tumour lies inside the brain.
        assert!((0..n).all(|i| a.label[i] == 0 || a.modalities[0][i] != 0.0));
    }
}
