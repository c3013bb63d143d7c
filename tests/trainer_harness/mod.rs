//! Harness of the trainer end-to-end tests (`trainer_service.rs`, `trainer_jobs.rs`): the real
//! `brats-trainer serve` process ([`Trainer`], secured by the harness as every service is),
//! tiny dataset and spec builders, and helpers that poll and watch jobs through the RPC API or
//! read their stored event logs.
// Shared by two test crates, each using a subset.
#![allow(dead_code)]

use crate::common::secured::{ServiceKind, Setup, assert_audit_chain_verifies, setup};
use crate::common::*;
use brats_cli::{AuthChannel, ClientSecurity};
use brats_proto::v1 as pb;
use brats_proto::v1::trainer_client::TrainerClient;
use brats_service::ServerConfig;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The `brats-trainer` binary: `BRATS_TEST_TRAINER_EXE`, else built by [`workspace_exe`].
pub(crate) fn trainer_exe() -> PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| match std::env::var("BRATS_TEST_TRAINER_EXE") {
        Ok(p) => PathBuf::from(p),
        Err(_) => workspace_exe("brats-trainer", "brats-trainer"),
    })
    .clone()
}

/// A `brats-trainer serve` process on loopback; SIGKILLed when dropped.
pub(crate) struct Trainer {
    child: Child,
    pub(crate) url: String,
    pub(crate) metrics_port: u16,
    /// The security it runs with; the harness's clients connect as its admin.
    pub(crate) security: Arc<Setup>,
    /// Its audit file (`[server.audit] file`), checked when it stops.
    audit_log: PathBuf,
    log: PathBuf,
}

impl Drop for Trainer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::env::var_os("BRATS_TEST_SHOW_LOGS").is_some() {
            eprintln!("--- {}\n{}", self.log.display(), self.log_text());
        }
    }
}

impl Trainer {
    /// Starts the service on `store` (a folder) with `worker` as its worker executable (None:
    /// the trainer's own binary, the production default), and waits until it reports SERVING.
    pub(crate) async fn start(dir: &Path, store: &Path, worker: Option<&Path>, extra: &str) -> Trainer {
        Trainer::start_on(dir, &file_uri(store), &file_uri(&store.join("models")), worker, extra).await
    }

    /// [`Trainer::start`] on any store and registry root, secured by a fresh [`Setup`].
    pub(crate) async fn start_on(
        dir: &Path,
        store_root: &str,
        registry: &str,
        worker: Option<&Path>,
        extra: &str,
    ) -> Trainer {
        Trainer::start_with(Arc::new(setup()), dir, store_root, registry, worker, extra).await
    }

    /// [`Trainer::start_on`] secured by `security` ([`Setup::secure`]); `extra` is TOML merged
    /// into the configuration section by section (`[store]`, `[server.tenants.x]`, a key of
    /// `[server.auth]`), its values winning.
    pub(crate) async fn start_with(
        security: Arc<Setup>,
        dir: &Path,
        store_root: &str,
        registry: &str,
        worker: Option<&Path>,
        extra: &str,
    ) -> Trainer {
        Trainer::start_with_env(security, dir, store_root, registry, worker, extra, &[]).await
    }

