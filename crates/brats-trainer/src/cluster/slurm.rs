//! Slurm: a job becomes one `sbatch` job of N nodes with one task per node, whose task is the
//! node launcher (`srun brats-trainer node -- worker …`); the launcher reads `SLURM_NODEID`,
//! `SLURM_NNODES` and the node list, and starts the node's workers. The trainer submits with
//! `sbatch --parsable` (the script on stdin), follows with `scontrol show job -o`, falling
//! back to `sacct` once the controller has forgotten the job, and cancels with `scancel`.
//!
//! Credentials never enter the script: `sbatch` passes its own environment to the job
//! (`--export=ALL`, Slurm's default), and the trainer sets the secret variables there only.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::{BackendKind, ClusterBackend, ClusterError, EngineStatus, Phase, SubmitRequest, node_command, shell_quote};
use crate::config::SlurmConfig;

/// The Slurm backend of `[cluster.slurm]`.
#[derive(Debug, Clone)]
pub struct Slurm {
    config: SlurmConfig,
}

impl Slurm {
    /// The backend of a configuration.
    pub fn new(config: SlurmConfig) -> Self {
        Slurm { config }
    }

    /// The job's rendezvous port: spread over 1000 ports by job id so that jobs whose first
    /// node is the same do not collide.
    fn master_port(&self, job_id: &str) -> u16 {
        let hash = super::job_hash(job_id);
        self.config.master_port.saturating_add((hash % 1000) as u16)
    }
}

