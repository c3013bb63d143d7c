//! Cluster backends: engines the trainer hands a job's workers to when they do not run on its
//! own host — Slurm (an `sbatch` job) and Kubernetes (a Kubeflow Trainer v2 `TrainJob`). The
//! engine only places, signals and restarts the workers; the job's record, events, checkpoints
//! and artefacts stay in the trainer's store, which remains the source of truth. Every node
//! runs `brats-trainer node -- worker …` ([`crate::node`]); rank 0 reports through the store
//! ([`outbox`]), and the service follows the engine's state through [`ClusterBackend::status`].
//!
//! - [`Placement`]: where a job runs and how wide, parsed from `JobSpec.placement` once;
//! - [`ClusterBackend`]: render, submit, status, cancel — [`slurm::Slurm`],
//!   [`kubernetes::Kubernetes`];
//! - [`outbox`]: the workers' reports in the store.

pub mod kubernetes;
pub mod outbox;
pub mod slurm;

use std::future::Future;

use brats_proto::v1 as pb;
use serde::{Deserialize, Serialize};

/// The engine a job's workers run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// Child processes of the trainer, on its host.
    Local,
    /// A Slurm batch job.
    Slurm,
    /// A Kubeflow Trainer v2 TrainJob.
    Kubernetes,
}

impl BackendKind {
    /// The engine's name in messages.
    pub fn title(self) -> &'static str {
        match self {
            BackendKind::Local => "local",
            BackendKind::Slurm => "Slurm",
            BackendKind::Kubernetes => "Kubernetes",
        }
    }
}

/// Where a job runs and how wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The engine.
    pub backend: BackendKind,
    /// Nodes (at least 1).
    pub nodes: u32,
    /// Workers per node; 0 = every GPU of the node (or one CPU rank).
    pub devices_per_node: u32,
}

/// A placement no trainer could run; names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec.placement.{field}: {message}")]
pub struct PlacementError {
    /// The field of `JobSpec.placement`.
    pub field: &'static str,
    /// What is wrong and the fix.
    pub message: String,
}

impl Placement {
    /// Reads `JobSpec.placement` (unset = LOCAL, one node).
    pub fn of(spec: &pb::JobSpec) -> Result<Placement, PlacementError> {
        let Some(p) = &spec.placement else {
            return Ok(Placement { backend: BackendKind::Local, nodes: 1, devices_per_node: 0 });
        };
        let backend = match pb::Backend::try_from(p.backend) {
            Ok(pb::Backend::Unspecified | pb::Backend::Local) => BackendKind::Local,
            Ok(pb::Backend::Slurm) => BackendKind::Slurm,
            Ok(pb::Backend::Kubernetes) => BackendKind::Kubernetes,
            Err(_) => {
                return Err(PlacementError {
                    field: "backend",
                    message: format!("unknown backend {}; use LOCAL, SLURM or KUBERNETES", p.backend),
                });
            }
        };
        let placement = Placement { backend, nodes: p.nodes.max(1), devices_per_node: p.devices_per_node };
        if backend == BackendKind::Local && p.devices_per_node != 0 {
            return Err(PlacementError {
                field: "devices_per_node",
                message: "a LOCAL job runs on spec.devices; leave devices_per_node at 0".into(),
            });
        }
        if placement.devices_per_node > 64 {
            return Err(PlacementError {
                field: "devices_per_node",
                message: format!("{} workers per node is more than 64; check for a typo", placement.devices_per_node),
            });
        }
        Ok(placement)
    }

    /// Whether the workers run on an engine rather than the trainer's host.
    pub fn is_cluster(&self) -> bool {
        self.backend != BackendKind::Local
    }

    /// The node launcher's `--nproc-per-node`: a count, or `gpu` for every GPU of the node.
    pub fn nproc_per_node(&self, cpu: bool) -> String {
        match (cpu, self.devices_per_node) {
            (true, 0) => "cpu".into(),
            (false, 0) => "gpu".into(),
            (_, n) => n.to_string(),
        }
    }
}

/// One submission of a job to an engine: what to run where.
#[derive(Debug, Clone)]
pub struct SubmitRequest {
    /// The job's id.
    pub job_id: String,
    /// The job's folder (config.json, checkpoints/, artifacts/), with a trailing `/`.
    pub job_uri: String,
    /// The preprocessed dataset's manifest.
    pub manifest_uri: String,
    /// This submission's outbox ([`outbox`]), with a trailing `/`.
    pub outbox_uri: String,
    /// Where and how wide.
    pub placement: Placement,
    /// CPU ranks (Gloo) rather than GPUs (NCCL).
    pub cpu: bool,
    /// Environment of every worker that may be written down (in a script, a manifest).
    pub env: Vec<(String, String)>,
    /// Environment that may hold credentials: passed the way the engine keeps secrets, never
    /// written into what is rendered.
    pub secret_env: Vec<(String, String)>,
}

