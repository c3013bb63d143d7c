//! What each RPC does: validation, job creation, cancel, resume, listing and watching.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use brats_core::store::StoreUri;
use brats_proto::v1 as pb;
use brats_service::security::Principal;
use brats_service::security::audit::{Action, Outcome};
use brats_service::{code_name, field_status};
use sha2::{Digest, Sha256};
use tonic::Status;
use tracing::{Instrument, debug, info, info_span};

use crate::cluster::{BackendKind, Placement};
use crate::jobs::{EventLog, JobRecord, generate_job_id, validate_job_id};
use brats_train::events::{EventKind, JobEvent, JobState, now_ms};
use brats_train::spec::{self, Device, TrainConfig};

use super::*;

/// Whether `caller` may see the job: its own tenant's jobs, or every job for an admin and
/// for in-process callers (no principal).
fn visible(record: &JobRecord, caller: Option<&Principal>) -> bool {
    caller.is_none_or(|c| {
        record.tenant == c.tenant
            || (c.has_role(brats_service::security::authz::ADMIN)
                && c.method != brats_service::security::AuthMethod::Anonymous)
    })
}

impl TrainerService {
    pub(super) fn check_ready(&self) -> Result<(), Status> {
        if self.ready.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(Status::unavailable("the trainer is still recovering its jobs from the store; retry shortly"))
        }
    }

    /// The job `id`, if `caller` may see it: a job of another tenant is NOT_FOUND, exactly as
    /// a job that does not exist (its existence is not revealed).
    pub(super) fn lookup(&self, id: &str, caller: Option<&Principal>) -> Result<Arc<Job>, Status> {
        self.check_ready()?;
        if id.is_empty() {
            return Err(Status::invalid_argument("job_id: required"));
        }
        validate_job_id(id).map_err(|m| Status::invalid_argument(format!("job_id: {m}")))?;
        self.job(id)
            .filter(|j| visible(&j.snapshot(), caller))
            .ok_or_else(|| Status::not_found(format!("job_id: no job '{id}' on this trainer")))
    }

    /// Checks every location a job will read lies inside the caller's tenant: the spec's
    /// URIs and, through the datalist, every case's files.
    async fn check_locations(&self, config: &TrainConfig, caller: Option<&Principal>) -> Result<(), Status> {
        let uris = &self.settings.uris;
        if !uris.enforced() || caller.is_none() {
            return Ok(());
        }
        uris.check(caller, "spec.datalist_uri", &config.datalist_uri)?;
        uris.check_fields(
            caller,
            &[
                ("spec.base_uri", &config.base_uri),
                ("spec.init_weights_uri", config.init_weights_uri.as_deref().unwrap_or_default()),
                ("spec.resume_from", config.resume_from.as_deref().unwrap_or_default()),
            ],
        )?;
        let datalist = StoreUri::parse(&config.datalist_uri).map_err(|e| field_status("spec.datalist_uri", e))?;
        let base = if config.base_uri.is_empty() {
            datalist.parent()
        } else {
            StoreUri::parse(&config.base_uri).map_err(|e| field_status("spec.base_uri", e))?
        };
        let bytes = self.stores.get(&datalist).await.map_err(|e| field_status("spec.datalist_uri", e))?;
        let sections = [config.data.train_section.clone(), config.data.validation_section.clone()];
        let cases = brats_preprocess::jobs::parse_datalist(&bytes, &base, &sections, &datalist.file_name())
            .map_err(|e| field_status("spec.datalist_uri", e))?;
        for case in &cases {
            for uri in case.images.iter().chain(case.label.iter()) {
                uris.check(caller, "spec.datalist_uri (a case's image or label)", &uri.to_string())?;
            }
        }
        Ok(())
    }

    pub(super) fn observe<T>(&self, method: &str, r: &Result<T, Status>) {
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
    pub(super) async fn check_datalist(&self, config: &TrainConfig) -> Result<usize, Status> {
        let (train, val) = (&config.data.train_section, &config.data.validation_section);
        brats_preprocess::jobs::check_datalist(&self.stores, &config.datalist_uri, &config.base_uri, train, val)
            .await
            .map_err(|e| field_status(e.field, e.source))
    }

    pub(super) async fn check_exists(&self, field: &str, uri: &Option<String>) -> Result<(), Status> {
        let Some(u) = uri else { return Ok(()) };
        let parsed = StoreUri::parse(u).map_err(|e| field_status(field, e))?;
        match self.stores.exists(&parsed).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(Status::not_found(format!("{field}: {parsed} does not exist"))),
            Err(e) => Err(field_status(field, e)),
        }
    }

    pub(super) fn default_devices(&self) -> Vec<Device> {
        if self.settings.cuda_devices == 0 {
            vec![Device::Cpu]
        } else {
            (0..self.settings.cuda_devices).map(Device::Cuda).collect()
        }
    }

    pub(super) async fn start_job(
        &self,
        req: pb::StartJobRequest,
        caller: Option<&Principal>,
    ) -> Result<pb::Job, Status> {
        self.check_ready()?;
        let spec = req.spec.ok_or_else(|| Status::invalid_argument("spec: required (at least spec.datalist_uri)"))?;
        if req.request_id.len() > 256 {
            return Err(Status::invalid_argument("request_id: at most 256 characters"));
        }
        if !req.job_id.is_empty() {
            validate_job_id(&req.job_id).map_err(|m| Status::invalid_argument(format!("job_id: {m}")))?;
        }
        if let Some(existing) = self.existing(&req.request_id, &req.job_id, &spec, caller).await? {
            return Ok(existing);
        }
        let seed = spec.seed.unwrap_or_else(rand::random);
        let placement = Placement::of(&spec).map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.settings.clusters.check(&placement).map_err(Status::failed_precondition)?;
        // A cluster job's devices describe every node (GPUs unless ["cpu"]), not this host's.
        let default_devices = if placement.is_cluster() { vec![Device::Cuda(0)] } else { self.default_devices() };
        let config = spec::resolve(&spec, seed, &default_devices)
            .map_err(|e| Status::invalid_argument(format!("spec.{}: {}", e.field, e.message)))?;
        if placement.is_cluster() {
            check_cluster_devices(&spec, &placement)?;
        }
        for d in config.devices.iter().filter(|_| !placement.is_cluster()) {
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
        self.check_locations(&config, caller).await?;
        let cases = self.check_datalist(&config).await?;
        self.check_exists("spec.resume_from", &config.resume_from).await?;
        self.check_exists("spec.init_weights_uri", &config.init_weights_uri).await?;

        let _serial = self.create_lock.lock().await;
        if let Some(existing) = self.existing(&req.request_id, &req.job_id, &spec, caller).await? {
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
        if let Some(caller) = caller {
            record.tenant = caller.tenant.clone();
            record.owner = caller.subject.clone();
        }
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
        lock(&self.jobs).insert(id.clone(), job);
        self.update_gauges();
        info!(job_id = %id, cases, devices = ?config.devices, epochs = config.epochs, "job queued");
        self.audit_job(&id, Action::JobStarted, Outcome::Succeeded, "queued", caller);
        self.wake.notify_one();
        Ok(record.to_proto())
    }

    /// The job an earlier identical request created: by request id, or by job id with the
    /// same spec (a different spec is INVALID_ARGUMENT).
    pub(super) async fn existing(
        &self,
        request_id: &str,
        job_id: &str,
        spec: &pb::JobSpec,
        caller: Option<&Principal>,
    ) -> Result<Option<pb::Job>, Status> {
        if !request_id.is_empty()
            && let Some(id) = self.store.find_request(request_id).await.map_err(store_status)?
            && let Some(job) = self.job(&id)
            && visible(&job.snapshot(), caller)
        {
            return Ok(Some(job.snapshot().to_proto()));
        }
        if !job_id.is_empty()
            && let Some(job) = self.job(job_id)
        {
            let r = job.snapshot();
            if &r.spec == spec && visible(&r, caller) {
                return Ok(Some(r.to_proto()));
            }
            return Err(Status::invalid_argument(format!(
                "job_id: '{job_id}' is already used by a job with a different spec; choose another id or leave it empty"
            )));
        }
        Ok(None)
    }

    pub(super) async fn cancel_job(
        &self,
        req: pb::CancelJobRequest,
        caller: Option<&Principal>,
    ) -> Result<pb::Job, Status> {
        let job = self.lookup(&req.job_id, caller)?;
        self.audit_job(&job.id, Action::JobCancelled, Outcome::Succeeded, "cancel requested", caller);
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

    pub(super) async fn resume_job(
        &self,
        req: pb::ResumeJobRequest,
        caller: Option<&Principal>,
    ) -> Result<pb::Job, Status> {
        let job = self.lookup(&req.job_id, caller)?;
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

    pub(super) fn list_jobs(
        &self,
        req: pb::ListJobsRequest,
        caller: Option<&Principal>,
    ) -> Result<pb::ListJobsResponse, Status> {
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
            .filter(|r| visible(r, caller))
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

    pub(super) fn make_token(&self, created_ms: i64, id: &str) -> String {
        let payload = format!("{created_ms}:{id}");
        let mac = Sha256::new().chain_update(self.token_key).chain_update(payload.as_bytes()).finalize();
        format!("{}.{}", hex::encode(payload), hex::encode(&mac[..8]))
    }

    pub(super) fn parse_token(&self, token: &str) -> Result<(i64, String), Status> {
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
    pub(super) async fn events_from(&self, job: &Job, from: u64) -> Result<(Vec<JobEvent>, bool, u64), Status> {
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

    pub(super) async fn watch_job(
        &self,
        req: pb::WatchJobRequest,
        caller: Option<&Principal>,
    ) -> Result<WatchStream, Status> {
        let job = self.lookup(&req.job_id, caller)?;
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

/// A cluster job names its device kind only: `[]` (GPUs, `devices_per_node` of them, every GPU
/// of the node when 0) or `["cpu"]` (`devices_per_node` CPU ranks).
fn check_cluster_devices(spec: &pb::JobSpec, placement: &Placement) -> Result<(), Status> {
    let cpu = spec.devices.iter().any(|d| d.trim().eq_ignore_ascii_case("cpu"));
    if !(spec.devices.is_empty() || (cpu && spec.devices.len() == 1)) {
        return Err(Status::invalid_argument(format!(
            "spec.devices: a {} job's devices are chosen per node; leave devices empty (GPUs) or [\"cpu\"], and set \
             placement.devices_per_node",
            placement.backend.title()
        )));
    }
    if !cpu && placement.devices_per_node == 0 && placement.backend == BackendKind::Slurm {
        return Err(Status::invalid_argument(
            "spec.placement.devices_per_node: a Slurm GPU job must say how many GPUs to request per node (e.g. 8)",
        ));
    }
    Ok(())
}
