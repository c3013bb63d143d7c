//! A job's record ([`JobRecord`], stored as `jobs/<id>/job.json`): what the trainer knows about
//! a job, kept up to date by applying its events, and the job id rules.

use base64::Engine;
use brats_proto::v1 as pb;
use prost::Message;
use serde::{Deserialize, Serialize};

use brats_proto::timestamp_from_ms as timestamp;
use brats_train::events::{EventKind, JobEvent, JobState, dice_to_proto};
use brats_train::metric::DiceScores;
use brats_train::spec::{Device, TrainConfig};

/// A registered model version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    /// Registry name.
    pub name: String,
    /// Version.
    pub version: String,
}

/// The tenant of jobs started without one (in-process, or before tenants existed).
pub(crate) const DEFAULT_TENANT: &str = "default";

fn default_tenant() -> String {
    DEFAULT_TENANT.to_string()
}

/// Everything the trainer knows about a job; stored as `jobs/<id>/job.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Job id (`job-YYYYMMDD-xxxxxx` or client-chosen `[a-z0-9-]{1,63}`).
    pub id: String,
    /// The spec as submitted (protobuf bytes, base64, in JSON: the proto is the schema).
    #[serde(with = "spec_codec")]
    pub spec: pb::JobSpec,
    /// Current state.
    pub state: JobState,
    /// Why the job FAILED (or was CANCELLED with a reason).
    #[serde(default)]
    pub failure_reason: String,
    /// gRPC code name of the failure.
    #[serde(default)]
    pub failure_code: String,
    /// Epochs completed.
    #[serde(default)]
    pub epoch: u32,
    /// Total epochs.
    pub total_epochs: u32,
    /// Optimiser steps completed.
    #[serde(default)]
    pub global_step: u64,
    /// Best validation Dice so far.
    #[serde(default)]
    pub best_metrics: Option<DiceScores>,
    /// Epoch of the best Dice (0 before the first validation).
    #[serde(default)]
    pub best_epoch: u32,
    /// Creation time, Unix ms.
    pub created_ms: i64,
    /// When the job last entered QUEUED (the scheduler's FIFO order), Unix ms.
    #[serde(default)]
    pub queued_ms: i64,
    /// First entry into PREPARING, Unix ms.
    #[serde(default)]
    pub started_ms: Option<i64>,
    /// Reaching a terminal state, Unix ms.
    #[serde(default)]
    pub finished_ms: Option<i64>,
    /// Latest checkpoint.
    #[serde(default)]
    pub latest_checkpoint_uri: String,
    /// Best-metric checkpoint.
    #[serde(default)]
    pub best_checkpoint_uri: String,
    /// The registered model, after success.
    #[serde(default)]
    pub registered_model: Option<ModelRef>,
    /// Seed used (the spec's or the drawn one).
    pub seed: u64,
    /// The tenant of the caller that started it; callers of other tenants cannot see it.
    /// Records from before tenants existed belong to `default`.
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// Who started it (the caller's subject; empty when started in-process).
    #[serde(default)]
    pub owner: String,
    /// Devices the job runs on (resolved at creation: an empty spec list means every CUDA
    /// device the trainer had then, or the CPU).
    pub devices: Vec<Device>,
    /// Sequence number of the last event.
    #[serde(default)]
    pub last_sequence: u64,
    /// Times resumed (ResumeJob, or a restart of the trainer while it ran).
    #[serde(default)]
    pub resume_count: u32,
    /// The job's folder, with a trailing `/`.
    pub job_uri: String,
    /// Recent throughput (meaningful while RUNNING).
    #[serde(default)]
    pub samples_per_second: f64,
    /// Estimated seconds left (meaningful while RUNNING).
    #[serde(default)]
    pub eta_seconds: f64,
    /// The StartJob request id, if one was given.
    #[serde(default)]
    pub request_id: String,
    /// The preprocessed dataset's manifest, once prepared.
    #[serde(default)]
    pub manifest_uri: String,
    /// The job's latest submission to a cluster engine (Slurm, Kubernetes); None for LOCAL
    /// jobs and before the first submission.
    #[serde(default)]
    pub submission: Option<Submission>,
}

/// One submission of a job to a cluster engine. A trainer that restarts while it runs follows
/// it again rather than submitting anew; ResumeJob submits the next attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submission {
    /// The engine.
    pub backend: crate::cluster::BackendKind,
    /// The engine's id (a Slurm job id, a TrainJob name).
    pub engine_id: String,
    /// 0 for the first submission, then one more per resubmission.
    pub attempt: u32,
    /// Where its workers report (`jobs/<id>/cluster/<attempt>/`).
    pub outbox_uri: String,
    /// Lines of the outbox already applied to the job.
    #[serde(default)]
    pub lines_read: usize,
}

