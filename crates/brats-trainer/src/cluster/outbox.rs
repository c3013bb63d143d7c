//! How the workers of a cluster job report to the service: through the store, because an
//! engine's nodes share nothing else with the trainer (a Slurm output file sits on the nodes'
//! filesystem, a pod's stdout in the cluster's logs).
//!
//! ```text
//! <outbox>/lines/<first line:012>.jsonl   rank 0's protocol lines (WorkerLine JSON, one per line)
//! <outbox>/nodes/<node rank:04>.json      a node launcher's failure: which rank died and how
//! ```
//!
//! The outbox is `jobs/<id>/cluster/<attempt>/`, one per submission, so a resubmitted job never
//! reads its previous attempt's lines. Lines are kept in segments like the job's event log
//! (object stores have no append): only the live segment is rewritten, and it is sealed once it
//! passes [`SEGMENT_BYTES`]. Rank 0 writes at once after every line that matters and batches
//! step lines ([`STEP_FLUSH`]); the service polls.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use brats_core::CoreError;
use brats_core::store::{StoreUri, Stores};
use brats_train::events::{EventKind, WorkerLine};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::sync::lock;

/// Environment variable that tells a worker (rank 0) and its node launcher where the outbox is.
pub const OUTBOX_ENV: &str = "BRATS_WORKER_OUTBOX";
/// A segment is sealed once it holds this many bytes.
pub const SEGMENT_BYTES: usize = 64 * 1024;
/// Step lines wait at most this long for the next write.
pub const STEP_FLUSH: Duration = Duration::from_secs(2);

/// A node launcher's report that one of its workers failed (`nodes/<node>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFailure {
    /// The node's rank in the job.
    pub node: usize,
    /// The host it ran on.
    pub host: String,
    /// What happened, naming the rank (e.g. "worker rank 3 (node 1, local rank 1) … killed by SIGKILL").
    pub failure: String,
    /// The gRPC code name the failure maps to.
    pub code: String,
    /// When the node saw it, Unix ms: the earliest failure is the cause, later ones (peers
    /// whose collectives broke) its consequences.
    #[serde(default)]
    pub time_ms: i64,
}

struct Live {
    /// Global index of the live segment's first line.
    first: usize,
    /// Lines in the live segment.
    count: usize,
    body: Vec<u8>,
    /// The live segment changed since it was last written.
    dirty: bool,
    last_write: Instant,
}

/// Rank 0's side: appends protocol lines and writes them to the store.
pub struct OutboxWriter {
    stores: std::sync::Arc<Stores>,
    dir: StoreUri,
    runtime: tokio::runtime::Handle,
    live: Mutex<Live>,
}

impl OutboxWriter {
    /// A writer into `dir` (an empty outbox: one per submission).
    pub fn new(stores: std::sync::Arc<Stores>, dir: StoreUri, runtime: tokio::runtime::Handle) -> Self {
        let live = Live { first: 0, count: 0, body: Vec::new(), dirty: false, last_write: Instant::now() };
        OutboxWriter { stores, dir, runtime, live: Mutex::new(live) }
    }

    /// Appends a line; writes the live segment unless it is a step line and the last write is
    /// recent. Call from outside the runtime (the training loop).
    pub fn push(&self, line: &WorkerLine) -> Result<(), CoreError> {
        let mut live = lock(&self.live);
        let mut text = serde_json::to_string(line).expect("worker lines serialise");
        text.push('\n');
        live.body.extend_from_slice(text.as_bytes());
        live.count += 1;
        live.dirty = true;
        let step = matches!(line, WorkerLine::Event(EventKind::Step(_)));
        if step && live.last_write.elapsed() < STEP_FLUSH {
            return Ok(());
        }
        self.write(&mut live)
    }

    /// Writes what is not written yet (at the end of the run).
    pub fn flush(&self) -> Result<(), CoreError> {
        let mut live = lock(&self.live);
        if live.dirty { self.write(&mut live) } else { Ok(()) }
    }

    fn write(&self, live: &mut Live) -> Result<(), CoreError> {
        let uri = segment_uri(&self.dir, live.first);
        self.runtime.block_on(self.stores.put(&uri, Bytes::from(live.body.clone())))?;
        live.dirty = false;
        live.last_write = Instant::now();
        if live.body.len() >= SEGMENT_BYTES {
            live.first += live.count;
            live.count = 0;
            live.body.clear();
        }
        Ok(())
    }
}

fn segment_uri(dir: &StoreUri, first: usize) -> StoreUri {
    dir.join(&format!("lines/{first:012}.jsonl"))
}

