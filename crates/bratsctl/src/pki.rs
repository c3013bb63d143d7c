//! A private certificate authority and the files it issues, shared by `bratsctl demo` (its
//! throwaway security) and `bratsctl security init` (a starting set for the compose `tls`
//! variant): CA and service certificates made with rcgen, API keys stored only as hashes.

use std::path::Path;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// A CA that signs service certificates.
pub(crate) struct Pki {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub ca_pem: String,
}

/// A certificate and its private key, PEM.
pub(crate) struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    /// A new CA called `common_name` that signs end-entity certificates only.
    pub(crate) fn new(common_name: &str) -> anyhow::Result<Pki> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_pem = params.self_signed(&key)?.pem();
        Ok(Pki { issuer: Issuer::new(params, key), ca_pem })
    }

    /// A certificate for a service, valid as a server (its port) and as a client (its
    /// identity for mutual TLS to the other services): `common_name` plus the `sans` (DNS
    /// names; IP addresses become IP SANs).
    pub(crate) fn issue_service(&self, common_name: &str, sans: Vec<String>) -> anyhow::Result<Issued> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans)?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// Writes `text` to `path`: mode 0600 when `private` (the services refuse keys others can
/// read), else 0644.
pub(crate) fn write_file(path: &Path, text: &str, private: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))?;
    let mode = if private { 0o600 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The `[[keys]]` entry of an API keys file for `key`: only its hash.
pub(crate) fn api_key_entry(id: &str, key: &str, roles: &[&str], tenant: &str) -> String {
    let roles: Vec<String> = roles.iter().map(|r| format!("\"{r}\"")).collect();
    format!(
        "[[keys]]\nid = \"{id}\"\nsha256 = \"{}\"\nroles = [{}]\ntenant = \"{tenant}\"\n",
        brats_cli::api_key::hash_api_key(key),
        roles.join(", ")
    )
}
