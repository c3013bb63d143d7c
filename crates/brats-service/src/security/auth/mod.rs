//! Request authentication: who is calling. One [`Authenticator`] per server turns a request's
//! credential headers and the TLS peer's certificate chain into a [`Principal`], or an
//! [`AuthError`] whose `Display` is safe to send back and whose [`AuthError::reason`] goes to the
//! audit log.
//!
//! Three kinds of credential, tried in this order:
//!
//! * `authorization: Bearer <jwt>`: a token from an OIDC identity provider, checked against its
//!   JWKS (asymmetric algorithms only, `kid` required; `exp`, `iss`, `aud`, `sub` required;
//!   `nbf` honoured), see [`JwtConfig`];
//! * `x-api-key: brats_<id>_<secret>`: a key from the hashed keys file (`api_keys_file`),
//!   see [`hash_api_key`] and [`new_api_key`];
//! * neither header: the client certificate rustls already verified against the client CA, when
//!   one of its DNS SANs is a key of [`AuthConfig::services`].
//!
//! A request that presents a credential which fails is refused: it never falls back to the
//! certificate or to anonymous access. Without any credential the caller is anonymous when
//! [`AuthConfig::anonymous`] allows it, else refused (`no_credentials`, or
//! `certificate_not_allowed` when it showed a certificate with no allowed SAN).
//!
//! With [`AuthConfig::enabled`] false (the default, for local development) every caller is an
//! anonymous `admin` in tenant `default`.
//!
//! ```toml
//! [server.auth]
//! enabled = true
//! anonymous = false
//! api_keys_file = "/etc/brats/api-keys.toml"   # mode 0600
//!
//! [server.auth.jwt]
//! jwks_uri = "https://idp.example.org/realms/brats/protocol/openid-connect/certs"
//! issuers = ["https://idp.example.org/realms/brats"]
//! audiences = ["brats"]
//! roles_claim = "realm_access.roles"
//! role_map = { brats-trainer = "train", brats-radiologist = "segment" }
//!
//! [server.auth.services."trainer.brats.internal"]
//! roles = ["service"]
//! tenant = "default"
//! ```
//!
//! Nothing here writes a token, key or secret to an error, a log line or `Debug` output.

mod api_keys;
mod jwt;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::time::Instant;

use rustls::pki_types::{CertificateDer, ServerName};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::codegen::http::HeaderMap;

use super::principal::{AuthMethod, Principal};

pub use api_keys::{hash_api_key, new_api_key};

/// The most bytes an `authorization` or `x-api-key` header value may have.
pub const MAX_CREDENTIAL_HEADER_BYTES: usize = 8 * 1024;

/// The `issuer` of every mutual-TLS [`Principal`].
const MTLS_ISSUER: &str = "internal-ca";

/// The tenant used where none is configured or claimed.
const DEFAULT_TENANT: &str = "default";

/// How requests authenticate: the `[server.auth]` TOML section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Whether authentication is required. `false` (the default, for local development): every
    /// caller is an anonymous `admin` in tenant `default`, whatever it sends.
    pub enabled: bool,
    /// With `enabled`: callers that present no credential get `anonymous_roles` in
    /// `anonymous_tenant` instead of being refused.
    pub anonymous: bool,
    /// The roles of anonymous callers (with `anonymous`).
    pub anonymous_roles: Vec<String>,
    /// The tenant of anonymous callers (with `anonymous`); empty means `default`.
    pub anonymous_tenant: String,
    /// The TOML file of hashed API keys (mode 0600 or stricter); empty: no API keys.
    pub api_keys_file: String,
    /// Bearer JWTs from an OIDC identity provider; absent: no JWTs.
    pub jwt: Option<JwtConfig>,
    /// Mutual-TLS service identities: a client certificate's DNS SAN (exact, no wildcards) to
    /// the roles and tenant it gets.
    pub services: BTreeMap<String, ServiceIdentity>,
}

