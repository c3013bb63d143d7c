//! Bearer JWTs: the header checks done before any key is looked up, the identity provider's key
//! set (JWKS) cache, and the claims to [`Principal`] mapping.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::{Map, Value};
use tracing::{info, warn};

use super::{AuthError, AuthSetupError, DEFAULT_TENANT, JwtConfig};
use crate::security::principal::{AuthMethod, Principal};

/// How long a fetched key set is used before it is fetched again (files, and http responses
/// without `Cache-Control: max-age`); also the least an http `max-age` may ask for.
const DEFAULT_TTL: Duration = Duration::from_secs(5 * 60);
/// The most an http `max-age` may ask for.
const MAX_TTL: Duration = Duration::from_secs(60 * 60);
/// At most one fetch per this interval, whatever triggers it (unknown `kid`, expiry, failure).
const MIN_REFETCH: Duration = Duration::from_secs(30);
/// How long the last good set is still served while the identity provider is unreachable.
const MAX_STALE: Duration = Duration::from_secs(24 * 60 * 60);
/// The http fetch's time limit, connection to last byte.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest JWKS accepted.
const MAX_JWKS_BYTES: usize = 64 * 1024;
/// The most leeway the configuration may ask for.
const MAX_LEEWAY_S: u64 = 60;

/// Checks bearer tokens against one identity provider's configuration.
pub(super) struct JwtVerifier {
    allowed: Vec<Algorithm>,
    /// The claim checks; `algorithms` is set per token to its (allowed) `alg`.
    validation: Validation,
    roles_claim: String,
    role_map: BTreeMap<String, String>,
    tenant_claim: String,
    keys: JwksCache,
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("allowed", &self.allowed)
            .field("issuers", &self.validation.iss)
            .field("audiences", &self.validation.aud)
            .field("leeway_s", &self.validation.leeway)
            .field("roles_claim", &self.roles_claim)
            .field("tenant_claim", &self.tenant_claim)
            .field("jwks", &self.keys.source)
            .finish_non_exhaustive()
    }
}

fn config_error(message: impl Into<String>) -> AuthSetupError {
    AuthSetupError::Config(format!("jwt.{}", message.into()))
}

impl JwtVerifier {
    /// Checks the configuration; fetches nothing.
    pub(super) fn new(config: &JwtConfig) -> Result<Self, AuthSetupError> {
        if config.algorithms.is_empty() {
            return Err(config_error("algorithms is empty: list e.g. [\"RS256\", \"ES256\"]"));
        }
        let mut allowed = Vec::new();
        for name in &config.algorithms {
            let alg = Algorithm::from_str(name).map_err(|_| {
                config_error(format!(
                    "algorithms: `{name}` is not an algorithm this server verifies \
                     (RS256/384/512, PS256/384/512, ES256/384, EdDSA)"
                ))
            })?;
            if alg.family() == AlgorithmFamily::Hmac {
                return Err(config_error(format!(
                    "algorithms: `{name}` is a shared-secret algorithm; only asymmetric \
                     algorithms are accepted (RS*, PS*, ES*, EdDSA)"
                )));
            }
            if !allowed.contains(&alg) {
                allowed.push(alg);
            }
        }
        if config.issuers.is_empty() || config.issuers.iter().any(String::is_empty) {
            return Err(config_error("issuers must list the accepted `iss` values"));
        }
        if config.audiences.is_empty() || config.audiences.iter().any(String::is_empty) {
            return Err(config_error("audiences must list the accepted `aud` values"));
        }
        if config.leeway_s > MAX_LEEWAY_S {
            return Err(config_error(format!("leeway_s = {} is more than {MAX_LEEWAY_S}", config.leeway_s)));
        }
        if config.roles_claim.is_empty() || config.tenant_claim.is_empty() {
            return Err(config_error("roles_claim and tenant_claim must not be empty"));
        }
        if config.role_map.iter().any(|(from, to)| from.is_empty() || to.is_empty()) {
            return Err(config_error("role_map has an empty role name"));
        }
        let source = JwksSource::parse(&config.jwks_uri)?;

        let mut validation = Validation::new(allowed[0]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.leeway = config.leeway_s;
        validation.set_issuer(&config.issuers);
        validation.set_audience(&config.audiences);

        Ok(JwtVerifier {
            allowed,
            validation,
            roles_claim: config.roles_claim.clone(),
            role_map: config.role_map.clone(),
            tenant_claim: config.tenant_claim.clone(),
            keys: JwksCache::new(source),
        })
    }

    /// The principal a bearer token proves, or why it proves none.
    pub(super) async fn verify(&self, token: &str, now: Instant) -> Result<Principal, AuthError> {
        let (alg, kid) = parse_header(token, &self.allowed)?;
        let key = self.keys.key(&kid, now).await?;
        if key.alg.is_some_and(|key_alg| key_alg != KeyAlgorithm::from(alg)) || key.key.family() != alg.family() {
            return Err(AuthError::AlgorithmNotAllowed);
        }
        let mut validation = self.validation.clone();
        validation.algorithms = vec![alg];
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation)
            .map_err(|e| map_error(e.kind()))?
            .claims;

        let subject = match claims.get("sub") {
            Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
            _ => return Err(AuthError::MissingClaim("sub")),
        };
        let issuer = match claims.get("iss") {
            Some(Value::String(iss)) => iss.clone(),
            _ => return Err(AuthError::Malformed("the `iss` claim must be one string")),
        };
        let tenant = match claim(&claims, &self.tenant_claim) {
            None | Some(Value::Null) => DEFAULT_TENANT.to_string(),
            Some(Value::String(tenant)) if !tenant.is_empty() => tenant.clone(),
            Some(_) => return Err(AuthError::Malformed("the tenant claim must be a string")),
        };
        let roles = roles(claim(&claims, &self.roles_claim), &self.role_map);
        Ok(Principal { subject, issuer, method: AuthMethod::Jwt, key_id: kid, tenant, roles })
    }
}

