//! A training job's configuration: the `brats.v1.JobSpec` with the bundle's defaults filled in
//! and every field checked, so a bad spec is refused at `StartJob` instead of failing mid-epoch.
//!
//! [`TrainConfig`] is what workers run; it is stored as `jobs/{id}/config.json` and never
//! changes for the life of the job (resumes included).

use std::collections::BTreeMap;

use brats_model::SegResNetConfig;

use crate::data::CaseCache;
use brats_proto::v1 as pb;
use serde::{Deserialize, Serialize};

/// A refused spec: which field, and what to do about it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// The spec field, as a dotted path (`hyperparameters.learning_rate`).
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

fn bad<T>(field: &str, message: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError { field: field.to_string(), message: message.into() })
}

/// Where a worker trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    /// The host CPU.
    Cpu,
    /// A CUDA device by index.
    Cuda(usize),
}

impl Device {
    /// Parses "cpu", "cuda:N" or a bare index "N".
    pub fn parse(s: &str) -> Option<Device> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("cpu") {
            return Some(Device::Cpu);
        }
        let idx = s.strip_prefix("cuda:").unwrap_or(s);
        idx.parse::<usize>().ok().filter(|&i| i < 1024).map(Device::Cuda)
    }

    /// The tch device.
    pub fn to_tch(self) -> tch::Device {
        match self {
            Device::Cpu => tch::Device::Cpu,
            Device::Cuda(i) => tch::Device::Cuda(i),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Optimiser choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// torch.optim.Adam, L2 weight decay (the bundle).
    Adam,
    /// torch.optim.AdamW, decoupled weight decay.
    AdamW,
}

/// Learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// CosineAnnealingLR(T_max = epochs), stepped per epoch (the bundle).
    Cosine,
    /// Constant.
    Constant,
    /// Linear warm-up, then cosine decay, stepped per optimiser step (MONAI's
    /// `WarmupCosineSchedule`).
    WarmupCosine {
        /// Warm-up steps; None = 5% of all steps (known once the dataset is open).
        warmup_steps: Option<u32>,
    },
}

/// MONAI DiceLoss settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossConfig {
    /// Numerator smoothing (bundle 0).
    pub smooth_nr: f64,
    /// Denominator smoothing (bundle 1e-5).
    pub smooth_dr: f64,
    /// Squared terms in the denominator (bundle true).
    pub squared_pred: bool,
    /// Sigmoid on the logits (bundle true).
    pub sigmoid: bool,
}

/// Training-time sampling and augmentation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataConfig {
    /// Crop size X, Y, Z.
    pub crop: [usize; 3],
    /// Random (true, the bundle) or centre crop.
    pub random_crop: bool,
    /// Per-axis flip probability (0 = no flips).
    pub flip_prob: f64,
    /// RandScaleIntensity factor range.
    pub intensity_scale: f64,
    /// RandShiftIntensity offset range.
    pub intensity_shift: f64,
    /// Datalist section for training.
    pub train_section: String,
    /// Datalist section for validation.
    pub validation_section: String,
    /// Label convention name: "brats2018", "brats2023" or "brats2015".
    pub label_convention: String,
    /// Loader threads per device (0 = default).
    pub loader_workers: usize,
    /// Step limit per epoch (0 = none).
    pub max_steps_per_epoch: usize,
    /// How workers hold the preprocessed cases (absent in configs written before it: auto).
    #[serde(default)]
    pub case_cache: CaseCache,
}

/// Validation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationConfig {
    /// Validate every this many epochs.
    pub interval_epochs: u32,
    /// Sliding-window roi X, Y, Z.
    pub roi: [usize; 3],
    /// Window overlap in [0, 1).
    pub overlap: f64,
    /// Gaussian (true) or constant blending.
    pub gaussian: bool,
    /// Only the first this many cases (0 = all).
    pub max_cases: usize,
}