/// Bearer JWTs: where the signing keys are and which tokens to accept (`[server.auth.jwt]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// The identity provider's JWKS: `file:///abs/path.json`, `https://…`, or `http://` to a
    /// loopback address (`127.0.0.1`, `[::1]`, `localhost`) only.
    pub jwks_uri: String,
    /// The accepted `iss` values (at least one).
    pub issuers: Vec<String>,
    /// The accepted `aud` values (at least one); a token must name one of them.
    pub audiences: Vec<String>,
    /// The accepted signature algorithms (default `RS256`, `PS256`, `ES256`, `EdDSA`).
    /// Asymmetric ones only: `HS*` and `none` are refused when the configuration loads.
    pub algorithms: Vec<String>,
    /// Where the roles are in the claims: a claim name or a dotted path
    /// (`realm_access.roles`); an array of strings or a space-separated string (`scope`).
    pub roles_claim: String,
    /// The identity provider's role names to ours; unmapped roles pass through unchanged.
    pub role_map: BTreeMap<String, String>,
    /// The claim (name or dotted path) holding the tenant; a token without it is in `default`.
    pub tenant_claim: String,
    /// Clock skew allowed on `exp` and `nbf`, in seconds (default 30, at most 60).
    pub leeway_s: u64,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            jwks_uri: String::new(),
            issuers: Vec::new(),
            audiences: Vec::new(),
            algorithms: ["RS256", "PS256", "ES256", "EdDSA"].map(String::from).to_vec(),
            roles_claim: "roles".into(),
            role_map: BTreeMap::new(),
            tenant_claim: "tenant".into(),
            leeway_s: 30,
        }
    }
}

/// What a mutual-TLS service identity (a client certificate SAN) may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceIdentity {
    /// Its roles.
    pub roles: Vec<String>,
    /// Its tenant (default `default`).
    #[serde(default = "default_tenant")]
    pub tenant: String,
}

fn default_tenant() -> String {
    DEFAULT_TENANT.into()
}

/// Why an [`AuthConfig`] cannot be used; the message names the setting or file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// A setting is invalid.
    #[error("[server.auth] {0}")]
    Config(String),
    /// The API keys file cannot be used.
    #[error("API keys file {path}: {message}")]
    KeysFile {
        /// The file.
        path: String,
        /// What is wrong with it and how to fix it.
        message: String,
    },
}

/// Why a request was not authenticated. `Display` is the message safe to send to the caller (it
/// never holds the token or key); [`AuthError::reason`] is the short reason for the audit log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No credential, and anonymous access is off.
    #[error("authentication required: send `authorization: Bearer <token>` or `x-api-key`")]
    NoCredentials,
    /// Only a client certificate, whose SANs are not an allowed service identity.
    #[error("the client certificate is not an allowed service identity")]
    CertificateNotAllowed,
    /// Both `authorization` and `x-api-key`, or one of them more than once.
    #[error("send exactly one credential: one `authorization` or one `x-api-key` header")]
    DuplicateCredentials,
    /// A credential header longer than [`MAX_CREDENTIAL_HEADER_BYTES`].
    #[error("credential header larger than 8 KiB")]
    HeaderTooLarge,
    /// A credential that cannot be parsed; the text says which part.
    #[error("malformed credential: {0}")]
    Malformed(&'static str),
    /// A credential kind this server does not accept (`JWT` or `API key`).
    #[error("{0} authentication is not enabled on this server")]
    MethodNotEnabled(&'static str),
    /// The token's `alg` is not in the allow-list, or differs from its key's `alg` or type.
    #[error("token signature algorithm not allowed")]
    AlgorithmNotAllowed,
    /// The token header lists critical parameters (`crit`) this server does not understand.
    #[error("token has unsupported critical header parameters")]
    UnsupportedCrit,
    /// The token's `kid` is not in the identity provider's key set.
    #[error("token signing key is unknown")]
    UnknownKid,
    /// The token's signature does not verify.
    #[error("token signature is invalid")]
    BadSignature,
    /// The token's `exp` has passed.
    #[error("token has expired")]
    Expired,
    /// The token's `nbf` is in the future.
    #[error("token is not valid yet")]
    NotYetValid,
    /// The token's `iss` is not accepted.
    #[error("token issuer is not accepted")]
    WrongIssuer,
    /// The token's `aud` names no accepted audience.
    #[error("token audience is not accepted")]
    WrongAudience,
    /// The token lacks a required claim (`exp`, `iss`, `aud` or `sub`).
    #[error("token lacks the required claim `{0}`")]
    MissingClaim(&'static str),
    /// The identity provider's keys could not be fetched, and no usable set is cached.
    #[error("token signing keys are unavailable; try again later")]
    JwksUnavailable,
    /// The API key is unknown, its secret is wrong, or it was revoked.
    #[error("API key is revoked or unknown")]
    RevokedOrUnknownKey,
    /// The API key is past its `expires`.
    #[error("API key has expired")]
    KeyExpired,
}

impl AuthError {
    /// The short machine reason for the audit log (`no_credentials`, `expired`, …).
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::NoCredentials => "no_credentials",
            AuthError::CertificateNotAllowed => "certificate_not_allowed",
            AuthError::DuplicateCredentials => "duplicate_credentials",
            AuthError::HeaderTooLarge => "header_too_large",
            AuthError::Malformed(_) => "malformed",
            AuthError::MethodNotEnabled(_) => "method_not_enabled",
            AuthError::AlgorithmNotAllowed => "algorithm_not_allowed",
            AuthError::UnsupportedCrit => "unsupported_crit",
            AuthError::UnknownKid => "unknown_kid",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::WrongIssuer => "wrong_issuer",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::MissingClaim(_) => "missing_claim",
            AuthError::JwksUnavailable => "jwks_unavailable",
            AuthError::RevokedOrUnknownKey => "revoked_or_unknown_key",
            AuthError::KeyExpired => "key_expired",
        }
    }

    /// Whether the failure is on the server's side and a retry may succeed
    /// (`jwks_unavailable`): the layer may answer `UNAVAILABLE` rather than `UNAUTHENTICATED`.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, AuthError::JwksUnavailable)
    }
}

