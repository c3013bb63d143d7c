//! Authentication with real keys: ES256 tokens signed here, a JWKS from a file and from a
//! counting HTTP server on loopback, API key files, and rcgen client certificates.
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tonic::codegen::http::HeaderValue;

use super::*;

const ISSUER: &str = "https://idp.test/realms/brats";
const AUDIENCE: &str = "brats";

/// A signing key of the test identity provider and its JWKS.
struct Idp {
    key: rcgen::KeyPair,
    encoding: EncodingKey,
    kid: String,
}

impl Idp {
    fn new(kid: &str) -> Idp {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let encoding = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
        Idp { key, encoding, kid: kid.into() }
    }

    fn jwk(&self) -> Jwk {
        let mut jwk = Jwk::from_encoding_key(&self.encoding, Algorithm::ES256).unwrap();
        jwk.common.key_id = Some(self.kid.clone());
        jwk
    }

    fn jwks(idps: &[&Idp]) -> String {
        serde_json::to_string(&JwkSet { keys: idps.iter().map(|idp| idp.jwk()).collect() }).unwrap()
    }

    fn sign_with_kid(&self, kid: &str, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.into());
        encode(&header, claims, &self.encoding).unwrap()
    }

    fn sign(&self, claims: &Value) -> String {
        self.sign_with_kid(&self.kid, claims)
    }
}

fn claims() -> Value {
    let now = get_current_timestamp();
    json!({
        "sub": "alice",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": now + 600,
        "iat": now,
        "nbf": now - 5,
        "tenant": "neuro",
        "roles": ["brats-trainer", "viewer"],
    })
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().unwrap().remove(key);
    claims
}

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(*name, HeaderValue::from_str(value).unwrap());
    }
    map
}

fn bearer(token: &str) -> HeaderMap {
    headers(&[("authorization", format!("Bearer {token}"))])
}

fn file_uri(path: &Path) -> String {
    format!("file://{}", path.display())
}

fn jwt_config(jwks_uri: String) -> AuthConfig {
    AuthConfig {
        enabled: true,
        jwt: Some(JwtConfig {
            jwks_uri,
            issuers: vec![ISSUER.into()],
            audiences: vec![AUDIENCE.into(), "other-api".into()],
            role_map: [("brats-trainer".to_string(), "train".to_string())].into(),
            ..JwtConfig::default()
        }),
        ..AuthConfig::default()
    }
}

/// An authenticator reading the JWKS of `idps` from a file in `dir`.
fn file_authenticator(dir: &Path, idps: &[&Idp]) -> Authenticator {
    let path = dir.join("jwks.json");
    std::fs::write(&path, Idp::jwks(idps)).unwrap();
    Authenticator::new(&jwt_config(file_uri(&path))).unwrap()
}

async fn reason(auth: &Authenticator, headers: &HeaderMap) -> &'static str {
    auth.authenticate(headers, None).await.unwrap_err().reason()
}

fn roles(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn jwt_accepted_with_mapped_roles_and_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let idp = Idp::new("k1");
    let auth = file_authenticator(dir.path(), &[&idp]);
    let principal = auth.authenticate(&bearer(&idp.sign(&claims())), None).await.unwrap();
    assert_eq!(
        principal,
        Principal {
            subject: "alice".into(),
            issuer: ISSUER.into(),
            method: AuthMethod::Jwt,
            key_id: "k1".into(),
            tenant: "neuro".into(),
            roles: roles(&["train", "viewer"]),
        }
    );
    // An `aud` array naming one accepted audience; no tenant claim means `default`.
    let token = idp.sign(&without(with(claims(), "aud", json!(["x", "other-api"])), "tenant"));
    let principal = auth.authenticate(&bearer(&token), None).await.unwrap();
    assert_eq!(principal.tenant, "default");
    // Scheme is case-insensitive.
    let lower = headers(&[("authorization", format!("bearer {}", idp.sign(&claims())))]);
    assert!(auth.authenticate(&lower, None).await.is_ok());
}