mod spec_codec {
    use super::*;

    pub(super) fn serialize<S: serde::Serializer>(spec: &pb::JobSpec, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(spec.encode_to_vec()))
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<pb::JobSpec, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD.decode(text).map_err(serde::de::Error::custom)?;
        pb::JobSpec::decode(bytes.as_slice()).map_err(serde::de::Error::custom)
    }
}

impl JobRecord {
    /// A new QUEUED job (its creation event is the caller's to append).
    pub fn new(
        id: &str,
        spec: pb::JobSpec,
        config: &TrainConfig,
        job_uri: String,
        request_id: &str,
        now_ms: i64,
    ) -> Self {
        JobRecord {
            id: id.to_string(),
            spec,
            state: JobState::Queued,
            failure_reason: String::new(),
            failure_code: String::new(),
            epoch: 0,
            total_epochs: config.epochs,
            global_step: 0,
            best_metrics: None,
            best_epoch: 0,
            created_ms: now_ms,
            queued_ms: now_ms,
            started_ms: None,
            finished_ms: None,
            latest_checkpoint_uri: String::new(),
            best_checkpoint_uri: String::new(),
            registered_model: None,
            seed: config.seed,
            devices: config.devices.clone(),
            last_sequence: 0,
            resume_count: 0,
            job_uri,
            samples_per_second: 0.0,
            eta_seconds: 0.0,
            request_id: request_id.to_string(),
            manifest_uri: String::new(),
            tenant: default_tenant(),
            owner: String::new(),
            submission: None,
        }
    }

    /// The devices this job holds on the trainer's host while it runs: none for a job placed
    /// on a cluster engine (the scheduler then starts it at once; the engine queues it).
    pub fn host_devices(&self) -> &[Device] {
        match crate::cluster::Placement::of(&self.spec) {
            Ok(p) if p.is_cluster() => &[],
            _ => &self.devices,
        }
    }

    /// Updates the record from an event of the job (the caller numbers the event).
    pub fn apply(&mut self, event: &JobEvent) {
        self.last_sequence = self.last_sequence.max(event.sequence);
        match &event.kind {
            EventKind::StateChanged { to, reason, .. } => {
                self.state = *to;
                match to {
                    JobState::Queued => {
                        self.queued_ms = event.time_ms;
                        self.finished_ms = None;
                        self.failure_reason.clear();
                        self.failure_code.clear();
                    }
                    JobState::Preparing => {
                        self.started_ms.get_or_insert(event.time_ms);
                    }
                    JobState::Failed | JobState::Cancelled => {
                        self.finished_ms = Some(event.time_ms);
                        self.failure_reason = reason.clone();
                    }
                    JobState::Succeeded => {
                        self.finished_ms = Some(event.time_ms);
                        self.failure_reason.clear();
                        self.failure_code.clear();
                    }
                    JobState::Cancelling => {
                        if !reason.is_empty() {
                            self.failure_reason = reason.clone();
                        }
                    }
                    JobState::Running | JobState::Unspecified => {}
                }
                if *to != JobState::Running {
                    self.samples_per_second = 0.0;
                    self.eta_seconds = 0.0;
                }
            }
            EventKind::Step(s) => {
                self.global_step = s.global_step;
                self.samples_per_second = s.samples_per_second;
                self.eta_seconds = s.eta_seconds;
            }
            EventKind::Epoch(e) => {
                self.epoch = e.epoch;
                self.samples_per_second = e.samples_per_second;
                self.eta_seconds = e.eta_seconds;
                if e.is_best
                    && let Some(v) = e.validation
                {
                    self.best_metrics = Some(v);
                    self.best_epoch = e.epoch;
                }
            }
            EventKind::Checkpoint { uri, best, .. } => {
                if *best {
                    self.best_checkpoint_uri = uri.clone();
                } else {
                    self.latest_checkpoint_uri = uri.clone();
                }
            }
            EventKind::ModelRegistered { name, version, .. } => {
                self.registered_model = Some(ModelRef { name: name.clone(), version: version.clone() });
            }
            EventKind::Log { .. } => {}
        }
    }