/// Checks the token's shape and header before any key is looked up: three parts; `alg` in the
/// allow-list (so `none` and `HS*` never reach a verifier); no `crit`; a `kid`.
fn parse_header(token: &str, allowed: &[Algorithm]) -> Result<(Algorithm, String), AuthError> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed("a JWT has three dot-separated parts"));
    };
    let bytes =
        URL_SAFE_NO_PAD.decode(header).map_err(|_| AuthError::Malformed("the token header is not base64url"))?;
    let header: Map<String, Value> =
        serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed("the token header is not a JSON object"))?;
    let alg = match header.get("alg") {
        Some(Value::String(alg)) => alg,
        _ => return Err(AuthError::Malformed("the token header has no `alg`")),
    };
    let alg =
        Algorithm::from_str(alg).ok().filter(|alg| allowed.contains(alg)).ok_or(AuthError::AlgorithmNotAllowed)?;
    if header.contains_key("crit") {
        return Err(AuthError::UnsupportedCrit);
    }
    let kid = match header.get("kid") {
        Some(Value::String(kid)) if !kid.is_empty() => kid.clone(),
        _ => return Err(AuthError::Malformed("the token header has no `kid`")),
    };
    if payload.is_empty() || signature.is_empty() {
        return Err(AuthError::Malformed("a JWT part is empty"));
    }
    Ok((alg, kid))
}

/// The caller-safe error for a failed signature or claims check.
fn map_error(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::MissingRequiredClaim(name) => AuthError::MissingClaim(match name.as_str() {
            "exp" => "exp",
            "iss" => "iss",
            "aud" => "aud",
            "sub" => "sub",
            "nbf" => "nbf",
            _ => "unknown",
        }),
        ErrorKind::InvalidClaimFormat(_) => AuthError::Malformed("a token claim has the wrong type"),
        ErrorKind::InvalidAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::MissingAlgorithm => AuthError::AlgorithmNotAllowed,
        _ => AuthError::Malformed("the token cannot be decoded"),
    }
}

/// A claim by exact name, else by dotted path (`realm_access.roles`).
fn claim<'a>(claims: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(value) = claims.get(path) {
        return Some(value);
    }
    let mut segments = path.split('.');
    let mut value = claims.get(segments.next()?)?;
    for segment in segments {
        value = value.as_object()?.get(segment)?;
    }
    Some(value)
}

