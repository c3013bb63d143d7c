//! Plain tensors as read from checkpoint files, independent of libtorch.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{CheckpointError, WeightsError};

/// Element type of a [`RawTensor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// IEEE 754 binary64.
    F64,
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary16.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 64-bit integer.
    I64,
    /// Signed 32-bit integer.
    I32,
    /// Signed 16-bit integer.
    I16,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 8-bit integer.
    U8,
    /// Boolean, one byte per element.
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// True for the floating-point types.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
    }

    /// The safetensors spelling (`F32`, `BF16`, …).
    pub fn name(self) -> &'static str {
        match self {
            DType::F64 => "F64",
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }

    fn to_safetensors(self) -> safetensors::Dtype {
        use safetensors::Dtype as S;
        match self {
            DType::F64 => S::F64,
            DType::F32 => S::F32,
            DType::F16 => S::F16,
            DType::BF16 => S::BF16,
            DType::I64 => S::I64,
            DType::I32 => S::I32,
            DType::I16 => S::I16,
            DType::I8 => S::I8,
            DType::U8 => S::U8,
            DType::Bool => S::BOOL,
        }
    }

    fn from_safetensors(d: safetensors::Dtype) -> Option<Self> {
        use safetensors::Dtype as S;
        Some(match d {
            S::F64 => DType::F64,
            S::F32 => DType::F32,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::I64 => DType::I64,
            S::I32 => DType::I32,
            S::I16 => DType::I16,
            S::I8 => DType::I8,
            S::U8 => DType::U8,
            S::BOOL => DType::Bool,
            _ => return None,
        })
    }
}

/// A dense, C-contiguous, little-endian tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    /// Element type.
    pub dtype: DType,
    /// Shape (empty for a scalar).
    pub shape: Vec<usize>,
    /// `numel * dtype.size()` bytes, little-endian, C order.
    pub data: Vec<u8>,
}

impl RawTensor {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// An f32 tensor from values and a shape; panics if they disagree (a programming error).
    pub fn from_f32(shape: &[usize], values: &[f32]) -> Self {
        assert_eq!(shape.iter().product::<usize>(), values.len());
        Self { dtype: DType::F32, shape: shape.to_vec(), data: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }

    /// The shape as i64 (libtorch's convention).
    pub fn shape_i64(&self) -> Vec<i64> {
        self.shape.iter().map(|&d| d as i64).collect()
    }

    /// The values converted to f32 (exact for F32, F16 and BF16; rounded for F64),
    /// or `None` for integer types.
    pub fn to_f32_vec(&self) -> Option<Vec<f32>> {
        let d = &self.data;
        Some(match self.dtype {
            DType::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DType::F64 => {
                d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect()
            }
            DType::F16 => d.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::BF16 => d.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            _ => return None,
        })
    }
}

/// Named tensors in file order, like a PyTorch `state_dict`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateDict {
    entries: Vec<(String, RawTensor)>,
}

impl StateDict {
    /// An empty state dict.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a tensor (a replaced key keeps its position).
    pub fn insert(&mut self, name: impl Into<String>, t: RawTensor) {
        let name = name.into();
        if let Some(e) = self.entries.iter_mut().find(|(k, _)| *k == name) {
            e.1 = t;
        } else {
            self.entries.push((name, t));
        }
    }

    /// The tensor stored under `name`.
    pub fn get(&self, name: &str) -> Option<&RawTensor> {
        self.entries.iter().find(|(k, _)| k == name).map(|(_, t)| t)
    }

    /// Removes and returns the tensor stored under `name`.
    pub fn remove(&mut self, name: &str) -> Option<RawTensor> {
        let i = self.entries.iter().position(|(k, _)| k == name)?;
        Some(self.entries.remove(i).1)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Keys in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(k, _)| k.as_str())
    }

    /// `(key, tensor)` pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &RawTensor)> {
        self.entries.iter().map(|(k, t)| (k.as_str(), t))
    }

    /// Renames every key with `f` (e.g. to strip DataParallel's `module.` prefix).
    pub fn rename_keys(&mut self, f: impl Fn(&str) -> String) {
        for (k, _) in &mut self.entries {
            *k = f(k);
        }
    }
}