#[tokio::test]
async fn roles_from_claim_paths_and_scope_strings() {
    let dir = tempfile::tempdir().unwrap();
    let idp = Idp::new("k1");
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, Idp::jwks(&[&idp])).unwrap();

    let mut config = jwt_config(file_uri(&path));
    config.jwt.as_mut().unwrap().roles_claim = "realm_access.roles".into();
    let auth = Authenticator::new(&config).unwrap();
    let token = idp.sign(&with(claims(), "realm_access", json!({"roles": ["brats-trainer", "offline_access"]})));
    let principal = auth.authenticate(&bearer(&token), None).await.unwrap();
    assert_eq!(principal.roles, roles(&["train", "offline_access"]));

    let mut config = jwt_config(file_uri(&path));
    config.jwt.as_mut().unwrap().roles_claim = "scope".into();
    let auth = Authenticator::new(&config).unwrap();
    let token = idp.sign(&with(claims(), "scope", json!("openid segment  brats-trainer")));
    let principal = auth.authenticate(&bearer(&token), None).await.unwrap();
    assert_eq!(principal.roles, roles(&["openid", "segment", "train"]));

    // A claim path that is absent gives no roles (not an error).
    let token = idp.sign(&without(claims(), "scope"));
    assert!(auth.authenticate(&bearer(&token), None).await.unwrap().roles.is_empty());
}

#[tokio::test]
async fn jwt_refusals_have_their_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let idp = Idp::new("k1");
    // The same key again, published for ES384 only.
    let mut es384 = idp.jwk();
    es384.common.key_id = Some("k-es384".into());
    es384.common.key_algorithm = Some(KeyAlgorithm::ES384);
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, serde_json::to_string(&JwkSet { keys: vec![idp.jwk(), es384] }).unwrap()).unwrap();
    let auth = Authenticator::new(&jwt_config(file_uri(&path))).unwrap();
    let now = get_current_timestamp();
    let good = idp.sign(&claims());

    let none_token = format!("{}.{}.", b64(&json!({"alg": "none", "kid": "k1", "typ": "JWT"})), b64(&claims()));
    let mut hs_header = Header::new(Algorithm::HS256);
    hs_header.kid = Some("k1".into());
    let hs_token = encode(&hs_header, &claims(), &EncodingKey::from_secret(idp.key.public_key_raw()).unwrap()).unwrap();
    let mut crit_header = Header::new(Algorithm::ES256);
    crit_header.kid = Some("k1".into());
    crit_header.crit = Some(vec!["exp-policy".into()]);
    crit_header.extras.insert("exp-policy", 1);
    let crit_token = encode(&crit_header, &claims(), &idp.encoding).unwrap();
    let tampered = {
        let parts: Vec<&str> = good.split('.').collect();
        let mut payload: Vec<char> = parts[1].chars().collect();
        let middle = payload.len() / 2;
        payload[middle] = if payload[middle] == 'A' { 'B' } else { 'A' };
        format!("{}.{}.{}", parts[0], payload.into_iter().collect::<String>(), parts[2])
    };
    let impostor = Idp::new("k1");

    let cases: Vec<(&str, String, &str)> = vec![
        ("alg none", none_token, "algorithm_not_allowed"),
        ("HS256 with the public key as secret", hs_token, "algorithm_not_allowed"),
        ("unknown crit", crit_token, "unsupported_crit"),
        ("unknown kid", idp.sign_with_kid("k9", &claims()), "unknown_kid"),
        ("alg differs from the key's", idp.sign_with_kid("k-es384", &claims()), "algorithm_not_allowed"),
        ("other key, same kid", impostor.sign(&claims()), "bad_signature"),
        ("tampered payload", tampered, "bad_signature"),
        ("expired", idp.sign(&with(claims(), "exp", json!(now - 3600))), "expired"),
        ("nbf in the future", idp.sign(&with(claims(), "nbf", json!(now + 3600))), "not_yet_valid"),
        ("wrong issuer", idp.sign(&with(claims(), "iss", json!("https://evil.test"))), "wrong_issuer"),
        ("wrong audience", idp.sign(&with(claims(), "aud", json!("someone-else"))), "wrong_audience"),
        ("missing audience", idp.sign(&without(claims(), "aud")), "missing_claim"),
        ("missing exp", idp.sign(&without(claims(), "exp")), "missing_claim"),
        ("missing sub", idp.sign(&without(claims(), "sub")), "missing_claim"),
        (
            "missing kid",
            {
                let header = Header::new(Algorithm::ES256);
                encode(&header, &claims(), &idp.encoding).unwrap()
            },
            "malformed",
        ),
        ("not a JWT", "abc".into(), "malformed"),
        ("tenant not a string", idp.sign(&with(claims(), "tenant", json!(7))), "malformed"),
    ];
    for (name, token, expected) in cases {
        let error = auth.authenticate(&bearer(&token), None).await.unwrap_err();
        assert_eq!(error.reason(), expected, "{name}: {error}");
        assert!(!error.to_string().contains(&token), "{name}: token in the message");
    }
    // Within the leeway (30 s) an expired token still passes.
    let token = idp.sign(&with(claims(), "exp", json!(now - 10)));
    assert!(auth.authenticate(&bearer(&token), None).await.is_ok());
    assert!(auth.authenticate(&bearer(&good), None).await.is_ok());
}

