//! The `brats.v1.Trainer` gRPC service: durable jobs ([`crate::jobs`]), a scheduler that runs
//! QUEUED jobs when their devices are free, and one runner per job that prepares the dataset,
//! launches the workers ([`crate::launcher`]), follows their events and registers the model.
//!
//! Every job has one async mutex that orders its updates: an event is numbered, applied to the
//! record, written (events first, then `job.json`) and only then announced to watchers, so a
//! watcher never sees an event the store does not have — except step events, which are written
//! in batches (see [`crate::jobs::EventLog`]). A restart of the service re-queues what was
//! running; the workers resume from their latest checkpoint by themselves.

mod cluster_runner;
mod handlers;
mod metrics;
mod registration;
mod requests;
mod runner;
mod scheduler;

pub use metrics::Metrics;

use crate::sync::{lock, read, write};
use scheduler::{Capacity, DeviceUse, QueuedJob};

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use brats_artifacts::registry::Registry;
use brats_core::StoreConfig;
use brats_core::error::CoreError;
use brats_core::store::{StoreUri, Stores};
use brats_proto::v1 as pb;
use brats_service::code_name;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, watch};
use tonic::Status;
use tracing::{Instrument, info, info_span, warn};

use crate::jobs::{EventLog, JobRecord, JobStore, JobStoreError};
use brats_train::dataset::DatasetError;
use brats_train::events::{EventKind, JobEvent, JobState, now_ms};
use brats_train::spec::Device;

/// Settings of the service, from [`crate::config::TrainerConfig`].
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    /// Root of jobs and preprocessed datasets.
    pub store_root: StoreUri,
    /// Model registry root.
    pub registry: StoreUri,
    /// Preprocessing service endpoint (None = in-process).
    pub preprocess_endpoint: Option<String>,
    /// TLS and credentials for calling it (`[server.client]`).
    pub preprocess_client: brats_cli::ClientSecurity,
    /// Where callers may point a job's URIs (`[server.tenants]`; default: anywhere).
    pub uris: brats_service::security::tenants::UriPolicy,
    /// Where job state changes and registrations are recorded (default: nowhere).
    pub audit: brats_service::security::audit::AuditLog,
    /// Concurrent CPU jobs.
    pub cpu_slots: usize,
    /// QUEUED jobs before RESOURCE_EXHAUSTED.
    pub max_queue: usize,
    /// Time a cancelled worker gets before SIGKILL.
    pub cancel_grace: Duration,
    /// Time workers get on shutdown before SIGKILL.
    pub shutdown_grace: Duration,
    /// The worker executable.
    pub worker_exe: PathBuf,
    /// Store settings handed to workers.
    pub store_config: StoreConfig,
    /// Experiment tracking handed to workers (`BRATS_TRAINER_TRACKING`).
    pub tracking: crate::config::TrackingConfig,
    /// CUDA devices on this host.
    pub cuda_devices: usize,
    /// The cluster engines jobs may be placed on (`[cluster]`).
    pub clusters: crate::cluster::Clusters,
}

/// What is mutated under a job's lock.
struct JobInner {
    record: JobRecord,
    /// The event log while the job is active (or was touched since the start); None = only in
    /// the store.
    log: Option<EventLog>,
    /// The last write failed: the store is behind the record.
    dirty: bool,
}

impl JobInner {
    /// Whether something is not in the store yet.
    fn unsaved(&self) -> bool {
        self.dirty || self.log.as_ref().is_some_and(|l| l.pending())
    }
}

/// One job known to the service.
struct Job {
    id: String,
    inner: tokio::sync::Mutex<JobInner>,
    /// A copy of the record for readers that must not wait on a store write.
    snapshot: RwLock<JobRecord>,
    /// The last event's sequence, to wake watchers.
    sequence: watch::Sender<u64>,
    /// Set to true to ask the runner to stop the job.
    cancel: watch::Sender<bool>,
}

impl Job {
    fn new(record: JobRecord) -> Arc<Job> {
        Arc::new(Job {
            id: record.id.clone(),
            sequence: watch::Sender::new(record.last_sequence),
            cancel: watch::Sender::new(false),
            snapshot: RwLock::new(record.clone()),
            inner: tokio::sync::Mutex::new(JobInner { record, log: None, dirty: false }),
        })
    }

