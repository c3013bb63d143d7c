//! The command-line vocabulary shared by the platform's binaries (in the style of ripgrep's
//! `grep-cli`): a flag means the same thing in every command that takes it.
//!
//! - [`JobSpecArgs`]: every training flag, defined once, flattened into `brats-trainer train`
//!   and `bratsctl train start`, and turned into a `brats.v1.JobSpec` by
//!   [`JobSpecArgs::to_spec`];
//! - [`parse_xyz`] (`X,Y,Z` sizes), [`parse_devices`] (`cpu`, `cuda:0,cuda:1` or `0,1`),
//!   [`to_uri`] (paths made absolute `file://` URIs);
//! - [`error_line`] / [`exit_with`]: an error and its causes as one `error:` line;
//! - [`free_port`]: a free loopback port for services started by the demo and the tests.
#![deny(missing_docs)]

mod job_spec;
mod parse;
mod report;

pub use job_spec::{CaseCacheArg, JobSpecArgs, LrScheduleArg, SpecError};
pub use parse::{DeviceError, UriError, XyzError, parse_devices, parse_xyz, to_uri};
pub use report::{error_line, exit_with, free_port};
