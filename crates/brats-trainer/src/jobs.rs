//! Durable training jobs in the object store, so a restarted trainer finds every job where it
//! left it:
//!
//! ```text
//! <root>/jobs/<id>/job.json            the JobRecord (state, progress, checkpoints, …)
//! <root>/jobs/<id>/events/<seq>.jsonl  the numbered events, one JSON object per line, in
//!                                      segments named by their first sequence (12 digits)
//! <root>/jobs/<id>/config.json         the resolved TrainConfig (immutable for the job's life)
//! <root>/jobs/<id>/checkpoints/        latest.safetensors, best.safetensors (written by workers)
//! <root>/jobs/<id>/artifacts/          model.onnx, metadata.json, metrics.csv, curves.png
//! <root>/jobs/_requests/<sha256>.json  request_id → job id (StartJob idempotency)
//! ```
//!
//! Object stores have no append, so the log is kept in segments: only the last one is rewritten
//! as events arrive, and it is sealed (never written again) once it passes
//! [`EVENT_SEGMENT_BYTES`], so a job that runs for days rewrites a few kilobytes per flush, not
//! its whole history. The service keeps a running job's events in memory ([`EventLog`]), writes
//! at once after every event that matters (state, epoch, checkpoint, registration, log) and
//! batches step events, which are also thinned to a few per second. Every put is atomic, so a
//! reader sees the old segment or the new one. Jobs stored before segments keep their
//! `events.jsonl`, read as the first, sealed segment.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use brats_core::error::CoreError;
use brats_core::store::{StoreUri, Stores};
use brats_proto::v1 as pb;
use bytes::Bytes;
use futures::StreamExt;
use prost::Message;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::warn;

use brats_train::events::{EventKind, JobEvent, JobState, StepMetrics, dice_to_proto, timestamp};
use brats_train::metric::DiceScores;
use brats_train::spec::{Device, TrainConfig};

/// File name of a job's record.
pub const JOB_FILE: &str = "job.json";
/// File name of a job's whole event log before segments (read, never written).
pub const LEGACY_EVENTS_FILE: &str = "events.jsonl";
/// Folder of a job's event log segments.
pub const EVENTS_DIR: &str = "events";
/// A segment is sealed once it holds this many bytes: small enough that rewriting it at every
/// flush is cheap, large enough that a long job has few objects to list on restart.
pub const EVENT_SEGMENT_BYTES: usize = 64 * 1024;
/// File name of a job's resolved configuration.
pub const CONFIG_FILE: &str = "config.json";
/// Folder (below `jobs/`) of the request-id index.
pub const REQUESTS_DIR: &str = "_requests";

/// Errors of the job store; each names the object or id concerned.
#[derive(Debug, thiserror::Error)]
pub enum JobStoreError {
    /// The store failed (NotFound, Unavailable, …).
    #[error(transparent)]
    Store(#[from] CoreError),
    /// A stored object does not parse.
    #[error("{uri}: {message}; the object was not written by this trainer or is damaged")]
    Corrupt {
        /// The object.
        uri: String,
        /// What is wrong.
        message: String,
    },
    /// `create` found the id taken by a job with another spec.
    #[error("job_id '{0}' is already used by a job with a different spec; choose another id or leave it empty")]
    Conflict(String),
}

/// Result alias of this module.
pub type Result<T, E = JobStoreError> = std::result::Result<T, E>;

/// A registered model version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    /// Registry name.
    pub name: String,
    /// Version.
    pub version: String,
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

/// A job's events in memory while it is active, with what has reached the store.
#[derive(Debug)]
pub struct EventLog {
    events: Vec<JobEvent>,
    persisted: usize,
    /// Events in sealed segments (a prefix of `events`), never written again.
    sealed: usize,
    /// Encoded size of the live segment (`events[sealed..]`).
    live_bytes: usize,
    last_flush: Instant,
    last_step_kept: Option<Instant>,
}

/// One stored segment of a job's event log: the first sequence it holds and its JSON lines.
#[derive(Debug, Clone, PartialEq)]
pub struct EventSegment {
    /// Sequence number of its first event (its object name).
    pub first_sequence: u64,
    /// The events as JSON lines.
    pub body: Bytes,
}

/// A job's stored event log: its events, and how many of them are in sealed segments.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StoredEvents {
    /// Every stored event, in sequence order.
    pub events: Vec<JobEvent>,
    /// The events before the last (live) segment.
    pub sealed: usize,
}

