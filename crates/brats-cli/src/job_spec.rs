//! Every training flag, defined once: `brats-trainer train` (offline) and `bratsctl train
//! start` (a job on the trainer service) flatten [`JobSpecArgs`] and build their
//! `brats.v1.JobSpec` with [`JobSpecArgs::to_spec`], so the same flags make the same job.

use brats_proto::v1 as pb;
use clap::{Args, ValueEnum};
use serde::{Deserialize, Deserializer};

use crate::parse::{DeviceError, UriError, parse_devices, parse_xyz, to_uri};

/// A training flag whose value cannot become a JobSpec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A datalist or base location that is not a usable URI.
    #[error("{flag}: {source}")]
    Uri {
        /// The flag, e.g. `--datalist`.
        flag: &'static str,
        /// Why.
        #[source]
        source: UriError,
    },
    /// `--devices` names something that is not a device.
    #[error("--devices: {0}")]
    Devices(#[from] DeviceError),
    /// `--model` is not a SegResNet configuration.
    #[error("--model: {0}")]
    Model(String),
}

/// `--lr-schedule`: how the learning rate moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LrScheduleArg {
    /// Cosine decay per epoch (the bundle's).
    Cosine,
    /// The initial rate throughout.
    Constant,
    /// Linear warm-up over --warmup-steps, then cosine, per step (MONAI's WarmupCosineSchedule).
    WarmupCosine,
}

/// `--case-cache`: how workers hold the preprocessed cases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CaseCacheArg {
    /// In memory when they fit, else read from the store for every sample.
    Auto,
    /// Always in memory.
    Memory,
    /// Read from the store for every sample.
    Stream,
}

/// The training flags both training commands take, with one meaning each. An unset flag leaves
/// its JobSpec field unset, so the trainer fills in the MONAI bundle's value (written in each
/// flag's help). Flags that make sense for one command only stay in that command: where
/// output goes and `--resume-from` (a local checkpoint file) for the offline run; the server,
/// registration and idempotency for a service job (which resumes with `train resume JOB`).
#[derive(Debug, Clone, Default, Args)]
pub struct JobSpecArgs {
    /// MONAI decathlon datalist JSON (a path, made an absolute file:// URI, or a URI).
    #[arg(long)]
    pub datalist: String,
    /// Base (folder or URI) that relative datalist paths are resolved against (default: the
    /// datalist's folder).
    #[arg(long, visible_alias = "base-dir")]
    pub base_uri: Option<String>,
    /// Epochs (default 300).
    #[arg(long)]
    pub epochs: Option<u32>,
    /// Samples per step per device (default 1).
    #[arg(long)]
    pub batch_size: Option<u32>,
    /// Initial learning rate (default 1e-4).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning-rate schedule (default cosine, per epoch).
    #[arg(long, value_enum)]
    pub lr_schedule: Option<LrScheduleArg>,
    /// Warm-up steps of --lr-schedule warmup-cosine (default 5% of all steps).
    #[arg(long)]
    pub warmup_steps: Option<u32>,
    /// Random training crop X,Y,Z (default 224,224,144).
    #[arg(long, value_name = "X,Y,Z", value_parser = parse_xyz::<u32>)]
    pub crop: Option<[u32; 3]>,
    /// Validation sliding-window size X,Y,Z (default 240,240,160).
    #[arg(long, value_name = "X,Y,Z", value_parser = parse_xyz::<u32>)]
    pub val_roi: Option<[u32; 3]>,
    /// Validate every N epochs (default 1).
    #[arg(long)]
    pub val_interval: Option<u32>,
    /// Limit steps per epoch (smoke tests; default no limit).
    #[arg(long)]
    pub max_steps_per_epoch: Option<u32>,
    /// How workers hold the preprocessed cases (default auto).
    #[arg(long, value_enum)]
    pub case_cache: Option<CaseCacheArg>,
    /// Loader threads per device (default 2 on CPU, 4 on CUDA).
    #[arg(long)]
    pub loader_workers: Option<u32>,
    /// Devices: cpu, or CUDA devices cuda:0,cuda:1,… (bare indices 0,1,… mean the same);
    /// default every CUDA device of the machine that trains, else cpu.
    #[arg(long, value_name = "cpu|cuda:N,…")]
    pub devices: Option<String>,
    /// Seed of weights, sampling and augmentation (default: the command's; see its help).
    #[arg(long)]
    pub seed: Option<u64>,
    /// SegResNet configuration as JSON with MONAI's names, e.g. '{"init_filters": 8}'
    /// (default the bundle's network).
    #[arg(long)]
    pub model: Option<String>,
    /// Disable mixed precision on CUDA.
    #[arg(long)]
    pub no_amp: bool,
}

