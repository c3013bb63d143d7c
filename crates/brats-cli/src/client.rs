//! How every client of the platform reaches a secured service, defined once: `bratsctl`'s
//! flags (`--ca`, `--cert`, `--key`, `--tls-domain`, `--token-file`, `--api-key-file`, each
//! also from the environment), and the same settings in a service's TOML for the calls it
//! makes to other services (inference and trainer to preprocessing).
//!
//! TLS is used when a CA is given (an `http://` address is then spoken to as `https://`);
//! a client certificate and key make it mutual TLS; a token or API key read from a file is
//! sent with every request. Secrets come from files only (never flags, which `ps` shows),
//! and a secret file other accounts can read is refused (`crate::secret_file`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tonic::metadata::{AsciiMetadataValue, MetadataKey};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A channel that sends the caller's credentials with every request.
pub type AuthChannel = InterceptedService<Channel, Credentials>;

/// Transport security and credentials of a client.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, default)]
pub struct ClientSecurity {
    /// PEM CA certificate that signs the servers' certificates; turns TLS on.
    #[arg(long = "ca", env = "BRATS_CA", global = true, value_name = "PEM")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with --key).
    #[arg(long = "cert", env = "BRATS_CERT", global = true, value_name = "PEM", requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of --cert (must not be readable by other accounts; see `secret_file`).
    #[arg(long = "key", env = "BRATS_KEY", global = true, value_name = "PEM", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// Name to verify in the server's certificate, when it differs from the address's host.
    #[arg(long = "tls-domain", env = "BRATS_TLS_DOMAIN", global = true, value_name = "NAME")]
    pub domain: Option<String>,
    /// File holding a bearer token (an OIDC access token), sent as `authorization: Bearer`.
    #[arg(
        long = "token-file",
        env = "BRATS_TOKEN_FILE",
        global = true,
        value_name = "FILE",
        conflicts_with = "api_key_file"
    )]
    pub token_file: Option<PathBuf>,
    /// File holding an API key (`brats_<id>_<secret>`), sent as `x-api-key`.
    #[arg(long = "api-key-file", env = "BRATS_API_KEY_FILE", global = true, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
}

/// Why a client could not be set up; names the flag or file and the fix, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A file could not be used.
    #[error("{flag} {path}: {message}")]
    File {
        /// The flag (or setting) naming the file.
        flag: &'static str,
        /// The file.
        path: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// The address or TLS settings are not usable.
    #[error("{0}")]
    Endpoint(String),
}

/// The credential sent with every request (Debug shows which kind, never the value).
#[derive(Clone, Default)]
pub struct Credentials(Option<(MetadataKey<tonic::metadata::Ascii>, AsciiMetadataValue)>);

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some((k, _)) => write!(f, "Credentials({k}: <redacted>)"),
            None => f.write_str("Credentials(none)"),
        }
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some((key, value)) = &self.0 {
            request.metadata_mut().insert(key.clone(), value.clone());
        }
        Ok(request)
    }
}

/// An error and its sources, outermost first, joined with `: `.
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

fn file_err(flag: &'static str, path: &Path, message: impl Into<String>) -> ClientError {
    ClientError::File { flag, path: path.display().to_string(), message: message.into() }
}

/// Reads a secret file, refusing one that other accounts can read ([`crate::secret_file`]).
fn read_secret(flag: &'static str, path: &Path) -> Result<String, ClientError> {
    crate::secret_file::check_secret_file(path).map_err(|e| file_err(flag, path, e.to_string()))?;
    let text = std::fs::read_to_string(path).map_err(|e| file_err(flag, path, e.to_string()))?;
    Ok(text.trim().to_string())
}

impl ClientSecurity {
    /// Whether TLS is configured.
    pub fn tls(&self) -> bool {
        self.ca_file.is_some()
    }

    /// The credential to send, read from its file now.
    pub fn credentials(&self) -> Result<Credentials, ClientError> {
        let (flag, path, key, prefix) = match (&self.token_file, &self.api_key_file) {
            (Some(p), _) => ("--token-file", p, "authorization", "Bearer "),
            (None, Some(p)) => ("--api-key-file", p, "x-api-key", ""),
            (None, None) => return Ok(Credentials(None)),
        };
        let secret = read_secret(flag, path)?;
        if secret.is_empty() {
            return Err(file_err(flag, path, "is empty"));
        }
        let value = AsciiMetadataValue::try_from(format!("{prefix}{secret}"))
            .map_err(|_| file_err(flag, path, "holds characters a header cannot carry"))?;
        Ok(Credentials(Some((MetadataKey::from_static(key), value))))
    }

    /// The endpoint for `address` (`http://host:port`; with TLS configured it is spoken to as
    /// `https://`), with the CA, client identity and domain applied.
    pub fn endpoint(&self, address: &str) -> Result<Endpoint, ClientError> {
        let address = match (&self.ca_file, address.strip_prefix("http://")) {
            (Some(_), Some(rest)) => format!("https://{rest}"),
            _ => address.to_string(),
        };
        if address.starts_with("https://") && self.ca_file.is_none() {
            return Err(ClientError::Endpoint(format!(
                "{address}: TLS needs the CA that signed the server's certificate: give --ca (or BRATS_CA)"
            )));
        }
        let endpoint = Endpoint::from_shared(address.clone())
            .map_err(|e| ClientError::Endpoint(format!("{address}: not an address: {e}")))?;
        let Some(ca) = &self.ca_file else { return Ok(endpoint) };
        let pem = std::fs::read(ca).map_err(|e| file_err("--ca", ca, e.to_string()))?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
        if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
            let cert_pem = std::fs::read(cert).map_err(|e| file_err("--cert", cert, e.to_string()))?;
            let key_pem = read_secret("--key", key)?;
            tls = tls.identity(Identity::from_pem(cert_pem, key_pem));
        }
        if let Some(domain) = &self.domain {
            tls = tls.domain_name(domain.clone());
        }
        endpoint.tls_config(tls).map_err(|e| ClientError::Endpoint(format!("{address}: TLS settings: {e}")))
    }

    /// Connects to `address` now.
    pub async fn connect(&self, address: &str) -> Result<AuthChannel, ClientError> {
        let credentials = self.credentials()?;
        let channel = self
            .endpoint(address)?
            .connect()
            .await
            .map_err(|e| ClientError::Endpoint(format!("connect {address}: {}", causes(&e))))?;
        Ok(InterceptedService::new(channel, credentials))
    }

    /// A channel to `address` that connects on first use (for services that start before
    /// their peers).
    pub fn connect_lazy(&self, address: &str) -> Result<AuthChannel, ClientError> {
        let credentials = self.credentials()?;
        Ok(InterceptedService::new(self.endpoint(address)?.connect_lazy(), credentials))
    }
}
