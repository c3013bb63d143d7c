//! BraTS label conventions and their conversion to the nested TC / WT / ET channels.

use crate::error::{CoreError, Result};
use serde::{Deserialize, Serialize};

/// Which integer codes a BraTS segmentation file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LabelConvention {
    /// BraTS 2017–2021 (the MONAI bundle's): 1 necrotic/non-enhancing core, 2 edema, 4 enhancing.
    #[default]
    Brats2018,
    /// BraTS 2023 and later: 1 necrotic core, 2 edema, 3 enhancing.
    Brats2023,
    /// BraTS 2015: 1 necrosis, 2 edema, 3 non-enhancing core, 4 enhancing.
    Brats2015,
}

const TC: u8 = 1;
const WT: u8 = 2;
const ET: u8 = 4;
const INVALID: u8 = 0x80;

impl LabelConvention {
    /// Parses the names the CLI and configuration accept (`brats2018`, `brats2017`, `brats2021`,
    /// `brats2023`, `brats2015`), case-insensitively.
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "brats2018" | "brats2017" | "brats2019" | "brats2020" | "brats2021" => Ok(Self::Brats2018),
            "brats2023" | "brats2024" => Ok(Self::Brats2023),
            "brats2015" => Ok(Self::Brats2015),
            other => Err(CoreError::invalid(format!(
                "label convention '{other}' is unknown: use brats2018 (labels 1,2,4), brats2023 (1,2,3) or brats2015 (1,2,3,4)"
            ))),
        }
    }

    /// The canonical lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Brats2018 => "brats2018",
            Self::Brats2023 => "brats2023",
            Self::Brats2015 => "brats2015",
        }
    }

    /// Region bits (TC=1, WT=2, ET=4) for every possible label value; `INVALID` marks codes the
    /// convention does not define.
    fn table(self) -> [u8; 256] {
        let mut t = [INVALID; 256];
        t[0] = 0;
        match self {
            Self::Brats2018 => {
                t[1] = TC | WT;
                t[2] = WT;
                t[4] = TC | WT | ET;
            }
            Self::Brats2023 => {
                t[1] = TC | WT;
                t[2] = WT;
                t[3] = TC | WT | ET;
            }
            Self::Brats2015 => {
                t[1] = TC | WT;
                t[2] = WT;
                t[3] = TC | WT;
                t[4] = TC | WT | ET;
            }
        }
        t
    }

    /// The label codes this convention allows, background included.
    pub fn allowed_values(self) -> Vec<u8> {
        let t = self.table();
        (0..=255u8).filter(|&v| t[v as usize] != INVALID).collect()
    }

    /// Converts a label volume (any voxel order) into three channels TC, WT, ET, each `n` voxels
    /// long, concatenated (`[3, n]`). Values outside the convention are an error that names them.
    pub fn to_channels(self, labels: &[f32], file: &str) -> Result<Vec<u8>> {
        let table = self.table();
        let n = labels.len();
        let mut out = vec![0u8; 3 * n];
        let (tc, rest) = out.split_at_mut(n);
        let (wt, et) = rest.split_at_mut(n);
        let mut bad: Vec<f32> = Vec::new();
        for (i, &v) in labels.iter().enumerate() {
            let code = if (0.0..=255.0).contains(&v) && v.fract() == 0.0 { table[v as usize] } else { INVALID };
            if code == INVALID {
                if bad.len() < 8 && !bad.contains(&v) {
                    bad.push(v);
                }
                continue;
            }
            tc[i] = code & TC;
            wt[i] = (code & WT) >> 1;
            et[i] = (code & ET) >> 2;
        }
        if !bad.is_empty() {
            return Err(CoreError::invalid(format!(
                "{file}: label values {bad:?} are not part of the {} convention (allowed {:?}); pass the convention the file uses (--label-convention / label_convention)",
                self.name(),
                self.allowed_values()
            )));
        }
        Ok(out)
    }
}

impl std::fmt::Display for LabelConvention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Dice of one region between two label maps given as codes (e.g. TC = `[1, 4]` in the BraTS
/// 2018 codes), 1 when the region is empty in both (MONAI's `DiceMetric` convention for an
/// empty prediction of an empty truth).
pub fn region_dice(pred: &[u8], truth: &[u8], codes: &[u8]) -> f64 {
    let (mut both, mut p, mut t) = (0u64, 0u64, 0u64);
    for (&a, &b) in pred.iter().zip(truth) {
        let (x, y) = (codes.contains(&a), codes.contains(&b));
        both += u64::from(x && y);
        p += u64::from(x);
        t += u64::from(y);
    }
    if p + t == 0 { 1.0 } else { 2.0 * both as f64 / (p + t) as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_dice_counts_the_region_codes_and_empty_is_one() {
        let pred = [0, 1, 4, 2, 0];
        let truth = [0, 4, 4, 0, 2];
        assert_eq!(region_dice(&pred, &truth, &[1, 4]), 1.0);
        assert!((region_dice(&pred, &truth, &[1, 2, 4]) - 2.0 * 2.0 / 6.0).abs() < 1e-12);
        assert_eq!(region_dice(&pred, &truth, &[3]), 1.0);
        assert_eq!(region_dice(&[4], &[0], &[4]), 0.0);
    }

    #[test]
    fn brats2018_nested_regions() {
        let ch = LabelConvention::Brats2018.to_channels(&[0., 1., 2., 4.], "seg").unwrap();
        assert_eq!(&ch[0..4], &[0, 1, 0, 1]); // TC
        assert_eq!(&ch[4..8], &[0, 1, 1, 1]); // WT
        assert_eq!(&ch[8..12], &[0, 0, 0, 1]); // ET
    }

    #[test]
    fn brats2023_and_2015() {
        let ch = LabelConvention::Brats2023.to_channels(&[3., 2.], "seg").unwrap();
        assert_eq!(ch, vec![1, 0, 1, 1, 1, 0]);
        let ch = LabelConvention::Brats2015.to_channels(&[3., 4.], "seg").unwrap();
        assert_eq!(ch, vec![1, 1, 1, 1, 0, 1]);
    }

    #[test]
    fn out_of_convention_values_are_named() {
        let err = LabelConvention::Brats2018.to_channels(&[0., 3., 7., 3.], "seg.nii.gz").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("seg.nii.gz") && msg.contains("[3.0, 7.0]"), "{msg}");
        assert!(LabelConvention::Brats2018.to_channels(&[1.5], "s").is_err());
        assert!(LabelConvention::parse("brats1999").is_err());
        assert_eq!(LabelConvention::parse("BraTS2021").unwrap(), LabelConvention::Brats2018);
    }
}