/// Registration of the result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistrationConfig {
    /// Registry name.
    pub model_name: String,
    /// Move "production" to the new version.
    pub promote_to_production: bool,
    /// Do not register.
    pub skip: bool,
    /// Stored with the version.
    pub description: String,
}

/// A resolved, validated job configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The datalist JSON.
    pub datalist_uri: String,
    /// Base URI of relative datalist paths (empty = the datalist's folder).
    pub base_uri: String,
    /// Epochs.
    pub epochs: u32,
    /// Samples per step per device.
    pub batch_size: usize,
    /// Optimiser.
    pub optimizer: OptimizerKind,
    /// Initial learning rate.
    pub learning_rate: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// LR schedule.
    pub schedule: Schedule,
    /// Loss.
    pub loss: LossConfig,
    /// Global gradient-norm clip (None = off).
    pub grad_clip_norm: Option<f64>,
    /// Data pipeline.
    pub data: DataConfig,
    /// Validation.
    pub validation: ValidationConfig,
    /// fp16 autocast + gradient scaling on CUDA.
    pub amp: bool,
    /// Devices, one worker each.
    pub devices: Vec<Device>,
    /// Seed of everything random.
    pub seed: u64,
    /// Network.
    pub model: SegResNetConfig,
    /// Registration.
    pub registration: RegistrationConfig,
    /// Checkpoint to continue from (another job's), if any.
    pub resume_from: Option<String>,
    /// Initial weights (fine-tuning), if any.
    pub init_weights_uri: Option<String>,
    /// Latest-checkpoint period in epochs.
    pub checkpoint_interval_epochs: u32,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
}

/// Largest accepted values, far beyond any sane job; they catch typos (an extra zero or three).
const MAX_EPOCHS: u32 = 100_000;
const MAX_BATCH: u32 = 256;
const MAX_EDGE: u32 = 1024;

fn triple(field: &str, v: &[u32], default: [usize; 3]) -> Result<[usize; 3], SpecError> {
    match v.len() {
        0 => Ok(default),
        3 => {
            if let Some(&z) = v.iter().find(|&&x| x == 0 || x > MAX_EDGE) {
                return bad(field, format!("each size must be in 1..={MAX_EDGE}, got {z}"));
            }
            Ok([v[0] as usize, v[1] as usize, v[2] as usize])
        }
        n => bad(field, format!("give 3 sizes (X, Y, Z) or none for the default, got {n}")),
    }
}

/// A proto `float` as the decimal the client wrote (1e-5f32 → 1e-5, not 9.99999974e-6), so
/// values match the f64 constants of the MONAI recipe they stand for.
fn decimal(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(v as f64)
}

fn finite(field: &str, v: f64, lo: f64, hi: f64, hint: &str) -> Result<f64, SpecError> {
    if v.is_finite() && v >= lo && v <= hi { Ok(v) } else { bad(field, format!("{v} is out of range; {hint}")) }
}

/// Parses device names ("cpu", "cuda:0", …); empty means `default`.
pub fn parse_devices(names: &[String], default: &[Device]) -> Result<Vec<Device>, SpecError> {
    if names.is_empty() {
        return Ok(default.to_vec());
    }
    let mut out: Vec<Device> = Vec::new();
    for n in names {
        let Some(d) = Device::parse(n) else {
            return bad("devices", format!("unknown device '{n}': use \"cpu\" or \"cuda:N\""));
        };
        if out.contains(&d) {
            return bad("devices", format!("device '{d}' is listed twice"));
        }
        out.push(d);
    }
    if out.contains(&Device::Cpu) && out.len() > 1 {
        return bad("devices", "\"cpu\" cannot be combined with other devices; use [\"cpu\"] or CUDA devices only");
    }
    Ok(out)
}

