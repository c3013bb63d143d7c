//! The BraTS trainer service: durable training jobs in the object store and the gRPC service
//! over them (`brats-trainer serve`), which launches one `brats-trainer worker` process per
//! device. The training itself is the `brats-train` library.
//!
//! - [`jobs`]: job records, the event log's segments and the job store;
//! - [`cluster`]: the engines a job can be handed to (Slurm, Kubeflow Trainer on Kubernetes)
//!   and how their workers report through the store;
//! - [`launcher`]: worker processes (one per rank), their lines and exit statuses;
//! - [`node`]: where a node sits in a multi-node job (Kubeflow's `PET_*`, Slurm's `SLURM_*`),
//!   the input of `brats-trainer node`;
//! - [`service`]: the gRPC service (scheduler, runner, registration, handlers, metrics);
//! - [`config`], [`server`]: configuration and the server around the service.
#![warn(missing_docs)]

pub mod cluster;
pub mod config;
pub mod jobs;
pub mod launcher;
pub mod node;
pub mod server;
pub mod service;
mod sync;
