//! Weight files: MONAI checkpoints in (`.pt` or `.safetensors`), checked against the network,
//! and our safetensors out (MONAI's names, loadable by `model.load_state_dict`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use tch::{Kind, Tensor, nn};

use crate::config::SegResNetConfig;
use crate::error::{CheckpointError, KeyMismatch, MisShaped, WeightsError};
use crate::pt;
use crate::tensors::{self, DType, RawTensor, StateDict};

/// safetensors metadata key holding the [`SegResNetConfig`] as JSON.
pub const META_CONFIG: &str = "brats.segresnet_config";
/// safetensors metadata key naming the network.
pub const META_MODEL: &str = "brats.model";
/// safetensors metadata key for free-form training provenance (JSON), when known.
pub const META_TRAINING: &str = "brats.training";

/// A checkpoint as read from disk, before it is checked against a configuration.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The tensors, in file order.
    pub tensors: StateDict,
    /// safetensors `__metadata__` (empty for `.pt`).
    pub metadata: HashMap<String, String>,
    /// `"pt"` or `"safetensors"`.
    pub format: &'static str,
}

/// Reads a checkpoint: a `torch.save` zip (plain state_dict or `{"model": state_dict, …}`)
/// or a safetensors file, told apart by content, not by extension.
///
/// DataParallel's `module.` prefix is removed when every key has it.
pub fn read_checkpoint(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io { path: path.to_path_buf(), source })?;
    parse_checkpoint(&bytes, &path.display().to_string())
}

/// [`read_checkpoint`] on bytes already in memory; `label` names the source in errors.
pub fn parse_checkpoint(bytes: &[u8], label: &str) -> Result<Checkpoint, CheckpointError> {
    let mut ck = if pt::is_zip(bytes) {
        Checkpoint { tensors: pt::read_state_dict(bytes)?, metadata: HashMap::new(), format: "pt" }
    } else if pt::is_legacy_torch(bytes) {
        return Err(CheckpointError::LegacyTorchFormat);
    } else if bytes.len() >= 9 && bytes[8] == b'{' {
        let f = tensors::parse_safetensors(bytes)?;
        Checkpoint { tensors: f.tensors, metadata: f.metadata, format: "safetensors" }
    } else {
        return Err(CheckpointError::UnknownFormat(label.to_string()));
    };
    if !ck.tensors.is_empty() && ck.tensors.keys().all(|k| k.starts_with("module.")) {
        ck.tensors.rename_keys(|k| k.strip_prefix("module.").unwrap_or(k).to_string());
    }
    Ok(ck)
}

/// Compares keys, shapes and dtypes with what `config` requires; lists every difference.
pub fn check_state_dict(config: &SegResNetConfig, sd: &StateDict) -> Result<(), KeyMismatch> {
    let expected: BTreeMap<String, Vec<i64>> = config.parameters().into_iter().map(|p| (p.name, p.shape)).collect();
    let mut m = KeyMismatch::default();
    for (name, shape) in &expected {
        match sd.get(name) {
            None => m.missing.push(name.clone()),
            Some(t) => {
                if &t.shape_i64() != shape {
                    m.mis_shaped.push(MisShaped { name: name.clone(), expected: shape.clone(), found: t.shape_i64() });
                }
                if !t.dtype.is_float() {
                    m.wrong_dtype.push((name.clone(), t.dtype.name().to_string()));
                }
            }
        }
    }
    m.unexpected = sd.keys().filter(|k| !expected.contains_key(*k)).map(str::to_string).collect();
    if m.is_empty() { Ok(()) } else { Err(m) }
}

/// Checks `sd` against `config` and returns it as f32 in the network's parameter order
/// (f32 values are copied bit for bit; f16, bf16 and f64 are converted).
pub fn conform(config: &SegResNetConfig, sd: &StateDict) -> Result<StateDict, WeightsError> {
    config.validate()?;
    check_state_dict(config, sd)?;
    let mut out = StateDict::new();
    for p in config.parameters() {
        let t = sd.get(&p.name).expect("checked above");
        let t = if t.dtype == DType::F32 {
            t.clone()
        } else {
            let v = t.to_f32_vec().expect("float dtype checked above");
            RawTensor::from_f32(&t.shape, &v)
        };
        out.insert(p.name, t);
    }
    Ok(out)
}

/// Reads a MONAI checkpoint and returns its weights checked against `config`.
pub fn import_monai(path: &Path, config: &SegResNetConfig) -> Result<StateDict, WeightsError> {
    let ck = read_checkpoint(path)?;
    conform(config, &ck.tensors)
}

