//! Runs the trainer service: gRPC (`Trainer`, `grpc.health.v1`, reflection) and `/metrics`;
//! health turns SERVING once the jobs in the store are recovered. On shutdown the workers are
//! asked to stop at a step boundary (their stdin closes) and the jobs stay RUNNING in the store,
//! so the next start resumes them from their latest checkpoint.

use crate::config::TrainerConfig;
use crate::service::{Metrics, ServiceSettings, TrainerService};
use anyhow::Context;
use brats_core::store::{StoreUri, Stores};
use brats_proto::v1::trainer_server::TrainerServer;
use brats_service::{Drain, GrpcServer, ServingStatus};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// The service settings a configuration gives (CUDA devices counted by libtorch, the worker
/// executable defaulting to this binary).
pub fn settings(cfg: &TrainerConfig) -> anyhow::Result<ServiceSettings> {
    let worker_exe = if cfg.worker_exe.is_empty() {
        std::env::current_exe().context("locating this binary (the default worker_exe)")?
    } else {
        PathBuf::from(&cfg.worker_exe)
    };
    Ok(ServiceSettings {
        store_root: StoreUri::parse(&cfg.store_root).context("store_root")?,
        registry: StoreUri::parse(&cfg.registry).context("registry")?,
        preprocess_endpoint: (!cfg.preprocess_endpoint.is_empty()).then(|| cfg.preprocess_endpoint.clone()),
        preprocess_client: cfg.server.client.clone(),
        uris: brats_service::security::tenants::UriPolicy::new(&cfg.server.tenants)?,
        audit: brats_service::security::audit::AuditLog::disabled(),
        cpu_slots: cfg.cpu_slots.max(1),
        max_queue: cfg.max_queue,
        cancel_grace: Duration::from_secs(cfg.cancel_grace_s),
        shutdown_grace: cfg.server.shutdown_grace(),
        worker_exe,
        store_config: cfg.store.clone(),
        tracking: cfg.tracking.clone(),
        cuda_devices: tch::Cuda::device_count().max(0) as usize,
        clusters: crate::cluster::Clusters::new(&cfg.cluster),
    })
}

/// Serves until `shutdown` resolves; `bound` receives the gRPC address as soon as it listens.
/// Health reports NOT_SERVING until the jobs in the store are recovered (retried while the
/// store is unreachable).
pub async fn serve(
    cfg: TrainerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    cfg.validate()?;
    let stores = Arc::new(Stores::new(cfg.store.clone()));
    let mut settings = settings(&cfg)?;
    let metrics = Metrics::new();
    info!(
        store_root = %settings.store_root,
        registry = %settings.registry,
        cuda_devices = settings.cuda_devices,
        cpu_slots = settings.cpu_slots,
        preprocess = if settings.preprocess_endpoint.is_some() { "remote" } else { "in-process" },
        "trainer starting"
    );
    let grpc = GrpcServer::<TrainerServer<TrainerService>>::bind(
        &cfg.server,
        ServingStatus::NotServing,
        metrics.registry.clone(),
    )
    .await?;
    settings.uris = grpc.uri_policy();
    settings.audit = grpc.audit();
    let service = TrainerService::new(stores, settings, metrics.clone());
    grpc.announce(bound);
    info!(addr = %grpc.addr(), "trainer service listening; recovering jobs");

    let recovering = service.clone();
    let health = grpc.health();
    tokio::spawn(async move {
        loop {
            match recovering.recover().await {
                Ok(()) => break,
                Err(e) => {
                    warn!(error = %e, "cannot recover the jobs from the store; retrying in 5 s");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
        recovering.start();
        health.set_serving().await;
        info!("serving");
    });

    let stopping = service.clone();
    grpc.serve(
        TrainerServer::new(service),
        shutdown,
        "shutting down: NOT_SERVING; workers stop at a step boundary and their jobs resume at the next start",
        Drain::complete(async move { stopping.shutdown().await }),
    )
    .await?;
    Ok(())
}
