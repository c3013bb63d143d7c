//! A preprocessing service secured as a hospital would run it, for the security tests: a test
//! CA and server certificate, API keys of several roles and tenants in a hashed keys file, an
//! audit file, and clients that connect with each credential.

use super::pki::{Ca, CertFiles, write_with_mode};
use super::*;
use brats_cli::ClientSecurity;
use brats_preprocessor::config::ServiceConfig;
use brats_proto::v1 as pb;
use brats_proto::v1::preprocessor_client::PreprocessorClient;
use brats_service::security::audit::AuditConfig;
use brats_service::security::auth::{AuthConfig, ServiceIdentity, hash_api_key, new_api_key};
use brats_service::security::tls::{ClientAuth, TlsConfig};
use std::path::{Path, PathBuf};
use std::process::Command;
use tonic::Code;

/// The SAN the inference service's client certificate carries, allowed as a service identity.
pub(crate) const SERVICE_SAN: &str = "inference.brats.internal";

pub(crate) struct Setup {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
    pub ca_file: PathBuf,
    pub server: CertFiles,
    pub audit: PathBuf,
    /// API keys by name: `segment`, `preprocess`, `revoked`, `expired`.
    pub keys: std::collections::BTreeMap<&'static str, PathBuf>,
}

/// One `[[keys]]` entry of the API keys file: only the key's hash is stored.
pub(crate) fn key_entry(id: &str, key: &str, roles: &[&str], tenant: &str, extra: &str) -> String {
    let roles: Vec<String> = roles.iter().map(|r| format!("\"{r}\"")).collect();
    format!(
        "[[keys]]\nid = \"{id}\"\nsha256 = \"{}\"\nroles = [{}]\ntenant = \"{tenant}\"\n{extra}\n",
        hash_api_key(key),
        roles.join(", ")
    )
}

pub(crate) fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("brats test CA");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let server = ca.issue(dir.path(), "server", &["localhost"], false);
    let mut keys = std::collections::BTreeMap::new();
    let mut file = String::new();
    for (name, roles, tenant, extra) in [
        ("segment", &["segment"][..], "default", ""),
        ("preprocess", &["preprocess"][..], "default", ""),
        ("revoked", &["preprocess"][..], "default", "revoked = true"),
        ("expired", &["preprocess"][..], "default", "expires = \"2021-01-01T00:00:00Z\""),
        ("train", &["train"][..], "default", ""),
        ("viewer", &["viewer"][..], "default", ""),
        ("onco-train", &["train", "preprocess"][..], "onco", ""),
    ] {
        let key = new_api_key(name);
        file.push_str(&key_entry(name, &key, roles, tenant, extra));
        let path = dir.path().join(format!("{name}.apikey"));
        write_with_mode(&path, &key, 0o600);
        keys.insert(name, path);
    }
    write_with_mode(&dir.path().join("api-keys.toml"), &file, 0o600);
    let audit = dir.path().join("audit.jsonl");
    Setup { dir, ca, ca_file, server, audit, keys }
}

impl Setup {
    pub(crate) fn config(&self) -> ServiceConfig {
        let mut cfg = ServiceConfig { output_root: file_uri(&self.dir.path().join("out")), ..ServiceConfig::default() };
        cfg.server.tls = TlsConfig {
            cert_file: self.server.cert.display().to_string(),
            key_file: self.server.key.display().to_string(),
            client_ca_file: self.ca_file.display().to_string(),
            client_auth: ClientAuth::Optional,
            handshake_timeout_s: 2,
            reload_interval_s: 1,
            ..TlsConfig::default()
        };
        cfg.server.auth = AuthConfig {
            enabled: true,
            api_keys_file: self.dir.path().join("api-keys.toml").display().to_string(),
            services: [(
                SERVICE_SAN.to_string(),
                ServiceIdentity { roles: vec!["service".into()], tenant: "default".into() },
            )]
            .into(),
            ..AuthConfig::default()
        };
        cfg.server.audit = AuditConfig { file: self.audit.display().to_string(), ..AuditConfig::default() };
        cfg
    }

    /// A client trusting the test CA, verifying the server as `localhost`.
    pub(crate) fn client(&self) -> ClientSecurity {
        ClientSecurity {
            ca_file: Some(self.ca_file.clone()),
            domain: Some("localhost".into()),
            ..ClientSecurity::default()
        }
    }

    pub(crate) fn with_key(&self, name: &str) -> ClientSecurity {
        ClientSecurity { api_key_file: Some(self.keys[name].clone()), ..self.client() }
    }

    pub(crate) fn with_cert(&self, cert: &CertFiles) -> ClientSecurity {
        ClientSecurity { cert_file: Some(cert.cert.clone()), key_file: Some(cert.key.clone()), ..self.client() }
    }
}

/// The status code of an empty `PreprocessCase` (which the service itself refuses with
/// INVALID_ARGUMENT: reaching it means the call got past authentication and authorisation).
pub(crate) async fn preprocess_case(url: &str, security: &ClientSecurity) -> Code {
    let channel = match security.connect(url).await {
        Ok(c) => c,
        Err(_) => return Code::Unavailable,
    };
    match PreprocessorClient::new(channel).preprocess_case(pb::PreprocessCaseRequest::default()).await {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

pub(crate) async fn preprocess_dataset(url: &str, security: &ClientSecurity) -> Code {
    let channel = security.connect(url).await.unwrap();
    match PreprocessorClient::new(channel).preprocess_dataset(pb::PreprocessDatasetRequest::default()).await {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

pub(crate) fn bratsctl(args: &[&str]) -> (bool, String) {
    let o = Command::new(bratsctl_exe()).args(args).output().unwrap();
    (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

pub(crate) fn audit_records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}