#[tokio::test]
async fn header_rules() {
    let dir = tempfile::tempdir().unwrap();
    let idp = Idp::new("k1");
    let auth = file_authenticator(dir.path(), &[&idp]);
    let token = idp.sign(&claims());

    assert_eq!(reason(&auth, &HeaderMap::new()).await, "no_credentials");
    let twice = headers(&[("authorization", format!("Bearer {token}")), ("authorization", format!("Bearer {token}"))]);
    assert_eq!(reason(&auth, &twice).await, "duplicate_credentials");
    let both = headers(&[("authorization", format!("Bearer {token}")), ("x-api-key", "brats_ci_secret".into())]);
    assert_eq!(reason(&auth, &both).await, "duplicate_credentials");
    let keys_twice = headers(&[("x-api-key", "brats_a_x".into()), ("x-api-key", "brats_b_y".into())]);
    assert_eq!(reason(&auth, &keys_twice).await, "duplicate_credentials");
    let huge = headers(&[("authorization", format!("Bearer {}", "a".repeat(9000)))]);
    assert_eq!(reason(&auth, &huge).await, "header_too_large");
    let huge_key = headers(&[("x-api-key", "k".repeat(MAX_CREDENTIAL_HEADER_BYTES + 1))]);
    assert_eq!(reason(&auth, &huge_key).await, "header_too_large");
    let basic = headers(&[("authorization", "Basic dXNlcjpwYXNz".into())]);
    assert_eq!(reason(&auth, &basic).await, "malformed");
    let empty = headers(&[("authorization", "Bearer ".into())]);
    assert_eq!(reason(&auth, &empty).await, "malformed");
    // An API key where none are configured.
    let key = headers(&[("x-api-key", new_api_key("ci"))]);
    assert_eq!(reason(&auth, &key).await, "method_not_enabled");
}

