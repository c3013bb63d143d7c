//! Worker processes of a job: one process per device — `<exe> worker --job-uri … --manifest-uri …`
//! for a service job, `<exe> train …` for the ranks of an offline multi-device `train` — with
//! torchrun's rendezvous variables, their protocol lines collected from rank 0's stdout, a short
//! tail of every rank's stderr kept for failure reasons, and the whole group taken down when one
//! rank fails (its peers would otherwise wait out the c10d timeout in their next collective).
//!
//! Workers die with their parent: `PR_SET_PDEATHSIG` (SIGKILL) is set in the child before `exec`.
//! That signal follows the *thread* that forked, not the process, so every worker is forked by
//! one long-lived launcher thread rather than by a runtime thread that may be retired. Each
//! worker gets its own process group, so a Ctrl-C aimed at the parent's terminal reaches only
//! the parent, which then stops its workers at a step boundary (closing their stdin, or for the
//! offline command forwarding the signal).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::sync::lock;

use brats_train::events::WorkerLine;
use brats_train::spec::Device;

/// Exit code of a worker that stopped because its stdin closed (a cancel).
pub const EXIT_CANCELLED: i32 = 3;
/// Lines of each rank's stderr kept for the failure reason.
const STDERR_TAIL: usize = 20;
/// Longest stderr line kept (characters).
const MAX_LINE: usize = 1000;

/// What to launch.
#[derive(Clone)]
pub struct LaunchSpec {
    /// The worker executable.
    pub exe: PathBuf,
    /// The job (for logs).
    pub job_id: String,
    /// The command line of every rank (after the executable); the rank is in the environment.
    pub args: Vec<OsString>,
    /// One worker per device, rank = position.
    pub devices: Vec<Device>,
    /// Extra environment of every rank. May hold credentials (the service's store settings),
    /// so it is never logged.
    pub env: Vec<(String, String)>,
    /// What becomes of the ranks' stdout and stderr.
    pub output: WorkerOutput,
    /// This node's place in a multi-node job; `None`: the only node, the rendezvous on a free
    /// loopback port.
    pub rendezvous: Option<Rendezvous>,
}

/// Where a node's workers meet the other nodes' (`brats-trainer node`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    /// Rank 0's host.
    pub master_addr: String,
    /// The rendezvous port there.
    pub master_port: u16,
    /// This node's index.
    pub node_rank: usize,
    /// Nodes in the job (each starts as many workers as this one).
    pub nnodes: usize,
}

/// Where the ranks' output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerOutput {
    /// Read by the launcher: rank 0's protocol lines arrive on the channel [`launch`] returns,
    /// every rank's stderr tail goes into its [`RankStatus`] (service workers).
    Captured,
    /// Shared with the parent, so a user sees the ranks' progress (the offline command); no
    /// protocol lines, no stderr tails.
    Inherited,
}

impl LaunchSpec {
    /// The ranks of a service job: `<exe> worker --job-uri JOB --manifest-uri MANIFEST`, the
    /// store settings in `BRATS_TRAINER_STORE`, output captured.
    pub fn service_worker(
        exe: PathBuf,
        job_id: &str,
        job_uri: &str,
        manifest_uri: &str,
        devices: Vec<Device>,
        store_json: String,
    ) -> LaunchSpec {
        LaunchSpec {
            exe,
            job_id: job_id.to_string(),
            args: ["worker", "--job-uri", job_uri, "--manifest-uri", manifest_uri].map(OsString::from).to_vec(),
            devices,
            env: vec![(crate::cluster::STORE_ENV.to_string(), store_json)],
            output: WorkerOutput::Captured,
            rendezvous: None,
        }
    }
}

impl std::fmt::Debug for LaunchSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaunchSpec")
            .field("exe", &self.exe)
            .field("job_id", &self.job_id)
            .field("args", &self.args)
            .field("devices", &self.devices)
            .field("output", &self.output)
            .field("rendezvous", &self.rendezvous)
            .finish_non_exhaustive()
    }
}

/// Why workers could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The executable could not be started.
    #[error("cannot start worker rank {rank} ({exe}): {source}; check worker_exe in the trainer's configuration")]
    Spawn {
        /// The rank.
        rank: usize,
        /// The executable.
        exe: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// No loopback port could be reserved for the rendezvous.
    #[error("no free loopback port for the workers' rendezvous: {0}")]
    Port(std::io::Error),
    /// The launcher thread is gone (a bug).
    #[error("the worker launcher thread is not running")]
    Launcher,
}

