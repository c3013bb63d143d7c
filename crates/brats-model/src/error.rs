//! Error types of this crate.

use std::path::PathBuf;

/// An invalid [`crate::SegResNetConfig`].
#[derive(Debug, thiserror::Error)]
#[error("invalid SegResNet configuration: {0}")]
pub struct ConfigError(pub String);

/// A checkpoint file that cannot be read (before any key is checked against the network).
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Neither a `torch.save` zip archive nor a safetensors file.
    #[error("{0}: not a PyTorch zip checkpoint (torch.save, PyTorch >= 1.6) nor a safetensors file")]
    UnknownFormat(String),
    /// A legacy (pre-1.6, non-zip) `torch.save` file.
    #[error(
        "legacy torch.save format (PyTorch < 1.6) is not supported: re-save it with \
         `torch.save(torch.load(p), p)` on PyTorch >= 1.6"
    )]
    LegacyTorchFormat,
    /// The zip container is malformed.
    #[error("malformed zip archive: {0}")]
    Zip(String),
    /// The pickle program (`data.pkl`) is malformed or uses something unsupported.
    #[error("malformed or unsupported pickle in {entry}: {message}")]
    Pickle {
        /// The archive entry.
        entry: String,
        /// What went wrong, with the byte offset when known.
        message: String,
    },
    /// A tensor's storage is missing, too short, or of an unsupported type.
    #[error("tensor {name:?}: {message}")]
    Tensor {
        /// The state_dict key (or a path inside the checkpoint).
        name: String,
        /// What went wrong.
        message: String,
    },
    /// The safetensors file is malformed.
    #[error("malformed safetensors file: {0}")]
    Safetensors(String),
    /// The checkpoint holds no recognisable state_dict.
    #[error("no state_dict found in the checkpoint: {0}")]
    NoStateDict(String),
}

/// A parameter whose shape differs from the network's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MisShaped {
    /// The state_dict key.
    pub name: String,
    /// The shape the configuration requires.
    pub expected: Vec<i64>,
    /// The shape found in the checkpoint.
    pub found: Vec<i64>,
}

/// The keys of a checkpoint do not match the network, listed in full.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyMismatch {
    /// Keys the network needs that the checkpoint lacks.
    pub missing: Vec<String>,
    /// Keys in the checkpoint that the network does not have.
    pub unexpected: Vec<String>,
    /// Keys present in both with different shapes.
    pub mis_shaped: Vec<MisShaped>,
    /// Keys whose element type is not floating point.
    pub wrong_dtype: Vec<(String, String)>,
}

impl KeyMismatch {
    /// True when nothing is wrong.
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty()
            && self.unexpected.is_empty()
            && self.mis_shaped.is_empty()
            && self.wrong_dtype.is_empty()
    }
}

impl std::fmt::Display for KeyMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "checkpoint does not match the SegResNet configuration: {} missing, {} unexpected, \
             {} mis-shaped, {} with a non-float dtype",
            self.missing.len(),
            self.unexpected.len(),
            self.mis_shaped.len(),
            self.wrong_dtype.len()
        )?;
        if !self.missing.is_empty() {
            write!(f, "\n  missing keys: {}", self.missing.join(", "))?;
        }
        if !self.unexpected.is_empty() {
            write!(f, "\n  unexpected keys: {}", self.unexpected.join(", "))?;
        }
        for m in &self.mis_shaped {
            write!(f, "\n  mis-shaped: {} expected {:?}, found {:?}", m.name, m.expected, m.found)?;
        }
        for (k, d) in &self.wrong_dtype {
            write!(f, "\n  non-float dtype: {k} is {d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for KeyMismatch {}

/// Loading, checking or saving network weights failed.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The checkpoint could not be parsed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The keys or shapes do not match the network.
    #[error(transparent)]
    Mismatch(#[from] KeyMismatch),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Writing the output failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Serialising safetensors failed.
    #[error("cannot serialise safetensors: {0}")]
    Serialize(String),
    /// The configuration stored in a weights file is not valid JSON for [`crate::SegResNetConfig`].
    #[error("the SegResNet configuration stored in the weights' metadata is invalid: {0}")]
    StoredConfig(String),
    /// libtorch failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// ONNX export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The weights do not fit the configuration.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// Writing the model or its metadata failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Serialising metadata.json failed.
    #[error("cannot serialise metadata: {0}")]
    Json(#[from] serde_json::Error),
}

/// An input tensor whose shape the network cannot take.
#[derive(Debug, thiserror::Error)]
#[error("invalid input shape: {0}")]
pub struct InputShapeError(pub String);
