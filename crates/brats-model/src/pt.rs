//! PyTorch checkpoints (`torch.save`, zip format of PyTorch ≥ 1.6) read and written in Rust.
//!
//! Layout: a zip of stored members `<archive>/data.pkl` (a pickle whose tensors refer to
//! storages by persistent id), `<archive>/data/<key>` (raw little-endian storage bytes),
//! `<archive>/byteorder` and `<archive>/version`.

use crate::error::CheckpointError;
use crate::pickle::{self, TensorRef, Value};
use crate::tensors::{DType, RawTensor, StateDict};
use crate::zip::{self, ZipArchive};

/// Largest tensor we materialise from a checkpoint (guards against hostile strides).
const MAX_TENSOR_BYTES: u64 = 1 << 31;

/// Keys under which training checkpoints commonly nest the model's state_dict
/// (`{"model": …}` is what MONAI's `CheckpointSaver` writes).
pub const WRAPPER_KEYS: [&str; 5] = ["model", "state_dict", "network", "net", "model_state_dict"];

/// True if `bytes` starts like a zip archive.
pub fn is_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06")
}

/// True if `bytes` looks like the legacy (pre-1.6) `torch.save` format: a bare pickle.
pub fn is_legacy_torch(bytes: &[u8]) -> bool {
    bytes.len() > 2 && bytes[0] == 0x80 && bytes[1] <= 5
}

/// A parsed `torch.save` archive: the unpickled object and access to its storages.
pub struct TorchArchive<'a> {
    zip: ZipArchive<'a>,
    prefix: String,
    big_endian: bool,
    /// The object that was saved.
    pub root: Value,
}

impl<'a> TorchArchive<'a> {
    /// Parses the archive and runs its pickle.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, CheckpointError> {
        let zip = ZipArchive::parse(bytes)?;
        let pkls: Vec<&str> = zip
            .entries()
            .iter()
            .map(|e| e.name.as_str())
            .filter(|n| n.ends_with("data.pkl") && n.matches('/').count() == 1)
            .collect();
        let pkl = match pkls.as_slice() {
            [one] => *one,
            [] => {
                return Err(CheckpointError::Zip(
                    "no <archive>/data.pkl member: a zip, but not a torch.save checkpoint".into(),
                ));
            }
            _ => {
                return Err(CheckpointError::Zip(format!("several data.pkl members: {pkls:?}")));
            }
        };
        let prefix = pkl.trim_end_matches("data.pkl").to_string();
        let big_endian = match zip.read(&format!("{prefix}byteorder")) {
            Ok(b) if b == b"big" => true,
            Ok(b) if b == b"little" => false,
            Ok(b) => {
                return Err(CheckpointError::Zip(format!("unknown byteorder {:?}", String::from_utf8_lossy(b))));
            }
            Err(_) => false, // older archives have no byteorder member: little-endian
        };
        let root = pickle::load(zip.read(pkl)?)
            .map_err(|message| CheckpointError::Pickle { entry: pkl.to_string(), message })?;
        Ok(Self { zip, prefix, big_endian, root })
    }

    /// Copies a tensor out of its storage into a contiguous little-endian [`RawTensor`].
    pub fn materialize(&self, name: &str, t: &TensorRef) -> Result<RawTensor, CheckpointError> {
        let bad = |message: String| CheckpointError::Tensor { name: name.to_string(), message };
        let es = t.dtype.size() as u64;
        let entry = format!("{}data/{}", self.prefix, t.storage_key);
        let storage = self.zip.read(&entry).map_err(|e| bad(format!("storage {entry}: {e}")))?;
        let need = t.storage_numel.checked_mul(es).ok_or_else(|| bad("storage size overflows".into()))?;
        if (storage.len() as u64) < need {
            return Err(bad(format!("storage {entry} has {} bytes, {need} expected: truncated?", storage.len())));
        }
        let mut numel: u64 = 1;
        for &d in &t.size {
            numel = numel.checked_mul(d).ok_or_else(|| bad("shape overflows".into()))?;
        }
        if numel.saturating_mul(es) > MAX_TENSOR_BYTES {
            return Err(bad(format!("implausibly large tensor ({numel} elements)")));
        }
        if numel > t.storage_numel {
            return Err(bad(format!(
                "view of {numel} elements over a storage of {}: expanded (stride 0) tensors are \
                 not supported in checkpoints",
                t.storage_numel
            )));
        }
        let shape: Vec<usize> = t.size.iter().map(|&d| d as usize).collect();
        if numel == 0 {
            return Ok(RawTensor { dtype: t.dtype, shape, data: Vec::new() });
        }
        let mut last = t.offset;
        for (&d, &s) in t.size.iter().zip(&t.stride) {
            last = (d - 1)
                .checked_mul(s)
                .and_then(|x| x.checked_add(last))
                .ok_or_else(|| bad("strides overflow".into()))?;
        }
        if last >= t.storage_numel {
            return Err(bad(format!(
                "view (offset {}, size {:?}, stride {:?}) reaches element {last} of a storage of {}",
                t.offset, t.size, t.stride, t.storage_numel
            )));
        }
        let es = es as usize;
        let mut data = Vec::with_capacity(numel as usize * es);
        // C-contiguous (dims of size 1 may carry any stride)?
        let mut expect = 1u64;
        let mut contiguous = true;
        for (&d, &s) in t.size.iter().zip(&t.stride).rev() {
            if d != 1 && s != expect {
                contiguous = false;
                break;
            }
            expect *= d;
        }
        if contiguous {
            let start = t.offset as usize * es;
            data.extend_from_slice(&storage[start..start + numel as usize * es]);
        } else {
            let nd = t.size.len();
            let mut idx = vec![0u64; nd];
            for _ in 0..numel {
                let off: u64 = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<u64>();
                let o = off as usize * es;
                data.extend_from_slice(&storage[o..o + es]);
                for k in (0..nd).rev() {
                    idx[k] += 1;
                    if idx[k] < t.size[k] {
                        break;
                    }
                    idx[k] = 0;
                }
            }
        }
        if self.big_endian && es > 1 {
            for c in data.chunks_exact_mut(es) {
                c.reverse();
            }
        }
        Ok(RawTensor { dtype: t.dtype, shape, data })
    }
}