/// Authenticates requests as [`AuthConfig`] says. `Send + Sync`; share it in an `Arc`. It keeps
/// the identity provider's keys (fetched on first use, then cached) and the API keys (reloaded
/// when the file changes).
pub struct Authenticator {
    enabled: bool,
    anonymous: Option<Principal>,
    jwt: Option<jwt::JwtVerifier>,
    api_keys: Option<api_keys::ApiKeyStore>,
    /// Lower-case SAN to identity.
    services: HashMap<String, ServiceIdentity>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("enabled", &self.enabled)
            .field("anonymous", &self.anonymous)
            .field("jwt", &self.jwt)
            .field("api_keys", &self.api_keys)
            .field("services", &self.services.keys().collect::<BTreeSet<_>>())
            .finish()
    }
}

impl Authenticator {
    /// Checks `config` and, when authentication is enabled, loads the API keys file now (an
    /// error names the file and the fix). Does no network I/O: the JWKS is fetched on first use.
    pub fn new(config: &AuthConfig) -> Result<Authenticator, AuthSetupError> {
        let jwt = config.jwt.as_ref().map(jwt::JwtVerifier::new).transpose()?;
        let mut services = HashMap::new();
        for (san, identity) in &config.services {
            let name = san.to_ascii_lowercase();
            if name.starts_with("*.") || !matches!(ServerName::try_from(name.as_str()), Ok(ServerName::DnsName(_))) {
                return Err(AuthSetupError::Config(format!(
                    "services: `{san}` is not a DNS name (no wildcards, no IP addresses)"
                )));
            }
            if identity.tenant.is_empty() {
                return Err(AuthSetupError::Config(format!("services.\"{san}\".tenant is empty")));
            }
            if services.insert(name, identity.clone()).is_some() {
                return Err(AuthSetupError::Config(format!(
                    "services: `{san}` is listed twice (names are case-insensitive)"
                )));
            }
        }
        let anonymous = config.anonymous.then(|| {
            let tenant =
                if config.anonymous_tenant.is_empty() { DEFAULT_TENANT } else { config.anonymous_tenant.as_str() };
            Principal::anonymous(tenant, config.anonymous_roles.iter().cloned())
        });
        if !config.enabled {
            return Ok(Authenticator {
                enabled: false,
                anonymous: None,
                jwt: None,
                api_keys: None,
                services: HashMap::new(),
            });
        }
        let api_keys = if config.api_keys_file.is_empty() {
            None
        } else {
            Some(api_keys::ApiKeyStore::load(&config.api_keys_file, Instant::now())?)
        };
        if jwt.is_none() && api_keys.is_none() && services.is_empty() && anonymous.is_none() {
            return Err(AuthSetupError::Config(
                "enabled = true but no way to authenticate: set `jwt`, `api_keys_file`, \
                 `services` or `anonymous = true` (or `enabled = false` for local development)"
                    .into(),
            ));
        }
        Ok(Authenticator { enabled: true, anonymous, jwt, api_keys, services })
    }

