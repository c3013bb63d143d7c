//! The object-store sink of the audit log (`[server.audit] store_uri`): records are held in
//! memory and written as immutable segments, `<store_uri>/<service>/<instance>/<first
//! seq>.jsonl` ([`segment_name`]), each a JSON Lines file continuing one hash chain.
//!
//! - **Immutable**: a segment is written once with a create-if-absent put
//!   ([`Stores::put_new`]: S3 `If-None-Match: *`, an exclusive create on disk) and never
//!   rewritten; a second writer on the same folder loses that race and is told so.
//! - **When**: as soon as `segment_records` records wait, every `flush_interval_s` seconds
//!   for fewer, and at shutdown ([`super::AuditLog::flush`]).
//! - **One chain per folder**: records are sealed (given `seq` and `prev_hash`) when their
//!   segment is cut, so the folder's chain has no gap whatever the store does. A restarted
//!   process with the same instance name reads the folder's last segment and continues its
//!   chain in the next one; `bratsctl audit verify DIR` checks a copy of the folder.
//! - **Failures**: a segment that could not be written is kept, sealed, and retried as it is
//!   (every second while the store fails). With `on_failure = "deny"` records are refused
//!   while the last write failed or `max_unflushed_records` wait, so requests are answered
//!   UNAVAILABLE rather than served unaudited; with `"log"` they are held up to that bound,
//!   then dropped from this sink (and the caller logs each one).
//!
//! Log lines and errors name segments by their `seq`, never the store URI.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use brats_cli::audit_chain::{AuditRecord, ChainHead, Problem, segment_first_seq, segment_name};
use brats_core::{CoreError, ErrorKind, StoreUri, Stores};
use tokio::sync::Notify;
use tracing::{info, warn};

use super::{AuditConfig, AuditError};

/// Seconds between retries of a segment the store refused.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// The sink: a handle on the waiting records and the writer task.
#[derive(Clone)]
pub(super) struct StoreSink {
    shared: Arc<Shared>,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the writer task when a full segment waits.
    wake: Arc<Notify>,
    /// The segment writer: one segment in flight at a time, whether the task or a flush
    /// writes it.
    writer: tokio::sync::Mutex<SegmentWriter>,
    segment_records: usize,
    max_unflushed: usize,
}

/// Records not yet in the store, and how the last write went.
#[derive(Default)]
struct Queue {
    /// Records not yet cut into a segment (unsealed).
    waiting: VecDeque<AuditRecord>,
    /// Records of the cut segment not yet written (it is being written, or retried).
    in_flight: usize,
    /// Why the last write failed; `None` once one succeeds.
    failure: Option<String>,
}

impl Queue {
    fn unflushed(&self) -> usize {
        self.waiting.len() + self.in_flight
    }
}

/// What writes segments: the store, the folder, and where the chain stands.
struct SegmentWriter {
    stores: Stores,
    folder: StoreUri,
    /// The chain's head in the store; `None` until the folder's last segment has been read.
    head: Option<ChainHead>,
    /// A cut segment whose write failed, retried with the same bytes.
    unwritten: Option<Segment>,
}

/// A sealed segment.
struct Segment {
    first_seq: u64,
    records: usize,
    bytes: Vec<u8>,
    /// The chain's head once it is stored.
    next: ChainHead,
}