fn write_keys(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn key_entry(id: &str, key: &str, extra: &str) -> String {
    format!(
        "[[keys]]\nid = \"{id}\"\nsha256 = \"{}\"\nroles = [\"train\", \"viewer\"]\n\
         tenant = \"neuro\"\n{extra}\n",
        hash_api_key(key)
    )
}

fn api_key_config(path: &Path) -> AuthConfig {
    AuthConfig { enabled: true, api_keys_file: path.display().to_string(), ..AuthConfig::default() }
}

#[tokio::test]
async fn api_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let (ci, old, temp) = (new_api_key("ci"), new_api_key("old"), new_api_key("temp"));
    let future = new_api_key("later");
    write_keys(
        &path,
        &[
            key_entry("ci", &ci, ""),
            key_entry("old", &old, "revoked = true"),
            key_entry("temp", &temp, "expires = \"2020-01-01T00:00:00Z\""),
            key_entry("later", &future, "expires = 2999-01-01T00:00:00+01:00"),
        ]
        .concat(),
    );
    let auth = Authenticator::new(&api_key_config(&path)).unwrap();
    let api = |key: &str| headers(&[("x-api-key", key.to_string())]);

    let principal = auth.authenticate(&api(&ci), None).await.unwrap();
    assert_eq!(
        principal,
        Principal {
            subject: "ci".into(),
            issuer: "api-keys".into(),
            method: AuthMethod::ApiKey,
            key_id: "ci".into(),
            tenant: "neuro".into(),
            roles: roles(&["train", "viewer"]),
        }
    );
    assert!(auth.authenticate(&api(&future), None).await.is_ok());

    let wrong_secret = format!("brats_ci_{}", &new_api_key("x")["brats_x_".len()..]);
    for (name, key, expected) in [
        ("wrong secret", wrong_secret, "revoked_or_unknown_key"),
        ("revoked", old, "revoked_or_unknown_key"),
        ("expired", temp.clone(), "key_expired"),
        ("unknown id", new_api_key("nobody"), "revoked_or_unknown_key"),
        ("wrong shape", "hunter2".to_string(), "malformed"),
        // The hash of an expired key's id with a wrong secret does not reveal expiry.
        ("expired id, wrong secret", format!("{}x", temp), "revoked_or_unknown_key"),
    ] {
        let error = auth.authenticate(&api(&key), None).await.unwrap_err();
        assert_eq!(error.reason(), expected, "{name}");
        assert!(!error.to_string().contains(&key));
    }
    // A bearer token where JWTs are not configured.
    assert_eq!(reason(&auth, &bearer("a.b.c")).await, "method_not_enabled");
    // Debug output carries no key material.
    let debug = format!("{auth:?}");
    assert!(!debug.contains(&hash_api_key(&ci)) && !debug.contains(&ci), "{debug}");
}

#[tokio::test]
async fn keys_file_must_be_private_and_valid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    write_keys(&path, &key_entry("ci", &new_api_key("ci"), ""));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let error = Authenticator::new(&api_key_config(&path)).unwrap_err().to_string();
    assert!(error.contains(&path.display().to_string()), "{error}");
    assert!(error.contains("chmod 600"), "{error}");

    for (text, needle) in [
        ("[[keys]]\nid = \"a_b\"\nsha256 = \"00\"\ntenant = \"t\"\n", "id must be"),
        ("[[keys]]\nid = \"a\"\nsha256 = \"brats_a_secret\"\ntenant = \"t\"\n", "sha256"),
        ("[[keys]]\nid = \"a\"\nsha256 = \"x\"\ntenant = \"t\"\nwho = 1\n", "line 5"),
        ("[[keys]]\nid = \"a\"\nsha256 = \"x\"\n", "tenant"),
        ("[[keys]]\nid = \"a\"\nsha256 = \"x\"\ntenant = \"t\"\nrevoked = \"brats_a_secret\"\n", "line 5"),
    ] {
        write_keys(&path, text);
        let error = Authenticator::new(&api_key_config(&path)).unwrap_err().to_string();
        assert!(error.contains(needle), "{error}");
        assert!(!error.contains("brats_a_secret"), "{error}");
    }
    let expires = key_entry("a", "brats_a_x", "expires = \"2027-01-01\"");
    write_keys(&path, &expires);
    let error = Authenticator::new(&api_key_config(&path)).unwrap_err().to_string();
    assert!(error.contains("RFC 3339"), "{error}");
    let twice = [key_entry("a", "brats_a_x", ""), key_entry("a", "brats_a_y", "")].concat();
    write_keys(&path, &twice);
    let error = Authenticator::new(&api_key_config(&path)).unwrap_err().to_string();
    assert!(error.contains("twice"), "{error}");
    let missing = api_key_config(&dir.path().join("absent.toml"));
    let error = Authenticator::new(&missing).unwrap_err().to_string();
    assert!(error.contains("absent.toml"), "{error}");
}

