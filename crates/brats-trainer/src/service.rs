//! The `brats.v1.Trainer` gRPC service: durable jobs ([`crate::jobs`]), a scheduler that runs
//! QUEUED jobs when their devices are free, and one runner per job that prepares the dataset,
//! launches the workers ([`crate::launcher`]), follows their events and registers the model.
//!
//! Every job has one async mutex that orders its updates: an event is numbered, applied to the
//! record, written (events first, then `job.json`) and only then announced to watchers, so a
//! watcher never sees an event the store does not have — except step events, which are written
//! in batches (see [`crate::jobs::EventLog`]). A restart of the service re-queues what was
//! running; the workers resume from their latest checkpoint by themselves.

use std::collections::{HashMap, HashSet};
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
use brats_service::{code_name, field_status};
use bytes::Bytes;
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry as PromRegistry};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, watch};
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::dataset::{self, DatasetError, Preprocessor};
use crate::events::{EventKind, JobEvent, JobState, TrainOutcome, WorkerLine, now_ms};
use crate::jobs::{EventLog, JobRecord, JobStore, JobStoreError, generate_job_id, validate_job_id};
use crate::launcher::{self, EXIT_CANCELLED, LaunchSpec, RankExit, WorkerGroup};
use crate::spec::{self, Device, TrainConfig};

/// Settings of the service, from [`crate::config::TrainerConfig`].
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    /// Root of jobs and preprocessed datasets.
    pub store_root: StoreUri,
    /// Model registry root.
    pub registry: StoreUri,
    /// Preprocessing service endpoint (None = in-process).
    pub preprocess_endpoint: Option<String>,
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
    /// CUDA devices on this host.
    pub cuda_devices: usize,
}

/// Prometheus instruments of the service.
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: PromRegistry,
    requests: IntCounterVec,
    jobs: IntGaugeVec,
    queue_depth: IntGauge,
    workers: IntGauge,
}

impl Metrics {
    /// Creates and registers the instruments.
    pub fn new() -> Self {
        let registry = PromRegistry::new();
        let requests = IntCounterVec::new(
            Opts::new("brats_trainer_requests_total", "RPCs answered, by method and status code"),
            &["method", "code"],
        )
        .unwrap();
        let jobs = IntGaugeVec::new(Opts::new("brats_trainer_jobs", "Jobs known to the trainer, by state"), &["state"])
            .unwrap();
        let queue_depth = IntGauge::new("brats_trainer_queue_depth", "Jobs QUEUED, waiting for devices").unwrap();
        let workers = IntGauge::new("brats_trainer_workers", "Worker processes running now").unwrap();
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(jobs.clone()),
            Box::new(queue_depth.clone()),
            Box::new(workers.clone()),
        ] {
            registry.register(c).unwrap();
        }
        Metrics { registry, requests, jobs, queue_depth, workers }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
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
        self.snapshot.read().expect("snapshot lock").clone()
    }

    fn state(&self) -> JobState {
        self.snapshot.read().expect("snapshot lock").state
    }
}

/// Devices in use by running jobs.
#[derive(Default)]
struct DeviceUse {
    cuda: HashSet<usize>,
    cpu_jobs: usize,
}

/// Devices a runner holds; released (and the scheduler woken) when dropped.
struct Claim {
    shared: Arc<Shared>,
    devices: Vec<Device>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut used = self.shared.devices.lock().expect("device lock");
        for d in &self.devices {
            match d {
                Device::Cpu => used.cpu_jobs = used.cpu_jobs.saturating_sub(1),
                Device::Cuda(i) => {
                    used.cuda.remove(i);
                }
            }
        }
        drop(used);
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

    /// The job store.
    pub fn store(&self) -> &JobStore {
        &self.store
    }

    fn job(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs.lock().expect("jobs lock").get(id).cloned()
    }