    fn snapshot(&self) -> JobRecord {
        read(&self.snapshot).clone()
    }

    fn state(&self) -> JobState {
        read(&self.snapshot).state
    }
}

/// Devices a runner holds; released (and the scheduler woken) when dropped.
struct Claim {
    shared: Arc<Shared>,
    devices: Vec<Device>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        lock(&self.shared.devices).release(&self.devices);
        self.shared.wake.notify_one();
    }
}

/// Everything the handlers, the scheduler and the runners share.
pub struct Shared {
    settings: ServiceSettings,
    stores: Arc<Stores>,
    store: JobStore,
    registry: Registry,
    metrics: Metrics,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    /// Serialises job creation (request-id and job-id checks, then the writes).
    create_lock: tokio::sync::Mutex<()>,
    devices: Mutex<DeviceUse>,
    wake: Notify,
    ready: AtomicBool,
    shutdown: watch::Sender<bool>,
    runners: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    token_key: [u8; 32],
}

/// The gRPC handler: a cheap handle on the [`Shared`] state.
#[derive(Clone)]
pub struct TrainerService(Arc<Shared>);

impl std::ops::Deref for TrainerService {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// How an event reaches the store.
#[derive(Clone, Copy, PartialEq)]
enum Durability {
    /// Written before the call returns; on a store failure the event is undone and the error
    /// returned (RPC-driven transitions: nothing happened unless it was recorded).
    Commit,
    /// Written before the call returns; a store failure is logged and retried with the next
    /// write (what workers report happened whether or not the store was reachable).
    Now,
    /// Written with the next batch (step events).
    Batched,
}

fn store_status(e: JobStoreError) -> Status {
    match e {
        JobStoreError::Store(c) => brats_service::status(c),
        JobStoreError::Corrupt { .. } => Status::data_loss(e.to_string()),
        JobStoreError::Conflict(_) => Status::invalid_argument(format!("job_id: {e}")),
    }
}

fn state_name(s: JobState) -> &'static str {
    s.to_proto().as_str_name().trim_start_matches("JOB_STATE_")
}

impl TrainerService {
    /// Creates the service; call [`TrainerService::recover`] and then [`TrainerService::start`]
    /// before serving.
    pub fn new(stores: Arc<Stores>, settings: ServiceSettings, metrics: Metrics) -> Self {
        let store = JobStore::new(stores.clone(), &settings.store_root);
        let registry = Registry::new(stores.clone(), settings.registry.clone());
        // Page tokens are signed with a key derived from the store, so they survive restarts and
        // a token from another trainer or a hand-made one is refused.
        let token_key: [u8; 32] =
            Sha256::digest(format!("brats-trainer page token\n{}", settings.store_root).as_bytes()).into();
        TrainerService(Arc::new(Shared {
            settings,
            stores,
            store,
            registry,
            metrics,
            jobs: Mutex::new(HashMap::new()),
            create_lock: tokio::sync::Mutex::new(()),
            devices: Mutex::new(DeviceUse::default()),
            wake: Notify::new(),
            ready: AtomicBool::new(false),
            shutdown: watch::Sender::new(false),
            runners: Mutex::new(Vec::new()),
            token_key,
        }))
    }

    /// Records a job's state change in the audit log (the job id is ours; nothing of the
    /// spec is recorded). A failing audit sink is logged, not fatal: the change has happened.
    fn audit_job(
        &self,
        job_id: &str,
        action: brats_service::security::audit::Action,
        outcome: brats_service::security::audit::Outcome,
        reason: &str,
        caller: Option<&brats_service::security::Principal>,
    ) {
        let event = brats_service::security::audit::AuditEvent {
            rpc: "job",
            action,
            outcome,
            grpc_code: tonic::Code::Ok,
            reason,
            principal: caller,
            source_ip: None,
            resource: Some(brats_service::security::audit::Resource { kind: "job", id: job_id }),
            latency_ms: None,
        };
        if let Err(e) = self.settings.audit.record(event) {
            warn!(job_id, error = %e, "audit record of a job state change could not be written");
        }
    }

    /// The job store.
    pub fn store(&self) -> &JobStore {
        &self.store
    }