#[tokio::test]
async fn keys_file_reloads_when_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let (ci, new) = (new_api_key("ci"), new_api_key("new"));
    write_keys(&path, &key_entry("ci", &ci, ""));
    let auth = Authenticator::new(&api_key_config(&path)).unwrap();
    let api = |key: &str| headers(&[("x-api-key", key.to_string())]);
    let start = Instant::now();
    let at = |s: u64| start + Duration::from_secs(s);

    assert!(auth.authenticate_at(&api(&ci), None, at(0)).await.is_ok());
    write_keys(&path, &[key_entry("ci", &ci, "revoked = true"), key_entry("new", &new, "")].concat());
    // The file is looked at once per second at most: not yet.
    assert!(auth.authenticate_at(&api(&ci), None, at(0)).await.is_ok());
    assert!(auth.authenticate_at(&api(&new), None, at(2)).await.is_ok());
    let error = auth.authenticate_at(&api(&ci), None, at(2)).await.unwrap_err();
    assert_eq!(error.reason(), "revoked_or_unknown_key");

    // A broken edit keeps the last good keys.
    write_keys(&path, "[[keys]\nthis is not toml");
    assert!(auth.authenticate_at(&api(&new), None, at(4)).await.is_ok());
    // Made readable by others: refused on reload, last good keys stay.
    write_keys(&path, &key_entry("ci", &ci, ""));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(auth.authenticate_at(&api(&new), None, at(6)).await.is_ok());
    write_keys(&path, &[key_entry("ci", &ci, ""), key_entry("new", &new, "revoked = true")].concat());
    assert!(auth.authenticate_at(&api(&ci), None, at(8)).await.is_ok());
    assert!(auth.authenticate_at(&api(&new), None, at(8)).await.is_err());
}

fn cert(san: &str) -> CertificateDer<'static> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params = rcgen::CertificateParams::new(vec![san.into()]).unwrap();
    params.self_signed(&key).unwrap().der().clone()
}

fn mtls_config() -> AuthConfig {
    AuthConfig {
        enabled: true,
        services: [(
            "Trainer.brats.internal".to_string(),
            ServiceIdentity { roles: vec!["service".into()], tenant: "default".into() },
        )]
        .into(),
        ..AuthConfig::default()
    }
}

#[tokio::test]
async fn mutual_tls_identities() {
    let auth = Authenticator::new(&mtls_config()).unwrap();
    let trainer = cert("trainer.brats.internal");
    let principal = auth.authenticate(&HeaderMap::new(), Some(std::slice::from_ref(&trainer))).await.unwrap();
    assert_eq!(
        principal,
        Principal {
            subject: "trainer.brats.internal".into(),
            issuer: "internal-ca".into(),
            method: AuthMethod::MutualTls,
            key_id: hex::encode(Sha256::digest(trainer.as_ref())),
            tenant: "default".into(),
            roles: roles(&["service"]),
        }
    );
    for san in ["viewer.brats.internal", "*.brats.internal"] {
        let other = cert(san);
        let error = auth.authenticate(&HeaderMap::new(), Some(&[other])).await.unwrap_err();
        assert_eq!(error.reason(), "certificate_not_allowed", "{san}");
    }
    let garbage = CertificateDer::from(vec![0x30, 0x03, 1, 2, 3]);
    let error = auth.authenticate(&HeaderMap::new(), Some(&[garbage])).await.unwrap_err();
    assert_eq!(error.reason(), "certificate_not_allowed");
    assert_eq!(auth.authenticate(&HeaderMap::new(), Some(&[])).await.unwrap_err().reason(), "no_credentials");
    // A presented credential wins over the certificate, and failing does not fall back.
    let error = auth.authenticate(&bearer("a.b.c"), Some(&[trainer])).await.unwrap_err();
    assert_eq!(error.reason(), "method_not_enabled");

    // With anonymous access, a certificate that is no service identity is just anonymous.
    let mut config = mtls_config();
    config.anonymous = true;
    config.anonymous_roles = vec!["viewer".into()];
    let auth = Authenticator::new(&config).unwrap();
    let other = cert("viewer.brats.internal");
    let principal = auth.authenticate(&HeaderMap::new(), Some(&[other])).await.unwrap();
    assert_eq!(principal, Principal::anonymous("default", ["viewer".to_string()]));
}

