//! Preprocessed cases as safetensors files: tensor `image` (F32 `[4, X, Y, Z]`), optional
//! `label` (U8 `[3, X, Y, Z]`), and the [`CaseMetadata`] in the header's `__metadata__`.
//!
//! The metadata map holds the whole record as JSON under `brats` and, for tools that read only
//! flat keys (Python's `safe_open(...).metadata()`), `affine`, `original_shape`, `crop_box`,
//! `label_convention` and `pipeline_version` as JSON strings.

use crate::error::{CoreError, Result};
use crate::metadata::CaseMetadata;
use bytes::Bytes;
use safetensors::tensor::Dtype;

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

/// The safetensors file of a case as separately owned parts, in file order: the header (length
/// prefix and JSON), the image's bytes, then the label's when there is one.
///
/// The image part *is* the image buffer (handed to [`Bytes::from_owner`] on little-endian
/// targets): encoding a 143 MB case copies nothing, and a writer that takes parts (an
/// object-store `PutPayload`, `write_all` per part) writes each straight from where it lies.
#[derive(Debug, Clone)]
pub struct EncodedCase {
    /// Header, image bytes, label bytes (if any).
    pub parts: Vec<Bytes>,
}

impl EncodedCase {
    /// Total length of the file.
    pub fn len(&self) -> usize {
        self.parts.iter().map(Bytes::len).sum()
    }

    /// Whether the file is empty (never, for a valid case).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole file in one buffer (copies every part): for tests and small cases.
    pub fn concat(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        for p in &self.parts {
            out.extend_from_slice(p);
        }
        out
    }
}

/// An f32 buffer viewed as its little-endian bytes, so [`Bytes::from_owner`] can own it.
#[cfg(target_endian = "little")]
struct F32Buffer(Vec<f32>);

