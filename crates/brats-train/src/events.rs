//! What a job reports while it runs: state changes, step and epoch metrics, checkpoints, the
//! registered model and log lines.
//!
//! Workers print [`EventKind`]s as JSON lines on stdout ([`WorkerLine`]); the service numbers
//! them into [`JobEvent`]s, appends them to `jobs/{id}/events/` (segments) and streams them to
//! watchers as `brats.v1.JobEvent`. The offline CLI consumes the same events in-process.

use std::time::{SystemTime, UNIX_EPOCH};

use brats_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::metric::DiceScores;

/// Lifecycle state of a job (mirrors `brats.v1.JobState`; stored by name in JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    /// Never a real state; the `from` of the creation event.
    Unspecified,
    /// Accepted, waiting for devices.
    Queued,
    /// Devices assigned; data and workers being prepared.
    Preparing,
    /// Training.
    Running,
    /// Finished and exported (terminal).
    Succeeded,
    /// Stopped by an error (terminal, resumable).
    Failed,
    /// Cancellation requested.
    Cancelling,
    /// Cancelled (terminal, resumable).
    Cancelled,
}

impl JobState {
    /// True for SUCCEEDED, FAILED and CANCELLED.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    /// The protobuf enum value.
    pub fn to_proto(self) -> pb::JobState {
        match self {
            JobState::Unspecified => pb::JobState::Unspecified,
            JobState::Queued => pb::JobState::Queued,
            JobState::Preparing => pb::JobState::Preparing,
            JobState::Running => pb::JobState::Running,
            JobState::Succeeded => pb::JobState::Succeeded,
            JobState::Failed => pb::JobState::Failed,
            JobState::Cancelling => pb::JobState::Cancelling,
            JobState::Cancelled => pb::JobState::Cancelled,
        }
    }

    /// From the protobuf enum value (unknown values map to UNSPECIFIED).
    pub fn from_proto(v: i32) -> JobState {
        match pb::JobState::try_from(v).unwrap_or(pb::JobState::Unspecified) {
            pb::JobState::Unspecified => JobState::Unspecified,
            pb::JobState::Queued => JobState::Queued,
            pb::JobState::Preparing => JobState::Preparing,
            pb::JobState::Running => JobState::Running,
            pb::JobState::Succeeded => JobState::Succeeded,
            pb::JobState::Failed => JobState::Failed,
            pb::JobState::Cancelling => JobState::Cancelling,
            pb::JobState::Cancelled => JobState::Cancelled,
        }
    }
}

/// Metrics of one optimiser step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Epoch (1-based).
    pub epoch: u32,
    /// Step within the epoch (1-based).
    pub step: u32,
    /// Steps per epoch.
    pub steps_per_epoch: u32,
    /// Global step (1-based).
    pub global_step: u64,
    /// Loss of the step, averaged over ranks.
    pub loss: f64,
    /// Learning rate of the step.
    pub learning_rate: f64,
    /// Recent throughput, all ranks.
    pub samples_per_second: f64,
    /// Estimated seconds to the end of the job.
    pub eta_seconds: f64,
}

/// Summary of one epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// Epoch (1-based).
    pub epoch: u32,
    /// Mean training loss.
    pub train_loss: f64,
    /// Learning rate used in the epoch.
    pub learning_rate: f64,
    /// Validation Dice, when validated.
    pub validation: Option<DiceScores>,
    /// True when this epoch's mean Dice is the best so far.
    pub is_best: bool,
    /// Seconds of training.
    pub train_seconds: f64,
    /// Seconds of validation (0 when not validated).
    pub validation_seconds: f64,
    /// Throughput over the epoch, all ranks.
    pub samples_per_second: f64,
    /// Estimated seconds to the end of the job.
    pub eta_seconds: f64,
    /// Fraction of the training time the loop waited on the data loader (0..1).
    pub loader_wait_fraction: f64,
}

/// The content of an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// The job changed state.
    StateChanged {
        /// Previous state.
        from: JobState,
        /// New state.
        to: JobState,
        /// Why (FAILED/CANCELLED), else empty.
        #[serde(default)]
        reason: String,
    },
    /// An optimiser step finished.
    Step(StepMetrics),
    /// An epoch finished.
    Epoch(EpochMetrics),
    /// A checkpoint was written.
    Checkpoint {
        /// Epoch (1-based) it was taken after.
        epoch: u32,
        /// Where.
        uri: String,
        /// Best-metric (true) or latest (false).
        best: bool,
        /// Hex SHA-256 of the file.
        sha256: String,
    },
    /// The trained model was registered.
    ModelRegistered {
        /// Registry name.
        name: String,
        /// New version.
        version: String,
        /// The version's folder.
        uri: String,
        /// Aliases now pointing at it.
        aliases: Vec<String>,
    },
    /// A line worth showing a watcher (never patient data).
    Log {
        /// "info", "warn" or "error".
        level: String,
        /// The message.
        message: String,
    },
}

impl EventKind {
    /// An info log event.
    pub fn info(message: impl Into<String>) -> Self {
        EventKind::Log { level: "info".into(), message: message.into() }
    }

    /// A warning log event.
    pub fn warn(message: impl Into<String>) -> Self {
        EventKind::Log { level: "warn".into(), message: message.into() }
    }
}

