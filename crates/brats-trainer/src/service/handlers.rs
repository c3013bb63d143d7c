//! The `brats.v1.Trainer` trait: each RPC unwrapped, traced, counted and handed to the
//! service's request logic ([`super::requests`]).

use brats_proto::v1 as pb;
use brats_service::redact::RequestUris;
use brats_service::security::Principal;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info_span};

use super::*;

#[tonic::async_trait]
impl pb::trainer_server::Trainer for TrainerService {
    async fn start_job(&self, request: Request<pb::StartJobRequest>) -> Result<Response<pb::Job>, Status> {
        let caller = request.extensions().get::<Principal>().cloned();
        let req = request.into_inner();
        let locations = spec_locations(req.spec.as_ref());
        let span = info_span!("start_job", job_id = %req.job_id);
        let r = TrainerService::start_job(self, req, caller.as_ref())
            .instrument(span)
            .await
            .map_err(|s| locations.status(s));
        self.observe("StartJob", &r);
        r.map(Response::new)
    }

    async fn get_job(&self, request: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let caller = request.extensions().get::<Principal>().cloned();
        let req = request.into_inner();
        let r = info_span!("get_job", job_id = %req.job_id)
            .in_scope(|| self.lookup(&req.job_id, caller.as_ref()).map(|j| j.snapshot().to_proto()));
        self.observe("GetJob", &r);
        r.map(Response::new)
    }

    async fn list_jobs(&self, request: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        let caller = request.extensions().get::<Principal>().cloned();
        let r =
            info_span!("list_jobs").in_scope(|| TrainerService::list_jobs(self, request.into_inner(), caller.as_ref()));
        self.observe("ListJobs", &r);
        r.map(Response::new)
    }

    async fn cancel_job(&self, request: Request<pb::CancelJobRequest>) -> Result<Response<pb::Job>, Status> {
        let caller = request.extensions().get::<Principal>().cloned();
        let req = request.into_inner();
        let span = info_span!("cancel_job", job_id = %req.job_id);
        let r = TrainerService::cancel_job(self, req, caller.as_ref()).instrument(span).await;
        self.observe("CancelJob", &r);
        r.map(Response::new)
    }

    async fn resume_job(&self, request: Request<pb::ResumeJobRequest>) -> Result<Response<pb::Job>, Status> {
        let caller = request.extensions().get::<Principal>().cloned();
        let req = request.into_inner();
        let span = info_span!("resume_job", job_id = %req.job_id);
        let r = TrainerService::resume_job(self, req, caller.as_ref()).instrument(span).await;
        self.observe("ResumeJob", &r);
        r.map(Response::new)
    }

    type WatchJobStream = WatchStream;

    async fn watch_job(&self, request: Request<pb::WatchJobRequest>) -> Result<Response<WatchStream>, Status> {
        let caller = request.extensions().get::<Principal>().cloned();
        let r = TrainerService::watch_job(self, request.into_inner(), caller.as_ref()).await;
        self.observe("WatchJob", &r);
        r.map(Response::new)
    }
}

/// The locations a job spec names (the only request URIs the trainer takes), for redacting
/// the statuses `StartJob` answers with.
fn spec_locations(spec: Option<&pb::JobSpec>) -> RequestUris {
    spec.map_or_else(RequestUris::new, |spec| {
        RequestUris::new()
            .with("spec.datalist_uri", &spec.datalist_uri)
            .with("spec.base_uri", &spec.base_uri)
            .with("spec.resume_from", &spec.resume_from)
            .with("spec.init_weights_uri", &spec.init_weights_uri)
    })
}
