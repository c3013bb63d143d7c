//! The trainer service end to end: the real `brats-trainer serve` binary on loopback, a local
//! directory store, synthetic NIfTI datasets preprocessed in-process, and every StartJob
//! refusal. Every job runs the real `brats-trainer worker` on a tiny SegResNet (8 filters, one
//! block per level, 32³ crops): jobs that must stay busy while a test queues, lists, cancels or
//! restarts around them are simply given many epochs.

mod common;

use brats_proto::v1 as pb;
use brats_proto::v1::trainer_client::TrainerClient;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tonic::Code;
use tonic::transport::Channel;

/// The `brats-trainer` binary: `BRATS_TEST_TRAINER_EXE`, else built by [`workspace_exe`].
fn trainer_exe() -> PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| match std::env::var("BRATS_TEST_TRAINER_EXE") {
        Ok(p) => PathBuf::from(p),
        Err(_) => workspace_exe("brats-trainer"),
    })
    .clone()
}

/// A `brats-trainer serve` process on loopback; SIGKILLed when dropped.
struct Trainer {
    child: Child,
    url: String,
    metrics_port: u16,
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
    async fn start(dir: &Path, store: &Path, worker: Option<&Path>, extra: &str) -> Trainer {
        Trainer::start_on(dir, &file_uri(store), &file_uri(&store.join("models")), worker, extra).await
    }

    /// [`Trainer::start`] on any store and registry root.
    async fn start_on(dir: &Path, store_root: &str, registry: &str, worker: Option<&Path>, extra: &str) -> Trainer {
        // A port that was free when picked can be taken by a trainer of a test running beside
        // this one before ours binds it; ours then exits, and a health check would reach the
        // other trainer. So SERVING counts only after our own process logged that it listens,
        // and a lost port race is retried with fresh ports.
        for _attempt in 0..3 {
            let port = free_port();
            let metrics_port = free_port();
            let config = dir.join(format!("trainer-{port}.toml"));
            let worker_exe = worker.map(|w| w.display().to_string()).unwrap_or_default();
            std::fs::write(
                &config,
                format!(
                    "server = {{ listen = \"127.0.0.1:{port}\", metrics_listen = \"127.0.0.1:{metrics_port}\", \
                     shutdown_grace_s = 20 }}\n\
                     store_root = \"{store_root}\"\nregistry = \"{registry}\"\nworker_exe = \"{worker_exe}\"\n{extra}\n",
                ),
            )
            .unwrap();
            let log = dir.join(format!("trainer-{port}.log"));
            let child = Command::new(trainer_exe())
                .args(["serve", "--config"])
                .arg(&config)
                .env("RUST_LOG", "info,brats_trainer=debug")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("start brats-trainer serve");
            let mut t = Trainer { child, url: format!("http://127.0.0.1:{port}"), metrics_port, log };
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

    async fn serving(&self) -> bool {
        let Ok(channel) = Channel::from_shared(self.url.clone()).unwrap().connect().await else { return false };
        let mut h = tonic_health::pb::health_client::HealthClient::new(channel);
        h.check(tonic_health::pb::HealthCheckRequest { service: "brats.v1.Trainer".into() }).await.is_ok_and(|r| {
            r.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        })
    }

    async fn client(&self) -> TrainerClient<Channel> {
        TrainerClient::connect(self.url.clone()).await.unwrap()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait for a clean exit.
    fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "the trainer exited with {status} on SIGTERM:\n{}", self.log_text());
                return;
            }
            assert!(Instant::now() < deadline, "the trainer did not stop within 30 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no chance to stop anything.
    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small synthetic dataset (32³ cases) and its datalist URI.
fn dataset(dir: &Path, training: usize, validation: usize) -> String {
    let datalist = brats_preprocess::synthetic::write_dataset(dir, [32, 32, 32], 100, training, validation).unwrap();
    file_uri(&datalist)
}

/// A tiny real training spec of `epochs` epochs: 32³ crops and validation window, a SegResNet
/// with 8 filters and one block per level. [`LONG`] epochs keep a worker busy until cancelled.
fn spec(datalist: &str, epochs: u32) -> pb::JobSpec {
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
const LONG: u32 = 5000;

fn start_req(spec: pb::JobSpec) -> pb::StartJobRequest {
    pb::StartJobRequest { spec: Some(spec), ..Default::default() }
}

async fn get(client: &mut TrainerClient<Channel>, id: &str) -> pb::Job {
    client.get_job(pb::GetJobRequest { job_id: id.into() }).await.unwrap().into_inner()
}

/// Polls until the job is in `state` (panics after `secs`, showing the service's log).
async fn wait_state(t: &Trainer, id: &str, state: pb::JobState, secs: u64) -> pb::Job {
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
async fn watch_all(client: &mut TrainerClient<Channel>, id: &str, from: u64, secs: u64) -> Vec<pb::JobEvent> {
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

fn state_changes(events: &[pb::JobEvent]) -> Vec<pb::JobState> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::job_event::Event::StateChanged(s)) => Some(s.to()),
            _ => None,
        })
        .collect()
}

/// The JSON lines of a job's stored event log, its segments read in name (= sequence) order.
fn stored_event_lines(store: &Path, id: &str) -> Vec<String> {
    let dir = store.join(format!("jobs/{id}/events"));
    let mut segments: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    segments.sort();
    segments
        .iter()
        .flat_map(|p| std::fs::read_to_string(p).unwrap().lines().map(str::to_string).collect::<Vec<_>>())
        .collect()
}

fn pid_alive(pid: i32) -> bool {
    // A zombie still answers kill(0); only /proc says whether it runs.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
}

/// The worker pids that the service announced in a job's events ("started 1 worker on cpu
/// (pids [1234])"), one per launch.
fn worker_pids(events: &[pb::JobEvent]) -> Vec<i32> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::job_event::Event::Log(l)) => launched_pid(&l.message),
            _ => None,
        })
        .collect()
}

