//! The `brats.v1.Inference` gRPC service: models from the registry (alias hot reload, warm-up
//! before SERVING), `Segment` on store URIs, `SegmentStream` for clients without shared storage,
//! `ListModels` / `GetModel`. A thin shell over [`crate::segment`].

use crate::models::{LoadedModel, ModelManager};
use crate::runtime::{Provider, SessionOptions};
use crate::segment::{SegmentError, Segmentation, infer_preprocessed, segment_cancellable};
use brats_artifacts::registry::Registry;
use brats_artifacts::window::{Blend, Extent, SlidingWindow};
use brats_core::error::CoreError;
use brats_core::nifti_io::ReadLimits;
use brats_core::store::{StoreUri, Stores};
use brats_preprocess::jobs::fetch_all;
use brats_preprocess::pipeline::InputFile;
use brats_proto::v1 as pb;
use brats_service::redact::RequestUris;
use brats_service::security::Principal;
use brats_service::security::tenants::UriPolicy;
use bytes::Bytes;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry as PromRegistry};
use sha2::{Digest, Sha256};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info, info_span, warn};

/// Prometheus instruments of the service.
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: PromRegistry,
    requests: IntCounterVec,
    stages: HistogramVec,
    queued: IntGauge,
    running: IntGauge,
    provider: IntGaugeVec,
}

impl Metrics {
    /// Creates and registers the instruments.
    pub fn new() -> Self {
        let registry = PromRegistry::new();
        let requests = IntCounterVec::new(
            Opts::new("brats_inference_requests_total", "RPCs answered, by method and code"),
            &["method", "code"],
        )
        .unwrap();
        let buckets = vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
        let stages = HistogramVec::new(
            HistogramOpts::new("brats_inference_stage_seconds", "Latency per pipeline stage (and total)")
                .buckets(buckets),
            &["stage"],
        )
        .unwrap();
        let queued = IntGauge::new("brats_inference_queue_depth", "Requests waiting for a slot").unwrap();
        let running = IntGauge::new("brats_inference_running", "Segmentations running now").unwrap();
        let provider = IntGaugeVec::new(
            Opts::new("brats_inference_provider", "1 for the execution provider serving the default model"),
            &["provider"],
        )
        .unwrap();
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(stages.clone()),
            Box::new(queued.clone()),
            Box::new(running.clone()),
            Box::new(provider.clone()),
        ] {
            registry.register(c).unwrap();
        }
        Metrics { registry, requests, stages, queued, running, provider }
    }
}

