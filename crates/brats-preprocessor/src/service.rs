//! The `brats.v1.Preprocessor` gRPC service: a thin shell over [`brats_preprocess::jobs`] that checks
//! request fields, maps errors to status codes, bounds concurrency and records metrics.

use brats_core::labels::LabelConvention;
use brats_core::nifti_io::ReadLimits;
use brats_core::store::{StoreUri, Stores};
use brats_preprocess::dataset::{CaseOutcome, Counts, DatasetEvent, DatasetPlan, DatasetSpec};
use brats_preprocess::jobs::{self, CaseJob, CaseOutput};
use brats_preprocess::pipeline::{CropMode, Options};
use brats_proto::v1 as pb;
use brats_service::redact::RequestUris;
use brats_service::security::Principal;
use brats_service::security::tenants::UriPolicy;
use futures::StreamExt;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info, info_span, warn};

/// Prometheus instruments of the service.
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    stages: HistogramVec,
    cases: IntCounterVec,
    in_flight: IntGauge,
    queued: IntGauge,
}

impl Metrics {
    /// Creates and registers the instruments.
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("brats_preprocess_requests_total", "RPCs answered, by method and status code"),
            &["method", "code"],
        )
        .unwrap();
        let buckets = vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
        let latency = HistogramVec::new(
            HistogramOpts::new("brats_preprocess_request_seconds", "RPC latency").buckets(buckets.clone()),
            &["method"],
        )
        .unwrap();
        let stages = HistogramVec::new(
            HistogramOpts::new("brats_preprocess_stage_seconds", "Time per pipeline stage").buckets(buckets),
            &["stage"],
        )
        .unwrap();
        let cases = IntCounterVec::new(
            Opts::new("brats_preprocess_cases_total", "Cases handled, by outcome (computed, reused, failed)"),
            &["outcome"],
        )
        .unwrap();
        let in_flight = IntGauge::new("brats_preprocess_cases_in_flight", "Cases being preprocessed now").unwrap();
        let queued = IntGauge::new("brats_preprocess_cases_queued", "Cases waiting for a slot").unwrap();
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(stages.clone()),
            Box::new(cases.clone()),
            Box::new(in_flight.clone()),
            Box::new(queued.clone()),
        ] {
            registry.register(c).unwrap();
        }
        Metrics { registry, requests, latency, stages, cases, in_flight, queued }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Shared state of the service.
#[derive(Clone)]
pub struct ServiceState {
    stores: Arc<Stores>,
    root: StoreUri,
    limits: ReadLimits,
    slots: Arc<Semaphore>,
    max_waiting: usize,
    max_parallel: usize,
    metrics: Metrics,
    uris: UriPolicy,
}

/// The gRPC handler: a cheap handle on the shared [`ServiceState`].
#[derive(Clone)]
pub struct PreprocessService(Arc<ServiceState>);

impl std::ops::Deref for PreprocessService {
    type Target = ServiceState;
    fn deref(&self) -> &ServiceState {
        &self.0
    }
}

impl PreprocessService {
    /// Creates the service writing by default under `root`.
    pub fn new(
        stores: Arc<Stores>,
        root: StoreUri,
        limits: ReadLimits,
        max_parallel: usize,
        max_queue: usize,
        metrics: Metrics,
    ) -> Self {
        PreprocessService(Arc::new(ServiceState {
            stores,
            root,
            limits,
            slots: Arc::new(Semaphore::new(max_parallel.max(1))),
            max_waiting: max_queue,
            max_parallel: max_parallel.max(1),
            metrics,
            uris: UriPolicy::default(),
        }))
    }

    /// The same service with request URIs checked against the callers' tenants
    /// (`[server.tenants]`); before any request is served.
    pub fn with_uri_policy(self, uris: UriPolicy) -> Self {
        let mut state = Arc::try_unwrap(self.0).unwrap_or_else(|shared| ServiceState::clone(&shared));
        state.uris = uris;
        PreprocessService(Arc::new(state))
    }
}

