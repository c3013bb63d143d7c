//! The dataset manifest: what preprocessing a datalist produced, written by
//! `brats_preprocess::dataset` at `datasets/<key>/manifest.json` and read by the trainer's
//! workers. Cases are listed per datalist section in datalist order, so a dataset index means
//! the same case in every run (samplers and resumes rely on it).

use std::collections::BTreeMap;

use brats_core::StoreUri;
use brats_core::error::{CoreError, Result};
use serde::{Deserialize, Serialize};

/// File name of a manifest inside its dataset folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// One preprocessed case.
// Fields in alphabetical order: the order the file has always had.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ManifestCase {
    /// Case id.
    pub case_id: String,
    /// URI of its metadata sidecar (empty when not recorded).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub metadata: String,
    /// URI of its tensors (normalised image + label channels).
    pub tensors: String,
}

/// A preprocessed dataset, by datalist section (fields in the file's alphabetical order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Manifest {
    /// Section name → cases, in datalist order.
    pub cases: BTreeMap<String, Vec<ManifestCase>>,
    /// The datalist it was made from.
    #[serde(default)]
    pub datalist: String,
    /// Version of the preprocessing pipeline that produced the tensors.
    #[serde(default)]
    pub pipeline_version: String,
}

impl Manifest {
    /// Parses manifest bytes (`source` names the file in the error).
    pub fn from_slice(bytes: &[u8], source: &str) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| CoreError::invalid(format!("{source}: not a dataset manifest ({e})")))
    }

    /// The manifest as stored (pretty JSON).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a manifest serialises")
    }

    /// The `(case id, tensors URI)` entries of one section (an absent section is empty).
    pub fn section(&self, section: &str) -> Result<Vec<(String, StoreUri)>> {
        let Some(cases) = self.cases.get(section) else { return Ok(Vec::new()) };
        cases.iter().map(|c| Ok((c.case_id.clone(), StoreUri::parse(&c.tensors)?))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reads_the_format_preprocessing_has_always_written() {
        // As `PreprocessDataset` wrote it with `json!` before the type existed.
        let old = br#"{"cases": {"training": [{"case_id": "a", "metadata": "file:///d/a.json", "tensors": "file:///d/a.safetensors"},
                                           {"case_id": "b", "metadata": "file:///d/b.json", "tensors": "file:///d/b.safetensors"}]},
                       "datalist": "file:///d/datalist.json", "pipeline_version": "brats-preprocess/1"}"#;
        let m = Manifest::from_slice(old, "manifest.json").unwrap();
        assert_eq!(m.pipeline_version, "brats-preprocess/1");
        assert_eq!(m.cases["training"][1].case_id, "b");
        assert_eq!(m.section("training").unwrap()[0].1.to_string(), "file:///d/a.safetensors");
        assert!(m.section("validation").unwrap().is_empty());
        assert_eq!(Manifest::from_slice(&m.to_bytes(), "again").unwrap(), m);
        let before: serde_json::Value = serde_json::from_slice(old).unwrap();
        assert_eq!(serde_json::to_value(&m).unwrap(), before);
        // Byte for byte what `json!` + `to_vec_pretty` wrote.
        assert_eq!(m.to_bytes(), serde_json::to_vec_pretty(&before).unwrap());
    }

    #[test]
    fn a_manifest_without_cases_is_refused_with_its_name() {
        let e = Manifest::from_slice(b"{}", "datasets/k/manifest.json").unwrap_err();
        assert!(e.to_string().contains("datasets/k/manifest.json"), "{e}");
    }
}
