//! The audit log's record format and hash chain, defined once: the services write records with
//! it (`brats_service::security::audit`) and `bratsctl audit verify` checks them with it. It is
//! here, in the light crate every binary links, so that the client verifies logs without
//! linking the services' dependencies.
//!
//! # Format
//!
//! An audit log is a JSON Lines file: one record per line, each line ending in `\n`. A record
//! is one JSON object whose fields come in this order, always all of them (absent values are
//! `null`):
//!
//! | field | value |
//! |---|---|
//! | `ts` | UTC time, RFC 3339 with milliseconds: `2026-03-01T12:34:56.789Z` |
//! | `event_id` | unique id of the record (a ULID where the services write it) |
//! | `seq` | 1, 2, 3, … along the chain |
//! | `service`, `instance` | which service and which process of it wrote the record |
//! | `rpc` | the full gRPC method (`/brats.v1.Trainer/StartJob`), or `config` and the like |
//! | `action` | [`Action`] in snake case: `authorize`, `job_started`, … |
//! | `outcome` | [`Outcome`] in snake case: `allowed`, `denied`, `succeeded`, `failed` |
//! | `grpc_code` | the canonical status name: `OK`, `PERMISSION_DENIED`, … |
//! | `reason` | a short explanation, free of secrets and PHI |
//! | `principal` | `{subject, issuer, method, key_id, tenant, roles}` or `null` |
//! | `source_ip` | the peer's IP address as text, or `null` |
//! | `resource` | `{type, id}` (the platform's own ids; URIs only as keyed hashes) or `null` |
//! | `latency_ms` | integer or `null` |
//! | `prev_hash` | lowercase hex SHA-256 of the previous record's line (its bytes without the `\n`); [`GENESIS_HASH`] (64 zeros) for the first record |
//! | `hash` | lowercase hex SHA-256 of the record's *body* (below) |
//!
//! The **body** of a record is its compact JSON serialization (`serde_json`, no whitespace,
//! fields in the order above) without the `hash` field: the line is the body with its closing
//! `}` replaced by `,"hash":"<64 hex digits>"}`. Verification parses the body, serializes it
//! again and requires the very same bytes, so a line is valid only in this canonical form and
//! a record hashes to one value only.
//!
//! # What the chain shows
//!
//! [`verify`] checks every line: its form, its own hash (an edited record fails), `seq`
//! counting up by one from 1 (a removed, inserted, repeated or reordered record fails) and
//! `prev_hash` matching the line before (a record replaced together with its hash fails at the
//! next line). The hashes are not keyed: whoever can rewrite the whole file from some record on
//! can forge a consistent tail, and cutting records off the end leaves a valid shorter chain.
//! Both show only against a copy kept elsewhere (the stdout stream shipped to a SIEM, a
//! write-once store) by comparing the last `seq` and line hash.
//!
//! # Segments
//!
//! In an object store a log is a folder of immutable *segments*, each a JSON Lines file of
//! consecutive records named after its first record's `seq` with 12 zero-padded digits
//! ([`segment_name`]: `000000000001.jsonl`, `000000000101.jsonl`, …), so names sort in chain
//! order. The segments of one folder continue one chain: [`verify_segments`] reads them in
//! `seq` order and checks them as one log, and also that each segment starts where the one
//! before ended, so a removed segment is named as missing. Cutting the last segments off
//! leaves a valid shorter chain, as with a file.

use std::io::BufRead;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `prev_hash` of a chain's first record: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What was done or decided. Written in snake case (`job_started`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// An authorisation decision on an RPC.
    Authorize,
    /// A training job started.
    JobStarted,
    /// A training job was cancelled.
    JobCancelled,
    /// A training job ended (its outcome tells how).
    JobFinished,
    /// A model version was registered.
    ModelRegistered,
    /// A model alias (`production`, …) was moved to another version.
    AliasMoved,
    /// The configuration was reloaded.
    ConfigReloaded,
    /// The TLS certificate or key was reloaded.
    CertificateReloaded,
}