/// Resolves a spec: defaults filled in (the bundle's), every field range-checked. `seed` is the
/// seed to use when the spec has none; `default_devices` replaces an empty device list.
pub fn resolve(spec: &pb::JobSpec, seed: u64, default_devices: &[Device]) -> Result<TrainConfig, SpecError> {
    if spec.datalist_uri.trim().is_empty() {
        return bad("datalist_uri", "required: the URI of a MONAI decathlon-style datalist JSON");
    }
    if !spec.resume_from.is_empty() && !spec.init_weights_uri.is_empty() {
        return bad("init_weights_uri", "resume_from and init_weights_uri are mutually exclusive; set only one");
    }
    let hp = spec.hyperparameters.unwrap_or_default();
    let epochs = if hp.epochs == 0 { 300 } else { hp.epochs };
    if epochs > MAX_EPOCHS {
        return bad("hyperparameters.epochs", format!("{epochs} epochs is more than {MAX_EPOCHS}; check for a typo"));
    }
    let batch_size = if hp.batch_size == 0 { 1 } else { hp.batch_size };
    if batch_size > MAX_BATCH {
        return bad("hyperparameters.batch_size", format!("{batch_size} is more than {MAX_BATCH} samples per device"));
    }
    let learning_rate = finite(
        "hyperparameters.learning_rate",
        hp.learning_rate.unwrap_or(1e-4),
        f64::MIN_POSITIVE,
        1.0,
        "use a value in (0, 1], e.g. 1e-4 (the bundle's)",
    )?;
    let weight_decay = finite(
        "hyperparameters.weight_decay",
        hp.weight_decay.unwrap_or(1e-5),
        0.0,
        0.999,
        "use a value in [0, 1), e.g. 1e-5 (the bundle's)",
    )?;
    let grad_clip_norm = match hp.grad_clip_norm {
        None => None,
        Some(0.0) => None,
        Some(v) => {
            Some(finite("hyperparameters.grad_clip_norm", v, f64::MIN_POSITIVE, 1e6, "use a positive norm or 0")?)
        }
    };
    let optimizer = match pb::Optimizer::try_from(hp.optimizer) {
        Ok(pb::Optimizer::Unspecified | pb::Optimizer::Adam) => OptimizerKind::Adam,
        Ok(pb::Optimizer::Adamw) => OptimizerKind::AdamW,
        Err(_) => return bad("hyperparameters.optimizer", format!("unknown optimizer {}", hp.optimizer)),
    };
    let schedule = match pb::LrSchedule::try_from(hp.lr_schedule) {
        Ok(pb::LrSchedule::Unspecified | pb::LrSchedule::Cosine) => Schedule::Cosine,
        Ok(pb::LrSchedule::Constant) => Schedule::Constant,
        Ok(pb::LrSchedule::WarmupCosine) => Schedule::WarmupCosine { warmup_steps: hp.warmup_steps },
        Err(_) => return bad("hyperparameters.lr_schedule", format!("unknown schedule {}", hp.lr_schedule)),
    };
    if hp.warmup_steps.is_some() && !matches!(schedule, Schedule::WarmupCosine { .. }) {
        return bad(
            "hyperparameters.warmup_steps",
            "only LR_SCHEDULE_WARMUP_COSINE warms up; set lr_schedule to it or leave warmup_steps unset",
        );
    }
    let l = hp.loss.unwrap_or_default();
    let loss = LossConfig {
        smooth_nr: finite("hyperparameters.loss.smooth_nr", l.smooth_nr.map_or(0.0, decimal), 0.0, 1e3, "use >= 0")?,
        smooth_dr: finite("hyperparameters.loss.smooth_dr", l.smooth_dr.map_or(1e-5, decimal), 0.0, 1e3, "use >= 0")?,
        squared_pred: l.squared_pred.unwrap_or(true),
        sigmoid: l.sigmoid.unwrap_or(true),
    };

    let model = model_config(spec.model.as_ref())?;
    let multiple = model.spatial_multiple() as usize;

    let d = spec.data.clone().unwrap_or_default();
    let (crop, random_crop) = match &d.crop {
        None => ([224, 224, 144], true),
        Some(c) => {
            let random = match pb::CropMode::try_from(c.mode) {
                Ok(pb::CropMode::Random | pb::CropMode::Unspecified) => true,
                Ok(pb::CropMode::Center) => false,
                _ => return bad("data.crop.mode", "training crops must be RANDOM (the bundle's) or CENTER"),
            };
            (triple("data.crop.size", &c.size, [224, 224, 144])?, random)
        }
    };
    if let Some(a) = crop.iter().find(|&&c| c % multiple != 0) {
        return bad(
            "data.crop.size",
            format!(
                "{a} is not a multiple of {multiple}: SegResNet with {} levels halves the size {} times",
                model.levels(),
                model.levels() - 1
            ),
        );
    }
    let (flip_prob, intensity_scale, intensity_shift) = match &d.augmentation {
        None => (0.5, 0.1, 0.1),
        Some(a) => (
            if a.random_flip {
                if a.flip_prob == 0.0 {
                    0.5
                } else {
                    finite("data.augmentation.flip_prob", a.flip_prob as f64, 0.0, 1.0, "use a probability in [0, 1]")?
                }
            } else {
                0.0
            },
            finite(
                "data.augmentation.intensity_scale",
                a.intensity_scale as f64,
                0.0,
                1.0,
                "use a range in [0, 1], e.g. 0.1",
            )?,
            finite(
                "data.augmentation.intensity_shift",
                a.intensity_shift as f64,
                0.0,
                10.0,
                "use a range in [0, 10], e.g. 0.1",
            )?,
        ),
    };
    let label_convention = match pb::LabelConvention::try_from(d.label_convention) {
        Ok(pb::LabelConvention::Unspecified | pb::LabelConvention::Brats2018) => "brats2018",
        Ok(pb::LabelConvention::Brats2023) => "brats2023",
        Ok(pb::LabelConvention::Brats2015) => "brats2015",
        Err(_) => return bad("data.label_convention", format!("unknown label convention {}", d.label_convention)),
    };
    let case_cache = match pb::CaseCache::try_from(d.case_cache) {
        Ok(pb::CaseCache::Unspecified | pb::CaseCache::Auto) => CaseCache::Auto,
        Ok(pb::CaseCache::Memory) => CaseCache::Memory,
        Ok(pb::CaseCache::Stream) => CaseCache::Stream,
        Err(_) => {
            return bad("data.case_cache", format!("unknown case cache {}: use AUTO, MEMORY or STREAM", d.case_cache));
        }
    };
    if d.loader_workers > 64 {
        return bad("data.loader_workers", format!("{} loader threads is more than 64", d.loader_workers));
    }
    let data = DataConfig {
        crop,
        random_crop,
        flip_prob,
        intensity_scale,
        intensity_shift,
        train_section: if d.train_section.is_empty() { "training".into() } else { d.train_section.clone() },
        validation_section: if d.validation_section.is_empty() {
            "validation".into()
        } else {
            d.validation_section.clone()
        },
        label_convention: label_convention.into(),
        loader_workers: d.loader_workers as usize,
        max_steps_per_epoch: d.max_steps_per_epoch as usize,
        case_cache,
    };
    if data.train_section == data.validation_section {
        return bad("data.validation_section", "must differ from data.train_section (validate on held-out cases)");
    }

    let v = spec.validation.clone().unwrap_or_default();
    let sw = v.sliding_window.unwrap_or_default();
    let roi = triple("validation.sliding_window.roi_size", &sw.roi_size, [240, 240, 160])?;
    if let Some(a) = roi.iter().find(|&&c| c % multiple != 0) {
        return bad("validation.sliding_window.roi_size", format!("{a} is not a multiple of {multiple}"));
    }
    if let Some(axis) = (0..3).find(|&a| crop[a] > roi[a]) {
        return bad(
            "data.crop.size",
            format!(
                "the training crop {crop:?} is larger than the validation roi {roi:?} along axis {axis}; use a crop no larger than the roi"
            ),
        );
    }
    let overlap = finite(
        "validation.sliding_window.overlap",
        sw.overlap.map_or(0.5, decimal),
        0.0,
        0.95,
        "use an overlap in [0, 0.95], e.g. 0.5",
    )?;
    let gaussian = matches!(pb::BlendMode::try_from(sw.blend_mode), Ok(pb::BlendMode::Gaussian));
    let validation = ValidationConfig {
        interval_epochs: if v.interval_epochs == 0 { 1 } else { v.interval_epochs },
        roi,
        overlap,
        gaussian,
        max_cases: v.max_cases as usize,
    };

    let devices = parse_devices(&spec.devices, default_devices)?;
    let r = spec.registration.clone().unwrap_or_default();
    let model_name = if r.model_name.is_empty() {
        brats_artifacts::registry::DEFAULT_MODEL_NAME.to_string()
    } else {
        r.model_name.clone()
    };
    if !model_name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        || model_name.len() > 63
    {
        return bad("registration.model_name", format!("'{model_name}' must match [a-z0-9_-]{{1,63}}"));
    }
    for (k, val) in &spec.labels {
        if k.is_empty() || k.len() > 63 || val.len() > 256 {
            return bad("labels", format!("label '{k}': keys 1..63 characters, values at most 256"));
        }
    }
    Ok(TrainConfig {
        datalist_uri: spec.datalist_uri.trim().to_string(),
        base_uri: spec.base_uri.trim().to_string(),
        epochs,
        batch_size: batch_size as usize,
        optimizer,
        learning_rate,
        weight_decay,
        schedule,
        loss,
        grad_clip_norm,
        data,
        validation,
        amp: spec.amp.unwrap_or(true),
        devices,
        seed: spec.seed.unwrap_or(seed),
        model,
        registration: RegistrationConfig {
            model_name,
            promote_to_production: r.promote_to_production,
            skip: r.skip,
            description: r.description.clone(),
        },
        resume_from: (!spec.resume_from.is_empty()).then(|| spec.resume_from.clone()),
        init_weights_uri: (!spec.init_weights_uri.is_empty()).then(|| spec.init_weights_uri.clone()),
        checkpoint_interval_epochs: if spec.checkpoint_interval_epochs == 0 {
            1
        } else {
            spec.checkpoint_interval_epochs
        },
        labels: spec.labels.clone().into_iter().collect(),
    })
}

