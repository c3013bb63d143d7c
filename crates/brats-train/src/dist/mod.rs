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

mod buckets;
mod env;
mod ffi;
mod group;

use std::fmt;
use std::time::Duration;

use tch::Device;

pub use buckets::{average_gradients, buckets};
pub use env::DistEnv;
pub use group::ProcessGroup;

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

/// The device that collectives on `backend` expect tensors on, for a rank with `local_rank`.
pub fn device_for(backend: Backend, local_rank: usize) -> Device {
    match backend {
        Backend::Gloo => Device::Cpu,
        Backend::Nccl => Device::Cuda(local_rank),
    }
}
