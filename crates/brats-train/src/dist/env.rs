//! torchrun's variables: where this process sits in a multi-process job.

use super::{DistError, ENV_VARS};

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
    /// `LOCAL_RANK` defaults to 0, as torch.distributed's own default: launchers that start one
    /// process per node without setting it (Kubeflow's PyTorchJob, Volcano) give rank 3 of a
    /// four-node job its node's only GPU, not GPU 3. The others are required once `WORLD_SIZE`
    /// is set.
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
            None => 0,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(var, _)| *var == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn local_rank_defaults_to_zero_not_to_rank() {
        // One process per node (Kubeflow PyTorchJob): rank 3 of 4 must use its node's GPU 0.
        let env = DistEnv::from_lookup(lookup(&[
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            env,
            DistEnv { master_addr: "node0".into(), master_port: 29500, world_size: 4, rank: 3, local_rank: 0 }
        );
    }
}