/// A parsed safetensors file: its tensors and its `__metadata__`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SafetensorsFile {
    /// The tensors in the file's offset order.
    pub tensors: StateDict,
    /// The free-form string metadata (empty when absent).
    pub metadata: HashMap<String, String>,
}

/// Parses a safetensors buffer (every offset and length is checked by the `safetensors` crate).
pub fn parse_safetensors(bytes: &[u8]) -> Result<SafetensorsFile, CheckpointError> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| CheckpointError::Safetensors(e.to_string()))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| CheckpointError::Safetensors(e.to_string()))?;
    let mut views = st.tensors();
    // File order: by data offset, which is how writers lay them out.
    views.sort_by_key(|(_, v)| v.data().as_ptr() as usize);
    let mut tensors = StateDict::new();
    for (name, v) in views {
        let dtype = DType::from_safetensors(v.dtype()).ok_or_else(|| CheckpointError::Tensor {
            name: name.clone(),
            message: format!("unsupported safetensors dtype {:?}", v.dtype()),
        })?;
        tensors.insert(name, RawTensor { dtype, shape: v.shape().to_vec(), data: v.data().to_vec() });
    }
    Ok(SafetensorsFile { tensors, metadata: meta.metadata().clone().unwrap_or_default() })
}

struct View<'a>(&'a RawTensor);

impl safetensors::View for View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.0.dtype.to_safetensors()
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.0.data)
    }
    fn data_len(&self) -> usize {
        self.0.data.len()
    }
}

/// Serialises tensors and metadata to safetensors bytes (the layout Python's
/// `safetensors.torch.save_file` produces for the same input).
pub fn serialize_safetensors(tensors: &StateDict, metadata: &HashMap<String, String>) -> Result<Vec<u8>, WeightsError> {
    let meta = (!metadata.is_empty()).then(|| metadata.clone());
    safetensors::serialize(tensors.iter().map(|(k, t)| (k, View(t))), meta)
        .map_err(|e| WeightsError::Serialize(e.to_string()))
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, then a rename,
/// so a failure never leaves a partial file under the final name. Missing parent folders are
/// created.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)?;
    let file_name = path.file_name().ok_or_else(|| std::io::Error::other("output path has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp-{}", file_name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_round_trip_is_exact() {
        let mut sd = StateDict::new();
        sd.insert("b", RawTensor::from_f32(&[2, 3], &[1.0, -0.0, f32::MIN_POSITIVE, 3.5, -7.25, 1e-30]));
        sd.insert("a", RawTensor { dtype: DType::F16, shape: vec![2], data: vec![0, 60, 0, 188] });
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = serialize_safetensors(&sd, &meta).unwrap();
        let back = parse_safetensors(&bytes).unwrap();
        assert_eq!(back.metadata, meta);
        for (k, t) in sd.iter() {
            assert_eq!(back.tensors.get(k).unwrap(), t, "{k}");
        }
        assert_eq!(back.tensors.get("a").unwrap().to_f32_vec().unwrap(), vec![1.0, -1.0]);
    }

    #[test]
    fn truncated_safetensors_is_an_error() {
        let mut sd = StateDict::new();
        sd.insert("x", RawTensor::from_f32(&[4], &[1.0, 2.0, 3.0, 4.0]));
        let bytes = serialize_safetensors(&sd, &HashMap::new()).unwrap();
        for n in [0, 4, 8, 9, bytes.len() - 1] {
            assert!(parse_safetensors(&bytes[..n]).is_err(), "len {n}");
        }
    }

    #[test]
    fn atomic_write_replaces_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.bin");
        write_atomically(&p, b"one").unwrap();
        write_atomically(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let nested = dir.path().join("a/b/w.bin");
        write_atomically(&nested, b"x").unwrap();
        assert_eq!(std::fs::read(&nested).unwrap(), b"x");
    }
}
