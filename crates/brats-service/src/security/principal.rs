//! Who is calling: the identity every authenticated request carries to its handler and to the
//! audit log.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// How a caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    /// No credentials; allowed only where the configuration enables anonymous access.
    Anonymous,
    /// An API key from the keys file (`brats_<id>_<secret>`).
    ApiKey,
    /// A bearer JWT from the configured OIDC issuer(s).
    Jwt,
    /// A client certificate from the internal CA with an allowed SAN (service to service).
    MutualTls,
}

/// An authenticated caller. Holds no secret: it is logged and audited as it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// Subject: the JWT `sub`, the API key's id, or the certificate SAN matched.
    pub subject: String,
    /// Issuer: the JWT `iss`; `api-keys` for API keys; the client CA's subject for mTLS.
    pub issuer: String,
    /// How it authenticated.
    pub method: AuthMethod,
    /// The key that proved it: JWT `kid`, API key id, or the client certificate's SHA-256.
    pub key_id: String,
    /// The tenant whose objects it may touch.
    pub tenant: String,
    /// Its roles after the configured role mapping (`segment`, `train`, `viewer`, `admin`,
    /// `service`).
    pub roles: BTreeSet<String>,
}

impl Principal {
    /// The caller nobody vouched for (anonymous access), in `tenant` with `roles`.
    pub fn anonymous(tenant: &str, roles: impl IntoIterator<Item = String>) -> Self {
        Principal {
            subject: "anonymous".into(),
            issuer: String::new(),
            method: AuthMethod::Anonymous,
            key_id: String::new(),
            tenant: tenant.into(),
            roles: roles.into_iter().collect(),
        }
    }

    /// Whether it holds `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.contains(role)
    }
}
