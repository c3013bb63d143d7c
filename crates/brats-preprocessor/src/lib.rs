//! The `brats.v1.Preprocessor` gRPC service over the `brats-preprocess` library, and the
//! `brats-preprocess` binary (offline `run` and `synth`, and `serve`).
//!
//! - [`service`]: the RPCs: requests parsed into the library's typed options once, the
//!   library's errors mapped to statuses naming the field, slots, metrics.
//! - [`server`]: the service in the shared gRPC shell (health, reflection, metrics endpoint,
//!   graceful shutdown); [`config`] its configuration.

pub mod config;
pub mod server;
pub mod service;