/// Step events kept (numbered, streamed, stored) at most this often; a watcher sees a few per
/// second, and the event log of a long job stays proportionate.
const STEP_EVENT_INTERVAL: Duration = Duration::from_millis(500);
/// Pending step events are written at most this often (more rarely as the log grows, so
/// rewriting it stays a small fraction of the store's bandwidth).
const MIN_STEP_FLUSH_INTERVAL: Duration = Duration::from_millis(500);

impl EventLog {
    /// A log holding a job's stored events (all of them persisted), the first `sealed` of them
    /// in sealed segments.
    pub fn new(stored: StoredEvents) -> Self {
        let StoredEvents { events, sealed } = stored;
        let sealed = sealed.min(events.len());
        let live_bytes = events[sealed..].iter().map(encoded_len).sum();
        EventLog {
            persisted: events.len(),
            events,
            sealed,
            live_bytes,
            last_flush: Instant::now(),
            last_step_kept: None,
        }
    }

    /// An empty log, for a new job.
    pub fn empty() -> Self {
        EventLog::new(StoredEvents::default())
    }

    /// The sequence number the next event gets.
    pub fn next_sequence(&self) -> u64 {
        self.events.last().map(|e| e.sequence + 1).unwrap_or(0)
    }

    /// Numbers and appends an event (not yet persisted).
    pub fn push(&mut self, job_id: &str, kind: EventKind, time_ms: i64) -> JobEvent {
        let event = JobEvent { sequence: self.next_sequence(), job_id: job_id.to_string(), time_ms, kind };
        self.live_bytes += encoded_len(&event);
        self.events.push(event.clone());
        event
    }

    /// Whether a step event should be kept: at most one per [`STEP_EVENT_INTERVAL`], and always
    /// the last step of an epoch.
    pub fn keep_step(&mut self, step: &StepMetrics, now: Instant) -> bool {
        let due = self.last_step_kept.is_none_or(|t| now.duration_since(t) >= STEP_EVENT_INTERVAL);
        if due || step.step >= step.steps_per_epoch {
            self.last_step_kept = Some(now);
            return true;
        }
        false
    }

    /// Events with sequence >= `from`, in order.
    pub fn events_from(&self, from: u64) -> Vec<JobEvent> {
        let start = self.events.partition_point(|e| e.sequence < from);
        self.events[start..].to_vec()
    }

    /// Drops the events from position `len` on (an event whose write failed is undone).
    pub fn truncate(&mut self, len: usize) {
        let len = len.max(self.sealed);
        let removed: usize = self.events.iter().skip(len).map(encoded_len).sum();
        self.live_bytes = self.live_bytes.saturating_sub(removed);
        self.events.truncate(len);
        self.persisted = self.persisted.min(len);
    }

    /// Whether some events have not reached the store.
    pub fn pending(&self) -> bool {
        self.persisted < self.events.len()
    }

    /// Whether pending (step) events are due to be written.
    pub fn flush_due(&self, now: Instant) -> bool {
        // At most about 2 MB/s of rewriting, whatever the segment size.
        let interval = MIN_STEP_FLUSH_INTERVAL.max(Duration::from_secs_f64(self.live_bytes as f64 / 2e6));
        self.pending() && now.duration_since(self.last_flush) >= interval
    }

    /// The live segment as it should be stored now (None when the log is empty or every event
    /// is in a sealed segment).
    pub fn live_segment(&self) -> Option<EventSegment> {
        let live = &self.events[self.sealed..];
        Some(EventSegment { first_sequence: live.first()?.sequence, body: encode_events(live) })
    }