/// The environment of every node of a cluster job: where rank 0 reports ([`outbox`]), the
/// experiment tracking settings, and the store settings. Returns `(env, secret_env)` for
/// [`SubmitRequest`]: on Slurm the store settings (which may hold credentials) travel through
/// `sbatch`'s environment, never the script; on Kubernetes the credentials come from the
/// configured Secret (`AWS_*` variables), so the manifest carries the store settings without them.
/// The trainer service and `brats-trainer render` both build the request's environment here, so
/// what is rendered is what is submitted.
pub fn job_env(
    kind: BackendKind,
    outbox_uri: &str,
    store: &brats_core::StoreConfig,
    tracking: &crate::config::TrackingConfig,
) -> (EnvVars, EnvVars) {
    let tracking = serde_json::to_string(tracking).expect("tracking settings serialise");
    let mut env = vec![(outbox::OUTBOX_ENV.to_string(), outbox_uri.to_string()), (TRACKING_ENV.to_string(), tracking)];
    let mut secret_env = Vec::new();
    if kind == BackendKind::Kubernetes {
        let public = brats_core::StoreConfig {
            s3_access_key_id: None,
            s3_secret_access_key: None,
            s3_secret_access_key_file: None,
            ..store.clone()
        };
        env.push((STORE_ENV.to_string(), serde_json::to_string(&public).expect("store config serialises")));
    } else {
        secret_env.push((STORE_ENV.to_string(), serde_json::to_string(store).expect("store config serialises")));
    }
    (env, secret_env)
}

/// Environment variables, name and value, in order.
pub type EnvVars = Vec<(String, String)>;

/// The variable carrying a worker's store settings (JSON of [`brats_core::StoreConfig`]).
pub const STORE_ENV: &str = "BRATS_TRAINER_STORE";
/// The variable carrying a worker's tracking settings (JSON of [`crate::config::TrackingConfig`]).
pub const TRACKING_ENV: &str = "BRATS_TRAINER_TRACKING";

/// How far a submission got, in the engine's terms mapped to ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for nodes.
    Pending,
    /// The workers run.
    Running,
    /// The engine says every node exited 0.
    Succeeded,
    /// The engine ended it otherwise (failed, cancelled, preempted, timed out, node lost).
    Ended,
}

/// What the engine says about a submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineStatus {
    /// Our reading of it.
    pub phase: Phase,
    /// The engine's own state name (e.g. Slurm's `NODE_FAIL`).
    pub state: String,
    /// The engine's reason, if it gives one.
    pub reason: String,
    /// The engine's exit code (Slurm's `code:signal`), if any.
    pub exit_code: String,
}

impl EngineStatus {
    /// One line for a job's failure reason, e.g. "Slurm job 42 ended NODE_FAIL (reason
    /// NodeDown, exit code 0:9)".
    pub fn describe(&self, engine: &str, id: &str) -> String {
        let mut details = Vec::new();
        if !self.reason.is_empty() && self.reason != "None" {
            details.push(format!("reason {}", self.reason));
        }
        if !self.exit_code.is_empty() && self.exit_code != "0:0" {
            details.push(format!("exit code {}", self.exit_code));
        }
        let details = if details.is_empty() { String::new() } else { format!(" ({})", details.join(", ")) };
        format!("{engine} job {id} ended {}{details}", self.state)
    }
}

/// Why an engine could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The engine's command could not run or failed.
    #[error("{command}: {message}")]
    Command {
        /// The command (e.g. `sbatch`).
        command: String,
        /// Its error output or the OS error.
        message: String,
    },
    /// The engine's API answered with an error.
    #[error("the Kubernetes API answered {status} to {what}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The request.
        what: String,
        /// The API's message.
        message: String,
    },
    /// The engine's answer does not parse.
    #[error("{0}")]
    Unexpected(String),
}

/// An engine the trainer hands jobs to.
pub trait ClusterBackend: Send + Sync {
    /// Which engine.
    fn kind(&self) -> BackendKind;
    /// The most nodes one job may ask for (StartJob refuses more).
    fn max_nodes(&self) -> u32;
    /// Seconds between two status queries.
    fn poll_interval(&self) -> std::time::Duration;
    /// Whether [`ClusterBackend::status`] follows the engine; false when the trainer only
    /// writes manifests for someone else to apply, and so ends the job on its workers' reports.
    fn observes(&self) -> bool {
        true
    }
    /// What would be submitted (an sbatch script, a TrainJob manifest), exactly.
    fn render(&self, request: &SubmitRequest) -> String;
    /// Submits; returns the engine's id of the submission.
    fn submit(&self, request: &SubmitRequest) -> impl Future<Output = Result<String, ClusterError>> + Send;
    /// The submission's state.
    fn status(&self, id: &str) -> impl Future<Output = Result<EngineStatus, ClusterError>> + Send;
    /// Asks the engine to stop the submission (its workers get SIGTERM and checkpoint).
    fn cancel(&self, id: &str) -> impl Future<Output = Result<(), ClusterError>> + Send;
}

