//! API keys: `brats_<id>_<secret>`, checked against a TOML file that holds only their SHA-256,
//! reloaded when the file changes.
//!
//! ```toml
//! [[keys]]
//! id = "ci"                          # the <id> part of the key: letters, digits, `-`
//! sha256 = "<hex>"                   # hash_api_key(whole key)
//! roles = ["train", "viewer"]
//! tenant = "neuro"
//! expires = "2027-01-01T00:00:00Z"   # optional, RFC 3339
//! revoked = false                    # optional
//! ```

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::{error, info};

use super::{AuthError, AuthSetupError};
use crate::security::principal::{AuthMethod, Principal};

use brats_cli::api_key::PREFIX;
/// The `issuer` of every API-key [`Principal`].
const ISSUER: &str = "api-keys";
/// The file is looked at (`stat`) at most this often.
const STAT_INTERVAL: Duration = Duration::from_secs(1);
/// The largest keys file read.
const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// The longest key id.
const MAX_ID_LEN: usize = 64;

pub use brats_cli::api_key::{hash_api_key, new_api_key};

fn valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The id of a presented key, if it has the key's shape.
fn key_id(key: &str) -> Result<&str, AuthError> {
    const SHAPE: &str = "an API key looks like brats_<id>_<secret>";
    let (id, secret) =
        key.strip_prefix(PREFIX).and_then(|rest| rest.split_once('_')).ok_or(AuthError::Malformed(SHAPE))?;
    if !valid_id(id) || secret.is_empty() {
        return Err(AuthError::Malformed(SHAPE));
    }
    Ok(id)
}

/// One key from the file.
struct KeyRecord {
    sha256: [u8; 32],
    roles: BTreeSet<String>,
    tenant: String,
    /// Unix seconds.
    expires: Option<i64>,
    revoked: bool,
}

impl fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRecord")
            .field("sha256", &"<redacted>")
            .field("roles", &self.roles)
            .field("tenant", &self.tenant)
            .field("expires", &self.expires)
            .field("revoked", &self.revoked)
            .finish()
    }
}

/// What identifies a version of the file: modification and change times (a `chmod` changes
/// the latter), size, inode, mode.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    #[cfg(unix)]
    unix: (u64, i64, i64, u32),
}

fn stamp(meta: &std::fs::Metadata) -> Stamp {
    #[cfg(unix)]
    use std::os::unix::fs::MetadataExt;
    Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        #[cfg(unix)]
        unix: (meta.ino(), meta.ctime(), meta.ctime_nsec(), meta.mode()),
    }
}

struct State {
    keys: Arc<HashMap<String, KeyRecord>>,
    /// The version of the file last read, whether it loaded or not (`None`: it was missing).
    seen: Option<Stamp>,
    last_stat: Instant,
}

/// The keys file, reloaded when it changes.
pub(super) struct ApiKeyStore {
    path: PathBuf,
    state: Mutex<State>,
}

impl fmt::Debug for ApiKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = self.state.lock().map(|s| s.keys.len()).unwrap_or_default();
        f.debug_struct("ApiKeyStore").field("path", &self.path).field("keys", &keys).finish()
    }
}

impl ApiKeyStore {
    /// Loads `path`; an error names the file and the fix.
    pub(super) fn load(path: &str, now: Instant) -> Result<Self, AuthSetupError> {
        let path = PathBuf::from(path);
        let (keys, seen) = read_keys_file(&path)
            .map_err(|message| AuthSetupError::KeysFile { path: path.display().to_string(), message })?;
        info!(file = %path.display(), keys = keys.len(), "API keys loaded");
        Ok(ApiKeyStore { path, state: Mutex::new(State { keys: Arc::new(keys), seen, last_stat: now }) })
    }

