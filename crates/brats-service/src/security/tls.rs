//! TLS on the gRPC port: rustls (aws-lc-rs, TLS 1.2 minimum, 1.3 preferred, ALPN `h2`), the
//! certificate and key read from PEM files and **reloaded without a restart** (when the files
//! change, polled, or on SIGHUP: new connections get the new certificate, open ones keep
//! theirs), optional or required client certificates from an internal CA (mutual TLS), and a
//! handshake timeout so a connection that never speaks cannot hold a slot.
//!
//! tonic's own `ServerTlsConfig` cannot reload, so the shell accepts TCP itself, runs the
//! handshake here with the configuration current at that moment, and hands finished TLS
//! streams to tonic (which still exposes the peer's certificates to the request layers).
//!
//! The Prometheus `/metrics` endpoint can be served over HTTPS with the same certificate and
//! key, reloaded the same way (`[server.metrics_tls]`, [`MetricsTlsConfig`]): its own
//! [`ServerTls`] (ALPN `http/1.1`, scrapers speak HTTP/1.1), optionally requiring a client
//! certificate from the same client CA, and [`MetricsListener`] feeding axum.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

/// Whether a client must, may or cannot present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// Client certificates are not asked for.
    None,
    /// Asked for and verified when sent; RPCs that need a service identity are refused by the
    /// authentication layer without one. Health checks stay anonymous (Kubernetes gRPC probes
    /// cannot present certificates), so this is the default when a client CA is configured.
    #[default]
    Optional,
    /// Every connection must present a certificate from the client CA (probes then need an
    /// exec probe such as `bratsctl health` with a certificate).
    Required,
}

/// The `[server.tls]` section. TLS is on when `cert_file` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first; empty = plaintext (development only).
    pub cert_file: String,
    /// PEM private key; refused when readable by group or others.
    pub key_file: String,
    /// PEM CA certificate(s) that sign client certificates; empty = no client certificates.
    pub client_ca_file: String,
    /// Whether clients must present a certificate (see [`ClientAuth`]).
    pub client_auth: ClientAuth,
    /// Oldest protocol accepted: `"1.2"` (default) or `"1.3"`.
    pub min_version: String,
    /// Seconds a new connection gets to finish its handshake before it is closed.
    pub handshake_timeout_s: u64,
    /// Seconds between checks of the files for a new certificate; 0 = only on SIGHUP.
    pub reload_interval_s: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert_file: String::new(),
            key_file: String::new(),
            client_ca_file: String::new(),
            client_auth: ClientAuth::default(),
            min_version: "1.2".into(),
            handshake_timeout_s: 10,
            reload_interval_s: 10,
        }
    }
}

impl TlsConfig {
    /// Whether TLS is configured.
    pub fn enabled(&self) -> bool {
        !self.cert_file.is_empty()
    }
}

/// The `[server.metrics_tls]` section: `/metrics` over HTTPS with the `[server.tls]`
/// certificate and key (and their reload), so scrapes and the figures they carry travel
/// encrypted and only authorised scrapers can read them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsTlsConfig {
    /// Serve `/metrics` over HTTPS only (needs `[server.tls] cert_file`).
    pub enabled: bool,
    /// Require a client certificate from `[server.tls] client_ca_file` (mutual TLS): only a
    /// scraper holding one gets the metrics.
    pub require_client_cert: bool,
}

