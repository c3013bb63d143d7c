//! Test harness: real servers on loopback (our services in-process, moto as the S3-compatible
//! store in a child process) and synthetic cases written as real NIfTI files. The services run
//! secured, as in production ([`secured::Setup::secure`]): TLS with a test CA, API keys, an
//! audit log that must verify when they stop.
#![allow(dead_code)]

mod inference;
pub(crate) mod pki;
pub(crate) mod secured;
#[allow(unused_imports)] // each test binary uses its own part of the harness
pub(crate) use inference::{InferenceServer, TEST_ROI};

use brats_cli::{AuthChannel, ClientSecurity};
use brats_preprocessor::config::ServiceConfig;
use brats_proto::v1::preprocessor_client::PreprocessorClient;
use secured::{ServiceKind, Setup, setup};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
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
    /// The security the harness secured it with, whose admin [`Service::client`] connects as
    /// (shared with a service that calls this one, e.g. [`InferenceServer::start_with`]);
    /// `None` when its configuration brought its own (the security tests').
    pub security: Option<Arc<Setup>>,
    /// Its audit file, checked when it stops.
    audit_log: Option<PathBuf>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Service {
    /// Starts the service secured by a fresh [`Setup`] (TLS, API keys, audit), unless `cfg`
    /// already names a certificate: the security tests bring their own roles, tenants and
    /// audit expectations (from [`Setup::config`]), which are kept as they are.
    pub(crate) async fn start(mut cfg: ServiceConfig) -> Service {
        if cfg.server.tls.enabled() {
            return Service::spawn(cfg, None).await;
        }
        let security = Arc::new(setup());
        security.secure(&mut cfg.server, ServiceKind::Preprocess);
        Service::spawn(cfg, Some(security)).await
    }

    async fn spawn(mut cfg: ServiceConfig, security: Option<Arc<Setup>>) -> Service {
        let metrics_port = free_port();
        cfg.server.listen = "127.0.0.1:0".into();
        cfg.server.metrics_listen = format!("127.0.0.1:{metrics_port}");
        let audit_log = Some(&cfg.server.audit.file).filter(|f| !f.is_empty()).map(PathBuf::from);
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
        Service { addr, metrics_port, security, audit_log, stop: Some(stop_tx), handle: Some(handle) }
    }

    /// `http://ADDR` (spoken to as `https://` by a client given the CA).
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How the harness connects: the admin of [`Service::security`].
    pub(crate) fn admin(&self) -> ClientSecurity {
        self.security.as_ref().expect("a service started with its own security: connect with its Setup's keys").admin()
    }

    /// A channel as the admin, over TLS.
    pub(crate) async fn channel(&self) -> AuthChannel {
        self.admin().connect(&self.url()).await.unwrap()
    }

    /// A client connected as the admin.
    pub(crate) async fn client(&self) -> PreprocessorClient<AuthChannel> {
        PreprocessorClient::new(self.channel().await)
    }

    /// Graceful shutdown; returns the server's result, after checking its audit log verifies.
    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        let result = self.handle.take().unwrap().await.unwrap();
        if let Some(audit_log) = &self.audit_log {
            secured::assert_audit_chain_verifies(audit_log);
        }
        result
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

/// The folder of the real BraTS cases (`BRATS_REAL_DIR`, else `/work/shared/data/real`, else
/// `../shared/data/real` beside the repository), or `None` after printing a SKIP line naming
/// `test` when none exists.
#[allow(dead_code)] // used by some of the test crates that include this module
pub(crate) fn real_data_dir(test: &str) -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = std::env::var_os("BRATS_REAL_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            PathBuf::from("/work/shared/data/real"),
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/real"),
        ])
        .collect();
    let found = candidates.iter().find(|d| d.join("BraTS-GLI-00001-000").is_dir()).cloned();
    if found.is_none() {
        println!("SKIP {test}: no real BraTS case under {candidates:?} (set BRATS_REAL_DIR)");
    }
    found
}

/// The `bratsctl` binary, built by [`workspace_exe`].
pub(crate) fn bratsctl_exe() -> PathBuf {
    static EXE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    EXE.get_or_init(|| workspace_exe("bratsctl", "bratsctl")).clone()
}

/// The binary `name` of the workspace package `package`, from this test build's target folder.
/// `cargo test` builds no binary of another package, so the first call in a test process asks
/// cargo for every target of the workspace: `cargo test --workspace --all-targets` (make test)
/// has built all of them but the binaries, so this builds only those, with the same features.
/// (`cargo build -p PACKAGE` would resolve features for that package alone and compile a second
/// copy of much of the workspace: minutes on two cores.)
pub(crate) fn workspace_exe(package: &str, name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    // target/<profile>/deps/trainer_service-<hash> → target/<profile>/<name>
    let profile_dir = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_path_buf();
    BUILT.get_or_init(|| {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "--quiet", "--workspace", "--all-targets"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().unwrap_or_else(|e| panic!("run cargo build for the workspace's binaries: {e}"));
        assert!(status.success(), "cargo build --workspace --all-targets failed");
    });
    let exe = profile_dir.join(name);
    assert!(exe.is_file(), "package {package} has no binary {name} at {}", exe.display());
    exe
}