/// How a rank ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankExit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

/// One rank's end.
#[derive(Debug, Clone)]
pub struct RankStatus {
    /// The rank (global in a multi-node job).
    pub rank: usize,
    /// In a multi-node job: this node's index and the rank's local rank on it.
    pub node: Option<(usize, usize)>,
    /// Its process id.
    pub pid: u32,
    /// How it ended.
    pub exit: RankExit,
    /// The last lines of its stderr (ANSI colours removed).
    pub stderr_tail: Vec<String>,
}

impl RankStatus {
    /// True unless it exited 0 or [`EXIT_CANCELLED`].
    pub fn failed(&self) -> bool {
        !matches!(self.exit, RankExit::Code(0) | RankExit::Code(EXIT_CANCELLED))
    }

    /// A sentence for `Job.failure_reason`: the rank, pid, exit and the last stderr lines.
    pub fn describe(&self) -> String {
        let how = match self.exit {
            RankExit::Code(c) => format!("exited with code {c}"),
            RankExit::Signal(s) => format!("was killed by signal {s}{}", signal_name(s)),
        };
        let tail: Vec<&str> = self
            .stderr_tail
            .iter()
            .rev()
            .filter(|l| !l.trim().is_empty() && !is_routine_log(l))
            .take(3)
            .map(|s| s.trim())
            .collect();
        let place = self.node.map(|(node, local)| format!(" on node {node} (local rank {local})")).unwrap_or_default();
        let mut s = format!("worker rank {}{place} (pid {}) {how}", self.rank, self.pid);
        if !tail.is_empty() {
            let lines: Vec<&str> = tail.into_iter().rev().collect();
            s.push_str(": ");
            s.push_str(&lines.join(" | "));
        }
        s
    }

    /// The gRPC code name that fits the failure: out-of-memory is RESOURCE_EXHAUSTED, an
    /// unreachable store UNAVAILABLE (the worker's exit code says so), a signal ABORTED,
    /// anything else INTERNAL.
    pub fn failure_code(&self) -> &'static str {
        let oom = self.stderr_tail.iter().any(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("out of memory") || l.contains("cannot allocate memory")
        });
        match self.exit {
            _ if oom => "RESOURCE_EXHAUSTED",
            RankExit::Code(c) if c == i32::from(brats_train::train::EXIT_UNAVAILABLE) => "UNAVAILABLE",
            RankExit::Signal(_) => "ABORTED",
            _ => "INTERNAL",
        }
    }
}

/// True for a worker's own tracing record below WARN ("2026-…Z  INFO target: …"): routine
/// progress that would crowd the error out of a failure reason.
fn is_routine_log(line: &str) -> bool {
    let mut words = line.split_whitespace();
    let stamped = words.next().is_some_and(|w| w.starts_with(|c: char| c.is_ascii_digit()) && w.ends_with('Z'));
    stamped && words.next().is_some_and(|level| matches!(level, "TRACE" | "DEBUG" | "INFO"))
}

fn signal_name(s: i32) -> &'static str {
    match s {
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGTERM => " (SIGTERM)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGABRT => " (SIGABRT)",
        libc::SIGBUS => " (SIGBUS)",
        libc::SIGINT => " (SIGINT)",
        _ => "",
    }
}

/// How the whole group ended.
#[derive(Debug, Clone)]
pub struct GroupOutcome {
    /// Every rank, by rank.
    pub ranks: Vec<RankStatus>,
    /// The position in `ranks` of the rank that failed first (the others may then have been
    /// killed), if any.
    pub first_failure: Option<usize>,
}

impl GroupOutcome {
    /// The first failure, if any.
    pub fn failure(&self) -> Option<&RankStatus> {
        self.first_failure.and_then(|r| self.ranks.get(r))
    }

    /// True when every rank exited with `code`.
    pub fn all_exited_with(&self, code: i32) -> bool {
        self.ranks.iter().all(|r| r.exit == RankExit::Code(code))
    }
}

struct RankHandle {
    pid: u32,
    exited: AtomicBool,
}

/// A running group of workers.
pub struct WorkerGroup {
    ranks: Arc<Vec<RankHandle>>,
    stdins: Arc<Mutex<Vec<Option<ChildStdin>>>>,
    done: tokio::task::JoinHandle<GroupOutcome>,
}