impl ServiceState {
    /// Runs one case in a concurrency slot, refusing when too many are already waiting.
    async fn run_in_slot(&self, job: CaseJob, root: &StoreUri) -> Result<CaseOutput, Status> {
        if self.slots.available_permits() == 0 && self.metrics.queued.get() as usize >= self.max_waiting {
            return Err(Status::resource_exhausted(format!(
                "{} cases are running and {} waiting; retry later or raise max_queue",
                self.max_parallel, self.max_waiting
            )));
        }
        self.metrics.queued.inc();
        let permit = self.slots.clone().acquire_owned().await;
        self.metrics.queued.dec();
        let _permit =
            permit.map_err(|_| Status::unavailable("the service is shutting down; retry on another instance"))?;
        self.metrics.in_flight.inc();
        let result = jobs::run_case(self.stores.clone(), job, root, self.limits).await;
        self.metrics.in_flight.dec();
        match &result {
            Ok(out) => {
                self.metrics.cases.with_label_values(&[if out.reused { "reused" } else { "computed" }]).inc();
                for (stage, s) in &out.timings {
                    self.metrics.stages.with_label_values(&[stage]).observe(*s);
                }
            }
            Err(_) => self.metrics.cases.with_label_values(&["failed"]).inc(),
        }
        result.map_err(to_status)
    }

    /// `PreprocessCase` with its statuses not yet redacted.
    async fn preprocess_case_unredacted(
        &self,
        req: pb::PreprocessCaseRequest,
        principal: Option<&Principal>,
    ) -> Result<Response<pb::PreprocessCaseResponse>, Status> {
        let started = Instant::now();
        self.uris.check_all(principal, "image_uris", &req.image_uris)?;
        self.uris.check_fields(principal, &[("label_uri", &req.label_uri), ("output_uri", &req.output_uri)])?;
        let case_id = if req.case_id.is_empty() { "case".to_string() } else { req.case_id.clone() };
        let span = info_span!("preprocess_case", case_id = %case_id, images = req.image_uris.len());
        let result = async {
            jobs::validate_case_id(&case_id).map_err(|e| field_err("case_id", e))?;
            if req.image_uris.len() != 4 && req.image_uris.len() != 1 {
                return Err(Status::invalid_argument(format!(
                    "image_uris: {} URIs given; give 4 (T1c, T1, T2, FLAIR in that order) or one 4D file",
                    req.image_uris.len()
                )));
            }
            let images = req
                .image_uris
                .iter()
                .enumerate()
                .map(|(i, u)| parse_uri(&format!("image_uris[{i}]"), u))
                .collect::<Result<Vec<_>, _>>()?;
            let label = if req.label_uri.is_empty() { None } else { Some(parse_uri("label_uri", &req.label_uri)?) };
            let output = if req.output_uri.is_empty() { None } else { Some(parse_uri("output_uri", &req.output_uri)?) };
            let seed = req.seed.unwrap_or_else(|| brats_preprocess::pipeline::case_seed(&case_id));
            let options = options(req.label_convention, req.crop.as_ref(), req.augmentation.as_ref(), seed)?;
            let job = CaseJob { case_id: case_id.clone(), images, label, options, output, force: req.force };
            let out = self.run_in_slot(job, &self.root).await?;
            info!(reused = out.reused, seconds = started.elapsed().as_secs_f64(), "case done");
            Ok(Response::new(pb::PreprocessCaseResponse {
                case_id: out.case_id,
                tensors_uri: out.tensors_uri.to_string(),
                metadata_uri: out.metadata_uri.to_string(),
                metadata: Some(metadata_to_pb(&out.metadata)),
                reused: out.reused,
                timings: out.timings.iter().map(|(s, v)| pb::StageTiming { stage: s.clone(), seconds: *v }).collect(),
            }))
        }
        .instrument(span.clone())
        .await;
        if let Err(s) = &result {
            span.in_scope(|| warn!(code = ?s.code(), "request failed"));
        }
        self.observe("PreprocessCase", started, &result);
        result
    }

