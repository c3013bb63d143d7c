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

use brats_core::error::CoreError;
use brats_core::store::{StoreUri, Stores};
use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tracing::warn;

use brats_train::events::JobEvent;
use brats_train::spec::TrainConfig;

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

mod events;
mod record;

pub use events::{EventLog, EventSegment, StoredEvents, encode_events};
pub use record::{JobRecord, ModelRef, Submission, generate_job_id, validate_job_id};

use events::parse_events;

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
    use std::time::Instant;

    use super::*;
    use brats_proto::v1 as pb;
    use brats_train::events::{EventKind, JobState};
    use brats_train::spec::Device;

    pub(super) fn config() -> TrainConfig {
        let spec = pb::JobSpec { datalist_uri: "file:/d/datalist.json".into(), ..Default::default() };
        brats_train::spec::resolve(&spec, 5, &[Device::Cpu]).unwrap()
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
