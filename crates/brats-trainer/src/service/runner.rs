//! One job's run: prepare the dataset, launch the workers, follow them, decide the end.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::launcher::{self, EXIT_CANCELLED, LaunchSpec, RankExit, WorkerGroup};
use brats_train::dataset::{self, Preprocessor};
use brats_train::events::{EventKind, JobState, TrainOutcome, WorkerLine};
use brats_train::spec::{self};

use super::*;
use crate::launcher::GroupOutcome;

impl TrainerService {
    /// Runs one job from PREPARING to a terminal state (or, on shutdown, leaves it RUNNING in
    /// the store for the next start).
    pub(super) async fn run_job(self, job: Arc<Job>, claim: Claim) {
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
                Some(e) => {
                    Preprocessor::Remote { endpoint: e.clone(), client: self.settings.preprocess_client.clone() }
                }
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

        // A job placed on a cluster engine: submitted there and followed through the store.
        let placement = match crate::cluster::Placement::of(&record.spec) {
            Ok(p) => p,
            Err(e) => return self.finish(&job, JobState::Failed, e.to_string(), "INVALID_ARGUMENT").await,
        };
        if placement.is_cluster() {
            job.inner.lock().await.record.manifest_uri = manifest.to_string();
            let run = self.run_on_cluster(&job, &config, &manifest, placement, &mut cancel, &mut shutdown);
            return run.instrument(info_span!("cluster")).await;
        }

        // Workers.
        let exe = self.settings.worker_exe.clone();
        let mut spec = LaunchSpec::service_worker(
            exe,
            &job.id,
            &record.job_uri,
            &manifest.to_string(),
            config.devices.clone(),
            serde_json::to_string(&self.settings.store_config).expect("store config serialises"),
        );
        spec.env.push((
            crate::cluster::TRACKING_ENV.into(),
            serde_json::to_string(&self.settings.tracking).expect("tracking settings serialise"),
        ));
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
        let ended =
            self.follow_workers(&job, group, lines, &mut cancel, &mut shutdown).instrument(info_span!("train")).await;
        self.metrics.workers.sub(world);

        let finished = match ended {
            WorkersEnded::Interrupted => {
                let mut inner = job.inner.lock().await;
                let _ = self.persist(&mut inner).await;
                info!("shutdown: workers stopped; the job resumes at the next start");
                return;
            }
            WorkersEnded::Cancelled => return self.finish(&job, JobState::Cancelled, String::new(), "").await,
            WorkersEnded::Failed { reason, code } => return self.finish(&job, JobState::Failed, reason, code).await,
            WorkersEnded::Finished(finished) => finished,
        };
        match self.register(&job, &config, &finished).instrument(info_span!("register")).await {
            Ok(()) => self.finish(&job, JobState::Succeeded, String::new(), "").await,
            Err(e) => self.finish(&job, JobState::Failed, format!("registering the model: {e}"), core_code(&e)).await,
        }
    }

