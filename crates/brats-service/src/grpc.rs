//! The gRPC server shell every service runs in: one listener carrying the service beside
//! `grpc.health.v1` and reflection, the `/metrics` endpoint next to it, and the shutdown sequence
//! (NOT_SERVING, stop accepting, drain), so each service's `server.rs` keeps only its own start-up.
//!
//! A service binds first ([`GrpcServer::bind`]), hands its bound address on
//! ([`GrpcServer::announce`]), starts whatever decides its health ([`GrpcServer::health`]), and
//! then serves until its shutdown signal ([`GrpcServer::serve`]).

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::oneshot;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::transport::server::Router;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

use crate::ServerConfig;
use crate::security::audit::{Action, AuditEvent, AuditLog, Outcome};
use crate::security::auth::Authenticator;
use crate::security::layer::{Security, SecurityLayer};
use crate::security::tenants::UriPolicy;
use crate::security::tls::ServerTls;
use std::sync::Arc;

/// The routes behind the security layer.
type SecuredRouter = Router<tower::layer::util::Stack<SecurityLayer, tower::layer::util::Identity>>;

/// Why a service's gRPC server could not start or stopped with an error; the messages name the
/// step (and address) that failed, the cause follows as the source.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The reflection service could not be built from the descriptor sets.
    #[error("reflection service")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// The gRPC listen address could not be bound.
    #[error("bind {listen}")]
    Bind {
        /// The configured listen address.
        listen: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The metrics listen address could not be bound.
    #[error("bind metrics {listen}")]
    MetricsBind {
        /// The configured metrics listen address.
        listen: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A bound listener could not report its local address.
    #[error(transparent)]
    LocalAddr(std::io::Error),
    /// The gRPC transport failed while serving.
    #[error("gRPC server")]
    Transport(#[source] tonic::transport::Error),
    /// The shutdown task panicked or was cancelled before it finished.
    #[error("shutdown task")]
    ShutdownTask(#[source] tokio::task::JoinError),
    /// `[server.tls]` could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::security::tls::TlsError),
    /// `[server.auth]` is not usable.
    #[error("server.auth")]
    Auth(#[source] crate::security::auth::AuthSetupError),
    /// `[server.tenants]` is not usable.
    #[error(transparent)]
    Tenants(#[from] crate::security::tenants::TenantConfigError),
    /// `[server.audit]` could not be opened.
    #[error("server.audit")]
    Audit(#[source] crate::security::audit::AuditError),
}

/// The `grpc.health.v1` status of one service, cloneable into the tasks that decide it (warm-up,
/// recovery, shutdown).
#[derive(Clone, Debug)]
pub struct ServiceHealth {
    reporter: HealthReporter,
    service: &'static str,
}

impl ServiceHealth {
    /// Reports the service SERVING, so health checks route traffic to it.
    pub async fn set_serving(&self) {
        self.reporter.set_service_status(self.service, ServingStatus::Serving).await;
    }

    /// Reports the service NOT_SERVING, so health checks keep traffic away from it.
    pub async fn set_not_serving(&self) {
        self.reporter.set_service_status(self.service, ServingStatus::NotServing).await;
    }
}

/// What happens to running requests once the shutdown signal has closed the listener.
pub struct Drain(DrainKind);

enum DrainKind {
    Grace { period: Duration, abandon_message: &'static str },
    Complete { cleanup: Pin<Box<dyn Future<Output = ()> + Send>> },
}

impl Drain {
    /// Lets running requests finish for at most `period`, then abandons them and logs
    /// `abandon_message` as a warning (with `grace_s`), so a stuck request cannot hold shutdown.
    pub fn within(period: Duration, abandon_message: &'static str) -> Self {
        Self(DrainKind::Grace { period, abandon_message })
    }

    /// Waits for every running request while `cleanup` runs (started once the listener is closed,
    /// finished before `serve` returns), for services whose own shutdown ends their long work.
    pub fn complete(cleanup: impl Future<Output = ()> + Send + 'static) -> Self {
        Self(DrainKind::Complete { cleanup: Box::pin(cleanup) })
    }
}

/// The one `tonic` transport every service runs, built from its `[server]` section, with the
/// HTTP/2 limits and the security layer (authentication, authorisation, audit) added once for
/// all services, so no service can be started without them. TLS is terminated before tonic
/// (see [`crate::security::tls`]).
fn transport(
    server: &ServerConfig,
    security: &Security,
) -> tonic::transport::server::Server<tower::layer::util::Stack<SecurityLayer, tower::layer::util::Identity>> {
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(server.max_concurrent_streams))
        .http2_max_header_list_size(Some(server.max_header_list_size))
        .http2_max_pending_accept_reset_streams(Some(64))
        .layer(security.layer())
}

/// This process's name in audit records: host and process id.
fn instance() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}-{}", std::process::id())
}

/// Reloads `tls` as its files change (or on SIGHUP), recording each reload in `audit` as
/// `rpc` (`tls` for the gRPC port, `metrics_tls` for `/metrics`).
fn reload_audited(tls: &Arc<ServerTls>, audit: &AuditLog, rpc: &'static str) {
    let audit = audit.clone();
    tls.spawn_reloader(move |result| {
        let (outcome, reason) = match result {
            Ok(()) => (Outcome::Succeeded, String::new()),
            Err(e) => (Outcome::Failed, e.to_string()),
        };
        let mut event = AuditEvent::new(rpc, Action::CertificateReloaded, outcome, tonic::Code::Ok);
        event.reason = &reason;
        let _ = audit.record(event);
    });
}

/// How long shutdown waits for the audit store to take the last records.
const AUDIT_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// A bound gRPC listener for service `S` with health (`grpc.health.v1`), reflection and
/// `/metrics` already set up, so a service only adds its own start-up before [`Self::serve`].
pub struct GrpcServer<S> {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    health: ServiceHealth,
    router: SecuredRouter,
    tls: Option<Arc<ServerTls>>,
    security: Security,
    uris: UriPolicy,
    service: PhantomData<fn(S)>,
}

impl<S: NamedService> GrpcServer<S> {
    /// Sets `S`'s health to `initial`, builds reflection, binds `server.listen` (port 0 picks a
    /// free port) and starts the `metrics` endpoint on `server.metrics_listen` (empty: none), in
    /// that order, so the service can announce its address before it is ready.
    pub async fn bind(
        server: &ServerConfig,
        initial: ServingStatus,
        metrics: prometheus::Registry,
    ) -> Result<Self, ServerError> {
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let health = ServiceHealth { reporter, service: S::NAME };
        health.reporter.set_service_status(S::NAME, initial).await;
        let (reflection_v1, reflection_v1alpha) = crate::reflection(S::NAME).map_err(ServerError::Reflection)?;
        let audit = AuditLog::open(&server.audit, S::NAME, &instance()).map_err(ServerError::Audit)?;
        // Reach the audit store (and continue its chain) before serving: with "deny", a store
        // that cannot be written stops the start like an unwritable audit file does.
        if let Err(e) = audit.flush().await {
            if audit.fail_closed() {
                return Err(ServerError::Audit(e));
            }
            warn!(error = %e, "the audit store cannot be written; records wait in memory (on_failure = \"log\")");
        }
        let uris = UriPolicy::new(&server.tenants)?;
        if !server.auth.enabled {
            warn!(
                "authentication is OFF ([server.auth] enabled = false): every caller is an admin; enable it outside development"
            );
        }
        if !uris.enforced() {
            warn!(
                "no [server.tenants] configured: callers may name any location the process can reach; configure tenants outside development"
            );
        }
        if !server.tls.enabled() {
            warn!("TLS is OFF ([server.tls] cert_file unset): requests and credentials travel in plaintext");
        }
        let authenticator = Authenticator::new(&server.auth).map_err(ServerError::Auth)?;
        let security = Security::new(authenticator, audit.clone(), server.failed_auth_per_minute);
        let tls = if server.tls.enabled() {
            let tls = ServerTls::load(&server.tls)?;
            reload_audited(&tls, &audit, "tls");
            Some(tls)
        } else {
            None
        };
        let metrics_tls = ServerTls::load_for_metrics(&server.tls, &server.metrics_tls)?;
        if let Some(metrics_tls) = &metrics_tls {
            reload_audited(metrics_tls, &audit, "metrics_tls");
        } else if server.tls.enabled() && !server.metrics_listen.is_empty() {
            warn!("/metrics is served in plaintext ([server.metrics_tls] enabled = false)");
        }

        let listen = &server.listen;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|source| ServerError::Bind { listen: listen.to_string(), source })?;
        let addr = listener.local_addr().map_err(ServerError::LocalAddr)?;
        crate::spawn_metrics_endpoint(&server.metrics_listen, metrics, metrics_tls).await?;

        let router = transport(server, &security)
            .trace_fn(|req| tracing::info_span!("grpc", path = %req.uri().path()))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        Ok(Self { listener, addr, health, router, tls, security, uris, service: PhantomData })
    }

    /// The bound gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends the bound address through `bound` (when given), so a caller that asked for port 0
    /// learns where to connect as soon as the listener is up.
    pub fn announce(&self, bound: Option<oneshot::Sender<SocketAddr>>) {
        if let Some(tx) = bound {
            let _ = tx.send(self.addr);
        }
    }

    /// A handle on `S`'s health status, for the tasks that turn it SERVING or NOT_SERVING.
    pub fn health(&self) -> ServiceHealth {
        self.health.clone()
    }

    /// Where callers may point request URIs (`[server.tenants]`), for the service's handlers.
    pub fn uri_policy(&self) -> UriPolicy {
        self.uris.clone()
    }

    /// The audit log requests are recorded in, for the state changes the service records
    /// itself (jobs started and finished, models registered, aliases moved).
    pub fn audit(&self) -> AuditLog {
        self.security.audit().clone()
    }

    /// Serves `service` until `shutdown` resolves; then logs `stopping_message`, reports
    /// NOT_SERVING, stops accepting, drains running requests as `drain` says, and logs `stopped`.
    pub async fn serve(
        self,
        service: S,
        shutdown: impl Future<Output = ()> + Send + 'static,
        stopping_message: &'static str,
        drain: Drain,
    ) -> Result<(), ServerError>
    where
        S: tonic::codegen::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = Infallible,
            > + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        let Self { listener, health, router, tls, security, .. } = self;
        let (grace, cleanup) = match drain.0 {
            DrainKind::Grace { period, abandon_message } => (Some((period, abandon_message)), None),
            DrainKind::Complete { cleanup } => (None, Some(cleanup)),
        };
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (drain_tx, drain_rx) = oneshot::channel::<()>();
        let stopper = tokio::spawn(async move {
            shutdown.await;
            info!("{stopping_message}");
            health.set_not_serving().await;
            let _ = stop_tx.send(());
            let _ = drain_tx.send(());
            if let Some(cleanup) = cleanup {
                cleanup.await;
            }
        });
        let router = router.add_service(service);
        let stopped = async {
            let _ = stop_rx.await;
        };
        let server: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> = match tls {
            Some(tls) => {
                Box::pin(router.serve_with_incoming_shutdown(crate::security::tls::incoming(listener, tls), stopped))
            }
            None => Box::pin(
                router.serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), stopped),
            ),
        };
        match grace {
            Some((grace, abandon_message)) => {
                tokio::select! {
                    r = server => r.map_err(ServerError::Transport)?,
                    _ = async { if drain_rx.await.is_ok() { tokio::time::sleep(grace).await } else { std::future::pending::<()>().await } } => {
                        warn!(grace_s = grace.as_secs(), "{abandon_message}");
                    }
                }
            }
            None => {
                server.await.map_err(ServerError::Transport)?;
                stopper.await.map_err(ServerError::ShutdownTask)?;
            }
        }
        // The records of the last requests (and of the cleanup) into the audit store.
        let audit = security.audit();
        match tokio::time::timeout(AUDIT_FLUSH_TIMEOUT, audit.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, unflushed = audit.unflushed(), "audit records lost at shutdown"),
            Err(_) => warn!(unflushed = audit.unflushed(), "audit records lost at shutdown: the store did not answer"),
        }
        info!("stopped");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus as Reported;
    use tonic_health::pb::health_client::HealthClient;

    /// A stand-in service that answers every call with an empty response.
    #[derive(Clone)]
    struct Stub;

    impl NamedService for Stub {
        const NAME: &'static str = "test.Stub";
    }

    impl tonic::codegen::Service<http::Request<tonic::body::Body>> for Stub {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
            std::future::ready(Ok(http::Response::new(tonic::body::Body::empty())))
        }
    }

    async fn reported(addr: SocketAddr, service: &str) -> Reported {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        let mut client = HealthClient::new(channel);
        let r = client.check(HealthCheckRequest { service: service.into() }).await.unwrap();
        r.into_inner().status()
    }

    #[tokio::test]
    async fn health_transitions_and_graceful_stop() {
        let grpc = GrpcServer::<Stub>::bind(
            &ServerConfig::new("127.0.0.1:0", "", 0),
            ServingStatus::NotServing,
            prometheus::Registry::new(),
        )
        .await
        .unwrap();
        let (tx, rx) = oneshot::channel();
        grpc.announce(Some(tx));
        let addr = rx.await.unwrap();
        assert_eq!(addr, grpc.addr());
        let health = grpc.health();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(grpc.serve(
            Stub,
            async {
                let _ = stop_rx.await;
            },
            "stopping",
            Drain::within(Duration::from_secs(5), "abandoned"),
        ));

        assert_eq!(reported(addr, "test.Stub").await, Reported::NotServing);
        health.set_serving().await;
        assert_eq!(reported(addr, "test.Stub").await, Reported::Serving);

        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server).await.unwrap().unwrap().unwrap();
        let mut after = HealthClient::new(
            tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy(),
        );
        assert!(after.check(HealthCheckRequest { service: "test.Stub".into() }).await.is_err(), "listener closed");
    }

    #[tokio::test]
    async fn complete_drain_finishes_cleanup_before_returning() {
        let grpc = GrpcServer::<Stub>::bind(
            &ServerConfig::new("127.0.0.1:0", "", 0),
            ServingStatus::Serving,
            prometheus::Registry::new(),
        )
        .await
        .unwrap();
        let addr = grpc.addr();
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let cleanup = async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            flag.store(true, Ordering::SeqCst);
        };
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(grpc.serve(
            Stub,
            async {
                let _ = stop_rx.await;
            },
            "stopping",
            Drain::complete(cleanup),
        ));
        assert_eq!(reported(addr, "test.Stub").await, Reported::Serving);
        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server).await.unwrap().unwrap().unwrap();
        assert!(done.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn bind_failure_names_the_address() {
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = taken.local_addr().unwrap().to_string();
        let Err(e) = GrpcServer::<Stub>::bind(
            &ServerConfig::new(&listen, "", 0),
            ServingStatus::Serving,
            prometheus::Registry::new(),
        )
        .await
        else {
            panic!("bound an address already in use")
        };
        assert!(matches!(e, ServerError::Bind { .. }), "{e:?}");
        assert_eq!(e.to_string(), format!("bind {listen}"));
        let Err(e) = GrpcServer::<Stub>::bind(
            &ServerConfig::new("127.0.0.1:0", &listen, 0),
            ServingStatus::Serving,
            prometheus::Registry::new(),
        )
        .await
        else {
            panic!("bound a metrics address already in use")
        };
        assert_eq!(e.to_string(), format!("bind metrics {listen}"));
    }
}