/// Our weight file: safetensors with MONAI's keys, plus the configuration in `__metadata__`
/// (`format=pt` so that `safetensors.torch.load_file` treats it as a PyTorch file).
pub fn weights_to_safetensors(
    sd: &StateDict,
    config: &SegResNetConfig,
    training: Option<&serde_json::Value>,
) -> Result<Vec<u8>, WeightsError> {
    let mut meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (META_MODEL.to_string(), "monai.networks.nets.SegResNet".to_string()),
        (META_CONFIG.to_string(), serde_json::to_string(config).expect("config serialises")),
    ]);
    if let Some(t) = training {
        meta.insert(META_TRAINING.to_string(), t.to_string());
    }
    tensors::serialize_safetensors(sd, &meta)
}

/// Checks `sd` against `config` and writes it to `path` atomically (nothing is written on error).
pub fn save_weights(
    path: &Path,
    sd: &StateDict,
    config: &SegResNetConfig,
    training: Option<&serde_json::Value>,
) -> Result<(), WeightsError> {
    let sd = conform(config, sd)?;
    let bytes = weights_to_safetensors(&sd, config, training)?;
    tensors::write_atomically(path, &bytes).map_err(|source| WeightsError::Write { path: path.to_path_buf(), source })
}

/// Weights loaded from one of our files (or any checkpoint), with their configuration.
#[derive(Debug, Clone)]
pub struct LoadedWeights {
    /// The configuration stored in the file, or the bundle default when none is stored.
    pub config: SegResNetConfig,
    /// The f32 tensors in parameter order.
    pub tensors: StateDict,
    /// Training provenance from the file's metadata, when present.
    pub training: Option<serde_json::Value>,
}

/// Loads weights; the configuration comes from the file's metadata when present.
pub fn load_weights(path: &Path) -> Result<LoadedWeights, WeightsError> {
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io { path: path.to_path_buf(), source })?;
    load_weights_from_bytes(&bytes, &path.display().to_string())
}

/// [`load_weights`] on bytes in memory; `label` names the source in errors.
pub fn load_weights_from_bytes(bytes: &[u8], label: &str) -> Result<LoadedWeights, WeightsError> {
    let ck = parse_checkpoint(bytes, label)?;
    let config = match ck.metadata.get(META_CONFIG) {
        Some(s) => serde_json::from_str(s).map_err(|e| WeightsError::StoredConfig(e.to_string()))?,
        None => SegResNetConfig::default(),
    };
    let training = ck.metadata.get(META_TRAINING).and_then(|s| serde_json::from_str(s).ok());
    let tensors = conform(&config, &ck.tensors)?;
    Ok(LoadedWeights { config, tensors, training })
}

/// Copies checked weights into the variables of a network built in `vs` with `config`.
pub fn load_into_var_store(vs: &nn::VarStore, config: &SegResNetConfig, sd: &StateDict) -> Result<(), WeightsError> {
    let sd = conform(config, sd)?;
    let vars = vs.variables();
    let mut m = KeyMismatch::default();
    for p in config.parameters() {
        if !vars.contains_key(&p.name) {
            m.unexpected.push(p.name.clone());
        }
    }
    if !m.is_empty() {
        return Err(m.into());
    }
    tch::no_grad(|| -> Result<(), WeightsError> {
        for (name, t) in sd.iter() {
            let mut var = vars[name].shallow_clone();
            let v = t.to_f32_vec().expect("conformed to f32");
            let src = Tensor::from_slice(&v).reshape(t.shape_i64()).to_device(var.device()).to_kind(var.kind());
            var.f_copy_(&src)?;
        }
        Ok(())
    })
}

/// Copies a tensor to a CPU f32 [`RawTensor`] (bit-exact for f32 tensors).
pub fn tensor_to_raw(t: &Tensor) -> Result<RawTensor, WeightsError> {
    let t = t.f_to_device(tch::Device::Cpu)?.f_to_kind(Kind::Float)?.f_contiguous()?;
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let n: usize = shape.iter().product();
    let mut v = vec![0f32; n];
    t.f_copy_data(&mut v, n)?;
    Ok(RawTensor::from_f32(&shape, &v))
}

/// The network's current weights as a state_dict in MONAI's order.
pub fn state_dict_from_var_store(vs: &nn::VarStore, config: &SegResNetConfig) -> Result<StateDict, WeightsError> {
    let vars = vs.variables();
    let mut sd = StateDict::new();
    let mut m = KeyMismatch::default();
    for p in config.parameters() {
        match vars.get(&p.name) {
            Some(t) => sd.insert(p.name, tensor_to_raw(t)?),
            None => m.missing.push(p.name),
        }
    }
    if m.is_empty() { Ok(sd) } else { Err(m.into()) }
}

/// Builds the network on `device` and loads `weights` into it (e.g. from [`load_weights`]).
pub fn build_network(
    weights: &LoadedWeights,
    device: tch::Device,
) -> Result<(nn::VarStore, crate::SegResNet), WeightsError> {
    let vs = nn::VarStore::new(device);
    let net = crate::SegResNet::new(&vs.root(), &weights.config)?;
    load_into_var_store(&vs, &weights.config, &weights.tensors)?;
    Ok((vs, net))
}