    fn job(&self, id: &str) -> Option<Arc<Job>> {
        lock(&self.jobs).get(id).cloned()
    }

    fn all_jobs(&self) -> Vec<Arc<Job>> {
        lock(&self.jobs).values().cloned().collect()
    }

    fn update_gauges(&self) {
        let mut counts: HashMap<JobState, i64> = HashMap::new();
        for j in self.all_jobs() {
            *counts.entry(j.state()).or_default() += 1;
        }
        for s in [
            JobState::Queued,
            JobState::Preparing,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelling,
            JobState::Cancelled,
        ] {
            self.metrics.jobs.with_label_values(&[state_name(s)]).set(counts.get(&s).copied().unwrap_or(0));
        }
        self.metrics.queue_depth.set(counts.get(&JobState::Queued).copied().unwrap_or(0));
    }

    fn queued_count(&self) -> usize {
        self.all_jobs().iter().filter(|j| j.state() == JobState::Queued).count()
    }

    /// Loads the job's events from the store when they are not in memory.
    async fn ensure_log(&self, inner: &mut JobInner) -> Result<(), JobStoreError> {
        if inner.log.is_none() {
            let stored = self.store.read_log(&inner.record.id).await?;
            if let Some(last) = stored.events.last() {
                // The log is written before the record, so it may be one write ahead.
                inner.record.last_sequence = inner.record.last_sequence.max(last.sequence);
            }
            inner.log = Some(EventLog::new(stored));
        }
        Ok(())
    }

    /// Writes pending events, then the record.
    async fn persist(&self, inner: &mut JobInner) -> Result<(), JobStoreError> {
        inner.dirty = true;
        if let Some(log) = &mut inner.log
            && log.pending()
        {
            let count = log.len();
            if let Some(segment) = log.live_segment() {
                self.store.write_segment(&inner.record.id, &segment).await?;
            }
            log.mark_persisted(count, Instant::now());
        }
        self.store.put(&inner.record).await?;
        inner.dirty = false;
        Ok(())
    }

    /// Numbers an event, applies it to the record, writes it as `durability` says and wakes
    /// the watchers.
    async fn emit(
        &self,
        job: &Job,
        inner: &mut JobInner,
        kind: EventKind,
        durability: Durability,
    ) -> Result<JobEvent, JobStoreError> {
        self.ensure_log(inner).await?;
        let log = inner.log.as_mut().expect("log loaded");
        let before = (inner.record.clone(), log.len());
        let event = log.push(&job.id, kind, now_ms());
        inner.record.apply(&event);
        match durability {
            Durability::Batched => {}
            Durability::Now => {
                if let Err(e) = self.persist(inner).await {
                    warn!(job_id = %job.id, error = %e, "cannot write the job's events; retrying with the next write");
                }
            }
            Durability::Commit => {
                if let Err(e) = self.persist(inner).await {
                    let log = inner.log.as_mut().expect("log loaded");
                    log.truncate(before.1);
                    inner.record = before.0;
                    return Err(e);
                }
            }
        }
        *write(&job.snapshot) = inner.record.clone();
        job.sequence.send_replace(event.sequence);
        if matches!(event.kind, EventKind::StateChanged { .. }) {
            self.update_gauges();
        }
        Ok(event)
    }