/// How it went. Written in snake case (`denied`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// An authorisation decision that let the call through.
    Allowed,
    /// An authorisation decision that refused it.
    Denied,
    /// A state change that happened.
    Succeeded,
    /// A state change that was attempted and failed.
    Failed,
}

/// The caller as a record shows it (the services' `Principal`, with its method as text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordPrincipal {
    /// Subject: JWT `sub`, API key id or certificate SAN.
    pub subject: String,
    /// Issuer: JWT `iss`, `api-keys`, or the client CA's subject.
    pub issuer: String,
    /// How it authenticated, in snake case: `anonymous`, `api_key`, `jwt`, `mutual_tls`.
    pub method: String,
    /// The key that proved it: JWT `kid`, API key id or client certificate SHA-256.
    pub key_id: String,
    /// Its tenant.
    pub tenant: String,
    /// Its roles, sorted.
    pub roles: Vec<String>,
}

/// What a record is about: one of the platform's own objects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordResource {
    /// Its kind (`job`, `model_version`, `request`, …), written as `type`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its id (a keyed hash where the value could carry PHI, as URIs and request ids can).
    pub id: String,
}

/// A record's fields but `hash`, in the order they are written (see the module's docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// UTC time, RFC 3339 with milliseconds.
    pub ts: String,
    /// Unique id of the record.
    pub event_id: String,
    /// Its place in the chain, from 1 ([`ChainHead::seal`] sets it).
    pub seq: u64,
    /// The service that wrote it.
    pub service: String,
    /// The process (instance) of that service.
    pub instance: String,
    /// The full gRPC method, or a word for events outside RPCs (`config`).
    pub rpc: String,
    /// What was done or decided.
    pub action: Action,
    /// How it went.
    pub outcome: Outcome,
    /// The canonical gRPC status name (`PERMISSION_DENIED`).
    pub grpc_code: String,
    /// A short explanation, free of secrets and PHI.
    pub reason: String,
    /// The caller, when known.
    pub principal: Option<RecordPrincipal>,
    /// The caller's IP address, when known.
    pub source_ip: Option<IpAddr>,
    /// The object concerned, if any.
    pub resource: Option<RecordResource>,
    /// How long the call took, where it is recorded after the fact.
    pub latency_ms: Option<u64>,
    /// Hex SHA-256 of the previous line ([`ChainHead::seal`] sets it).
    pub prev_hash: String,
}

/// Where a chain stands: the `seq` and `prev_hash` its next record takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    /// The next record's `seq`.
    pub next_seq: u64,
    /// The next record's `prev_hash`: hex SHA-256 of the last line.
    pub prev_hash: String,
}

/// A record made into its line, and the chain's head once that line is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The line, without its `\n`.
    pub line: String,
    /// The head after it: the writer adopts it once the line is stored.
    pub next: ChainHead,
}

impl ChainHead {
    /// The head of an empty chain: seq 1 and [`GENESIS_HASH`].
    pub fn genesis() -> Self {
        ChainHead { next_seq: 1, prev_hash: GENESIS_HASH.to_string() }
    }

    /// The head after `line` (without its `\n`), the last line of an existing log, checked on
    /// its own ([`parse_line`]: form and hash; not the records before it).
    pub fn after(line: &[u8]) -> Result<Self, Problem> {
        let record = parse_line(line)?;
        Ok(ChainHead { next_seq: record.seq.saturating_add(1), prev_hash: line_hash(line) })
    }

    /// Gives `record` this head's `seq` and `prev_hash`, hashes it and returns its line with
    /// the head that follows. The head itself does not move: a writer keeps `next` only once
    /// the line is stored, so a write that failed leaves no gap.
    pub fn seal(&self, mut record: AuditRecord) -> Sealed {
        record.seq = self.next_seq;
        record.prev_hash.clone_from(&self.prev_hash);
        let body = body_of(&record);
        let hash = hex::encode(Sha256::digest(body.as_bytes()));
        let mut line = body;
        line.pop(); // the closing '}'
        line.push_str(",\"hash\":\"");
        line.push_str(&hash);
        line.push_str("\"}");
        let next = ChainHead { next_seq: record.seq.saturating_add(1), prev_hash: line_hash(line.as_bytes()) };
        Sealed { line, next }
    }
}

