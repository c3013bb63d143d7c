//! A job's event log: [`EventLog`] in memory while the job is active, and the JSON-lines
//! segments ([`EventSegment`], [`StoredEvents`]) it is stored in.

use std::time::{Duration, Instant};

use brats_core::store::StoreUri;
use bytes::Bytes;

use brats_train::events::{EventKind, JobEvent, StepMetrics};

use super::{EVENT_SEGMENT_BYTES, JobStoreError, Result};

/// A job's events in memory while it is active, with what has reached the store.
#[derive(Debug)]
pub struct EventLog {
    events: Vec<JobEvent>,
    persisted: usize,
    /// Events in sealed segments (a prefix of `events`), never written again.
    sealed: usize,
    /// Encoded size of the live segment (`events[sealed..]`).
    live_bytes: usize,
    last_flush: Instant,
    last_step_kept: Option<Instant>,
}

/// One stored segment of a job's event log: the first sequence it holds and its JSON lines.
#[derive(Debug, Clone, PartialEq)]
pub struct EventSegment {
    /// Sequence number of its first event (its object name).
    pub first_sequence: u64,
    /// The events as JSON lines.
    pub body: Bytes,
}

/// A job's stored event log: its events, and how many of them are in sealed segments.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StoredEvents {
    /// Every stored event, in sequence order.
    pub events: Vec<JobEvent>,
    /// The events before the last (live) segment.
    pub sealed: usize,
}

/// Step events kept (numbered, streamed, stored) at most this often; a watcher sees a few per
/// second, and the event log of a long job stays proportionate.
const STEP_EVENT_INTERVAL: Duration = Duration::from_millis(500);
/// Pending step events are written at most this often (more rarely as the log grows, so
/// rewriting it stays a small fraction of the store's bandwidth).
const MIN_STEP_FLUSH_INTERVAL: Duration = Duration::from_millis(500);

impl EventLog {
    /// A log holding a job's stored events (all of them persisted), the first `sealed` of them
    /// in sealed segments.
    pub fn new(stored: StoredEvents) -> Self {
        let StoredEvents { events, sealed } = stored;
        let sealed = sealed.min(events.len());
        let live_bytes = events[sealed..].iter().map(encoded_len).sum();
        EventLog {
            persisted: events.len(),
            events,
            sealed,
            live_bytes,
            last_flush: Instant::now(),
            last_step_kept: None,
        }
    }

    /// An empty log, for a new job.
    pub fn empty() -> Self {
        EventLog::new(StoredEvents::default())
    }

    /// The sequence number the next event gets.
    pub fn next_sequence(&self) -> u64 {
        self.events.last().map(|e| e.sequence + 1).unwrap_or(0)
    }

    /// Numbers and appends an event (not yet persisted).
    pub fn push(&mut self, job_id: &str, kind: EventKind, time_ms: i64) -> JobEvent {
        let event = JobEvent { sequence: self.next_sequence(), job_id: job_id.to_string(), time_ms, kind };
        self.live_bytes += encoded_len(&event);
        self.events.push(event.clone());
        event
    }

    /// Whether a step event should be kept: at most one per [`STEP_EVENT_INTERVAL`], and always
    /// the last step of an epoch.
    pub fn keep_step(&mut self, step: &StepMetrics, now: Instant) -> bool {
        let due = self.last_step_kept.is_none_or(|t| now.duration_since(t) >= STEP_EVENT_INTERVAL);
        if due || step.step >= step.steps_per_epoch {
            self.last_step_kept = Some(now);
            return true;
        }
        false
    }

    /// Events with sequence >= `from`, in order.
    pub fn events_from(&self, from: u64) -> Vec<JobEvent> {
        let start = self.events.partition_point(|e| e.sequence < from);
        self.events[start..].to_vec()
    }

