//! From logits to the BraTS label map and region volumes, as the bundle does it.

/// MONAI's `Activations(sigmoid=True)` then `AsDiscrete(threshold=0.5)` for one logit, in f32.
/// Logits in about [−6e-8, 0] count as positive, exactly as torch computes it.
pub fn positive(logit: f32) -> bool {
    1.0f32 / (1.0 + (-logit).exp()) >= 0.5
}

/// The label map from logits `[3, n]` (TC, WT, ET): ET → 4, else TC → 1, else WT → 2, else 0.
pub fn label_map(logits: &[f32]) -> Vec<u8> {
    let n = logits.len() / 3;
    (0..n)
        .map(|i| {
            if positive(logits[2 * n + i]) {
                4
            } else if positive(logits[i]) {
                1
            } else if positive(logits[n + i]) {
                2
            } else {
                0
            }
        })
        .collect()
}

/// Volumes of TC, WT and ET in millilitres: positive voxels per channel × voxel volume (mm³)/1000.
pub fn region_volumes_ml(logits: &[f32], voxel_mm3: f64) -> [f64; 3] {
    let n = logits.len() / 3;
    std::array::from_fn(|c| {
        logits[c * n..(c + 1) * n].iter().filter(|&&l| positive(l)).count() as f64 * voxel_mm3 / 1000.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_priority_and_threshold() {
        // voxels: ET only, TC only, WT only, none, TC+WT, tiny negative logit counts as positive
        let logits = [
            -1.0, 2.0, -1.0, -1.0, 3.0, -1.0, // TC
            -1.0, -1.0, 2.0, -1.0, 3.0, -1.0, // WT
            5.0, -1.0, -1.0, -1.0, -1.0, -3e-8, // ET
        ];
        assert_eq!(label_map(&logits), vec![4, 1, 2, 0, 1, 4]);
        assert_eq!(region_volumes_ml(&logits, 1000.0), [2.0, 2.0, 2.0]);
        assert!(!positive(-1e-4));
    }
}