impl Metrics {
    /// Marks `provider` as the one serving the default model.
    pub(crate) fn set_provider(&self, provider: Provider) {
        self.provider.reset();
        self.provider.with_label_values(&[provider.name()]).set(1);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Everything the handlers share.
pub struct State {
    stores: Arc<Stores>,
    models: Arc<ModelManager>,
    output_root: StoreUri,
    window: SlidingWindow,
    slots: Arc<Semaphore>,
    max_concurrent: usize,
    max_queue: usize,
    metrics: Metrics,
    counter: AtomicU64,
    /// Moving average of how long a segmentation holds its slot, in ms (0 until one finished):
    /// the basis of the retry hint a refused request gets.
    slot_ms: AtomicU64,
    preprocessor: Option<brats_cli::AuthChannel>,
    /// Where callers may point request URIs.
    pub(crate) uris: UriPolicy,
}

/// The gRPC handler: a cheap handle on the shared [`State`].
#[derive(Clone)]
pub struct InferenceService(pub Arc<State>);

impl std::ops::Deref for InferenceService {
    type Target = State;
    fn deref(&self) -> &State {
        &self.0
    }
}

use brats_service::{field_status as with_field, status as core_status};

fn segment_status(e: SegmentError) -> Status {
    match e {
        SegmentError::Input(c) => core_status(c),
        SegmentError::Inference(i) => Status::internal(i.to_string()),
        SegmentError::Cancelled => {
            Status::cancelled("the request was cancelled or its deadline passed; nothing was written")
        }
    }
}

fn provider_pb(p: Provider) -> pb::ExecutionProvider {
    match p {
        Provider::TensorRt => pb::ExecutionProvider::Tensorrt,
        Provider::Cuda => pb::ExecutionProvider::Cuda,
        Provider::Cpu => pb::ExecutionProvider::Cpu,
    }
}

/// Sets the flag when dropped: a dropped request future (client gone, deadline passed) stops
/// the blocking work at the next window.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A finished request's outputs in memory.
struct Outcome {
    response: pb::SegmentResponse,
    label_nifti: Bytes,
    probabilities: Option<Bytes>,
}

/// Settings of the service, from [`crate::config::InferenceConfig`].
pub struct ServiceSettings {
    /// Registry root.
    pub registry: StoreUri,
    /// Default output root.
    pub output_root: StoreUri,
    /// Default model name.
    pub model: String,
    /// Default alias.
    pub alias: String,
    /// Session options.
    pub session: SessionOptions,
    /// Default sliding window.
    pub window: SlidingWindow,
    /// Concurrent segmentations.
    pub max_concurrent: usize,
    /// Waiting requests before RESOURCE_EXHAUSTED.
    pub max_queue: usize,
    /// Preprocessing service to use for `Segment` (None = in-process): a channel carrying
    /// this service's TLS identity and credentials (`[server.client]`).
    pub preprocessor: Option<brats_cli::AuthChannel>,
    /// Where callers may point request URIs (`[server.tenants]`; default: anywhere).
    pub uris: UriPolicy,
}

/// What a segmentation starts from.
enum Input {
    /// Raw modality files, preprocessed in-process.
    Files(Vec<InputFile>),
    /// Tensors from the preprocessing service, the T1c header, and the time spent so far.
    Preprocessed(Box<brats_core::tensors::CaseTensors>, Box<nifti::NiftiHeader>, Vec<(String, f64)>),
}

impl InferenceService {
    /// Creates the service; no model is loaded until [`InferenceService::load_default`].
    pub fn new(stores: Arc<Stores>, settings: ServiceSettings, metrics: Metrics) -> Self {
        let slots = Arc::new(Semaphore::new(settings.max_concurrent.max(1)));
        let models = ModelManager::new(
            Registry::new(stores.clone(), settings.registry),
            settings.session,
            settings.model,
            settings.alias,
            slots.clone(),
        );
        InferenceService(Arc::new(State {
            stores,
            models: Arc::new(models),
            output_root: settings.output_root,
            window: settings.window,
            slots,
            max_concurrent: settings.max_concurrent.max(1),
            max_queue: settings.max_queue,
            metrics,
            counter: AtomicU64::new(0),
            slot_ms: AtomicU64::new(0),
            preprocessor: settings.preprocessor,
            uris: settings.uris,
        }))
    }

    /// The registry the service reads.
    pub fn registry(&self) -> &Registry {
        self.models.registry()
    }

    /// The models the service holds (default alias, pinned versions, loads).
    pub fn models(&self) -> &Arc<ModelManager> {
        &self.models
    }

    /// Loads the default model's alias and makes it current (see
    /// [`ModelManager::load_default`]). Returns whether the version changed.
    pub async fn load_default(&self, warmup: Option<[usize; 3]>) -> Result<bool, CoreError> {
        let changed = self.models.load_default(warmup).await?;
        if let Some(c) = self.current() {
            self.metrics.set_provider(c.model.provider());
        }
        Ok(changed)
    }

    /// The service's instruments.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The model serving the default alias, if loaded.
    pub fn current(&self) -> Option<Arc<LoadedModel>> {
        self.models.current()
    }

    fn window_for(&self, o: Option<&pb::SegmentOptions>) -> Result<(SlidingWindow, bool), Status> {
        let mut w = self.window;
        let mut probabilities = false;
        if let Some(o) = o {
            if let Some(ov) = o.overlap {
                if !(0.0..1.0).contains(&ov) {
                    return Err(Status::invalid_argument(format!(
                        "options.overlap {ov} must be in [0, 1) (bundle: 0.5)"
                    )));
                }
                w.overlap = ov as f64;
            }
            match o.roi_size.len() {
                0 => {}
                3 if o.roi_size.iter().all(|&r| r > 0 && r % 8 == 0 && r <= 512) => {
                    w.roi = [o.roi_size[0] as usize, o.roi_size[1] as usize, o.roi_size[2] as usize]
                }
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "options.roi_size {:?}: give 3 positive multiples of 8 up to 512 (bundle: 240, 240, 160)",
                        o.roi_size
                    )));
                }
            }
            if o.foreground_crop {
                w.extent = Extent::FOREGROUND;
            }
            w.blend = match pb::BlendMode::try_from(o.blend_mode) {
                Ok(pb::BlendMode::Gaussian) => Blend::Gaussian,
                Ok(_) => Blend::Constant,
                Err(_) => {
                    return Err(Status::invalid_argument(format!("options.blend_mode {} is unknown", o.blend_mode)));
                }
            };
            w.mirror = o.test_time_mirroring;
            probabilities = o.write_probabilities;
        }
        Ok((w, probabilities))
    }

    /// Runs one segmentation on inputs in memory, in a slot.
    async fn run(
        &self,
        request_id: &str,
        input: Input,
        model: Arc<LoadedModel>,
        options: Option<&pb::SegmentOptions>,
        queued_at: Instant,
        mut progress: Box<dyn FnMut(usize, usize) + Send>,
    ) -> Result<Outcome, Status> {
        let (window, write_probabilities) = self.window_for(options)?;
        if let Some(o) = options {
            let wanted: Vec<i32> = o.providers.clone();
            let running = provider_pb(model.model.provider()) as i32;
            if !wanted.is_empty() && !wanted.contains(&running) && !o.allow_fallback {
                return Err(Status::failed_precondition(format!(
                    "this server runs model {} on {}; the request allows only {:?} (set allow_fallback or use another server)",
                    model.version,
                    model.model.provider().name(),
                    wanted
                        .iter()
                        .filter_map(|p| pb::ExecutionProvider::try_from(*p).ok())
                        .map(|p| p.as_str_name())
                        .collect::<Vec<_>>()
                )));
            }
        }
        let _permit = self.acquire().await?;
        let slot_held = Instant::now();
        let queue_seconds = queued_at.elapsed().as_secs_f64();
        let cancel = Arc::new(AtomicBool::new(false));
        let _guard = CancelOnDrop(cancel.clone());
        self.metrics.running.inc();
        let m = model.clone();
        let result =
            tokio::task::spawn_blocking(move || -> Result<(Segmentation, f64, Bytes, Option<Bytes>), SegmentError> {
                let seg = match input {
                    Input::Files(images) => segment_cancellable(
                        &m.model,
                        &images,
                        &window,
                        write_probabilities,
                        &ReadLimits::default(),
                        &cancel,
                        &mut *progress,
                    )?,
                    Input::Preprocessed(tensors, header, timings) => infer_preprocessed(
                        &m.model,
                        &tensors,
                        *header,
                        &window,
                        write_probabilities,
                        &cancel,
                        &mut *progress,
                        timings,
                    )?,
                };
                let t = Instant::now();
                let label = Bytes::from(seg.label_nifti()?);
                let probs = match &seg.logits {
                    Some(l) => {
                        let p: Vec<u8> = l.iter().flat_map(|v| (1.0f32 / (1.0 + (-v).exp())).to_le_bytes()).collect();
                        let [x, y, z] = seg.shape;
                        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![3, x, y, z], &p)
                            .map_err(|e| CoreError::Internal(e.to_string()))?;
                        Some(Bytes::from(
                            safetensors::serialize([("probabilities", view)], None)
                                .map_err(|e| CoreError::Internal(e.to_string()))?,
                        ))
                    }
                    None => None,
                };
                Ok((seg, t.elapsed().as_secs_f64(), label, probs))
            })
            .await;
        self.metrics.running.dec();
        if matches!(result, Ok(Ok(_))) {
            self.record_slot_time(slot_held.elapsed());
        }
        let (seg, encode_seconds, label_nifti, probabilities) =
            result.map_err(|e| Status::internal(format!("segmentation task failed: {e}")))?.map_err(segment_status)?;
        let stage = |name: &str| seg.timings.iter().filter(|(s, _)| s == name).map(|(_, v)| v).sum::<f64>();
        let timings = pb::InferenceTimings {
            queue_seconds,
            decode_seconds: stage("decompress") + stage("convert"),
            preprocess_seconds: stage("normalise") + stage("remote_preprocess"),
            transfer_seconds: stage("transfer"),
            inference_seconds: stage("inference"),
            postprocess_seconds: stage("postprocess"),
            encode_seconds,
            ..Default::default()
        };
        let [tc, wt, et] = seg.volumes_ml;
        let response = pb::SegmentResponse {
            request_id: request_id.to_string(),
            volumes: Some(pb::RegionVolumes { tc_ml: tc, wt_ml: wt, et_ml: et }),
            provider: provider_pb(model.model.provider()) as i32,
            fallback: model.fallback_reason.is_some(),
            fallback_reason: model.fallback_reason.clone().unwrap_or_default(),
            model_name: model.name.clone(),
            model_version: model.version.clone(),
            timings: Some(timings),
            shape: seg.shape.iter().map(|&v| v as u32).collect(),
            label_map_sha256: hex::encode(Sha256::digest(&label_nifti)),
            ..Default::default()
        };
        Ok(Outcome { response, label_nifti, probabilities })
    }

    /// Folds one segmentation's slot time into the moving average (weight 1/8 per sample).
    fn record_slot_time(&self, held: std::time::Duration) {
        let ms = (held.as_millis() as u64).max(1);
        let _ = self.slot_ms.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
            Some(if old == 0 { ms } else { (old * 7 + ms) / 8 })
        });
    }

    /// When a refused request should come back: the time for the running and waiting requests
    /// to drain at the recent pace (1 s before any segmentation has finished).
    fn retry_after(&self) -> std::time::Duration {
        let slot_ms = match self.slot_ms.load(Ordering::Relaxed) {
            0 => 1000,
            ms => ms,
        };
        let rounds = (self.max_queue + self.max_concurrent).div_ceil(self.max_concurrent) as u64;
        std::time::Duration::from_millis(slot_ms * rounds)
    }

    async fn acquire(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        if self.slots.available_permits() == 0 && self.metrics.queued.get() as usize >= self.max_queue {
            let after = self.retry_after();
            let mut status = Status::resource_exhausted(format!(
                "{} segmentations running and {} waiting; retry in about {:.0} s (grpc-retry-pushback-ms)",
                self.max_concurrent,
                self.max_queue,
                after.as_secs_f64().ceil()
            ));
            // gRPC's retry-throttling key: clients with a retry policy wait this long.
            status.metadata_mut().insert(
                "grpc-retry-pushback-ms",
                after.as_millis().to_string().parse().expect("digits are valid metadata"),
            );
            return Err(status);
        }
        self.metrics.queued.inc();
        let permit = self.slots.clone().acquire_owned().await;
        self.metrics.queued.dec();
        permit.map_err(|_| Status::unavailable("the service is shutting down; retry on another instance"))
    }

    /// Writes outputs under `prefix`, probabilities first and the label map last.
    async fn store_outputs(&self, prefix: &StoreUri, out: &mut Outcome) -> Result<(), Status> {
        let t = Instant::now();
        if let Some(p) = &out.probabilities {
            let uri = prefix.join(crate::PROBABILITIES_FILE);
            self.stores.put(&uri, p.clone()).await.map_err(|e| with_field("output_uri", e))?;
            out.response.probabilities_uri = uri.to_string();
        }
        let uri = prefix.join(crate::LABEL_MAP_FILE);
        if let Err(e) = self.stores.put(&uri, out.label_nifti.clone()).await {
            if !out.response.probabilities_uri.is_empty() {
                let _ = self.stores.delete(&prefix.join(crate::PROBABILITIES_FILE)).await;
            }
            return Err(with_field("output_uri", e));
        }
        out.response.label_map_uri = uri.to_string();
        if let Some(t2) = out.response.timings.as_mut() {
            t2.store_seconds = t.elapsed().as_secs_f64();
        }
        Ok(())
    }

    /// Preprocesses through the preprocessing service: it writes the tensors under
    /// `<prefix>/prep`, we read them back; the T1c header is read for the output's geometry.
    async fn remote_preprocess(
        &self,
        channel: brats_cli::AuthChannel,
        request_id: &str,
        image_uris: &[String],
        t1c: &StoreUri,
        prefix: &StoreUri,
    ) -> Result<Input, Status> {
        let t = Instant::now();
        let mut client = pb::preprocessor_client::PreprocessorClient::new(channel);
        let req = pb::PreprocessCaseRequest {
            case_id: request_id.to_string(),
            image_uris: image_uris.to_vec(),
            output_uri: prefix.join("prep").to_string(),
            ..Default::default()
        };
        let resp = client
            .preprocess_case(req)
            .await
            .map_err(|s| Status::new(s.code(), format!("preprocessing service: {}", s.message())))?
            .into_inner();
        let remote = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let tensors_uri = StoreUri::parse(&resp.tensors_uri).map_err(core_status)?;
        let bytes = self.stores.get(&tensors_uri).await.map_err(core_status)?;
        let tensors = brats_core::tensors::CaseTensors::from_bytes(&bytes, &resp.tensors_uri).map_err(core_status)?;
        let raw = self.stores.get(t1c).await.map_err(|e| with_field("image_uris[0]", e))?;
        let header = tokio::task::spawn_blocking(move || {
            let name = "T1c";
            let inflated = brats_core::nifti_io::decompress(&raw, name, 1 << 31)?;
            brats_core::nifti_io::read_header(&inflated, name)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| with_field("image_uris[0]", e))?;
        let transfer = t.elapsed().as_secs_f64();
        Ok(Input::Preprocessed(
            Box::new(tensors),
            Box::new(header),
            vec![("remote_preprocess".into(), remote), ("transfer".into(), transfer)],
        ))
    }

    fn request_id(&self, given: &str) -> Result<String, Status> {
        if given.is_empty() {
            let n = self.counter.fetch_add(1, Ordering::Relaxed);
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
            return Ok(format!("req-{t}-{n}"));
        }
        brats_preprocess::jobs::validate_case_id(given).map_err(|e| with_field("request_id", e))?;
        Ok(given.to_string())
    }

    fn observe(&self, method: &str, code: tonic::Code, timings: Option<&pb::InferenceTimings>) {
        self.metrics.requests.with_label_values(&[method, brats_service::code_name(code)]).inc();
        if let Some(t) = timings {
            for (s, v) in [
                ("queue", t.queue_seconds),
                ("fetch", t.fetch_seconds),
                ("decode", t.decode_seconds),
                ("preprocess", t.preprocess_seconds),
                ("inference", t.inference_seconds),
                ("postprocess", t.postprocess_seconds),
                ("encode", t.encode_seconds),
                ("store", t.store_seconds),
                ("total", t.total_seconds),
            ] {
                self.metrics.stages.with_label_values(&[s]).observe(v);
            }
        }
    }
}