    /// Records that the live segment, as [`EventLog::live_segment`] returned it when the log held
    /// `count` events, is stored; seals it when it is full.
    pub fn mark_persisted(&mut self, count: usize, now: Instant) {
        self.persisted = self.persisted.max(count.min(self.events.len()));
        self.last_flush = now;
        if self.persisted == self.events.len() && self.live_bytes >= EVENT_SEGMENT_BYTES {
            self.sealed = self.events.len();
            self.live_bytes = 0;
        }
    }

    /// Events in sealed segments.
    pub fn sealed(&self) -> usize {
        self.sealed
    }

    /// Number of events held.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether the log holds no event.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

fn encoded_len(event: &JobEvent) -> usize {
    serde_json::to_string(event).map(|s| s.len() + 1).unwrap_or(0)
}

/// Events as JSON lines.
pub fn encode_events(events: &[JobEvent]) -> Bytes {
    let mut out = Vec::with_capacity(events.len() * 200);
    for e in events {
        serde_json::to_writer(&mut out, e).expect("events serialise");
        out.push(b'\n');
    }
    Bytes::from(out)
}

/// Parses JSON lines of events; a bad line is [`JobStoreError::Corrupt`] naming `uri` and the line.
fn parse_events(bytes: &[u8], uri: &StoreUri) -> Result<Vec<JobEvent>> {
    let mut events = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let event: JobEvent = serde_json::from_slice(line)
            .map_err(|e| JobStoreError::Corrupt { uri: uri.to_string(), message: format!("line {}: {e}", i + 1) })?;
        events.push(event);
    }
    Ok(events)
}

/// Durable jobs under `<root>/jobs/`.
#[derive(Clone)]
pub struct JobStore {
    stores: Arc<Stores>,
    jobs_root: StoreUri,
}

impl JobStore {
    /// Jobs under `<store_root>/jobs/`.
    pub fn new(stores: Arc<Stores>, store_root: &StoreUri) -> Self {
        JobStore { stores, jobs_root: store_root.join("jobs") }
    }

    /// `<root>/jobs`.
    pub fn jobs_root(&self) -> &StoreUri {
        &self.jobs_root
    }

    /// The store handles.
    pub fn stores(&self) -> &Arc<Stores> {
        &self.stores
    }

    /// A job's folder.
    pub fn job_dir(&self, id: &str) -> StoreUri {
        self.jobs_root.join(id)
    }

    /// A job's folder as the URI string workers get (with a trailing `/`).
    pub fn job_uri(&self, id: &str) -> String {
        format!("{}/", self.job_dir(id))
    }

