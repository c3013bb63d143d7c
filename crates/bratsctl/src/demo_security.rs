//! The demo's throwaway security, set up as a hospital deployment would be: a private CA, a
//! certificate per service (its server certificate, and its client identity for mutual TLS
//! to the others), an API key for the operator (only its hash in the services' keys file),
//! one tenant confined to the demo folder, an audit log per service, and a configuration
//! file per service that turns it all on.

use std::path::{Path, PathBuf};

use brats_cli::ClientSecurity;
use brats_cli::api_key::new_api_key;

use crate::pki::{Pki, api_key_entry, write_file as write};

/// The services, by the name their configuration and certificate take.
pub(crate) const SERVICES: [&str; 3] = ["preprocess", "trainer", "inference"];

/// What [`set_up`] made.
pub(crate) struct DemoSecurity {
    /// `<dir>/security`.
    pub dir: PathBuf,
    /// How the operator (this process) connects: the CA and the API key.
    pub client: ClientSecurity,
    /// Each service's `--config` file, in [`SERVICES`] order.
    pub configs: [PathBuf; 3],
    /// Each service's audit log, in [`SERVICES`] order.
    pub audit_logs: [PathBuf; 3],
}

/// Makes the CA, certificates, API key and service configurations under `<dir>/security`;
/// every location the services may touch is under `dir`.
pub(crate) fn set_up(dir: &Path) -> anyhow::Result<DemoSecurity> {
    let sec = dir.join("security");
    std::fs::create_dir_all(&sec)?;
    let pki = Pki::new("brats demo CA (throwaway)")?;
    let ca_file = sec.join("ca.pem");
    write(&ca_file, &pki.ca_pem, false)?;

    let key = new_api_key("demo");
    let key_file = sec.join("demo.apikey");
    write(&key_file, &key, true)?;
    let keys_toml = sec.join("api-keys.toml");
    write(
        &keys_toml,
        &format!(
            "# Hashes only: the key itself is in demo.apikey.\n{}",
            api_key_entry("demo", &key, &["train", "segment", "viewer"], "demo")
        ),
        true,
    )?;

    let mut configs = Vec::new();
    let mut audit_logs = Vec::new();
    for service in SERVICES {
        let identity = format!("{service}.brats.internal");
        let issued = pki.issue_service(&identity, vec!["localhost".to_string(), identity.clone()])?;
        let (cert_file, key_file) = (sec.join(format!("{service}.pem")), sec.join(format!("{service}.key")));
        write(&cert_file, &issued.cert_pem, false)?;
        write(&key_file, &issued.key_pem, true)?;
        let audit = dir.join("audit").join(format!("{service}.jsonl"));
        std::fs::create_dir_all(dir.join("audit"))?;
        let config = sec.join(format!("{service}.toml"));
        write(
            &config,
            &format!(
                r#"# bratsctl demo: {service} behind TLS, mutual TLS between services, API keys, one tenant.
[server.tls]
cert_file = "{cert}"
key_file = "{key}"
client_ca_file = "{ca}"

[server.auth]
enabled = true
api_keys_file = "{keys}"

[server.auth.services."trainer.brats.internal"]
roles = ["service"]
tenant = "demo"

[server.auth.services."inference.brats.internal"]
roles = ["service"]
tenant = "demo"

[server.tenants.demo]
allowed_prefixes = ["file://{root}"]

[server.audit]
file = "{audit}"

[server.client]
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
domain = "localhost"
"#,
                cert = cert_file.display(),
                key = key_file.display(),
                ca = ca_file.display(),
                keys = keys_toml.display(),
                root = dir.display(),
                audit = audit.display(),
            ),
            false,
        )?;
        configs.push(config);
        audit_logs.push(audit);
    }
    let client = ClientSecurity {
        ca_file: Some(ca_file),
        domain: Some("localhost".into()),
        api_key_file: Some(key_file),
        ..ClientSecurity::default()
    };
    Ok(DemoSecurity {
        dir: sec,
        client,
        configs: configs.try_into().map_err(|_| anyhow::anyhow!("three configurations"))?,
        audit_logs: audit_logs.try_into().map_err(|_| anyhow::anyhow!("three audit logs"))?,
    })
}