    /// The principal a presented key proves.
    pub(super) fn verify(&self, key: &str, now: Instant) -> Result<Principal, AuthError> {
        let id = key_id(key)?;
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let keys = self.keys(now);
        let Some(record) = keys.get(id) else {
            return Err(AuthError::RevokedOrUnknownKey);
        };
        let matches: bool = record.sha256.ct_eq(&digest).into();
        if !matches || record.revoked {
            return Err(AuthError::RevokedOrUnknownKey);
        }
        if record.expires.is_some_and(|expires| unix_now() >= expires) {
            return Err(AuthError::KeyExpired);
        }
        Ok(Principal {
            subject: id.to_string(),
            issuer: ISSUER.into(),
            method: AuthMethod::ApiKey,
            key_id: id.to_string(),
            tenant: record.tenant.clone(),
            roles: record.roles.clone(),
        })
    }

    /// The current keys, reloaded first if the file changed (looked at once per second at
    /// most). A file that no longer loads keeps the last good keys, with an error logged once
    /// per version of the file.
    fn keys(&self, now: Instant) -> Arc<HashMap<String, KeyRecord>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if now.saturating_duration_since(state.last_stat) < STAT_INTERVAL {
            return state.keys.clone();
        }
        state.last_stat = now;
        let current = std::fs::metadata(&self.path).ok().map(|meta| stamp(&meta));
        if current == state.seen {
            return state.keys.clone();
        }
        match read_keys_file(&self.path) {
            Ok((keys, seen)) => {
                info!(file = %self.path.display(), keys = keys.len(), "API keys reloaded");
                state.keys = Arc::new(keys);
                state.seen = seen;
            }
            Err(message) => {
                error!(
                    file = %self.path.display(),
                    %message,
                    "API keys file not reloaded; the previous keys stay in force"
                );
                state.seen = current;
            }
        }
        state.keys.clone()
    }
}

fn unix_now() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(elapsed) => i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: Vec<KeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    id: String,
    sha256: String,
    #[serde(default)]
    roles: Vec<String>,
    tenant: String,
    #[serde(default)]
    expires: Option<toml::Value>,
    #[serde(default)]
    revoked: bool,
}

/// Reads and checks the keys file; the error says what is wrong and how to fix it (never a
/// hash or other file content).
fn read_keys_file(path: &Path) -> Result<(HashMap<String, KeyRecord>, Option<Stamp>), String> {
    let file = File::open(path).map_err(|e| format!("cannot open it ({e}); fix the path or create it"))?;
    let meta = file.metadata().map_err(|e| format!("cannot stat it ({e})"))?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    brats_cli::secret_file::check_secret_file(path).map_err(|e| e.to_string())?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!("is larger than {MAX_FILE_BYTES} bytes"));
    }
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read it as UTF-8 text ({e})"))?;
    let parsed: KeysFile = toml::from_str(&text).map_err(|e| {
        let line = e.span().map(|span| {
            let before = &text.as_bytes()[..span.start.min(text.len())];
            before.iter().filter(|&&b| b == b'\n').count() + 1
        });
        match line {
            Some(line) => format!("line {line}: {}", redact_quoted(e.message())),
            None => redact_quoted(e.message()),
        }
    })?;
    let mut keys = HashMap::new();
    for (index, entry) in parsed.keys.into_iter().enumerate() {
        let at = format!("keys[{index}]");
        if !valid_id(&entry.id) {
            return Err(format!("{at}.id must be 1–{MAX_ID_LEN} ASCII letters, digits or `-`"));
        }
        let at = format!("key `{}`", entry.id);
        let mut sha256 = [0u8; 32];
        if entry.sha256.len() != 64 || hex::decode_to_slice(&entry.sha256, &mut sha256).is_err() {
            return Err(format!(
                "{at}: sha256 must be 64 hex digits, the hash_api_key of the whole key \
                 (never the key itself)"
            ));
        }
        if entry.tenant.is_empty() {
            return Err(format!("{at}: tenant is empty"));
        }
        if entry.roles.iter().any(String::is_empty) {
            return Err(format!("{at}: a role is empty"));
        }
        let expires = match &entry.expires {
            None => None,
            Some(toml::Value::String(text)) => Some(parse_rfc3339(text)),
            Some(toml::Value::Datetime(datetime)) => Some(parse_rfc3339(&datetime.to_string())),
            Some(_) => Some(None),
        };
        let expires = match expires {
            None => None,
            Some(Some(seconds)) => Some(seconds),
            Some(None) => {
                return Err(format!(
                    "{at}: expires must be an RFC 3339 time with an offset, \
                     e.g. \"2027-01-01T00:00:00Z\""
                ));
            }
        };
        let record = KeyRecord {
            sha256,
            roles: entry.roles.into_iter().collect(),
            tenant: entry.tenant,
            expires,
            revoked: entry.revoked,
        };
        if keys.insert(entry.id, record).is_some() {
            return Err(format!("{at} is listed twice"));
        }
    }
    Ok((keys, Some(stamp(&meta))))
}

