//! Runs the inference service: load and warm the default alias, then serve gRPC (`Inference`,
//! health, reflection) and `/metrics`; watch the alias and hot-reload; drain on shutdown.

use crate::config::InferenceConfig;
use crate::runtime::{Provider, SessionOptions};
use crate::service::{InferenceService, Metrics, ServiceSettings};
use anyhow::Context;
use brats_artifacts::window::{Blend, SlidingWindow};
use brats_core::store::{StoreUri, Stores};
use brats_proto::v1::inference_server::InferenceServer;
use brats_service::{Drain, GrpcServer, ServingStatus};
use std::net::SocketAddr;
use std::sync::Arc;
use tracing::info;

/// Serves until `shutdown` resolves. Health reports NOT_SERVING until the default model is
/// loaded and warm; `bound` receives the gRPC address as soon as it listens.
pub async fn serve(
    cfg: InferenceConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    let stores = Arc::new(Stores::new(cfg.store.clone()));
    let providers = cfg.providers.iter().map(|p| Provider::parse(p)).collect::<Result<Vec<_>, _>>()?;
    let mut settings = ServiceSettings {
        registry: StoreUri::parse(&cfg.registry).context("registry")?,
        output_root: StoreUri::parse(&cfg.output_root).context("output_root")?,
        model: cfg.model.clone(),
        alias: cfg.alias.clone(),
        session: SessionOptions {
            providers,
            allow_fallback: cfg.allow_fallback,
            fp16: cfg.fp16,
            cache_dir: Some(std::path::absolute(&cfg.trt_cache_dir)?),
            intra_threads: cfg.intra_threads,
            optimization_level: cfg.optimization_level,
            ..SessionOptions::default()
        },
        window: SlidingWindow { roi: cfg.roi, overlap: cfg.overlap, blend: Blend::Constant, ..Default::default() },
        max_concurrent: cfg.max_concurrent,
        max_queue: cfg.max_queue,
        // `[server.tenants]` is parsed once, by the server shell below.
        uris: Default::default(),
        preprocessor: if cfg.preprocess_endpoint.is_empty() {
            None
        } else {
            Some(cfg.server.client.connect_lazy(&cfg.preprocess_endpoint).context("preprocess_endpoint")?)
        },
    };
    let metrics = Metrics::new();
    let grpc = GrpcServer::<InferenceServer<InferenceService>>::bind(
        &cfg.server,
        ServingStatus::NotServing,
        metrics.registry.clone(),
    )
    .await?;
    settings.uris = grpc.uri_policy();
    let service = InferenceService::new(stores, settings, metrics.clone());
    grpc.announce(bound);
    info!(addr = %grpc.addr(), registry = %cfg.registry, model = %cfg.model, alias = %cfg.alias, "inference service listening; loading the model");

    // Load, warm, then SERVING; then watch the alias. A failed load keeps NOT_SERVING and retries.
    let warmup = Some(cfg.warmup_shape.unwrap_or(cfg.roi));
    let loader = service.clone();
    let health = grpc.health();
    let interval = cfg.reload_interval_s;
    tokio::spawn(async move {
        let models = loader.models().clone();
        models
            .follow_default(warmup, interval, |serving| {
                let (loader, health) = (loader.clone(), health.clone());
                async move {
                    match loader.current() {
                        Some(c) if serving => {
                            loader.metrics().set_provider(c.model.provider());
                            health.set_serving().await
                        }
                        _ => health.set_not_serving().await,
                    }
                }
            })
            .await
    });

    grpc.serve(
        InferenceServer::new(service).max_decoding_message_size(16 << 20),
        shutdown,
        "shutting down: NOT_SERVING, draining running requests",
        Drain::within(cfg.server.shutdown_grace(), "grace period over; abandoning running requests"),
    )
    .await?;
    Ok(())
}