/// One numbered event of a job, one JSON line in its stored event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    /// 0, 1, 2, … per job.
    pub sequence: u64,
    /// The job.
    pub job_id: String,
    /// Unix time in milliseconds.
    pub time_ms: i64,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Dice scores as the protobuf message.
pub fn dice_to_proto(d: &DiceScores) -> pb::DiceScores {
    pb::DiceScores { tc: d.tc, wt: d.wt, et: d.et, mean: d.mean }
}

impl JobEvent {
    /// The event as `brats.v1.JobEvent`.
    pub fn to_proto(&self) -> pb::JobEvent {
        use pb::job_event::Event;
        let event = match &self.kind {
            EventKind::StateChanged { from, to, reason } => Event::StateChanged(pb::StateChanged {
                from: from.to_proto() as i32,
                to: to.to_proto() as i32,
                reason: reason.clone(),
            }),
            EventKind::Step(s) => Event::Step(pb::StepMetrics {
                epoch: s.epoch,
                step: s.step,
                steps_per_epoch: s.steps_per_epoch,
                global_step: s.global_step,
                loss: s.loss,
                learning_rate: s.learning_rate,
                samples_per_second: s.samples_per_second,
                eta_seconds: s.eta_seconds,
            }),
            EventKind::Epoch(e) => Event::Epoch(pb::EpochMetrics {
                epoch: e.epoch,
                train_loss: e.train_loss,
                learning_rate: e.learning_rate,
                validation: e.validation.as_ref().map(dice_to_proto),
                is_best: e.is_best,
                train_seconds: e.train_seconds,
                validation_seconds: e.validation_seconds,
                samples_per_second: e.samples_per_second,
                eta_seconds: e.eta_seconds,
            }),
            EventKind::Checkpoint { epoch, uri, best, sha256 } => Event::Checkpoint(pb::CheckpointWritten {
                epoch: *epoch,
                uri: uri.clone(),
                best: *best,
                sha256: sha256.clone(),
            }),
            EventKind::ModelRegistered { name, version, uri, aliases } => Event::ModelRegistered(pb::ModelRegistered {
                model: Some(pb::ModelVersionRef { name: name.clone(), version: version.clone() }),
                uri: uri.clone(),
                aliases: aliases.clone(),
            }),
            EventKind::Log { level, message } => {
                Event::Log(pb::JobLog { level: level.clone(), message: message.clone() })
            }
        };
        pb::JobEvent {
            sequence: self.sequence,
            job_id: self.job_id.clone(),
            time: Some(brats_proto::timestamp_from_ms(self.time_ms)),
            event: Some(event),
        }
    }
}

/// One line a worker process prints on stdout for the service: an event, or the final outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerLine {
    /// Something to record and stream.
    Event(EventKind),
    /// Training finished; artefacts are under the job's `artifacts/` folder.
    Finished(TrainOutcome),
}

/// What a finished training run produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOutcome {
    /// Epochs completed.
    pub epochs: u32,
    /// Optimiser steps completed.
    pub global_step: u64,
    /// Best validation Dice, if validated.
    pub best_metrics: Option<DiceScores>,
    /// Epoch of the best Dice (0 when none).
    pub best_epoch: u32,
    /// URI of the exported ONNX model.
    pub onnx_uri: String,
    /// URI of the model's metadata.json.
    pub metadata_uri: String,
    /// The MLflow run the job logged to, when tracking was on.
    #[serde(default)]
    pub mlflow_run_id: Option<String>,
}

/// Prefix that marks a worker's protocol lines on stdout, so stray prints never parse as events.
pub const WORKER_LINE_PREFIX: &str = "@brats-worker ";

impl WorkerLine {
    /// The line to print (prefix + JSON, no newline).
    pub fn encode(&self) -> String {
        format!("{WORKER_LINE_PREFIX}{}", serde_json::to_string(self).expect("worker lines serialise"))
    }

    /// Parses a stdout line; None for lines that are not protocol lines.
    pub fn decode(line: &str) -> Option<WorkerLine> {
        serde_json::from_str(line.strip_prefix(WORKER_LINE_PREFIX)?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_lines_round_trip_and_ignore_noise() {
        let line =
            WorkerLine::Event(EventKind::Checkpoint { epoch: 3, uri: "u".into(), best: true, sha256: "ab".into() });
        assert_eq!(WorkerLine::decode(&line.encode()), Some(line));
        assert_eq!(WorkerLine::decode("{\"event\":{}}"), None);
        assert_eq!(WorkerLine::decode("@brats-worker not json"), None);
    }

    #[test]
    fn stored_events_keep_state_names() {
        let e = JobEvent {
            sequence: 4,
            job_id: "j".into(),
            time_ms: 1_700_000_000_123,
            kind: EventKind::StateChanged { from: JobState::Queued, to: JobState::Preparing, reason: String::new() },
        };
        let s = serde_json::to_string(&e).unwrap();
        assert!(s.contains("\"type\":\"state_changed\"") && s.contains("\"PREPARING\""), "{s}");
        assert_eq!(serde_json::from_str::<JobEvent>(&s).unwrap(), e);
        let p = e.to_proto();
        assert_eq!(p.time.unwrap().nanos, 123_000_000);
    }
}
