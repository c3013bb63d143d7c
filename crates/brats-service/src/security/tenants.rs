//! Where a caller may make a service read or write: every URI a request carries is
//! normalised and must lie under one of its tenant's allowed prefixes, so no caller can use a
//! service as a confused deputy (`output_uri = file:///root/x/`, `image_uris` naming
//! `/etc/shadow`, another tenant's bucket).
//!
//! `file://` locations are checked after resolving `..` and symlinks (of the part of the path
//! that exists), so neither a `..` nor a link planted inside an allowed folder escapes it.
//! `s3://` locations must be in the prefix's bucket, under its key prefix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use brats_core::StoreUri;
use serde::{Deserialize, Serialize};
use tonic::Status;

use super::{AuthMethod, Principal};

/// One `[server.tenants.<name>]` section.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantConfig {
    /// Locations the tenant's callers may name: `file:///data/neuro/`, `s3://neuro-bucket/in/`.
    pub allowed_prefixes: Vec<String>,
}

/// Why the tenant configuration is unusable.
#[derive(Debug, thiserror::Error)]
#[error("server.tenants.{tenant}.allowed_prefixes: '{prefix}': {message}")]
pub struct TenantConfigError {
    /// The tenant.
    pub tenant: String,
    /// The prefix.
    pub prefix: String,
    /// What is wrong.
    pub message: String,
}

#[derive(Debug, Clone)]
enum Prefix {
    File(PathBuf),
    S3 { bucket: String, key: String },
}

/// The allowed locations of every tenant, parsed once.
#[derive(Debug, Clone, Default)]
pub struct UriPolicy {
    tenants: BTreeMap<String, Vec<Prefix>>,
}

/// `path` with symlinks resolved as far as it exists, and the rest appended (a file a
/// request will create does not exist yet; its folder may).
fn resolve(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            return rest.iter().rev().fold(real, |p, part: &std::ffi::OsString| p.join(part));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => return path.to_path_buf(),
        }
    }
}

impl UriPolicy {
    /// Parses `[server.tenants]`; file prefixes are resolved now (they should exist).
    pub fn new(tenants: &BTreeMap<String, TenantConfig>) -> Result<Self, TenantConfigError> {
        let mut parsed = BTreeMap::new();
        for (tenant, config) in tenants {
            let mut prefixes = Vec::new();
            for prefix in &config.allowed_prefixes {
                let err =
                    |message: String| TenantConfigError { tenant: tenant.clone(), prefix: prefix.clone(), message };
                prefixes.push(match StoreUri::parse(prefix).map_err(|e| err(e.to_string()))? {
                    StoreUri::File(p) => Prefix::File(resolve(&p)),
                    StoreUri::S3 { bucket, key } => Prefix::S3 { bucket, key },
                });
            }
            parsed.insert(tenant.clone(), prefixes);
        }
        Ok(UriPolicy { tenants: parsed })
    }

    /// Whether any tenant is configured; without one every location is allowed (a
    /// development setup; the server warns at start-up).
    pub fn enforced(&self) -> bool {
        !self.tenants.is_empty()
    }

