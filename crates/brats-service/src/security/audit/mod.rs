//! The audit log: one tamper-evident record per authorisation decision and per state change
//! (job started, cancelled or finished, model registered, alias moved, configuration or
//! certificate reloaded), configured by the `[server.audit]` section ([`AuditConfig`]).
//!
//! # Records
//!
//! Each record is one JSON line in the format [`brats_cli::audit_chain`] defines (and
//! `bratsctl audit verify` checks): time, a ULID `event_id`, `seq`, service and instance, the
//! RPC, [`Action`], [`Outcome`], gRPC code, reason, principal, source IP, resource, latency,
//! and the hash chain (`prev_hash`: SHA-256 of the previous line; `hash`: SHA-256 of the
//! record without it). The log records only what an [`AuditEvent`] carries: no tokens, no key
//! secrets; URIs, case keys and client request ids go in only as [`AuditLog::keyed_hash`]es.
//!
//! # Sinks
//!
//! - `file`: a local JSON Lines file opened in append mode (created with mode 0600). Each
//!   record is one `write(2)` of the full line under a lock, so concurrent records never
//!   interleave; it reaches the operating system before [`AuditLog::record`] returns (no
//!   fsync: it survives the process, not a power cut). When the file already holds records,
//!   [`AuditLog::open`] reads its last line, checks that record on its own (form and hash) and
//!   continues its chain (`seq` and `prev_hash`), so one file holds one chain across restarts;
//!   a damaged last line makes `open` fail rather than start a chain nobody can verify (move
//!   the file aside, keeping it as evidence). Only one process may append to a file: give
//!   each instance its own. `bratsctl audit verify FILE` checks the whole chain.
//! - `stdout`: each record also as one line on standard output, for a log shipper or SIEM.
//! - `store_uri`: an object-store prefix (`s3://…`, `file:///…`) under which the records are
//!   written as immutable, never-overwritten segments of one chain per process
//!   (`<store_uri>/<service>/<instance>/<first seq>.jsonl`), every `segment_records` records,
//!   every `flush_interval_s` seconds and at shutdown ([`AuditLog::flush`]); see `store.rs`.
//!   Its chain is its own (sealed when a segment is cut), separate from the file's.
//!
//! # Failures
//!
//! When a sink cannot be written, [`AuditLog::record`] returns the error and the chain does
//! not advance (the next record takes the same `seq`, so a write that failed cleanly leaves no
//! gap). The caller decides what the failure means: with `on_failure = "deny"`
//! ([`AuditLog::fail_closed`]) the request is refused with `UNAVAILABLE`; with `"log"` it goes
//! on and the failure is logged. The store sink writes in the background, so for it a record
//! fails when the last segment write failed (with `deny`) or when `max_unflushed_records`
//! records already wait: what an outage can cost is bounded by that many records.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use brats_cli::audit_chain::{AuditRecord, ChainHead, RecordPrincipal, RecordResource};
use brats_core::StoreConfig;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::{AuthMethod, Principal};

pub use brats_cli::audit_chain::{
    Action, Outcome, Problem, SegmentsError, SegmentsReport, VerifyError, VerifyReport, verify, verify_file,
    verify_segments,
};

mod store;

type HmacSha256 = Hmac<Sha256>;

/// The `[server.audit]` section of a service's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Also write each record as one JSON line to standard output.
    pub stdout: bool,
    /// The append-only local JSON Lines file; empty for none.
    pub file: String,
    /// What a failure to record means for the request: refuse it (`deny`, the default) or go on
    /// and log the failure (`log`).
    pub on_failure: OnFailure,
    /// A file holding the key of [`AuditLog::keyed_hash`] (its bytes, a trailing newline
    /// ignored; at least 32 of them; readable by its owner only). Empty: a random key per
    /// process, so hashes can be matched within one process's records only.
    pub hmac_key_file: String,
    /// An object-store prefix (`s3://bucket/audit/`, `file:///var/log/brats/audit/`) under
    /// which records are written as immutable segments (see the module's docs); empty for none.
    pub store_uri: String,
    /// `[server.audit.store]`: how the sink reaches S3 (endpoint, region, credentials; unset
    /// fields fall back to the `AWS_*` environment), separate from the service's own store so
    /// the audit bucket can have its own, write-only credentials.
    pub store: StoreConfig,
    /// Records per segment: a segment is written as soon as this many wait.
    pub segment_records: usize,
    /// Seconds a record waits at most before a (shorter) segment is written.
    pub flush_interval_s: u64,
    /// Records held in memory for the store at most; with `on_failure = "deny"` requests are
    /// refused beyond it (and while the last write failed), with `"log"` records are dropped
    /// from the store sink.
    pub max_unflushed_records: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            stdout: false,
            file: String::new(),
            on_failure: OnFailure::default(),
            hmac_key_file: String::new(),
            store_uri: String::new(),
            store: StoreConfig::default(),
            segment_records: 100,
            flush_interval_s: 5,
            max_unflushed_records: 1000,
        }
    }
}

