//! Preprocessed cases as safetensors files: tensor `image` (F32 `[4, X, Y, Z]`), optional
//! `label` (U8 `[3, X, Y, Z]`), and the [`CaseMetadata`] in the header's `__metadata__`.
//!
//! The metadata map holds the whole record as JSON under `brats` and, for tools that read only
//! flat keys (Python's `safe_open(...).metadata()`), `affine`, `original_shape`, `crop_box`,
//! `label_convention` and `pipeline_version` as JSON strings.

use crate::error::{CoreError, Result};
use crate::metadata::CaseMetadata;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;

/// Name of the image tensor.
pub const IMAGE: &str = "image";
/// Name of the label-channel tensor.
pub const LABEL: &str = "label";
/// Metadata key holding the whole [`CaseMetadata`] as JSON.
pub const METADATA_KEY: &str = "brats";

/// A preprocessed case in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseTensors {
    /// Normalised image, `[4, X, Y, Z]`, C order.
    pub image: Vec<f32>,
    /// Label channels TC, WT, ET as 0/1, `[3, X, Y, Z]`, when the case has a label.
    pub label: Option<Vec<u8>>,
    /// Provenance and geometry; `metadata.shape` is X, Y, Z.
    pub metadata: CaseMetadata,
}

/// Little-endian bytes of an f32 slice: the slice itself on little-endian targets (no copy).
#[cfg(target_endian = "little")]
fn f32_bytes(v: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    std::borrow::Cow::Borrowed(bytemuck::cast_slice(v))
}

/// Little-endian bytes of an f32 slice, converted in parallel blocks.
#[cfg(not(target_endian = "little"))]
fn f32_bytes(v: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    use rayon::prelude::*;
    const BLOCK: usize = 1 << 18;
    let mut out = vec![0u8; v.len() * 4];
    out.par_chunks_mut(BLOCK * 4).zip(v.par_chunks(BLOCK)).for_each(|(o, i)| {
        for (d, x) in o.chunks_exact_mut(4).zip(i) {
            d.copy_from_slice(&x.to_le_bytes());
        }
    });
    std::borrow::Cow::Owned(out)
}

impl CaseTensors {
    /// Serialises to safetensors bytes. The image is copied once, straight into the output.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let [x, y, z] = self.metadata.shape;
        let image_bytes = f32_bytes(&self.image);
        let mut views = vec![(
            IMAGE.to_string(),
            TensorView::new(Dtype::F32, vec![4, x, y, z], &image_bytes)
                .map_err(|e| CoreError::Internal(format!("image tensor: {e}")))?,
        )];
        if let Some(label) = &self.label {
            views.push((
                LABEL.to_string(),
                TensorView::new(Dtype::U8, vec![3, x, y, z], label)
                    .map_err(|e| CoreError::Internal(format!("label tensor: {e}")))?,
            ));
        }
        let m = &self.metadata;
        let mut info = HashMap::new();
        info.insert(METADATA_KEY.to_string(), json(m));
        info.insert("affine".into(), json(&m.affine));
        info.insert("original_shape".into(), json(&m.original_shape));
        info.insert("crop_box".into(), json(&m.crop_box));
        info.insert("label_convention".into(), m.label_convention.name().to_string());
        info.insert("pipeline_version".into(), m.pipeline_version.clone());
        safetensors::serialize(views, Some(info)).map_err(|e| CoreError::Internal(format!("safetensors: {e}")))
    }

    /// Parses safetensors bytes written by [`CaseTensors::to_bytes`]; `file` names it in errors.
    pub fn from_bytes(bytes: &[u8], file: &str) -> Result<Self> {
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| CoreError::invalid(format!("{file}: not a readable safetensors file ({e})")))?;
        let (_, header) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| CoreError::invalid(format!("{file}: {e}")))?;
        let meta_json = header.metadata().as_ref().and_then(|m| m.get(METADATA_KEY)).ok_or_else(|| {
            CoreError::invalid(format!("{file}: has no '{METADATA_KEY}' metadata; was it written by brats-preprocess?"))
        })?;
        let metadata: CaseMetadata = serde_json::from_str(meta_json)
            .map_err(|e| CoreError::invalid(format!("{file}: metadata is not valid ({e})")))?;
        let [x, y, z] = metadata.shape;
        let image = st.tensor(IMAGE).map_err(|e| CoreError::invalid(format!("{file}: tensor '{IMAGE}': {e}")))?;
        if image.dtype() != Dtype::F32 || image.shape() != [4, x, y, z] {
            return Err(CoreError::invalid(format!(
                "{file}: tensor '{IMAGE}' is {:?} {:?}, expected F32 [4, {x}, {y}, {z}]",
                image.dtype(),
                image.shape()
            )));
        }
        let image = image.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        let label = match st.tensor(LABEL) {
            Ok(t) => {
                if t.dtype() != Dtype::U8 || t.shape() != [3, x, y, z] {
                    return Err(CoreError::invalid(format!(
                        "{file}: tensor '{LABEL}' is {:?} {:?}, expected U8 [3, {x}, {y}, {z}]",
                        t.dtype(),
                        t.shape()
                    )));
                }
                Some(t.data().to_vec())
            }
            Err(_) => None,
        };
        Ok(CaseTensors { image, label, metadata })
    }
}

/// A value as a JSON string, for the flat metadata keys.
fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("metadata values serialise")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::CropBox;

    #[test]
    fn roundtrip_with_metadata() {
        let metadata = CaseMetadata {
            case_id: "c1".into(),
            original_shape: [3, 2, 2],
            shape: [2, 2, 1],
            crop_box: CropBox { start: [1, 0, -1], size: [2, 2, 1] },
            has_label: true,
            ..Default::default()
        };
        let t = CaseTensors { image: (0..16).map(|v| v as f32 / 3.0).collect(), label: Some(vec![1; 12]), metadata };
        let bytes = t.to_bytes().unwrap();
        assert_eq!(CaseTensors::from_bytes(&bytes, "x").unwrap(), t);
        let (_, h) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(h.metadata().as_ref().unwrap()["crop_box"], r#"{"start":[1,0,-1],"size":[2,2,1]}"#);
        assert!(CaseTensors::from_bytes(&bytes[..bytes.len() - 3], "short.safetensors").is_err());
        // The image data section is the little-endian bytes of each value, then the label.
        let want: Vec<u8> = t.image.iter().flat_map(|v| v.to_le_bytes()).chain([1u8; 12]).collect();
        assert_eq!(&bytes[bytes.len() - want.len()..], want.as_slice());
    }
}
