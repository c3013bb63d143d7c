//! Runs the preprocessing service: gRPC (`Preprocessor`, `grpc.health.v1`, reflection),
//! Prometheus metrics over HTTP, and graceful shutdown on SIGINT/SIGTERM.

use crate::config::ServiceConfig;
use crate::service::{Metrics, PreprocessService};
use anyhow::Context;
use brats_core::nifti_io::ReadLimits;
use brats_core::store::{StoreUri, Stores};
use brats_proto::v1::preprocessor_server::PreprocessorServer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::info;

/// Serves until `shutdown` resolves; then reports NOT_SERVING, stops accepting, and lets running
/// requests finish (up to the configured grace period). Returns the bound gRPC address through
/// `bound` as soon as the listener is up (port 0 picks a free port).
pub async fn serve(
    cfg: ServiceConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    let stores = Arc::new(Stores::new(cfg.store.clone()));
    let root = StoreUri::parse(&cfg.output_root).context("output_root")?;
    let metrics = Metrics::new();
    let limits = ReadLimits { max_axis: cfg.max_axis, max_voxels: cfg.max_voxels };
    let service =
        PreprocessService::new(stores, root.clone(), limits, cfg.max_parallel, cfg.max_queue, metrics.clone());

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<PreprocessorServer<PreprocessService>>().await;
    let reflection = brats_service::reflection().context("reflection service")?;

    let listener = tokio::net::TcpListener::bind(&cfg.listen).await.with_context(|| format!("bind {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    brats_service::spawn_metrics_endpoint(&cfg.metrics_listen, metrics.registry.clone()).await?;
    info!(%addr, output_root = %root, max_parallel = cfg.max_parallel, "preprocess service listening");
    if let Some(tx) = bound {
        let _ = tx.send(addr);
    }

    let grace = Duration::from_secs(cfg.shutdown_grace_s);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let reporter = health_reporter.clone();
    tokio::spawn(async move {
        shutdown.await;
        info!("shutting down: NOT_SERVING, draining running requests");
        reporter.set_not_serving::<PreprocessorServer<PreprocessService>>().await;
        let _ = stop_tx.send(());
        let _ = drain_tx.send(());
    });
    let server = tonic::transport::Server::builder()
        .trace_fn(|req| tracing::info_span!("grpc", path = %req.uri().path()))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(PreprocessorServer::new(service))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async {
            let _ = stop_rx.await;
        });
    tokio::select! {
        r = server => r.context("gRPC server")?,
        _ = async { if drain_rx.await.is_ok() { tokio::time::sleep(grace).await } else { std::future::pending::<()>().await } } => {
            tracing::warn!(grace_s = grace.as_secs(), "grace period over; abandoning running requests (their outputs are not written)");
        }
    }
    info!("stopped");
    Ok(())
}

pub use brats_service::shutdown_signal;