impl JobSpecArgs {
    /// The JobSpec these flags describe; the trainer validates it (the same code as StartJob).
    pub fn to_spec(&self) -> Result<pb::JobSpec, SpecError> {
        let uri = |flag: &'static str, s: &str| to_uri(s).map_err(|source| SpecError::Uri { flag, source });
        let mut spec = pb::JobSpec {
            datalist_uri: uri("--datalist", &self.datalist)?,
            base_uri: self.base_uri.as_deref().map(|b| uri("--base-uri", b)).transpose()?.unwrap_or_default(),
            devices: self.devices.as_deref().map(parse_devices).transpose()?.unwrap_or_default(),
            seed: self.seed,
            amp: self.no_amp.then_some(false),
            model: self.model.as_deref().map(model_spec).transpose()?,
            ..Default::default()
        };
        if self.epochs.is_some()
            || self.batch_size.is_some()
            || self.lr.is_some()
            || self.lr_schedule.is_some()
            || self.warmup_steps.is_some()
        {
            spec.hyperparameters = Some(pb::Hyperparameters {
                epochs: self.epochs.unwrap_or(0),
                batch_size: self.batch_size.unwrap_or(0),
                learning_rate: self.lr,
                lr_schedule: match self.lr_schedule {
                    None => pb::LrSchedule::Unspecified,
                    Some(LrScheduleArg::Cosine) => pb::LrSchedule::Cosine,
                    Some(LrScheduleArg::Constant) => pb::LrSchedule::Constant,
                    Some(LrScheduleArg::WarmupCosine) => pb::LrSchedule::WarmupCosine,
                } as i32,
                warmup_steps: self.warmup_steps,
                ..Default::default()
            });
        }
        if self.crop.is_some()
            || self.case_cache.is_some()
            || self.loader_workers.is_some()
            || self.max_steps_per_epoch.is_some()
        {
            spec.data = Some(pb::TrainingData {
                crop: self.crop.map(|c| pb::CropSpec {
                    mode: pb::CropMode::Random as i32,
                    size: c.to_vec(),
                    ..Default::default()
                }),
                loader_workers: self.loader_workers.unwrap_or(0),
                max_steps_per_epoch: self.max_steps_per_epoch.unwrap_or(0),
                case_cache: match self.case_cache {
                    None => pb::CaseCache::Unspecified,
                    Some(CaseCacheArg::Auto) => pb::CaseCache::Auto,
                    Some(CaseCacheArg::Memory) => pb::CaseCache::Memory,
                    Some(CaseCacheArg::Stream) => pb::CaseCache::Stream,
                } as i32,
                ..Default::default()
            });
        }
        if self.val_roi.is_some() || self.val_interval.is_some() {
            spec.validation = Some(pb::ValidationSpec {
                interval_epochs: self.val_interval.unwrap_or(0),
                sliding_window: self
                    .val_roi
                    .map(|r| pb::SlidingWindowSpec { roi_size: r.to_vec(), ..Default::default() }),
                max_cases: 0,
            });
        }
        Ok(spec)
    }
}

/// `--model`'s JSON: MONAI's `SegResNet` argument names. The fields a JobSpec cannot carry are
/// accepted (MONAI's own configs parse as they are) only with the values the trainer builds.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelJson {
    spatial_dims: Option<u32>,
    blocks_down: Option<Vec<u32>>,
    blocks_up: Option<Vec<u32>>,
    init_filters: Option<u32>,
    in_channels: Option<u32>,
    out_channels: Option<u32>,
    /// Absent: the bundle's 0.2; `null`: no dropout layer (MONAI's `None`).
    #[serde(default, deserialize_with = "present")]
    dropout_prob: Option<Option<f64>>,
    num_groups: Option<u32>,
    norm_eps: Option<f64>,
}

/// Tells a key given as `null` (`Some(None)`) from an absent one (`None`, via `default`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<f64>>, D::Error> {
    Option::<f64>::deserialize(d).map(Some)
}

