//! The `brats.v1.Preprocessor` gRPC service: a thin shell over [`crate::jobs`] that checks
//! request fields, maps errors to status codes, bounds concurrency and records metrics.

use crate::jobs::{self, CaseJob, CaseOutput};
use crate::pipeline::{CropMode, Options};
use brats_core::labels::LabelConvention;
use brats_core::nifti_io::ReadLimits;
use brats_core::store::{StoreUri, Stores};
use brats_proto::v1 as pb;
use bytes::Bytes;
use futures::StreamExt;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};
use sha2::{Digest, Sha256};
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
pub struct ServiceState {
    stores: Arc<Stores>,
    root: StoreUri,
    limits: ReadLimits,
    slots: Arc<Semaphore>,
    max_waiting: usize,
    max_parallel: usize,
    metrics: Metrics,
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
        }))
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

type ProgressStream = Pin<Box<dyn futures::Stream<Item = Result<pb::PreprocessDatasetProgress, Status>> + Send>>;

#[tonic::async_trait]
impl pb::preprocessor_server::Preprocessor for PreprocessService {
    async fn preprocess_case(
        &self,
        request: Request<pb::PreprocessCaseRequest>,
    ) -> Result<Response<pb::PreprocessCaseResponse>, Status> {
        let started = Instant::now();
        let req = request.into_inner();
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
            let seed = req.seed.unwrap_or_else(|| crate::pipeline::case_seed(&case_id));
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

    type PreprocessDatasetStream = ProgressStream;

    async fn preprocess_dataset(
        &self,
        request: Request<pb::PreprocessDatasetRequest>,
    ) -> Result<Response<ProgressStream>, Status> {
        let started = Instant::now();
        let req = request.into_inner();
        let span = info_span!("preprocess_dataset");
        let prepared = async {
            let datalist = parse_uri("datalist_uri", &req.datalist_uri)?;
            let base = if req.base_uri.is_empty() { datalist.parent() } else { parse_uri("base_uri", &req.base_uri)? };
            let sections = if req.sections.is_empty() {
                vec!["training".to_string(), "validation".to_string()]
            } else {
                req.sections.clone()
            };
            let json = self.stores.get(&datalist).await.map_err(|e| field_err("datalist_uri", e))?;
            let cases = jobs::parse_datalist(&json, &base, &sections, &datalist.file_name())
                .map_err(|e| field_err("datalist_uri", e))?;
            let options = options(req.label_convention, req.crop.as_ref(), None, 0)?;
            let output_root =
                if req.output_uri.is_empty() { self.root.clone() } else { parse_uri("output_uri", &req.output_uri)? };
            Ok::<_, Status>((datalist, cases, options, output_root))
        }
        .instrument(span.clone())
        .await;
        let (datalist, cases, options, output_root) = match prepared {
            Ok(p) => p,
            Err(s) => {
                self.observe("PreprocessDataset", started, &Err::<(), _>(s.clone()));
                return Err(s);
            }
        };
        let dataset_key = {
            let record = serde_json::json!({"datalist": datalist.to_string(), "sections": req.sections, "options": options, "pipeline": crate::pipeline::PIPELINE_VERSION});
            hex::encode(&Sha256::digest(record.to_string().as_bytes())[..8])
        };
        let parallel =
            if req.max_parallel == 0 { self.max_parallel } else { (req.max_parallel as usize).min(self.max_parallel) };
        let total = cases.len() as u32;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let this = self.clone();
        let force = req.force;
        tokio::spawn(
            async move {
                let mut results = futures::stream::iter(cases.into_iter().enumerate().map(|(position, c)| {
                    let this = this.clone();
                    let options = options.clone();
                    let root = output_root.clone();
                    async move {
                        let t = Instant::now();
                        // Each case draws its own crop from a seed derived from its id.
                        let seed = u64::from_le_bytes(Sha256::digest(c.case_id.as_bytes())[..8].try_into().unwrap());
                        let job = CaseJob {
                            case_id: c.case_id.clone(),
                            images: c.images,
                            label: c.label,
                            options: Options { seed, ..options },
                            output: None,
                            force,
                        };
                        let r = this.run_in_slot(job, &root).await;
                        (position, c.case_id, c.section, r, t.elapsed().as_secs_f64())
                    }
                }))
                .buffer_unordered(parallel);
                let (mut completed, mut reused, mut failed) = (0u32, 0u32, 0u32);
                // Cases finish in any order; the manifest lists them in datalist order, so a dataset
                // index means the same case in every run (samplers and resumes rely on it).
                let mut manifest: std::collections::BTreeMap<String, Vec<(usize, serde_json::Value)>> = Default::default();
                while let Some((position, case_id, section, r, seconds)) = results.next().await {
                    completed += 1;
                    let outcome = match r {
                        Ok(out) => {
                            reused += out.reused as u32;
                            manifest.entry(section.clone()).or_default().push((position, serde_json::json!({
                                "case_id": case_id, "tensors": out.tensors_uri.to_string(), "metadata": out.metadata_uri.to_string()
                            })));
                            pb::CaseOutcome { case_id, section, tensors_uri: out.tensors_uri.to_string(), reused: out.reused, seconds, ..Default::default() }
                        }
                        Err(s) => {
                            failed += 1;
                            pb::CaseOutcome { case_id, section, error: s.message().to_string(), error_code: code_name(s.code()).to_string(), seconds, ..Default::default() }
                        }
                    };
                    let progress = pb::PreprocessDatasetProgress { total, completed, reused, failed, case: Some(outcome), ..Default::default() };
                    if tx.send(Ok(progress)).await.is_err() {
                        info!("client went away; cases finished so far are kept and reused next time");
                        return;
                    }
                }
                let manifest: std::collections::BTreeMap<String, Vec<serde_json::Value>> = manifest
                    .into_iter()
                    .map(|(section, mut cases)| {
                        cases.sort_by_key(|(position, _)| *position);
                        (section, cases.into_iter().map(|(_, case)| case).collect())
                    })
                    .collect();
                let manifest_uri = output_root.join(&format!("datasets/{dataset_key}/manifest.json"));
                let body = serde_json::json!({ "datalist": datalist.to_string(), "pipeline_version": crate::pipeline::PIPELINE_VERSION, "cases": manifest });
                let manifest_written = this.stores.put(&manifest_uri, Bytes::from(serde_json::to_vec_pretty(&body).unwrap())).await;
                let last = match manifest_written {
                    Ok(()) => Ok(pb::PreprocessDatasetProgress { total, completed, reused, failed, done: true, manifest_uri: manifest_uri.to_string(), case: None }),
                    Err(e) => Err(to_status(e)),
                };
                info!(total, completed, reused, failed, "dataset done");
                let _ = tx.send(last).await;
            }
            .instrument(span),
        );
        self.observe("PreprocessDataset", started, &Ok::<(), Status>(()));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as ProgressStream))
    }
}
