//! One module per `bratsctl` command, and the little they share.

pub(crate) mod audit;
pub(crate) mod health;
pub(crate) mod keys;
pub(crate) mod models;
pub(crate) mod pacs;
pub(crate) mod preprocess;
pub(crate) mod security;
pub(crate) mod segment;
pub(crate) mod train;
pub(crate) mod watch;

use std::sync::RwLock;

use anyhow::Context;
use brats_cli::{AuthChannel, ClientSecurity};

/// How this process reaches the services: the global `--ca`/`--cert`/`--key`/`--token-file`/
/// `--api-key-file` flags, replaced by the demo with what it set up.
static SECURITY: RwLock<Option<ClientSecurity>> = RwLock::new(None);

/// Sets how every command connects from now on.
pub(crate) fn set_security(security: ClientSecurity) {
    *SECURITY.write().unwrap_or_else(|e| e.into_inner()) = Some(security);
}

/// How every command connects.
pub(crate) fn security() -> ClientSecurity {
    SECURITY.read().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default()
}

/// A channel to `server` with the configured TLS and credentials: the one way commands
/// connect.
pub(crate) async fn connect(server: &str) -> anyhow::Result<AuthChannel> {
    security().connect(server).await.with_context(|| format!("connect {server}"))
}

/// A gRPC status as the error a command ends with: `NotFound: no job 'x'`.
pub(crate) fn status_line(s: &tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

/// Sizes as `240, 240, 155`.
pub(crate) fn join(v: &[u32]) -> String {
    v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ")
}
