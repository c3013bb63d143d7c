//! An inference service in-process on a loopback port, over a registry and output folder in
//! its own temporary directory: the one way the root tests start one.

use super::file_uri;
use brats_artifacts::registry::Registry;
use brats_inference::config::InferenceConfig;
use brats_proto::v1::inference_client::InferenceClient;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
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
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InferenceServer {
    /// Starts a server with the defaults (model, alias) except where it listens, its folders, a
    /// 32³ window warmed at start, a 1 s registry poll and two threads; `tweak` changes the rest.
    pub(crate) async fn start(tweak: impl FnOnce(&mut InferenceConfig)) -> InferenceServer {
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
        tweak(&mut cfg);
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
        InferenceServer { addr, registry, dir, stop: Some(stop_tx), handle }
    }

    /// `http://ADDR`.
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client on a fresh connection.
    pub(crate) async fn client(&self) -> InferenceClient<Channel> {
        InferenceClient::connect(self.url()).await.unwrap()
    }

    /// What the health service says of `brats.v1.Inference`.
    pub(crate) async fn health(&self) -> ServingStatus {
        let channel = Channel::from_shared(self.url()).unwrap().connect().await.unwrap();
        let mut h = tonic_health::pb::health_client::HealthClient::new(channel);
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

    /// Stops the server and asserts it shut down without error.
    pub(crate) async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.handle.await.unwrap().unwrap();
    }
}
