//! `brats-gateway serve`: the DIMSE SCP, the job runner, the `brats.v1.Gateway` gRPC API on the
//! shared server shell (health, reflection, `/metrics`, TLS, authentication, roles, audit) and,
//! when configured, the pull-mode webhook, all in one process that stops on SIGINT/SIGTERM.

use crate::config::GatewayConfig;
use crate::jobs::{Runner, Segmenter, Target};
use crate::metrics::Metrics;
use crate::remote::RemoteModel;
use crate::scp::{Scp, ScpConfig};
use crate::service::GatewayService;
use crate::spool::Spool;
use anyhow::Context;
use brats_artifacts::window::{Blend, SlidingWindow};
use brats_dicom::LoadOptions;
use brats_dicom::seg::SegOptions;
use brats_inference::runtime::{SegmentationModel, SessionOptions, default_library};
use brats_proto::v1::gateway_server::GatewayServer;
use brats_service::{Drain, GrpcServer, ServingStatus};
use sha2::Digest;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The addresses `serve` bound (port 0 in the configuration picks free ports).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// The gRPC API.
    pub grpc: SocketAddr,
    /// The DIMSE SCP.
    pub dimse: SocketAddr,
    /// The webhook, when configured.
    pub webhook: Option<SocketAddr>,
}

/// What the model stamps on every SEG: its version (the configured one, else the sha256 prefix
/// of the ONNX file) and the software line.
pub fn seg_options(name: &str, version: Option<&str>, onnx: &[u8]) -> SegOptions {
    let digest = hex::encode(sha2::Sha256::digest(onnx));
    SegOptions {
        algorithm_name: name.to_string(),
        algorithm_version: version.map(String::from).unwrap_or_else(|| format!("sha256:{}", &digest[..12])),
        software_versions: format!("brats-gateway {}; model sha256:{}", env!("CARGO_PKG_VERSION"), &digest[..12]),
        ..SegOptions::default()
    }
}