    fn all_jobs(&self) -> Vec<Arc<Job>> {
        self.jobs.lock().expect("jobs lock").values().cloned().collect()
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
        *job.snapshot.write().expect("snapshot lock") = inner.record.clone();
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
            self.jobs.lock().expect("jobs lock").insert(job.id.clone(), job.clone());
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

    /// Starts every QUEUED job whose devices are free, oldest first. A job that does not fit
    /// reserves its devices, so a later job may only use devices nobody older waits for.
    async fn schedule(&self) {
        let mut queued: Vec<(JobRecord, Arc<Job>)> = self
            .all_jobs()
            .into_iter()
            .map(|j| (j.snapshot(), j))
            .filter(|(r, _)| r.state == JobState::Queued)
            .collect();
        queued.sort_by(|a, b| (a.0.queued_ms, a.0.created_ms, &a.0.id).cmp(&(b.0.queued_ms, b.0.created_ms, &b.0.id)));
        let mut reserved_cuda: HashSet<usize> = HashSet::new();
        let mut reserved_cpu = 0usize;
        for (record, job) in queued {
            if *self.shutdown.borrow() {
                return;
            }
            let fits = {
                let used = self.devices.lock().expect("device lock");
                record.devices.iter().all(|d| match d {
                    Device::Cpu => used.cpu_jobs + reserved_cpu < self.settings.cpu_slots,
                    Device::Cuda(i) => !used.cuda.contains(i) && !reserved_cuda.contains(i),
                })
            };
            if !fits {
                for d in &record.devices {
                    match d {
                        Device::Cpu => reserved_cpu += 1,
                        Device::Cuda(i) => {
                            reserved_cuda.insert(*i);
                        }
                    }
                }
                continue;
            }
            let mut inner = job.inner.lock().await;
            if inner.record.state != JobState::Queued {
                continue; // cancelled meanwhile
            }
            {
                let mut used = self.devices.lock().expect("device lock");
                for d in &record.devices {
                    match d {
                        Device::Cpu => used.cpu_jobs += 1,
                        Device::Cuda(i) => {
                            used.cuda.insert(*i);
                        }
                    }
                }
            }
            let claim = Claim { shared: self.0.clone(), devices: record.devices.clone() };
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
            let mut runners = self.runners.lock().expect("runners lock");
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

    /// Runs one job from PREPARING to a terminal state (or, on shutdown, leaves it RUNNING in
    /// the store for the next start).
    async fn run_job(self, job: Arc<Job>, claim: Claim) {
        let _claim = claim;
        let mut cancel = job.cancel.subscribe();
        let mut shutdown = self.shutdown.subscribe();
        let record = job.snapshot();
        info!(devices = ?record.devices, resume_count = record.resume_count, "job starting");

        // The configuration: stored once, the same for every resume.
        let config = match spec::resolve(&record.spec, record.seed, &record.devices) {
            Ok(c) => c,
            Err(e) => return self.finish(&job, JobState::Failed, format!("spec: {e}"), "INVALID_ARGUMENT").await,
        };
        let config = match self.store.ensure_config(&job.id, &config).await {
            Ok(c) => c,
            Err(e) => {
                let code = store_status_code(&e);
                return self.finish(&job, JobState::Failed, format!("cannot write config.json: {e}"), code).await;
            }
        };

        // PREPARING: the dataset, through the preprocessing service (or its code in-process).
        let manifest = {
            let mut inner = job.inner.lock().await;
            let note = EventKind::info(format!(
                "preparing the dataset: preprocessing {} ({}){}",
                config.datalist_uri,
                [config.data.train_section.as_str(), config.data.validation_section.as_str()].join(", "),
                if self.settings.preprocess_endpoint.is_some() { " on the preprocessing service" } else { "" }
            ));
            let _ = self.emit(&job, &mut inner, note, Durability::Now).await;
            drop(inner);
            let preprocessor = match &self.settings.preprocess_endpoint {
                Some(e) => Preprocessor::Remote(e.clone()),
                None => Preprocessor::InProcess,
            };
            let started = Instant::now();
            let mut last_logged = Instant::now();
            let cases = std::sync::atomic::AtomicU32::new(0);
            let sections = [config.data.train_section.clone(), config.data.validation_section.clone()];
            let prepare = dataset::prepare(
                self.stores.clone(),
                &preprocessor,
                &config.datalist_uri,
                &config.base_uri,
                &sections,
                &config.data.label_convention,
                &self.settings.store_root,
                |done, total| {
                    cases.store(total, Ordering::Relaxed);
                    if last_logged.elapsed() > Duration::from_secs(10) {
                        last_logged = Instant::now();
                        info!(done, total, "preprocessing");
                    }
                },
            )
            .instrument(info_span!("prepare"));
            tokio::select! {
                r = prepare => match r {
                    Ok(m) => {
                        let seconds = started.elapsed().as_secs_f64();
                        info!(seconds, manifest = %m, "dataset ready");
                        let note = EventKind::info(format!("dataset ready: {} cases in {seconds:.1} s", cases.load(Ordering::Relaxed)));
                        let mut inner = job.inner.lock().await;
                        let _ = self.emit(&job, &mut inner, note, Durability::Batched).await;
                        m
                    }
                    Err(e) => {
                        let code = dataset_code(&e);
                        return self.finish(&job, JobState::Failed, format!("preparing the dataset: {e}"), code).await;
                    }
                },
                _ = wait_true(&mut cancel) => {
                    return self.finish(&job, JobState::Cancelled, String::new(), "").await;
                }
                _ = wait_true(&mut shutdown) => {
                    info!("shutdown while preparing; the job resumes at the next start");
                    return;
                }
            }
        };

        // Workers.
        let exe = self.settings.worker_exe.clone();
        let spec = LaunchSpec {
            exe,
            job_id: job.id.clone(),
            job_uri: record.job_uri.clone(),
            manifest_uri: manifest.to_string(),
            devices: config.devices.clone(),
            store_json: serde_json::to_string(&self.settings.store_config).expect("store config serialises"),
        };
        {
            let mut inner = job.inner.lock().await;
            inner.record.manifest_uri = manifest.to_string();
            if *cancel.borrow() {
                drop(inner);
                return self.finish(&job, JobState::Cancelled, String::new(), "").await;
            }
        }
        let (group, lines) = match launcher::launch(&spec).await {
            Ok(g) => g,
            Err(e) => return self.finish(&job, JobState::Failed, e.to_string(), "INTERNAL").await,
        };
        let world = spec.devices.len() as i64;
        self.metrics.workers.add(world);
        {
            let mut inner = job.inner.lock().await;
            let note = EventKind::info(format!(
                "started {} worker{} on {} (pids {:?})",
                world,
                if world == 1 { "" } else { "s" },
                spec.devices.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
                group.pids()
            ));
            let _ = self.emit(&job, &mut inner, note, Durability::Batched).await;
            if inner.record.state == JobState::Preparing {
                let _ = self.transition(&job, &mut inner, JobState::Running, String::new(), Durability::Now).await;
            }
        }
        let result =
            self.follow_workers(&job, group, lines, &mut cancel, &mut shutdown).instrument(info_span!("train")).await;
        self.metrics.workers.sub(world);

        // Decide how the job ends.
        let (outcome, finished, cancelled, stopping) = result;
        if stopping && !(finished.is_some() && outcome.all_exited_with(0)) {
            let mut inner = job.inner.lock().await;
            let _ = self.persist(&mut inner).await;
            info!("shutdown: workers stopped; the job resumes at the next start");
            return;
        }
        if cancelled {
            return self.finish(&job, JobState::Cancelled, String::new(), "").await;
        }
        if let Some(f) = outcome.failure() {
            return self.finish(&job, JobState::Failed, f.describe(), f.failure_code()).await;
        }
        if let Some(r) = outcome.ranks.iter().find(|r| r.exit == RankExit::Code(EXIT_CANCELLED)) {
            let reason = format!("{}, as if cancelled, but no cancel was requested", r.describe());
            return self.finish(&job, JobState::Failed, reason, "ABORTED").await;
        }
        let Some(finished) = finished else {
            let reason = format!(
                "worker rank 0 (pid {}) exited with code 0 without reporting a result",
                outcome.ranks.first().map(|r| r.pid).unwrap_or(0)
            );
            return self.finish(&job, JobState::Failed, reason, "INTERNAL").await;
        };
        match self.register(&job, &config, &finished).instrument(info_span!("register")).await {
            Ok(()) => self.finish(&job, JobState::Succeeded, String::new(), "").await,
            Err(e) => self.finish(&job, JobState::Failed, format!("registering the model: {e}"), core_code(&e)).await,
        }
    }

    /// Follows the workers until they all exited: their events, cancellation and shutdown.
    /// Returns (outcome, the Finished line if any, whether cancelled, whether shutting down).
    async fn follow_workers(
        &self,
        job: &Job,
        mut group: WorkerGroup,
        mut lines: tokio::sync::mpsc::UnboundedReceiver<WorkerLine>,
        cancel: &mut watch::Receiver<bool>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> (launcher::GroupOutcome, Option<TrainOutcome>, bool, bool) {
        let mut finished: Option<TrainOutcome> = None;
        let (mut cancelled, mut stopping) = (false, false);
        let mut kill_at: Option<tokio::time::Instant> = None;
        let mut ticker = tokio::time::interval(Duration::from_millis(500));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lines_open = true;
        let outcome = loop {
            tokio::select! {
                line = lines.recv(), if lines_open => match line {
                    Some(l) => self.on_line(job, l, &mut finished).await,
                    None => lines_open = false,
                },
                r = group.done() => {
                    break r.unwrap_or_else(|e| {
                        warn!(error = %e, "the worker supervisor failed");
                        launcher::GroupOutcome { ranks: Vec::new(), first_failure: None }
                    });
                }
                _ = wait_true(cancel), if !cancelled && !stopping => {
                    cancelled = true;
                    info!(grace_s = self.settings.cancel_grace.as_secs(), "cancelling: closing the workers' stdin");
                    group.close_stdin();
                    kill_at = Some(tokio::time::Instant::now() + self.settings.cancel_grace);
                }
                _ = wait_true(shutdown), if !stopping => {
                    stopping = true;
                    info!("shutdown: asking the workers to stop at a step boundary");
                    group.close_stdin();
                    let at = tokio::time::Instant::now() + self.settings.shutdown_grace;
                    kill_at = Some(kill_at.map_or(at, |k| k.min(at)));
                }
                _ = sleep_until(kill_at) => {
                    warn!("the workers did not stop within the grace period; killing them");
                    group.kill();
                    kill_at = None;
                }
                _ = ticker.tick() => {
                    let mut inner = job.inner.lock().await;
                    if (inner.dirty || inner.log.as_ref().is_some_and(|l| l.flush_due(Instant::now())))
                        && let Err(e) = self.persist(&mut inner).await
                    {
                        warn!(error = %e, "cannot write the job's events; retrying");
                    }
                }
            }
        };
        // Every line was sent before the group finished; take the rest.
        while let Ok(l) = lines.try_recv() {
            self.on_line(job, l, &mut finished).await;
        }
        // A cancel that raced with the end still counts: a cancelled job registers nothing.
        cancelled |= *cancel.borrow();
        (outcome, finished, cancelled, stopping)
    }

    /// Records one protocol line of rank 0.
    async fn on_line(&self, job: &Job, line: WorkerLine, finished: &mut Option<TrainOutcome>) {
        let mut inner = job.inner.lock().await;
        match line {
            WorkerLine::Finished(outcome) => {
                inner.record.epoch = outcome.epochs;
                inner.record.global_step = outcome.global_step;
                if outcome.best_metrics.is_some() {
                    inner.record.best_metrics = outcome.best_metrics;
                    inner.record.best_epoch = outcome.best_epoch;
                }
                *finished = Some(outcome);
            }
            WorkerLine::Event(kind) => {
                let durability = match &kind {
                    EventKind::Step(s) => {
                        let log_keeps = match inner.log.as_mut() {
                            Some(l) => l.keep_step(s, Instant::now()),
                            None => true,
                        };
                        if !log_keeps {
                            // Thinned out, but the record still follows the latest step.
                            inner.record.global_step = s.global_step;
                            inner.record.samples_per_second = s.samples_per_second;
                            inner.record.eta_seconds = s.eta_seconds;
                            *job.snapshot.write().expect("snapshot lock") = inner.record.clone();
                            return;
                        }
                        Durability::Batched
                    }
                    EventKind::StateChanged { .. } | EventKind::ModelRegistered { .. } => {
                        debug!(?kind, "ignoring a state or registration event from a worker; the service owns those");
                        return;
                    }
                    _ => Durability::Now,
                };
                if let Err(e) = self.emit(job, &mut inner, kind, durability).await {
                    warn!(error = %e, "cannot record a worker event");
                }
            }
        }
    }

    /// Registers the trained model: next version = highest numeric version + 1; model.onnx and
    /// metadata.json copied; "production" moved only if the spec asks.
    async fn register(&self, job: &Job, config: &TrainConfig, outcome: &TrainOutcome) -> Result<(), CoreError> {
        let reg = &config.registration;
        if reg.skip {
            let mut inner = job.inner.lock().await;
            let note =
                EventKind::info("registration skipped (registration.skip); artefacts are under the job's artifacts/");
            let _ = self.emit(job, &mut inner, note, Durability::Now).await;
            return Ok(());
        }
        brats_artifacts::registry::validate_name("registration.model_name", &reg.model_name)?;
        let onnx = self.stores.get(&StoreUri::parse(&outcome.onnx_uri)?).await?;
        let mut metadata: serde_json::Value = match self.stores.get(&StoreUri::parse(&outcome.metadata_uri)?).await {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| CoreError::invalid(format!("{}: not JSON ({e})", outcome.metadata_uri)))?,
            Err(CoreError::NotFound(_)) => serde_json::json!({}),
            Err(e) => return Err(e),
        };
        if let Some(m) = metadata.as_object_mut() {
            // The version's description is the operator's words; the exported metadata only
            // carries the bundle's generic one.
            if !reg.description.is_empty() {
                m.insert("description".into(), reg.description.clone().into());
            }
            m.entry("trainer_job").or_insert_with(|| {
                serde_json::json!({ "job_id": job.id, "labels": config.labels, "seed": config.seed,
                                    "epochs": outcome.epochs, "best_epoch": outcome.best_epoch })
            });
        }
        let alias = reg.promote_to_production.then_some("production");
        let body = Bytes::from(serde_json::to_vec_pretty(&metadata).expect("metadata serialises"));
        let (version, dir) = self.registry.register_next(&reg.model_name, onnx, Some(body), alias).await?;
        info!(model = %reg.model_name, version = %version, promoted = alias.is_some(), "model registered");
        let mut inner = job.inner.lock().await;
        let event = EventKind::ModelRegistered {
            name: reg.model_name.clone(),
            version,
            uri: format!("{dir}/"),
            aliases: alias.map(|a| vec![a.to_string()]).unwrap_or_default(),
        };
        let _ = self.emit(job, &mut inner, event, Durability::Now).await;
        Ok(())
    }

    /// Stops the service: no new jobs start, watchers are told to reconnect, workers are asked
    /// to stop at a step boundary (killed after the shutdown grace) and every job's events are
    /// written. Jobs stay RUNNING in the store and resume at the next start.
    pub async fn shutdown(&self) {
        self.shutdown.send_replace(true);
        let runners: Vec<_> = std::mem::take(&mut *self.runners.lock().expect("runners lock"));
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

    fn check_ready(&self) -> Result<(), Status> {
        if self.ready.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(Status::unavailable("the trainer is still recovering its jobs from the store; retry shortly"))
        }
    }

    fn lookup(&self, id: &str) -> Result<Arc<Job>, Status> {
        self.check_ready()?;
        if id.is_empty() {
            return Err(Status::invalid_argument("job_id: required"));
        }
        validate_job_id(id).map_err(|m| Status::invalid_argument(format!("job_id: {m}")))?;
        self.job(id).ok_or_else(|| Status::not_found(format!("job_id: no job '{id}' on this trainer")))
    }

    fn observe<T>(&self, method: &str, r: &Result<T, Status>) {
        let code = match r {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.metrics.requests.with_label_values(&[method, code_name(code)]).inc();
        if let Err(s) = r {
            debug!(method, code = code_name(s.code()), message = %s.message(), "request refused");
        }
    }

    /// Checks that the datalist exists, parses, has a non-empty training section, 4 images and
    /// a label per case, and that every referenced file exists.
    async fn check_datalist(&self, config: &TrainConfig) -> Result<usize, Status> {
        let (train, val) = (&config.data.train_section, &config.data.validation_section);
        brats_preprocess::jobs::check_datalist(&self.stores, &config.datalist_uri, &config.base_uri, train, val)
            .await
            .map_err(|e| field_status(e.field, e.source))
    }

    async fn check_exists(&self, field: &str, uri: &Option<String>) -> Result<(), Status> {
        let Some(u) = uri else { return Ok(()) };
        let parsed = StoreUri::parse(u).map_err(|e| field_status(field, e))?;
        match self.stores.exists(&parsed).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(Status::not_found(format!("{field}: {parsed} does not exist"))),
            Err(e) => Err(field_status(field, e)),
        }
    }

    fn default_devices(&self) -> Vec<Device> {
        if self.settings.cuda_devices == 0 {
            vec![Device::Cpu]
        } else {
            (0..self.settings.cuda_devices).map(Device::Cuda).collect()
        }
    }

    async fn start_job(&self, req: pb::StartJobRequest) -> Result<pb::Job, Status> {
        self.check_ready()?;
        let spec = req.spec.ok_or_else(|| Status::invalid_argument("spec: required (at least spec.datalist_uri)"))?;
        if req.request_id.len() > 256 {
            return Err(Status::invalid_argument("request_id: at most 256 characters"));
        }
        if !req.job_id.is_empty() {
            validate_job_id(&req.job_id).map_err(|m| Status::invalid_argument(format!("job_id: {m}")))?;
        }
        if let Some(existing) = self.existing(&req.request_id, &req.job_id, &spec).await? {
            return Ok(existing);
        }
        let seed = spec.seed.unwrap_or_else(rand::random);
        let config = spec::resolve(&spec, seed, &self.default_devices())
            .map_err(|e| Status::invalid_argument(format!("spec.{}: {}", e.field, e.message)))?;
        for d in &config.devices {
            if let Device::Cuda(i) = d
                && *i >= self.settings.cuda_devices
            {
                return Err(Status::failed_precondition(format!(
                    "spec.devices: {d} is not present: this trainer has {} CUDA device{}{}",
                    self.settings.cuda_devices,
                    if self.settings.cuda_devices == 1 { "" } else { "s" },
                    if self.settings.cuda_devices == 0 {
                        "; use [\"cpu\"] or a trainer with GPUs".to_string()
                    } else {
                        format!(" (cuda:0 … cuda:{})", self.settings.cuda_devices - 1)
                    }
                )));
            }
        }
        let cases = self.check_datalist(&config).await?;
        self.check_exists("spec.resume_from", &config.resume_from).await?;
        self.check_exists("spec.init_weights_uri", &config.init_weights_uri).await?;

        let _serial = self.create_lock.lock().await;
        if let Some(existing) = self.existing(&req.request_id, &req.job_id, &spec).await? {
            return Ok(existing);
        }
        if self.queued_count() >= self.settings.max_queue {
            return Err(Status::resource_exhausted(format!(
                "{} jobs are already queued (max_queue); retry later",
                self.settings.max_queue
            )));
        }
        let now = now_ms();
        let id = if req.job_id.is_empty() {
            loop {
                let id = generate_job_id(now);
                if self.job(&id).is_none() {
                    break id;
                }
            }
        } else {
            req.job_id.clone()
        };
        let mut record = JobRecord::new(&id, spec, &config, self.store.job_uri(&id), &req.request_id, now);
        let mut log = EventLog::empty();
        let created = log.push(
            &id,
            EventKind::StateChanged { from: JobState::Unspecified, to: JobState::Queued, reason: String::new() },
            now,
        );
        record.apply(&created);
        match self.store.create(&record, std::slice::from_ref(&created)).await.map_err(store_status)? {
            Ok(()) => {}
            // Created by an earlier life of this trainer that crashed before indexing it.
            Err(existing) => return Ok(existing.to_proto()),
        }
        if !req.request_id.is_empty() {
            self.store.put_request(&req.request_id, &id).await.map_err(store_status)?;
        }
        log.mark_persisted(1, Instant::now());
        let job = Job::new(record.clone());
        job.inner.lock().await.log = Some(log);
        self.jobs.lock().expect("jobs lock").insert(id.clone(), job);
        self.update_gauges();
        info!(job_id = %id, cases, devices = ?config.devices, epochs = config.epochs, "job queued");
        self.wake.notify_one();
        Ok(record.to_proto())
    }

    /// The job an earlier identical request created: by request id, or by job id with the
    /// same spec (a different spec is INVALID_ARGUMENT).
    async fn existing(&self, request_id: &str, job_id: &str, spec: &pb::JobSpec) -> Result<Option<pb::Job>, Status> {
        if !request_id.is_empty()
            && let Some(id) = self.store.find_request(request_id).await.map_err(store_status)?
            && let Some(job) = self.job(&id)
        {
            return Ok(Some(job.snapshot().to_proto()));
        }
        if !job_id.is_empty()
            && let Some(job) = self.job(job_id)
        {
            let r = job.snapshot();
            if &r.spec == spec {
                return Ok(Some(r.to_proto()));
            }
            return Err(Status::invalid_argument(format!(
                "job_id: '{job_id}' is already used by a job with a different spec; choose another id or leave it empty"
            )));
        }
        Ok(None)
    }

    async fn cancel_job(&self, req: pb::CancelJobRequest) -> Result<pb::Job, Status> {
        let job = self.lookup(&req.job_id)?;
        let mut inner = job.inner.lock().await;
        let reason = req.reason.trim().chars().take(1000).collect::<String>();
        match inner.record.state {
            JobState::Queued => {
                let reason = if reason.is_empty() { "cancelled while queued".to_string() } else { reason };
                self.transition(&job, &mut inner, JobState::Cancelled, reason, Durability::Commit)
                    .await
                    .map_err(store_status)?;
                inner.log = None;
                info!(job_id = %job.id, "cancelled while queued");
                self.wake.notify_one();
            }
            JobState::Preparing | JobState::Running => {
                self.transition(&job, &mut inner, JobState::Cancelling, reason, Durability::Commit)
                    .await
                    .map_err(store_status)?;
                job.cancel.send_replace(true);
                info!(job_id = %job.id, "cancelling");
            }
            JobState::Cancelling | JobState::Cancelled => {}
            s @ (JobState::Succeeded | JobState::Failed | JobState::Unspecified) => {
                return Err(Status::failed_precondition(format!(
                    "job '{}' already {}; there is nothing to cancel",
                    job.id,
                    state_name(s)
                )));
            }
        }
        Ok(inner.record.to_proto())
    }

    async fn resume_job(&self, req: pb::ResumeJobRequest) -> Result<pb::Job, Status> {
        let job = self.lookup(&req.job_id)?;
        let mut inner = job.inner.lock().await;
        match inner.record.state {
            JobState::Cancelled | JobState::Failed => {}
            s => {
                return Err(Status::failed_precondition(format!(
                    "job '{}' is {}; only CANCELLED or FAILED jobs can be resumed",
                    job.id,
                    state_name(s)
                )));
            }
        }
        if self.queued_count() >= self.settings.max_queue {
            return Err(Status::resource_exhausted(format!(
                "{} jobs are already queued (max_queue); retry later",
                self.settings.max_queue
            )));
        }
        let before = inner.record.resume_count;
        inner.record.resume_count += 1;
        job.cancel.send_replace(false);
        if let Err(e) = self.transition(&job, &mut inner, JobState::Queued, String::new(), Durability::Commit).await {
            inner.record.resume_count = before;
            return Err(store_status(e));
        }
        info!(job_id = %job.id, resume_count = inner.record.resume_count, "resumed; queued");
        self.wake.notify_one();
        Ok(inner.record.to_proto())
    }

    fn list_jobs(&self, req: pb::ListJobsRequest) -> Result<pb::ListJobsResponse, Status> {
        self.check_ready()?;
        if req.page_size > 1000 {
            return Err(Status::invalid_argument(format!("page_size: {} is above 1000", req.page_size)));
        }
        let size = if req.page_size == 0 { 50 } else { req.page_size as usize };
        let mut states = HashSet::new();
        for &s in &req.states {
            match pb::JobState::try_from(s) {
                Ok(pb::JobState::Unspecified) => {}
                Ok(_) => {
                    states.insert(JobState::from_proto(s));
                }
                Err(_) => return Err(Status::invalid_argument(format!("states: unknown job state {s}"))),
            }
        }
        let after = if req.page_token.is_empty() { None } else { Some(self.parse_token(&req.page_token)?) };
        let mut records: Vec<JobRecord> = self
            .all_jobs()
            .iter()
            .map(|j| j.snapshot())
            .filter(|r| states.is_empty() || states.contains(&r.state))
            .filter(|r| after.as_ref().is_none_or(|(ms, id)| (r.created_ms, &r.id) < (*ms, id)))
            .collect();
        records.sort_by(|a, b| (b.created_ms, &b.id).cmp(&(a.created_ms, &a.id)));
        let more = records.len() > size;
        records.truncate(size);
        let next_page_token = match (more, records.last()) {
            (true, Some(last)) => self.make_token(last.created_ms, &last.id),
            _ => String::new(),
        };
        Ok(pb::ListJobsResponse { jobs: records.iter().map(JobRecord::to_proto).collect(), next_page_token })
    }

    fn make_token(&self, created_ms: i64, id: &str) -> String {
        let payload = format!("{created_ms}:{id}");
        let mac = Sha256::new().chain_update(self.token_key).chain_update(payload.as_bytes()).finalize();
        format!("{}.{}", hex::encode(payload), hex::encode(&mac[..8]))
    }

    fn parse_token(&self, token: &str) -> Result<(i64, String), Status> {
        let bad = || {
            Status::invalid_argument("page_token: not a token from this trainer; start again with an empty page_token")
        };
        let (payload, _) = token.split_once('.').ok_or_else(bad)?;
        let payload = String::from_utf8(hex::decode(payload).map_err(|_| bad())?).map_err(|_| bad())?;
        let (ms, id) = payload.split_once(':').ok_or_else(bad)?;
        let ms: i64 = ms.parse().map_err(|_| bad())?;
        if self.make_token(ms, id) != token {
            return Err(bad());
        }
        Ok((ms, id.to_string()))
    }

    /// Events of a job with sequence >= `from`, whether the job is terminal now, and its last
    /// sequence.
    async fn events_from(&self, job: &Job, from: u64) -> Result<(Vec<JobEvent>, bool, u64), Status> {
        let inner = job.inner.lock().await;
        let terminal = inner.record.state.is_terminal();
        let events = match &inner.log {
            Some(log) => log.events_from(from),
            None => {
                let id = inner.record.id.clone();
                drop(inner);
                let all = self.store.read_events(&id).await.map_err(store_status)?;
                let inner = job.inner.lock().await;
                let terminal = inner.record.state.is_terminal();
                let last = all.last().map(|e| e.sequence).unwrap_or(0).max(inner.record.last_sequence);
                if let Some(log) = &inner.log {
                    // Loaded meanwhile (the job was resumed): the memory copy is newer.
                    let events = log.events_from(from);
                    let last = events.last().map(|e| e.sequence).unwrap_or(last).max(last);
                    return Ok((events, terminal, last));
                }
                let start = all.partition_point(|e| e.sequence < from);
                return Ok((all[start..].to_vec(), terminal, last));
            }
        };
        let last =
            events.last().map(|e| e.sequence).unwrap_or(inner.record.last_sequence).max(inner.record.last_sequence);
        Ok((events, terminal, last))
    }

    async fn watch_job(&self, req: pb::WatchJobRequest) -> Result<WatchStream, Status> {
        let job = self.lookup(&req.job_id)?;
        let mut seq = job.sequence.subscribe();
        let (_, _, last) = self.events_from(&job, u64::MAX).await?;
        if req.from_sequence > last + 1 {
            return Err(Status::out_of_range(format!(
                "from_sequence: {} is beyond the job's last event {last} plus one",
                req.from_sequence
            )));
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::JobEvent, Status>>(64);
        let this = self.clone();
        let mut shutdown = self.shutdown.subscribe();
        let span = info_span!("watch_job", job_id = %job.id);
        tokio::spawn(
            async move {
                let mut next = req.from_sequence;
                loop {
                    let (events, terminal, last) = match this.events_from(&job, next).await {
                        Ok(e) => e,
                        Err(s) => {
                            let _ = tx.send(Err(s)).await;
                            return;
                        }
                    };
                    for e in events {
                        next = e.sequence + 1;
                        if tx.send(Ok(e.to_proto())).await.is_err() {
                            return; // the watcher went away; the job is unaffected
                        }
                    }
                    if terminal && next > last {
                        return;
                    }
                    tokio::select! {
                        r = seq.changed() => if r.is_err() { return },
                        _ = wait_true(&mut shutdown) => {
                            let _ = tx.send(Err(Status::unavailable(
                                "the trainer is shutting down; reconnect with from_sequence = the last sequence seen + 1",
                            ))).await;
                            return;
                        }
                        _ = tx.closed() => return,
                    }
                }
            }
            .instrument(span),
        );
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
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

type WatchStream = Pin<Box<dyn futures::Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::trainer_server::Trainer for TrainerService {
    async fn start_job(&self, request: Request<pb::StartJobRequest>) -> Result<Response<pb::Job>, Status> {
        let req = request.into_inner();
        let span = info_span!("start_job", job_id = %req.job_id);
        let r = TrainerService::start_job(self, req).instrument(span).await;
        self.observe("StartJob", &r);
        r.map(Response::new)
    }

    async fn get_job(&self, request: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let req = request.into_inner();
        let r = info_span!("get_job", job_id = %req.job_id)
            .in_scope(|| self.lookup(&req.job_id).map(|j| j.snapshot().to_proto()));
        self.observe("GetJob", &r);
        r.map(Response::new)
    }

    async fn list_jobs(&self, request: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        let r = info_span!("list_jobs").in_scope(|| TrainerService::list_jobs(self, request.into_inner()));
        self.observe("ListJobs", &r);
        r.map(Response::new)
    }

    async fn cancel_job(&self, request: Request<pb::CancelJobRequest>) -> Result<Response<pb::Job>, Status> {
        let req = request.into_inner();
        let span = info_span!("cancel_job", job_id = %req.job_id);
        let r = TrainerService::cancel_job(self, req).instrument(span).await;
        self.observe("CancelJob", &r);
        r.map(Response::new)
    }

    async fn resume_job(&self, request: Request<pb::ResumeJobRequest>) -> Result<Response<pb::Job>, Status> {
        let req = request.into_inner();
        let span = info_span!("resume_job", job_id = %req.job_id);
        let r = TrainerService::resume_job(self, req).instrument(span).await;
        self.observe("ResumeJob", &r);
        r.map(Response::new)
    }

    type WatchJobStream = WatchStream;

    async fn watch_job(&self, request: Request<pb::WatchJobRequest>) -> Result<Response<WatchStream>, Status> {
        let r = TrainerService::watch_job(self, request.into_inner()).await;
        self.observe("WatchJob", &r);
        r.map(Response::new)
    }
}