/// Roles from an array of strings or a space-separated string, through `role_map`.
fn roles(value: Option<&Value>, role_map: &BTreeMap<String, String>) -> BTreeSet<String> {
    let names: Vec<&str> = match value {
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        Some(Value::String(text)) => text.split_whitespace().collect(),
        _ => Vec::new(),
    };
    names
        .into_iter()
        .filter(|name| !name.is_empty())
        .map(|name| role_map.get(name).cloned().unwrap_or_else(|| name.to_string()))
        .collect()
}

/// Where the key set comes from.
enum JwksSource {
    File(PathBuf),
    Http { url: reqwest::Url, client: reqwest::Client },
}

impl fmt::Debug for JwksSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JwksSource::File(path) => write!(f, "file://{}", path.display()),
            JwksSource::Http { url, .. } => write!(f, "{url}"),
        }
    }
}

impl JwksSource {
    fn parse(uri: &str) -> Result<Self, AuthSetupError> {
        let fix = "use file:///absolute/path.json, https://…, or http:// to a loopback address";
        let url = reqwest::Url::parse(uri)
            .map_err(|e| config_error(format!("jwks_uri `{uri}` is not a URL ({e}): {fix}")))?;
        match url.scheme() {
            "file" => {
                let path = url
                    .to_file_path()
                    .map_err(|()| config_error(format!("jwks_uri `{uri}` is not a local absolute path: {fix}")))?;
                Ok(JwksSource::File(path))
            }
            "https" | "http" => {
                let loopback = url.host_str().is_some_and(|host| {
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
                });
                if url.scheme() == "http" && !loopback {
                    return Err(config_error(format!(
                        "jwks_uri `{uri}`: plain http is allowed to loopback only: {fix}"
                    )));
                }
                if !url.username().is_empty() || url.password().is_some() {
                    return Err(config_error(format!("jwks_uri must not hold credentials: {fix}")));
                }
                let client = reqwest::Client::builder()
                    .timeout(FETCH_TIMEOUT)
                    .connect_timeout(FETCH_TIMEOUT)
                    .redirect(reqwest::redirect::Policy::none())
                    .no_proxy()
                    .build()
                    .map_err(|e| config_error(format!("cannot build the JWKS http client: {e}")))?;
                Ok(JwksSource::Http { url, client })
            }
            other => Err(config_error(format!("jwks_uri scheme `{other}` is not supported: {fix}"))),
        }
    }

    /// The raw set and how long to keep it.
    async fn fetch(&self) -> Result<(Vec<u8>, Duration), String> {
        match self {
            JwksSource::File(path) => {
                let meta = tokio::fs::metadata(path).await.map_err(|e| e.to_string())?;
                if meta.len() > MAX_JWKS_BYTES as u64 {
                    return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
                }
                let body = tokio::fs::read(path).await.map_err(|e| e.to_string())?;
                if body.len() > MAX_JWKS_BYTES {
                    return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
                }
                Ok((body, DEFAULT_TTL))
            }
            JwksSource::Http { url, client } => {
                let request = async {
                    let mut response = client
                        .get(url.clone())
                        .header("accept", "application/json")
                        .send()
                        .await
                        .map_err(|e| format!("request failed: {e}"))?;
                    if !response.status().is_success() {
                        return Err(format!("answered {}", response.status()));
                    }
                    if response.content_length().is_some_and(|n| n > MAX_JWKS_BYTES as u64) {
                        return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
                    }
                    let ttl = response
                        .headers()
                        .get("cache-control")
                        .and_then(|v| v.to_str().ok())
                        .and_then(max_age)
                        .map_or(DEFAULT_TTL, |age| age.clamp(DEFAULT_TTL, MAX_TTL));
                    let mut body = Vec::new();
                    while let Some(chunk) = response.chunk().await.map_err(|e| format!("body failed: {e}"))? {
                        if body.len() + chunk.len() > MAX_JWKS_BYTES {
                            return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
                        }
                        body.extend_from_slice(&chunk);
                    }
                    Ok((body, ttl))
                };
                tokio::time::timeout(FETCH_TIMEOUT, request)
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer in {FETCH_TIMEOUT:?}")))
            }
        }
    }
}

/// `max-age` from a `Cache-Control` value.
fn max_age(cache_control: &str) -> Option<Duration> {
    cache_control.split(',').find_map(|directive| {
        let (name, value) = directive.trim().split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("max-age") {
            return None;
        }
        value.trim().trim_matches('"').parse::<u64>().ok().map(Duration::from_secs)
    })
}