/// What a failure to write an audit record means for the request it concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Refuse the request (`UNAVAILABLE`): nothing happens unaudited.
    #[default]
    Deny,
    /// Let it go on and log the failure.
    Log,
}

/// One of the platform's objects a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resource<'a> {
    /// Its kind: `job`, `model_version`, `request`, …
    pub kind: &'a str,
    /// Its id: one of the platform's own ids, or a [`AuditLog::keyed_hash`] of a value that
    /// could carry PHI (a URI, a client request id).
    pub id: &'a str,
}

/// What happened, as the caller tells the log. Holds no secret and no PHI: the caller passes
/// URIs and client-chosen ids only through [`AuditLog::keyed_hash`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent<'a> {
    /// The full gRPC method (`/brats.v1.Trainer/StartJob`), or `config` and the like for events
    /// outside RPCs.
    pub rpc: &'a str,
    /// What was done or decided.
    pub action: Action,
    /// How it went.
    pub outcome: Outcome,
    /// The gRPC status the call answered (or will answer), written by its canonical name.
    pub grpc_code: tonic::Code,
    /// A short explanation, free of secrets and PHI.
    pub reason: &'a str,
    /// The caller, when known.
    pub principal: Option<&'a Principal>,
    /// The caller's IP address, when known.
    pub source_ip: Option<IpAddr>,
    /// The object concerned, if any.
    pub resource: Option<Resource<'a>>,
    /// How long the call took, when recorded after it.
    pub latency_ms: Option<u64>,
}

impl<'a> AuditEvent<'a> {
    /// An event with no reason, principal, source, resource or latency; set those fields as
    /// needed.
    pub fn new(rpc: &'a str, action: Action, outcome: Outcome, grpc_code: tonic::Code) -> Self {
        AuditEvent {
            rpc,
            action,
            outcome,
            grpc_code,
            reason: "",
            principal: None,
            source_ip: None,
            resource: None,
            latency_ms: None,
        }
    }
}

/// Why the audit log could not be opened or a record written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The file sink could not be opened or read (a missing or read-only directory, …).
    #[error("audit log {}: cannot open: {error}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The error (in the message, not a `source`, so an error chain says it once).
        error: std::io::Error,
    },
    /// The file's last record is damaged, so its chain cannot be continued.
    #[error(
        "audit log {}: its last line cannot be continued ({problem}); check it with `bratsctl audit verify` and move it aside",
        path.display()
    )]
    Chain {
        /// The file.
        path: PathBuf,
        /// What is wrong with its last line.
        problem: Problem,
    },
    /// The `hmac_key_file` is unusable.
    #[error("audit hmac_key_file {path}: {message}")]
    Key {
        /// The key file as configured.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// The operating system's random generator failed.
    #[error("audit log: the system random generator failed")]
    Random,
    /// A record could not be written to a sink.
    #[error("audit log: writing to {sink} failed: {error}")]
    Write {
        /// The sink: `stdout` or the file's path.
        sink: String,
        /// The error (in the message, not a `source`, so an error chain says it once).
        error: std::io::Error,
    },
    /// `store_uri` is not a store location.
    #[error("server.audit.store_uri: not an s3://bucket/prefix, file:///path or local path")]
    StoreUri,
    /// The store sink was configured outside a Tokio runtime, where it cannot write.
    #[error("server.audit.store_uri: the audit store sink needs a Tokio runtime")]
    NoRuntime,
    /// The audit store could not be listed, read or written (its URI left out).
    #[error("audit store: cannot {operation}: {reason}")]
    Store {
        /// `list`, `read` or `write`.
        operation: &'static str,
        /// The store's error, the URI replaced by `<audit store>`.
        reason: String,
    },
    /// The store already holds another segment under this segment's name: a second process
    /// writes under the same instance name.
    #[error(
        "audit store: segment {first_seq} exists with other records: another process writes to this instance's folder; give each process its own"
    )]
    StoreConflict {
        /// The segment's first `seq`.
        first_seq: u64,
    },
    /// The folder's last segment is damaged, so its chain cannot be continued.
    #[error(
        "audit store: segment {first_seq} cannot be continued ({problem}); check the folder with `bratsctl audit verify` and move it aside"
    )]
    StoreChain {
        /// The segment's first `seq`.
        first_seq: u64,
        /// What is wrong with its last line.
        problem: Problem,
    },
    /// With `on_failure = "deny"`: the last segment write failed, so records are refused until
    /// one succeeds.
    #[error("audit store: the last segment write failed ({reason}); refusing records until the store takes one")]
    StoreFailing {
        /// Why the last write failed.
        reason: String,
    },
    /// `max_unflushed_records` records already wait for the store.
    #[error("audit store: {records} records wait to be written (max_unflushed_records)")]
    StoreBacklog {
        /// How many wait.
        records: usize,
    },
}

