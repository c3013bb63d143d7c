//! Test harness: real servers on loopback (our services in-process, moto as the S3-compatible
//! store in a child process) and synthetic cases written as real NIfTI files.
#![allow(dead_code)]

mod inference;
pub(crate) mod pki;
pub(crate) mod secured;
#[allow(unused_imports)] // each test binary uses its own part of the harness
pub(crate) use inference::{InferenceServer, TEST_ROI};

use brats_preprocessor::config::ServiceConfig;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A moto S3 server on a free loopback port, killed on drop.
pub(crate) struct Moto {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port (brats-cli's), or a panic: a test cannot run without one.
pub(crate) fn free_port() -> u16 {
    brats_cli::free_port().expect("a free loopback port")
}

impl Moto {
    /// Starts moto (installed by `make bootstrap` into .deps/venv) and creates `bucket`.
    pub(crate) async fn start(bucket: &str) -> Moto {
        let bin = std::env::var("BRATS_MOTO_SERVER").unwrap_or_else(|_| ".deps/venv/bin/moto_server".into());
        assert!(
            Path::new(&bin).exists(),
            "moto_server not found at {bin}: run `make bootstrap` (scripts/bootstrap.sh) to install the S3 test server"
        );
        // A port picked free can be taken by a server of a concurrently running test before
        // moto binds it: moto then exits, and whatever holds the port would answer. The bucket
        // counts as created only while our moto still runs; a lost race is retried.
        for _attempt in 0..3 {
            let port = free_port();
            let mut child = Command::new(&bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start moto_server");
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                if let Ok((200, _)) = http("PUT", port, &format!("/{bucket}")).await {
                    // Still ours a moment later: it holds the port.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    if child.try_wait().ok().flatten().is_none() {
                        return Moto { child, endpoint: format!("http://127.0.0.1:{port}") };
                    }
                    break;
                }
                assert!(Instant::now() < deadline, "moto did not answer within 60 s");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!("moto_server exited at start three times (lost the race for a free port?)")
    }

    /// Store settings that reach this server.
    pub(crate) fn store_config(&self) -> brats_core::StoreConfig {
        brats_core::StoreConfig {
            s3_endpoint: Some(self.endpoint.clone()),
            s3_region: Some("us-east-1".into()),
            s3_access_key_id: Some("testing".into()),
            s3_secret_access_key: Some("testing".into()),
            ..Default::default()
        }
    }
}

/// A minimal HTTP/1.1 request on loopback; returns status code and body.
pub(crate) async fn http(method: &str, port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let req =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

/// A preprocessing service running in this process on loopback.
pub(crate) struct Service {
    pub addr: SocketAddr,
    pub metrics_port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Service {
    pub(crate) async fn start(mut cfg: ServiceConfig) -> Service {
        let metrics_port = free_port();
        cfg.server.listen = "127.0.0.1:0".into();
        cfg.server.metrics_listen = format!("127.0.0.1:{metrics_port}");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let handle = tokio::spawn(brats_preprocessor::server::serve(
            cfg,
            async {
                let _ = stop_rx.await;
            },
            Some(addr_tx),
        ));
        let addr = addr_rx.await.expect("service bound");
        Service { addr, metrics_port, stop: Some(stop_tx), handle: Some(handle) }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) async fn client(
        &self,
    ) -> brats_proto::v1::preprocessor_client::PreprocessorClient<tonic::transport::Channel> {
        brats_proto::v1::preprocessor_client::PreprocessorClient::connect(self.url()).await.unwrap()
    }

    /// Graceful shutdown; returns the server's result.
    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        self.handle.take().unwrap().await.unwrap()
    }
}

/// Writes a synthetic case as real `.nii.gz` files; returns (images T1c..FLAIR, label).
pub(crate) fn synth_case(dir: &Path, id: &str, shape: [usize; 3], seed: u64) -> ([PathBuf; 4], PathBuf) {
    let case = brats_preprocess::synthetic::generate(&brats_preprocess::synthetic::SyntheticSpec::new(shape, seed));
    let f = brats_preprocess::synthetic::write_case(&case, dir, id).unwrap();
    (f.images, f.label)
}

pub(crate) fn file_uri(p: &Path) -> String {
    format!("file://{}", p.display())
}

/// Every file below `dir`, relative, sorted.
pub(crate) fn list_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(base, &p, out);
                } else {
                    out.push(p.strip_prefix(base).unwrap().display().to_string());
                }
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The `bratsctl` binary, built by [`workspace_exe`].
pub(crate) fn bratsctl_exe() -> PathBuf {
    static EXE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    EXE.get_or_init(|| workspace_exe("bratsctl", "bratsctl")).clone()
}

/// The binary `name` of the workspace package `package`, built next to this test's target
/// folder: `cargo test` builds no binary of another package, so this asks
/// cargo once per binary and test run.
pub(crate) fn workspace_exe(package: &str, name: &str) -> PathBuf {
    // target/<profile>/deps/trainer_service-<hash> → target/<profile>/<name>
    let profile_dir = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_path_buf();
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "--quiet", "-p", package, "--bin", name]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().unwrap_or_else(|e| panic!("run cargo build for the {name} binary: {e}"));
    assert!(status.success(), "cargo build -p {name} failed");
    profile_dir.join(name)
}