/// A parser message with its quoted values blanked, so that a key pasted into the wrong field
/// is not echoed into the error.
fn redact_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut inside = false;
    for c in message.chars() {
        if c == '"' {
            inside = !inside;
            out.push(c);
            if inside {
                out.push('…');
            }
        } else if !inside {
            out.push(c);
        }
    }
    out
}

/// Unix seconds of an RFC 3339 time (`2027-01-01T00:00:00Z`, `…T01:30:00.5+02:00`); `None` if
/// it is not one. Fractions of a second are dropped; a leap second counts as the next second.
pub(super) fn parse_rfc3339(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    let number = |from: usize, to: usize| -> Option<i64> {
        let digits = bytes.get(from..to)?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        digits.iter().try_fold(0i64, |n, d| Some(n * 10 + i64::from(d - b'0')))
    };
    let separator = |at: usize, allowed: &[u8]| bytes.get(at).is_some_and(|b| allowed.contains(b));
    let year = number(0, 4)?;
    let month = number(5, 7)?;
    let day = number(8, 10)?;
    let hour = number(11, 13)?;
    let minute = number(14, 16)?;
    let second = number(17, 19)?;
    if !(separator(4, b"-")
        && separator(7, b"-")
        && separator(10, b"Tt ")
        && separator(13, b":")
        && separator(16, b":"))
    {
        return None;
    }
    let mut rest = bytes.get(19..)?;
    if let Some((b'.', fraction)) = rest.split_first() {
        let digits = fraction.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        rest = &fraction[digits..];
    }
    let offset = match rest {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let field = |a: &u8, b: &u8| -> Option<i64> {
                (a.is_ascii_digit() && b.is_ascii_digit()).then(|| i64::from(a - b'0') * 10 + i64::from(b - b'0'))
            };
            let (hours, minutes) = (field(h1, h2)?, field(m1, m2)?);
            if hours > 23 || minutes > 59 {
                return None;
            }
            let offset = hours * 3600 + minutes * 60;
            if *sign == b'-' { -offset } else { offset }
        }
        _ => return None,
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if !(1..=month_days).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant, `days_from_civil`).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2027-01-01T00:00:00Z"), Some(1_798_761_600));
        assert_eq!(parse_rfc3339("2000-02-29T12:00:00.123+02:00"), Some(951_818_400));
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59z"), Some(-1));
        assert_eq!(parse_rfc3339("2024-03-01 00:00:00-00:30"), Some(1_709_253_000));
        for bad in [
            "",
            "2027-01-01",
            "2027-01-01T00:00:00",
            "2027-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2027-01-01T24:00:00Z",
            "2027-01-01T00:00:00.Z",
            "2027-01-01T00:00:00+2:00",
            "2027-01-01T00:00:00+02:00x",
            "２027-01-01T00:00:00Z",
            "+027-01-01T00:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn key_shape() {
        let key = new_api_key("ci-1");
        assert!(key.starts_with("brats_ci-1_"));
        assert_eq!(key.len(), "brats_ci-1_".len() + 43);
        assert_eq!(key_id(&key), Ok("ci-1"));
        assert_ne!(new_api_key("ci-1"), key);
        assert_eq!(hash_api_key(&key).len(), 64);
        for bad in ["", "brats_", "brats_ci", "brats_ci_", "brats__x", "other_ci_x", "brats_c.i_x"] {
            assert_eq!(key_id(bad).map_err(|e| e.reason()), Err("malformed"), "{bad}");
        }
    }
}