    /// [`Trainer::start_with`] with `env` added to the service's environment (e.g. the
    /// `SLURM_CONF` of a test cluster).
    pub(crate) async fn start_with_env(
        security: Arc<Setup>,
        dir: &Path,
        store_root: &str,
        registry: &str,
        worker: Option<&Path>,
        extra: &str,
        env: &[(String, String)],
    ) -> Trainer {
        let extra: toml::Table = toml::from_str(extra).expect("extra trainer configuration is TOML");
        // A port that was free when picked can be taken by a trainer of a test running beside
        // this one before ours binds it; ours then exits, and a health check would reach the
        // other trainer. So SERVING counts only after our own process logged that it listens,
        // and a lost port race is retried with fresh ports.
        for _attempt in 0..3 {
            let port = free_port();
            let metrics_port = free_port();
            let config = dir.join(format!("trainer-{port}.toml"));
            let mut server = ServerConfig::new(&format!("127.0.0.1:{port}"), &format!("127.0.0.1:{metrics_port}"), 20);
            security.secure(&mut server, ServiceKind::Trainer);
            let mut table = toml::Table::new();
            table.insert("store_root".into(), store_root.into());
            table.insert("registry".into(), registry.into());
            let worker_exe = worker.map(|w| w.display().to_string()).unwrap_or_default();
            table.insert("worker_exe".into(), worker_exe.into());
            table.insert("server".into(), toml::Value::try_from(&server).unwrap());
            merge_toml(&mut table, extra.clone());
            let audit_log = PathBuf::from(table["server"]["audit"]["file"].as_str().unwrap());
            std::fs::write(&config, toml::to_string(&table).unwrap()).unwrap();
            let log = dir.join(format!("trainer-{port}.log"));
            let child = Command::new(trainer_exe())
                .args(["serve", "--config"])
                .arg(&config)
                .env("RUST_LOG", "info,brats_trainer=debug")
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("start brats-trainer serve");
            let url = format!("http://127.0.0.1:{port}");
            let mut t = Trainer { child, url, metrics_port, security: security.clone(), audit_log, log };
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(Some(status)) = t.child.try_wait() {
                    let log = t.log_text();
                    if log.contains("bind ") && log.contains("in use") {
                        break;
                    }
                    panic!("brats-trainer serve exited with {status} during start-up:\n{log}");
                }
                if t.log_text().contains("trainer service listening") && t.serving().await {
                    return t;
                }
                assert!(Instant::now() < deadline, "the trainer did not report SERVING in 60 s:\n{}", t.log_text());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!("brats-trainer serve lost the race for a free port three times");
    }

    /// Whether it answers SERVING for `brats.v1.Trainer`, over TLS.
    pub(crate) async fn serving(&self) -> bool {
        let Ok(channel) = self.admin().connect(&self.url).await else { return false };
        let mut h = tonic_health::pb::health_client::HealthClient::new(channel);
        h.check(tonic_health::pb::HealthCheckRequest { service: "brats.v1.Trainer".into() }).await.is_ok_and(|r| {
            r.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        })
    }

    /// How the harness connects: the test CA and the admin's API key.
    pub(crate) fn admin(&self) -> ClientSecurity {
        self.security.admin()
    }

    /// A client connected as the admin.
    pub(crate) async fn client(&self) -> TrainerClient<AuthChannel> {
        TrainerClient::new(self.admin().connect(&self.url).await.unwrap())
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait for a clean exit; its audit log must verify.
    pub(crate) fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "the trainer exited with {status} on SIGTERM:\n{}", self.log_text());
                assert_audit_chain_verifies(&self.audit_log);
                return;
            }
            assert!(Instant::now() < deadline, "the trainer did not stop within 30 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no chance to stop anything.
    pub(crate) fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Adds `extra`'s keys to `base`, table by table: a table in both gets the keys of both,
/// `extra`'s value winning where both set one.
fn merge_toml(base: &mut toml::Table, extra: toml::Table) {
    for (key, value) in extra {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(base)), toml::Value::Table(extra)) => merge_toml(base, extra),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// A small synthetic dataset (32³ cases) and its datalist URI.
pub(crate) fn dataset(dir: &Path, training: usize, validation: usize) -> String {
    let datalist = brats_preprocess::synthetic::write_dataset(dir, [32, 32, 32], 100, training, validation).unwrap();
    file_uri(&datalist)
}

/// A tiny real training spec of `epochs` epochs: 32³ crops and validation window, a SegResNet
/// with 8 filters and one block per level. [`LONG`] epochs keep a worker busy until cancelled.
pub(crate) fn spec(datalist: &str, epochs: u32) -> pb::JobSpec {
    pb::JobSpec {
        datalist_uri: datalist.to_string(),
        devices: vec!["cpu".into()],
        hyperparameters: Some(pb::Hyperparameters { epochs, ..Default::default() }),
        data: Some(pb::TrainingData {
            crop: Some(pb::CropSpec {
                mode: pb::CropMode::Random as i32,
                size: vec![32, 32, 32],
                ..Default::default()
            }),
            ..Default::default()
        }),
        validation: Some(pb::ValidationSpec {
            sliding_window: Some(pb::SlidingWindowSpec { roi_size: vec![32, 32, 32], ..Default::default() }),
            ..Default::default()
        }),
        model: Some(pb::SegResNetSpec {
            init_filters: Some(8),
            blocks_down: vec![1, 1, 1],
            blocks_up: vec![1, 1],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Epochs that outlast any test: the job trains until the test cancels it or stops its trainer.
pub(crate) const LONG: u32 = 5000;

pub(crate) fn start_req(spec: pb::JobSpec) -> pb::StartJobRequest {
    pb::StartJobRequest { spec: Some(spec), ..Default::default() }
}

pub(crate) async fn get(client: &mut TrainerClient<AuthChannel>, id: &str) -> pb::Job {
    client.get_job(pb::GetJobRequest { job_id: id.into() }).await.unwrap().into_inner()
}

/// Polls until the job is in `state` (panics after `secs`, showing the service's log).
pub(crate) async fn wait_state(t: &Trainer, id: &str, state: pb::JobState, secs: u64) -> pb::Job {
    let mut client = t.client().await;
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let job = get(&mut client, id).await;
        if job.state == state as i32 {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} is {:?} ({}), not {state:?} after {secs} s:\n{}",
            job.state(),
            job.failure_reason,
            t.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every event of a job from `from` until the stream ends (or `secs` pass).
pub(crate) async fn watch_all(
    client: &mut TrainerClient<AuthChannel>,
    id: &str,
    from: u64,
    secs: u64,
) -> Vec<pb::JobEvent> {
    let mut stream =
        client.watch_job(pb::WatchJobRequest { job_id: id.into(), from_sequence: from }).await.unwrap().into_inner();
    let mut events = Vec::new();
    let collect = async {
        while let Some(e) = stream.message().await.unwrap() {
            events.push(e);
        }
    };
    tokio::time::timeout(Duration::from_secs(secs), collect).await.expect("the watch did not end");
    events
}

pub(crate) fn state_changes(events: &[pb::JobEvent]) -> Vec<pb::JobState> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::job_event::Event::StateChanged(s)) => Some(s.to()),
            _ => None,
        })
        .collect()
}

/// The JSON lines of a job's stored event log, its segments read in name (= sequence) order.
pub(crate) fn stored_event_lines(store: &Path, id: &str) -> Vec<String> {
    let dir = store.join(format!("jobs/{id}/events"));
    let mut segments: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    segments.sort();
    segments
        .iter()
        .flat_map(|p| std::fs::read_to_string(p).unwrap().lines().map(str::to_string).collect::<Vec<_>>())
        .collect()
}

pub(crate) fn pid_alive(pid: i32) -> bool {
    // A zombie still answers kill(0); only /proc says whether it runs.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
}

/// The worker pids that the service announced in a job's events ("started 1 worker on cpu
/// (pids [1234])"), one per launch.
pub(crate) fn worker_pids(events: &[pb::JobEvent]) -> Vec<i32> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::job_event::Event::Log(l)) => launched_pid(&l.message),
            _ => None,
        })
        .collect()
}