/// The ALPN protocol tonic speaks.
const ALPN_H2: &[u8] = b"h2";
/// The ALPN protocol Prometheus scrapers speak.
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Why TLS could not be set up; each names the file or setting and the fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM item.
    #[error("server.tls.{setting} {path}: {message}")]
    File {
        /// The setting that names the file.
        setting: &'static str,
        /// The file.
        path: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// `[server.metrics_tls]` asks for what `[server.tls]` does not provide.
    #[error("server.metrics_tls: {0}")]
    Metrics(&'static str),
    /// A setting is invalid.
    #[error("server.tls.{setting}: {message}")]
    Setting {
        /// The setting.
        setting: &'static str,
        /// What is wrong and what to do.
        message: String,
    },
    /// rustls refused the combination (e.g. a key that does not match the certificate).
    #[error("server.tls: {0}")]
    Rustls(String),
}

/// The files' identity when last loaded: a change of any (k8s swaps a `..data` symlink, an
/// operator overwrites the files) triggers a reload.
type Stamp = Vec<(PathBuf, Option<SystemTime>, u64)>;

/// The live TLS configuration of one server: swapped atomically on reload, so every
/// handshake uses a complete (old or new) configuration.
pub struct ServerTls {
    config: TlsConfig,
    /// The ALPN protocols offered: `h2` for gRPC, `http/1.1` for `/metrics`.
    alpn: Vec<u8>,
    current: RwLock<Arc<rustls::ServerConfig>>,
    stamp: Mutex<Stamp>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("config", &self.config).finish_non_exhaustive()
    }
}

/// Installs aws-lc-rs as rustls' process-wide provider (once; later calls are no-ops), so
/// client connections built elsewhere (tonic channels, reqwest) agree with the server.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

impl ServerTls {
    /// Loads the files now for the gRPC port (ALPN `h2`); errors name the file and the fix.
    pub fn load(config: &TlsConfig) -> Result<Arc<ServerTls>, TlsError> {
        Self::load_with_alpn(config, ALPN_H2)
    }

    /// Loads the files now for the `/metrics` endpoint (ALPN `http/1.1`): the gRPC port's
    /// certificate and key; client certificates from its client CA required with
    /// `require_client_cert`, else not asked for. `None` when `metrics.enabled` is off.
    pub fn load_for_metrics(
        config: &TlsConfig,
        metrics: &MetricsTlsConfig,
    ) -> Result<Option<Arc<ServerTls>>, TlsError> {
        if !metrics.enabled {
            return Ok(None);
        }
        if !config.enabled() {
            return Err(TlsError::Metrics(
                "enabled = true needs [server.tls] cert_file and key_file: /metrics serves the gRPC port's certificate",
            ));
        }
        if metrics.require_client_cert && config.client_ca_file.is_empty() {
            return Err(TlsError::Metrics(
                "require_client_cert = true needs [server.tls] client_ca_file, the CA of the scrapers' certificates",
            ));
        }
        let client_auth = if metrics.require_client_cert { ClientAuth::Required } else { ClientAuth::None };
        Self::load_with_alpn(&TlsConfig { client_auth, ..config.clone() }, ALPN_HTTP1).map(Some)
    }

    /// Loads the files now for a protocol that negotiates no ALPN (DICOM TLS, PS3.15 B.1):
    /// the same checks, certificates, client verification and reloads as the gRPC port.
    pub fn load_without_alpn(config: &TlsConfig) -> Result<Arc<ServerTls>, TlsError> {
        Self::load_with_alpn(config, b"")
    }

    fn load_with_alpn(config: &TlsConfig, alpn: &[u8]) -> Result<Arc<ServerTls>, TlsError> {
        install_crypto_provider();
        let (server_config, stamp) = build(config, alpn)?;
        Ok(Arc::new(ServerTls {
            config: config.clone(),
            alpn: alpn.to_vec(),
            current: RwLock::new(Arc::new(server_config)),
            stamp: Mutex::new(stamp),
        }))
    }

    /// The configuration the next handshake uses.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        // A poisoned lock only means a reload panicked mid-swap; the value is a whole Arc
        // either way (the rule for every lock here: take the data, it is never half-written).
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Re-reads the files when they changed (or always, with `force`) and swaps the new
    /// configuration in; returns whether it did. A broken new file keeps the old
    /// configuration serving and returns the error.
    pub fn reload(&self, force: bool) -> Result<bool, TlsError> {
        let mut stamp = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
        if !force && *stamp == stamp_of(&self.config) {
            return Ok(false);
        }
        let (server_config, new_stamp) = build(&self.config, &self.alpn)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(server_config);
        *stamp = new_stamp;
        Ok(true)
    }