/// [`worker_pids`] read from the job's stored event log, for when no trainer runs.
fn stored_worker_pids(store: &Path, id: &str) -> Vec<i32> {
    stored_event_lines(store, id)
        .iter()
        .filter_map(|l| launched_pid(serde_json::from_str::<serde_json::Value>(l).unwrap()["message"].as_str()?))
        .collect()
}

fn launched_pid(message: &str) -> Option<i32> {
    let pids = message.strip_prefix("started 1 worker on ")?.split("(pids [").nth(1)?;
    pids.trim_end_matches(')').trim_end_matches(']').parse().ok()
}

/// Watches a job from event `from` until `done` holds for the events received so far, and
/// returns them; panics if the stream ends first or `secs` pass (a running job's stream does not
/// end by itself).
async fn watch_until(
    client: &mut TrainerClient<Channel>,
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
async fn events_so_far(client: &mut TrainerClient<Channel>, id: &str) -> Vec<pb::JobEvent> {
    let last = get(client, id).await.last_sequence;
    watch_until(client, id, 0, 30, |events| events.last().is_some_and(|e| e.sequence >= last)).await
}

/// Waits for the first training step reported at or after event `from`: the worker is past
/// start-up and really training.
async fn wait_step_after(client: &mut TrainerClient<Channel>, id: &str, from: u64) {
    let is_step = |events: &[pb::JobEvent]| matches!(events.last().unwrap().event, Some(pb::job_event::Event::Step(_)));
    watch_until(client, id, from, 120, is_step).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_job_refuses_bad_specs_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let datalist = dataset(&data, 2, 1);
    let store = dir.path().join("store");
    let t = Trainer::start(dir.path(), &store, real_worker().as_deref(), "").await;
    let mut client = t.client().await;

    let refuse = |req: pb::StartJobRequest| {
        let mut client = client.clone();
        async move { client.start_job(req).await.expect_err("StartJob must refuse") }
    };
    let write_datalist = |name: &str, v: serde_json::Value| {
        let p = data.join(name);
        std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
        file_uri(&p)
    };
    let list: serde_json::Value = serde_json::from_slice(&std::fs::read(data.join("datalist.json")).unwrap()).unwrap();
    let case0 = list["training"][0].clone();

    // A referenced file that does not exist: NOT_FOUND naming the file and its case.
    let mut missing = case0.clone();
    missing["image"][2] = "synth-00100-gone.nii.gz".into();
    let uri = write_datalist("missing.json", serde_json::json!({"training": [case0, missing]}));
    let e = refuse(start_req(spec(&uri, 1))).await;
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("synth-00100-gone.nii.gz") && e.message().contains("case 'synth-00100"), "{e:?}");

    // Three modalities instead of four: INVALID_ARGUMENT naming the case.
    let mut three = list["training"][1].clone();
    three["image"].as_array_mut().unwrap().pop();
    let uri = write_datalist("three.json", serde_json::json!({"training": [three]}));
    let e = refuse(start_req(spec(&uri, 1))).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("case 'synth-00101'") && e.message().contains("has 3 images"), "{e:?}");

    // An empty training section: INVALID_ARGUMENT naming datalist_uri and the section.
    let uri = write_datalist("empty.json", serde_json::json!({"training": [], "validation": [list["validation"][0]]}));
    let e = refuse(start_req(spec(&uri, 1))).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with("datalist_uri:") && e.message().contains("section 'training'"), "{e:?}");

    // The datalist itself missing.
    let e = refuse(start_req(spec(&file_uri(&data.join("nope.json")), 1))).await;
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().starts_with("datalist_uri:") && e.message().contains("nope.json"), "{e:?}");

    // An absurd learning rate.
    let mut s = spec(&datalist, 1);
    s.hyperparameters = Some(pb::Hyperparameters { learning_rate: Some(50.0), ..Default::default() });
    let e = refuse(start_req(s)).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("hyperparameters.learning_rate"), "{e:?}");

    // An unknown device, then devices this host does not have.
    let mut s = spec(&datalist, 1);
    s.devices = vec!["tpu:0".into()];
    let e = refuse(start_req(s)).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("devices") && e.message().contains("tpu:0"), "{e:?}");
    let mut s = spec(&datalist, 1);
    s.devices = vec!["cuda:63".into()];
    let e = refuse(start_req(s)).await;
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("this trainer has"), "{e:?}");
    if e.message().contains("has 0 CUDA devices") {
        let mut s = spec(&datalist, 1);
        s.devices = vec!["cuda:0".into()];
        let e = refuse(start_req(s)).await;
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("cuda:0") && e.message().contains("has 0 CUDA devices"), "{e:?}");
    }

    // A checkpoint to resume from that does not exist.
    let mut s = spec(&datalist, 1);
    s.resume_from = file_uri(&dir.path().join("other-job/latest.safetensors"));
    let e = refuse(start_req(s)).await;
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().starts_with("spec.resume_from:") && e.message().contains("latest.safetensors"), "{e:?}");

    // No spec, a malformed job id.
    assert_eq!(refuse(pb::StartJobRequest::default()).await.code(), Code::InvalidArgument);
    let e = refuse(pb::StartJobRequest { job_id: "Bad_Id".into(), ..start_req(spec(&datalist, 1)) }).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("job_id:"), "{e:?}");

    // Nothing was created.
    let jobs = client.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    assert!(jobs.is_empty(), "{jobs:?}");
    t.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_cancel_resume_list_and_watch() {
    let dir = tempfile::tempdir().unwrap();
    let datalist = dataset(&dir.path().join("data"), 2, 1);
    let store = dir.path().join("store");
    let t = Trainer::start(dir.path(), &store, real_worker().as_deref(), "").await;
    let mut client = t.client().await;

    // request_id makes StartJob idempotent; a client-chosen id is too, for the same spec.
    let req = pb::StartJobRequest { request_id: "req-1".into(), ..start_req(spec(&datalist, LONG)) };
    let a = client.start_job(req.clone()).await.unwrap().into_inner();
    assert_eq!(a.state(), pb::JobState::Queued);
    assert!(a.id.starts_with("job-") && a.id.len() == 19, "{}", a.id);
    assert!(a.job_uri.ends_with(&format!("/jobs/{}/", a.id)), "{}", a.job_uri);
    assert_eq!(a.total_epochs, LONG);
    assert_eq!(client.start_job(req).await.unwrap().into_inner().id, a.id, "a retried request_id");

    // The CPU holds one job: A trains, B waits.
    let a = wait_state(&t, &a.id, pb::JobState::Running, 60).await;
    assert!(a.started_at.is_some());
    wait_step_after(&mut client, &a.id, 0).await;
    let b_req = pb::StartJobRequest { job_id: "second-job".into(), ..start_req(spec(&datalist, LONG)) };
    let b = client.start_job(b_req.clone()).await.unwrap().into_inner();
    assert_eq!(b.id, "second-job");
    assert_eq!(client.start_job(b_req.clone()).await.unwrap().into_inner().id, "second-job");
    let mut other = b_req.clone();
    other.spec.as_mut().unwrap().hyperparameters = Some(pb::Hyperparameters { epochs: 2, ..Default::default() });
    let e = client.start_job(other).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("second-job") && e.message().contains("different spec"), "{e:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(get(&mut client, "second-job").await.state(), pb::JobState::Queued, "B must wait for the CPU");

    // Metrics: one running, one queued.
    let (_, body) = http("GET", t.metrics_port, "/metrics").await.unwrap();
    assert!(body.contains("brats_trainer_queue_depth 1"), "{body}");
    assert!(body.contains("brats_trainer_jobs{state=\"RUNNING\"} 1"), "{body}");

    // Cancelling a queued job is immediate; resuming it queues it again.
    let b = client
        .cancel_job(pb::CancelJobRequest { job_id: "second-job".into(), reason: "not now".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.state(), pb::JobState::Cancelled);
    assert_eq!(b.failure_reason, "not now");
    assert!(b.finished_at.is_some());
    let again = client.cancel_job(pb::CancelJobRequest { job_id: "second-job".into(), ..Default::default() }).await;
    assert_eq!(again.unwrap().into_inner().state(), pb::JobState::Cancelled, "cancelling twice is a no-op");
    let b = client.resume_job(pb::ResumeJobRequest { job_id: "second-job".into() }).await.unwrap().into_inner();
    assert_eq!((b.state(), b.resume_count), (pb::JobState::Queued, 1));
    let e = client.resume_job(pb::ResumeJobRequest { job_id: a.id.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "resuming a RUNNING job: {e:?}");

    // Get / List: newest first, pages, state filter, bad tokens and sizes.
    let e = client.get_job(pb::GetJobRequest { job_id: "no-such-job".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(client.get_job(pb::GetJobRequest::default()).await.unwrap_err().code(), Code::InvalidArgument);
    let page1 =
        client.list_jobs(pb::ListJobsRequest { page_size: 1, ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(page1.jobs.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), vec!["second-job"]);
    assert!(!page1.next_page_token.is_empty());
    let page2 = client
        .list_jobs(pb::ListJobsRequest {
            page_size: 1,
            page_token: page1.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page2.jobs.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), vec![a.id.as_str()]);
    assert!(page2.next_page_token.is_empty());
    let running = client
        .list_jobs(pb::ListJobsRequest { states: vec![pb::JobState::Running as i32], ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(running.jobs.len(), 1);
    assert_eq!(running.jobs[0].id, a.id);
    let forged = format!("{}0", page1.next_page_token);
    let e = client.list_jobs(pb::ListJobsRequest { page_token: forged, ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = client.list_jobs(pb::ListJobsRequest { page_size: 1001, ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // A sequence far past the end is refused (A trains on, so "just past" would race it).
    let a_now = get(&mut client, &a.id).await;
    let e = client
        .watch_job(pb::WatchJobRequest { job_id: a.id.clone(), from_sequence: a_now.last_sequence + 1_000_000 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    // Watch A from a sequence in the middle, then cancel it: the stream ends after CANCELLED.
    let watcher = {
        let mut c = client.clone();
        let id = a.id.clone();
        tokio::spawn(async move { watch_all(&mut c, &id, 2, 60).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cancelling = client
        .cancel_job(pb::CancelJobRequest { job_id: a.id.clone(), reason: "operator".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(cancelling.state(), pb::JobState::Cancelling | pb::JobState::Cancelled),
        "{:?}",
        cancelling.state()
    );
    let events = watcher.await.unwrap();
    assert_eq!(events.first().map(|e| e.sequence), Some(2), "the watch starts at from_sequence");
    assert!(events.windows(2).all(|w| w[1].sequence == w[0].sequence + 1), "sequences are contiguous");
    assert!(events.iter().all(|e| e.job_id == a.id));
    let changes = state_changes(&events);
    assert_eq!(changes.last(), Some(&pb::JobState::Cancelled), "{changes:?}");
    assert!(changes.contains(&pb::JobState::Cancelling), "{changes:?}");
    let a_done = get(&mut client, &a.id).await;
    assert_eq!((a_done.state(), a_done.failure_reason.as_str()), (pb::JobState::Cancelled, "operator"));
    assert_eq!(a_done.last_sequence, events.last().unwrap().sequence);

    // The whole history from 0: created QUEUED, PREPARING, the worker's line, RUNNING, …
    let all = watch_all(&mut client, &a.id, 0, 10).await;
    assert_eq!(all.len() as u64, a_done.last_sequence + 1);
    assert_eq!(
        state_changes(&all),
        vec![
            pb::JobState::Queued,
            pb::JobState::Preparing,
            pb::JobState::Running,
            pb::JobState::Cancelling,
            pb::JobState::Cancelled
        ]
    );
    assert!(
        all.iter().any(|e| matches!(&e.event,
            Some(pb::job_event::Event::Log(l)) if l.message.starts_with("2 training and 1 validation cases"))),
        "the worker's own note is missing: {all:?}"
    );
    // The worker is gone; the stored log is what was streamed.
    let pids = worker_pids(&all);
    assert_eq!(pids.len(), 1, "{all:?}");
    for pid in pids {
        assert!(!pid_alive(pid), "worker {pid} still runs");
    }
    assert_eq!(stored_event_lines(&store, &a.id).len(), all.len());

    // B got the CPU once A stopped; cancel it while it runs.
    wait_state(&t, "second-job", pb::JobState::Running, 60).await;
    client.cancel_job(pb::CancelJobRequest { job_id: "second-job".into(), ..Default::default() }).await.unwrap();
    let b = wait_state(&t, "second-job", pb::JobState::Cancelled, 30).await;
    assert_eq!(b.resume_count, 1);
    t.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_register_versions_and_failures_carry_the_workers_reason() {
    let dir = tempfile::tempdir().unwrap();
    let datalist = dataset(&dir.path().join("data"), 1, 1);
    let store = dir.path().join("store");
    let t = Trainer::start(dir.path(), &store, real_worker().as_deref(), "").await;
    let mut client = t.client().await;

    let mut s = spec(&datalist, 1);
    s.registration = Some(pb::ModelRegistration {
        model_name: "tiny".into(),
        promote_to_production: true,
        description: "test run".into(),
        ..Default::default()
    });
    let first = client.start_job(start_req(s.clone())).await.unwrap().into_inner();
    let events = watch_all(&mut client, &first.id, 0, 300).await;
    let done = get(&mut client, &first.id).await;
    assert_eq!(done.state(), pb::JobState::Succeeded, "{}\n{}", done.failure_reason, t.log_text());
    assert_eq!(done.registered_model, Some(pb::ModelVersionRef { name: "tiny".into(), version: "1".into() }));
    assert_eq!((done.epoch, done.global_step, done.best_epoch), (1, 1, 1), "one case, batch 1: one step");
    let best = done.best_metrics.unwrap();
    let epoch_dice = epochs_of(&events)[0].validation.unwrap();
    assert_eq!(best, epoch_dice, "the best metrics are the only epoch's");
    assert!([best.tc, best.wt, best.et, best.mean].iter().all(|d| (0.0..=1.0).contains(d)), "{best:?}");
    assert!(done.latest_checkpoint_uri.ends_with("checkpoints/latest.safetensors"), "{}", done.latest_checkpoint_uri);
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| match &e.event {
            Some(pb::job_event::Event::StateChanged(_)) => "state",
            Some(pb::job_event::Event::Step(_)) => "step",
            Some(pb::job_event::Event::Epoch(_)) => "epoch",
            Some(pb::job_event::Event::Checkpoint(_)) => "checkpoint",
            Some(pb::job_event::Event::ModelRegistered(_)) => "registered",
            Some(pb::job_event::Event::Log(_)) => "log",
            None => "none",
        })
        .collect();
    for k in ["step", "epoch", "checkpoint", "registered"] {
        assert!(kinds.contains(&k), "no {k} event in {kinds:?}");
    }
    assert_eq!(kinds.last(), Some(&"state"));
    let registered = events.iter().find_map(|e| match &e.event {
        Some(pb::job_event::Event::ModelRegistered(m)) => Some(m.clone()),
        _ => None,
    });
    assert_eq!(registered.unwrap().aliases, vec!["production"]);
    let models = store.join("models/tiny");
    let exported = std::fs::read(store.join(format!("jobs/{}/artifacts/model.onnx", first.id))).unwrap();
    assert!(exported.len() > 100_000, "a SegResNet in ONNX, not {} bytes", exported.len());
    assert_eq!(std::fs::read(models.join("1/model.onnx")).unwrap(), exported, "the registry holds the job's export");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(models.join("1/metadata.json")).unwrap()).unwrap();
    assert_eq!(meta["network_def"]["config"]["init_filters"], 8, "{meta}");
    assert_eq!(meta["training"]["best_epoch"], 1, "{meta}");
    assert_eq!(meta["description"], "test run");
    assert_eq!(meta["trainer_job"]["job_id"], first.id.as_str());
    let aliases: serde_json::Value =
        serde_json::from_slice(&std::fs::read(models.join("aliases.json")).unwrap()).unwrap();
    assert_eq!(aliases["production"], "1");
    let e =
        client.cancel_job(pb::CancelJobRequest { job_id: first.id.clone(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // The next job of the same name is version 2; without promotion production stays on 1.
    s.registration.as_mut().unwrap().promote_to_production = false;
    s.seed = Some(7);
    let second = client.start_job(start_req(s)).await.unwrap().into_inner();
    let second = wait_state(&t, &second.id, pb::JobState::Succeeded, 60).await;
    assert_eq!(second.registered_model.unwrap().version, "2");
    assert_eq!(second.seed, 7);
    let aliases: serde_json::Value =
        serde_json::from_slice(&std::fs::read(models.join("aliases.json")).unwrap()).unwrap();
    assert_eq!(aliases["production"], "1");

    // A worker killed mid-training: FAILED, saying which rank died of which signal; resumable.
    let mut streamed = spec(&datalist, LONG);
    streamed.data.as_mut().unwrap().case_cache = pb::CaseCache::Stream as i32;
    let failing = client.start_job(start_req(streamed)).await.unwrap().into_inner();
    wait_step_after(&mut client, &failing.id, 0).await;
    let pid = worker_pids(&events_so_far(&mut client, &failing.id).await)[0];
    assert!(Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success());
    let failed = wait_state(&t, &failing.id, pb::JobState::Failed, 60).await;
    assert_eq!(
        failed.failure_reason,
        format!("worker rank 0 (pid {pid}) was killed by signal 9 (SIGKILL)"),
        "{}",
        t.log_text()
    );
    assert_eq!(failed.failure_code, "ABORTED");
    let resumed = client.resume_job(pb::ResumeJobRequest { job_id: failing.id.clone() }).await.unwrap().into_inner();
    assert_eq!((resumed.state(), resumed.resume_count, resumed.failure_reason.as_str()), (pb::JobState::Queued, 1, ""));

    // The resumed job streams its cases from the store; the store loses them mid-training. The
    // worker exits with an error and the job is FAILED with the worker's own words as the reason.
    wait_step_after(&mut client, &failing.id, resumed.last_sequence + 1).await;
    let cases = store.join("cases");
    assert!(cases.is_dir(), "preprocessed cases are cached under {}", cases.display());
    std::fs::remove_dir_all(&cases).unwrap();
    let failed = wait_state(&t, &failing.id, pb::JobState::Failed, 120).await;
    assert!(failed.failure_reason.starts_with("worker rank 0 (pid "), "{}", failed.failure_reason);
    assert!(failed.failure_reason.contains("exited with code 1: error: data: "), "{}", failed.failure_reason);
    assert!(
        failed.failure_reason.contains("/store/cases/synth-0010") && failed.failure_reason.contains("no such object"),
        "the reason names the lost object: {}",
        failed.failure_reason
    );
    assert_eq!(failed.failure_code, "INTERNAL");
    t.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_trainer_resumes_its_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let datalist = dataset(&dir.path().join("data"), 1, 1);
    let store = dir.path().join("store");
    let worker = real_worker();
    let t = Trainer::start(dir.path(), &store, worker.as_deref(), "").await;
    let mut client = t.client().await;
    let a = client.start_job(start_req(spec(&datalist, LONG))).await.unwrap().into_inner();
    let b = client.start_job(start_req(spec(&datalist, LONG))).await.unwrap().into_inner();
    wait_step_after(&mut client, &a.id, 0).await;
    let first_worker = worker_pids(&events_so_far(&mut client, &a.id).await);
    assert_eq!(first_worker.len(), 1);

    // SIGKILL: the service cannot stop anything, its worker dies with it (PR_SET_PDEATHSIG).
    t.kill9();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(first_worker[0]) {
        assert!(Instant::now() < deadline, "the worker outlived the trainer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let t = Trainer::start(dir.path(), &store, worker.as_deref(), "").await;
    let mut client = t.client().await;
    let a2 = wait_state(&t, &a.id, pb::JobState::Running, 60).await;
    assert_eq!(a2.resume_count, 1, "a job that was running counts a resume");
    assert_eq!(get(&mut client, &b.id).await.state(), pb::JobState::Queued, "B keeps waiting behind A");
    let running_twice =
        |events: &[pb::JobEvent]| state_changes(events).iter().filter(|s| **s == pb::JobState::Running).count() >= 2;
    let events = watch_until(&mut client, &a.id, 0, 30, running_twice).await;
    assert!(
        events.iter().any(|e| matches!(&e.event,
            Some(pb::job_event::Event::Log(l)) if l.message == "trainer restarted; resuming from the last checkpoint")),
        "{events:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while worker_pids(&events_so_far(&mut client, &a.id).await).len() < 2 {
        assert!(Instant::now() < deadline, "the job was not relaunched");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // SIGTERM: workers stop at a step boundary, the job stays RUNNING in the store and resumes.
    t.stop();
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join(format!("jobs/{}/job.json", a.id))).unwrap()).unwrap();
    assert_eq!(record["state"], "RUNNING");
    let launched = stored_worker_pids(&store, &a.id);
    assert_eq!(launched.len(), 2, "one launch before the SIGKILL, one after");
    for pid in launched {
        assert!(!pid_alive(pid), "worker {pid} still runs after the trainer stopped");
    }
    let t = Trainer::start(dir.path(), &store, worker.as_deref(), "").await;
    let a3 = wait_state(&t, &a.id, pb::JobState::Running, 60).await;
    assert_eq!(a3.resume_count, 2);
    let mut client = t.client().await;
    client.cancel_job(pb::CancelJobRequest { job_id: a.id.clone(), ..Default::default() }).await.unwrap();
    wait_state(&t, &a.id, pb::JobState::Cancelled, 30).await;
    wait_state(&t, &b.id, pb::JobState::Running, 60).await;
    t.stop();
}

/// The real worker for the training tests: `BRATS_TEST_TRAINER_WORKER` when set, else the
/// trainer's own binary (worker_exe left empty, the production default).
fn real_worker() -> Option<PathBuf> {
    std::env::var("BRATS_TEST_TRAINER_WORKER").ok().map(PathBuf::from)
}

/// [`spec`] with the recipe that learns within a few epochs, registered as `tiny`.
fn training_spec(datalist: &str, epochs: u32) -> pb::JobSpec {
    let mut s = spec(datalist, epochs);
    s.seed = Some(3);
    s.hyperparameters = Some(pb::Hyperparameters {
        epochs,
        learning_rate: Some(3e-3),
        lr_schedule: pb::LrSchedule::Constant as i32,
        ..Default::default()
    });
    s.registration = Some(pb::ModelRegistration { model_name: "tiny".into(), ..Default::default() });
    s
}

fn epochs_of(events: &[pb::JobEvent]) -> Vec<pb::EpochMetrics> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::job_event::Event::Epoch(m)) => Some(*m),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_trains_on_the_cpu_and_registers_a_model_that_learned() {
    let dir = tempfile::tempdir().unwrap();
    let datalist = dataset(&dir.path().join("data"), 2, 1);
    let store = dir.path().join("store");
    let t = Trainer::start(dir.path(), &store, real_worker().as_deref(), "").await;
    let mut client = t.client().await;
    let started = Instant::now();
    let job = client.start_job(start_req(training_spec(&datalist, 8))).await.unwrap().into_inner();
    let events = watch_all(&mut client, &job.id, 0, 600).await;
    let done = get(&mut client, &job.id).await;
    assert_eq!(done.state(), pb::JobState::Succeeded, "{}\n{}", done.failure_reason, t.log_text());
    eprintln!("8 epochs in {:.1} s", started.elapsed().as_secs_f64());
    let epochs = epochs_of(&events);
    assert_eq!(epochs.iter().map(|e| e.epoch).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>());
    let (first, last) = (epochs[0], epochs[7]);
    assert!(last.train_loss < first.train_loss, "the loss did not go down: {first:?} → {last:?}");
    let best = done.best_metrics.unwrap();
    assert!(best.mean > first.validation.unwrap().mean, "the validation Dice did not improve: {best:?}");
    assert_eq!((done.epoch, done.registered_model.unwrap().version.as_str()), (8, "1"));
    assert!(events.iter().any(|e| matches!(e.event, Some(pb::job_event::Event::Step(_)))));
    for f in ["model.onnx", "metadata.json", "best.safetensors", "metrics.csv", "curves.png"] {
        assert!(store.join(format!("jobs/{}/artifacts/{f}", job.id)).exists(), "no artefact {f}");
    }
    assert!(store.join("models/tiny/1/model.onnx").exists());

    // Cancelling a training job: the worker stops at the next step boundary (exit 3), well
    // within the grace period, and the job is CANCELLED.
    let long = client.start_job(start_req(training_spec(&datalist, 50))).await.unwrap().into_inner();
    wait_step_after(&mut client, &long.id, 0).await;
    client.cancel_job(pb::CancelJobRequest { job_id: long.id.clone(), reason: "enough".into() }).await.unwrap();
    let cancelled = wait_state(&t, &long.id, pb::JobState::Cancelled, 60).await;
    assert_eq!(cancelled.failure_reason, "enough");
    assert!(cancelled.registered_model.is_none());
    assert!(!t.log_text().contains("did not stop within the grace period"), "{}", t.log_text());
    t.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trainer_killed_mid_training_resumes_losing_at_most_one_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let datalist = dataset(&dir.path().join("data"), 2, 1);
    let store = dir.path().join("store");
    let worker = real_worker();
    let t = Trainer::start(dir.path(), &store, worker.as_deref(), "").await;
    let mut client = t.client().await;
    let job = client.start_job(start_req(training_spec(&datalist, 6))).await.unwrap().into_inner();

    // Watch until two epochs are done, noting the worker's pid, then SIGKILL the trainer.
    let before = watch_until(&mut client, &job.id, 0, 300, |events| epochs_of(events).len() >= 2).await;
    let pid = *worker_pids(&before).first().expect("the worker's pid in the log");
    t.kill9();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(pid) {
        assert!(Instant::now() < deadline, "the worker outlived the trainer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored: Vec<serde_json::Value> =
        stored_event_lines(&store, &job.id).iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    let done_before = stored.iter().filter(|e| e["type"] == "epoch").map(|e| e["epoch"].as_u64().unwrap()).max();
    let done_before = done_before.expect("epochs are stored as they end") as u32;
    assert!(done_before >= 2, "stored epochs: {done_before}");

    let t = Trainer::start(dir.path(), &store, worker.as_deref(), "").await;
    let mut client = t.client().await;
    let all = watch_all(&mut client, &job.id, 0, 600).await;
    let done = get(&mut client, &job.id).await;
    assert_eq!(done.state(), pb::JobState::Succeeded, "{}\n{}", done.failure_reason, t.log_text());
    assert_eq!((done.epoch, done.resume_count), (6, 1));
    // After the restart, training continued from the latest checkpoint: the first epoch run
    // again is at most one past what had finished.
    let restart = all
        .iter()
        .position(
            |e| matches!(&e.event, Some(pb::job_event::Event::Log(l)) if l.message.starts_with("trainer restarted")),
        )
        .expect("a restart note");
    let rerun: Vec<u32> = epochs_of(&all[restart..]).iter().map(|e| e.epoch).collect();
    assert_eq!(rerun.last(), Some(&6));
    assert!(
        rerun[0] >= done_before,
        "resumed at epoch {} after {done_before} had finished: lost more than one",
        rerun[0]
    );
    assert!(rerun[0] <= done_before + 1, "skipped epochs: {rerun:?} after {done_before}");
    t.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_against_s3_and_is_recovered_from_it() {
    let moto = Moto::start("brats").await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data, 1, 1);
    let stores = brats_core::store::Stores::new(moto.store_config());
    for f in list_files(&data) {
        let uri = brats_core::StoreUri::parse(&format!("s3://brats/data/{f}")).unwrap();
        stores.put(&uri, std::fs::read(data.join(&f)).unwrap().into()).await.unwrap();
    }
    let c = moto.store_config();
    let extra = format!(
        "[store]\ns3_endpoint = \"{}\"\ns3_region = \"us-east-1\"\ns3_access_key_id = \"testing\"\n\
         s3_secret_access_key = \"{}\"\n",
        c.s3_endpoint.unwrap(),
        c.s3_secret_access_key.unwrap()
    );
    let worker = real_worker();
    let t = Trainer::start_on(dir.path(), "s3://brats/trainer", "s3://brats/models", worker.as_deref(), &extra).await;
    let mut client = t.client().await;
    // The worker reads every sample from the bucket instead of holding the cases.
    let mut spec = training_spec("s3://brats/data/datalist.json", 2);
    spec.data.as_mut().unwrap().case_cache = pb::CaseCache::Stream as i32;
    let job = client.start_job(start_req(spec)).await.unwrap().into_inner();
    assert_eq!(job.job_uri, format!("s3://brats/trainer/jobs/{}/", job.id));
    let done = wait_state(&t, &job.id, pb::JobState::Succeeded, 300).await;
    let events = watch_all(&mut client, &job.id, 0, 30).await;
    assert!(
        events.iter().any(
            |e| matches!(&e.event, Some(pb::job_event::Event::Log(l)) if l.message.contains("streamed from the store"))
        ),
        "no event says the cases are streamed: {events:?}"
    );
    assert_eq!(done.registered_model.unwrap().version, "1");
    for key in ["models/tiny/1/model.onnx", "models/tiny/1/metadata.json"] {
        let uri = brats_core::StoreUri::parse(&format!("s3://brats/{key}")).unwrap();
        assert!(stores.exists(&uri).await.unwrap(), "{key} missing");
    }
    let config = brats_core::StoreUri::parse(&format!("{}config.json", job.job_uri)).unwrap();
    assert!(stores.exists(&config).await.unwrap());
    assert!(!t.log_text().contains("s3_secret_access_key"), "the store's credentials were logged");
    t.stop();

    // A new trainer finds the job in the bucket.
    let t = Trainer::start_on(dir.path(), "s3://brats/trainer", "s3://brats/models", worker.as_deref(), &extra).await;
    let again = get(&mut t.client().await, &job.id).await;
    assert_eq!((again.state(), again.epoch), (pb::JobState::Succeeded, 2));
    t.stop();
}

/// `bratsctl train` against a real trainer: start with --watch follows a job to SUCCEEDED with
/// its per-epoch lines (warm-up schedule included), list and get show jobs, cancel stops a
/// running one, and a refusal or an unknown job exits non-zero with the trainer's words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bratsctl_starts_watches_lists_gets_and_cancels_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data, 2, 1);
    let datalist = data.join("datalist.json").display().to_string();
    let store = dir.path().join("store");
    let t = Trainer::start(dir.path(), &store, real_worker().as_deref(), "").await;
    let url = t.url.clone();
    let ctl = move |args: &[&str]| {
        let out = Command::new(bratsctl_exe()).args(args).args(["--server", &url]).output().unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status, text(&out.stdout), text(&out.stderr))
    };
    let small = ["--crop", "32,32,32", "--val-roi", "32,32,32", "--devices", "cpu"];

    let mut start = vec!["train", "start", "--datalist", &datalist, "--epochs", "2", "--lr", "3e-3"];
    start.extend(["--lr-schedule", "warmup-cosine", "--warmup-steps", "2", "--seed", "3", "--model-name", "tiny"]);
    start.extend(small);
    start.push("--watch");
    let (status, out, err) = ctl(&start);
    assert!(status.success(), "{out}\n{err}");
    let epoch_lines: Vec<&str> = out.lines().filter(|l| l.starts_with("epoch ")).collect();
    assert_eq!(epoch_lines.len(), 2, "{out}");
    // Steps 0 and 2 of a 2-step warm-up: 0, then the full rate.
    assert!(epoch_lines[0].starts_with("epoch 1/2: loss ") && epoch_lines[0].contains("lr 0.00e0"), "{out}");
    assert!(epoch_lines[1].contains("lr 3.00e-3") && epoch_lines[1].contains("Dice TC "), "{out}");
    assert!(out.contains("registered tiny version 1"), "{out}");
    assert!(out.contains("RUNNING → SUCCEEDED"), "{out}");

    let mut long = vec!["train", "start", "--datalist", &datalist, "--epochs", "5000", "--job-id", "long-one"];
    long.extend(small);
    let (status, out, err) = ctl(&long);
    assert!(status.success() && out.starts_with("job long-one QUEUED"), "{out}\n{err}");
    wait_state(&t, "long-one", pb::JobState::Running, 120).await;
    let (status, out, _) = ctl(&["train", "list"]);
    assert!(status.success());
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(rows[0].starts_with("long-one ") && rows[0].contains("RUNNING"), "newest first: {out}");
    assert!(rows[1].contains("SUCCEEDED") && rows[1].ends_with("tiny/1"), "{out}");

    let (status, out, err) = ctl(&["train", "cancel", "long-one"]);
    assert!(status.success(), "{out}\n{err}");
    wait_state(&t, "long-one", pb::JobState::Cancelled, 60).await;
    let (status, out, _) = ctl(&["train", "get", "long-one"]);
    assert!(status.success() && out.starts_with("job long-one  CANCELLED"), "{out}");

    let (status, _, err) = ctl(&["train", "get", "no-such-job"]);
    assert!(!status.success());
    assert!(err.contains("NotFound") && err.contains("no job 'no-such-job'"), "{err}");
    let mut absurd = vec!["train", "start", "--datalist", &datalist, "--lr", "50"];
    absurd.extend(small);
    let (status, _, err) = ctl(&absurd);
    assert!(!status.success());
    assert!(err.contains("InvalidArgument") && err.contains("hyperparameters.learning_rate"), "{err}");
    t.stop();
}

/// One default model name across the platform: a job trained and promoted with the default
/// registration (no model name) is the model an inference service started with the default
/// model and alias serves. (The trainer used to register `brats_mri_segmentation` while
/// inference served `segresnet`: a model promoted with default settings was never served.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_trained_with_defaults_is_served_by_inference_with_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let datalist = dataset(&data, 1, 1);
    let store = dir.path().join("store");
    let t = Trainer::start(dir.path(), &store, real_worker().as_deref(), "").await;
    let mut client = t.client().await;
    let mut s = spec(&datalist, 1);
    s.registration = Some(pb::ModelRegistration { promote_to_production: true, ..Default::default() });
    let job = client.start_job(start_req(s)).await.unwrap().into_inner();
    watch_all(&mut client, &job.id, 0, 300).await;
    let done = get(&mut client, &job.id).await;
    assert_eq!(done.state(), pb::JobState::Succeeded, "{}\n{}", done.failure_reason, t.log_text());
    let registered = done.registered_model.unwrap();
    assert_eq!(registered.name, brats_artifacts::registry::DEFAULT_MODEL_NAME);

    // Only where it listens, what it reads and writes, and the window (the tiny model was
    // trained on 32³) differ from the defaults; the model and alias are the defaults.
    let cfg = brats_inference::config::InferenceConfig {
        server: brats_service::ServerConfig::new("127.0.0.1:0", "", 60),
        registry: file_uri(&store.join("models")),
        output_root: file_uri(&dir.path().join("predictions")),
        roi: [32, 32, 32],
        warmup_shape: Some([32, 32, 32]),
        intra_threads: 2,
        ..Default::default()
    };
    let defaults = brats_inference::config::InferenceConfig::default();
    assert_eq!((cfg.model.as_str(), cfg.alias.as_str()), (defaults.model.as_str(), defaults.alias.as_str()));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(brats_inference::server::serve(
        cfg,
        async {
            let _ = stop_rx.await;
        },
        Some(addr_tx),
    ));
    let url = format!("http://{}", addr_rx.await.unwrap());
    let mut inference = brats_proto::v1::inference_client::InferenceClient::connect(url).await.unwrap();
    let list: serde_json::Value = serde_json::from_slice(&std::fs::read(data.join("datalist.json")).unwrap()).unwrap();
    let case = &list["validation"][0];
    let image_uris =
        case["image"].as_array().unwrap().iter().map(|p| file_uri(&data.join(p.as_str().unwrap()))).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let response = loop {
        let req = pb::SegmentRequest { image_uris: Vec::clone(&image_uris), ..Default::default() };
        match inference.segment(req).await {
            Ok(r) => break r.into_inner(),
            // Warming up the promoted model: not yet serving.
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(s) => panic!("segment with the default model: {s:?}"),
        }
    };
    assert_eq!(
        (response.model_name.as_str(), response.model_version.as_str()),
        (registered.name.as_str(), registered.version.as_str())
    );
    assert!(response.label_map_uri.ends_with("seg.nii.gz"), "{}", response.label_map_uri);
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
    t.stop();
}