#[test]
fn shareable_across_tasks() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let auth = Authenticator::new(&AuthConfig::default()).unwrap();
    send_sync(&auth);
    let headers = HeaderMap::new();
    send(&auth.authenticate(&headers, None));
}

#[tokio::test]
async fn disabled_means_anonymous_admin() {
    let auth = Authenticator::new(&AuthConfig::default()).unwrap();
    let expected = Principal::anonymous("default", ["admin".to_string()]);
    assert_eq!(auth.authenticate(&HeaderMap::new(), None).await.unwrap(), expected);
    assert_eq!(auth.authenticate(&bearer("garbage"), None).await.unwrap(), expected);
    // The keys file is not even read when authentication is off.
    let config = AuthConfig { api_keys_file: "/nonexistent/keys.toml".into(), ..Default::default() };
    assert!(Authenticator::new(&config).is_ok());
}

#[test]
fn config_is_checked_at_load() {
    let base = || jwt_config("file:///etc/brats/jwks.json".into());
    assert!(Authenticator::new(&base()).is_ok());
    type Change = fn(&mut JwtConfig);
    let bad: [(&str, Change); 9] = [
        ("HS256", |c| c.algorithms = vec!["ES256".into(), "HS256".into()]),
        ("none", |c| c.algorithms = vec!["none".into()]),
        ("algorithms is empty", |c| c.algorithms.clear()),
        ("leeway_s", |c| c.leeway_s = 61),
        ("issuers", |c| c.issuers.clear()),
        ("audiences", |c| c.audiences.clear()),
        ("loopback", |c| c.jwks_uri = "http://idp.example.org/jwks".into()),
        ("not supported", |c| c.jwks_uri = "ftp://idp/jwks".into()),
        ("not a URL", |c| c.jwks_uri = String::new()),
    ];
    for (needle, change) in bad {
        let mut config = base();
        change(config.jwt.as_mut().unwrap());
        let error = Authenticator::new(&config).unwrap_err().to_string();
        assert!(error.contains(needle), "{needle}: {error}");
    }
    for uri in ["http://127.0.0.1:8080/jwks", "http://[::1]/jwks", "http://localhost/x", "https://idp/x"] {
        let mut config = base();
        config.jwt.as_mut().unwrap().jwks_uri = uri.into();
        assert!(Authenticator::new(&config).is_ok(), "{uri}");
    }
    let nothing = AuthConfig { enabled: true, ..Default::default() };
    assert!(Authenticator::new(&nothing).unwrap_err().to_string().contains("no way"));
    let mut wildcard = mtls_config();
    wildcard.services.insert("*.brats.internal".into(), wildcard.services["Trainer.brats.internal"].clone());
    assert!(Authenticator::new(&wildcard).is_err());

    let parsed: AuthConfig = toml::from_str(
        r#"
        enabled = true
        api_keys_file = ""
        [jwt]
        jwks_uri = "https://idp.example.org/certs"
        issuers = ["https://idp.example.org"]
        audiences = ["brats"]
        roles_claim = "realm_access.roles"
        role_map = { brats-trainer = "train" }
        [services."trainer.brats.internal"]
        roles = ["service"]
        "#,
    )
    .unwrap();
    let jwt = parsed.jwt.as_ref().unwrap();
    assert_eq!(jwt.algorithms, ["RS256", "PS256", "ES256", "EdDSA"]);
    assert_eq!((jwt.leeway_s, jwt.tenant_claim.as_str()), (30, "tenant"));
    assert_eq!(parsed.services["trainer.brats.internal"].tenant, "default");
    assert!(Authenticator::new(&parsed).is_ok());
    assert!(toml::from_str::<AuthConfig>("enabeld = true").is_err());
}

