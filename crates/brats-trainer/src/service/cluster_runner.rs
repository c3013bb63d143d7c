//! A job placed on a cluster engine ([`crate::cluster`]): submitted there, followed through the
//! engine's state and its workers' outbox in the store, cancelled through the engine. The
//! engine only places the workers; everything the job records still goes through this
//! service, so watchers, the event log and registration behave as for a LOCAL job.
//!
//! A trainer that stops while the engine runs the job leaves it running: at the next start
//! the job is recovered, finds its submission still alive and is followed again (the outbox
//! position is kept in the record). ResumeJob of a job whose submission ended submits the next
//! attempt, whose workers resume from the latest checkpoint.

use std::sync::Arc;
use std::time::{Duration, Instant};

use brats_core::store::StoreUri;
use bytes::Bytes;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::cluster::outbox::{self, OutboxReader};
use crate::cluster::{self, BackendKind, ClusterBackend, EngineStatus, Phase, Placement, SubmitRequest};
use crate::jobs::Submission;
use brats_train::events::{EventKind, JobState, TrainOutcome};
use brats_train::spec::{Device, TrainConfig};

use super::*;

/// How often the outbox is read (the engine is asked at its own poll interval).
const OUTBOX_POLL: Duration = Duration::from_secs(1);
/// How long after a cancel the engine gets to report the job ended before the job is marked
/// CANCELLED anyway (on top of the cancel grace the workers get).
const CANCEL_SLACK: Duration = Duration::from_secs(60);

impl TrainerService {
    /// Runs a prepared job on its cluster engine until it ends (or the service stops).
    pub(super) async fn run_on_cluster(
        &self,
        job: &Arc<Job>,
        config: &TrainConfig,
        manifest: &StoreUri,
        placement: Placement,
        cancel: &mut watch::Receiver<bool>,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        let clusters = &self.settings.clusters;
        match placement.backend {
            BackendKind::Slurm if clusters.slurm.is_some() => {
                let backend = clusters.slurm.as_ref().expect("checked");
                self.follow_cluster(backend, job, config, manifest, placement, cancel, shutdown).await
            }
            BackendKind::Kubernetes if clusters.kubernetes.is_some() => {
                let backend = clusters.kubernetes.as_ref().expect("checked");
                self.follow_cluster(backend, job, config, manifest, placement, cancel, shutdown).await
            }
            other => {
                let reason = format!(
                    "spec.placement.backend: {} is no longer configured on this trainer (its configuration changed \
                     since the job started); restore the section or start the job elsewhere",
                    other.title()
                );
                self.finish(job, JobState::Failed, reason, "FAILED_PRECONDITION").await
            }
        }
    }

    /// The request an engine gets for this job's next attempt.
    fn submit_request<B: ClusterBackend>(
        &self,
        backend: &B,
        job: &Job,
        config: &TrainConfig,
        manifest: &StoreUri,
        placement: Placement,
        outbox_uri: String,
    ) -> SubmitRequest {
        let record = job.snapshot();
        let (env, secret_env) =
            cluster::job_env(backend.kind(), &outbox_uri, &self.settings.store_config, &self.settings.tracking);
        SubmitRequest {
            job_id: job.id.clone(),
            job_uri: record.job_uri.clone(),
            manifest_uri: manifest.to_string(),
            outbox_uri,
            placement,
            cpu: config.devices.iter().all(|d| *d == Device::Cpu),
            env,
            secret_env,
        }
    }