impl WorkerGroup {
    /// Process ids, by rank.
    pub fn pids(&self) -> Vec<u32> {
        self.ranks.iter().map(|r| r.pid).collect()
    }

    /// Closes every rank's stdin: the workers stop at the next step boundary and exit with
    /// [`EXIT_CANCELLED`].
    pub fn close_stdin(&self) {
        let mut stdins = lock(&self.stdins);
        for s in stdins.iter_mut() {
            drop(s.take());
        }
    }

    /// SIGKILLs every rank that has not exited.
    pub fn kill(&self) {
        kill_all(&self.ranks);
    }

    /// Sends `signal` to every rank that has not exited (the offline `train` forwards its
    /// SIGINT/SIGTERM this way: its ranks lead their own process groups, so a terminal's
    /// Ctrl-C reaches only the parent).
    pub fn signal(&self, signal: i32) {
        for r in self.ranks.iter() {
            if !r.exited.load(Ordering::SeqCst) && r.pid > 0 {
                // SAFETY: kill(2) on a child we started and have not reaped.
                unsafe {
                    libc::kill(r.pid as i32, signal);
                }
            }
        }
    }

    /// Resolves when every rank has exited and all their output has been read.
    pub fn done(&mut self) -> &mut tokio::task::JoinHandle<GroupOutcome> {
        &mut self.done
    }
}

impl Drop for WorkerGroup {
    fn drop(&mut self) {
        // Nothing may outlive its group: a dropped group means its job is no longer watched.
        if !self.done.is_finished() {
            self.close_stdin();
            self.kill();
        }
    }
}

fn kill_all(ranks: &[RankHandle]) {
    for r in ranks {
        if !r.exited.load(Ordering::SeqCst) && r.pid > 0 {
            // The whole process group (the worker leads its own): anything the worker started
            // would otherwise keep its pipes open. SAFETY: kill(2) on a group we created and
            // whose leader we have not reaped.
            unsafe {
                libc::kill(-(r.pid as i32), libc::SIGKILL);
            }
        }
    }
}

type SpawnRequest = (Box<Command>, tokio::runtime::Handle, oneshot::Sender<std::io::Result<Child>>);

/// The thread every worker is forked from (see the module docs for why one thread).
fn launcher_thread() -> &'static Mutex<std::sync::mpsc::Sender<SpawnRequest>> {
    static LAUNCHER: OnceLock<Mutex<std::sync::mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    LAUNCHER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("worker-launcher".into())
            .spawn(move || {
                for (mut cmd, handle, reply) in rx {
                    let _guard = handle.enter();
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawn the worker launcher thread");
        Mutex::new(tx)
    })
}

async fn spawn(cmd: Command) -> Result<std::io::Result<Child>, LaunchError> {
    let (tx, rx) = oneshot::channel();
    lock(launcher_thread())
        .send((Box::new(cmd), tokio::runtime::Handle::current(), tx))
        .map_err(|_| LaunchError::Launcher)?;
    rx.await.map_err(|_| LaunchError::Launcher)
}

