//! Experiment tracking of a run (rank 0): the events a run emits become TensorBoard scalars
//! in `<artifacts>/tensorboard/` and MLflow metrics, the resolved configuration MLflow
//! parameters, and the final artefacts MLflow artefacts. Step scalars (`loss`, `lr`,
//! `throughput`) are at the global step, epoch scalars (`epoch/loss`, `dice/tc`, `dice/wt`,
//! `dice/et`, `dice/mean`, `loader_wait`) at the epoch, as MONAI's handlers log them.
//!
//! Tracking never fails a run: a TensorBoard write error turns TensorBoard off with a warning,
//! an MLflow outage is retried in the background ([`brats_tracking::mlflow::RunLogger`]).
//! The MLflow run id is kept in `<checkpoints>/mlflow-run.json`, so a resumed job continues
//! the same run.

use super::{RunEnv, TrainError};
use crate::events::{EventKind, TrainOutcome};
use crate::spec::TrainConfig;
use brats_core::StoreUri;
use brats_tracking::mlflow::{MlflowSettings, RunLogger, RunStart, RunStatus};
use brats_tracking::tensorboard::EventWriter;
use std::path::PathBuf;
use std::time::Duration;
use tracing::warn;

/// What a run reports to besides `metrics.csv` (off by default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tracking {
    /// Write TensorBoard event files to `<artifacts>/tensorboard/`.
    pub tensorboard: bool,
    /// Log to this MLflow tracking server.
    pub mlflow: Option<MlflowSettings>,
}

/// How long the end of a run waits for MLflow to take what is queued:
/// `BRATS_MLFLOW_FLUSH_S` seconds, default 30.
fn mlflow_flush() -> Duration {
    let seconds = std::env::var("BRATS_MLFLOW_FLUSH_S").ok().and_then(|v| v.trim().parse::<u64>().ok());
    Duration::from_secs(seconds.unwrap_or(30))
}

/// The event files: written locally, copied to the store when the artefacts are not local.
struct TensorBoard {
    writer: EventWriter,
    /// Set when the artefacts are in an object store: the copy's location.
    mirror: Option<StoreUri>,
    /// Keeps the local folder of a mirrored file alive.
    _scratch: Option<tempfile::TempDir>,
}

/// Tracks one run on rank 0.
pub(crate) struct Tracker {
    tensorboard: Option<TensorBoard>,
    mlflow: Option<RunLogger>,
    mlflow_record: StoreUri,
    /// The run id written to `mlflow_record`.
    recorded_run: Option<String>,
}