    fn observe<T>(&self, method: &str, started: Instant, r: &Result<T, Status>) {
        let code = match r {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.metrics.requests.with_label_values(&[method, &format!("{code:?}")]).inc();
        self.metrics.latency.with_label_values(&[method]).observe(started.elapsed().as_secs_f64());
    }
}

use brats_service::field_status as field_err;
pub use brats_service::{code_name, status as to_status};

fn label_convention(v: i32) -> Result<LabelConvention, Status> {
    match pb::LabelConvention::try_from(v) {
        Ok(pb::LabelConvention::Unspecified | pb::LabelConvention::Brats2018) => Ok(LabelConvention::Brats2018),
        Ok(pb::LabelConvention::Brats2023) => Ok(LabelConvention::Brats2023),
        Ok(pb::LabelConvention::Brats2015) => Ok(LabelConvention::Brats2015),
        Err(_) => Err(Status::invalid_argument(format!(
            "label_convention: unknown value {v}; use BRATS2018, BRATS2023 or BRATS2015"
        ))),
    }
}

/// Builds pipeline options from the request's crop, augmentation and seed fields.
fn options(
    convention: i32,
    crop: Option<&pb::CropSpec>,
    aug: Option<&pb::Augmentation>,
    seed: u64,
) -> Result<Options, Status> {
    let mut o = Options { label_convention: label_convention(convention)?, seed, ..Options::default() };
    if let Some(c) = crop {
        o.crop = match pb::CropMode::try_from(c.mode) {
            Ok(pb::CropMode::Unspecified | pb::CropMode::None) => CropMode::None,
            Ok(pb::CropMode::Center) => CropMode::Center,
            Ok(pb::CropMode::Random) => CropMode::Random,
            Ok(pb::CropMode::Foreground) => CropMode::Foreground,
            Err(_) => return Err(Status::invalid_argument(format!("crop.mode: unknown value {}", c.mode))),
        };
        match c.size.len() {
            0 => {}
            3 => o.crop_size = [c.size[0] as usize, c.size[1] as usize, c.size[2] as usize],
            n => {
                return Err(Status::invalid_argument(format!(
                    "crop.size: {n} values given; give 3 (X, Y, Z), e.g. 224, 224, 144, or none for the default"
                )));
            }
        }
        if c.foreground_multiple > 0 {
            o.foreground_multiple = c.foreground_multiple as usize;
        }
    }
    if let Some(a) = aug {
        o.random_flip = a.random_flip;
        if a.flip_prob > 0.0 {
            o.flip_prob = a.flip_prob as f64;
        }
        o.intensity_scale = a.intensity_scale;
        o.intensity_shift = a.intensity_shift;
    }
    o.validate().map_err(|e| field_err("crop/augmentation", e))?;
    Ok(o)
}

fn parse_uri(field: &str, s: &str) -> Result<StoreUri, Status> {
    StoreUri::parse(s).map_err(|e| field_err(field, e))
}

/// Converts a core metadata record into its protobuf form.
pub fn metadata_to_pb(m: &brats_core::CaseMetadata) -> pb::CaseMetadata {
    pb::CaseMetadata {
        original_shape: m.original_shape.iter().map(|&v| v as u32).collect(),
        shape: m.shape.iter().map(|&v| v as u32).collect(),
        affine: m.affine.iter().flatten().copied().collect(),
        spacing: m.spacing.to_vec(),
        crop_box: Some(pb::CropBox {
            start: m.crop_box.start.iter().map(|&v| v as i32).collect(),
            size: m.crop_box.size.iter().map(|&v| v as u32).collect(),
        }),
        label_convention: match m.label_convention {
            LabelConvention::Brats2018 => pb::LabelConvention::Brats2018,
            LabelConvention::Brats2023 => pb::LabelConvention::Brats2023,
            LabelConvention::Brats2015 => pb::LabelConvention::Brats2015,
        } as i32,
        pipeline_version: m.pipeline_version.clone(),
        channels: m
            .channels
            .iter()
            .map(|c| pb::ChannelStats {
                name: c.name.clone(),
                mean: c.mean,
                std: c.std,
                nonzero_voxels: c.nonzero_voxels,
                min: c.min,
                max: c.max,
            })
            .collect(),
        flipped: m.flipped.to_vec(),
        intensity_scale: m.intensity_scale,
        intensity_shift: m.intensity_shift,
        has_label: m.has_label,
    }
}

/// The stream of `PreprocessDataset` progress messages.
pub type ProgressStream = Pin<Box<dyn futures::Stream<Item = Result<pb::PreprocessDatasetProgress, Status>> + Send>>;

#[tonic::async_trait]
impl pb::preprocessor_server::Preprocessor for PreprocessService {
    async fn preprocess_case(
        &self,
        request: Request<pb::PreprocessCaseRequest>,
    ) -> Result<Response<pb::PreprocessCaseResponse>, Status> {
        let principal = request.extensions().get::<Principal>().cloned();
        let req = request.into_inner();
        let locations = case_locations(&req);
        self.preprocess_case_unredacted(req, principal.as_ref()).await.map_err(|s| locations.status(s))
    }