    /// The record as `brats.v1.Job`.
    pub fn to_proto(&self) -> pb::Job {
        let running = self.state == JobState::Running;
        pb::Job {
            id: self.id.clone(),
            spec: Some(self.spec.clone()),
            state: self.state.to_proto() as i32,
            failure_reason: self.failure_reason.clone(),
            failure_code: self.failure_code.clone(),
            epoch: self.epoch,
            total_epochs: self.total_epochs,
            global_step: self.global_step,
            best_metrics: self.best_metrics.as_ref().map(dice_to_proto),
            best_epoch: self.best_epoch,
            created_at: Some(timestamp(self.created_ms)),
            started_at: self.started_ms.map(timestamp),
            finished_at: self.finished_ms.map(timestamp),
            latest_checkpoint_uri: self.latest_checkpoint_uri.clone(),
            best_checkpoint_uri: self.best_checkpoint_uri.clone(),
            registered_model: self
                .registered_model
                .as_ref()
                .map(|m| pb::ModelVersionRef { name: m.name.clone(), version: m.version.clone() }),
            seed: self.seed,
            last_sequence: self.last_sequence,
            resume_count: self.resume_count,
            job_uri: self.job_uri.clone(),
            samples_per_second: if running { self.samples_per_second } else { 0.0 },
            eta_seconds: if running { self.eta_seconds } else { 0.0 },
            cluster_job_id: self.submission.as_ref().map(|s| s.engine_id.clone()).unwrap_or_default(),
        }
    }
}

/// Checks a client-chosen job id: `[a-z0-9-]{1,63}`.
pub fn validate_job_id(id: &str) -> std::result::Result<(), String> {
    if !id.is_empty() && id.len() <= 63 && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Ok(())
    } else {
        Err(format!("'{id}' is not a job id: use 1–63 characters from a–z, 0–9 and '-'"))
    }
}

/// A fresh job id, `job-YYYYMMDD-xxxxxx` (UTC date, 6 random hex digits).
pub fn generate_job_id(now_ms: i64) -> String {
    let (y, m, d) = brats_core::time::civil_from_days(now_ms.div_euclid(86_400_000));
    format!("job-{y:04}{m:02}{d:02}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::EventLog;
    use crate::jobs::tests::config;
    use brats_train::events::EpochMetrics;

    #[test]
    fn ids_are_checked_and_generated_with_the_date() {
        assert!(validate_job_id("my-job-1").is_ok());
        for bad in ["", "Job", "a_b", "../x", &"a".repeat(64)] {
            assert!(validate_job_id(bad).is_err(), "{bad}");
        }
        let id = generate_job_id(1_704_153_600_000); // 2024-01-02T00:00:00Z
        assert!(id.starts_with("job-20240102-") && id.len() == 19, "{id}");
        assert!(validate_job_id(&id).is_ok());
    }

    #[test]
    fn records_follow_events_and_round_trip() {
        let spec = pb::JobSpec {
            datalist_uri: "file:/d/datalist.json".into(),
            labels: [("owner".to_string(), "me".to_string())].into(),
            ..Default::default()
        };
        let mut r = JobRecord::new("j1", spec, &config(), "file:///s/jobs/j1/".into(), "", 1000);
        let mut log = EventLog::empty();
        let mut emit = |r: &mut JobRecord, kind| {
            let e = log.push("j1", kind, 2000);
            r.apply(&e);
        };
        emit(
            &mut r,
            EventKind::StateChanged { from: JobState::Queued, to: JobState::Preparing, reason: String::new() },
        );
        emit(
            &mut r,
            EventKind::StateChanged { from: JobState::Preparing, to: JobState::Running, reason: String::new() },
        );
        let dice = DiceScores { tc: 0.5, wt: 0.6, et: 0.4, mean: 0.5 };
        emit(
            &mut r,
            EventKind::Epoch(EpochMetrics {
                epoch: 1,
                train_loss: 0.9,
                learning_rate: 1e-4,
                validation: Some(dice),
                is_best: true,
                train_seconds: 1.0,
                validation_seconds: 0.5,
                samples_per_second: 3.0,
                eta_seconds: 10.0,
                loader_wait_fraction: 0.0,
            }),
        );
        emit(&mut r, EventKind::Checkpoint { epoch: 1, uri: "u/latest".into(), best: false, sha256: "00".into() });
        assert_eq!((r.epoch, r.best_epoch, r.last_sequence, r.state), (1, 1, 3, JobState::Running));
        assert_eq!(r.started_ms, Some(2000));
        assert_eq!(r.latest_checkpoint_uri, "u/latest");
        let p = r.to_proto();
        assert_eq!(p.samples_per_second, 3.0);
        assert_eq!(p.best_metrics.unwrap().wt, 0.6);
        let back: JobRecord = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        emit(&mut r, EventKind::StateChanged { from: JobState::Running, to: JobState::Failed, reason: "boom".into() });
        assert_eq!((r.failure_reason.as_str(), r.finished_ms), ("boom", Some(2000)));
        assert_eq!(r.to_proto().samples_per_second, 0.0);
        emit(&mut r, EventKind::StateChanged { from: JobState::Failed, to: JobState::Queued, reason: String::new() });
        assert!(r.failure_reason.is_empty() && r.finished_ms.is_none());
    }
}