#[tokio::test]
async fn rotated_out_keys_are_refused_after_the_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (Idp::new("k1"), Idp::new("k2"));
    let auth = file_authenticator(dir.path(), &[&old]);
    let start = Instant::now();
    let at = |s: u64| start + Duration::from_secs(s);
    let old_token = old.sign(&claims());
    assert!(auth.authenticate_at(&bearer(&old_token), None, at(0)).await.is_ok());
    std::fs::write(dir.path().join("jwks.json"), Idp::jwks(&[&new])).unwrap();
    // The new kid is unknown to the cached set: refetched (the last fetch was 30+ s ago).
    let new_token = new.sign(&claims());
    assert!(auth.authenticate_at(&bearer(&new_token), None, at(40)).await.is_ok());
    let error = auth.authenticate_at(&bearer(&old_token), None, at(41)).await.unwrap_err();
    assert_eq!(error.reason(), "unknown_kid");
}

/// A one-document http server on loopback that counts requests; `Connection: close`, so
/// one connection per request.
async fn serve(body: String, cache_control: &'static str) -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\ncache-control: {cache_control}\r\n\
                 connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    });
    (format!("http://127.0.0.1:{port}/jwks"), count, task)
}

#[tokio::test]
async fn http_jwks_unknown_kid_flood_is_bounded_and_last_good_set_serves() {
    let idp = Idp::new("k1");
    let (url, fetches, server) = serve(Idp::jwks(&[&idp]), "public, max-age=86400").await;
    let auth = Authenticator::new(&jwt_config(url)).unwrap();
    let start = Instant::now();
    let at = |s: u64| start + Duration::from_secs(s);

    for i in 0..100 {
        let kid = format!("random-{i}-{}", new_api_key("x"));
        let error = auth.authenticate_at(&bearer(&idp.sign_with_kid(&kid, &claims())), None, at(0)).await.unwrap_err();
        assert_eq!(error.reason(), "unknown_kid");
    }
    assert!(fetches.load(Ordering::SeqCst) <= 2, "{fetches:?}");
    let token = idp.sign(&claims());
    assert!(auth.authenticate_at(&bearer(&token), None, at(1)).await.is_ok());
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
    // After 30 s one more unknown kid may refetch, once.
    for _ in 0..10 {
        let token = idp.sign_with_kid("k-later", &claims());
        let _ = auth.authenticate_at(&bearer(&token), None, at(31)).await;
    }
    assert_eq!(fetches.load(Ordering::SeqCst), 2);
    // max-age=86400 is clamped to 60 min: at 59 min no fetch, a known kid is served.
    assert!(auth.authenticate_at(&bearer(&token), None, at(59 * 60)).await.is_ok());
    assert_eq!(fetches.load(Ordering::SeqCst), 2);

    // The identity provider goes away: the last good set serves for 24 h.
    server.abort();
    let _ = server.await;
    assert!(auth.authenticate_at(&bearer(&token), None, at(2 * 3600)).await.is_ok());
    assert!(auth.authenticate_at(&bearer(&token), None, at(20 * 3600)).await.is_ok());
    let error = auth.authenticate_at(&bearer(&token), None, at(25 * 3600)).await.unwrap_err();
    assert_eq!(error.reason(), "jwks_unavailable");
    assert!(error.is_unavailable());
    assert_eq!(fetches.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn http_jwks_limits() {
    let idp = Idp::new("k1");
    // Larger than 64 KiB.
    let mut huge = serde_json::to_value(JwkSet { keys: vec![idp.jwk()] }).unwrap();
    huge["padding"] = json!("x".repeat(70 * 1024));
    let (url, fetches, _server) = serve(huge.to_string(), "max-age=60").await;
    let auth = Authenticator::new(&jwt_config(url)).unwrap();
    let token = idp.sign(&claims());
    assert_eq!(reason(&auth, &bearer(&token)).await, "jwks_unavailable");
    // A failed fetch is not retried for 30 s.
    assert_eq!(reason(&auth, &bearer(&token)).await, "jwks_unavailable");
    assert_eq!(fetches.load(Ordering::SeqCst), 1);

    // Nothing listening.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let auth = Authenticator::new(&jwt_config(format!("http://127.0.0.1:{port}/jwks"))).unwrap();
    assert_eq!(reason(&auth, &bearer(&token)).await, "jwks_unavailable");
}
