//! The shell every gRPC service of the platform shares, so each service crate holds only its
//! own logic: configuration layering (TOML file, then environment), mapping of core errors to
//! gRPC statuses, the reflection service, the Prometheus `/metrics` endpoint, shutdown
//! signals, the server shell itself ([`GrpcServer`]: health, reflection, metrics, drain), and
//! the redaction of a request's locations from the statuses it is answered with ([`redact`]).

mod grpc;
pub mod redact;
pub mod security;
mod server_config;

pub use grpc::{Drain, GrpcServer, ServerError, ServiceHealth};
pub use server_config::{ServeFlags, ServerConfig};
pub use tonic_health::ServingStatus;

use brats_core::error::{CoreError, ErrorKind};
use tonic::Status;
use tracing::info;

/// The status code a client should act on for a kind of core error.
pub fn code(kind: ErrorKind) -> tonic::Code {
    match kind {
        ErrorKind::InvalidInput => tonic::Code::InvalidArgument,
        ErrorKind::NotFound => tonic::Code::NotFound,
        ErrorKind::AlreadyExists => tonic::Code::AlreadyExists,
        ErrorKind::Unavailable => tonic::Code::Unavailable,
        ErrorKind::Internal => tonic::Code::Internal,
    }
}

/// Maps a core error to the status a client should act on.
pub fn status(e: CoreError) -> Status {
    Status::new(code(e.kind()), e.to_string())
}

/// [`status`] with the request field that caused it named first.
pub fn field_status(field: &str, e: CoreError) -> Status {
    let s = status(e);
    Status::new(s.code(), format!("{field}: {}", s.message()))
}

/// The canonical upper-case name of a status code (`INVALID_ARGUMENT`, …).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The services a reflection client is told a server serves besides its own: health and the
/// two reflection protocol versions.
const SHELL_SERVICES: [&str; 3] =
    ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"];

/// Server reflection for a server that serves `service` (a fully qualified name such as
/// `brats.v1.Inference`), in both protocol versions: `grpc.reflection.v1` and the older
/// `v1alpha` that older grpcurl, Postman and several language SDKs still speak. Both describe
/// the whole contract (so any message type resolves) but list only the services this server
/// answers: `service`, health and reflection. Returns the v1 and the v1alpha service.
pub fn reflection(
    service: &str,
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        SHELL_SERVICES.iter().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(brats_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name(service),
            |b, name| b.with_service_name(*name),
        )
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

/// Serves `registry` as Prometheus text on `http://<listen>/metrics` in the background, or on
/// `https://<listen>/metrics` with `tls` (`[server.metrics_tls]`: plaintext is then refused);
/// an empty `listen` disables it.
pub async fn spawn_metrics_endpoint(
    listen: &str,
    registry: prometheus::Registry,
    tls: Option<std::sync::Arc<security::tls::ServerTls>>,
) -> Result<(), ServerError> {
    if listen.is_empty() {
        return Ok(());
    }
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                let mut buf = String::new();
                prometheus::TextEncoder::new()
                    .encode_utf8(&registry.gather(), &mut buf)
                    .map(|_| buf)
                    .unwrap_or_default()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServerError::MetricsBind { listen: listen.to_string(), source })?;
    let addr = listener.local_addr().map_err(ServerError::LocalAddr)?;
    match tls {
        Some(tls) => {
            info!(%addr, "metrics on /metrics over HTTPS");
            let listener = security::tls::MetricsListener::new(listener, tls).map_err(ServerError::LocalAddr)?;
            tokio::spawn(async move { axum::serve(listener, app).await });
        }
        None => {
            info!(%addr, "metrics on /metrics");
            tokio::spawn(async move { axum::serve(listener, app).await });
        }
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Loads a service configuration: `defaults`, overlaid by the TOML file at `path` (when given),
/// overlaid by `<prefix><KEY>` environment variables (nested keys with `__`, e.g.
/// `BRATS_PREPROCESS_STORE__S3_ENDPOINT`; numbers, booleans and arrays parse as TOML, anything
/// else is a string). Unknown keys are refused by the target type's `deny_unknown_fields`.
pub fn load_config<T: serde::Serialize + serde::de::DeserializeOwned>(
    defaults: T,
    path: Option<&std::path::Path>,
    prefix: &str,
) -> anyhow::Result<T> {
    use anyhow::Context;
    let mut value = toml::Value::try_from(defaults)?;
    if let Some(p) = path {
        let text = std::fs::read_to_string(p).with_context(|| format!("config file {}", p.display()))?;
        let file: toml::Value = toml::from_str(&text).with_context(|| format!("config file {}", p.display()))?;
        merge(&mut value, file);
    }
    for (k, v) in std::env::vars() {
        let Some(key) = k.strip_prefix(prefix) else { continue };
        if key == "CONFIG" {
            continue;
        }
        let parsed = toml::from_str::<toml::Table>(&format!("v = {v}"))
            .ok()
            .and_then(|t| t.get("v").cloned())
            .unwrap_or(toml::Value::String(v.clone()));
        let mut overlay = parsed;
        for seg in key.to_ascii_lowercase().split("__").collect::<Vec<_>>().into_iter().rev() {
            let mut t = toml::Table::new();
            t.insert(seg.to_string(), overlay);
            overlay = toml::Value::Table(t);
        }
        merge(&mut value, overlay);
    }
    value.try_into().with_context(|| format!("invalid configuration (file or {prefix}* environment variables)"))
}

fn merge(base: &mut toml::Value, overlay: toml::Value) {
    match (base, overlay) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// Logs to stderr: `RUST_LOG` when set, else `default_filter`; JSON lines when `json`.
pub fn init_logging(default_filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Runs a binary's async entry point on a Tokio runtime; an error becomes one `error:` line on
/// stderr (the cause chain, outermost first) and exit code 2.
pub fn run_main<F: std::future::Future<Output = anyhow::Result<()>>>(main: F) -> std::process::ExitCode {
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    brats_cli::exit_with(rt.block_on(main), 2)
}