    /// Who sent a request with these headers over a connection whose verified client
    /// certificate chain (end entity first) is `peer_certs`.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        peer_certs: Option<&[CertificateDer<'static>]>,
    ) -> Result<Principal, AuthError> {
        self.authenticate_at(headers, peer_certs, Instant::now()).await
    }

    /// [`Authenticator::authenticate`] with the cache clock given (tests move it forward).
    async fn authenticate_at(
        &self,
        headers: &HeaderMap,
        peer_certs: Option<&[CertificateDer<'static>]>,
        now: Instant,
    ) -> Result<Principal, AuthError> {
        if !self.enabled {
            return Ok(Principal::anonymous(DEFAULT_TENANT, ["admin".to_string()]));
        }
        match credentials(headers)? {
            Credential::Bearer(token) => match &self.jwt {
                Some(verifier) => verifier.verify(token, now).await,
                None => Err(AuthError::MethodNotEnabled("JWT")),
            },
            Credential::ApiKey(key) => match &self.api_keys {
                Some(store) => store.verify(key, now),
                None => Err(AuthError::MethodNotEnabled("API key")),
            },
            Credential::None => {
                let leaf = peer_certs.and_then(|certs| certs.first());
                if let Some(leaf) = leaf
                    && let Some(principal) = self.service_identity(leaf)
                {
                    return Ok(principal);
                }
                if let Some(anonymous) = &self.anonymous {
                    return Ok(anonymous.clone());
                }
                Err(if leaf.is_some() { AuthError::CertificateNotAllowed } else { AuthError::NoCredentials })
            }
        }
    }

    /// The service identity of a verified client certificate: its first DNS SAN (in certificate
    /// order, wildcards skipped) that is configured.
    fn service_identity(&self, leaf: &CertificateDer<'static>) -> Option<Principal> {
        if self.services.is_empty() {
            return None;
        }
        let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
        for presented in cert.valid_dns_names() {
            if presented.starts_with('*') {
                continue;
            }
            let name = presented.to_ascii_lowercase();
            let Some(identity) = self.services.get(&name) else { continue };
            // Belt and braces: the name check webpki itself does.
            let Ok(server_name) = ServerName::try_from(name.as_str()) else { continue };
            if cert.verify_is_valid_for_subject_name(&server_name).is_err() {
                continue;
            }
            return Some(Principal {
                subject: name,
                issuer: MTLS_ISSUER.into(),
                method: AuthMethod::MutualTls,
                key_id: hex::encode(Sha256::digest(leaf.as_ref())),
                tenant: identity.tenant.clone(),
                roles: identity.roles.iter().cloned().collect(),
            });
        }
        None
    }
}

/// The one credential a request presents.
enum Credential<'a> {
    Bearer(&'a str),
    ApiKey(&'a str),
    None,
}

/// Reads `authorization` / `x-api-key`: each at most once, not both, at most 8 KiB.
fn credentials(headers: &HeaderMap) -> Result<Credential<'_>, AuthError> {
    let authorization: Vec<_> = headers.get_all("authorization").iter().collect();
    let api_key: Vec<_> = headers.get_all("x-api-key").iter().collect();
    if authorization.iter().chain(&api_key).any(|v| v.len() > MAX_CREDENTIAL_HEADER_BYTES) {
        return Err(AuthError::HeaderTooLarge);
    }
    match (authorization.as_slice(), api_key.as_slice()) {
        ([], []) => Ok(Credential::None),
        ([value], []) => {
            let value = value.to_str().map_err(|_| AuthError::Malformed("authorization is not visible ASCII"))?;
            let (scheme, token) =
                value.split_once(' ').ok_or(AuthError::Malformed("authorization must be `Bearer <token>`"))?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(AuthError::Malformed("authorization must be `Bearer <token>`"));
            }
            let token = token.trim_matches(' ');
            if token.is_empty() {
                return Err(AuthError::Malformed("empty bearer token"));
            }
            Ok(Credential::Bearer(token))
        }
        ([], [value]) => {
            let value = value.to_str().map_err(|_| AuthError::Malformed("x-api-key is not visible ASCII"))?;
            Ok(Credential::ApiKey(value.trim_matches(' ')))
        }
        _ => Err(AuthError::DuplicateCredentials),
    }
}

#[cfg(test)]
mod tests;
