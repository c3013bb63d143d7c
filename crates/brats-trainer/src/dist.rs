//! Multi-process data parallelism over libtorch's c10d, the way PyTorch's DDP does it.
//!
//! Every rank runs the same training loop on its own shard of the data; after `backward()` the
//! gradients are averaged across ranks ([`average_gradients`]) so every replica takes the same
//! optimiser step. The rendezvous takes torchrun's settings ([`DistEnv::from_env`]): rank 0 hosts
//! a c10d `TCPStore` at `MASTER_ADDR:MASTER_PORT`, the other ranks connect to it, and the process
//! group's transport is set up through it.
//!
//! Backends: Gloo (CPU tensors) is compiled in, from `csrc/dist_shim.cpp`. NCCL (CUDA tensors)
//! lives in a separate shared object, `csrc/nccl_shim.cpp`, that is built only where NCCL's and
//! CUDA's headers are installed (`BOOTSTRAP_NCCL=1 scripts/bootstrap.sh`) and loaded only in a
//! process running a CUDA libtorch; anywhere else [`Backend::Nccl`] is
//! [`DistError::Unsupported`].
//!
//! Failure model: every collective is bounded by the timeout given to [`ProcessGroup::init`]. A
//! rank that crashes or stops answering turns the next collective on its peers into a
//! [`DistError::Collective`] within that timeout, never a hang; the group is then unusable and the
//! job should restart from its last checkpoint, as with torch.distributed. That holds as written
//! for Gloo; NCCL's collectives run asynchronously on the GPU, and its timeout is enforced by
//! c10d's watchdog thread, which by default (`TORCH_NCCL_ASYNC_ERROR_HANDLING`) ends the process
//! instead of returning an error, so a launcher sees that rank exit.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::fmt;
use std::net::{TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

/// Size of one gradient bucket, DDP's default `bucket_cap_mb=25`: big enough that per-message
/// latency is amortised, small enough that the flattened copy stays cheap.
pub const BUCKET_CAP_BYTES: usize = 25 * 1024 * 1024;

/// The environment variables torchrun sets, in the order [`DistEnv::from_env`] reads them.
pub const ENV_VARS: [&str; 5] = ["MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK"];

/// Errors from the rendezvous, the process group and its collectives.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A torchrun variable is missing or malformed.
    #[error("{var}={value:?} is invalid: {reason}")]
    Env {
        /// The variable's name.
        var: &'static str,
        /// Its value as found (empty when absent).
        value: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// The ranks did not all meet at `MASTER_ADDR:MASTER_PORT` within the timeout.
    #[error(
        "rank {rank} of WORLD_SIZE={world_size} could not rendezvous at MASTER_ADDR={master_addr} \
         MASTER_PORT={master_port} within {timeout:?}: {message}. Check that all {world_size} ranks were started \
         with the same MASTER_ADDR/MASTER_PORT/WORLD_SIZE, that MASTER_ADDR is rank 0's host, that MASTER_PORT is \
         free there and reachable from the others"
    )]
    Rendezvous {
        /// This process's rank.
        rank: usize,
        /// The expected number of ranks.
        world_size: usize,
        /// Rank 0's host.
        master_addr: String,
        /// The store's port.
        master_port: u16,
        /// How long this rank waited.
        timeout: Duration,
        /// libtorch's message.
        message: String,
    },
    /// The backend cannot run in this process.
    #[error("the {backend} backend is unsupported here: {reason}")]
    Unsupported {
        /// The backend asked for.
        backend: Backend,
        /// Why, and what to use instead.
        reason: String,
    },
    /// A collective failed, typically because a peer died or did not answer within the timeout.
    #[error(
        "{op} failed on rank {rank} of {world_size}: a peer was lost or did not answer within {timeout:?} \
         ({message}). The process group cannot be used any more: stop every rank and resume the job from its \
         last checkpoint"
    )]
    Collective {
        /// The collective (`all_reduce`, `broadcast`, `barrier`).
        op: &'static str,
        /// This process's rank.
        rank: usize,
        /// The group's size.
        world_size: usize,
        /// The group's timeout.
        timeout: Duration,
        /// libtorch's message.
        message: String,
    },
    /// A caller passed tensors or arguments a collective cannot take.
    #[error("{op}: {reason}")]
    InvalidArgument {
        /// The call.
        op: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A tensor operation around a collective failed.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Where this process sits in a multi-process job: torchrun's variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// Host of rank 0, which serves the rendezvous store (`MASTER_ADDR`).
    pub master_addr: String,
    /// Port of the rendezvous store on `master_addr` (`MASTER_PORT`).
    pub master_port: u16,
    /// Number of processes in the job (`WORLD_SIZE`).
    pub world_size: usize,
    /// This process's rank, `0..world_size` (`RANK`).
    pub rank: usize,
    /// This process's index on its node, which picks its GPU (`LOCAL_RANK`).
    pub local_rank: usize,
}

