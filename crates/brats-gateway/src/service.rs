//! The `brats.v1.Gateway` gRPC service: submit a study from a DICOMweb archive (pull mode), get,
//! list and watch study jobs, check a destination. A thin shell over [`crate::jobs::Runner`] and
//! [`crate::dicomweb`]; the webhook ([`crate::server`]) submits through [`GatewayService::submit`].

use crate::config::{GatewayConfig, Source};
use crate::dicomweb::{Archive, DicomWebError};
use crate::jobs::{JobRecord, JobState, Prepared, Runner, Target};
use brats_proto::v1 as pb;
use brats_service::security::Principal;
use brats_service::security::audit::{Action, AuditEvent, AuditLog, Outcome, Resource};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// The service's state (cheap to clone).
#[derive(Clone)]
pub struct GatewayService {
    runner: Arc<Runner>,
    config: Arc<GatewayConfig>,
    audit: AuditLog,
}

/// Longest page of ListJobs.
const MAX_PAGE: usize = 1000;

impl GatewayService {
    /// A service over `runner`, with the sources, destinations and limits of `config`.
    pub fn new(runner: Arc<Runner>, config: Arc<GatewayConfig>, audit: AuditLog) -> Self {
        GatewayService { runner, config, audit }
    }

    /// Pull mode: fetches the MR series of `study_uid` from source `source` into the spool,
    /// chooses the four series and returns the job (running on in the background when
    /// SELECTED). The webhook and SubmitStudy both come here.
    pub async fn submit(&self, source: &str, study_uid: &str, caller: Option<&Principal>) -> Result<JobRecord, Status> {
        let (source, study_uid) = self.check_submission(source, study_uid)?;
        self.pull(&source, &study_uid, caller).await
    }

    /// The checks made before anything is fetched: a well-formed UID, a known source, free
    /// space. Returns the source and the trimmed UID.
    pub fn check_submission(&self, source: &str, study_uid: &str) -> Result<(Source, String), Status> {
        let study_uid = study_uid.trim();
        if study_uid.is_empty() {
            return Err(Status::invalid_argument("study_instance_uid: required; give the study's StudyInstanceUID"));
        }
        if study_uid.len() > 64 || !study_uid.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return Err(Status::invalid_argument(
                "study_instance_uid: not a DICOM UID (digits and dots, at most 64 characters)",
            ));
        }
        let source = self.config.source(source).map_err(|e| {
            if self.config.sources.len() > 1 && source.is_empty() {
                Status::invalid_argument(format!("source: {e}"))
            } else {
                Status::not_found(format!("source: {e}"))
            }
        })?;
        let spool = &self.runner.spool;
        let min_free = self.config.dimse.min_free_mb << 20;
        if spool.free_bytes().is_some_and(|free| free < min_free) {
            return Err(Status::resource_exhausted(format!(
                "the spool's file system has less than dimse.min_free_mb = {} MiB free; free space and retry",
                self.config.dimse.min_free_mb
            )));
        }
        Ok((source.clone(), study_uid.to_string()))
    }

    /// Fetches the study's MR series from `source` and prepares its job (see [`Self::submit`]).
    pub async fn pull(
        &self,
        source: &Source,
        study_uid: &str,
        caller: Option<&Principal>,
    ) -> Result<JobRecord, Status> {
        let spool = &self.runner.spool;
        let started = Instant::now();
        let archive = Archive::new(&source.url).map_err(|e| dicomweb_status(&e))?;
        let series = archive.series(study_uid).await.map_err(|e| dicomweb_status(&e))?;
        let mr: Vec<_> = series.iter().filter(|s| s.modality == "MR").collect();
        let study = spool.study_hash(study_uid);
        if mr.is_empty() {
            return Err(Status::not_found(format!(
                "study {study} (hashed): source {} lists {} series and no MR series; check the study UID and the archive",
                source.name,
                series.len()
            )));
        }
        let mut staging = spool.staging().map_err(|e| Status::internal(format!("spool: {e}")))?;
        for (n, s) in mr.iter().enumerate() {
            let fetched = archive.retrieve_series(study_uid, &s.uid, staging.dir(), &format!("s{n}")).await;
            match fetched {
                Ok(files) => files.into_iter().for_each(|f| staging.add(study.clone(), f)),
                Err(e) => {
                    spool.discard(staging, &[]);
                    return Err(dicomweb_status(&e));
                }
            }
        }
        let instances = staging.len();
        spool.commit(staging, &[]).map_err(|e| Status::internal(format!("spool: {e}")))?;
        let fetch_s = started.elapsed().as_secs_f64();
        tracing::info!(study, source = %source.name, series = mr.len(), instances, seconds = fetch_s, "study fetched");
        let dir = spool.study_dir(&study);
        let origin = format!("dicomweb:{}", source.name);
        let prepared = self
            .runner
            .prepare(&study, &dir, &origin, vec![("fetch".into(), fetch_s)])
            .await
            .map_err(|e| Status::internal(format!("job: {e:#}")))?;
        match prepared {
            Prepared::Settled(record) => Ok(record),
            Prepared::Run(job) => {
                let record = job.record.clone();
                self.audit_job(&record.id, Action::JobStarted, "pulled", caller);
                let runner = self.runner.clone();
                tokio::spawn(async move {
                    if let Err(e) = runner.complete(job).await {
                        tracing::error!(error = %e, "pulled job failed");
                    }
                });
                Ok(record)
            }
        }
    }

    /// The hashed name of a study (as in job records and logs).
    pub fn study_hash(&self, study_uid: &str) -> String {
        self.runner.spool.study_hash(study_uid)
    }

    fn audit_job(&self, job_id: &str, action: Action, reason: &str, caller: Option<&Principal>) {
        let mut event = AuditEvent::new("study_job", action, Outcome::Succeeded, tonic::Code::Ok);
        event.reason = reason;
        event.principal = caller;
        event.resource = Some(Resource { kind: "study_job", id: job_id });
        if let Err(e) = self.audit.record(event) {
            tracing::warn!(job_id, error = %e, "audit record of a study job could not be written");
        }
    }

    async fn get(&self, job_id: &str) -> Result<JobRecord, Status> {
        if job_id.trim().is_empty() {
            return Err(Status::invalid_argument("job_id: required"));
        }
        if !job_id.chars().all(|c| c.is_ascii_hexdigit()) || job_id.len() != 16 {
            return Err(Status::not_found(format!("job_id {job_id:?}: no such job (ids are 16 hex digits)")));
        }
        self.runner.load(job_id).await.map_err(|e| match e.kind() {
            brats_core::ErrorKind::NotFound => Status::not_found(format!("job_id {job_id}: no such job")),
            _ => brats_service::status(e),
        })
    }
}