/// The body of a record: its compact JSON without `hash`.
fn body_of(record: &AuditRecord) -> String {
    // Serializing plain structs, strings, integers and IP addresses to a String cannot fail.
    serde_json::to_string(record).unwrap_or_default()
}

/// Lowercase hex SHA-256 of a line's bytes (without its `\n`): the next record's `prev_hash`.
pub fn line_hash(line: &[u8]) -> String {
    hex::encode(Sha256::digest(line))
}

/// The fixed-length end of every line: `,"hash":"` + 64 hex digits + `"}`.
const HASH_TAIL_LEN: usize = 9 + 64 + 2;

/// Parses one line (without its `\n`) and checks it on its own: JSON, canonical form, a valid
/// `prev_hash` and the record's own hash. Its place in the chain is [`verify`]'s to check.
pub fn parse_line(line: &[u8]) -> Result<AuditRecord, Problem> {
    let text = std::str::from_utf8(line).map_err(|_| Problem::NotUtf8)?;
    if text.is_empty() {
        return Err(Problem::EmptyLine);
    }
    let split = text.len().checked_sub(HASH_TAIL_LEN).filter(|&i| text.is_char_boundary(i));
    let Some((head, tail)) = split.map(|i| text.split_at(i)) else {
        return Err(not_a_record(text));
    };
    let stored = match tail.strip_prefix(",\"hash\":\"").and_then(|t| t.strip_suffix("\"}")) {
        Some(h) if is_hex64(h) => h,
        _ => return Err(not_a_record(text)),
    };
    let body = format!("{head}}}");
    let record: AuditRecord = serde_json::from_str(&body).map_err(|e| Problem::Garbled(e.to_string()))?;
    if body_of(&record) != body {
        return Err(Problem::NotCanonical);
    }
    if !is_hex64(&record.prev_hash) {
        return Err(Problem::Garbled("prev_hash is not 64 lowercase hex digits".into()));
    }
    let computed = hex::encode(Sha256::digest(body.as_bytes()));
    if computed != stored {
        return Err(Problem::HashMismatch { stored: stored.to_string(), computed });
    }
    Ok(record)
}

/// Why a line that does not end in a proper hash field is wrong: bad JSON (a truncated line),
/// or JSON that is not a sealed record.
fn not_a_record(text: &str) -> Problem {
    match serde_json::from_str::<serde_json::Value>(text) {
        Err(e) => Problem::Garbled(e.to_string()),
        Ok(_) => Problem::NoHash,
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What is wrong with one line of an audit log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The log's last line has no `\n`: a write was cut short, or the file truncated.
    #[error("incomplete line: no newline at its end (a truncated file or an interrupted write)")]
    Truncated,
    /// A line with nothing on it.
    #[error("empty line")]
    EmptyLine,
    /// Bytes that are not UTF-8.
    #[error("not UTF-8: the line is garbled")]
    NotUtf8,
    /// Not JSON, or not an audit record (a field missing, unknown or of the wrong type).
    #[error("garbled record: {0}")]
    Garbled(String),
    /// JSON that does not end with the `hash` field.
    #[error("no \"hash\" field of 64 lowercase hex digits at the end of the record")]
    NoHash,
    /// A record that parses but is not in the canonical form it was written in (re-encoded,
    /// fields reordered or whitespace changed).
    #[error("record not in canonical form: it was rewritten after being sealed")]
    NotCanonical,
    /// The record's content does not match its hash: it was edited.
    #[error("hash mismatch: the record was edited (stored {stored}, computed {computed})")]
    HashMismatch {
        /// The hash the line carries.
        stored: String,
        /// The hash of its content.
        computed: String,
    },
    /// `seq` is not the previous one plus one (1 on the first line).
    #[error("seq {found} where {expected} was expected: {}", if found > expected {
        "records are missing before this one"
    } else {
        "records are out of order or repeated"
    })]
    Sequence {
        /// The line's `seq`.
        found: u64,
        /// The `seq` the chain needs there.
        expected: u64,
    },
    /// `prev_hash` is not the hash of the line before (or not [`GENESIS_HASH`] on the first).
    #[error("prev_hash does not match the previous line: a record before this one was removed, replaced or inserted")]
    PrevHash,
}