/// The network from a `SegResNetSpec` (unset = the bundle's), validated.
pub fn model_config(spec: Option<&pb::SegResNetSpec>) -> Result<SegResNetConfig, SpecError> {
    let mut c = SegResNetConfig::default();
    if let Some(m) = spec {
        if !m.blocks_down.is_empty() {
            c.blocks_down = m.blocks_down.iter().map(|&b| b as usize).collect();
        }
        if !m.blocks_up.is_empty() {
            c.blocks_up = m.blocks_up.iter().map(|&b| b as usize).collect();
        }
        if let Some(f) = m.init_filters {
            c.init_filters = f as i64;
        }
        if let Some(i) = m.in_channels {
            c.in_channels = i as i64;
        }
        if let Some(o) = m.out_channels {
            c.out_channels = o as i64;
        }
        if let Some(p) = m.dropout_prob {
            c.dropout_prob = (p > 0.0).then_some(decimal(p));
        }
    }
    if c.in_channels != 4 || c.out_channels != 3 {
        return bad("model", "BraTS training needs in_channels 4 (T1c, T1, T2, FLAIR) and out_channels 3 (TC, WT, ET)");
    }
    if c.blocks_down.iter().chain(&c.blocks_up).any(|&b| b == 0 || b > 16) || c.init_filters > 128 {
        return bad("model", "blocks must be in 1..=16 per level and init_filters at most 128");
    }
    c.validate().map_err(|e| SpecError { field: "model".into(), message: e.to_string() })?;
    Ok(c)
}