fn tensor_dict(v: &Value) -> Option<Vec<(String, TensorRef)>> {
    let Value::Dict(d) = v else { return None };
    if d.is_empty() {
        return None;
    }
    d.iter()
        .map(|(k, v)| match (k, v) {
            (Value::Str(k), Value::Tensor(t)) => Some((k.clone(), t.clone())),
            _ => None,
        })
        .collect()
}

fn describe_keys(v: &Value) -> String {
    match v {
        Value::Dict(d) => {
            let keys: Vec<String> = d
                .iter()
                .take(20)
                .map(|(k, v)| match k {
                    Value::Str(s) => format!("{s:?} ({})", v.type_name()),
                    other => format!("<{}>", other.type_name()),
                })
                .collect();
            format!("the checkpoint is a dict with keys [{}]", keys.join(", "))
        }
        other => format!("the checkpoint holds a {}", other.type_name()),
    }
}

/// Reads the state_dict from a `torch.save` checkpoint: either a plain state_dict or one nested
/// under one of [`WRAPPER_KEYS`] (e.g. MONAI's `{"model": state_dict, "optimizer": …}`).
pub fn read_state_dict(bytes: &[u8]) -> Result<StateDict, CheckpointError> {
    let archive = TorchArchive::parse(bytes)?;
    let refs = tensor_dict(&archive.root)
        .or_else(|| {
            let Value::Dict(d) = &archive.root else {
                return None;
            };
            WRAPPER_KEYS.iter().find_map(|w| {
                d.iter().find(|(k, _)| matches!(k, Value::Str(s) if s == w)).and_then(|(_, v)| tensor_dict(v))
            })
        })
        .ok_or_else(|| {
            CheckpointError::NoStateDict(format!(
                "{}; expected a dict of tensors, or one under {:?}",
                describe_keys(&archive.root),
                WRAPPER_KEYS
            ))
        })?;
    let mut sd = StateDict::new();
    for (name, r) in refs {
        let t = archive.materialize(&name, &r)?;
        sd.insert(name, t);
    }
    Ok(sd)
}

fn storage_class(d: DType) -> &'static str {
    match d {
        DType::F64 => "DoubleStorage",
        DType::F32 => "FloatStorage",
        DType::F16 => "HalfStorage",
        DType::BF16 => "BFloat16Storage",
        DType::I64 => "LongStorage",
        DType::I32 => "IntStorage",
        DType::I16 => "ShortStorage",
        DType::I8 => "CharStorage",
        DType::U8 => "ByteStorage",
        DType::Bool => "BoolStorage",
    }
}

struct PickleWriter(Vec<u8>);

impl PickleWriter {
    fn str(&mut self, s: &str) {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }
    fn int(&mut self, v: i64) {
        if let Ok(v) = i32::try_from(v) {
            self.0.push(b'J');
            self.0.extend_from_slice(&v.to_le_bytes());
        } else {
            self.0.extend_from_slice(&[0x8a, 8]);
            self.0.extend_from_slice(&v.to_le_bytes());
        }
    }
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }
    fn ints_tuple(&mut self, v: &[i64]) {
        self.0.push(b'(');
        for &x in v {
            self.int(x);
        }
        self.0.push(b't');
    }
}