/// A log that verified.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// How many records it holds.
    pub records: u64,
    /// The first record's `seq` (1), or 0 for an empty log.
    pub first_seq: u64,
    /// The last record's `seq`, or 0 for an empty log.
    pub last_seq: u64,
}

/// Why a log did not verify.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A line is wrong: the first one found, by its number (from 1).
    #[error("line {line}: {problem}")]
    Record {
        /// The line number, from 1.
        line: u64,
        /// What is wrong with it.
        problem: Problem,
    },
    /// Reading the log failed at a line.
    #[error("line {line}: cannot read: {source}")]
    Read {
        /// The line being read, from 1.
        line: u64,
        /// The error.
        source: std::io::Error,
    },
    /// The file could not be opened.
    #[error("cannot open: {0}")]
    Open(std::io::Error),
}

impl VerifyError {
    /// The number of the line at fault, if the error concerns one.
    pub fn line(&self) -> Option<u64> {
        match self {
            VerifyError::Record { line, .. } | VerifyError::Read { line, .. } => Some(*line),
            VerifyError::Open(_) => None,
        }
    }

    /// What is wrong with the line at fault, if the error is about its content.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            VerifyError::Record { problem, .. } => Some(problem),
            _ => None,
        }
    }
}

/// Checks a chain record by record, across any number of readers that continue it (the
/// segments of a log in an object store), stopping at the first line at fault.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    head: ChainHead,
    report: VerifyReport,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        ChainVerifier { head: ChainHead::genesis(), report: VerifyReport::default() }
    }
}

impl ChainVerifier {
    /// A verifier expecting a chain's first record (`seq` 1, [`GENESIS_HASH`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks every line of `reader` as the chain's continuation: each line on its own
    /// ([`parse_line`]), `seq` one more than the record before and `prev_hash` the hash of the
    /// line before. Errors number lines from 1 within `reader`.
    pub fn feed<R: BufRead>(&mut self, mut reader: R) -> Result<(), VerifyError> {
        let mut buf = Vec::new();
        let mut line = 0u64;
        loop {
            buf.clear();
            let n =
                reader.read_until(b'\n', &mut buf).map_err(|source| VerifyError::Read { line: line + 1, source })?;
            if n == 0 {
                return Ok(());
            }
            line += 1;
            let fail = |problem| VerifyError::Record { line, problem };
            let bytes = buf.strip_suffix(b"\n").ok_or_else(|| fail(Problem::Truncated))?;
            let record = parse_line(bytes).map_err(fail)?;
            if record.seq != self.head.next_seq {
                return Err(fail(Problem::Sequence { found: record.seq, expected: self.head.next_seq }));
            }
            if record.prev_hash != self.head.prev_hash {
                return Err(fail(Problem::PrevHash));
            }
            self.head = ChainHead { next_seq: record.seq.saturating_add(1), prev_hash: line_hash(bytes) };
            if self.report.records == 0 {
                self.report.first_seq = record.seq;
            }
            self.report.records += 1;
            self.report.last_seq = record.seq;
        }
    }

    /// The `seq` the next record must have.
    pub fn next_seq(&self) -> u64 {
        self.head.next_seq
    }

    /// What has verified so far.
    pub fn report(&self) -> VerifyReport {
        self.report.clone()
    }
}