async fn run(program: &str, args: &[&str]) -> Result<String, ClusterError> {
    let out =
        Command::new(program).args(args).stdin(Stdio::null()).output().await.map_err(|e| ClusterError::Command {
            command: program.into(),
            message: format!("{e}; is Slurm installed on the trainer's host?"),
        })?;
    if !out.status.success() {
        let message = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(ClusterError::Command { command: format!("{program} {}", args.join(" ")), message });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Our reading of a Slurm job state (`scontrol`'s JobState, `sacct`'s State).
fn phase_of(state: &str) -> Phase {
    match state.split_whitespace().next().unwrap_or("") {
        "PENDING" | "CONFIGURING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "RESV_DEL_HOLD" => Phase::Pending,
        "RUNNING" | "COMPLETING" | "SUSPENDED" | "STAGE_OUT" | "SIGNALING" | "RESIZING" => Phase::Running,
        "COMPLETED" => Phase::Succeeded,
        _ => Phase::Ended,
    }
}

/// Parses `scontrol show job -o ID`: one line of `Key=Value` fields.
pub fn parse_scontrol(line: &str) -> Option<EngineStatus> {
    let field =
        |key: &str| line.split_whitespace().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')).map(str::to_string);
    let state = field("JobState")?;
    Some(EngineStatus {
        phase: phase_of(&state),
        state,
        reason: field("Reason").unwrap_or_default(),
        exit_code: field("ExitCode").unwrap_or_default(),
    })
}

/// Parses `sacct -X -n -P -o State,ExitCode,Reason`: `STATE|code:signal|reason`.
pub fn parse_sacct(text: &str) -> Option<EngineStatus> {
    let line = text.lines().find(|l| !l.trim().is_empty())?;
    let mut parts = line.split('|');
    // "CANCELLED by 0" → CANCELLED.
    let state = parts.next()?.split_whitespace().next()?.to_string();
    Some(EngineStatus {
        phase: phase_of(&state),
        state,
        exit_code: parts.next().unwrap_or("").to_string(),
        reason: parts.next().unwrap_or("").to_string(),
    })
}

impl ClusterBackend for Slurm {
    fn kind(&self) -> BackendKind {
        BackendKind::Slurm
    }

    fn max_nodes(&self) -> u32 {
        self.config.max_nodes
    }

    fn poll_interval(&self) -> Duration {
        Duration::from_secs(self.config.poll_s)
    }

    fn render(&self, r: &SubmitRequest) -> String {
        let c = &self.config;
        let mut s = String::from("#!/bin/bash\n");
        s.push_str(&format!(
            "# brats-trainer job {}: {} node(s) x {} worker(s). The trainer follows it with scontrol\n\
             # and reads its progress from the store ({}).\n",
            r.job_id,
            r.placement.nodes,
            r.placement.nproc_per_node(r.cpu),
            r.outbox_uri
        ));
        let mut directive = |d: String| s.push_str(&format!("#SBATCH {d}\n"));
        directive(format!("--job-name=brats-{}", r.job_id));
        directive(format!("--nodes={}", r.placement.nodes));
        directive("--ntasks-per-node=1".into());
        if !r.cpu && r.placement.devices_per_node > 0 {
            directive(format!("--gpus-per-node={}", r.placement.devices_per_node));
        }
        if c.cpus_per_node > 0 {
            directive(format!("--cpus-per-task={}", c.cpus_per_node));
        }
        if !c.mem_per_node.is_empty() {
            directive(format!("--mem={}", c.mem_per_node));
        }
        if !c.time_limit.is_empty() {
            directive(format!("--time={}", c.time_limit));
        }
        if !c.partition.is_empty() {
            directive(format!("--partition={}", c.partition));
        }
        if !c.account.is_empty() {
            directive(format!("--account={}", c.account));
        }
        if !c.workdir.is_empty() {
            directive(format!("--chdir={}", c.workdir));
        }
        directive(format!("--output=brats-{}-%j.out", r.job_id));
        // The trainer decides about resubmission (ResumeJob); Slurm must not rerun a job whose
        // checkpoints it does not know about.
        directive("--no-requeue".into());
        for extra in &c.extra_directives {
            directive(extra.clone());
        }
        s.push_str("set -euo pipefail\n");
        s.push_str("# Credentials (the store's) arrive through sbatch's environment, never in this file.\n");
        for (k, v) in &r.env {
            s.push_str(&format!("export {k}={}\n", shell_quote(v)));
        }
        let flags = [
            "--master-port".to_string(),
            self.master_port(&r.job_id).to_string(),
            "--rdzv-timeout-s".into(),
            c.rdzv_timeout_s.to_string(),
        ];
        let argv: Vec<String> = node_command(&c.worker_exe, r, &flags).iter().map(|a| shell_quote(a)).collect();
        // One node launcher per node; --kill-on-bad-exit takes the other nodes down when one
        // fails, as the launcher does with its own workers.
        s.push_str(&format!("srun --ntasks-per-node=1 --kill-on-bad-exit=1 {}\n", argv.join(" ")));
        s
    }

    async fn submit(&self, r: &SubmitRequest) -> Result<String, ClusterError> {
        let script = self.render(r);
        let mut child = Command::new("sbatch")
            .arg("--parsable")
            .envs(r.secret_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| ClusterError::Command {
                command: "sbatch".into(),
                message: format!("{e}; is Slurm installed on the trainer's host?"),
            })?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(|e| ClusterError::Command { command: "sbatch".into(), message: e.to_string() })?;
        drop(stdin);
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| ClusterError::Command { command: "sbatch".into(), message: e.to_string() })?;
        if !out.status.success() {
            return Err(ClusterError::Command {
                command: "sbatch".into(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        // `--parsable`: "ID" or "ID;cluster".
        let text = String::from_utf8_lossy(&out.stdout);
        let id = text.trim().split(';').next().unwrap_or("").to_string();
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ClusterError::Unexpected(format!("sbatch --parsable printed {:?}, not a job id", text.trim())));
        }
        Ok(id)
    }

    async fn status(&self, id: &str) -> Result<EngineStatus, ClusterError> {
        match run("scontrol", &["show", "job", "-o", id]).await {
            Ok(text) => parse_scontrol(&text).ok_or_else(|| {
                ClusterError::Unexpected(format!("scontrol show job {id}: no JobState in {:?}", text.trim()))
            }),
            // The controller forgets a job MinJobAge after it ended; the accounting may know.
            Err(ClusterError::Command { message, .. }) if message.contains("Invalid job id") => {
                match run("sacct", &["-j", id, "-X", "-n", "-P", "-o", "State,ExitCode,Reason"]).await {
                    Ok(text) => Ok(parse_sacct(&text).unwrap_or_else(gone)),
                    Err(_) => Ok(gone()),
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn cancel(&self, id: &str) -> Result<(), ClusterError> {
        // SIGTERM to every task (the node launchers forward it: workers stop at a step
        // boundary and checkpoint), SIGKILL after the cluster's KillWait.
        run("scancel", &[id]).await.map(|_| ())
    }
}

fn gone() -> EngineStatus {
    EngineStatus {
        phase: Phase::Ended,
        state: "UNKNOWN".into(),
        reason: "no longer known to scontrol or sacct".into(),
        exit_code: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scontrol_and_sacct_lines_parse() {
        let line = "JobId=42 JobName=brats-j UserId=root(0) Priority=1 JobState=NODE_FAIL Reason=NodeDown \
                    Dependency=(null) Requeue=0 Restarts=0 BatchFlag=1 ExitCode=0:9 RunTime=00:00:12";
        let s = parse_scontrol(line).unwrap();
        assert_eq!(
            (s.phase, s.state.as_str(), s.reason.as_str(), s.exit_code.as_str()),
            (Phase::Ended, "NODE_FAIL", "NodeDown", "0:9")
        );
        assert_eq!(s.describe("Slurm", "42"), "Slurm job 42 ended NODE_FAIL (reason NodeDown, exit code 0:9)");
        assert_eq!(parse_scontrol("JobId=1 JobState=PENDING Reason=Resources").unwrap().phase, Phase::Pending);
        assert_eq!(parse_scontrol("JobId=1 JobState=COMPLETED ExitCode=0:0").unwrap().phase, Phase::Succeeded);
        assert!(parse_scontrol("slurm_load_jobs error").is_none());
        let s = parse_sacct("CANCELLED by 0|0:15|None\n").unwrap();
        assert_eq!((s.phase, s.state.as_str(), s.exit_code.as_str()), (Phase::Ended, "CANCELLED", "0:15"));
        assert!(parse_sacct("\n").is_none());
    }
}
