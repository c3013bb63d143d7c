//! [`ProcessGroup`]: the rendezvous, the c10d group and its collectives.

use std::ffi::{CString, c_int, c_void};
use std::fmt;
use std::net::{TcpStream, ToSocketAddrs};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::buckets::{buckets, flatten, unflatten};
use super::ffi::{self, nccl, shim_call, tensor_ptrs, timeout_ms};
use super::{BUCKET_CAP_BYTES, Backend, DistEnv, DistError, device_for};

/// A c10d process group: this rank's membership in a job and the collectives over it.
///
/// Every rank must call the same collectives, with tensors of the same shapes and kinds, in the
/// same order. Dropping the group tears it down; call [`ProcessGroup::barrier`] first at the end
/// of a job, so that rank 0 (which hosts the store) does not leave while others still need it.
pub struct ProcessGroup {
    group: NonNull<c_void>,
    store: NonNull<c_void>,
    rank: usize,
    world_size: usize,
    backend: Backend,
    device: Device,
    timeout: Duration,
}

// SAFETY: c10d backends and stores are thread-safe objects; the handles are owned uniquely here.
// The type is deliberately not Sync: collectives issued from several threads at once would be
// ordered differently on different ranks.
unsafe impl Send for ProcessGroup {}

impl fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("backend", &self.backend)
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Waits until rank 0's store accepts TCP connections, or `timeout` passes.
///
/// c10d's client retries a refused connection with a growing back-off and can overshoot its
/// deadline by seconds on a loaded host; probing here keeps a missing rank 0 a failure at the
/// timeout, and the store's own connect then succeeds at once.
fn wait_for_master(env: &DistEnv, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut last_error = String::from("no address tried");
    loop {
        let addrs = (env.master_addr.as_str(), env.master_port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve MASTER_ADDR={}: {e}", env.master_addr))?;
        for addr in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match TcpStream::connect_timeout(&addr, left.min(Duration::from_millis(250))) {
                Ok(_) => return Ok(()),
                Err(e) => last_error = format!("{addr}: {e}"),
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no store answered within {}ms (last attempt: {last_error})", timeout.as_millis()));
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

impl ProcessGroup {
    /// Meets the other ranks at `env`'s store and builds the process group.
    ///
    /// Fails with [`DistError::Rendezvous`] when not every rank has arrived within `timeout`,
    /// which also bounds every later collective.
    pub fn init(env: &DistEnv, backend: Backend, timeout: Duration) -> Result<ProcessGroup, DistError> {
        env.validate()?;
        let world = c_int::try_from(env.world_size).map_err(|_| DistError::Env {
            var: "WORLD_SIZE",
            value: env.world_size.to_string(),
            reason: "too large".into(),
        })?;
        // Loaded before the rendezvous, so a process that cannot run NCCL fails at once.
        let nccl_new = match backend {
            Backend::Gloo => None,
            Backend::Nccl => Some(nccl::constructor().map_err(|reason| DistError::Unsupported { backend, reason })?),
        };
        let rendezvous = |message: String| DistError::Rendezvous {
            rank: env.rank,
            world_size: env.world_size,
            master_addr: env.master_addr.clone(),
            master_port: env.master_port,
            timeout,
            message,
        };
        let host = CString::new(env.master_addr.as_str()).expect("validate() rejects NUL bytes");
        let started = Instant::now();
        if !env.is_master() {
            wait_for_master(env, timeout).map_err(rendezvous)?;
        }
        let ms = timeout_ms(timeout.saturating_sub(started.elapsed()).max(Duration::from_millis(1)));
        // SAFETY: `host` outlives the call; the shim copies it.
        let (store, err) = shim_call(|err| unsafe {
            ffi::brats_dist_store_new(host.as_ptr(), env.master_port, world, c_int::from(env.is_master()), ms, err)
        });
        let store = NonNull::new(store).ok_or_else(|| rendezvous(err.unwrap_or_default()))?;
        let rank = env.rank as c_int;
        // SAFETY: `store` is a live handle from brats_dist_store_new; `nccl_new` has the same
        // signature as brats_dist_gloo_new (checked through the shims' ABI version).
        let (group, err) = shim_call(|err| unsafe {
            match nccl_new {
                None => ffi::brats_dist_gloo_new(store.as_ptr(), rank, world, ms, err),
                Some(new) => new(store.as_ptr(), rank, world, ms, err),
            }
        });
        let Some(group) = NonNull::new(group) else {
            // SAFETY: nothing else holds the store yet.
            unsafe { ffi::brats_dist_store_free(store.as_ptr()) };
            return Err(rendezvous(err.unwrap_or_default()));
        };
        let device = device_for(backend, env.local_rank);
        Ok(ProcessGroup { group, store, rank: env.rank, world_size: env.world_size, backend, device, timeout })
    }

    /// This process's rank in the group.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks in the group.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The backend the group runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The device whose tensors this group's collectives take (CPU for Gloo, `cuda:LOCAL_RANK`
    /// for NCCL).
    pub fn device(&self) -> Device {
        self.device
    }

    /// The bound on every collective, as given to [`ProcessGroup::init`].
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn collective_error(&self, op: &'static str, message: String) -> DistError {
        DistError::Collective { op, rank: self.rank, world_size: self.world_size, timeout: self.timeout, message }
    }

    /// Sums `tensors` (contiguous, same device) across ranks in place, all in flight at once.
    fn all_reduce_sum_raw(&self, tensors: &[Tensor]) -> Result<(), DistError> {
        let ptrs = tensor_ptrs(tensors);
        // SAFETY: the pointers are tch tensors borrowed for the duration of the call; the shim
        // waits for every collective before it returns.
        let (rc, err) = shim_call(|err| unsafe {
            ffi::brats_dist_allreduce_sum(self.group.as_ptr(), ptrs.as_ptr(), ptrs.len(), err)
        });
        if rc != 0 {
            return Err(self.collective_error("all_reduce", err.unwrap_or_default()));
        }
        Ok(())
    }

    fn broadcast_raw(&self, tensors: &[Tensor], root: usize) -> Result<(), DistError> {
        let ptrs = tensor_ptrs(tensors);
        // SAFETY: as in all_reduce_sum_raw.
        let (rc, err) = shim_call(|err| unsafe {
            ffi::brats_dist_broadcast(self.group.as_ptr(), ptrs.as_ptr(), ptrs.len(), root as c_int, err)
        });
        if rc != 0 {
            return Err(self.collective_error("broadcast", err.unwrap_or_default()));
        }
        Ok(())
    }

    /// Replaces each tensor, in place, by its mean over all ranks.
    ///
    /// Like DDP, the tensors are flattened into contiguous buckets of up to
    /// [`BUCKET_CAP_BYTES`] (one per run of equal kind and device, see [`buckets`]), each bucket
    /// is all-reduced once, and the results are copied back. Floating-point kinds only.
    pub fn all_reduce_mean(&self, tensors: &[Tensor]) -> Result<(), DistError> {
        for (i, t) in tensors.iter().enumerate() {
            check_defined("all_reduce_mean", i, t)?;
            if !t.is_floating_point() {
                return Err(DistError::InvalidArgument {
                    op: "all_reduce_mean",
                    reason: format!("tensor {i} has kind {:?}; a mean needs a floating-point kind", t.kind()),
                });
            }
        }
        if self.world_size == 1 || tensors.is_empty() {
            return Ok(());
        }
        let world = self.world_size as f64;
        tch::no_grad(|| {
            let plan = buckets(tensors, BUCKET_CAP_BYTES);
            let flats = plan.iter().map(|r| flatten(&tensors[r.clone()])).collect::<Result<Vec<_>, _>>()?;
            // Half-precision sums of many ranks can overflow, so those are scaled first (as DDP
            // does); wider kinds are scaled after the sum, which rounds once instead of twice.
            let pre_divide = |k: Kind| matches!(k, Kind::Half | Kind::BFloat16);
            for f in &flats {
                if pre_divide(f.kind()) {
                    let _ = f.shallow_clone().f_div_scalar_(world)?;
                }
            }
            self.all_reduce_sum_raw(&flats)?;
            for (range, flat) in plan.iter().zip(&flats) {
                if !pre_divide(flat.kind()) {
                    let _ = flat.shallow_clone().f_div_scalar_(world)?;
                }
                unflatten(flat, &tensors[range.clone()])?;
            }
            Ok(())
        })
    }

    /// Sums `values` across ranks in place (metric numerators and denominators, sample counts).
    pub fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<(), DistError> {
        if self.world_size == 1 || values.is_empty() {
            return Ok(());
        }
        let t = Tensor::f_from_slice(values)?.f_to_device(self.device)?;
        self.all_reduce_sum_raw(std::slice::from_ref(&t))?;
        t.f_to_device(Device::Cpu)?.f_copy_data(values, values.len())?;
        Ok(())
    }

    /// Overwrites `tensors` on every rank with rank `root`'s, in place.
    ///
    /// Used once at start-up so all replicas begin from rank 0's weights (DDP's module-state
    /// sync). Bucketed as [`ProcessGroup::all_reduce_mean`]; any kind.
    pub fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<(), DistError> {
        if root >= self.world_size {
            return Err(DistError::InvalidArgument {
                op: "broadcast",
                reason: format!("root {root} is not a rank of a group of {}", self.world_size),
            });
        }
        for (i, t) in tensors.iter().enumerate() {
            check_defined("broadcast", i, t)?;
        }
        if self.world_size == 1 || tensors.is_empty() {
            return Ok(());
        }
        tch::no_grad(|| {
            let plan = buckets(tensors, BUCKET_CAP_BYTES);
            let flats = plan.iter().map(|r| flatten(&tensors[r.clone()])).collect::<Result<Vec<_>, _>>()?;
            self.broadcast_raw(&flats, root)?;
            if self.rank != root {
                for (range, flat) in plan.iter().zip(&flats) {
                    unflatten(flat, &tensors[range.clone()])?;
                }
            }
            Ok(())
        })
    }

    /// Blocks until every rank has reached the barrier (or fails after the timeout).
    pub fn barrier(&self) -> Result<(), DistError> {
        // SAFETY: `group` is live for `self`'s lifetime.
        let (rc, err) = shim_call(|err| unsafe { ffi::brats_dist_barrier(self.group.as_ptr(), err) });
        if rc != 0 {
            return Err(self.collective_error("barrier", err.unwrap_or_default()));
        }
        Ok(())
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: both handles are live and owned by `self`; the group holds its own reference to
        // the store, so the order only decides which goes first.
        unsafe {
            ffi::brats_dist_group_free(self.group.as_ptr());
            ffi::brats_dist_store_free(self.store.as_ptr());
        }
    }
}

fn check_defined(op: &'static str, i: usize, t: &Tensor) -> Result<(), DistError> {
    if t.defined() {
        Ok(())
    } else {
        Err(DistError::InvalidArgument { op, reason: format!("tensor {i} is undefined") })
    }
}
