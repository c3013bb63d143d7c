//! The gateway's Prometheus metrics, served on `[server] metrics_listen` beside the gRPC port:
//! associations and instances at the SCP, jobs by outcome and their duration. Labels are fixed
//! words (outcomes, states), never UIDs or AE titles, so no study can be traced through them.

use crate::jobs::{JobRecord, JobState};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

/// What the SCP counts.
#[derive(Debug, Clone)]
pub struct ScpCounters {
    /// Associations accepted.
    pub associations: IntCounter,
    /// Associations rejected (AE title, limit, TLS handshake).
    pub rejected: IntCounter,
    /// Associations aborted by the peer or a network error (their instances dropped).
    pub aborted: IntCounter,
    /// MR instances stored.
    pub stored: IntCounter,
    /// Instances of other classes acknowledged and dropped.
    pub ignored: IntCounter,
    /// Stores refused (watermark, write failure, unreadable data set).
    pub refused: IntCounter,
}

/// Every metric of the gateway, registered in [`Metrics::registry`].
#[derive(Debug, Clone)]
pub struct Metrics {
    /// The registry `/metrics` serves.
    pub registry: Registry,
    /// The SCP's counters.
    pub scp: ScpCounters,
    jobs: IntCounterVec,
    job_seconds: Histogram,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let associations = IntCounterVec::new(
            Opts::new("brats_gateway_associations_total", "DIMSE associations by outcome"),
            &["outcome"],
        )
        .expect("valid metric");
        let instances =
            IntCounterVec::new(Opts::new("brats_gateway_instances_total", "C-STORE requests by outcome"), &["outcome"])
                .expect("valid metric");
        let jobs = IntCounterVec::new(Opts::new("brats_gateway_jobs_total", "Study jobs by final state"), &["state"])
            .expect("valid metric");
        let job_seconds = Histogram::with_opts(
            HistogramOpts::new("brats_gateway_job_seconds", "Seconds from selection to the job's final state")
                .buckets(vec![1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0]),
        )
        .expect("valid metric");
        for c in [&associations, &instances, &jobs] {
            registry.register(Box::new(c.clone())).expect("registered once");
        }
        registry.register(Box::new(job_seconds.clone())).expect("registered once");
        let scp = ScpCounters {
            associations: associations.with_label_values(&["accepted"]),
            rejected: associations.with_label_values(&["rejected"]),
            aborted: associations.with_label_values(&["aborted"]),
            stored: instances.with_label_values(&["stored"]),
            ignored: instances.with_label_values(&["ignored"]),
            refused: instances.with_label_values(&["refused"]),
        };
        Metrics { registry, scp, jobs, job_seconds }
    }

    /// Counts a job that reached a final state.
    pub fn finished(&self, record: &JobRecord) {
        let state = match record.state {
            JobState::Done => "done",
            JobState::Rejected => "rejected",
            JobState::Failed => "failed",
            _ => return,
        };
        self.jobs.with_label_values(&[state]).inc();
        if let Some((_, total)) = record.timings.iter().find(|(s, _)| s == "total") {
            self.job_seconds.observe(*total);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