    /// Follows the workers until they all exited: their events, cancellation and shutdown.
    pub(super) async fn follow_workers(
        &self,
        job: &Job,
        mut group: WorkerGroup,
        mut lines: tokio::sync::mpsc::UnboundedReceiver<WorkerLine>,
        cancel: &mut watch::Receiver<bool>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> WorkersEnded {
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
        WorkersEnded::decide(outcome, finished, cancelled, stopping)
    }

    /// Records one protocol line of rank 0.
    pub(super) async fn on_line(&self, job: &Job, line: WorkerLine, finished: &mut Option<TrainOutcome>) {
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
                            *write(&job.snapshot) = inner.record.clone();
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
}

/// How following a job's workers ended, and so how the job goes on.
#[derive(Debug)]
pub(super) enum WorkersEnded {
    /// The service is shutting down and the job did not finish: it stays RUNNING in the store
    /// and resumes at the next start.
    Interrupted,
    /// A cancel was requested (even one that raced with the end: a cancelled job registers
    /// nothing).
    Cancelled,
    /// The job fails with this reason and status code name.
    Failed {
        /// What happened, for the job's record.
        reason: String,
        /// The gRPC status code name of the failure.
        code: &'static str,
    },
    /// Every rank exited 0 and rank 0 reported its result: register the model.
    Finished(TrainOutcome),
}

impl WorkersEnded {
    /// Decides from the ranks' exits, rank 0's result line, and whether a cancel or a shutdown
    /// was asked for.
    fn decide(outcome: GroupOutcome, finished: Option<TrainOutcome>, cancelled: bool, stopping: bool) -> WorkersEnded {
        if stopping && !(finished.is_some() && outcome.all_exited_with(0)) {
            return WorkersEnded::Interrupted;
        }
        if cancelled {
            return WorkersEnded::Cancelled;
        }
        if let Some(f) = outcome.failure() {
            return WorkersEnded::Failed { reason: f.describe(), code: f.failure_code() };
        }
        if let Some(r) = outcome.ranks.iter().find(|r| r.exit == RankExit::Code(EXIT_CANCELLED)) {
            let reason = format!("{}, as if cancelled, but no cancel was requested", r.describe());
            return WorkersEnded::Failed { reason, code: "ABORTED" };
        }
        match finished {
            Some(finished) => WorkersEnded::Finished(finished),
            None => WorkersEnded::Failed {
                reason: format!(
                    "worker rank 0 (pid {}) exited with code 0 without reporting a result",
                    outcome.ranks.first().map(|r| r.pid).unwrap_or(0)
                ),
                code: "INTERNAL",
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launcher::RankStatus;

    fn ranks(exits: &[RankExit]) -> GroupOutcome {
        let ranks: Vec<RankStatus> = exits
            .iter()
            .enumerate()
            .map(|(rank, &exit)| RankStatus { rank, node: None, pid: 100 + rank as u32, exit, stderr_tail: Vec::new() })
            .collect();
        let first_failure = ranks.iter().position(|r| r.failed());
        GroupOutcome { ranks, first_failure }
    }

    fn result() -> TrainOutcome {
        TrainOutcome {
            epochs: 2,
            global_step: 10,
            best_metrics: None,
            best_epoch: 0,
            onnx_uri: "file:///j/artifacts/model.onnx".into(),
            metadata_uri: "file:///j/artifacts/metadata.json".into(),
            mlflow_run_id: None,
        }
    }

    #[test]
    fn every_way_a_group_ends() {
        let ok = || ranks(&[RankExit::Code(0), RankExit::Code(0)]);
        assert!(matches!(WorkersEnded::decide(ok(), Some(result()), false, false), WorkersEnded::Finished(_)));
        // Finished before the shutdown reached it: keep the result.
        assert!(matches!(WorkersEnded::decide(ok(), Some(result()), false, true), WorkersEnded::Finished(_)));
        let stopped = ranks(&[RankExit::Code(EXIT_CANCELLED), RankExit::Code(EXIT_CANCELLED)]);
        assert!(matches!(WorkersEnded::decide(stopped.clone(), None, false, true), WorkersEnded::Interrupted));
        assert!(matches!(WorkersEnded::decide(stopped.clone(), None, true, false), WorkersEnded::Cancelled));
        // A cancel that raced with a successful end still cancels.
        assert!(matches!(WorkersEnded::decide(ok(), Some(result()), true, false), WorkersEnded::Cancelled));
        let WorkersEnded::Failed { code, reason } = WorkersEnded::decide(stopped, None, false, false) else { panic!() };
        assert_eq!(code, "ABORTED");
        assert!(reason.contains("as if cancelled"), "{reason}");
        let crashed = ranks(&[RankExit::Signal(libc::SIGKILL), RankExit::Code(0)]);
        let WorkersEnded::Failed { reason, .. } = WorkersEnded::decide(crashed, None, false, false) else { panic!() };
        assert!(reason.contains("rank 0") && reason.contains("SIGKILL"), "{reason}");
        let WorkersEnded::Failed { code, .. } = WorkersEnded::decide(ok(), None, false, false) else { panic!() };
        assert_eq!(code, "INTERNAL");
    }
}