    /// Drops the events from position `len` on (an event whose write failed is undone).
    pub fn truncate(&mut self, len: usize) {
        let len = len.max(self.sealed);
        let removed: usize = self.events.iter().skip(len).map(encoded_len).sum();
        self.live_bytes = self.live_bytes.saturating_sub(removed);
        self.events.truncate(len);
        self.persisted = self.persisted.min(len);
    }

    /// Whether some events have not reached the store.
    pub fn pending(&self) -> bool {
        self.persisted < self.events.len()
    }

    /// Whether pending (step) events are due to be written.
    pub fn flush_due(&self, now: Instant) -> bool {
        // At most about 2 MB/s of rewriting, whatever the segment size.
        let interval = MIN_STEP_FLUSH_INTERVAL.max(Duration::from_secs_f64(self.live_bytes as f64 / 2e6));
        self.pending() && now.duration_since(self.last_flush) >= interval
    }

    /// The live segment as it should be stored now (None when the log is empty or every event
    /// is in a sealed segment).
    pub fn live_segment(&self) -> Option<EventSegment> {
        let live = &self.events[self.sealed..];
        Some(EventSegment { first_sequence: live.first()?.sequence, body: encode_events(live) })
    }

    /// Records that the live segment, as [`EventLog::live_segment`] returned it when the log held
    /// `count` events, is stored; seals it when it is full.
    pub fn mark_persisted(&mut self, count: usize, now: Instant) {
        self.persisted = self.persisted.max(count.min(self.events.len()));
        self.last_flush = now;
        if self.persisted == self.events.len() && self.live_bytes >= EVENT_SEGMENT_BYTES {
            self.sealed = self.events.len();
            self.live_bytes = 0;
        }
    }

    /// Events in sealed segments.
    pub fn sealed(&self) -> usize {
        self.sealed
    }

    /// Number of events held.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether the log holds no event.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

fn encoded_len(event: &JobEvent) -> usize {
    serde_json::to_string(event).map(|s| s.len() + 1).unwrap_or(0)
}

/// Events as JSON lines.
pub fn encode_events(events: &[JobEvent]) -> Bytes {
    let mut out = Vec::with_capacity(events.len() * 200);
    for e in events {
        serde_json::to_writer(&mut out, e).expect("events serialise");
        out.push(b'\n');
    }
    Bytes::from(out)
}

/// Parses JSON lines of events; a bad line is [`JobStoreError::Corrupt`] naming `uri` and the line.
pub(super) fn parse_events(bytes: &[u8], uri: &StoreUri) -> Result<Vec<JobEvent>> {
    let mut events = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let event: JobEvent = serde_json::from_slice(line)
            .map_err(|e| JobStoreError::Corrupt { uri: uri.to_string(), message: format!("line {}: {e}", i + 1) })?;
        events.push(event);
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_events_are_thinned_and_the_log_pages() {
        let mut log = EventLog::empty();
        let t0 = Instant::now();
        let step = |s: u32| StepMetrics {
            epoch: 1,
            step: s,
            steps_per_epoch: 10,
            global_step: s as u64,
            loss: 1.0,
            learning_rate: 1e-4,
            samples_per_second: 1.0,
            eta_seconds: 1.0,
        };
        assert!(log.keep_step(&step(1), t0));
        assert!(!log.keep_step(&step(2), t0 + Duration::from_millis(100)));
        assert!(log.keep_step(&step(10), t0 + Duration::from_millis(200)), "an epoch's last step is kept");
        assert!(log.keep_step(&step(3), t0 + Duration::from_millis(800)));
        for i in 0..5 {
            log.push("j", EventKind::info(format!("m{i}")), 0);
        }
        assert_eq!(log.next_sequence(), 5);
        assert_eq!(log.events_from(3).iter().map(|e| e.sequence).collect::<Vec<_>>(), vec![3, 4]);
        assert!(log.events_from(9).is_empty());
        assert!(log.pending());
        log.mark_persisted(5, Instant::now());
        assert!(!log.pending());
    }
}