impl TrainConfig {
    /// Loader threads per device: the spec's, else 2 on CPU jobs (leave the cores to libtorch)
    /// and 4 on CUDA.
    pub fn loader_workers(&self) -> usize {
        match self.data.loader_workers {
            0 if self.devices.iter().all(|d| *d == Device::Cpu) => 2,
            0 => 4,
            n => n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> pb::JobSpec {
        pb::JobSpec { datalist_uri: "file:data/datalist.json".into(), ..Default::default() }
    }

    #[test]
    fn defaults_are_the_bundles() {
        let c = resolve(&spec(), 7, &[Device::Cpu]).unwrap();
        assert_eq!((c.epochs, c.batch_size, c.learning_rate, c.weight_decay), (300, 1, 1e-4, 1e-5));
        assert_eq!((c.optimizer, c.schedule), (OptimizerKind::Adam, Schedule::Cosine));
        assert_eq!(c.loss, LossConfig { smooth_nr: 0.0, smooth_dr: 1e-5, squared_pred: true, sigmoid: true });
        assert_eq!(c.data.crop, [224, 224, 144]);
        assert!(c.data.random_crop);
        assert_eq!((c.data.flip_prob, c.data.intensity_scale, c.data.intensity_shift), (0.5, 0.1, 0.1));
        assert_eq!(c.validation.roi, [240, 240, 160]);
        assert_eq!(c.validation.overlap, 0.5);
        assert_eq!(c.seed, 7);
        assert_eq!(c.model, SegResNetConfig::default());
        assert_eq!(c.registration.model_name, "brats_mri_segmentation");
    }

    #[test]
    fn bad_fields_are_named() {
        type Mutation = Box<dyn Fn(&mut pb::JobSpec)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|s| s.datalist_uri.clear()), "datalist_uri"),
            (
                Box::new(|s| {
                    s.hyperparameters = Some(pb::Hyperparameters { learning_rate: Some(50.0), ..Default::default() })
                }),
                "hyperparameters.learning_rate",
            ),
            (
                Box::new(|s| {
                    s.hyperparameters = Some(pb::Hyperparameters { epochs: 10_000_000, ..Default::default() })
                }),
                "hyperparameters.epochs",
            ),
            (
                Box::new(|s| {
                    s.hyperparameters = Some(pb::Hyperparameters { warmup_steps: Some(10), ..Default::default() })
                }),
                "hyperparameters.warmup_steps",
            ),
            (
                Box::new(|s| {
                    s.data = Some(pb::TrainingData {
                        crop: Some(pb::CropSpec {
                            mode: pb::CropMode::Random as i32,
                            size: vec![250, 96, 96],
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                }),
                "data.crop.size",
            ),
            (
                Box::new(|s| {
                    s.data = Some(pb::TrainingData {
                        crop: Some(pb::CropSpec {
                            mode: pb::CropMode::Random as i32,
                            size: vec![60, 64, 64],
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                }),
                "data.crop.size",
            ),
            (Box::new(|s| s.devices = vec!["tpu:0".into()]), "devices"),
            (Box::new(|s| s.devices = vec!["cpu".into(), "cuda:0".into()]), "devices"),
            (
                Box::new(|s| {
                    s.resume_from = "file:a".into();
                    s.init_weights_uri = "file:b".into();
                }),
                "init_weights_uri",
            ),
            (Box::new(|s| s.model = Some(pb::SegResNetSpec { blocks_up: vec![1, 1], ..Default::default() })), "model"),
        ];
        for (mutate, field) in cases {
            let mut s = spec();
            mutate(&mut s);
            let e = resolve(&s, 0, &[Device::Cpu]).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.message.len() > 10, "{e}");
        }
    }

    #[test]
    fn devices_parse() {
        assert_eq!(Device::parse("cuda:3"), Some(Device::Cuda(3)));
        assert_eq!(Device::parse("1"), Some(Device::Cuda(1)));
        assert_eq!(Device::parse("CPU"), Some(Device::Cpu));
        assert_eq!(Device::parse("gpu"), None);
    }
}