type ResponseStream = Pin<Box<dyn futures::Stream<Item = Result<pb::SegmentStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::inference_server::Inference for InferenceService {
    async fn segment(&self, request: Request<pb::SegmentRequest>) -> Result<Response<pb::SegmentResponse>, Status> {
        let principal = request.extensions().get::<Principal>().cloned();
        let req = request.into_inner();
        let locations = RequestUris::new().with_each("image_uris", &req.image_uris).with("output_uri", &req.output_uri);
        self.segment_unredacted(req, principal.as_ref()).await.map(Response::new).map_err(|s| locations.status(s))
    }

    type SegmentStreamStream = ResponseStream;

    async fn segment_stream(
        &self,
        request: Request<tonic::Streaming<pb::SegmentStreamRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let principal = request.extensions().get::<Principal>().cloned();
        crate::stream::segment_stream(self.clone(), request.into_inner(), principal).await
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        crate::catalog::list_models(&self.models, &request.into_inner()).await.map(Response::new)
    }

    async fn get_model(&self, request: Request<pb::GetModelRequest>) -> Result<Response<pb::Model>, Status> {
        crate::catalog::get_model(&self.models, &request.into_inner().name).await.map(Response::new)
    }
}

impl InferenceService {
    /// `Segment` with its statuses not yet redacted.
    async fn segment_unredacted(
        &self,
        req: pb::SegmentRequest,
        principal: Option<&Principal>,
    ) -> Result<pb::SegmentResponse, Status> {
        let started = Instant::now();
        self.uris.check_all(principal, "image_uris", &req.image_uris)?;
        self.uris.check_fields(principal, &[("output_uri", &req.output_uri)])?;
        let request_id = self.request_id(&req.request_id)?;
        let span = info_span!("segment", request_id = %request_id);
        let result = async {
            if req.image_uris.len() != 4 && req.image_uris.len() != 1 {
                return Err(Status::invalid_argument(format!(
                    "image_uris: {} URIs given; give 4 (T1c, T1, T2, FLAIR in that order) or one 4D file",
                    req.image_uris.len()
                )));
            }
            let uris = req
                .image_uris
                .iter()
                .enumerate()
                .map(|(i, u)| StoreUri::parse(u).map_err(|e| with_field(&format!("image_uris[{i}]"), e)))
                .collect::<Result<Vec<_>, _>>()?;
            let prefix = if req.output_uri.is_empty() {
                self.output_root.join(&request_id)
            } else {
                StoreUri::parse(&req.output_uri).map_err(|e| with_field("output_uri", e))?
            };
            let model = self.models.select(req.model.as_ref()).await?;
            let t = Instant::now();
            let input = match &self.preprocessor {
                None => Input::Files(fetch_all(&self.stores, &uris).await.map_err(|e| with_field("image_uris", e))?),
                Some(channel) => self.remote_preprocess(channel.clone(), &request_id, &req.image_uris, &uris[0], &prefix).await?,
            };
            let fetch_seconds = t.elapsed().as_secs_f64();
            let mut out = self.run(&request_id, input, model, req.options.as_ref(), started, Box::new(|_, _| {})).await?;
            self.store_outputs(&prefix, &mut out).await?;
            if let Some(t) = out.response.timings.as_mut() {
                t.fetch_seconds = fetch_seconds;
                t.total_seconds = started.elapsed().as_secs_f64();
            }
            info!(model = %out.response.model_name, version = %out.response.model_version, seconds = started.elapsed().as_secs_f64(), "segmented");
            Ok(out.response)
        }
        .instrument(span.clone())
        .await;
        match &result {
            Ok(r) => self.observe("Segment", tonic::Code::Ok, r.timings.as_ref()),
            Err(s) => {
                span.in_scope(|| warn!(code = ?s.code(), "segment failed"));
                self.observe("Segment", s.code(), None)
            }
        }
        result
    }

    /// Runs a request whose inputs arrived over a stream (see [`crate::stream`]).
    pub(crate) async fn run_streamed(
        &self,
        header: &pb::SegmentStreamHeader,
        images: Vec<InputFile>,
        started: Instant,
        progress: Box<dyn FnMut(usize, usize) + Send>,
    ) -> Result<(pb::SegmentResponse, Bytes, Option<Bytes>), Status> {
        let request_id = self.request_id(&header.request_id)?;
        let model = self.models.select(header.model.as_ref()).await?;
        let mut out =
            self.run(&request_id, Input::Files(images), model, header.options.as_ref(), started, progress).await?;
        if !header.output_uri.is_empty() {
            let prefix = StoreUri::parse(&header.output_uri).map_err(|e| with_field("header.output_uri", e))?;
            self.store_outputs(&prefix, &mut out).await?;
        }
        if let Some(t) = out.response.timings.as_mut() {
            t.total_seconds = started.elapsed().as_secs_f64();
        }
        self.observe("SegmentStream", tonic::Code::Ok, out.response.timings.as_ref());
        Ok((out.response, out.label_nifti, out.probabilities))
    }
}