impl DistEnv {
    /// Reads torchrun's variables; `Ok(None)` when `WORLD_SIZE` is unset (a single process).
    pub fn from_env() -> Result<Option<DistEnv>, DistError> {
        Self::from_lookup(|var| std::env::var(var).ok())
    }

    /// As [`DistEnv::from_env`], with the variables looked up by `lookup` (for tests and for
    /// settings that come from a job spec instead of the environment).
    ///
    /// `LOCAL_RANK` defaults to `RANK` (a single-node launch); the others are required once
    /// `WORLD_SIZE` is set.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>, DistError> {
        let Some(world) = lookup("WORLD_SIZE") else { return Ok(None) };
        let required = |var: &'static str| {
            lookup(var).ok_or_else(|| DistError::Env {
                var,
                value: String::new(),
                reason: format!(
                    "unset while WORLD_SIZE={world} is set; launch with torchrun, or set all of {}",
                    ENV_VARS[..4].join(", ")
                ),
            })
        };
        let world_size = parse_env::<usize>("WORLD_SIZE", &world)?;
        let rank = parse_env::<usize>("RANK", &required("RANK")?)?;
        let master_addr = required("MASTER_ADDR")?;
        let master_port = parse_env::<u16>("MASTER_PORT", &required("MASTER_PORT")?)?;
        let local_rank = match lookup("LOCAL_RANK") {
            Some(v) => parse_env::<usize>("LOCAL_RANK", &v)?,
            None => rank,
        };
        let env = DistEnv { master_addr, master_port, world_size, rank, local_rank };
        env.validate()?;
        Ok(Some(env))
    }

    /// Checks the settings against each other (rank within the world, a usable port and host).
    pub fn validate(&self) -> Result<(), DistError> {
        let bad = |var: &'static str, value: String, reason: String| Err(DistError::Env { var, value, reason });
        if self.world_size == 0 {
            return bad("WORLD_SIZE", "0".into(), "must be at least 1".into());
        }
        if self.rank >= self.world_size {
            return bad(
                "RANK",
                self.rank.to_string(),
                format!("must be below WORLD_SIZE={} (ranks count from 0)", self.world_size),
            );
        }
        if self.local_rank >= self.world_size {
            return bad(
                "LOCAL_RANK",
                self.local_rank.to_string(),
                format!("must be below WORLD_SIZE={}", self.world_size),
            );
        }
        if self.master_port == 0 {
            return bad("MASTER_PORT", "0".into(), "must be a fixed port that every rank can reach".into());
        }
        if self.master_addr.trim().is_empty() || self.master_addr.contains('\0') {
            return bad("MASTER_ADDR", self.master_addr.clone(), "must be rank 0's host name or address".into());
        }
        Ok(())
    }

    /// Whether this process is rank 0, which hosts the store and, by convention, writes outputs.
    pub fn is_master(&self) -> bool {
        self.rank == 0
    }
}

fn parse_env<T: std::str::FromStr>(var: &'static str, value: &str) -> Result<T, DistError> {
    value.trim().parse().map_err(|_| DistError::Env {
        var,
        value: value.to_string(),
        reason: format!("expected an unsigned integer{}", if var == "MASTER_PORT" { " below 65536" } else { "" }),
    })
}

/// The collective communication library behind a [`ProcessGroup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Gloo: CPU tensors over TCP.
    Gloo,
    /// NCCL: CUDA tensors, one GPU per rank.
    Nccl,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        })
    }
}

mod ffi {
    use super::*;