    /// The handshake timeout.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.config.handshake_timeout_s.max(1))
    }

    /// Reloads on SIGHUP and every `reload_interval_s` until the process ends; `on_reload`
    /// hears of each reload (outcome and reason) so it can be audited.
    pub fn spawn_reloader(self: &Arc<Self>, on_reload: impl Fn(Result<(), &TlsError>) + Send + Sync + 'static) {
        let tls = self.clone();
        tokio::spawn(async move {
            let interval = Duration::from_secs(tls.config.reload_interval_s);
            #[cfg(unix)]
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            loop {
                let forced = tokio::select! {
                    _ = async {
                        #[cfg(unix)]
                        if let Some(h) = hup.as_mut() { h.recv().await; return; }
                        std::future::pending::<()>().await
                    } => true,
                    _ = async {
                        if interval.is_zero() { std::future::pending::<()>().await }
                        tokio::time::sleep(interval).await
                    } => false,
                };
                match tls.reload(forced) {
                    Ok(true) => {
                        info!(forced, "TLS certificate reloaded; new connections use it");
                        on_reload(Ok(()));
                    }
                    Ok(false) => {}
                    Err(e) => {
                        warn!(error = %e, "TLS certificate reload failed; still serving the previous one");
                        on_reload(Err(&e));
                    }
                }
            }
        });
    }
}

fn stamp_of(config: &TlsConfig) -> Stamp {
    [&config.cert_file, &config.key_file, &config.client_ca_file]
        .into_iter()
        .filter(|p| !p.is_empty())
        .map(|p| {
            let meta = std::fs::metadata(p).ok();
            (PathBuf::from(p), meta.as_ref().and_then(|m| m.modified().ok()), meta.map(|m| m.len()).unwrap_or(0))
        })
        .collect()
}

fn file_err(setting: &'static str, path: &str, message: impl Into<String>) -> TlsError {
    TlsError::File { setting, path: path.to_string(), message: message.into() }
}

/// Refuses a secret file that other accounts can read (the rule of [`brats_cli::secret_file`]):
/// a key readable by others has leaked to every account on the machine.
pub fn check_private_file(setting: &'static str, path: &str) -> Result<(), TlsError> {
    brats_cli::secret_file::check_secret_file(Path::new(path)).map_err(|e| file_err(setting, path, e.to_string()))
}

