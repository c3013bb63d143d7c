//! A restricted pickle virtual machine: enough of protocols 0–5 to read what `torch.save`
//! writes for state dicts and training checkpoints, without executing anything.
//!
//! Callables (`GLOBAL` + `REDUCE`) are never run: a few known ones are interpreted
//! (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`,
//! `_codecs.encode`, `torch.Size`), every other becomes an inert [`Value::Object`].
//! Memoised values are copied on `GET` (a self-referencing structure is not reproduced).

use crate::tensors::DType;

mod machine;

pub use machine::load;

/// A reference to a tensor inside a `torch.save` archive (its storage is read separately).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    /// The storage's key (`data/<key>` in the archive).
    pub storage_key: String,
    /// Element type of the storage.
    pub dtype: DType,
    /// Number of elements of the storage.
    pub storage_numel: u64,
    /// Offset of the first element, in elements.
    pub offset: u64,
    /// Shape.
    pub size: Vec<u64>,
    /// Strides, in elements.
    pub stride: Vec<u64>,
}

/// A value built by the pickle program.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// A bool.
    Bool(bool),
    /// An integer that fits in i64.
    Int(i64),
    /// A float.
    Float(f64),
    /// A str.
    Str(String),
    /// bytes / bytearray.
    Bytes(Vec<u8>),
    /// A tuple.
    Tuple(Vec<Value>),
    /// A list (sets and frozensets too).
    List(Vec<Value>),
    /// A dict or OrderedDict, in insertion order.
    Dict(Vec<(Value, Value)>),
    /// A reference to a global, `module.name`.
    Global(String, String),
    /// The result of calling an unknown callable (kept inert).
    Object {
        /// The callable.
        callable: Box<Value>,
        /// Its arguments.
        args: Box<Value>,
        /// The `BUILD` state, if any.
        state: Option<Box<Value>>,
    },
    /// A `torch.save` storage (a persistent id).
    Storage {
        /// Key in the archive.
        key: String,
        /// Element type.
        dtype: DType,
        /// Number of elements.
        numel: u64,
    },
    /// A tensor.
    Tensor(TensorRef),
}

impl Value {
    /// A short type name for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(..) => "global",
            Value::Object { .. } => "object",
            Value::Storage { .. } => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
}

/// Maps a `torch.<X>Storage` class name to its element type.
pub fn storage_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "DoubleStorage" => DType::F64,
        "FloatStorage" => DType::F32,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "CharStorage" => DType::I8,
        "ByteStorage" => DType::U8,
        "BoolStorage" => DType::Bool,
        _ => return None,
    })
}

/// Result of the interpreter's steps: errors are messages (with the byte offset where known).
type R<T> = Result<T, String>;

fn as_u64s(v: &Value, what: &str) -> R<Vec<u64>> {
    let items = match v {
        Value::Tuple(x) | Value::List(x) => x,
        _ => return Err(format!("{what}: expected a tuple, got {}", v.type_name())),
    };
    items
        .iter()
        .map(|x| match x {
            Value::Int(i) if *i >= 0 => Ok(*i as u64),
            _ => Err(format!("{what}: expected non-negative ints")),
        })
        .collect()
}

fn rebuild_tensor(args: Vec<Value>) -> R<Value> {
    let (storage, offset, size, stride) = match args.as_slice() {
        [s, o, sz, st, ..] => (s, o, sz, st),
        _ => return Err("_rebuild_tensor: too few arguments".into()),
    };
    let Value::Storage { key, dtype, numel } = storage else {
        return Err(format!("_rebuild_tensor: expected a storage, got {}", storage.type_name()));
    };
    let Value::Int(offset) = offset else {
        return Err("_rebuild_tensor: storage offset is not an int".into());
    };
    let size = as_u64s(size, "tensor size")?;
    let stride = as_u64s(stride, "tensor stride")?;
    if size.len() != stride.len() || *offset < 0 {
        return Err("_rebuild_tensor: inconsistent size/stride/offset".into());
    }
    Ok(Value::Tensor(TensorRef {
        storage_key: key.clone(),
        dtype: *dtype,
        storage_numel: *numel,
        offset: *offset as u64,
        size,
        stride,
    }))
}