impl StoreSink {
    /// The sink `config` describes for `service` and `instance`, its writer task started on
    /// the current Tokio runtime. `None` when `store_uri` is empty.
    pub(super) fn open(config: &AuditConfig, service: &str, instance: &str) -> Result<Option<StoreSink>, AuditError> {
        if config.store_uri.is_empty() {
            return Ok(None);
        }
        let root = StoreUri::parse(&config.store_uri).map_err(|_| AuditError::StoreUri)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| AuditError::NoRuntime)?;
        let folder = root.join(&path_component(service)).join(&path_component(instance));
        let wake = Arc::new(Notify::new());
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: wake.clone(),
            writer: tokio::sync::Mutex::new(SegmentWriter {
                stores: Stores::new(config.store.clone()),
                folder,
                head: None,
                unwritten: None,
            }),
            segment_records: config.segment_records.max(1),
            max_unflushed: config.max_unflushed_records.max(1),
        });
        let interval = Duration::from_secs(config.flush_interval_s.max(1));
        runtime.spawn(write_periodically(Arc::downgrade(&shared), wake, interval));
        Ok(Some(StoreSink { shared }))
    }

    /// Whether a record may be taken now. With `fail_closed`: not while the last write failed
    /// nor once `max_unflushed_records` wait. Without: only the bound applies.
    pub(super) fn admit(&self, fail_closed: bool) -> Result<(), AuditError> {
        let queue = self.shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if fail_closed && let Some(reason) = &queue.failure {
            return Err(AuditError::StoreFailing { reason: reason.clone() });
        }
        if queue.unflushed() >= self.shared.max_unflushed {
            return Err(AuditError::StoreBacklog { records: queue.unflushed() });
        }
        Ok(())
    }

    /// Takes a record (unsealed: it gets its `seq` when its segment is cut), waking the writer
    /// once a full segment waits. Refused as [`admit`](Self::admit) says.
    pub(super) fn push(&self, record: AuditRecord, fail_closed: bool) -> Result<(), AuditError> {
        self.admit(fail_closed)?;
        let mut queue = self.shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.waiting.push_back(record);
        if queue.waiting.len() >= self.shared.segment_records {
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    /// Writes every waiting record now, in segments of at most `segment_records`; the first
    /// time, reads the folder's last segment to continue its chain.
    pub(super) async fn flush(&self) -> Result<(), AuditError> {
        self.shared.write_waiting(Take::All).await
    }

    /// Records taken but not yet in the store.
    pub(super) fn unflushed(&self) -> usize {
        self.shared.queue.lock().unwrap_or_else(PoisonError::into_inner).unflushed()
    }
}

/// Which waiting records a write takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Take {
    /// Full segments only (woken by a full one): segments stay `segment_records` long.
    FullSegments,
    /// Everything (the interval, a flush): the last segment may be shorter.
    All,
}

/// The writer task: writes full segments when woken, everything waiting every `interval`
/// (every [`RETRY_INTERVAL`] while the store fails), until the log is dropped.
async fn write_periodically(shared: Weak<Shared>, wake: Arc<Notify>, interval: Duration) {
    let mut pause = interval;
    loop {
        let take = tokio::select! {
            _ = wake.notified() => Take::FullSegments,
            _ = tokio::time::sleep(pause) => Take::All,
        };
        let Some(shared) = shared.upgrade() else { return };
        pause = match shared.write_waiting(take).await {
            Ok(()) => interval,
            Err(_) => RETRY_INTERVAL.min(interval),
        };
    }
}

impl Shared {
    /// Writes the waiting records `take` says (see [`StoreSink::flush`]), retrying a segment
    /// that failed before first. A failure is kept in the queue (for [`StoreSink::admit`]) and
    /// logged, naming the segment by its first `seq`.
    async fn write_waiting(&self, take: Take) -> Result<(), AuditError> {
        let mut writer = self.writer.lock().await;
        loop {
            if writer.unwritten.is_none() {
                let head = match writer.head.clone() {
                    Some(head) => head,
                    None => {
                        let head = writer.read_head().await.map_err(|e| self.failed(e, None))?;
                        writer.head = Some(head.clone());
                        head
                    }
                };
                let records: Vec<AuditRecord> = {
                    let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                    let waiting = queue.waiting.len();
                    let n = if take == Take::FullSegments && waiting < self.segment_records {
                        0
                    } else {
                        waiting.min(self.segment_records)
                    };
                    queue.in_flight += n;
                    queue.waiting.drain(..n).collect()
                };
                if records.is_empty() {
                    return Ok(());
                }
                writer.unwritten = Some(seal(&head, records));
            }
            let Some(segment) = writer.unwritten.take() else { continue };
            match writer.put(&segment).await {
                Ok(()) => {
                    writer.head = Some(segment.next.clone());
                    let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                    queue.in_flight -= segment.records;
                    if queue.failure.take().is_some() {
                        info!(first_seq = segment.first_seq, "audit store writable again");
                    }
                }
                Err(e) => {
                    let first_seq = segment.first_seq;
                    writer.unwritten = Some(segment);
                    return Err(self.failed(e, Some(first_seq)));
                }
            }
        }
    }