/// Verifies a whole log from its first record: every line on its own ([`parse_line`]), `seq`
/// counting 1, 2, 3, … and each `prev_hash` the hash of the line before ([`GENESIS_HASH`] on
/// the first). Stops at the first line at fault. An empty log verifies with no records.
pub fn verify<R: BufRead>(reader: R) -> Result<VerifyReport, VerifyError> {
    let mut verifier = ChainVerifier::new();
    verifier.feed(reader)?;
    Ok(verifier.report())
}

/// [`verify`] on the file at `path`.
pub fn verify_file(path: &Path) -> Result<VerifyReport, VerifyError> {
    let file = std::fs::File::open(path).map_err(VerifyError::Open)?;
    verify(std::io::BufReader::new(file))
}

/// The name ending every segment.
pub const SEGMENT_SUFFIX: &str = ".jsonl";

/// The name of the segment whose first record has `seq` `first_seq`: at least 12 digits,
/// zero-padded, then [`SEGMENT_SUFFIX`] (`000000000101.jsonl`).
pub fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:012}{SEGMENT_SUFFIX}")
}

/// The first `seq` a segment's name announces, or `None` for a name that is not a segment's.
pub fn segment_first_seq(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() < 12 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A folder of segments that verified as one chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SegmentsReport {
    /// How many segments it holds.
    pub segments: u64,
    /// The chain they hold together.
    pub chain: VerifyReport,
}

/// Why a folder of segments did not verify; each names the segment at fault.
#[derive(Debug, thiserror::Error)]
pub enum SegmentsError {
    /// The folder could not be listed.
    #[error("cannot list: {0}")]
    List(std::io::Error),
    /// The folder holds no segment.
    #[error("holds no audit segments (files named like 000000000001.jsonl)")]
    NoSegments,
    /// Segments are missing: the next one present starts past where the chain stands.
    #[error(
        "{segment}: segments are missing before it: the chain continues at seq {expected}, this one starts at {named}"
    )]
    Missing {
        /// The first segment present after the gap.
        segment: String,
        /// The `seq` its name announces.
        named: u64,
        /// The `seq` the chain needed next.
        expected: u64,
    },
    /// A segment starts before the previous one ended: names were changed, or segments were
    /// copied in from another log.
    #[error("{segment}: it starts at seq {named} but the previous segment ends at {}", expected - 1)]
    Overlap {
        /// The segment.
        segment: String,
        /// The `seq` its name announces.
        named: u64,
        /// The `seq` the chain needed next.
        expected: u64,
    },
    /// A segment with no record in it (the services never write one).
    #[error("{segment}: holds no records")]
    EmptySegment {
        /// The segment.
        segment: String,
    },
    /// A line of a segment is wrong, or the segment could not be read.
    #[error("{segment}: {source}")]
    Segment {
        /// The segment.
        segment: String,
        /// What is wrong, by line number within the segment.
        source: VerifyError,
    },
}

/// The segments of the folder `dir` (not below it), in `seq` order, by first `seq`.
fn segments_of(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Some(first_seq) = entry.file_name().to_str().and_then(segment_first_seq) else { continue };
        if entry.file_type()?.is_file() {
            segments.push((first_seq, entry.path()));
        }
    }
    segments.sort();
    Ok(segments)
}

/// Verifies the segments of the folder `dir` as one chain from its first record (see the
/// module's docs): each segment must start at the `seq` where the one before ended (a missing
/// segment is named), hold at least one record, and every line must verify as in [`verify`].
/// Files whose names are not segment names are ignored.
pub fn verify_segments(dir: &Path) -> Result<SegmentsReport, SegmentsError> {
    let segments = segments_of(dir).map_err(SegmentsError::List)?;
    if segments.is_empty() {
        return Err(SegmentsError::NoSegments);
    }
    let mut verifier = ChainVerifier::new();
    for (named, path) in &segments {
        let segment = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let expected = verifier.next_seq();
        if *named > expected {
            return Err(SegmentsError::Missing { segment, named: *named, expected });
        }
        if *named < expected {
            return Err(SegmentsError::Overlap { segment, named: *named, expected });
        }
        let file = std::fs::File::open(path)
            .map_err(|e| SegmentsError::Segment { segment: segment.clone(), source: VerifyError::Open(e) })?;
        verifier
            .feed(std::io::BufReader::new(file))
            .map_err(|source| SegmentsError::Segment { segment: segment.clone(), source })?;
        if verifier.next_seq() == expected {
            return Err(SegmentsError::EmptySegment { segment });
        }
    }
    Ok(SegmentsReport { segments: segments.len() as u64, chain: verifier.report() })
}