fn call(callable: Value, args: Value) -> R<Value> {
    let name = match &callable {
        Value::Global(m, n) => format!("{m}.{n}"),
        _ => String::new(),
    };
    let tuple = |a: Value| match a {
        Value::Tuple(v) => Ok(v),
        other => Err(format!("{name}: arguments are a {}, not a tuple", other.type_name())),
    };
    Ok(match name.as_str() {
        "collections.OrderedDict" | "builtins.dict" => {
            let a = tuple(args)?;
            match a.into_iter().next() {
                None => Value::Dict(Vec::new()),
                Some(Value::Dict(d)) => Value::Dict(d),
                Some(Value::List(items)) => Value::Dict(
                    items
                        .into_iter()
                        .map(|kv| match kv {
                            Value::Tuple(mut p) | Value::List(mut p) if p.len() == 2 => {
                                let v = p.pop().expect("2");
                                Ok((p.pop().expect("1"), v))
                            }
                            _ => Err("OrderedDict: items are not pairs".to_string()),
                        })
                        .collect::<R<_>>()?,
                ),
                Some(other) => {
                    return Err(format!("OrderedDict from a {}", other.type_name()));
                }
            }
        }
        "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => rebuild_tensor(tuple(args)?)?,
        "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => {
            tuple(args)?.into_iter().next().ok_or("_rebuild_parameter without data")?
        }
        "torch.Size" | "builtins.tuple" => match tuple(args)?.into_iter().next() {
            Some(Value::Tuple(v)) | Some(Value::List(v)) => Value::Tuple(v),
            None => Value::Tuple(Vec::new()),
            Some(other) => return Err(format!("{name} from a {}", other.type_name())),
        },
        "_codecs.encode" => match tuple(args)?.as_slice() {
            [Value::Str(s), ..] => {
                // Protocol 2 writes bytes as encode(latin-1 text, "latin1").
                Value::Bytes(s.chars().map(|c| c as u32 as u8).collect())
            }
            _ => return Err("_codecs.encode: expected a str".into()),
        },
        "builtins.set" | "builtins.frozenset" | "builtins.list" => match tuple(args)?.into_iter().next() {
            Some(Value::List(v)) | Some(Value::Tuple(v)) => Value::List(v),
            None => Value::List(Vec::new()),
            Some(other) => return Err(format!("{name} from a {}", other.type_name())),
        },
        _ => Value::Object { callable: Box::new(callable), args: Box::new(args), state: None },
    })
}

fn persistent_load(pid: Value) -> R<Value> {
    let Value::Tuple(t) = pid else {
        return Err(format!("persistent id is a {}, not a tuple", pid.type_name()));
    };
    match t.as_slice() {
        [Value::Str(tag), ty, key, _location, numel, ..] if tag == "storage" => {
            let dtype = match ty {
                Value::Global(m, n) if m == "torch" => {
                    storage_dtype(n).ok_or_else(|| format!("unsupported storage type torch.{n}"))?
                }
                other => return Err(format!("unsupported storage type {other:?}")),
            };
            let key = match key {
                Value::Str(s) => s.clone(),
                Value::Int(i) => i.to_string(),
                _ => return Err("storage key is not a string".into()),
            };
            let Value::Int(numel) = numel else {
                return Err("storage size is not an int".into());
            };
            if *numel < 0 {
                return Err("negative storage size".into());
            }
            Ok(Value::Storage { key, dtype, numel: *numel as u64 })
        }
        _ => Err("persistent id is not a ('storage', type, key, location, numel) tuple".into()),
    }
}