/// The audit log of one service process: a cheap, clonable handle (`Send + Sync`) shared by
/// every request.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

struct Inner {
    service: String,
    instance: String,
    fail_closed: bool,
    /// HMAC-SHA256 keyed for [`AuditLog::keyed_hash`].
    mac: HmacSha256,
    /// The sinks and the chain; `None` when nothing is recorded.
    writer: Option<Mutex<Writer>>,
}

struct Writer {
    head: ChainHead,
    file: Option<(PathBuf, File)>,
    stdout: bool,
    /// The object-store sink, with its own chain.
    store: Option<store::StoreSink>,
    /// The random 80 bits of this process's first ULID; each record adds its `count`.
    id_base: u128,
    count: u64,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (file, store) = self.inner.writer.as_ref().map_or((None, false), |w| {
            let w = w.lock().unwrap_or_else(PoisonError::into_inner);
            (w.file.as_ref().map(|(p, _)| p.clone()), w.store.is_some())
        });
        f.debug_struct("AuditLog")
            .field("service", &self.inner.service)
            .field("instance", &self.inner.instance)
            .field("enabled", &self.inner.writer.is_some())
            .field("file", &file)
            .field("store", &store)
            .field("fail_closed", &self.inner.fail_closed)
            .field("hmac_key", &"<redacted>")
            .finish()
    }
}

impl AuditLog {
    /// Opens the sinks `config` names for `service` (`trainer`, …) and its `instance` (host or
    /// pod name), continuing the chain of an existing file (see the module's docs). Fails when
    /// the file cannot be opened for appending (its directory missing or read-only), when its
    /// last line is damaged, when the key file is unusable, or when `store_uri` is invalid or
    /// set outside a Tokio runtime (its writer task runs there). The store is first reached
    /// by [`flush`](Self::flush), which a server calls at start-up.
    pub fn open(config: &AuditConfig, service: &str, instance: &str) -> Result<AuditLog, AuditError> {
        let mut key = if config.hmac_key_file.is_empty() {
            random_bytes::<64>().ok_or(AuditError::Random)?.to_vec()
        } else {
            read_key(&config.hmac_key_file)?
        };
        let mac = HmacSha256::new_from_slice(&key)
            .map_err(|e| AuditError::Key { path: config.hmac_key_file.clone(), message: e.to_string() });
        key.fill(0);
        let mac = mac?;
        let store = store::StoreSink::open(config, service, instance)?;
        let writer = if config.file.is_empty() && !config.stdout && store.is_none() {
            None
        } else {
            let (head, file) = if config.file.is_empty() {
                (ChainHead::genesis(), None)
            } else {
                let path = PathBuf::from(&config.file);
                let (head, file) = open_file(&path)?;
                (head, Some((path, file)))
            };
            let id_base = u128::from_le_bytes(random_bytes::<16>().ok_or(AuditError::Random)?);
            Some(Mutex::new(Writer { head, file, stdout: config.stdout, store, id_base, count: 0 }))
        };
        Ok(AuditLog {
            inner: Arc::new(Inner {
                service: service.to_string(),
                instance: instance.to_string(),
                fail_closed: config.on_failure == OnFailure::Deny,
                mac,
                writer,
            }),
        })
    }

    /// A log that records nothing and never fails (auditing off; tests). Its
    /// [`keyed_hash`](Self::keyed_hash) uses a random key.
    pub fn disabled() -> AuditLog {
        let key = random_bytes::<64>().unwrap_or_else(fallback_random);
        AuditLog {
            inner: Arc::new(Inner {
                service: String::new(),
                instance: String::new(),
                fail_closed: false,
                mac: <HmacSha256 as hmac::digest::KeyInit>::new(&key.into()),
                writer: None,
            }),
        }
    }