    unsafe extern "C" {
        pub fn brats_dist_store_new(
            host: *const c_char,
            port: u16,
            world_size: c_int,
            is_master: c_int,
            timeout_ms: i64,
            err: *mut *mut c_char,
        ) -> *mut c_void;
        pub fn brats_dist_store_free(store: *mut c_void);
        pub fn brats_dist_gloo_new(
            store: *mut c_void,
            rank: c_int,
            world_size: c_int,
            timeout_ms: i64,
            err: *mut *mut c_char,
        ) -> *mut c_void;
        pub fn brats_dist_group_free(group: *mut c_void);
        pub fn brats_dist_allreduce_sum(
            group: *mut c_void,
            tensors: *const *mut C_tensor,
            n: usize,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn brats_dist_broadcast(
            group: *mut c_void,
            tensors: *const *mut C_tensor,
            n: usize,
            root: c_int,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn brats_dist_barrier(group: *mut c_void, err: *mut *mut c_char) -> c_int;
        pub fn brats_dist_abi_version() -> c_int;
        pub fn brats_dist_set_grad(var: *mut C_tensor, grad: *mut C_tensor, err: *mut *mut c_char) -> c_int;
    }
}

/// Runs a shim call and turns its malloc'ed error message into a `String`.
fn shim_call<T>(f: impl FnOnce(*mut *mut c_char) -> T) -> (T, Option<String>) {
    let mut err: *mut c_char = std::ptr::null_mut();
    let out = f(&mut err);
    if err.is_null() {
        return (out, None);
    }
    // SAFETY: the shim sets `err` only to a NUL-terminated buffer from malloc, which we own.
    // The Rust message adds its own sentence after libtorch's, so a final period would double.
    let msg = unsafe { CStr::from_ptr(err) }.to_string_lossy().trim().trim_end_matches('.').to_string();
    unsafe { libc::free(err.cast()) };
    (out, Some(msg))
}

fn tensor_ptrs(tensors: &[Tensor]) -> Vec<*mut C_tensor> {
    tensors.iter().map(|t| t.as_ptr() as *mut C_tensor).collect()
}

fn timeout_ms(timeout: Duration) -> i64 {
    i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX).max(1)
}

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

/// How [`ProcessGroup::all_reduce_mean`] and [`ProcessGroup::broadcast`] group `tensors`: runs of
/// consecutive tensors of one kind and device, cut so that each holds at most `cap_bytes` (a
/// tensor larger than that gets a bucket of its own). Deterministic, so every rank cuts the same
/// buckets from the same list.
pub fn buckets(tensors: &[Tensor], cap_bytes: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, t) in tensors.iter().enumerate() {
        let size = t.numel() * t.kind().elt_size_in_bytes();
        let same = i > start && {
            let first = &tensors[start];
            first.kind() == t.kind() && first.device() == t.device()
        };
        if i > start && (!same || bytes + size > cap_bytes) {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < tensors.len() {
        out.push(start..tensors.len());
    }
    out
}

/// One contiguous tensor holding `tensors`' elements in order. A lone contiguous tensor is used as
/// it is, which spares large gradients a copy.
fn flatten(tensors: &[Tensor]) -> Result<Tensor, DistError> {
    if let [t] = tensors
        && t.is_contiguous()
    {
        return Ok(t.detach());
    }
    let views = tensors.iter().map(|t| t.f_reshape([-1])).collect::<Result<Vec<_>, _>>()?;
    Ok(Tensor::f_cat(&views, 0)?)
}

fn unflatten(flat: &Tensor, tensors: &[Tensor]) -> Result<(), DistError> {
    if let [t] = tensors
        && t.is_contiguous()
        && t.data_ptr() == flat.data_ptr()
    {
        return Ok(());
    }
    let mut offset = 0i64;
    for t in tensors {
        let n = t.numel() as i64;
        let src = flat.f_narrow(0, offset, n)?.f_view_as(t)?;
        t.shallow_clone().f_copy_(&src)?;
        offset += n;
    }
    Ok(())
}

/// Averages the gradients of `vars` across the ranks of `pg`; call it after `backward()` and
/// before the optimiser step.
///
/// Variables that do not require grad are skipped. A variable whose gradient is undefined on this
/// rank (a branch it did not use) counts as a zero gradient, so every rank sends the same buckets;
/// afterwards it holds the averaged gradient like the others, keeping the replicas identical.
pub fn average_gradients(pg: &ProcessGroup, vars: &[Tensor]) -> Result<(), DistError> {
    if pg.world_size() == 1 {
        return Ok(());
    }
    let trainable: Vec<&Tensor> = vars.iter().filter(|v| v.defined() && v.requires_grad()).collect();
    let mut grads = Vec::with_capacity(trainable.len());
    let mut missing = Vec::new();
    for (i, v) in trainable.iter().enumerate() {
        let g = v.grad();
        if g.defined() {
            grads.push(g);
        } else {
            grads.push(tch::no_grad(|| v.f_zeros_like())?);
            missing.push(i);
        }
    }
    pg.all_reduce_mean(&grads)?;
    for i in missing {
        // SAFETY: both are live tch tensors for the duration of the call.
        let (rc, err) = shim_call(|err| unsafe {
            ffi::brats_dist_set_grad(trainable[i].as_ptr() as *mut C_tensor, grads[i].as_ptr() as *mut C_tensor, err)
        });
        if rc != 0 {
            return Err(DistError::InvalidArgument {
                op: "average_gradients",
                reason: format!("setting variable {i}'s gradient: {}", err.unwrap_or_default()),
            });
        }
    }
    Ok(())
}

/// Finding and loading the NCCL shim.
mod nccl {
    use super::*;
    use std::path::PathBuf;
    use std::sync::OnceLock;

    /// `brats_dist_nccl_new`, with the signature of `brats_dist_gloo_new`.
    pub type Constructor = unsafe extern "C" fn(*mut c_void, c_int, c_int, i64, *mut *mut c_char) -> *mut c_void;

    /// The shim's constructor, loading the shim on first use; the reason it cannot be had otherwise.
    pub fn constructor() -> Result<Constructor, String> {
        static LOADED: OnceLock<Result<usize, String>> = OnceLock::new();
        let addr = LOADED.get_or_init(load).clone()?;
        // SAFETY: `addr` is the address of brats_dist_nccl_new, whose ABI version matched ours.
        Ok(unsafe { std::mem::transmute::<usize, Constructor>(addr) })
    }

    fn dlerror() -> String {
        // SAFETY: dlerror returns NULL or a NUL-terminated string owned by libc.
        let e = unsafe { libc::dlerror() };
        if e.is_null() { "unknown dlopen error".into() } else { unsafe { CStr::from_ptr(e) }.to_string_lossy().into() }
    }

    /// Where the shim may be: `BRATS_NCCL_SHIM`, beside the executable (deployments copy it
    /// there), then where this build made it.
    fn candidates() -> Vec<PathBuf> {
        let mut out = Vec::new();
        if let Some(p) = std::env::var_os("BRATS_NCCL_SHIM") {
            out.push(PathBuf::from(p));
        }
        if let Some(dir) = std::env::current_exe().ok().as_deref().and_then(|e| e.parent()) {
            out.push(dir.join("libbrats_nccl_shim.so"));
        }
        if let Some(built) = option_env!("BRATS_NCCL_SHIM_BUILT") {
            out.push(PathBuf::from(built));
        }
        out
    }

    fn load() -> Result<usize, String> {
        let cuda = CString::new("libtorch_cuda.so").expect("no NUL");
        // SAFETY: RTLD_NOLOAD only looks at objects already loaded. Re-opening libtorch_cuda.so
        // with RTLD_GLOBAL makes its symbols visible to the shim even where it was first loaded
        // RTLD_LOCAL; the handle is kept for the life of the process.
        let h = unsafe { libc::dlopen(cuda.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL | libc::RTLD_NOLOAD) };
        if h.is_null() {
            return Err("NCCL needs a CUDA build of libtorch (libtorch_cuda.so), and this process loaded a CPU-only \
                 libtorch; use Backend::Gloo on CPU, or point LIBTORCH at a CUDA libtorch and rebuild"
                .into());
        }
        let Some(path) = candidates().into_iter().find(|p| p.exists()) else {
            return Err("this brats-trainer was built without the NCCL shim (libbrats_nccl_shim.so): run \
                 BOOTSTRAP_NCCL=1 scripts/bootstrap.sh and rebuild, or set BRATS_NCCL_SHIM to the shim's path; \
                 Backend::Gloo works meanwhile"
                .into());
        };
        let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
        // SAFETY: the object is built from csrc/nccl_shim.cpp against this libtorch's headers;
        // loading it runs only those headers' static initialisers.
        let lib = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if lib.is_null() {
            return Err(format!("loading the NCCL shim {}: {}", path.display(), dlerror()));
        }
        let sym = |name: &str| {
            let c = CString::new(name).expect("no NUL");
            // SAFETY: `lib` is a live handle.
            let p = unsafe { libc::dlsym(lib, c.as_ptr()) };
            if p.is_null() { Err(format!("{} lacks {name}: {}", path.display(), dlerror())) } else { Ok(p) }
        };
        let version = sym("brats_dist_nccl_abi_version")?;
        // SAFETY: the symbol is `int brats_dist_nccl_abi_version(void)`.
        let theirs = unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> c_int>(version)() };
        // SAFETY: a plain function of the linked-in shim.
        let ours = unsafe { ffi::brats_dist_abi_version() };
        if theirs != ours {
            return Err(format!(
                "the NCCL shim {} was built from other sources (ABI {theirs}, this binary {ours}); rebuild it",
                path.display()
            ));
        }
        Ok(sym("brats_dist_nccl_new")? as usize)
    }
}

/// The device that collectives on `backend` expect tensors on, for a rank with `local_rank`.
pub fn device_for(backend: Backend, local_rank: usize) -> Device {
    match backend {
        Backend::Gloo => Device::Cpu,
        Backend::Nccl => Device::Cuda(local_rank),
    }
}