    /// Submits (or finds the live submission again), then follows it to its end.
    #[allow(clippy::too_many_arguments)]
    async fn follow_cluster<B: ClusterBackend>(
        &self,
        backend: &B,
        job: &Arc<Job>,
        config: &TrainConfig,
        manifest: &StoreUri,
        placement: Placement,
        cancel: &mut watch::Receiver<bool>,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        let engine = backend.kind().title();
        let submission = match self.live_submission(backend, job).await {
            Some(s) => s,
            None => match self.submit(backend, job, config, manifest, placement).await {
                Ok(s) => s,
                Err((reason, code)) => return self.finish(job, JobState::Failed, reason, code).await,
            },
        };
        let outbox_dir = match StoreUri::parse(&submission.outbox_uri) {
            Ok(u) => u,
            Err(e) => return self.finish(job, JobState::Failed, format!("the job's outbox: {e}"), "INTERNAL").await,
        };
        let mut reader = OutboxReader::starting_at(outbox_dir.clone(), submission.lines_read);
        let mut finished: Option<TrainOutcome> = None;
        let mut cancel_deadline: Option<Instant> = None;
        let mut next_status = Instant::now();
        let mut last_pending_reason = String::new();
        let mut ticker = tokio::time::interval(OUTBOX_POLL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end: EngineStatus = loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = wait_true(cancel), if cancel_deadline.is_none() => {
                    info!(engine, id = %submission.engine_id, "cancelling through the engine");
                    if let Err(e) = backend.cancel(&submission.engine_id).await {
                        warn!(error = %e, "the engine refused the cancel");
                        let mut inner = job.inner.lock().await;
                        let note = EventKind::warn(format!("cancelling {engine} job {}: {e}", submission.engine_id));
                        let _ = self.emit(job, &mut inner, note, Durability::Now).await;
                    }
                    cancel_deadline = Some(Instant::now() + self.settings.cancel_grace + CANCEL_SLACK);
                    next_status = Instant::now() + Duration::from_secs(1);
                    continue;
                }
                _ = wait_true(shutdown) => {
                    let mut inner = job.inner.lock().await;
                    let _ = self.persist(&mut inner).await;
                    info!(engine, id = %submission.engine_id, "shutdown: the engine keeps running the job; it is followed again at the next start");
                    return;
                }
            }
            self.read_outbox(job, &mut reader, &mut finished).await;
            if let Some(at) = cancel_deadline
                && Instant::now() > at
            {
                warn!("the engine did not report the cancelled job ended in time");
                break EngineStatus {
                    phase: Phase::Ended,
                    state: "CANCEL_TIMEOUT".into(),
                    reason: String::new(),
                    exit_code: String::new(),
                };
            }
            if Instant::now() < next_status {
                continue;
            }
            next_status = Instant::now() + backend.poll_interval();
            let status = match backend.status(&submission.engine_id).await {
                Ok(s) => s,
                Err(e) => {
                    // The engine's API or commands are unreachable: the job goes on there.
                    warn!(error = %e, "cannot read the engine's state; retrying");
                    continue;
                }
            };
            match status.phase {
                Phase::Pending => {
                    if status.reason != last_pending_reason {
                        last_pending_reason = status.reason.clone();
                        let mut inner = job.inner.lock().await;
                        let note = EventKind::info(format!(
                            "{engine} job {} is pending ({})",
                            submission.engine_id,
                            if status.reason.is_empty() || status.reason == "None" {
                                &status.state
                            } else {
                                &status.reason
                            }
                        ));
                        let _ = self.emit(job, &mut inner, note, Durability::Now).await;
                    }
                }
                Phase::Running => {
                    self.mark_running(job).await;
                    if !backend.observes() {
                        let failed = outbox::node_failures(&self.stores, &outbox_dir).await.unwrap_or_default();
                        if finished.is_some() || !failed.is_empty() {
                            break status;
                        }
                    }
                }
                Phase::Succeeded | Phase::Ended => break status,
            }
        };
        // Lines written just before the end.
        self.read_outbox(job, &mut reader, &mut finished).await;
        {
            let mut inner = job.inner.lock().await;
            if let Err(e) = self.persist(&mut inner).await {
                warn!(error = %e, "cannot write the job's events");
            }
        }
        if cancel_deadline.is_some() || *cancel.borrow() {
            return self.finish(job, JobState::Cancelled, String::new(), "").await;
        }
        let succeeded = end.phase == Phase::Succeeded || (!backend.observes() && end.phase == Phase::Running);
        match finished {
            Some(outcome) if succeeded => {
                match self.register(job, config, &outcome).instrument(info_span!("register")).await {
                    Ok(()) => self.finish(job, JobState::Succeeded, String::new(), "").await,
                    Err(e) => {
                        self.finish(job, JobState::Failed, format!("registering the model: {e}"), core_code(&e)).await
                    }
                }
            }
            _ => {
                let (reason, code) = self.failure_of(&end, engine, &submission, &outbox_dir).await;
                self.finish(job, JobState::Failed, reason, code).await
            }
        }
    }

    /// The job's submission when the engine still runs it (a trainer restart), else None.
    async fn live_submission<B: ClusterBackend>(&self, backend: &B, job: &Job) -> Option<Submission> {
        let submission = job.snapshot().submission.filter(|s| s.backend == backend.kind())?;
        match backend.status(&submission.engine_id).await {
            Ok(s) if matches!(s.phase, Phase::Pending | Phase::Running) && backend.observes() => {
                info!(id = %submission.engine_id, "following the job's running submission again");
                Some(submission)
            }
            _ => None,
        }
    }

    /// Renders, keeps a copy next to the outbox, submits and records the submission.
    async fn submit<B: ClusterBackend>(
        &self,
        backend: &B,
        job: &Job,
        config: &TrainConfig,
        manifest: &StoreUri,
        placement: Placement,
    ) -> Result<Submission, (String, &'static str)> {
        let record = job.snapshot();
        let engine = backend.kind().title();
        let attempt = record.submission.as_ref().map_or(0, |s| s.attempt + 1);
        let outbox_uri = format!("{}cluster/{attempt}/", record.job_uri);
        let request = self.submit_request(backend, job, config, manifest, placement, outbox_uri.clone());
        let copy = match backend.kind() {
            BackendKind::Slurm => "job.sbatch",
            _ => "trainjob.json",
        };
        let copy_uri = StoreUri::parse(&outbox_uri).map(|d| d.join(copy)).map_err(|e| (e.to_string(), "INTERNAL"))?;
        if let Err(e) = self.stores.put(&copy_uri, Bytes::from(backend.render(&request))).await {
            return Err((format!("writing {copy_uri}: {e}"), core_code(&e)));
        }
        let engine_id =
            backend.submit(&request).await.map_err(|e| (format!("submitting to {engine}: {e}"), "UNAVAILABLE"))?;
        let submission = Submission { backend: backend.kind(), engine_id, attempt, outbox_uri, lines_read: 0 };
        info!(engine, id = %submission.engine_id, attempt, "submitted");
        let mut inner = job.inner.lock().await;
        inner.record.submission = Some(submission.clone());
        let note = EventKind::info(format!(
            "submitted to {engine} as {}: {} node(s) × {} worker(s); {copy_uri}",
            submission.engine_id,
            placement.nodes,
            placement.nproc_per_node(request.cpu)
        ));
        let _ = self.emit(job, &mut inner, note, Durability::Now).await;
        Ok(submission)
    }

    /// Applies the outbox's new lines and remembers how far it was read.
    async fn read_outbox(&self, job: &Job, reader: &mut OutboxReader, finished: &mut Option<TrainOutcome>) {
        let lines = match reader.poll(&self.stores).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot read the workers' outbox; retrying");
                return;
            }
        };
        if lines.is_empty() {
            return;
        }
        self.mark_running(job).await;
        for line in lines {
            self.on_line(job, line, finished).await;
        }
        let mut inner = job.inner.lock().await;
        if let Some(s) = inner.record.submission.as_mut() {
            s.lines_read = reader.position();
        }
        inner.dirty = true;
    }

    /// PREPARING → RUNNING once the engine runs the workers.
    async fn mark_running(&self, job: &Job) {
        let mut inner = job.inner.lock().await;
        if inner.record.state == JobState::Preparing {
            let _ = self.transition(job, &mut inner, JobState::Running, String::new(), Durability::Now).await;
        }
    }

    /// The failure reason: the engine's end, and what each failed node reported.
    async fn failure_of(
        &self,
        end: &EngineStatus,
        engine: &str,
        submission: &Submission,
        outbox_dir: &StoreUri,
    ) -> (String, &'static str) {
        let mut reason = end.describe(engine, &submission.engine_id);
        let failures = outbox::node_failures(&self.stores, outbox_dir).await.unwrap_or_default();
        for (i, f) in failures.iter().enumerate() {
            let order = if i == 0 { "first" } else { "then" };
            reason.push_str(&format!("; {order} node {} ({}): {}", f.node, f.host, f.failure));
        }
        if failures.is_empty() {
            reason.push_str("; no node reported a worker failure (the engine stopped the job: preempted, timed out, cancelled outside the trainer, or a node was lost); ResumeJob continues from the latest checkpoint");
        }
        let code = match failures.first().map(|f| f.code.as_str()) {
            Some("RESOURCE_EXHAUSTED") => "RESOURCE_EXHAUSTED",
            Some("UNAVAILABLE") => "UNAVAILABLE",
            Some("INTERNAL") => "INTERNAL",
            _ => "ABORTED",
        };
        (reason, code)
    }
}
