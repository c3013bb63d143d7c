//! The `[server]` section every service's configuration shares: where it listens, where its
//! metrics are, how long shutdown waits. One type, so the three services are configured alike
//! (`[server]` in each TOML file, `BRATS_<SERVICE>_SERVER__<KEY>` in the environment) and a
//! setting added here (TLS, authentication) reaches all of them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The `[server]` section of a service's configuration. Each service gives its own defaults
/// ([`ServerConfig::new`]); the configuration loader overlays the file and the environment on
/// them key by key, so a file may set any subset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC listen address, `host:port`; port 0 picks a free port.
    pub listen: String,
    /// Prometheus `/metrics` listen address; empty disables the endpoint.
    pub metrics_listen: String,
    /// Seconds running requests get to finish after SIGTERM before they are abandoned.
    pub shutdown_grace_s: u64,
}

impl ServerConfig {
    /// A section with these values (a service's defaults).
    pub fn new(listen: &str, metrics_listen: &str, shutdown_grace_s: u64) -> Self {
        Self { listen: listen.into(), metrics_listen: metrics_listen.into(), shutdown_grace_s }
    }

    /// [`Self::shutdown_grace_s`] as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_s)
    }
}
