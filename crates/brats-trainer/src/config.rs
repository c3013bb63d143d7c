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
    /// Engines jobs may be handed to besides this host (`[cluster.slurm]`,
    /// `[cluster.kubernetes]`): none by default, so only LOCAL jobs run.
    pub cluster: ClusterConfig,
}

/// `[cluster]`: each engine's section enables it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// `[cluster.slurm]`: jobs with backend SLURM become sbatch jobs.
    pub slurm: Option<SlurmConfig>,
    /// `[cluster.kubernetes]`: jobs with backend KUBERNETES become Kubeflow Trainer v2 TrainJobs.
    pub kubernetes: Option<KubernetesConfig>,
}

/// `[cluster.slurm]`: how the trainer submits to Slurm. The service runs `sbatch`, `scontrol`
/// and `scancel` from its PATH (with its environment, e.g. `SLURM_CONF`), so its host must be
/// a Slurm submit host; the nodes must reach the trainer's store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlurmConfig {
    /// Most nodes one job may ask for (StartJob refuses more); default 4.
    pub max_nodes: u32,
    /// `#SBATCH --partition`; empty (the default) = the cluster's default partition.
    pub partition: String,
    /// `#SBATCH --account`; empty (the default) = the submitting user's default.
    pub account: String,
    /// `#SBATCH --time` (e.g. `2-00:00:00`); empty (the default) = the partition's limit.
    pub time_limit: String,
    /// `#SBATCH --cpus-per-task` (one task per node); 0 (the default) = unset.
    pub cpus_per_node: u32,
    /// `#SBATCH --mem` (e.g. `64G`); empty (the default) = unset.
    pub mem_per_node: String,
    /// Further `#SBATCH` options, verbatim (e.g. `["--qos=high"]`); default none.
    pub extra_directives: Vec<String>,
    /// `brats-trainer` on the nodes; default `brats-trainer` (from the nodes' PATH).
    pub worker_exe: String,
    /// `#SBATCH --chdir`, where Slurm writes the job's output (`brats-<job>-<slurm id>.out`);
    /// empty (the default) = the trainer's working directory.
    pub workdir: String,
    /// First rendezvous port on a job's first node; each job takes `master_port + hash(job) %
    /// 1000` so that jobs sharing a node do not collide; default 29500.
    pub master_port: u16,
    /// Seconds the workers wait for every rank (the node launcher's --rdzv-timeout-s); default 300.
    pub rdzv_timeout_s: u64,
    /// Seconds between two `scontrol show job`; default 10.
    pub poll_s: u64,
}

impl Default for SlurmConfig {
    fn default() -> Self {
        SlurmConfig {
            max_nodes: 4,
            partition: String::new(),
            account: String::new(),
            time_limit: String::new(),
            cpus_per_node: 0,
            mem_per_node: String::new(),
            extra_directives: Vec::new(),
            worker_exe: "brats-trainer".into(),
            workdir: String::new(),
            master_port: 29500,
            rdzv_timeout_s: 300,
            poll_s: 10,
        }
    }
}

/// `[cluster.kubernetes]`: how the trainer renders and applies Kubeflow Trainer v2 TrainJobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Most nodes one job may ask for (StartJob refuses more); default 4.
    pub max_nodes: u32,
    /// Namespace of the TrainJobs; default `brats`.
    pub namespace: String,
    /// The trainer image the nodes run; default `brats/trainer:dev`.
    pub image: String,
    /// The ClusterTrainingRuntime the TrainJobs name (deploy/k8s/training/); default `brats-torch`.
    pub runtime: String,
    /// A Secret whose `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` keys the workers get (an
    /// S3 store); empty (the default) = none.
    pub credentials_secret: String,
    /// CPU request and limit of every node (e.g. `"16"`); default `"8"`.
    pub cpu_per_node: String,
    /// Memory request and limit of every node; default `"64Gi"`.
    pub memory_per_node: String,
    /// `api`: apply through the Kubernetes API (in-cluster service account, RBAC of
    /// deploy/k8s/training/trainer-rbac.yaml); `manifests`: only write each TrainJob to the
    /// job's folder and to `manifest_dir`, for teams that deploy through git. Default `api`.
    pub mode: String,
    /// The API server; empty (the default) = in-cluster (`KUBERNETES_SERVICE_HOST`).
    pub api_server: String,
    /// The service account token; default `/var/run/secrets/kubernetes.io/serviceaccount/token`.
    pub token_file: String,
    /// The API server's CA; default `/var/run/secrets/kubernetes.io/serviceaccount/ca.crt`.
    pub ca_file: String,
    /// Where `manifests` mode also writes TrainJobs (a checkout a GitOps tool watches); empty
    /// (the default) = only the job's folder.
    pub manifest_dir: String,
    /// Seconds between two status reads; default 10.
    pub poll_s: u64,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            max_nodes: 4,
            namespace: "brats".into(),
            image: "brats/trainer:dev".into(),
            runtime: "brats-torch".into(),
            credentials_secret: String::new(),
            cpu_per_node: "8".into(),
            memory_per_node: "64Gi".into(),
            mode: "api".into(),
            api_server: String::new(),
            token_file: "/var/run/secrets/kubernetes.io/serviceaccount/token".into(),
            ca_file: "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt".into(),
            manifest_dir: String::new(),
            poll_s: 10,
        }
    }
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
            cluster: ClusterConfig::default(),
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
        if let Some(slurm) = &self.cluster.slurm {
            anyhow::ensure!(slurm.max_nodes >= 1, "cluster.slurm.max_nodes must be at least 1");
            anyhow::ensure!(slurm.poll_s >= 1, "cluster.slurm.poll_s must be at least 1");
        }
        if let Some(k8s) = &self.cluster.kubernetes {
            anyhow::ensure!(k8s.max_nodes >= 1, "cluster.kubernetes.max_nodes must be at least 1");
            anyhow::ensure!(
                matches!(k8s.mode.as_str(), "api" | "manifests"),
                "cluster.kubernetes.mode must be \"api\" or \"manifests\", not {:?}",
                k8s.mode
            );
            anyhow::ensure!(k8s.poll_s >= 1, "cluster.kubernetes.poll_s must be at least 1");
        }
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