    type PreprocessDatasetStream = ProgressStream;

    async fn preprocess_dataset(
        &self,
        request: Request<pb::PreprocessDatasetRequest>,
    ) -> Result<Response<ProgressStream>, Status> {
        let started = Instant::now();
        let principal = request.extensions().get::<Principal>().cloned();
        let req = request.into_inner();
        let locations = dataset_locations(&req);
        self.uris
            .check_fields(
                principal.as_ref(),
                &[("datalist_uri", &req.datalist_uri), ("base_uri", &req.base_uri), ("output_uri", &req.output_uri)],
            )
            .map_err(|s| locations.status(s))?;
        let span = info_span!("preprocess_dataset");
        let plan = plan_dataset(&self.stores, &req, &self.root).instrument(span.clone()).await.and_then(|plan| {
            // The datalist names the cases' files: each must lie inside the tenant too.
            for uri in plan.input_uris() {
                self.uris.check(principal.as_ref(), "datalist_uri (a case's image or label)", &uri.to_string())?;
            }
            Ok(plan)
        });
        self.observe("PreprocessDataset", started, &plan);
        let parallel =
            if req.max_parallel == 0 { self.max_parallel } else { (req.max_parallel as usize).min(self.max_parallel) };
        let this = self.clone();
        let events = plan.map_err(|s| locations.status(s))?.run(self.stores.clone(), parallel, move |job, root| {
            let this = this.clone();
            async move { this.run_in_slot(job, &root).await }
        });
        Ok(Response::new(progress_stream(events, span, locations)))
    }
}

/// Checks a `PreprocessDataset` request and reads its datalist (`default_root` when the
/// request names no output).
pub async fn plan_dataset(
    stores: &Stores,
    req: &pb::PreprocessDatasetRequest,
    default_root: &StoreUri,
) -> Result<DatasetPlan, Status> {
    let datalist = parse_uri("datalist_uri", &req.datalist_uri)?;
    let base = if req.base_uri.is_empty() { None } else { Some(parse_uri("base_uri", &req.base_uri)?) };
    let options = options(req.label_convention, req.crop.as_ref(), None, 0)?;
    let output_root =
        if req.output_uri.is_empty() { default_root.clone() } else { parse_uri("output_uri", &req.output_uri)? };
    let spec = DatasetSpec { datalist, base, sections: req.sections.clone(), options, output_root, force: req.force };
    DatasetPlan::load(stores, spec).await.map_err(|e| field_err(e.field, e.source))
}

/// Preprocesses a `PreprocessDataset` request in this process, without the service's slots
/// (the trainer's in-process mode): the progress messages the service would stream.
pub async fn preprocess_dataset_in_process(
    stores: Arc<Stores>,
    req: &pb::PreprocessDatasetRequest,
    parallel: usize,
) -> Result<ProgressStream, Status> {
    let locations = dataset_locations(req);
    let default_root = parse_uri("output_uri", &req.output_uri).map_err(|s| locations.status(s))?;
    let plan = plan_dataset(&stores, req, &default_root).await.map_err(|s| locations.status(s))?;
    let parallel = if req.max_parallel == 0 { parallel } else { (req.max_parallel as usize).min(parallel) };
    let events = plan.run_local(stores, parallel).map(|e| map_event(e, to_status));
    Ok(progress_stream(events, info_span!("preprocess_dataset"), locations))
}

/// The locations a `PreprocessCase` request names, for redacting its statuses.
fn case_locations(req: &pb::PreprocessCaseRequest) -> RequestUris {
    RequestUris::new()
        .with_each("image_uris", &req.image_uris)
        .with("label_uri", &req.label_uri)
        .with("output_uri", &req.output_uri)
}

/// The locations a `PreprocessDataset` request names, for redacting its statuses and the
/// errors of its cases.
fn dataset_locations(req: &pb::PreprocessDatasetRequest) -> RequestUris {
    RequestUris::new()
        .with("datalist_uri", &req.datalist_uri)
        .with("base_uri", &req.base_uri)
        .with("output_uri", &req.output_uri)
}

/// The progress messages of a running dataset, driven by a task of their own (so a slow
/// reader never stalls the cases; a reader that goes away stops new cases from starting).
/// Every error message, a case's or the dataset's, is redacted of the request's `locations`.
fn progress_stream<S>(events: S, span: tracing::Span, locations: RequestUris) -> ProgressStream
where
    S: futures::Stream<Item = DatasetEvent<Status>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(
        async move {
            let mut events = std::pin::pin!(events);
            while let Some(event) = events.next().await {
                let (message, done) = progress_pb(event, &locations);
                if tx.send(message).await.is_err() {
                    info!("client went away; cases finished so far are kept and reused next time");
                    return;
                }
                if done {
                    return;
                }
            }
        }
        .instrument(span),
    );
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

fn map_event<E>(e: DatasetEvent<E>, f: impl Fn(E) -> Status) -> DatasetEvent<Status> {
    match e {
        DatasetEvent::Case(counts, o) => DatasetEvent::Case(
            counts,
            Box::new(CaseOutcome {
                case_id: o.case_id,
                section: o.section,
                result: o.result.map_err(f),
                seconds: o.seconds,
            }),
        ),
        DatasetEvent::Done(counts, r) => DatasetEvent::Done(counts, r),
    }
}

/// One event as the proto's progress message, its error messages redacted of `locations`;
/// true for the last.
fn progress_pb(
    event: DatasetEvent<Status>,
    locations: &RequestUris,
) -> (Result<pb::PreprocessDatasetProgress, Status>, bool) {
    let progress = |c: Counts| pb::PreprocessDatasetProgress {
        total: c.total,
        completed: c.completed,
        reused: c.reused,
        failed: c.failed,
        ..Default::default()
    };
    match event {
        DatasetEvent::Case(counts, o) => {
            let CaseOutcome { case_id, section, seconds, result } = *o;
            let case = match result {
                Ok(out) => pb::CaseOutcome {
                    case_id,
                    section,
                    tensors_uri: out.tensors_uri.to_string(),
                    reused: out.reused,
                    seconds,
                    ..Default::default()
                },
                Err(s) => pb::CaseOutcome {
                    case_id,
                    section,
                    error: locations.redact(s.message()),
                    error_code: code_name(s.code()).to_string(),
                    seconds,
                    ..Default::default()
                },
            };
            (Ok(pb::PreprocessDatasetProgress { case: Some(case), ..progress(counts) }), false)
        }
        DatasetEvent::Done(c, written) => {
            info!(total = c.total, completed = c.completed, reused = c.reused, failed = c.failed, "dataset done");
            let message = written.map(|(uri, _)| pb::PreprocessDatasetProgress {
                done: true,
                manifest_uri: uri.to_string(),
                ..progress(c)
            });
            (message.map_err(|e| locations.status(to_status(e))), true)
        }
    }
}