    /// The job, or None when it does not exist.
    pub async fn get(&self, id: &str) -> Result<Option<JobRecord>> {
        let uri = self.job_dir(id).join(JOB_FILE);
        match self.stores.get(&uri).await {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| JobStoreError::Corrupt { uri: uri.to_string(), message: e.to_string() }),
            Err(CoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes the record (atomically).
    pub async fn put(&self, record: &JobRecord) -> Result<()> {
        let body = serde_json::to_vec_pretty(record).expect("job records serialise");
        self.stores.put(&self.job_dir(&record.id).join(JOB_FILE), Bytes::from(body)).await?;
        Ok(())
    }

    /// Stores a new job with its first events. When the id exists: its record if the spec is
    /// the same (`Ok(Err(existing))`), else [`JobStoreError::Conflict`]. Concurrent creators of
    /// one id must be serialised by the caller (object stores have no create-if-absent here).
    pub async fn create(
        &self,
        record: &JobRecord,
        events: &[JobEvent],
    ) -> Result<std::result::Result<(), Box<JobRecord>>> {
        if let Some(existing) = self.get(&record.id).await? {
            if existing.spec == record.spec {
                return Ok(Err(Box::new(existing)));
            }
            return Err(JobStoreError::Conflict(record.id.clone()));
        }
        // Events first: a record without its log would claim events that do not exist.
        if let Some(first) = events.first() {
            let segment = EventSegment { first_sequence: first.sequence, body: encode_events(events) };
            self.write_segment(&record.id, &segment).await?;
        }
        self.put(record).await?;
        Ok(Ok(()))
    }

    /// Every job, newest first (by creation time, then id). Unreadable records are skipped
    /// with a warning so that one damaged job does not hide the others.
    pub async fn list(&self) -> Result<Vec<JobRecord>> {
        let prefix = format!("{}/", self.jobs_root);
        let ids: Vec<String> = self
            .stores
            .list(&self.jobs_root)
            .await?
            .into_iter()
            .filter_map(|u| {
                let s = u.to_string();
                let rel = s.strip_prefix(&prefix)?;
                let (id, file) = rel.split_once('/')?;
                (file == JOB_FILE && validate_job_id(id).is_ok()).then(|| id.to_string())
            })
            .collect();
        let mut records: Vec<JobRecord> = futures::stream::iter(ids.into_iter().map(|id| async move {
            match self.get(&id).await {
                Ok(r) => r,
                Err(e) => {
                    warn!(job_id = %id, error = %e, "skipping an unreadable job record");
                    None
                }
            }
        }))
        .buffer_unordered(16)
        .filter_map(|r| async move { r })
        .collect()
        .await;
        records.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then_with(|| b.id.cmp(&a.id)));
        Ok(records)
    }

    /// Writes one segment of a job's event log (the live one, replacing its previous version).
    pub async fn write_segment(&self, id: &str, segment: &EventSegment) -> Result<()> {
        let uri = self.job_dir(id).join(&format!("{EVENTS_DIR}/{:012}.jsonl", segment.first_sequence));
        self.stores.put(&uri, segment.body.clone()).await?;
        Ok(())
    }

    /// A job's stored events, in order (empty when it has none).
    pub async fn read_events(&self, id: &str) -> Result<Vec<JobEvent>> {
        Ok(self.read_log(id).await?.events)
    }

    /// A job's stored event log: the legacy `events.jsonl` (sealed) and then every segment in
    /// sequence order, the last one live.
    pub async fn read_log(&self, id: &str) -> Result<StoredEvents> {
        let dir = self.job_dir(id);
        let mut events = Vec::new();
        let legacy = dir.join(LEGACY_EVENTS_FILE);
        match self.stores.get(&legacy).await {
            Ok(bytes) => events.extend(parse_events(&bytes, &legacy)?),
            Err(CoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let segments_dir = dir.join(EVENTS_DIR);
        // Zero-padded names: the store's sorted listing is sequence order.
        let segments: Vec<StoreUri> =
            self.stores.list(&segments_dir).await?.into_iter().filter(|u| u.to_string().ends_with(".jsonl")).collect();
        let mut sealed = events.len();
        for (i, uri) in segments.iter().enumerate() {
            if i + 1 == segments.len() {
                sealed = events.len();
            }
            let bytes = self.stores.get(uri).await?;
            events.extend(parse_events(&bytes, uri)?);
        }
        events.sort_by_key(|e| e.sequence);
        events.dedup_by_key(|e| e.sequence);
        Ok(StoredEvents { sealed: sealed.min(events.len()), events })
    }

    /// Writes `config.json` unless the job already has one (it never changes for the job's
    /// life, resumes included); returns the stored configuration.
    pub async fn ensure_config(&self, id: &str, config: &TrainConfig) -> Result<TrainConfig> {
        let uri = self.job_dir(id).join(CONFIG_FILE);
        match self.stores.get(&uri).await {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| JobStoreError::Corrupt { uri: uri.to_string(), message: e.to_string() }),
            Err(CoreError::NotFound(_)) => {
                let body = serde_json::to_vec_pretty(config).expect("configs serialise");
                self.stores.put(&uri, Bytes::from(body)).await?;
                Ok(config.clone())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn request_uri(&self, request_id: &str) -> StoreUri {
        self.jobs_root.join(&format!("{REQUESTS_DIR}/{}.json", hex::encode(Sha256::digest(request_id.as_bytes()))))
    }

    /// The job a StartJob request id created, if any.
    pub async fn find_request(&self, request_id: &str) -> Result<Option<String>> {
        let uri = self.request_uri(request_id);
        match self.stores.get(&uri).await {
            Ok(bytes) => {
                let v: serde_json::Value = serde_json::from_slice(&bytes)
                    .map_err(|e| JobStoreError::Corrupt { uri: uri.to_string(), message: e.to_string() })?;
                Ok(v.get("job_id").and_then(|j| j.as_str()).map(str::to_string))
            }
            Err(CoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Records that `request_id` created `job_id`.
    pub async fn put_request(&self, request_id: &str, job_id: &str) -> Result<()> {
        // The request id itself is not stored: it may be anything a client chose.
        let body = serde_json::json!({ "job_id": job_id });
        self.stores.put(&self.request_uri(request_id), Bytes::from(body.to_string())).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use brats_train::events::EpochMetrics;

    fn config() -> TrainConfig {
        let spec = pb::JobSpec { datalist_uri: "file:/d/datalist.json".into(), ..Default::default() };
        brats_train::spec::resolve(&spec, 5, &[Device::Cpu]).unwrap()
    }

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

    #[test]
    fn step_events_are_thinned_and_the_log_pages() {
        let mut log = EventLog::empty();
        let t0 = Instant::now();
        let step = |s: u32| StepMetrics {
            epoch: 1,
            step: s,
            steps_per_epoch: 10,
            global_step: s as u64,
            loss: 1.0,
            learning_rate: 1e-4,
            samples_per_second: 1.0,
            eta_seconds: 1.0,
        };
        assert!(log.keep_step(&step(1), t0));
        assert!(!log.keep_step(&step(2), t0 + Duration::from_millis(100)));
        assert!(log.keep_step(&step(10), t0 + Duration::from_millis(200)), "an epoch's last step is kept");
        assert!(log.keep_step(&step(3), t0 + Duration::from_millis(800)));
        for i in 0..5 {
            log.push("j", EventKind::info(format!("m{i}")), 0);
        }
        assert_eq!(log.next_sequence(), 5);
        assert_eq!(log.events_from(3).iter().map(|e| e.sequence).collect::<Vec<_>>(), vec![3, 4]);
        assert!(log.events_from(9).is_empty());
        assert!(log.pending());
        log.mark_persisted(5, Instant::now());
        assert!(!log.pending());
    }

    #[tokio::test]
    async fn the_event_log_is_stored_in_segments_and_only_the_last_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let root = StoreUri::parse(&dir.path().display().to_string()).unwrap();
        let store = JobStore::new(Arc::new(Stores::new(Default::default())), &root);
        let segments_dir = dir.path().join("jobs/j/events");
        let mut log = EventLog::empty();
        let mut writes = 0;
        // ~200 bytes per event: 64 KiB seals a segment every ~300 events.
        for i in 0..1000 {
            log.push("j", EventKind::info(format!("{i:0>150}")), i);
            if i % 7 == 0 || i == 999 {
                let count = log.len();
                store.write_segment("j", &log.live_segment().unwrap()).await.unwrap();
                log.mark_persisted(count, Instant::now());
                writes += 1;
            }
        }
        assert!(!log.pending());
        let mut names: Vec<String> =
            std::fs::read_dir(&segments_dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert!(names.len() >= 3, "{names:?}");
        assert_eq!(names[0], "000000000000.jsonl");
        for name in &names[..names.len() - 1] {
            let size = std::fs::metadata(segments_dir.join(name)).unwrap().len() as usize;
            assert!((EVENT_SEGMENT_BYTES..EVENT_SEGMENT_BYTES + 8 * 1024).contains(&size), "{name}: {size} bytes");
        }
        // Bytes written: each flush rewrote one segment, never the whole history.
        let history = encode_events(&log.events_from(0)).len();
        assert!(writes * EVENT_SEGMENT_BYTES > 4 * history, "the test must flush often enough to mean something");
        let stored = store.read_log("j").await.unwrap();
        assert_eq!(stored.events, log.events_from(0));
        assert_eq!(stored.sealed, log.sealed());
        assert!(stored.sealed > 0 && stored.sealed < 1000);

        // A reloaded log goes on writing its live segment under the same name.
        let mut again = EventLog::new(stored);
        let count_before = names.len();
        again.push("j", EventKind::info("after restart"), 0);
        let count = again.len();
        let live = again.live_segment().unwrap();
        assert_eq!(format!("{:012}.jsonl", live.first_sequence), names[names.len() - 1]);
        store.write_segment("j", &live).await.unwrap();
        again.mark_persisted(count, Instant::now());
        assert_eq!(std::fs::read_dir(&segments_dir).unwrap().count(), count_before);
        assert_eq!(store.read_events("j").await.unwrap().len(), 1001);

        // A job stored before segments: its events.jsonl comes first and stays as it is.
        let legacy_dir = dir.path().join("jobs/old");
        std::fs::create_dir_all(&legacy_dir).unwrap();
        let old: Vec<JobEvent> = (0..3)
            .map(|i| JobEvent { sequence: i, job_id: "old".into(), time_ms: 0, kind: EventKind::info("x") })
            .collect();
        std::fs::write(legacy_dir.join(LEGACY_EVENTS_FILE), encode_events(&old)).unwrap();
        let stored = store.read_log("old").await.unwrap();
        assert_eq!((stored.events.len(), stored.sealed), (3, 3));
        let mut resumed = EventLog::new(stored);
        let next = resumed.push("old", EventKind::info("resumed"), 0);
        assert_eq!(next.sequence, 3);
        store.write_segment("old", &resumed.live_segment().unwrap()).await.unwrap();
        assert!(legacy_dir.join("events/000000000003.jsonl").exists());
        assert_eq!(
            store.read_events("old").await.unwrap().iter().map(|e| e.sequence).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        // A damaged segment is named in the error.
        std::fs::write(legacy_dir.join("events/000000000003.jsonl"), "{not json\n").unwrap();
        let e = store.read_log("old").await.unwrap_err().to_string();
        assert!(e.contains("000000000003.jsonl") && e.contains("line 1"), "{e}");
    }

    #[tokio::test]
    async fn store_creates_lists_and_indexes_requests() {
        let dir = tempfile::tempdir().unwrap();
        let root = StoreUri::parse(&dir.path().display().to_string()).unwrap();
        let store = JobStore::new(Arc::new(Stores::new(Default::default())), &root);
        let spec = pb::JobSpec { datalist_uri: "file:/d/datalist.json".into(), ..Default::default() };
        let a = JobRecord::new("a", spec.clone(), &config(), store.job_uri("a"), "", 1000);
        let mut b = JobRecord::new("b", spec.clone(), &config(), store.job_uri("b"), "r1", 2000);
        let created = EventLog::empty().push(
            "a",
            EventKind::StateChanged { from: JobState::Unspecified, to: JobState::Queued, reason: String::new() },
            1000,
        );
        assert!(store.create(&a, std::slice::from_ref(&created)).await.unwrap().is_ok());
        assert!(store.create(&b, &[]).await.unwrap().is_ok());
        assert!(store.create(&a, &[]).await.unwrap().is_err(), "same spec: the existing job");
        let mut other = a.clone();
        other.spec.base_uri = "file:/elsewhere".into();
        assert!(matches!(store.create(&other, &[]).await, Err(JobStoreError::Conflict(_))));
        let ids: Vec<String> = store.list().await.unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(ids, vec!["b", "a"]);
        assert_eq!(store.read_events("a").await.unwrap(), vec![created]);
        assert!(store.read_events("b").await.unwrap().is_empty());
        assert!(store.get("zzz").await.unwrap().is_none());
        store.put_request("r1", "b").await.unwrap();
        assert_eq!(store.find_request("r1").await.unwrap().as_deref(), Some("b"));
        assert_eq!(store.find_request("r2").await.unwrap(), None);
        b.state = JobState::Running;
        store.put(&b).await.unwrap();
        assert_eq!(store.get("b").await.unwrap().unwrap().state, JobState::Running);
        let c = config();
        assert_eq!(store.ensure_config("b", &c).await.unwrap(), c);
        let mut changed = c.clone();
        changed.epochs = 7;
        assert_eq!(store.ensure_config("b", &changed).await.unwrap(), c, "config.json is immutable");
    }
}