    /// Restart recovery: loads every job; QUEUED, PREPARING and RUNNING ones are queued again
    /// (RUNNING ones resume from their latest checkpoint), CANCELLING ones become CANCELLED.
    pub async fn recover(&self) -> Result<(), JobStoreError> {
        let records = self.store.list().await?;
        let (mut requeued, mut total) = (0, 0);
        for record in records.into_iter().rev() {
            total += 1;
            let job = Job::new(record.clone());
            lock(&self.jobs).insert(job.id.clone(), job.clone());
            let mut inner = job.inner.lock().await;
            let from = record.state;
            match from {
                JobState::Preparing | JobState::Running => {
                    let queued_ms = inner.record.queued_ms;
                    if from == JobState::Running {
                        inner.record.resume_count += 1;
                    }
                    let change = EventKind::StateChanged { from, to: JobState::Queued, reason: String::new() };
                    self.emit(&job, &mut inner, change, Durability::Batched).await?;
                    // Keeps its place in the queue: it was admitted before anything queued since.
                    inner.record.queued_ms = queued_ms;
                    let note = EventKind::info("trainer restarted; resuming from the last checkpoint");
                    self.emit(&job, &mut inner, note, Durability::Commit).await?;
                    requeued += 1;
                }
                JobState::Cancelling => {
                    let reason = if inner.record.failure_reason.is_empty() {
                        "cancelled (the trainer restarted while the job was stopping)".to_string()
                    } else {
                        inner.record.failure_reason.clone()
                    };
                    let change = EventKind::StateChanged { from, to: JobState::Cancelled, reason };
                    self.emit(&job, &mut inner, change, Durability::Commit).await?;
                }
                _ => {}
            }
            if inner.record.state.is_terminal() {
                inner.log = None;
            }
        }
        self.update_gauges();
        self.ready.store(true, Ordering::SeqCst);
        info!(jobs = total, requeued, "jobs recovered from the store");
        Ok(())
    }