/// Writes a state_dict as `torch.save(state_dict, f)` would (an `OrderedDict` of tensors,
/// pickle protocol 2, one storage per tensor), loadable by `torch.load(f, weights_only=True)`.
pub fn write_state_dict(sd: &StateDict) -> Vec<u8> {
    let mut p = PickleWriter(vec![0x80, 2]);
    p.global("collections", "OrderedDict");
    p.0.extend_from_slice(b")R(");
    for (i, (name, t)) in sd.iter().enumerate() {
        p.str(name);
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.0.push(b'(');
        // persistent id ('storage', torch.<X>Storage, key, 'cpu', numel)
        p.0.push(b'(');
        p.str("storage");
        p.global("torch", storage_class(t.dtype));
        p.str(&i.to_string());
        p.str("cpu");
        p.int(t.numel() as i64);
        p.0.extend_from_slice(b"tQ");
        p.int(0);
        let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
        let mut stride = vec![1i64; shape.len()];
        for k in (0..shape.len().saturating_sub(1)).rev() {
            stride[k] = stride[k + 1] * shape[k + 1].max(1);
        }
        p.ints_tuple(&shape);
        p.ints_tuple(&stride);
        p.0.push(0x89); // requires_grad = False
        p.global("collections", "OrderedDict");
        p.0.extend_from_slice(b")R"); // backward hooks
        p.0.extend_from_slice(b"tR");
    }
    p.0.extend_from_slice(b"u.");
    let pkl = p.0;
    let mut entries: Vec<(String, &[u8])> =
        vec![("archive/data.pkl".into(), &pkl), ("archive/byteorder".into(), b"little")];
    for (i, (_, t)) in sd.iter().enumerate() {
        entries.push((format!("archive/data/{i}"), &t.data));
    }
    entries.push(("archive/version".into(), b"3\n"));
    zip::write_stored(&entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StateDict {
        let mut sd = StateDict::new();
        sd.insert("a.weight", RawTensor::from_f32(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, -6.5]));
        sd.insert("a.bias", RawTensor::from_f32(&[3], &[0.5, 0.25, -0.125]));
        sd.insert("b.steps", RawTensor { dtype: DType::I64, shape: vec![], data: 7i64.to_le_bytes().to_vec() });
        sd
    }

    #[test]
    fn write_then_read_is_exact() {
        let sd = sample();
        let bytes = write_state_dict(&sd);
        assert!(is_zip(&bytes));
        assert_eq!(read_state_dict(&bytes).unwrap(), sd);
    }

    #[test]
    fn truncations_and_corruptions_never_panic() {
        let bytes = write_state_dict(&sample());
        for n in (0..bytes.len()).step_by(3) {
            assert!(read_state_dict(&bytes[..n]).is_err(), "truncated to {n}");
        }
        let mut errors = 0;
        for i in 0..bytes.len() {
            let mut c = bytes.clone();
            c[i] ^= 0xA5;
            if read_state_dict(&c).is_err() {
                errors += 1;
            }
        }
        // Flips in padding or in the unused zip fields are harmless; most must be caught.
        assert!(errors > bytes.len() / 2, "{errors} of {}", bytes.len());
    }

    #[test]
    fn strided_views_are_gathered() {
        // A transposed 2x3 view of a 6-element storage, offset 0, stride (1, 2).
        let storage: Vec<u8> = [0f32, 1., 2., 3., 4., 5.].iter().flat_map(|v| v.to_le_bytes()).collect();
        let zip = zip::write_stored(&[("a/data.pkl".into(), &b"\x80\x02}."[..]), ("a/data/0".into(), &storage)]);
        let archive = TorchArchive::parse(&zip).unwrap();
        let t = TensorRef {
            storage_key: "0".into(),
            dtype: DType::F32,
            storage_numel: 6,
            offset: 0,
            size: vec![3, 2],
            stride: vec![1, 3],
        };
        let r = archive.materialize("x", &t).unwrap();
        assert_eq!(r.to_f32_vec().unwrap(), vec![0., 3., 1., 4., 2., 5.]);
        let out_of_bounds = TensorRef { offset: 1, ..t.clone() };
        assert!(archive.materialize("x", &out_of_bounds).is_err());
    }

    #[test]
    fn non_state_dict_is_explained() {
        let zip = zip::write_stored(&[(
            "a/data.pkl".into(),
            // {'epoch': 3}
            &b"\x80\x02}X\x05\x00\x00\x00epochK\x03s."[..],
        )]);
        let e = read_state_dict(&zip).unwrap_err().to_string();
        assert!(e.contains("\"epoch\" (int)"), "{e}");
    }
}