fn read_certs(setting: &'static str, path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(Path::new(path))
        .map_err(|e| file_err(setting, path, format!("cannot read: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(setting, path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(setting, path, "holds no PEM CERTIFICATE block"));
    }
    Ok(certs)
}

fn build(config: &TlsConfig, alpn: &[u8]) -> Result<(rustls::ServerConfig, Stamp), TlsError> {
    // Stamp first: a file replaced while we read it is then seen as changed next time.
    let stamp = stamp_of(config);
    if config.key_file.is_empty() {
        return Err(TlsError::Setting { setting: "key_file", message: "cert_file is set but key_file is not".into() });
    }
    let certs = read_certs("cert_file", &config.cert_file)?;
    check_private_file("key_file", &config.key_file)?;
    let key = PrivateKeyDer::from_pem_file(Path::new(&config.key_file))
        .map_err(|e| file_err("key_file", &config.key_file, format!("no PEM private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let versions: &[&'static rustls::SupportedProtocolVersion] = match config.min_version.as_str() {
        "1.2" | "" => &[&rustls::version::TLS13, &rustls::version::TLS12],
        "1.3" => &[&rustls::version::TLS13],
        other => {
            return Err(TlsError::Setting {
                setting: "min_version",
                message: format!("'{other}' is not supported; use \"1.2\" or \"1.3\" (older versions are insecure)"),
            });
        }
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match (config.client_ca_file.is_empty(), config.client_auth) {
        (true, ClientAuth::Required) => {
            return Err(TlsError::Setting {
                setting: "client_auth",
                message: "\"required\" needs client_ca_file, the CA that signs client certificates".into(),
            });
        }
        (true, _) | (false, ClientAuth::None) => builder.with_no_client_auth(),
        (false, mode) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in read_certs("client_ca_file", &config.client_ca_file)? {
                roots.add(ca).map_err(|e| {
                    file_err("client_ca_file", &config.client_ca_file, format!("not a CA certificate: {e}"))
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if mode == ClientAuth::Optional { verifier.allow_unauthenticated() } else { verifier };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| TlsError::Rustls(e.to_string()))?)
        }
    };
    let mut server_config = builder
        .with_single_cert(certs, key)
        .map_err(|e| file_err("key_file", &config.key_file, format!("does not match cert_file: {e}")))?;
    server_config.alpn_protocols = if alpn.is_empty() { Vec::new() } else { vec![alpn.to_vec()] };
    Ok((server_config, stamp))
}

/// A TLS client configuration for calling a peer that is not a gRPC service (the gateway's
/// DICOM TLS SCU): the peer's certificate is verified against `ca_file`; with `cert_file` and
/// `key_file` (both or neither) we present our certificate for mutual TLS. TLS 1.2 or 1.3.
pub fn client_config(ca_file: &str, cert_file: &str, key_file: &str) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in read_certs("ca_file", ca_file)? {
        roots.add(ca).map_err(|e| file_err("ca_file", ca_file, format!("not a CA certificate: {e}")))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_root_certificates(roots);
    let config = match (cert_file.is_empty(), key_file.is_empty()) {
        (true, true) => builder.with_no_client_auth(),
        (false, false) => {
            let certs = read_certs("cert_file", cert_file)?;
            check_private_file("key_file", key_file)?;
            let key = PrivateKeyDer::from_pem_file(Path::new(key_file))
                .map_err(|e| file_err("key_file", key_file, format!("no PEM private key: {e}")))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| file_err("key_file", key_file, format!("does not match cert_file: {e}")))?
        }
        _ => {
            return Err(TlsError::Setting {
                setting: "cert_file",
                message: "give both cert_file and key_file (mutual TLS) or neither".into(),
            });
        }
    };
    Ok(Arc::new(config))
}

/// Accepts TCP connections on `listener` and completes each TLS handshake on its own task
/// (a slow or silent client delays nobody; it is dropped at the handshake timeout); finished
/// streams come out of the returned receiver. Ends when the receiver is dropped (the server
/// stopped), closing the listener.
fn accept_handshakes(listener: TcpListener, tls: Arc<ServerTls>) -> tokio::sync::mpsc::Receiver<TlsStream<TcpStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<TlsStream<TcpStream>>(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            let timeout = tls.handshake_timeout();
            let tx = tx.clone();
            tokio::spawn(async move {
                // Failures are logged with the peer's address only: its ephemeral port
                // identifies nothing and would only make the lines unique.
                match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(stream).await;
                    }
                    Ok(Err(e)) => debug!(peer = %peer.ip(), error = %e, "TLS handshake failed"),
                    Err(_) => {
                        debug!(peer = %peer.ip(), timeout_s = timeout.as_secs(), "TLS handshake timed out")
                    }
                }
            });
        }
    });
    rx
}

/// The TLS streams of `listener` for tonic (see [`accept_handshakes`]).
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
) -> impl futures::Stream<Item = Result<TlsStream<TcpStream>, io::Error>> + Send + 'static {
    use futures::StreamExt;
    tokio_stream::wrappers::ReceiverStream::new(accept_handshakes(listener, tls)).map(Ok)
}

/// The TLS streams of `listener` as an axum listener, for `/metrics` over HTTPS.
pub struct MetricsListener {
    local_addr: SocketAddr,
    streams: tokio::sync::mpsc::Receiver<TlsStream<TcpStream>>,
}

impl MetricsListener {
    /// Runs the handshakes of `listener`'s connections with `tls` (see [`accept_handshakes`]).
    pub fn new(listener: TcpListener, tls: Arc<ServerTls>) -> io::Result<Self> {
        let local_addr = listener.local_addr()?;
        Ok(MetricsListener { local_addr, streams: accept_handshakes(listener, tls) })
    }
}

impl axum::serve::Listener for MetricsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // The handshake task ends only with this receiver, so the channel stays open.
            let Some(stream) = self.streams.recv().await else {
                std::future::pending::<()>().await;
                continue;
            };
            match stream.get_ref().0.peer_addr() {
                Ok(peer) => return (stream, peer),
                // Gone between the handshake and now: nothing to serve.
                Err(_) => continue,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}
