//! Which QUEUED jobs start now: a pure device allocator (no I/O, no async, no clock), so its
//! rules are unit-tested here and the service only applies its decisions.
//!
//! The rules: jobs are considered oldest first (queued time, then creation time, then id). A
//! job starts when every device it asks for is free — a CUDA device not held by a running job,
//! a CPU slot among `cpu_slots` — and not reserved by an older job that is waiting. A job that
//! does not fit reserves its devices, so a younger job may only take devices nobody older waits
//! for: a big job is never starved by a stream of small ones (and it is not skipped either,
//! which would be the price of backfilling). A job that asks for a CUDA device this host does
//! not have can never start; it is reported as such and reserves nothing.

use std::collections::HashSet;

use brats_train::spec::Device;

/// Devices held by running jobs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct DeviceUse {
    /// CUDA devices in use (one job each).
    pub(crate) cuda: HashSet<usize>,
    /// CPU jobs running (at most `cpu_slots`).
    pub(crate) cpu_jobs: usize,
}

impl DeviceUse {
    /// Marks `devices` as held by a job that starts.
    pub(crate) fn claim(&mut self, devices: &[Device]) {
        for d in devices {
            match d {
                Device::Cpu => self.cpu_jobs += 1,
                Device::Cuda(i) => {
                    self.cuda.insert(*i);
                }
            }
        }
    }

    /// Frees `devices` of a job that ended.
    pub(crate) fn release(&mut self, devices: &[Device]) {
        for d in devices {
            match d {
                Device::Cpu => self.cpu_jobs = self.cpu_jobs.saturating_sub(1),
                Device::Cuda(i) => {
                    self.cuda.remove(i);
                }
            }
        }
    }
}

/// What the host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Capacity {
    /// CUDA devices on the host (`cuda:0 … cuda:N-1`).
    pub(crate) cuda_devices: usize,
    /// CPU jobs that may run at once.
    pub(crate) cpu_slots: usize,
}

/// A QUEUED job as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueuedJob {
    /// The job id (also the last tie-breaker of the order).
    pub(crate) id: String,
    /// When it was (last) queued, ms since the epoch.
    pub(crate) queued_ms: i64,
    /// When it was created, ms since the epoch.
    pub(crate) created_ms: i64,
    /// The devices it needs, all at once.
    pub(crate) devices: Vec<Device>,
}

/// The scheduler's decision for one round.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Jobs to start now, in order; their devices are free and not reserved by older jobs.
    pub(crate) start: Vec<String>,
    /// Jobs that ask for a CUDA device the host does not have: they can never start.
    pub(crate) impossible: Vec<String>,
}

