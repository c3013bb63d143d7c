//! The request layer every service runs behind: authenticate, authorise, audit, then hand the
//! request (with its [`Principal`] in the extensions) to the service. A tower layer rather than
//! a tonic interceptor, because an interceptor cannot see which method is called.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tracing::warn;

use super::Principal;
use super::audit::{Action, AuditEvent, AuditLog, Outcome};
use super::auth::Authenticator;
use super::authz::{self, Rule};

/// Failed authentications one address may make per minute before it is answered
/// RESOURCE_EXHAUSTED (password-spraying and token-guessing brake).
pub const DEFAULT_FAILED_AUTH_PER_MINUTE: u32 = 30;

/// Addresses tracked at most; past this the oldest windows are forgotten.
const MAX_TRACKED_ADDRESSES: usize = 10_000;

/// Everything the layer needs, shared by every connection of one server.
#[derive(Clone)]
pub struct Security {
    inner: Arc<Inner>,
}

struct Inner {
    authenticator: Authenticator,
    audit: AuditLog,
    failed_auth_per_minute: u32,
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl Security {
    /// The layer state for one server.
    pub fn new(authenticator: Authenticator, audit: AuditLog, failed_auth_per_minute: u32) -> Self {
        Security {
            inner: Arc::new(Inner {
                authenticator,
                audit,
                failed_auth_per_minute: failed_auth_per_minute.max(1),
                failures: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The audit log (for state changes the service records itself).
    pub fn audit(&self) -> &AuditLog {
        &self.inner.audit
    }

    /// The tower layer.
    pub fn layer(&self) -> SecurityLayer {
        SecurityLayer(self.clone())
    }

    fn throttled(&self, ip: Option<IpAddr>) -> bool {
        let Some(ip) = ip else { return false };
        let failures = self.inner.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.get(&ip).is_some_and(|(since, n)| {
            since.elapsed() < Duration::from_secs(60) && *n >= self.inner.failed_auth_per_minute
        })
    }

    fn note_failure(&self, ip: Option<IpAddr>) {
        let Some(ip) = ip else { return };
        let mut failures = self.inner.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= MAX_TRACKED_ADDRESSES {
            failures.retain(|_, (since, _)| since.elapsed() < Duration::from_secs(60));
        }
        let entry = failures.entry(ip).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= Duration::from_secs(60) {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
    }

    /// Records an authorisation decision. `Err` when the audit sink failed and the
    /// configuration says to fail closed.
    #[allow(clippy::too_many_arguments)] // the fields of one audit record
    fn audit_decision(
        &self,
        path: &str,
        outcome: Outcome,
        code: tonic::Code,
        reason: &str,
        principal: Option<&Principal>,
        ip: Option<IpAddr>,
        started: Instant,
    ) -> Result<(), Status> {
        let event = AuditEvent {
            rpc: path,
            action: Action::Authorize,
            outcome,
            grpc_code: code,
            reason,
            principal,
            source_ip: ip,
            resource: None,
            latency_ms: Some(started.elapsed().as_millis() as u64),
        };
        match self.inner.audit.record(event) {
            Ok(()) => Ok(()),
            Err(e) => {
                warn!(error = %e, "audit record could not be written");
                if self.inner.audit.fail_closed() {
                    Err(Status::unavailable("the audit log cannot be written; try again later"))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// The tower layer of [`Security`].
#[derive(Clone)]
pub struct SecurityLayer(Security);

impl<S> tower::Layer<S> for SecurityLayer {
    type Service = SecurityService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SecurityService { inner, security: self.0.clone() }
    }
}

/// The service [`SecurityLayer`] wraps around the routes.
#[derive(Clone)]
pub struct SecurityService<S> {
    inner: S,
    security: Security,
}

/// The peer's address and verified client certificates, from what tonic recorded of the
/// connection (plain TCP or TLS).
fn peer(req: &http::Request<Body>) -> (Option<IpAddr>, Option<Arc<Vec<CertificateDer<'static>>>>) {
    if let Some(tls) = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>() {
        return (tls.get_ref().remote_addr().map(|a| a.ip()), tls.peer_certs());
    }
    if let Some(tcp) = req.extensions().get::<TcpConnectInfo>() {
        return (tcp.remote_addr().map(|a| a.ip()), None);
    }
    (None, None)
}

impl<S> tower::Service<http::Request<Body>> for SecurityService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        // The clone that was made ready is the one to call (tower's rule); keep a fresh one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = req.uri().path().to_string();
        if authz::rule(&path) == Rule::Public {
            return Box::pin(inner.call(req));
        }
        let security = self.security.clone();
        Box::pin(async move {
            let started = Instant::now();
            let (ip, certs) = peer(&req);
            let refuse = |status: Status| Ok(status.into_http());
            if security.throttled(ip) {
                let code = tonic::Code::ResourceExhausted;
                if let Err(s) = security.audit_decision(&path, Outcome::Denied, code, "throttled", None, ip, started) {
                    return refuse(s);
                }
                return refuse(Status::resource_exhausted(
                    "too many failed authentications from this address; wait a minute and check the credentials",
                ));
            }
            let principal = match security
                .inner
                .authenticator
                .authenticate(req.headers(), certs.as_deref().map(Vec::as_slice))
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    // The identity provider being down is not the caller's fault: UNAVAILABLE
                    // tells it to retry, and does not count against its address.
                    let code = if e.is_unavailable() {
                        tonic::Code::Unavailable
                    } else {
                        security.note_failure(ip);
                        tonic::Code::Unauthenticated
                    };
                    if let Err(s) = security.audit_decision(&path, Outcome::Denied, code, e.reason(), None, ip, started)
                    {
                        return refuse(s);
                    }
                    return refuse(Status::new(code, e.to_string()));
                }
            };
            if let Err(denied) = authz::authorize(&principal, &path) {
                let code = tonic::Code::PermissionDenied;
                let audited =
                    security.audit_decision(&path, Outcome::Denied, code, "role", Some(&principal), ip, started);
                if let Err(s) = audited {
                    return refuse(s);
                }
                return refuse(Status::permission_denied(denied.to_string()));
            }
            let audited =
                security.audit_decision(&path, Outcome::Allowed, tonic::Code::Ok, "", Some(&principal), ip, started);
            if let Err(s) = audited {
                return refuse(s);
            }
            req.extensions_mut().insert(principal.clone());
            let response = inner.call(req).await?;
            // A refusal by the service itself (a location outside the tenant, a job of another
            // tenant, bad input) comes back before any body, with grpc-status in the headers:
            // audit it too, by code only (the message may name the caller's paths).
            let refused = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map(tonic::Code::from)
                .filter(|c| *c != tonic::Code::Ok);
            if let Some(code) = refused {
                let outcome = if code == tonic::Code::PermissionDenied { Outcome::Denied } else { Outcome::Failed };
                let reason = "refused by the service";
                // The call has run: a failing audit sink can no longer stop it.
                let _ = security.audit_decision(&path, outcome, code, reason, Some(&principal), ip, started);
            }
            Ok(response)
        })
    }
}