    /// Appends one record to every sink, in order, before returning (to the store sink's
    /// memory: it is written with its segment). On an error the record may be missing from
    /// some sink and the caller decides, by [`fail_closed`](Self::fail_closed), whether the
    /// request is refused; with `deny`, a store sink that refuses records (see the module's
    /// docs) fails the record before any sink holds it.
    pub fn record(&self, event: AuditEvent<'_>) -> Result<(), AuditError> {
        let Some(writer) = &self.inner.writer else {
            return Ok(());
        };
        let mut guard = writer.lock().unwrap_or_else(PoisonError::into_inner);
        let w = &mut *guard;
        let fail_closed = self.inner.fail_closed;
        if fail_closed && let Some(store) = &w.store {
            store.admit(true)?;
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let millis = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
        w.count = w.count.wrapping_add(1);
        let event_id = ulid(millis, w.id_base.wrapping_add(u128::from(w.count)));
        let record = AuditRecord {
            ts: rfc3339_millis(millis),
            event_id,
            seq: 0,
            service: self.inner.service.clone(),
            instance: self.inner.instance.clone(),
            rpc: event.rpc.to_string(),
            action: event.action,
            outcome: event.outcome,
            grpc_code: crate::code_name(event.grpc_code).to_string(),
            reason: event.reason.to_string(),
            principal: event.principal.map(record_principal),
            source_ip: event.source_ip,
            resource: event.resource.map(|r| RecordResource { kind: r.kind.to_string(), id: r.id.to_string() }),
            latency_ms: event.latency_ms,
            prev_hash: String::new(),
        };
        let for_store = w.store.as_ref().map(|_| record.clone());
        let sealed = w.head.seal(record);
        let mut bytes = sealed.line.into_bytes();
        bytes.push(b'\n');
        if let Some((path, file)) = &mut w.file {
            file.write_all(&bytes)
                .and_then(|()| file.flush())
                .map_err(|error| AuditError::Write { sink: path.display().to_string(), error })?;
            // In the file: the chain moves on whatever happens to stdout.
            w.head = sealed.next.clone();
        }
        if w.stdout {
            let mut out = std::io::stdout().lock();
            out.write_all(&bytes)
                .and_then(|()| out.flush())
                .map_err(|error| AuditError::Write { sink: "stdout".into(), error })?;
        }
        w.head = sealed.next;
        match (&w.store, for_store) {
            (Some(store), Some(record)) => store.push(record, fail_closed),
            _ => Ok(()),
        }
    }

    /// Writes every record the store sink holds now (at shutdown; at start-up, to reach the
    /// store and continue its chain before serving). Without a store sink, nothing to do.
    pub async fn flush(&self) -> Result<(), AuditError> {
        match self.store() {
            Some(store) => store.flush().await,
            None => Ok(()),
        }
    }

    /// Records the store sink holds that are not yet in the store (0 without one).
    pub fn unflushed(&self) -> usize {
        self.store().map_or(0, |s| s.unflushed())
    }

    /// A handle on the store sink, taken out of the writer's lock (flushing awaits).
    fn store(&self) -> Option<store::StoreSink> {
        let writer = self.inner.writer.as_ref()?;
        writer.lock().unwrap_or_else(PoisonError::into_inner).store.clone()
    }

    /// Whether a record that could not be written must refuse the request (`on_failure =
    /// "deny"`).
    pub fn fail_closed(&self) -> bool {
        self.inner.fail_closed
    }

    /// `hmac-sha256:<64 hex digits>`: `value` (a URI, a case key, a client request id) keyed
    /// with the log's key, so records can show that two requests concerned the same object
    /// without showing the object. Stable for one key; a different key gives different hashes.
    pub fn keyed_hash(&self, value: &str) -> String {
        let mut mac = self.inner.mac.clone();
        mac.update(value.as_bytes());
        format!("hmac-sha256:{}", hex::encode(mac.finalize().into_bytes()))
    }
}

/// The principal as a record shows it.
fn record_principal(p: &Principal) -> RecordPrincipal {
    RecordPrincipal {
        subject: p.subject.clone(),
        issuer: p.issuer.clone(),
        method: method_name(p.method).to_string(),
        key_id: p.key_id.clone(),
        tenant: p.tenant.clone(),
        roles: p.roles.iter().cloned().collect(),
    }
}

/// An authentication method's name, as serde writes it.
fn method_name(m: AuthMethod) -> &'static str {
    match m {
        AuthMethod::Anonymous => "anonymous",
        AuthMethod::ApiKey => "api_key",
        AuthMethod::Jwt => "jwt",
        AuthMethod::MutualTls => "mutual_tls",
    }
}