/// [`worker_pids`] read from the job's stored event log, for when no trainer runs.
pub(crate) fn stored_worker_pids(store: &Path, id: &str) -> Vec<i32> {
    stored_event_lines(store, id)
        .iter()
        .filter_map(|l| launched_pid(serde_json::from_str::<serde_json::Value>(l).unwrap()["message"].as_str()?))
        .collect()
}

pub(crate) fn launched_pid(message: &str) -> Option<i32> {
    let pids = message.strip_prefix("started 1 worker on ")?.split("(pids [").nth(1)?;
    pids.trim_end_matches(')').trim_end_matches(']').parse().ok()
}

/// Watches a job from event `from` until `done` holds for the events received so far, and
/// returns them; panics if the stream ends first or `secs` pass (a running job's stream does not
/// end by itself).
pub(crate) async fn watch_until(
    client: &mut TrainerClient<AuthChannel>,
    id: &str,
    from: u64,
    secs: u64,
    mut done: impl FnMut(&[pb::JobEvent]) -> bool,
) -> Vec<pb::JobEvent> {
    let mut stream =
        client.watch_job(pb::WatchJobRequest { job_id: id.into(), from_sequence: from }).await.unwrap().into_inner();
    let mut events = Vec::new();
    let collect = async {
        while let Some(e) = stream.message().await.unwrap() {
            events.push(e);
            if done(&events) {
                return;
            }
        }
        panic!("the events of job {id} ended before the awaited one");
    };
    tokio::time::timeout(Duration::from_secs(secs), collect).await.expect("the awaited event did not come in time");
    events
}

/// Every event of a job that exists now.
pub(crate) async fn events_so_far(client: &mut TrainerClient<AuthChannel>, id: &str) -> Vec<pb::JobEvent> {
    let last = get(client, id).await.last_sequence;
    watch_until(client, id, 0, 30, |events| events.last().is_some_and(|e| e.sequence >= last)).await
}

/// Waits for the first training step reported at or after event `from`: the worker is past
/// start-up and really training.
pub(crate) async fn wait_step_after(client: &mut TrainerClient<AuthChannel>, id: &str, from: u64) {
    let is_step = |events: &[pb::JobEvent]| matches!(events.last().unwrap().event, Some(pb::job_event::Event::Step(_)));
    watch_until(client, id, from, 120, is_step).await;
}

/// The real worker for the training tests: `BRATS_TEST_TRAINER_WORKER` when set, else the
/// trainer's own binary (worker_exe left empty, the production default).
pub(crate) fn real_worker() -> Option<PathBuf> {
    std::env::var("BRATS_TEST_TRAINER_WORKER").ok().map(PathBuf::from)
}

pub(crate) fn epochs_of(events: &[pb::JobEvent]) -> Vec<pb::EpochMetrics> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::job_event::Event::Epoch(m)) => Some(*m),
            _ => None,
        })
        .collect()
}