/// Starts one worker per device. Rank 0's protocol lines arrive on the returned receiver in
/// order; the channel closes after the last rank's output has been read.
pub async fn launch(spec: &LaunchSpec) -> Result<(WorkerGroup, mpsc::UnboundedReceiver<WorkerLine>), LaunchError> {
    let local_world = spec.devices.len();
    let (master_addr, port, node_rank, nnodes) = match &spec.rendezvous {
        Some(r) => (r.master_addr.clone(), r.master_port, r.node_rank, r.nnodes),
        None => ("127.0.0.1".to_string(), brats_cli::free_port().map_err(LaunchError::Port)?, 0, 1),
    };
    let world = nnodes * local_world;
    let first_rank = node_rank * local_world;
    let parent = std::process::id() as libc::pid_t;
    let mut children = Vec::with_capacity(world);
    for (local_rank, device) in spec.devices.iter().enumerate() {
        let rank = first_rank + local_rank;
        let mut cmd = Command::new(&spec.exe);
        let captured = spec.output == WorkerOutput::Captured;
        let output = || if captured { Stdio::piped() } else { Stdio::inherit() };
        cmd.args(&spec.args)
            .env("MASTER_ADDR", &master_addr)
            .env("MASTER_PORT", port.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", local_world.to_string())
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local_rank.to_string())
            .env("BRATS_TRAINER_DEVICE", device.to_string())
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(output())
            .stderr(output())
            .kill_on_drop(true)
            .process_group(0);
        // SAFETY: the closure runs between fork and exec, in a copy of a multi-threaded process
        // where another thread may have held the allocator's lock at the fork: it calls only
        // async-signal-safe functions (prctl, getppid, errno via `last_os_error`) and allocates
        // nothing (`from_raw_os_error` builds the error without a heap allocation).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died between fork and prctl: do not start an orphan. (The child's
                // error is reported as the spawn's OS error: ESRCH, "no such process".)
                if libc::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        match spawn(cmd).await? {
            Ok(child) => children.push(child),
            Err(source) => {
                for mut c in children {
                    let _ = c.start_kill();
                }
                return Err(LaunchError::Spawn { rank, exe: spec.exe.display().to_string(), source });
            }
        }
    }

    let ranks: Arc<Vec<RankHandle>> = Arc::new(
        children.iter().map(|c| RankHandle { pid: c.id().unwrap_or(0), exited: AtomicBool::new(false) }).collect(),
    );
    let (tx, rx) = mpsc::unbounded_channel();
    let mut stdins = Vec::with_capacity(world);
    let mut readers = Vec::new();
    let mut tails = Vec::new();
    for (rank, child) in children.iter_mut().enumerate() {
        stdins.push(child.stdin.take());
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
        tails.push(tail.clone());
        if let Some(out) = child.stdout.take() {
            let tx = (rank == 0).then(|| tx.clone());
            let job = spec.job_id.clone();
            readers.push(tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    match (&tx, WorkerLine::decode(&line)) {
                        (Some(tx), Some(parsed)) => {
                            let _ = tx.send(parsed);
                        }
                        _ => debug!(job_id = %job, rank, line = %truncate(&line), "worker stdout"),
                    }
                }
            }));
        }
        if let Some(err) = child.stderr.take() {
            let job = spec.job_id.clone();
            readers.push(tokio::spawn(async move {
                let mut lines = BufReader::new(err).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let clean = truncate(&strip_ansi(&line));
                    debug!(job_id = %job, rank, line = %clean, "worker stderr");
                    let mut t = lock(&tail);
                    if t.len() == STDERR_TAIL {
                        t.pop_front();
                    }
                    t.push_back(clean);
                }
            }));
        }
    }
    drop(tx);

    let supervised = ranks.clone();
    let job = spec.job_id.clone();
    let done = tokio::spawn(async move {
        let mut waits: FuturesUnordered<_> = children
            .into_iter()
            .enumerate()
            .map(|(rank, mut child)| async move { (rank, child.wait().await) })
            .collect();
        let mut exits: Vec<Option<RankExit>> = vec![None; supervised.len()];
        let mut first_failure = None;
        while let Some((rank, status)) = waits.next().await {
            supervised[rank].exited.store(true, Ordering::SeqCst);
            let exit = match status {
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    match (s.code(), s.signal()) {
                        (Some(c), _) => RankExit::Code(c),
                        (None, Some(sig)) => RankExit::Signal(sig),
                        (None, None) => RankExit::Code(-1),
                    }
                }
                Err(e) => {
                    warn!(job_id = %job, rank, error = %e, "cannot wait for a worker");
                    RankExit::Code(-1)
                }
            };
            exits[rank] = Some(exit);
            let failed = !matches!(exit, RankExit::Code(0) | RankExit::Code(EXIT_CANCELLED));
            if failed && first_failure.is_none() {
                first_failure = Some(rank);
                // One rank down stalls the others in their next collective: take them down now.
                kill_all(&supervised);
            }
        }
        // The output of the exited ranks is complete once their pipes close; something that
        // escaped the process group could hold a pipe open, so do not wait on it forever.
        let drained = futures::future::join_all(readers);
        if tokio::time::timeout(std::time::Duration::from_secs(10), drained).await.is_err() {
            warn!(job_id = %job, "a worker's output pipe stayed open after it exited; not waiting for it");
        }
        let ranks = exits
            .into_iter()
            .enumerate()
            .map(|(local, exit)| RankStatus {
                rank: first_rank + local,
                node: (nnodes > 1).then_some((node_rank, local)),
                pid: supervised[local].pid,
                exit: exit.unwrap_or(RankExit::Code(-1)),
                stderr_tail: lock(&tails[local]).iter().cloned().collect(),
            })
            .collect();
        GroupOutcome { ranks, first_failure }
    });
    Ok((WorkerGroup { ranks, stdins: Arc::new(Mutex::new(stdins)), done }, rx))
}

