//! Runs the inference service: load and warm the default alias, then serve gRPC (`Inference`,
//! health, reflection) and `/metrics`; watch the alias and hot-reload; drain on shutdown.

use crate::config::InferenceConfig;
use crate::runtime::{Provider, SessionOptions};
use crate::service::{InferenceService, Metrics, ServiceSettings};
use crate::window::{Blend, SlidingWindow};
use anyhow::Context;
use brats_core::store::{StoreUri, Stores};
use brats_proto::v1::inference_server::InferenceServer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Serves until `shutdown` resolves. Health reports NOT_SERVING until the default model is
/// loaded and warm; `bound` receives the gRPC address as soon as it listens.
pub async fn serve(
    cfg: InferenceConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    let stores = Arc::new(Stores::new(cfg.store.clone()));
    let providers = cfg.providers.iter().map(|p| Provider::parse(p)).collect::<Result<Vec<_>, _>>()?;
    let settings = ServiceSettings {
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
        window: SlidingWindow { roi: cfg.roi, overlap: cfg.overlap, blend: Blend::Constant, mirror: false },
        max_concurrent: cfg.max_concurrent,
        max_queue: cfg.max_queue,
        preprocess_endpoint: (!cfg.preprocess_endpoint.is_empty()).then(|| cfg.preprocess_endpoint.clone()),
    };
    let metrics = Metrics::new();
    let service = InferenceService::new(stores, settings, metrics.clone());

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_not_serving::<InferenceServer<InferenceService>>().await;
    let reflection = brats_service::reflection().context("reflection service")?;
    let listener = tokio::net::TcpListener::bind(&cfg.listen).await.with_context(|| format!("bind {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    brats_service::spawn_metrics_endpoint(&cfg.metrics_listen, metrics.registry.clone()).await?;
    if let Some(tx) = bound {
        let _ = tx.send(addr);
    }
    info!(%addr, registry = %cfg.registry, model = %cfg.model, alias = %cfg.alias, "inference service listening; loading the model");

    // Load, warm, then SERVING; then watch the alias. A failed load keeps NOT_SERVING and retries.
    let warmup = Some(cfg.warmup_shape.unwrap_or(cfg.roi));
    let loader = service.clone();
    let reporter = health_reporter.clone();
    let interval = cfg.reload_interval_s;
    tokio::spawn(async move {
        loop {
            match loader.load_default(warmup).await {
                Ok(changed) => {
                    if changed {
                        let c = loader.current().expect("loaded");
                        info!(version = %c.version, provider = c.model.provider().name(), "serving");
                    }
                    reporter.set_serving::<InferenceServer<InferenceService>>().await;
                }
                Err(e) => {
                    warn!(error = %e, "cannot load the default model");
                    if loader.current().is_none() {
                        reporter.set_not_serving::<InferenceServer<InferenceService>>().await;
                    }
                }
            }
            if interval == 0 && loader.current().is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(interval.max(1))).await;
        }
    });

    let grace = Duration::from_secs(cfg.shutdown_grace_s);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        shutdown.await;
        info!("shutting down: NOT_SERVING, draining running requests");
        health_reporter.set_not_serving::<InferenceServer<InferenceService>>().await;
        let _ = stop_tx.send(());
        let _ = drain_tx.send(());
    });
    let server = tonic::transport::Server::builder()
        .trace_fn(|req| tracing::info_span!("grpc", path = %req.uri().path()))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(InferenceServer::new(service).max_decoding_message_size(16 << 20))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async {
            let _ = stop_rx.await;
        });
    tokio::select! {
        r = server => r.context("gRPC server")?,
        _ = async { if drain_rx.await.is_ok() { tokio::time::sleep(grace).await } else { std::future::pending::<()>().await } } => {
            warn!(grace_s = grace.as_secs(), "grace period over; abandoning running requests");
        }
    }
    info!("stopped");
    Ok(())
}