/// One verification key from the set.
struct JwkKey {
    key: DecodingKey,
    /// The JWK's `alg`, when it names one: the token's must equal it.
    alg: Option<KeyAlgorithm>,
}

/// A fetched key set.
struct KeySet {
    keys: HashMap<String, Arc<JwkKey>>,
    fetched_at: Instant,
    ttl: Duration,
}

/// The usable signature keys in a JWKS document, by `kid`. Keys without `kid`, encryption
/// keys, symmetric (`oct`) keys and ones this library cannot read are skipped; the first of
/// duplicate `kid`s wins.
fn parse_jwks(body: &[u8]) -> Result<HashMap<String, Arc<JwkKey>>, String> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<Value>,
    }
    let document: Document = serde_json::from_slice(body).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut keys = HashMap::new();
    let mut skipped = 0usize;
    for value in document.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            skipped += 1;
            continue;
        };
        let usable = matches!(
            jwk.algorithm,
            AlgorithmParameters::RSA(_) | AlgorithmParameters::EllipticCurve(_) | AlgorithmParameters::OctetKeyPair(_)
        ) && !matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption));
        let (Some(kid), true) = (jwk.common.key_id.clone(), usable) else {
            skipped += 1;
            continue;
        };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            skipped += 1;
            continue;
        };
        keys.entry(kid).or_insert_with(|| Arc::new(JwkKey { key, alg: jwk.common.key_algorithm }));
    }
    if keys.is_empty() {
        return Err(format!("no usable signature key ({skipped} skipped)"));
    }
    Ok(keys)
}

/// The identity provider's keys: fetched on first use; fetched again when older than their TTL
/// or when a token names an unknown `kid`, but at most once per [`MIN_REFETCH`]; the last good
/// set serves for up to [`MAX_STALE`] while fetches fail.
pub(super) struct JwksCache {
    source: JwksSource,
    current: RwLock<Option<Arc<KeySet>>>,
    /// When the last fetch started; held across the fetch so only one runs.
    last_attempt: tokio::sync::Mutex<Option<Instant>>,
}

impl JwksCache {
    fn new(source: JwksSource) -> Self {
        JwksCache { source, current: RwLock::new(None), last_attempt: tokio::sync::Mutex::new(None) }
    }

    fn snapshot(&self) -> Option<Arc<KeySet>> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The key named `kid`.
    async fn key(&self, kid: &str, now: Instant) -> Result<Arc<JwkKey>, AuthError> {
        let snapshot = self.snapshot();
        if let Some(set) = &snapshot
            && now.saturating_duration_since(set.fetched_at) < set.ttl
            && let Some(key) = set.keys.get(kid)
        {
            return Ok(key.clone());
        }
        // No set, an expired one, or an unknown kid: fetch, if not done too recently.
        let Some(set) = self.refresh(now).await else {
            return Err(AuthError::JwksUnavailable);
        };
        if now.saturating_duration_since(set.fetched_at) > MAX_STALE {
            return Err(AuthError::JwksUnavailable);
        }
        set.keys.get(kid).cloned().ok_or(AuthError::UnknownKid)
    }

    /// Fetches the set unless a fetch started less than [`MIN_REFETCH`] ago; the newest set.
    async fn refresh(&self, now: Instant) -> Option<Arc<KeySet>> {
        let mut last_attempt = self.last_attempt.lock().await;
        if last_attempt.is_some_and(|last| now.saturating_duration_since(last) < MIN_REFETCH) {
            return self.snapshot();
        }
        *last_attempt = Some(now);
        let fetched = self.source.fetch().await.and_then(|(body, ttl)| Ok((parse_jwks(&body)?, ttl)));
        match fetched {
            Ok((keys, ttl)) => {
                info!(jwks = ?self.source, keys = keys.len(), ttl_s = ttl.as_secs(), "JWKS loaded");
                let set = Arc::new(KeySet { keys, fetched_at: now, ttl });
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(set.clone());
                Some(set)
            }
            Err(error) => {
                let current = self.snapshot();
                warn!(
                    jwks = ?self.source,
                    %error,
                    serving_last_good = current.is_some(),
                    "JWKS fetch failed"
                );
                current
            }
        }
    }
}