/// The status a client acts on for a DICOMweb failure.
fn dicomweb_status(e: &DicomWebError) -> Status {
    match e {
        DicomWebError::Unavailable { .. } | DicomWebError::Status { .. } | DicomWebError::Malformed { .. } => {
            Status::unavailable(format!("{e}; check the source's url and that the archive is up, then retry"))
        }
        DicomWebError::Write(_) => Status::internal(e.to_string()),
    }
}

/// The wire form of a job record.
pub fn job_to_pb(r: &JobRecord) -> pb::StudyJob {
    let state = match r.state {
        JobState::Selected => pb::StudyJobState::Selected,
        JobState::SegWritten => pb::StudyJobState::SegWritten,
        JobState::Exporting => pb::StudyJobState::Exporting,
        JobState::Done => pb::StudyJobState::Done,
        JobState::Rejected => pb::StudyJobState::Rejected,
        JobState::Failed => pb::StudyJobState::Failed,
    };
    let volumes = r.volumes.as_ref();
    let (error_code, error_message) = r.error.clone().unwrap_or_default();
    pb::StudyJob {
        job_id: r.id.clone(),
        study: r.study.clone(),
        state: state as i32,
        series: r
            .series
            .iter()
            .map(|(role, series)| pb::SeriesChoice { role: role.name().to_string(), series: series.clone() })
            .collect(),
        grid: volumes
            .and_then(|v| v.get("grid"))
            .map(|g| g.as_str().map(String::from).unwrap_or_else(|| g.to_string()))
            .unwrap_or_default(),
        warnings: volumes
            .and_then(|v| v.get("warnings"))
            .and_then(|w| w.as_array())
            .map(|a| a.iter().filter_map(|w| w.as_str().map(String::from)).collect())
            .unwrap_or_default(),
        seg_series_uid: r.seg_series_uid.clone().unwrap_or_default(),
        seg_frames: r.seg_frames.unwrap_or(0) as u32,
        volumes_ml: r.volumes_ml.map(|v| v.to_vec()).unwrap_or_default(),
        timings: r
            .timings
            .iter()
            .map(|(stage, seconds)| pb::StageTiming { stage: stage.clone(), seconds: *seconds })
            .collect(),
        exports: r
            .exports
            .iter()
            .map(|e| pb::DestinationExport {
                destination: e.destination.clone(),
                stored: e.stored,
                attempts: e.attempts,
                error: e.error.clone().unwrap_or_default(),
            })
            .collect(),
        error_code,
        error_message,
        origin: r.origin.clone(),
        updated_at: (r.updated_ms > 0).then(|| brats_proto::timestamp_from_ms(r.updated_ms)),
    }
}

