//! An inference service in-process on a loopback port, over a registry and output folder in
//! its own temporary directory, secured by the harness ([`Setup::secure`]): the one way the
//! root tests start one.

use super::file_uri;
use super::secured::{ServiceKind, Setup, assert_audit_chain_verifies, setup};
use brats_artifacts::registry::Registry;
use brats_cli::AuthChannel;
use brats_inference::config::InferenceConfig;
use brats_proto::v1::inference_client::InferenceClient;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic_health::pb::health_check_response::ServingStatus;

/// The window every root test's tiny models were made for.
pub(crate) const TEST_ROI: [usize; 3] = [32, 32, 32];

/// A running inference server; [`InferenceServer::stop`] shuts it down and checks it ended cleanly.
pub(crate) struct InferenceServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The registry it serves from (`cfg.registry`).
    pub registry: Registry,
    /// Its scratch directory: `models/` (the default registry) and `predictions/`.
    pub dir: tempfile::TempDir,
    /// The security it runs with; its clients connect as the admin.
    pub security: Arc<Setup>,
    /// Its audit file, checked when it stops.
    audit_log: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InferenceServer {
    /// Starts a server with the defaults (model, alias) except where it listens, its folders, a
    /// 32³ window warmed at start, a 1 s registry poll, two threads and a fresh [`Setup`]'s
    /// security; `tweak` changes the rest.
    pub(crate) async fn start(tweak: impl FnOnce(&mut InferenceConfig)) -> InferenceServer {
        InferenceServer::start_with(Arc::new(setup()), tweak).await
    }

    /// [`InferenceServer::start`] secured by `security`: the one a preprocessing service it
    /// calls (`preprocess_endpoint`) runs with, so each trusts the other's certificates.
    pub(crate) async fn start_with(security: Arc<Setup>, tweak: impl FnOnce(&mut InferenceConfig)) -> InferenceServer {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = InferenceConfig {
            server: brats_service::ServerConfig::new("127.0.0.1:0", "", 60),
            registry: file_uri(&dir.path().join("models")),
            output_root: file_uri(&dir.path().join("predictions")),
            roi: TEST_ROI,
            warmup_shape: Some(TEST_ROI),
            reload_interval_s: 1,
            intra_threads: 2,
            ..InferenceConfig::default()
        };
        security.secure(&mut cfg.server, ServiceKind::Inference);
        tweak(&mut cfg);
        let audit_log = PathBuf::from(&cfg.server.audit.file);
        let registry = Registry::new(
            Arc::new(brats_core::Stores::new(cfg.store.clone())),
            brats_core::StoreUri::parse(&cfg.registry).unwrap(),
        );
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let handle = tokio::spawn(brats_inference::server::serve(
            cfg,
            async {
                let _ = stop_rx.await;
            },
            Some(addr_tx),
        ));
        let addr = addr_rx.await.unwrap();
        InferenceServer { addr, registry, dir, security, audit_log, stop: Some(stop_tx), handle }
    }

    /// `http://ADDR` (spoken to as `https://` by a client given the CA).
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A channel as the admin, over TLS, on a fresh connection.
    pub(crate) async fn channel(&self) -> AuthChannel {
        self.security.admin().connect(&self.url()).await.unwrap()
    }

    /// A client as the admin, on a fresh connection.
    pub(crate) async fn client(&self) -> InferenceClient<AuthChannel> {
        InferenceClient::new(self.channel().await)
    }

    /// What the health service says of `brats.v1.Inference`.
    pub(crate) async fn health(&self) -> ServingStatus {
        let mut h = tonic_health::pb::health_client::HealthClient::new(self.channel().await);
        h.check(tonic_health::pb::HealthCheckRequest { service: "brats.v1.Inference".into() })
            .await
            .unwrap()
            .into_inner()
            .status()
    }

    /// Waits (up to 120 s) until the served model is loaded and warm.
    pub(crate) async fn wait_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.health().await != ServingStatus::Serving {
            assert!(Instant::now() < deadline, "never SERVING");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the server and asserts it shut down without error and its audit log verifies.
    pub(crate) async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.handle.await.unwrap().unwrap();
        assert_audit_chain_verifies(&self.audit_log);
    }
}
