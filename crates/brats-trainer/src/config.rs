//! Configuration of `brats-trainer serve`: a TOML file, then `BRATS_TRAINER_*` environment
//! overrides (nested keys with `__`), then flags. Every default is documented on its field.

use brats_core::StoreConfig;
use brats_service::ServerConfig;
use serde::{Deserialize, Serialize};

/// Environment prefix of overrides.
pub const ENV_PREFIX: &str = "BRATS_TRAINER_";

/// Everything the trainer service can be told.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainerConfig {
    /// Where the gRPC server listens and how it stops (`[server]`, shared by every service):
    /// default listen `127.0.0.1:50053`, metrics `127.0.0.1:9466` (empty disables them), shutdown grace 60 s.
    pub server: ServerConfig,
    /// Root of the trainer's store: jobs live under `<store_root>/jobs/<id>/`, preprocessed
    /// datasets under `<store_root>/datasets/` and `<store_root>/cases/`; default `file:data`.
    pub store_root: String,
    /// Model registry root that successful jobs register into; default `file:data/models`.
    pub registry: String,
    /// Address of a preprocessing service (e.g. `http://preprocess:50051`) that datasets are
    /// preprocessed by (it must reach `store_root`); empty (the default) = the same code in-process.
    pub preprocess_endpoint: String,
    /// Jobs that may train on the CPU at once (the CPU counts as one device); default 1.
    pub cpu_slots: usize,
    /// Jobs that may wait in QUEUED before StartJob/ResumeJob answer RESOURCE_EXHAUSTED; default 16.
    pub max_queue: usize,
    /// Seconds a cancelled worker gets to stop at a step boundary before it is killed; default 30.
    pub cancel_grace_s: u64,
    /// The worker executable (`<exe> worker --job-uri … --manifest-uri …`); empty (the default) =
    /// this binary.
    pub worker_exe: String,
    /// S3 settings (`AWS_*` variables apply when unset); handed to workers as well.
    pub store: StoreConfig,
    /// Experiment tracking of every job (`[tracking]`): off by default.
    pub tracking: TrackingConfig,
}

/// `[tracking]`: where every job reports besides `metrics.csv`; handed to the workers as
/// `BRATS_TRAINER_TRACKING`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrackingConfig {
    /// Write TensorBoard event files to `jobs/<id>/artifacts/tensorboard/`; default false.
    pub tensorboard: bool,
    /// An MLflow tracking server (`http://mlflow:5000`); empty (the default) = off. Credentials
    /// come from `MLFLOW_TRACKING_TOKEN` or `MLFLOW_TRACKING_USERNAME`/`PASSWORD` in the
    /// service's environment, which its workers inherit.
    pub mlflow_uri: String,
    /// The MLflow experiment; empty = `brats-segresnet`.
    pub mlflow_experiment: String,
}

impl TrackingConfig {
    /// The library's settings.
    pub fn to_tracking(&self) -> brats_train::train::Tracking {
        let uri = self.mlflow_uri.trim();
        let experiment = match self.mlflow_experiment.trim() {
            "" => brats_tracking::mlflow::DEFAULT_EXPERIMENT.to_string(),
            e => e.to_string(),
        };
        brats_train::train::Tracking {
            tensorboard: self.tensorboard,
            mlflow: (!uri.is_empty())
                .then(|| brats_tracking::mlflow::MlflowSettings { uri: uri.to_string(), experiment }),
        }
    }
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            server: ServerConfig::new("127.0.0.1:50053", "127.0.0.1:9466", 60),
            store_root: "file:data".into(),
            registry: "file:data/models".into(),
            preprocess_endpoint: String::new(),
            cpu_slots: 1,
            max_queue: 16,
            cancel_grace_s: 30,
            worker_exe: String::new(),
            store: StoreConfig::default(),
            tracking: TrackingConfig::default(),
        }
    }
}

impl TrainerConfig {
    /// Loads the file (when given), then applies environment overrides. (`BRATS_TRAINER_STORE`
    /// and `BRATS_TRAINER_DEVICE` are what the service hands its workers; a service is never
    /// started from a worker's environment.)
    pub fn load(path: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let cfg = brats_service::load_config(TrainerConfig::default(), path, ENV_PREFIX)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values no operator could mean.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.cpu_slots >= 1, "cpu_slots must be at least 1");
        anyhow::ensure!(!self.store_root.trim().is_empty(), "store_root must not be empty");
        anyhow::ensure!(!self.registry.trim().is_empty(), "registry must not be empty");
        brats_core::StoreUri::parse(&self.store_root).map_err(|e| anyhow::anyhow!("store_root: {e}"))?;
        brats_core::StoreUri::parse(&self.registry).map_err(|e| anyhow::anyhow!("registry: {e}"))?;
        if !self.tracking.mlflow_uri.trim().is_empty() {
            brats_tracking::mlflow::Client::new(&self.tracking.mlflow_uri)
                .map_err(|e| anyhow::anyhow!("tracking.mlflow_uri: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_parses_and_typos_are_refused() {
        let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/trainer.toml");
        let cfg = TrainerConfig::load(Some(&shipped)).unwrap();
        assert_eq!(cfg.server.listen, "0.0.0.0:50053");
        assert_eq!(cfg.cpu_slots, 1);
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "cpu_slot = 2\n").unwrap();
        assert!(TrainerConfig::load(Some(&bad)).is_err());
        std::fs::write(&bad, "cpu_slots = 0\n").unwrap();
        assert!(TrainerConfig::load(Some(&bad)).unwrap_err().to_string().contains("cpu_slots"));
    }
}
