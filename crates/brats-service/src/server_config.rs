//! The `[server]` section every service's configuration shares: where it listens, where its
//! metrics are, how long shutdown waits. One type, so the three services are configured alike
//! (`[server]` in each TOML file, `BRATS_<SERVICE>_SERVER__<KEY>` in the environment) and a
//! setting added here (TLS, authentication) reaches all of them.

use std::time::Duration;

use brats_cli::ClientSecurity;
use serde::{Deserialize, Serialize};

use crate::security::audit::AuditConfig;
use crate::security::auth::AuthConfig;
use crate::security::layer::DEFAULT_FAILED_AUTH_PER_MINUTE;
use crate::security::tenants::TenantConfig;
use crate::security::tls::{MetricsTlsConfig, TlsConfig};
use std::collections::BTreeMap;

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
    /// `[server.tls]`: the certificate, key and client CA (TLS is off until `cert_file` is set).
    #[serde(default)]
    pub tls: TlsConfig,
    /// `[server.metrics_tls]`: `/metrics` over HTTPS with the `[server.tls]` certificate.
    #[serde(default)]
    pub metrics_tls: MetricsTlsConfig,
    /// `[server.auth]`: who may call (JWT issuers, API keys, service identities).
    #[serde(default)]
    pub auth: AuthConfig,
    /// `[server.audit]`: where authorisation decisions and state changes are recorded.
    #[serde(default)]
    pub audit: AuditConfig,
    /// `[server.tenants.<name>]`: the locations each tenant's callers may name in request
    /// URIs (none configured: every location, for development only).
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
    /// `[server.client]`: how this service calls the others (CA, its own certificate for
    /// mutual TLS, a credential file).
    #[serde(default)]
    pub client: ClientSecurity,
    /// Failed authentications per source address per minute before RESOURCE_EXHAUSTED.
    #[serde(default = "default_failed_auth_per_minute")]
    pub failed_auth_per_minute: u32,
    /// HTTP/2 streams one connection may run at once.
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// Bytes of request headers (metadata) one request may carry.
    #[serde(default = "default_max_header_list_size")]
    pub max_header_list_size: u32,
}

fn default_failed_auth_per_minute() -> u32 {
    DEFAULT_FAILED_AUTH_PER_MINUTE
}

fn default_max_concurrent_streams() -> u32 {
    128
}

fn default_max_header_list_size() -> u32 {
    16 * 1024
}

impl ServerConfig {
    /// A section with these values (a service's defaults).
    pub fn new(listen: &str, metrics_listen: &str, shutdown_grace_s: u64) -> Self {
        Self {
            listen: listen.into(),
            metrics_listen: metrics_listen.into(),
            shutdown_grace_s,
            tls: TlsConfig::default(),
            metrics_tls: MetricsTlsConfig::default(),
            auth: AuthConfig::default(),
            audit: AuditConfig::default(),
            tenants: BTreeMap::new(),
            client: ClientSecurity::default(),
            failed_auth_per_minute: default_failed_auth_per_minute(),
            max_concurrent_streams: default_max_concurrent_streams(),
            max_header_list_size: default_max_header_list_size(),
        }
    }

    /// [`Self::shutdown_grace_s`] as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped example of the security sections parses, every key in it known.
    #[test]
    fn the_shipped_security_example_parses() {
        #[derive(Deserialize)]
        struct File {
            server: ServerConfig,
        }
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/security.toml");
        let file: File = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let s = file.server;
        assert!(s.tls.enabled() && s.auth.enabled);
        assert_eq!(s.auth.jwt.as_ref().unwrap().audiences, ["brats"]);
        assert_eq!(s.tenants["neuro"].allowed_prefixes.len(), 2);
        assert_eq!(s.auth.services["trainer.brats.internal"].roles, ["service"]);
        assert!(s.client.tls());
        assert!(s.metrics_tls.enabled && s.metrics_tls.require_client_cert);
        assert_eq!(s.audit.store_uri, "s3://brats-audit/neuro/");
        assert_eq!((s.audit.segment_records, s.audit.flush_interval_s), (100, 5));
    }
}

/// The `serve` flags every service binary takes, over its [`ServerConfig`] (each binary adds
/// its own `--config` with its own environment variable, and its service's settings).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeFlags {
    /// gRPC listen address (overrides the configuration).
    #[arg(long)]
    pub listen: Option<String>,
    /// Prometheus `/metrics` listen address; "" disables (overrides the configuration).
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Print logs as JSON lines.
    #[arg(long)]
    pub json_logs: bool,
}

impl ServeFlags {
    /// Writes the given addresses over the configuration's.
    pub fn apply(&self, server: &mut ServerConfig) {
        if let Some(v) = &self.listen {
            server.listen = v.clone();
        }
        if let Some(v) = &self.metrics_listen {
            server.metrics_listen = v.clone();
        }
    }
}