/// Decides which of `queued` start, given the devices `used` by running jobs.
pub(crate) fn plan(capacity: Capacity, used: &DeviceUse, queued: &[QueuedJob]) -> Plan {
    let mut order: Vec<&QueuedJob> = queued.iter().collect();
    order.sort_by(|a, b| (a.queued_ms, a.created_ms, &a.id).cmp(&(b.queued_ms, b.created_ms, &b.id)));
    // Devices of the jobs started in this round count as used; those of waiting older jobs as
    // reserved.
    let mut taken = used.clone();
    let mut reserved = DeviceUse::default();
    let mut plan = Plan::default();
    for job in order {
        if job.devices.iter().any(|d| matches!(d, Device::Cuda(i) if *i >= capacity.cuda_devices)) {
            plan.impossible.push(job.id.clone());
            continue;
        }
        let fits = job.devices.iter().all(|d| match d {
            Device::Cpu => taken.cpu_jobs + reserved.cpu_jobs < capacity.cpu_slots,
            Device::Cuda(i) => !taken.cuda.contains(i) && !reserved.cuda.contains(i),
        });
        if fits {
            taken.claim(&job.devices);
            plan.start.push(job.id.clone());
        } else {
            reserved.claim(&job.devices);
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, queued_ms: i64, devices: &[Device]) -> QueuedJob {
        QueuedJob { id: id.into(), queued_ms, created_ms: 0, devices: devices.to_vec() }
    }

    const GPUS: Capacity = Capacity { cuda_devices: 2, cpu_slots: 1 };
    const CPU: Device = Device::Cpu;
    const G0: Device = Device::Cuda(0);
    const G1: Device = Device::Cuda(1);

    fn used(cuda: &[usize], cpu_jobs: usize) -> DeviceUse {
        DeviceUse { cuda: cuda.iter().copied().collect(), cpu_jobs }
    }

    #[test]
    fn oldest_first_whatever_the_input_order() {
        let queued = [job("c", 30, &[G0]), job("a", 10, &[G1]), job("b", 20, &[CPU])];
        let p = plan(GPUS, &DeviceUse::default(), &queued);
        assert_eq!(p.start, ["a", "b", "c"]);
        assert!(p.impossible.is_empty());
    }

    #[test]
    fn ties_break_on_creation_then_id() {
        let mut x = job("x", 5, &[G0]);
        x.created_ms = 2;
        let mut y = job("y", 5, &[G0]);
        y.created_ms = 1;
        let z = QueuedJob { id: "a".into(), ..y.clone() };
        // y and a tie on (queued, created): "a" < "y". Only the first gets cuda:0.
        assert_eq!(plan(GPUS, &DeviceUse::default(), &[x, y, z]).start, ["a"]);
    }

    #[test]
    fn cpu_slots_bound_concurrent_cpu_jobs() {
        let queued = [job("a", 1, &[CPU]), job("b", 2, &[CPU]), job("c", 3, &[CPU])];
        let two = Capacity { cuda_devices: 0, cpu_slots: 2 };
        assert_eq!(plan(two, &DeviceUse::default(), &queued).start, ["a", "b"]);
        assert_eq!(plan(two, &used(&[], 1), &queued).start, ["a"]);
        assert!(plan(two, &used(&[], 2), &queued).start.is_empty());
    }

    #[test]
    fn busy_cuda_devices_wait_and_free_ones_start() {
        let queued = [job("a", 1, &[G0]), job("b", 2, &[G1])];
        assert_eq!(plan(GPUS, &used(&[0], 0), &queued).start, ["b"]);
        assert_eq!(plan(GPUS, &used(&[0, 1], 0), &queued).start, Vec::<String>::new());
        assert_eq!(plan(GPUS, &used(&[], 0), &queued).start, ["a", "b"]);
    }

    #[test]
    fn a_waiting_job_reserves_its_devices_against_younger_jobs() {
        // "big" needs both GPUs while cuda:0 is busy: the younger "small" on cuda:1 must not
        // take the device "big" waits for, though it is free.
        let queued = [job("big", 1, &[G0, G1]), job("small", 2, &[G1]), job("cpu", 3, &[CPU])];
        let p = plan(GPUS, &used(&[0], 0), &queued);
        assert_eq!(p.start, ["cpu"], "only devices nobody older waits for are handed out");
        // Once cuda:0 is free, "big" goes first and "small" waits for it.
        assert_eq!(plan(GPUS, &DeviceUse::default(), &queued).start, ["big", "cpu"]);
    }

    #[test]
    fn a_waiting_cpu_job_does_not_hold_back_gpu_jobs() {
        let queued = [job("cpu", 1, &[CPU]), job("gpu", 2, &[G0])];
        assert_eq!(plan(GPUS, &used(&[], 1), &queued).start, ["gpu"]);
    }

    #[test]
    fn a_job_needing_devices_the_host_lacks_never_starts_nor_blocks() {
        let queued = [job("huge", 1, &[G0, G1, Device::Cuda(2)]), job("ok", 2, &[G0])];
        let p = plan(GPUS, &DeviceUse::default(), &queued);
        assert_eq!(p.impossible, ["huge"]);
        assert_eq!(p.start, ["ok"], "an impossible job reserves nothing");
        let cpu_only = Capacity { cuda_devices: 0, cpu_slots: 1 };
        assert_eq!(plan(cpu_only, &DeviceUse::default(), &[job("g", 1, &[G0])]).impossible, ["g"]);
    }

    #[test]
    fn claim_and_release_balance() {
        let mut u = DeviceUse::default();
        u.claim(&[G0, G1]);
        u.claim(&[CPU]);
        assert_eq!(u, used(&[0, 1], 1));
        u.release(&[G1]);
        u.release(&[CPU]);
        u.release(&[CPU]);
        assert_eq!(u, used(&[0], 0), "releasing never underflows");
    }
}