fn truncate(s: &str) -> String {
    if s.chars().count() <= MAX_LINE { s.to_string() } else { s.chars().take(MAX_LINE).collect::<String>() + "…" }
}

/// Removes ANSI escape sequences (colours from a worker's log formatter).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use brats_train::events::EventKind;

    fn script(dir: &std::path::Path, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("worker.sh");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn spec(exe: PathBuf, devices: Vec<Device>) -> LaunchSpec {
        LaunchSpec::service_worker(exe, "t", "file:///tmp/jobs/t/", "file:///tmp/m.json", devices, "{}".into())
    }

    #[tokio::test]
    async fn protocol_lines_arrive_and_closing_stdin_cancels() {
        let dir = tempfile::tempdir().unwrap();
        let line = WorkerLine::Event(EventKind::info("hello")).encode();
        let exe = script(
            dir.path(),
            &format!(
                "echo 'noise'\necho '{line}'\necho \"rank $RANK of $WORLD_SIZE on $BRATS_TRAINER_DEVICE $1 $2\" >&2\ncat >/dev/null\nexit 3"
            ),
        );
        let (mut group, mut rx) = launch(&spec(exe, vec![Device::Cpu])).await.unwrap();
        assert_eq!(rx.recv().await, Some(WorkerLine::Event(EventKind::info("hello"))));
        group.close_stdin();
        let outcome = group.done().await.unwrap();
        assert!(outcome.all_exited_with(EXIT_CANCELLED), "{outcome:?}");
        assert!(outcome.failure().is_none());
        assert_eq!(outcome.ranks[0].stderr_tail, vec!["rank 0 of 1 on cpu worker --job-uri"]);
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn one_failing_rank_takes_the_group_down_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let exe = script(
            dir.path(),
            "if [ \"$RANK\" = 1 ]; then echo '\u{1b}[31mERROR\u{1b}[0m CUDA out of memory' >&2; exit 7; fi\nsleep 30",
        );
        let (mut group, _rx) = launch(&spec(exe, vec![Device::Cuda(0), Device::Cuda(1)])).await.unwrap();
        let t = std::time::Instant::now();
        let outcome = group.done().await.unwrap();
        assert!(t.elapsed().as_secs() < 10, "rank 0 was not killed");
        let f = outcome.failure().unwrap();
        assert_eq!((f.rank, f.exit), (1, RankExit::Code(7)));
        assert!(f.describe().ends_with("exited with code 7: ERROR CUDA out of memory"), "{}", f.describe());
        assert_eq!(f.failure_code(), "RESOURCE_EXHAUSTED");
        assert_eq!(outcome.ranks[0].exit, RankExit::Signal(libc::SIGKILL));
        assert!(outcome.ranks[0].describe().contains("was killed by signal 9 (SIGKILL)"));
    }

    #[test]
    fn a_failure_reason_keeps_errors_and_drops_routine_log_lines() {
        let rank = |tail: &[&str], exit| RankStatus {
            node: None,
            rank: 0,
            pid: 42,
            exit,
            stderr_tail: tail.iter().map(|s| s.to_string()).collect(),
        };
        let info = "2026-11-27T13:16:50.208484Z  INFO brats_trainer::cli: dataset opened cache=stream";
        let warn = "2026-11-27T13:16:50.300000Z  WARN brats_train::train: slow step";
        let killed = rank(&[info, info], RankExit::Signal(libc::SIGKILL));
        assert_eq!(killed.describe(), "worker rank 0 (pid 42) was killed by signal 9 (SIGKILL)");
        let failed = rank(&[info, warn, "Error: reading cases/x.safetensors: not found", info], RankExit::Code(1));
        assert_eq!(
            failed.describe(),
            format!(
                "worker rank 0 (pid 42) exited with code 1: {warn} | Error: reading cases/x.safetensors: not found"
            )
        );
    }

    #[tokio::test]
    async fn a_missing_executable_is_a_spawn_error() {
        let e = launch(&spec("/nonexistent/worker".into(), vec![Device::Cpu])).await.err().unwrap();
        assert!(e.to_string().contains("cannot start worker rank 0"), "{e}");
    }
}