/// Runs the gateway until `shutdown` resolves; sends the bound addresses through `bound`.
pub async fn serve(
    config: GatewayConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    bound: Option<tokio::sync::oneshot::Sender<Bound>>,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let hasher = brats_dicom::phi::UidHasher::new(&config.salt);
    let spool = Arc::new(
        Spool::open(&config.spool_dir, hasher).with_context(|| format!("spool_dir {}", config.spool_dir.display()))?,
    );
    let stores = Arc::new(brats_core::store::Stores::new(brats_core::store::StoreConfig::default()));
    let (model, seg_options) = if config.inference.endpoint.is_empty() {
        let onnx =
            std::fs::read(&config.model.onnx).with_context(|| format!("model.onnx {}", config.model.onnx.display()))?;
        let session = SessionOptions { intra_threads: config.model.threads, ..Default::default() };
        let model = SegmentationModel::load(&default_library(), &onnx, &session)
            .with_context(|| format!("model.onnx {}", config.model.onnx.display()))?;
        (Segmenter::Local(Arc::new(model)), seg_options(&config.model.name, config.model.version.as_deref(), &onnx))
    } else {
        let remote = RemoteModel::connect(
            &config.inference.endpoint,
            &config.server.client,
            &config.inference.model,
            stores.clone(),
            config.model.roi,
            config.model.overlap,
        )?;
        let mut options = seg_options(&config.model.name, Some(&remote.label()), &[]);
        options.software_versions = format!("brats-gateway {}; {}", env!("CARGO_PKG_VERSION"), remote.label());
        tracing::info!(endpoint = %config.inference.endpoint, model = %remote.label(), "segmenting on the inference service");
        (Segmenter::Remote(Arc::new(remote)), options)
    };
    let jobs_root = brats_core::store::StoreUri::parse(&config.jobs_root)
        .with_context(|| format!("jobs_root {}", config.jobs_root))?;
    let metrics = Metrics::new();
    let d = &config.dimse;
    let scp = Arc::new(Scp::new(
        ScpConfig {
            ae_title: d.ae_title.clone(),
            allowed_calling_aes: d.allowed_calling_aes.clone(),
            max_associations: d.max_associations,
            max_pdu: d.max_pdu,
            min_free_bytes: d.min_free_mb << 20,
            max_instance_bytes: d.max_instance_mb << 20,
            timeout: Duration::from_secs(d.timeout_s),
        },
        spool.clone(),
        if d.tls.enabled() {
            Some(brats_service::security::tls::ServerTls::load_without_alpn(&d.tls).context("dimse.tls")?)
        } else {
            None
        },
        metrics.scp.clone(),
    ));
    let runner = Arc::new(Runner {
        spool,
        stores,
        jobs_root,
        model,
        model_version: seg_options.algorithm_version.clone(),
        window: SlidingWindow {
            roi: config.model.roi,
            overlap: config.model.overlap,
            blend: Blend::Constant,
            ..Default::default()
        },
        seg_options,
        load_options: LoadOptions { salt: config.salt.clone(), ..LoadOptions::default() },
        destinations: config.destinations.clone(),
        calling_ae: d.ae_title.clone(),
        send_quick_look: config.send_quick_look,
        stable_after: Duration::from_secs_f64(config.study.stable_after_s),
        max_wait: Duration::from_secs_f64(config.study.max_wait_s),
        busy: tokio::sync::Mutex::new(()),
        metrics: metrics.clone(),
    });

    let grpc = GrpcServer::<GatewayServer<GatewayService>>::bind(
        &config.server,
        ServingStatus::Serving,
        metrics.registry.clone(),
    )
    .await?;
    let service = GatewayService::new(runner.clone(), config.clone(), grpc.audit());
    let dimse_listener =
        tokio::net::TcpListener::bind(&d.listen).await.with_context(|| format!("dimse.listen {}", d.listen))?;
    let dimse_addr = dimse_listener.local_addr()?;
    tracing::info!(address = %dimse_addr, ae_title = %d.ae_title, tls = d.tls.enabled(), "DIMSE SCP listening");
    let webhook = if config.webhook.listen.is_empty() {
        None
    } else {
        Some(webhook::spawn(&config.webhook, service.clone()).await?)
    };
    tracing::info!(addr = %grpc.addr(), "gateway gRPC API listening");
    if let Some(tx) = bound {
        let _ = tx.send(Bound { grpc: grpc.addr(), dimse: dimse_addr, webhook });
    }
    // C-ECHO each DIMSE destination once at start-up: a wrong AE title or port shows now, not
    // at the first study.
    for destination in &config.destinations {
        if let Ok(Target::Dimse(peer)) = destination.target() {
            let (name, calling) = (destination.name.clone(), d.ae_title.clone());
            tokio::spawn(async move {
                match crate::scu::echo(&peer, &calling).await {
                    Ok(()) => tracing::info!(destination = %name, "destination answers C-ECHO"),
                    Err(e) => tracing::warn!(destination = %name, error = %e, "destination does not answer C-ECHO"),
                }
            });
        }
    }
    let scp_task = tokio::spawn(scp.serve(dimse_listener));
    let jobs_task = tokio::spawn(runner.run());
    let served = grpc
        .serve(
            GatewayServer::new(service),
            shutdown,
            "shutting down: NOT_SERVING, no new associations or jobs",
            Drain::within(config.server.shutdown_grace(), "grace period over; abandoning running requests"),
        )
        .await;
    // A job cut off here is picked up again at the next start: its instances stay in the
    // spool until it is DONE or REJECTED.
    scp_task.abort();
    jobs_task.abort();
    served?;
    Ok(())
}