fn model_spec(json: &str) -> Result<pb::SegResNetSpec, SpecError> {
    let m: ModelJson = serde_json::from_str(json).map_err(|e| SpecError::Model(e.to_string()))?;
    let fixed = [
        ("spatial_dims", m.spatial_dims.is_some_and(|d| d != 3), "3"),
        ("num_groups", m.num_groups.is_some_and(|g| g != 8), "8"),
        ("norm_eps", m.norm_eps.is_some_and(|e| e != 1e-5), "1e-5"),
    ];
    if let Some((name, _, only)) = fixed.iter().find(|(_, differs, _)| *differs) {
        return Err(SpecError::Model(format!("{name} can only be {only} for BraTS training")));
    }
    Ok(pb::SegResNetSpec {
        blocks_down: m.blocks_down.unwrap_or_default(),
        blocks_up: m.blocks_up.unwrap_or_default(),
        init_filters: m.init_filters,
        in_channels: m.in_channels,
        out_channels: m.out_channels,
        dropout_prob: m.dropout_prob.map(|p| p.unwrap_or(0.0) as f32),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// Two commands built as the real ones are: the shared flags flattened beside their own.
    #[derive(Parser)]
    struct Offline {
        #[command(flatten)]
        job: JobSpecArgs,
        #[arg(long)]
        out: String,
    }
    #[derive(Parser)]
    struct Remote {
        #[arg(long, default_value = "http://127.0.0.1:50053")]
        server: String,
        #[command(flatten)]
        job: JobSpecArgs,
        #[arg(long)]
        promote: bool,
    }

    fn offline(flags: &[&str]) -> pb::JobSpec {
        let args = [&["train", "--out", "o"], flags].concat();
        Offline::try_parse_from(args).unwrap().job.to_spec().unwrap()
    }
    fn remote(flags: &[&str]) -> pb::JobSpec {
        let args = [&["start", "--promote"], flags].concat();
        Remote::try_parse_from(args).unwrap().job.to_spec().unwrap()
    }

    const EVERY_FLAG: &[&str] = &[
        "--datalist",
        "s3://b/datalist.json",
        "--base-uri",
        "s3://b/data",
        "--epochs",
        "7",
        "--batch-size",
        "2",
        "--lr",
        "0.005",
        "--lr-schedule",
        "warmup-cosine",
        "--warmup-steps",
        "4",
        "--crop",
        "32,48,16",
        "--val-roi",
        "64,64,32",
        "--val-interval",
        "3",
        "--max-steps-per-epoch",
        "5",
        "--case-cache",
        "stream",
        "--loader-workers",
        "6",
        "--devices",
        "cuda:0,1",
        "--seed",
        "9",
        "--model",
        r#"{"init_filters": 8, "blocks_down": [1,1,1], "blocks_up": [1,1], "dropout_prob": null}"#,
        "--no-amp",
    ];

    #[test]
    fn every_flag_lands_in_its_field() {
        let s = offline(EVERY_FLAG);
        assert_eq!(s.datalist_uri, "s3://b/datalist.json");
        assert_eq!(s.base_uri, "s3://b/data");
        let hp = s.hyperparameters.unwrap();
        assert_eq!((hp.epochs, hp.batch_size, hp.learning_rate, hp.warmup_steps), (7, 2, Some(0.005), Some(4)));
        assert_eq!(hp.lr_schedule, pb::LrSchedule::WarmupCosine as i32);
        let d = s.data.unwrap();
        let crop = d.crop.unwrap();
        assert_eq!((crop.mode, crop.size), (pb::CropMode::Random as i32, vec![32, 48, 16]));
        assert_eq!((d.max_steps_per_epoch, d.loader_workers), (5, 6));
        assert_eq!(d.case_cache, pb::CaseCache::Stream as i32);
        let v = s.validation.unwrap();
        assert_eq!((v.interval_epochs, v.sliding_window.unwrap().roi_size), (3, vec![64, 64, 32]));
        assert_eq!(s.devices, ["cuda:0", "cuda:1"]);
        assert_eq!((s.seed, s.amp), (Some(9), Some(false)));
        let m = s.model.unwrap();
        assert_eq!((m.blocks_down, m.blocks_up, m.init_filters), (vec![1, 1, 1], vec![1, 1], Some(8)));
        assert_eq!(m.dropout_prob, Some(0.0), "null means no dropout");
        assert_eq!((s.resume_from.as_str(), s.registration), ("", None), "not a shared flag");
    }

    #[test]
    fn both_commands_make_the_same_spec_from_the_same_flags() {
        assert_eq!(offline(EVERY_FLAG), remote(EVERY_FLAG));
        let few = ["--datalist", "data/datalist.json", "--base-dir", "data", "--devices", "cpu", "--lr", "1e-3"];
        assert_eq!(offline(&few), remote(&few));
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(offline(&few).base_uri, format!("file://{}/data", cwd.display()), "--base-dir is --base-uri");
    }

    #[test]
    fn unset_flags_leave_the_bundles_defaults() {
        let s = remote(&["--datalist", "/d.json"]);
        assert_eq!(
            s,
            pb::JobSpec { datalist_uri: "file:///d.json".into(), ..Default::default() },
            "nothing but the datalist"
        );
        let m = offline(&["--datalist", "/d.json", "--model", r#"{"init_filters": 8}"#]).model.unwrap();
        assert_eq!((m.init_filters, m.dropout_prob, m.blocks_down.len()), (Some(8), None, 0));
    }

    #[test]
    fn bad_values_name_their_flag() {
        assert!(Offline::try_parse_from(["t", "--out", "o", "--datalist", "d", "--crop", "1,2"]).is_err());
        assert!(Remote::try_parse_from(["s", "--datalist", "d", "--lr-schedule", "linear"]).is_err());
        let with = |flag: &str, v: &str| {
            let a = JobSpecArgs { datalist: "/d.json".into(), ..Default::default() };
            let a = match flag {
                "--devices" => JobSpecArgs { devices: Some(v.into()), ..a },
                _ => JobSpecArgs { model: Some(v.into()), ..a },
            };
            a.to_spec().unwrap_err().to_string()
        };
        assert!(with("--devices", "gpu0").starts_with("--devices: unknown device 'gpu0'"));
        assert!(with("--model", r#"{"init_filter": 8}"#).starts_with("--model: unknown field `init_filter`"));
        assert_eq!(with("--model", r#"{"num_groups": 4}"#), "--model: num_groups can only be 8 for BraTS training");
        let bundle_fixed = r#"{"num_groups": 8, "spatial_dims": 3, "norm_eps": 1e-5}"#;
        assert!(offline(&["--datalist", "/d.json", "--model", bundle_fixed]).model.is_some());
    }
}
