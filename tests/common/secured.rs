//! The security every harness service runs with, as a hospital would run it: a test CA, one
//! server certificate and a client certificate per service (mutual TLS between services), API
//! keys of several roles and tenants in a hashed keys file, and an audit file per service.
//! [`Setup::secure`] turns it on in any service's `[server]` section; the harness's clients
//! connect as the admin ([`Setup::admin`]), the security tests with each credential.

use super::pki::{Ca, CertFiles, write_with_mode};
use super::*;
use brats_cli::ClientSecurity;
use brats_preprocessor::config::ServiceConfig;
use brats_proto::v1 as pb;
use brats_proto::v1::preprocessor_client::PreprocessorClient;
use brats_service::ServerConfig;
use brats_service::security::audit::AuditConfig;
use brats_service::security::auth::{AuthConfig, ServiceIdentity, hash_api_key, new_api_key};
use brats_service::security::tls::{ClientAuth, TlsConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tonic::Code;

/// The SAN the inference service's client certificate carries (`ServiceKind::Inference.san()`),
/// allowed as a service identity.
pub(crate) const SERVICE_SAN: &str = "inference.brats.internal";

/// The three services, each with its own client identity (for calls to the others) and audit
/// file under one [`Setup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ServiceKind {
    Preprocess,
    Inference,
    Trainer,
}

impl ServiceKind {
    const ALL: [ServiceKind; 3] = [ServiceKind::Preprocess, ServiceKind::Inference, ServiceKind::Trainer];

    /// `preprocess`, `inference`, `trainer`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            ServiceKind::Preprocess => "preprocess",
            ServiceKind::Inference => "inference",
            ServiceKind::Trainer => "trainer",
        }
    }

    /// The SAN of its client certificate, `<name>.brats.internal` (as deploy/security.toml).
    pub(crate) fn san(self) -> String {
        format!("{}.brats.internal", self.name())
    }
}

/// A test's security material, in its own temporary folder.
pub(crate) struct Setup {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
    pub ca_file: PathBuf,
    /// The server certificate every service presents (SAN `localhost`).
    pub server: CertFiles,
    /// The preprocessing service's audit file (`audit_log(ServiceKind::Preprocess)`), the one
    /// the security tests read.
    pub audit: PathBuf,
    /// API keys by name: `admin`, `segment`, `preprocess`, `revoked`, `expired`, `train`,
    /// `viewer`, `onco-train`.
    pub keys: BTreeMap<&'static str, PathBuf>,
    /// Each service's client certificate (SAN [`ServiceKind::san`]), by service name.
    identities: BTreeMap<&'static str, CertFiles>,
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

/// A fresh CA, certificates, keys file and audit locations (milliseconds: EC keys).
pub(crate) fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("brats test CA");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let server = ca.issue(dir.path(), "server", &["localhost"], false);
    let identities = ServiceKind::ALL
        .into_iter()
        .map(|service| {
            let stem = format!("{}-identity", service.name());
            (service.name(), ca.issue(dir.path(), &stem, &[service.san().as_str()], false))
        })
        .collect();
    let mut keys = BTreeMap::new();
    let mut file = String::new();
    for (name, roles, tenant, extra) in [
        ("admin", &["admin"][..], "default", ""),
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
    let audit = audit_log_in(dir.path(), ServiceKind::Preprocess);
    Setup { dir, ca, ca_file, server, audit, keys, identities }
}

/// Where `service` writes its audit records under a setup's folder.
fn audit_log_in(dir: &Path, service: ServiceKind) -> PathBuf {
    dir.join(format!("{}-audit.jsonl", service.name()))
}

impl Setup {
    /// Secures `service`'s `[server]` section, the one way every harness service is secured:
    /// TLS with the test CA's server certificate (client certificates optional, verified
    /// against the CA), authentication by the hashed API keys and by the other services' client
    /// certificates, its own audit file, and `[server.client]` (the CA and its own client
    /// certificate) for its calls to the others. Listen addresses and the rest stay as given.
    pub(crate) fn secure(&self, server: &mut ServerConfig, service: ServiceKind) {
        server.tls = TlsConfig {
            cert_file: self.server.cert.display().to_string(),
            key_file: self.server.key.display().to_string(),
            client_ca_file: self.ca_file.display().to_string(),
            client_auth: ClientAuth::Optional,
            handshake_timeout_s: 2,
            reload_interval_s: 1,
            ..TlsConfig::default()
        };
        let peers = [ServiceKind::Inference, ServiceKind::Trainer];
        server.auth = AuthConfig {
            enabled: true,
            api_keys_file: self.dir.path().join("api-keys.toml").display().to_string(),
            services: peers
                .into_iter()
                .map(|peer| (peer.san(), ServiceIdentity { roles: vec!["service".into()], tenant: "default".into() }))
                .collect(),
            ..AuthConfig::default()
        };
        server.audit = AuditConfig { file: self.audit_log(service).display().to_string(), ..AuditConfig::default() };
        let identity = &self.identities[service.name()];
        server.client = ClientSecurity {
            cert_file: Some(identity.cert.clone()),
            key_file: Some(identity.key.clone()),
            ..self.client()
        };
    }

    /// `service`'s audit file.
    pub(crate) fn audit_log(&self, service: ServiceKind) -> PathBuf {
        audit_log_in(self.dir.path(), service)
    }

    /// A preprocessing service configuration secured by [`Setup::secure`], its output in
    /// this setup's folder.
    pub(crate) fn config(&self) -> ServiceConfig {
        let mut cfg = ServiceConfig { output_root: file_uri(&self.dir.path().join("out")), ..ServiceConfig::default() };
        self.secure(&mut cfg.server, ServiceKind::Preprocess);
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

    /// How the harness's clients connect: the test CA and the `admin` API key.
    pub(crate) fn admin(&self) -> ClientSecurity {
        self.with_key("admin")
    }

    pub(crate) fn with_cert(&self, cert: &CertFiles) -> ClientSecurity {
        ClientSecurity { cert_file: Some(cert.cert.clone()), key_file: Some(cert.key.clone()), ..self.client() }
    }
}

/// `security` as `bratsctl`'s global flags (`--ca`, `--tls-domain`, `--api-key-file`, …).
pub(crate) fn bratsctl_flags(security: &ClientSecurity) -> Vec<std::ffi::OsString> {
    let mut flags = Vec::new();
    let mut flag = |name: &str, value: Option<std::ffi::OsString>| {
        if let Some(value) = value {
            flags.extend([name.into(), value]);
        }
    };
    flag("--ca", security.ca_file.clone().map(Into::into));
    flag("--cert", security.cert_file.clone().map(Into::into));
    flag("--key", security.key_file.clone().map(Into::into));
    flag("--tls-domain", security.domain.clone().map(Into::into));
    flag("--token-file", security.token_file.clone().map(Into::into));
    flag("--api-key-file", security.api_key_file.clone().map(Into::into));
    flags
}

/// Asserts that the audit file at `path` exists and its hash chain verifies (what `bratsctl
/// audit verify` checks): every harness service's log is checked when it stops.
pub(crate) fn assert_audit_chain_verifies(path: &Path) {
    if let Err(e) = brats_cli::audit_chain::verify_file(path) {
        panic!("the audit log {} does not verify: {e}", path.display());
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