    /// Notes a failed write (so `deny` refuses records) and logs it once per change of reason.
    fn failed(&self, error: AuditError, first_seq: Option<u64>) -> AuditError {
        let reason = error.to_string();
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if queue.failure.as_deref() != Some(reason.as_str()) {
            warn!(first_seq, unflushed = queue.unflushed(), error = %reason, "audit segment not written; retrying");
        }
        queue.failure = Some(reason);
        error
    }
}

impl SegmentWriter {
    /// Where the folder's chain stands: after the last line of its last segment, or at the
    /// start when it holds none.
    async fn read_head(&self) -> Result<ChainHead, AuditError> {
        let objects = self.stores.list(&self.folder).await.map_err(|e| store_error(&e, &self.folder, "list"))?;
        let last = objects
            .into_iter()
            .filter(|uri| uri.parent() == self.folder)
            .filter_map(|uri| segment_first_seq(&uri.file_name()).map(|seq| (seq, uri)))
            .max_by_key(|(seq, _)| *seq);
        let Some((first_seq, uri)) = last else {
            return Ok(ChainHead::genesis());
        };
        let bytes = self.stores.get(&uri).await.map_err(|e| store_error(&e, &uri, "read"))?;
        let chain_err = |problem| AuditError::StoreChain { first_seq, problem };
        let body = bytes.strip_suffix(b"\n").ok_or_else(|| chain_err(Problem::Truncated))?;
        let last_line = body.rsplit(|&b| b == b'\n').next().unwrap_or(body);
        ChainHead::after(last_line).map_err(chain_err)
    }

    /// Writes `segment` once: created if absent. A retry that finds its own bytes already
    /// there (the first try reached the store, its answer did not) counts as written.
    async fn put(&self, segment: &Segment) -> Result<(), AuditError> {
        let uri = self.folder.join(&segment_name(segment.first_seq));
        match self.stores.put_new(&uri, segment.bytes.clone().into()).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                let existing = self.stores.get(&uri).await.map_err(|e| store_error(&e, &uri, "read"))?;
                if existing == segment.bytes {
                    Ok(())
                } else {
                    Err(AuditError::StoreConflict { first_seq: segment.first_seq })
                }
            }
            Err(e) => Err(store_error(&e, &uri, "write")),
        }
    }
}

/// Seals `records` after `head` into one segment.
fn seal(head: &ChainHead, records: Vec<AuditRecord>) -> Segment {
    let first_seq = head.next_seq;
    let count = records.len();
    let mut next = head.clone();
    let mut bytes = Vec::new();
    for record in records {
        let sealed = next.seal(record);
        bytes.extend_from_slice(sealed.line.as_bytes());
        bytes.push(b'\n');
        next = sealed.next;
    }
    Segment { first_seq, records: count, bytes, next }
}

/// A store error without the location it names, in any of the forms the store's message
/// may quote it (the URI; the local path; the bucket and key of a request URL), so the
/// operator's bucket and prefix stay out of logs and refusals.
fn store_error(error: &CoreError, uri: &StoreUri, operation: &'static str) -> AuditError {
    let forms = match uri {
        StoreUri::File(path) => vec![uri.to_string(), path.display().to_string()],
        StoreUri::S3 { bucket, key } => vec![uri.to_string(), format!("{bucket}/{key}"), key.clone()],
    };
    let reason = forms
        .iter()
        .filter(|form| !form.is_empty())
        .fold(error.to_string(), |reason, form| reason.replace(form.as_str(), "<audit store>"));
    AuditError::Store { operation, reason }
}

/// `name` as one path component: `/` and `\` would open folders, `..` climb out of them.
fn path_component(name: &str) -> String {
    let cleaned: String = name.chars().map(|c| if matches!(c, '/' | '\\') { '_' } else { c }).collect();
    if cleaned.is_empty() || cleaned.chars().all(|c| c == '.') { "_".into() } else { cleaned }
}