/// Opens (or creates, mode 0600) the file for appending, and the chain head its last line
/// leaves.
fn open_file(path: &Path) -> Result<(ChainHead, File), AuditError> {
    let open_err = |error| AuditError::Open { path: path.to_path_buf(), error };
    // A new volume (a container's, a pod's) has no audit folder yet: make it, private.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir).map_err(open_err)?;
    }
    let mut options = OpenOptions::new();
    options.read(true).append(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode();
        if meta.is_file() && mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                "audit log is readable or writable by group or others (mode {:o}); chmod 600 it",
                mode & 0o777
            );
        }
    }
    if !meta.is_file() {
        // A device or pipe: nothing to continue.
        return Ok((ChainHead::genesis(), file));
    }
    let head = match last_line(&mut file).map_err(open_err)? {
        None => ChainHead::genesis(),
        Some(line) => {
            let chain_err = |problem| AuditError::Chain { path: path.to_path_buf(), problem };
            let line = line.strip_suffix(b"\n").ok_or_else(|| chain_err(Problem::Truncated))?;
            ChainHead::after(line).map_err(chain_err)?
        }
    };
    Ok((head, file))
}

/// The last line of a file, with its `\n` if it has one; `None` for an empty file. Reads
/// backwards from the end, so the file's size does not matter.
fn last_line(file: &mut File) -> std::io::Result<Option<Vec<u8>>> {
    const CHUNK: u64 = 8192;
    const LONGEST: usize = 1 << 20;
    let mut pos = file.seek(SeekFrom::End(0))?;
    let mut tail: Vec<u8> = Vec::new();
    while pos > 0 {
        let start = pos.saturating_sub(CHUNK);
        let mut chunk = vec![0; usize::try_from(pos - start).unwrap_or(0)];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&tail);
        tail = chunk;
        pos = start;
        let before_end = &tail[..tail.len() - 1];
        if let Some(i) = before_end.iter().rposition(|&b| b == b'\n') {
            return Ok(Some(tail.split_off(i + 1)));
        }
        if tail.len() > LONGEST {
            return Err(std::io::Error::other("its last line is longer than 1 MiB: not an audit record"));
        }
    }
    Ok((!tail.is_empty()).then_some(tail))
}

/// Reads the HMAC key: the file's bytes without trailing newlines, at least 32 of them, in a
/// file other accounts cannot read (`brats_cli::secret_file`).
fn read_key(path: &str) -> Result<Vec<u8>, AuditError> {
    let key_err = |message: String| AuditError::Key { path: path.to_string(), message };
    brats_cli::secret_file::check_secret_file(Path::new(path)).map_err(|e| key_err(e.to_string()))?;
    let mut key = std::fs::read(path).map_err(|e| key_err(e.to_string()))?;
    while key.last().is_some_and(|b| matches!(b, b'\n' | b'\r')) {
        key.pop();
    }
    if key.len() < 32 {
        key.fill(0);
        return Err(key_err("holds fewer than 32 bytes; make one with `head -c 32 /dev/urandom | base64`".into()));
    }
    Ok(key)
}

/// `N` bytes from the operating system's secure random generator (through aws-lc, the TLS
/// provider), or `None` if it failed.
fn random_bytes<const N: usize>() -> Option<[u8; N]> {
    let mut bytes = [0u8; N];
    rustls::crypto::aws_lc_rs::default_provider().secure_random.fill(&mut bytes).ok()?;
    Some(bytes)
}

/// Random bytes from the standard library's per-process random hasher keys, for
/// [`AuditLog::disabled`] should the system generator fail (it cannot fail there).
fn fallback_random<const N: usize>() -> [u8; N] {
    use std::hash::{BuildHasher, Hasher};
    let state = std::collections::hash_map::RandomState::new();
    let mut bytes = [0u8; N];
    for (i, chunk) in bytes.chunks_mut(8).enumerate() {
        let mut h = state.build_hasher();
        h.write_usize(i);
        let v = h.finish().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    bytes
}

/// A ULID: 48 bits of Unix milliseconds then 80 bits of `random`, in Crockford base 32.
fn ulid(millis: u64, random: u128) -> String {
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let value = (u128::from(millis & 0xFFFF_FFFF_FFFF) << 80) | (random & ((1u128 << 80) - 1));
    (0..26).map(|i| char::from(ALPHABET[((value >> (125 - 5 * i)) & 31) as usize])).collect()
}

/// Unix milliseconds as UTC RFC 3339 with milliseconds: `2026-03-01T12:34:56.789Z`.
fn rfc3339_millis(millis: u64) -> String {
    let secs = millis / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX);
    let (y, mo, d) = brats_core::time::civil_from_days(days);
    let s = secs % 86_400;
    format!("{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", s / 3600, s / 60 % 60, s % 60, millis % 1000)
}

#[cfg(test)]
mod tests;