#[cfg(target_endian = "little")]
impl AsRef<[u8]> for F32Buffer {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

/// The image's little-endian bytes without a copy.
#[cfg(target_endian = "little")]
fn f32_bytes(v: Vec<f32>) -> Bytes {
    Bytes::from_owner(F32Buffer(v))
}

/// The image's little-endian bytes, converted in parallel blocks.
#[cfg(not(target_endian = "little"))]
fn f32_bytes(v: Vec<f32>) -> Bytes {
    use rayon::prelude::*;
    const BLOCK: usize = 1 << 18;
    let mut out = vec![0u8; v.len() * 4];
    out.par_chunks_mut(BLOCK * 4).zip(v.par_chunks(BLOCK)).for_each(|(o, i)| {
        for (d, x) in o.chunks_exact_mut(4).zip(i) {
            d.copy_from_slice(&x.to_le_bytes());
        }
    });
    Bytes::from(out)
}

/// The safetensors header of a case: `u64` little-endian length, then the JSON (tensor
/// entries sorted by name, as `safetensors::serialize` orders tensors of these dtypes; the
/// metadata keys sorted), padded with spaces to a multiple of 8 bytes as that crate does.
fn header(m: &CaseMetadata, has_label: bool) -> Result<Vec<u8>> {
    let [x, y, z] = m.shape;
    let image_len = 4 * x * y * z * 4;
    let mut tensors = serde_json::Map::new();
    let mut info = std::collections::BTreeMap::new();
    info.insert(METADATA_KEY.to_string(), json(m));
    info.insert("affine".into(), json(&m.affine));
    info.insert("original_shape".into(), json(&m.original_shape));
    info.insert("crop_box".into(), json(&m.crop_box));
    info.insert("label_convention".into(), m.label_convention.name().to_string());
    info.insert("pipeline_version".into(), m.pipeline_version.clone());
    tensors.insert("__metadata__".into(), serde_json::to_value(info).expect("strings serialise"));
    tensors.insert(
        IMAGE.into(),
        serde_json::json!({"dtype": "F32", "shape": [4, x, y, z], "data_offsets": [0, image_len]}),
    );
    if has_label {
        let label_len = 3 * x * y * z;
        tensors.insert(
            LABEL.into(),
            serde_json::json!({"dtype": "U8", "shape": [3, x, y, z], "data_offsets": [image_len, image_len + label_len]}),
        );
    }
    let mut json = serde_json::to_vec(&tensors).map_err(|e| CoreError::Internal(format!("safetensors header: {e}")))?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

impl CaseTensors {
    /// Serialises to safetensors as parts, consuming the case: the image buffer becomes a part
    /// as it is (see [`EncodedCase`]). Fails if a tensor's length does not match the shape.
    pub fn encode(self) -> Result<(EncodedCase, CaseMetadata)> {
        let [x, y, z] = self.metadata.shape;
        let n = x * y * z;
        if self.image.len() != 4 * n {
            return Err(CoreError::Internal(format!(
                "image tensor: {} values for shape [4, {x}, {y}, {z}]",
                self.image.len()
            )));
        }
        if let Some(l) = &self.label
            && l.len() != 3 * n
        {
            return Err(CoreError::Internal(format!("label tensor: {} values for shape [3, {x}, {y}, {z}]", l.len())));
        }
        self.check_lengths()?;
        let head = header(&self.metadata, self.label.is_some())?;
        let mut parts = vec![Bytes::from(head), f32_bytes(self.image)];
        parts.extend(self.label.map(Bytes::from));
        Ok((EncodedCase { parts }, self.metadata))
    }

    /// Serialises to safetensors bytes in one buffer: the same bytes as [`CaseTensors::encode`]'s
    /// parts, joined (one copy of the case; the services and CLIs write the parts instead).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.check_lengths()?;
        let mut out = header(&self.metadata, self.label.is_some())?;
        out.reserve(self.image.len() * 4 + self.label.as_ref().map_or(0, Vec::len));
        for v in &self.image {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(self.label.as_deref().unwrap_or_default());
        Ok(out)
    }

    /// Fails unless the image holds `4·X·Y·Z` values and the label (if any) `3·X·Y·Z`.
    fn check_lengths(&self) -> Result<()> {
        let [x, y, z] = self.metadata.shape;
        let n = x * y * z;
        if self.image.len() != 4 * n {
            return Err(CoreError::Internal(format!(
                "image tensor: {} values for shape [4, {x}, {y}, {z}]",
                self.image.len()
            )));
        }
        if let Some(l) = &self.label
            && l.len() != 3 * n
        {
            return Err(CoreError::Internal(format!("label tensor: {} values for shape [3, {x}, {y}, {z}]", l.len())));
        }
        Ok(())
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
        assert_eq!(bytes, t.clone().encode().unwrap().0.concat(), "to_bytes is encode's parts joined");
        assert_eq!(CaseTensors::from_bytes(&bytes, "x").unwrap(), t);
        let (_, h) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(h.metadata().as_ref().unwrap()["crop_box"], r#"{"start":[1,0,-1],"size":[2,2,1]}"#);
        assert!(CaseTensors::from_bytes(&bytes[..bytes.len() - 3], "short.safetensors").is_err());
        // The image data section is the little-endian bytes of each value, then the label.
        let want: Vec<u8> = t.image.iter().flat_map(|v| v.to_le_bytes()).chain([1u8; 12]).collect();
        assert_eq!(&bytes[bytes.len() - want.len()..], want.as_slice());
        // The header is what the safetensors crate itself writes for the same tensors and
        // metadata (parsed back: the crate's metadata map has no fixed key order).
        let views = vec![
            ("image", safetensors::tensor::TensorView::new(Dtype::F32, vec![4, 2, 2, 1], &want[..64]).unwrap()),
            ("label", safetensors::tensor::TensorView::new(Dtype::U8, vec![3, 2, 2, 1], &want[64..]).unwrap()),
        ];
        let info: std::collections::HashMap<String, String> = h.metadata().clone().unwrap();
        let theirs = safetensors::serialize(views, Some(info)).unwrap();
        let (n_ours, ours_h) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let (n_theirs, theirs_h) = safetensors::SafeTensors::read_metadata(&theirs).unwrap();
        assert_eq!((n_ours, bytes.len()), (n_theirs, theirs.len()));
        assert_eq!(ours_h.metadata(), theirs_h.metadata());
        assert_eq!(ours_h.tensors().len(), theirs_h.tensors().len());
        for (name, info) in theirs_h.tensors() {
            assert_eq!(format!("{:?}", ours_h.tensors()[&name]), format!("{info:?}"), "{name}");
        }
        assert_eq!(&bytes[8 + n_ours..], &theirs[8 + n_theirs..]);
    }

    #[test]
    fn encoding_keeps_the_image_buffer_and_refuses_wrong_lengths() {
        let metadata = CaseMetadata { shape: [2, 1, 1], ..Default::default() };
        let image: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let address = image.as_ptr() as usize;
        let (encoded, _) = CaseTensors { image, label: None, metadata: metadata.clone() }.encode().unwrap();
        assert_eq!(encoded.parts.len(), 2, "header and image; no label part without a label");
        #[cfg(target_endian = "little")]
        assert_eq!(encoded.parts[1].as_ptr() as usize, address, "the image part is the image buffer");
        assert_eq!(encoded.parts[0].len() % 8, 0);
        assert_eq!(encoded.len(), encoded.parts[0].len() + 32);
        let bad = CaseTensors { image: vec![0.0; 7], label: None, metadata };
        assert!(bad.encode().unwrap_err().to_string().contains("7 values"));
    }
}
