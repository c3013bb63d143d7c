//! The command-line vocabulary shared by the platform's binaries (in the style of ripgrep's
//! `grep-cli`): a flag means the same thing in every command that takes it.
//!
//! - [`JobSpecArgs`]: every training flag, defined once, flattened into `brats-trainer train`
//!   and `bratsctl train start`, and turned into a `brats.v1.JobSpec` by
//!   [`JobSpecArgs::to_spec`];
//! - [`parse_xyz`] (`X,Y,Z` sizes), [`parse_devices`] (`cpu`, `cuda:0,cuda:1` or `0,1`),
//!   [`to_uri`] (paths made absolute `file://` URIs);
//! - [`error_line`] / [`exit_with`]: an error and its causes as one `error:` line;
//! - [`free_port`]: a free loopback port for services started by the demo and the tests;
//! - [`ClientSecurity`]: TLS, client certificate and credentials of every client (`--ca`,
//!   `--cert`, `--key`, `--token-file`, `--api-key-file`), connecting as [`AuthChannel`];
//! - [`audit_chain`]: the audit log's record format and hash chain, written by the services and
//!   checked by `bratsctl audit verify`;
//! - [`api_key`]: API keys minted by `bratsctl` and the demo, hashed into the services' keys file;
//! - [`secret_file`]: the one rule on who may read a file holding a secret.
#![deny(missing_docs)]

pub mod api_key;
pub mod audit_chain;
mod client;
mod job_spec;
mod parse;
mod report;
pub mod secret_file;

pub use client::{AuthChannel, ClientError, ClientSecurity, Credentials};
pub use job_spec::{CaseCacheArg, JobSpecArgs, LrScheduleArg, SpecError};
pub use parse::{DeviceError, UriError, XyzError, parse_devices, parse_xyz, to_uri};
pub use report::{error_line, exit_with, free_port};