impl Tracker {
    /// Starts what `env.tracking` asks for; failures to start are warnings.
    pub(crate) fn start(config: &TrainConfig, env: &RunEnv) -> Tracker {
        let mut tracker = Tracker {
            tensorboard: None,
            mlflow: None,
            mlflow_record: env.checkpoints.join("mlflow-run.json"),
            recorded_run: None,
        };
        if env.tracking.tensorboard {
            match open_tensorboard(env) {
                Ok(tb) => tracker.tensorboard = Some(tb),
                Err(e) => warn!(error = %e, "TensorBoard event file not created; TensorBoard logging is off"),
            }
        }
        if let Some(settings) = &env.tracking.mlflow {
            let resume_run_id = env
                .get(&tracker.mlflow_record)
                .ok()
                .flatten()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["run_id"].as_str().map(String::from));
            tracker.recorded_run.clone_from(&resume_run_id);
            let start = RunStart {
                settings: settings.clone(),
                run_name: env.run_name.clone(),
                params: params_of(config),
                tags: vec![
                    ("brats.run_name".into(), env.run_name.clone()),
                    ("brats.world_size".into(), env.world_size().to_string()),
                    ("brats.device".into(), env.device.to_string()),
                    ("mlflow.source.name".into(), "brats-trainer".into()),
                ],
                resume_run_id,
            };
            match RunLogger::start(&env.runtime, start) {
                Ok(logger) => tracker.mlflow = Some(logger),
                Err(e) => warn!(error = %e, "MLflow logging is off"),
            }
        }
        tracker
    }

    /// Records one event.
    pub(crate) fn on_event(&mut self, env: &RunEnv, event: &EventKind) {
        let (step, scalars): (u64, Vec<(&str, f64)>) = match event {
            EventKind::Step(s) => {
                (s.global_step, vec![("loss", s.loss), ("lr", s.learning_rate), ("throughput", s.samples_per_second)])
            }
            EventKind::Epoch(m) => {
                let mut v = vec![
                    ("epoch/loss", m.train_loss),
                    ("epoch/lr", m.learning_rate),
                    ("epoch/throughput", m.samples_per_second),
                    ("loader_wait", m.loader_wait_fraction),
                ];
                if let Some(d) = m.validation {
                    v.extend([("dice/tc", d.tc), ("dice/wt", d.wt), ("dice/et", d.et), ("dice/mean", d.mean)]);
                }
                (u64::from(m.epoch), v)
            }
            _ => return,
        };
        if let Some(tb) = &mut self.tensorboard {
            let written = tb.writer.add_scalars(step, &scalars);
            if let Err(e) = written {
                warn!(error = %e, "TensorBoard event not written; TensorBoard logging is off");
                self.tensorboard = None;
            } else if matches!(event, EventKind::Epoch(_)) {
                mirror(env, tb);
            }
        }
        if let Some(logger) = &self.mlflow {
            logger.log(step, &scalars);
            self.remember_run(env);
        }
    }

    /// Keeps the run id beside the checkpoints once the server has created the run.
    fn remember_run(&mut self, env: &RunEnv) {
        if let Some(id) = self.mlflow.as_ref().and_then(RunLogger::run_id) {
            self.record_run(env, id);
        }
    }

    fn record_run(&mut self, env: &RunEnv, id: String) {
        if self.recorded_run.as_ref() == Some(&id) {
            return;
        }
        let record = serde_json::to_vec(&serde_json::json!({ "run_id": id })).expect("serialises");
        match env.put(&self.mlflow_record, record) {
            Ok(()) => self.recorded_run = Some(id),
            Err(e) => warn!(error = %e, "MLflow run id not recorded beside the checkpoints"),
        }
    }

    /// Ends tracking: the last event-file copy, the artefacts to MLflow, the run's status. Returns
    /// the MLflow run id.
    pub(crate) fn finish(mut self, env: &RunEnv, result: &Result<TrainOutcome, TrainError>) -> Option<String> {
        if let Some(tb) = &self.tensorboard {
            mirror(env, tb);
        }
        self.remember_run(env);
        let logger = self.mlflow.take()?;
        let status = match result {
            Ok(_) => {
                for (file, path) in [
                    ("best.safetensors", "model/best.safetensors"),
                    ("model.onnx", "model/model.onnx"),
                    ("metadata.json", "model/metadata.json"),
                    ("metrics.csv", "metrics.csv"),
                    ("curves.png", "curves.png"),
                ] {
                    if let Ok(Some(bytes)) = env.get(&env.artifacts.join(file)) {
                        logger.artifact(path, bytes.to_vec());
                    }
                }
                RunStatus::Finished
            }
            Err(TrainError::Cancelled) => RunStatus::Killed,
            Err(_) => RunStatus::Failed,
        };
        let report = logger.finish(status, mlflow_flush());
        if let Some(id) = &report.run_id {
            self.record_run(env, id.clone());
        }
        if report.last_error.is_some() || report.metrics_dropped > 0 || report.artifacts_dropped > 0 {
            warn!(
                run_id = ?report.run_id,
                metrics_sent = report.metrics_sent,
                metrics_dropped = report.metrics_dropped,
                artifacts_dropped = report.artifacts_dropped,
                error = ?report.last_error,
                "MLflow did not take everything; the run's artefacts and metrics.csv are complete in the store"
            );
        }
        report.run_id
    }
}

fn open_tensorboard(env: &RunEnv) -> std::io::Result<TensorBoard> {
    let dir = env.artifacts.join("tensorboard");
    match &dir {
        StoreUri::File(path) => Ok(TensorBoard { writer: EventWriter::create(path)?, mirror: None, _scratch: None }),
        StoreUri::S3 { .. } => {
            let scratch = tempfile::tempdir()?;
            let writer = EventWriter::create(scratch.path())?;
            let name = writer.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            Ok(TensorBoard { writer, mirror: Some(dir.join(&name)), _scratch: Some(scratch) })
        }
    }
}

/// Copies the event file to the store (artefacts in S3).
fn mirror(env: &RunEnv, tb: &TensorBoard) {
    let Some(target) = &tb.mirror else { return };
    let local: PathBuf = tb.writer.path().to_path_buf();
    match std::fs::read(&local) {
        Ok(bytes) => {
            if let Err(e) = env.put(target, bytes) {
                warn!(error = %e, "TensorBoard event file not copied to the store");
            }
        }
        Err(e) => warn!(error = %e, "TensorBoard event file not readable"),
    }
}

/// The resolved configuration as flat `a.b.c` parameters.
fn params_of(config: &TrainConfig) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let value = serde_json::to_value(config).unwrap_or_default();
    flatten("", &value, &mut out);
    out
}

fn flatten(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match value {
        serde_json::Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        serde_json::Value::String(s) => out.push((prefix.to_string(), s.clone())),
        v => out.push((prefix.to_string(), v.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_configuration_becomes_dotted_parameters() {
        let mut out = Vec::new();
        flatten("", &serde_json::json!({"a": {"b": 1, "c": [1, 2]}, "d": "x", "e": null}), &mut out);
        assert_eq!(
            out,
            vec![
                ("a.b".to_string(), "1".to_string()),
                ("a.c".into(), "[1,2]".into()),
                ("d".into(), "x".into()),
                ("e".into(), "null".into())
            ]
        );
    }
}