    /// Checks the URI in request field `field` for `principal`; PERMISSION_DENIED names the
    /// field and the fix, never the URI (paths carry patient names in real archives).
    /// Requests without a principal were not sent over the network (in-process calls) and
    /// are not checked; an admin may name any location.
    pub fn check(&self, principal: Option<&Principal>, field: &str, uri: &str) -> Result<(), Status> {
        let Some(principal) = principal else { return Ok(()) };
        if !self.enforced() || (principal.has_role(super::authz::ADMIN) && principal.method != AuthMethod::Anonymous) {
            return Ok(());
        }
        let denied = || {
            Status::permission_denied(format!(
                "{field}: outside the locations tenant '{}' may use; name a location under one of its allowed_prefixes",
                principal.tenant
            ))
        };
        let prefixes = self.tenants.get(&principal.tenant).ok_or_else(denied)?;
        let parsed = StoreUri::parse(uri).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))?;
        let inside = match &parsed {
            StoreUri::File(path) => {
                let real = resolve(path);
                prefixes.iter().any(|p| matches!(p, Prefix::File(root) if real.starts_with(root)))
            }
            StoreUri::S3 { bucket, key } => {
                !key.split('/').any(|part| part == "..")
                    && prefixes.iter().any(|p| match p {
                        Prefix::S3 { bucket: b, key: prefix } => {
                            b == bucket
                                && (prefix.is_empty()
                                    || key == prefix
                                    || key.strip_prefix(prefix.as_str()).is_some_and(|r| r.starts_with('/')))
                        }
                        Prefix::File(_) => false,
                    })
            }
        };
        if inside { Ok(()) } else { Err(denied()) }
    }

    /// [`Self::check`] for each `(field, uri)` of a request's optional URI fields; an empty
    /// URI is not set and not checked.
    pub fn check_fields(&self, principal: Option<&Principal>, fields: &[(&str, &str)]) -> Result<(), Status> {
        fields.iter().filter(|(_, uri)| !uri.is_empty()).try_for_each(|(field, uri)| self.check(principal, field, uri))
    }

    /// [`Self::check`] for every URI of a repeated field.
    pub fn check_all<'a>(
        &self,
        principal: Option<&Principal>,
        field: &str,
        uris: impl IntoIterator<Item = &'a String>,
    ) -> Result<(), Status> {
        uris.into_iter().try_for_each(|u| self.check(principal, field, u))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(tenant: &str) -> Principal {
        let mut p = Principal::anonymous(tenant, ["segment".to_string()]);
        p.method = AuthMethod::ApiKey;
        p
    }

    fn policy(root: &Path) -> UriPolicy {
        let tenants = [
            (
                "neuro".to_string(),
                TenantConfig {
                    allowed_prefixes: vec![format!("file://{}/neuro", root.display()), "s3://neuro-bucket/in".into()],
                },
            ),
            ("onco".to_string(), TenantConfig { allowed_prefixes: vec![format!("file://{}/onco", root.display())] }),
        ];
        UriPolicy::new(&tenants.into()).unwrap()
    }

    #[test]
    fn locations_outside_the_tenant_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("neuro/cases")).unwrap();
        std::fs::create_dir_all(root.join("onco")).unwrap();
        let p = policy(&root);
        let neuro = caller("neuro");
        let ok = |uri: &str| p.check(Some(&neuro), "image_uris", uri);
        assert!(ok(&format!("file://{}/neuro/cases/a.nii.gz", root.display())).is_ok());
        assert!(ok(&format!("file://{}/neuro/new/out/", root.display())).is_ok(), "a folder to be created");
        assert!(ok("s3://neuro-bucket/in/case1/t1c.nii.gz").is_ok());
        for bad in [
            "file:///etc/passwd".to_string(),
            format!("file://{}/neuro/../onco/x.nii.gz", root.display()),
            format!("file://{}/neuro-evil/x", root.display()),
            format!("file://{}/onco/x.nii.gz", root.display()),
            "s3://other-bucket/in/x".into(),
            "s3://neuro-bucket/input/x".into(),
            "s3://neuro-bucket/in/../secret".into(),
        ] {
            let e = ok(&bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{bad}");
            assert!(e.message().starts_with("image_uris: outside the locations tenant 'neuro'"), "{}", e.message());
            assert!(!e.message().contains(&bad), "the URI is echoed: {}", e.message());
        }
    }

    #[test]
    fn a_symlink_inside_the_tenant_does_not_escape_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("neuro")).unwrap();
        std::fs::create_dir_all(root.join("onco/secret")).unwrap();
        std::os::unix::fs::symlink(root.join("onco"), root.join("neuro/link")).unwrap();
        let p = policy(&root);
        let e = p.check(Some(&caller("neuro")), "output_uri", &format!("file://{}/neuro/link/secret/", root.display()));
        assert_eq!(e.unwrap_err().code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn unknown_tenants_admins_and_in_process_calls() {
        let dir = tempfile::tempdir().unwrap();
        let p = policy(dir.path());
        assert!(p.check(Some(&caller("nobody")), "output_uri", "s3://neuro-bucket/in/x").is_err());
        let mut admin = caller("nobody");
        admin.roles.insert("admin".into());
        assert!(p.check(Some(&admin), "output_uri", "file:///anywhere").is_ok());
        assert!(p.check(None, "output_uri", "file:///anywhere").is_ok());
        assert!(UriPolicy::default().check(Some(&caller("x")), "output_uri", "file:///anywhere").is_ok());
    }

    #[test]
    fn check_fields_skips_unset_fields_and_names_the_first_outside() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("neuro")).unwrap();
        let p = policy(&root);
        let inside = format!("file://{}/neuro/x.nii.gz", root.display());
        let neuro = caller("neuro");
        assert!(p.check_fields(Some(&neuro), &[("label_uri", ""), ("output_uri", &inside)]).is_ok());
        let e = p
            .check_fields(Some(&neuro), &[("label_uri", &inside), ("output_uri", "file:///etc/"), ("base_uri", "")])
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().starts_with("output_uri: outside"), "{}", e.message());
    }
}