fn state_from_pb(s: pb::StudyJobState) -> Option<JobState> {
    Some(match s {
        pb::StudyJobState::Unspecified => return None,
        pb::StudyJobState::Selected => JobState::Selected,
        pb::StudyJobState::SegWritten => JobState::SegWritten,
        pb::StudyJobState::Exporting => JobState::Exporting,
        pb::StudyJobState::Done => JobState::Done,
        pb::StudyJobState::Rejected => JobState::Rejected,
        pb::StudyJobState::Failed => JobState::Failed,
    })
}

/// The stream WatchJob answers with.
type WatchStream = ReceiverStream<Result<pb::StudyJob, Status>>;

#[tonic::async_trait]
impl pb::gateway_server::Gateway for GatewayService {
    async fn submit_study(&self, request: Request<pb::SubmitStudyRequest>) -> Result<Response<pb::StudyJob>, Status> {
        let caller = request.extensions().get::<Principal>().cloned();
        let req = request.into_inner();
        let record = self.submit(&req.source, &req.study_instance_uid, caller.as_ref()).await?;
        Ok(Response::new(job_to_pb(&record)))
    }

    async fn get_job(&self, request: Request<pb::GetStudyJobRequest>) -> Result<Response<pb::StudyJob>, Status> {
        let record = self.get(&request.into_inner().job_id).await?;
        Ok(Response::new(job_to_pb(&record)))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListStudyJobsRequest>,
    ) -> Result<Response<pb::ListStudyJobsResponse>, Status> {
        let req = request.into_inner();
        let size = match req.page_size as usize {
            0 => 50,
            n if n > MAX_PAGE => {
                return Err(Status::invalid_argument(format!("page_size {n}: at most {MAX_PAGE}")));
            }
            n => n,
        };
        let offset = if req.page_token.is_empty() {
            0
        } else {
            req.page_token
                .strip_prefix("o")
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| Status::invalid_argument("page_token: not issued by this server; start without one"))?
        };
        let states: Vec<JobState> = req.states().filter_map(state_from_pb).collect();
        let records = self.runner.list().await.map_err(brats_service::status)?;
        let matching: Vec<&JobRecord> =
            records.iter().filter(|r| states.is_empty() || states.contains(&r.state)).collect();
        let page: Vec<pb::StudyJob> = matching.iter().skip(offset).take(size).map(|r| job_to_pb(r)).collect();
        let next = offset + page.len();
        Ok(Response::new(pb::ListStudyJobsResponse {
            jobs: page,
            next_page_token: if next < matching.len() { format!("o{next}") } else { String::new() },
        }))
    }

    type WatchJobStream = WatchStream;

    async fn watch_job(&self, request: Request<pb::WatchStudyJobRequest>) -> Result<Response<WatchStream>, Status> {
        let first = self.get(&request.into_inner().job_id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let runner = self.runner.clone();
        tokio::spawn(async move {
            let mut last = first;
            if tx.send(Ok(job_to_pb(&last))).await.is_err() {
                return;
            }
            while !last.state.is_terminal() {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if tx.is_closed() {
                    return;
                }
                match runner.load(&last.id).await {
                    Ok(now) if now != last => {
                        last = now;
                        if tx.send(Ok(job_to_pb(&last))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(brats_service::status(e))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn echo_destination(
        &self,
        request: Request<pb::EchoDestinationRequest>,
    ) -> Result<Response<pb::EchoDestinationResponse>, Status> {
        let name = request.into_inner().destination;
        if name.trim().is_empty() {
            return Err(Status::invalid_argument("destination: required; name a configured destination"));
        }
        let Some(destination) = self.config.destinations.iter().find(|d| d.name == name) else {
            let names: Vec<&str> = self.config.destinations.iter().map(|d| d.name.as_str()).collect();
            return Err(Status::not_found(format!(
                "destination {name:?}: not configured; configured: {}",
                if names.is_empty() { "none".to_string() } else { names.join(", ") }
            )));
        };
        let started = Instant::now();
        let (kind, answer) = match destination.target() {
            Ok(Target::Dimse(peer)) => {
                ("dimse", crate::scu::echo(&peer, &self.runner.calling_ae).await.map_err(|e| e.to_string()))
            }
            Ok(Target::Stow(url)) => (
                "dicomweb",
                match Archive::new(&url) {
                    Ok(archive) => archive.echo().await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                },
            ),
            Err(e) => return Err(Status::failed_precondition(e)),
        };
        Ok(Response::new(pb::EchoDestinationResponse {
            ok: answer.is_ok(),
            kind: kind.into(),
            seconds: started.elapsed().as_secs_f64(),
            error: answer.err().unwrap_or_default(),
        }))
    }
}