/// Writes a node launcher's failure report (`nodes/<node>.json`).
pub async fn report_node_failure(stores: &Stores, dir: &StoreUri, failure: &NodeFailure) -> Result<(), CoreError> {
    let body = serde_json::to_vec_pretty(failure).expect("node failures serialise");
    stores.put(&dir.join(&format!("nodes/{:04}.json", failure.node)), Bytes::from(body)).await
}

/// The failures nodes reported, earliest first.
pub async fn node_failures(stores: &Stores, dir: &StoreUri) -> Result<Vec<NodeFailure>, CoreError> {
    let mut failures = Vec::new();
    for uri in stores.list(&dir.join("nodes")).await? {
        if let Ok(f) = serde_json::from_slice::<NodeFailure>(&stores.get(&uri).await?) {
            failures.push(f);
        }
    }
    failures.sort_by_key(|f| (f.time_ms, f.node));
    Ok(failures)
}

/// The service's side: the lines not read yet.
pub struct OutboxReader {
    dir: StoreUri,
    /// Global index of the next line to return.
    next: usize,
}

impl OutboxReader {
    /// A reader of `dir` from its first line.
    pub fn new(dir: StoreUri) -> Self {
        OutboxReader { dir, next: 0 }
    }

    /// A reader of `dir` that skips the first `lines` (already applied before a restart).
    pub fn starting_at(dir: StoreUri, lines: usize) -> Self {
        OutboxReader { dir, next: lines }
    }

    /// Lines read so far (where [`OutboxReader::starting_at`] picks up).
    pub fn position(&self) -> usize {
        self.next
    }

    /// Lines written since the last call, in order. A line that does not parse (a newer
    /// worker's) is skipped, as the local launcher skips stdout it cannot read.
    pub async fn poll(&mut self, stores: &Stores) -> Result<Vec<WorkerLine>, CoreError> {
        let mut firsts: Vec<usize> = stores
            .list(&self.dir.join("lines"))
            .await?
            .iter()
            .filter_map(|u| u.file_name().strip_suffix(".jsonl")?.parse().ok())
            .collect();
        firsts.sort_unstable();
        // The segment holding line `next`, and every later one.
        let start = firsts.iter().rposition(|&f| f <= self.next).unwrap_or(0);
        let mut lines = Vec::new();
        for &first in firsts.get(start..).unwrap_or_default() {
            let body = stores.get(&segment_uri(&self.dir, first)).await?;
            for (i, text) in body.split(|&b| b == b'\n').filter(|l| !l.is_empty()).enumerate() {
                if first + i < self.next {
                    continue;
                }
                self.next = first + i + 1;
                if let Ok(line) = serde_json::from_slice::<WorkerLine>(text) {
                    lines.push(line);
                }
            }
        }
        Ok(lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn lines_arrive_once_in_order_across_sealed_segments() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let stores = Arc::new(Stores::new(Default::default()));
        let outbox = StoreUri::parse(&dir.path().display().to_string()).unwrap();
        let writer = OutboxWriter::new(stores.clone(), outbox.clone(), rt.handle().clone());
        let mut reader = OutboxReader::new(outbox.clone());
        let mut seen = Vec::new();
        // ~180 bytes per line: several sealed segments.
        for i in 0..1200 {
            writer.push(&WorkerLine::Event(EventKind::info(format!("{i:0>150}")))).unwrap();
            if i % 97 == 0 {
                seen.extend(rt.block_on(reader.poll(&stores)).unwrap());
            }
        }
        writer.flush().unwrap();
        seen.extend(rt.block_on(reader.poll(&stores)).unwrap());
        assert!(rt.block_on(reader.poll(&stores)).unwrap().is_empty(), "nothing is read twice");
        let texts: Vec<String> = seen
            .iter()
            .map(|l| match l {
                WorkerLine::Event(EventKind::Log { message, .. }) => message.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(texts, (0..1200).map(|i| format!("{i:0>150}")).collect::<Vec<_>>());
        let segments = std::fs::read_dir(dir.path().join("lines")).unwrap().count();
        assert!(segments >= 3, "{segments} segments");

        let failure = NodeFailure {
            node: 1,
            host: "n2".into(),
            failure: "worker rank 3 died".into(),
            code: "ABORTED".into(),
            time_ms: 2,
        };
        let consequence =
            NodeFailure { node: 0, failure: "worker rank 0 exited with code 1".into(), time_ms: 9, ..failure.clone() };
        rt.block_on(report_node_failure(&stores, &outbox, &consequence)).unwrap();
        rt.block_on(report_node_failure(&stores, &outbox, &failure)).unwrap();
        assert_eq!(
            rt.block_on(node_failures(&stores, &outbox)).unwrap(),
            vec![failure, consequence],
            "the cause first"
        );
    }
}
