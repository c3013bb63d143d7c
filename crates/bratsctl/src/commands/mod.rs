//! One module per `bratsctl` command, and the little they share.

pub(crate) mod health;
pub(crate) mod models;
pub(crate) mod preprocess;
pub(crate) mod segment;
pub(crate) mod train;
pub(crate) mod watch;

/// A gRPC status as the error a command ends with: `NotFound: no job 'x'`.
pub(crate) fn status_line(s: &tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

/// Sizes as `240, 240, 155`.
pub(crate) fn join(v: &[u32]) -> String {
    v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ")
}
