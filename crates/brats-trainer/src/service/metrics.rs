//! Prometheus instruments of the trainer service.

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry as PromRegistry};

/// Prometheus instruments of the service.
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: PromRegistry,
    pub(super) requests: IntCounterVec,
    pub(super) jobs: IntGaugeVec,
    pub(super) queue_depth: IntGauge,
    pub(super) workers: IntGauge,
}

impl Metrics {
    /// Creates and registers the instruments.
    pub fn new() -> Self {
        let registry = PromRegistry::new();
        let requests = IntCounterVec::new(
            Opts::new("brats_trainer_requests_total", "RPCs answered, by method and status code"),
            &["method", "code"],
        )
        .unwrap();
        let jobs = IntGaugeVec::new(Opts::new("brats_trainer_jobs", "Jobs known to the trainer, by state"), &["state"])
            .unwrap();
        let queue_depth = IntGauge::new("brats_trainer_queue_depth", "Jobs QUEUED, waiting for devices").unwrap();
        let workers = IntGauge::new("brats_trainer_workers", "Worker processes running now").unwrap();
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(jobs.clone()),
            Box::new(queue_depth.clone()),
            Box::new(workers.clone()),
        ] {
            registry.register(c).unwrap();
        }
        Metrics { registry, requests, jobs, queue_depth, workers }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