/// The engines this trainer is configured for.
#[derive(Debug, Clone, Default)]
pub struct Clusters {
    /// `[cluster.slurm]`.
    pub slurm: Option<slurm::Slurm>,
    /// `[cluster.kubernetes]`.
    pub kubernetes: Option<kubernetes::Kubernetes>,
}

impl Clusters {
    /// The engines of the configuration.
    pub fn new(config: &crate::config::ClusterConfig) -> Self {
        Clusters {
            slurm: config.slurm.clone().map(slurm::Slurm::new),
            kubernetes: config.kubernetes.clone().map(kubernetes::Kubernetes::new),
        }
    }

    /// Checks that `placement` can run here: its engine is configured and gives enough nodes.
    /// The message names the field and the fix (StartJob answers FAILED_PRECONDITION).
    pub fn check(&self, placement: &Placement) -> Result<(), String> {
        let max = match placement.backend {
            BackendKind::Local => 1,
            BackendKind::Slurm => match &self.slurm {
                Some(s) => s.max_nodes(),
                None => return Err(not_configured("SLURM", "[cluster.slurm]")),
            },
            BackendKind::Kubernetes => match &self.kubernetes {
                Some(k) => k.max_nodes(),
                None => return Err(not_configured("KUBERNETES", "[cluster.kubernetes]")),
            },
        };
        if placement.nodes > max {
            let fix = match placement.backend {
                BackendKind::Local => "a LOCAL job runs on this trainer's host; use backend SLURM or KUBERNETES",
                _ => "ask for fewer nodes, or raise max_nodes in the trainer's configuration",
            };
            return Err(format!(
                "spec.placement.nodes: {} nodes asked for, but {} gives at most {max}; {fix}",
                placement.nodes,
                placement.backend.title()
            ));
        }
        Ok(())
    }
}

fn not_configured(backend: &str, section: &str) -> String {
    format!(
        "spec.placement.backend: {backend} is not configured on this trainer (no {section} section); use LOCAL or ask its operator"
    )
}

/// A stable 64-bit hash of a job id (FNV-1a): spreads rendezvous ports, shortens long names.
pub(crate) fn job_hash(job_id: &str) -> u64 {
    job_id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Quotes `s` for a POSIX shell (single quotes).
pub(crate) fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./:=@,+%".contains(&b)) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The worker command line every node runs: `<exe> node --nproc-per-node N [flags] -- worker
/// --job-uri JOB --manifest-uri MANIFEST`.
pub(crate) fn node_command(exe: &str, request: &SubmitRequest, node_flags: &[String]) -> Vec<String> {
    let mut argv =
        vec![exe.to_string(), "node".into(), "--nproc-per-node".into(), request.placement.nproc_per_node(request.cpu)];
    argv.extend(node_flags.iter().cloned());
    argv.extend(
        ["--", "worker", "--job-uri", &request.job_uri, "--manifest-uri", &request.manifest_uri].map(String::from),
    );
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(backend: pb::Backend, nodes: u32, devices_per_node: u32) -> pb::JobSpec {
        pb::JobSpec {
            placement: Some(pb::Placement { backend: backend as i32, nodes, devices_per_node }),
            ..Default::default()
        }
    }

    #[test]
    fn placements_are_checked_against_the_configured_engines() {
        let none = Clusters::default();
        let local = Placement::of(&pb::JobSpec::default()).unwrap();
        assert_eq!((local.backend, local.nodes), (BackendKind::Local, 1));
        assert!(none.check(&local).is_ok());
        let two_local = Placement::of(&spec(pb::Backend::Local, 2, 0)).unwrap();
        let e = none.check(&two_local).unwrap_err();
        assert!(e.contains("spec.placement.nodes") && e.contains("SLURM"), "{e}");
        let slurm = Placement::of(&spec(pb::Backend::Slurm, 3, 1)).unwrap();
        let e = none.check(&slurm).unwrap_err();
        assert!(e.contains("[cluster.slurm]"), "{e}");
        let configured = Clusters::new(&crate::config::ClusterConfig {
            slurm: Some(crate::config::SlurmConfig { max_nodes: 2, ..Default::default() }),
            kubernetes: None,
        });
        let e = configured.check(&slurm).unwrap_err();
        assert!(e.contains("3 nodes") && e.contains("at most 2"), "{e}");
        assert!(configured.check(&Placement::of(&spec(pb::Backend::Slurm, 2, 1)).unwrap()).is_ok());
        assert!(Placement::of(&spec(pb::Backend::Local, 1, 2)).unwrap_err().to_string().contains("devices_per_node"));
        let bad =
            pb::JobSpec { placement: Some(pb::Placement { backend: 9, ..Default::default() }), ..Default::default() };
        assert_eq!(Placement::of(&bad).unwrap_err().field, "backend");
    }

    #[test]
    fn shell_quoting_survives_anything() {
        assert_eq!(shell_quote("file:///a/b-c_d.json"), "file:///a/b-c_d.json");
        assert_eq!(shell_quote("it's $HOME"), r"'it'\''s $HOME'");
        assert_eq!(shell_quote(""), "''");
    }
}