/// The pull-mode webhook: `POST /v1/studies/stable` with a JSON body naming
/// `study_instance_uid` (what `scripts/dicom/orthanc.py --webhook` sends from Orthanc's
/// OnStableStudy). A well-formed announcement is answered 202 at once with the hashed study,
/// and the study is fetched and segmented in the background (its job shows in ListJobs); a
/// malformed one gets 400/404/503 with the reason; a missing or wrong token 401.
mod webhook {
    use crate::config::WebhookConfig;
    use crate::service::GatewayService;
    use anyhow::Context;
    use axum::http::{HeaderMap, StatusCode};
    use std::net::SocketAddr;
    use std::sync::Arc;

    struct State {
        service: GatewayService,
        source: String,
        token_digest: Option<[u8; 32]>,
    }

    fn digest(s: &[u8]) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(s).into()
    }

    pub(super) async fn spawn(config: &WebhookConfig, service: GatewayService) -> anyhow::Result<SocketAddr> {
        let token_digest = if config.token_file.is_empty() {
            None
        } else {
            let token = std::fs::read_to_string(&config.token_file)
                .with_context(|| format!("webhook.token_file {}", config.token_file))?;
            anyhow::ensure!(!token.trim().is_empty(), "webhook.token_file {} is empty", config.token_file);
            Some(digest(token.trim().as_bytes()))
        };
        let state = Arc::new(State { service, source: config.source.clone(), token_digest });
        let app = axum::Router::new().route(
            "/v1/studies/stable",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let state = state.clone();
                async move { announce(&state, &headers, &body).await }
            }),
        );
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .with_context(|| format!("webhook.listen {}", config.listen))?;
        let addr = listener.local_addr()?;
        if config.token_file.is_empty() {
            tracing::warn!(%addr, "webhook without token_file: any caller that reaches the port may announce a study");
        }
        tracing::info!(%addr, "pull-mode webhook on POST /v1/studies/stable");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(addr)
    }

    fn answer(status: StatusCode, body: serde_json::Value) -> (StatusCode, [(&'static str, &'static str); 1], String) {
        (status, [("content-type", "application/json")], body.to_string())
    }

    async fn announce(
        state: &State,
        headers: &HeaderMap,
        body: &[u8],
    ) -> (StatusCode, [(&'static str, &'static str); 1], String) {
        if let Some(expected) = &state.token_digest {
            let given = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(|t| digest(t.trim().as_bytes()));
            // Digests of equal length: the comparison time says nothing about the token.
            if given.as_ref() != Some(expected) {
                return answer(
                    StatusCode::UNAUTHORIZED,
                    serde_json::json!({"error": "send Authorization: Bearer <the webhook token>"}),
                );
            }
        }
        let Ok(request) = serde_json::from_slice::<serde_json::Value>(body) else {
            return answer(StatusCode::BAD_REQUEST, serde_json::json!({"error": "the body is not JSON"}));
        };
        let uid = request.get("study_instance_uid").and_then(|v| v.as_str()).unwrap_or_default();
        // Answer at once and fetch in the background: the caller (Orthanc's Lua) waits for this
        // answer, and the archive may not serve our WADO-RS requests until it has it.
        match state.service.check_submission(&state.source, uid) {
            Ok((source, uid)) => {
                let study = state.service.study_hash(&uid);
                let service = state.service.clone();
                tokio::spawn(async move {
                    match service.pull(&source, &uid, None).await {
                        Ok(record) => tracing::info!(job = %record.id, state = ?record.state, "announced study pulled"),
                        Err(status) => {
                            tracing::warn!(code = ?status.code(), error = %status.message(), "announced study not pulled")
                        }
                    }
                });
                answer(StatusCode::ACCEPTED, serde_json::json!({"study": study, "status": "fetching"}))
            }
            Err(status) => {
                let http = match status.code() {
                    tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
                    tonic::Code::NotFound => StatusCode::NOT_FOUND,
                    tonic::Code::ResourceExhausted | tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                answer(http, serde_json::json!({"error": status.message()}))
            }
        }
    }
}