/// The folders at or below `root` that hold segments (one log each: a service instance's
/// folder under an audit prefix), sorted.
pub fn segment_folders(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut folders = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let mut holds_segments = false;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() && entry.file_name().to_str().and_then(segment_first_seq).is_some() {
                holds_segments = true;
            }
        }
        if holds_segments {
            folders.push(dir);
        }
    }
    folders.sort();
    Ok(folders)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(reason: &str) -> AuditRecord {
        AuditRecord {
            ts: "2026-03-01T12:34:56.789Z".into(),
            event_id: "01JNQX0000000000000000000".into(),
            seq: 0,
            service: "trainer".into(),
            instance: "t-1".into(),
            rpc: "/brats.v1.Trainer/StartJob".into(),
            action: Action::Authorize,
            outcome: Outcome::Allowed,
            grpc_code: "OK".into(),
            reason: reason.into(),
            principal: Some(RecordPrincipal {
                subject: "alice".into(),
                issuer: "api-keys".into(),
                method: "api_key".into(),
                key_id: "k1".into(),
                tenant: "t".into(),
                roles: vec!["train".into()],
            }),
            source_ip: Some("10.0.0.7".parse().unwrap()),
            resource: Some(RecordResource { kind: "job".into(), id: "job-1".into() }),
            latency_ms: None,
            prev_hash: String::new(),
        }
    }

    fn chain(n: usize) -> Vec<String> {
        let mut head = ChainHead::genesis();
        (0..n)
            .map(|i| {
                let sealed = head.seal(record(&format!("r{i}")));
                head = sealed.next;
                sealed.line
            })
            .collect()
    }

    fn check(lines: &[String]) -> Result<VerifyReport, VerifyError> {
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        verify(text.as_bytes())
    }

    #[test]
    fn a_sealed_chain_verifies_and_each_line_is_plain_json() {
        let lines = chain(3);
        assert_eq!(check(&lines).unwrap(), VerifyReport { records: 3, first_seq: 1, last_seq: 3 });
        let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(v["prev_hash"], GENESIS_HASH);
        assert_eq!(v["resource"]["type"], "job");
        assert_eq!(v["latency_ms"], serde_json::Value::Null);
        assert!(lines[0].starts_with(r#"{"ts":"2026-03-01T12:34:56.789Z","event_id":"#));
        assert_eq!(check(&[]).unwrap(), VerifyReport::default());
    }

    #[test]
    fn each_kind_of_damage_is_named() {
        let lines = chain(3);
        let problem = |lines: &[String]| check(lines).unwrap_err().problem().cloned().unwrap();

        let mut respaced = lines.clone();
        respaced[1] = respaced[1].replacen("\":", "\": ", 1);
        assert_eq!(problem(&respaced), Problem::NotCanonical);

        let mut cut = lines.clone();
        cut[2].truncate(40);
        assert!(matches!(problem(&cut), Problem::Garbled(_)), "{cut:?}");

        let mut unhashed = lines.clone();
        unhashed[0] = serde_json::to_string(&record("x")).unwrap();
        assert_eq!(problem(&unhashed), Problem::NoHash);

        let text = format!("{}\n{}", lines[0], lines[1]);
        assert!(matches!(verify(text.as_bytes()), Err(VerifyError::Record { line: 2, problem: Problem::Truncated })));

        let text = format!("{}\n\n{}\n", lines[0], lines[1]);
        assert!(matches!(verify(text.as_bytes()), Err(VerifyError::Record { line: 2, problem: Problem::EmptyLine })));

        let err = check(&lines[1..]).unwrap_err();
        assert_eq!(err.line(), Some(1));
        assert_eq!(err.problem(), Some(&Problem::Sequence { found: 2, expected: 1 }));
    }

    #[test]
    fn a_replaced_record_with_a_fresh_hash_fails_at_the_next_line() {
        let mut lines = chain(3);
        let forged = ChainHead::genesis().seal(record("forged"));
        lines[0] = forged.line;
        let err = check(&lines).unwrap_err();
        assert_eq!((err.line(), err.problem()), (Some(2), Some(&Problem::PrevHash)));
    }

    /// Writes `lines` as segments of `per_segment` records each into a fresh folder.
    fn write_segments(dir: &Path, lines: &[String], per_segment: usize) {
        for (i, chunk) in lines.chunks(per_segment).enumerate() {
            let text: String = chunk.iter().map(|l| format!("{l}\n")).collect();
            std::fs::write(dir.join(segment_name((i * per_segment) as u64 + 1)), text).unwrap();
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("audit-chain-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn segment_names_sort_in_chain_order_and_parse_back() {
        assert_eq!(segment_name(1), "000000000001.jsonl");
        assert_eq!(segment_first_seq("000000000101.jsonl"), Some(101));
        assert_eq!(segment_first_seq(&segment_name(1_000_000_000_001)), Some(1_000_000_000_001));
        for bad in ["1.jsonl", "00000000000a.jsonl", "000000000001.json", "audit.jsonl"] {
            assert_eq!(segment_first_seq(bad), None, "{bad}");
        }
    }

    #[test]
    fn segments_verify_as_one_chain_and_a_missing_or_edited_one_is_named() {
        let dir = scratch("segments");
        let lines = chain(7);
        write_segments(&dir, &lines, 3);
        std::fs::write(dir.join("README"), "not a segment").unwrap();
        let report = verify_segments(&dir).unwrap();
        assert_eq!(
            report,
            SegmentsReport { segments: 3, chain: VerifyReport { records: 7, first_seq: 1, last_seq: 7 } }
        );
        assert_eq!(segment_folders(&dir).unwrap(), std::slice::from_ref(&dir));

        std::fs::remove_file(dir.join(segment_name(4))).unwrap();
        let err = verify_segments(&dir).unwrap_err();
        assert!(matches!(err, SegmentsError::Missing { named: 7, expected: 4, .. }), "{err}");
        assert!(err.to_string().starts_with("000000000007.jsonl: segments are missing"), "{err}");

        write_segments(&dir, &lines, 3);
        let second = dir.join(segment_name(4));
        let text = std::fs::read_to_string(&second).unwrap().replacen("r4", "r9", 1);
        std::fs::write(&second, text).unwrap();
        let err = verify_segments(&dir).unwrap_err();
        assert!(err.to_string().starts_with("000000000004.jsonl: line 2: hash mismatch"), "{err}");

        // A segment renamed to close the gap of a removed one overlaps its predecessor.
        write_segments(&dir, &lines, 3);
        std::fs::rename(dir.join(segment_name(7)), dir.join(segment_name(3))).unwrap();
        let err = verify_segments(&dir).unwrap_err();
        assert!(matches!(err, SegmentsError::Overlap { named: 3, expected: 4, .. }), "{err}");

        let empty = scratch("no-segments");
        assert!(matches!(verify_segments(&empty), Err(SegmentsError::NoSegments)));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&empty);
    }

    #[test]
    fn the_head_after_a_line_continues_its_chain() {
        let lines = chain(2);
        let head = ChainHead::after(lines[1].as_bytes()).unwrap();
        assert_eq!(head, ChainHead { next_seq: 3, prev_hash: line_hash(lines[1].as_bytes()) });
        assert!(ChainHead::after(&lines[1].as_bytes()[..50]).is_err());
    }
}
