//! Runs the preprocessing service: gRPC (`Preprocessor`, `grpc.health.v1`, reflection),
//! Prometheus metrics over HTTP, and graceful shutdown on SIGINT/SIGTERM.

use crate::config::ServiceConfig;
use crate::service::{Metrics, PreprocessService};
use anyhow::Context;
use brats_core::nifti_io::ReadLimits;
use brats_core::store::{StoreUri, Stores};
use brats_proto::v1::preprocessor_server::PreprocessorServer;
use brats_service::{Drain, GrpcServer, ServingStatus};
use std::net::SocketAddr;
use std::sync::Arc;
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
    let grpc = GrpcServer::<PreprocessorServer<PreprocessService>>::bind(
        &cfg.server,
        ServingStatus::Serving,
        metrics.registry.clone(),
    )
    .await?;
    let service = PreprocessService::new(stores, root.clone(), limits, cfg.max_parallel, cfg.max_queue, metrics)
        .with_uri_policy(grpc.uri_policy());
    info!(addr = %grpc.addr(), output_root = %root, max_parallel = cfg.max_parallel, "preprocess service listening");
    grpc.announce(bound);

    grpc.serve(
        PreprocessorServer::new(service),
        shutdown,
        "shutting down: NOT_SERVING, draining running requests",
        Drain::within(
            cfg.server.shutdown_grace(),
            "grace period over; abandoning running requests (their outputs are not written)",
        ),
    )
    .await?;
    Ok(())
}

pub use brats_service::shutdown_signal;