    /// Starts the scheduler.
    pub fn start(&self) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut shutdown = this.shutdown.subscribe();
            loop {
                if *shutdown.borrow() {
                    return;
                }
                this.schedule().await;
                tokio::select! {
                    _ = this.wake.notified() => {}
                    _ = shutdown.changed() => {}
                }
            }
        });
        self.wake.notify_one();
    }

    /// Starts the QUEUED jobs that [`scheduler::plan`] picks (oldest first; a job that does not
    /// fit reserves its devices) and fails those that ask for devices this host lacks.
    async fn schedule(&self) {
        let queued: HashMap<String, (JobRecord, Arc<Job>)> = self
            .all_jobs()
            .into_iter()
            .map(|j| (j.snapshot(), j))
            .filter(|(r, _)| r.state == JobState::Queued)
            .map(|(r, j)| (r.id.clone(), (r, j)))
            .collect();
        let requests: Vec<QueuedJob> = queued
            .values()
            .map(|(r, _)| QueuedJob {
                id: r.id.clone(),
                queued_ms: r.queued_ms,
                created_ms: r.created_ms,
                devices: r.host_devices().to_vec(),
            })
            .collect();
        let capacity = Capacity { cuda_devices: self.settings.cuda_devices, cpu_slots: self.settings.cpu_slots };
        let plan = scheduler::plan(capacity, &lock(&self.devices), &requests);
        for id in &plan.impossible {
            let (record, job) = &queued[id];
            let reason = format!(
                "devices: {} asked for, but this trainer has {} CUDA device(s)",
                record.devices.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
                self.settings.cuda_devices
            );
            self.finish(job, JobState::Failed, reason, "FAILED_PRECONDITION").await;
        }
        for id in plan.start {
            if *self.shutdown.borrow() {
                return;
            }
            let (record, job) = &queued[&id];
            let job = job.clone();
            let mut inner = job.inner.lock().await;
            if inner.record.state != JobState::Queued {
                // Cancelled meanwhile: the devices planned for it may suit a younger job.
                self.wake.notify_one();
                continue;
            }
            lock(&self.devices).claim(record.host_devices());
            let claim = Claim { shared: self.0.clone(), devices: record.host_devices().to_vec() };
            let change =
                EventKind::StateChanged { from: JobState::Queued, to: JobState::Preparing, reason: String::new() };
            if let Err(e) = self.emit(&job, &mut inner, change, Durability::Commit).await {
                warn!(job_id = %job.id, error = %e, "cannot start the job: the store failed; retrying shortly");
                drop(claim);
                drop(inner);
                let wake = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    wake.wake.notify_one();
                });
                return;
            }
            drop(inner);
            let this = self.clone();
            let span = info_span!("job", job_id = %job.id);
            let handle = tokio::spawn(async move { this.run_job(job, claim).await }.instrument(span));
            let mut runners = lock(&self.runners);
            runners.retain(|h| !h.is_finished());
            runners.push(handle);
        }
    }

    /// Emits a transition from whatever state the job is in now.
    async fn transition(
        &self,
        job: &Job,
        inner: &mut JobInner,
        to: JobState,
        reason: String,
        durability: Durability,
    ) -> Result<JobEvent, JobStoreError> {
        let from = inner.record.state;
        self.emit(job, inner, EventKind::StateChanged { from, to, reason }, durability).await
    }

    /// Ends a job in a terminal state and drops its in-memory log once it is stored. A
    /// cancellation without a reason keeps the one given to CancelJob.
    async fn finish(&self, job: &Arc<Job>, to: JobState, reason: String, code: &str) {
        let mut inner = job.inner.lock().await;
        let reason =
            if to == JobState::Cancelled && reason.is_empty() { inner.record.failure_reason.clone() } else { reason };
        // Set before the transition so that one write stores both.
        inner.record.failure_code = if to == JobState::Failed { code.to_string() } else { String::new() };
        let _ = self.transition(job, &mut inner, to, reason.clone(), Durability::Now).await;
        if inner.unsaved() {
            self.retry_writes(job.clone());
        } else {
            inner.log = None;
        }
        match to {
            JobState::Failed => warn!(reason = %reason, code, "job failed"),
            _ => info!(state = state_name(to), "job ended"),
        }
        use brats_service::security::audit::{Action, Outcome};
        let (action, outcome) = match to {
            JobState::Succeeded => (Action::JobFinished, Outcome::Succeeded),
            JobState::Cancelled => (Action::JobCancelled, Outcome::Succeeded),
            _ => (Action::JobFinished, Outcome::Failed),
        };
        // The reason is our own text (worker errors), not the caller's: it can carry a path,
        // so only the code goes to the audit log.
        self.audit_job(&job.id, action, outcome, if code.is_empty() { state_name(to) } else { code }, None);
    }

    /// Keeps writing a finished job's record and events until the store takes them (otherwise
    /// a restart would find the job where the store last saw it, and run it again).
    fn retry_writes(&self, job: Arc<Job>) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let mut inner = job.inner.lock().await;
                if !inner.unsaved() || this.persist(&mut inner).await.is_ok() {
                    if inner.record.state.is_terminal() {
                        inner.log = None;
                    }
                    info!(job_id = %job.id, "the job's record reached the store");
                    return;
                }
            }
        });
    }

    /// Stops the service: no new jobs start, watchers are told to reconnect, workers are asked
    /// to stop at a step boundary (killed after the shutdown grace) and every job's events are
    /// written. Jobs stay RUNNING in the store and resume at the next start.
    pub async fn shutdown(&self) {
        self.shutdown.send_replace(true);
        let runners: Vec<_> = std::mem::take(&mut *lock(&self.runners));
        let deadline = self.settings.shutdown_grace + Duration::from_secs(5);
        if tokio::time::timeout(deadline, futures::future::join_all(runners)).await.is_err() {
            warn!("some jobs did not stop in time");
        }
        for job in self.all_jobs() {
            let mut inner = job.inner.lock().await;
            if inner.unsaved()
                && let Err(e) = self.persist(&mut inner).await
            {
                warn!(job_id = %job.id, error = %e, "cannot write the job's last events before stopping");
            }
        }
    }
}

/// The status code name `brats_service::status` gives the error.
fn core_code(e: &CoreError) -> &'static str {
    brats_service::code_name(brats_service::code(e.kind()))
}

fn store_status_code(e: &JobStoreError) -> &'static str {
    match e {
        JobStoreError::Store(c) => core_code(c),
        JobStoreError::Corrupt { .. } => "DATA_LOSS",
        JobStoreError::Conflict(_) => "INVALID_ARGUMENT",
    }
}

fn dataset_code(e: &DatasetError) -> &'static str {
    match e {
        DatasetError::Preprocess { code, .. } => code_name(*code),
        DatasetError::Cases { .. } => "INVALID_ARGUMENT",
        DatasetError::Manifest { .. } => "DATA_LOSS",
        DatasetError::TooLarge { .. } => "RESOURCE_EXHAUSTED",
        DatasetError::Store(c) => core_code(c),
    }
}

/// Resolves once the flag is true (never if its sender is gone while false).
async fn wait_true(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// The stream `WatchJob` answers with.
type WatchStream = Pin<Box<dyn futures::Stream<Item = Result<pb::JobEvent, Status>> + Send>>;
