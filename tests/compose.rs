//! The stack as containers, end to end: the images built offline by `scripts/images.sh` from
//! this test build, `docker-compose.yml` brought up on a real Docker engine, driven from the
//! host with `bratsctl` (preprocess a case, train the demo job, register, segment, Dice), then
//! the faults a hospital deployment meets: the preprocessing container gone (inference answers
//! UNAVAILABLE, then recovers), the trainer container restarted mid-job (it resumes from its
//! checkpoint), the object store cut off in the `s3` profile (the job fails with a named reason;
//! `ResumeJob` finishes it). Nothing may be pulled: a `docker events` watcher fails the test on
//! any pull. Where no Docker engine answers the test prints one SKIP line.
//!
//! Each compose project has its own name, host ports and volumes, and is taken down with
//! `down -v` when dropped, even after a failure.

mod common;

use brats_proto::v1 as pb;
use brats_proto::v1::trainer_client::TrainerClient;
use brats_volume::labels::region_dice;
use common::secured::bratsctl;
use common::{free_port, workspace_exe};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The repository root (compose paths are relative to it).
fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Why the test cannot run here, or None when a Docker engine and compose answer.
fn missing_docker() -> Option<String> {
    let engine = Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]).output();
    match engine {
        Ok(o) if o.status.success() => {}
        Ok(_) => return Some("no Docker engine answers (docker info failed)".into()),
        Err(_) => return Some("the docker command is not installed".into()),
    }
    match Command::new("docker-compose").arg("version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("docker-compose (compose v1) is not installed".into()),
    }
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// `docker ARGS`, which must succeed; returns stdout, trimmed.
fn docker(args: &[&str]) -> String {
    let o = Command::new("docker").args(args).output().expect("run docker");
    assert!(o.status.success(), "docker {args:?} failed:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Watches the engine for image pulls from creation to [`PullWatch::assert_none`].
struct PullWatch {
    child: Child,
    log: PathBuf,
}

impl PullWatch {
    fn start(dir: &Path) -> PullWatch {
        let log = dir.join("pulls.log");
        let child = Command::new("docker")
            .args(["events", "--filter", "type=image", "--filter", "event=pull", "--format", "{{.Actor.ID}}"])
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker events");
        PullWatch { child, log }
    }

    fn assert_none(mut self) {
        std::thread::sleep(Duration::from_secs(1)); // events are delivered asynchronously
        let _ = self.child.kill();
        let _ = self.child.wait();
        let pulls = std::fs::read_to_string(&self.log).unwrap_or_default();
        assert!(pulls.trim().is_empty(), "images were pulled, which no registry here allows: {pulls}");
    }
}

/// One compose project: `docker-compose -p NAME -f docker-compose.yml [-f OVERRIDE]
/// [--env-file FILE] …` with its own host ports; `down -v` on drop.
struct Stack {
    project: String,
    overrides: Vec<&'static str>,
    env_file: Option<&'static str>,
    env: Vec<(String, String)>,
    /// Host ports by service: gRPC.
    ports: std::collections::BTreeMap<&'static str, u16>,
}

impl Stack {
    fn new(name: &str, overrides: Vec<&'static str>, env_file: Option<&'static str>, config: &Path) -> Stack {
        let project = format!("bratse2e{name}{}", std::process::id());
        let mut ports = std::collections::BTreeMap::new();
        let mut env = vec![
            ("BRATS_TAG".to_string(), "e2e".to_string()),
            ("BRATS_CONFIG_DIR".to_string(), config.display().to_string()),
        ];
        for (service, var, metrics) in [
            ("preprocess", "BRATS_PREPROCESS_PORT", "BRATS_PREPROCESS_METRICS_PORT"),
            ("trainer", "BRATS_TRAINER_PORT", "BRATS_TRAINER_METRICS_PORT"),
            ("inference", "BRATS_INFERENCE_PORT", "BRATS_INFERENCE_METRICS_PORT"),
            ("moto", "BRATS_S3_PORT", "BRATS_UNUSED_METRICS_PORT"),
        ] {
            let port = free_port();
            ports.insert(service, port);
            env.push((var.to_string(), port.to_string()));
            env.push((metrics.to_string(), free_port().to_string()));
        }
        // The test machine has 2 cores and 24 GB: the services' default limits fit it.
        Stack { project, overrides, env_file, env, ports }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("docker-compose");
        c.current_dir(repo()).args(["-p", &self.project, "-f", "docker-compose.yml"]);
        for o in &self.overrides {
            c.args(["-f", o]);
        }
        if let Some(f) = self.env_file {
            c.args(["--env-file", f]);
        }
        c.args(args).envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c
    }

    /// `docker-compose ARGS`, which must succeed; returns its output.
    fn compose(&self, args: &[&str]) -> String {
        let o = self.command(args).output().expect("run docker-compose");
        assert!(o.status.success(), "docker-compose {args:?} failed:\n{}", text(&o));
        text(&o)
    }

    fn url(&self, service: &str) -> String {
        format!("http://127.0.0.1:{}", self.ports[service])
    }

    fn container(&self, service: &str) -> String {
        let id = self.compose(&["ps", "-q", service]).trim().to_string();
        assert!(!id.is_empty(), "{service} has no container");
        id
    }

    /// The container's health (`healthy`, `unhealthy`, `starting`) or, without a health
    /// check, its state.
    fn health(&self, service: &str) -> String {
        docker(&[
            "inspect",
            "-f",
            "{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}",
            &self.container(service),
        ])
    }

    /// Waits until every service in `services` is healthy; returns how long that took.
    fn wait_healthy(&self, services: &[&str], within: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let states: Vec<String> = services.iter().map(|s| self.health(s)).collect();
            if states.iter().all(|s| s == "healthy") {
                return started.elapsed();
            }
            if started.elapsed() > within {
                let logs = self.compose(&["logs", "--tail", "30"]);
                panic!("{services:?} not healthy within {within:?}: {states:?}\n{logs}");
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// The compose network's name.
    fn network(&self) -> String {
        format!("{}_brats", self.project)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let o = self.command(&["down", "-v", "--remove-orphans", "-t", "5"]).output();
        if let Ok(o) = o
            && !o.status.success()
        {
            eprintln!("docker-compose down failed: {}", text(&o));
        }
    }
}

/// The services' configuration files as the stack mounts them: `deploy/*.toml` with the
/// inference window and warm-up at the test cases' 32³ (the default 240×240×160 window would
/// pad every case to 9 M voxels on this CPU). Readable by the containers' user.
fn test_config(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let config = dir.join("config");
    std::fs::create_dir_all(&config).unwrap();
    for service in ["preprocess", "trainer", "inference"] {
        let mut text = std::fs::read_to_string(repo().join(format!("deploy/{service}.toml"))).unwrap();
        if service == "inference" {
            assert!(text.contains("roi = [240, 240, 160]"), "deploy/inference.toml changed its roi line");
            text = text.replace("roi = [240, 240, 160]", "roi = [32, 32, 32]\nwarmup_shape = [32, 32, 32]");
        }
        std::fs::write(config.join(format!("{service}.toml")), text).unwrap();
    }
    for p in [dir, config.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    config
}

/// Makes sure this test build's binaries are current (cargo builds them once per run).
fn build_binaries() {
    for (package, bin) in [
        ("brats-preprocessor", "brats-preprocess"),
        ("brats-inference", "brats-inference"),
        ("brats-trainer", "brats-trainer"),
        ("bratsctl", "bratsctl"),
    ] {
        workspace_exe(package, bin);
    }
}

/// Builds (or reuses) the images from this test build's binaries, as tag `e2e`.
fn build_images() -> Duration {
    let started = Instant::now();
    let o = Command::new("bash")
        .current_dir(repo())
        .args(["scripts/images.sh", "--profile", "debug", "--no-build", "--tag", "e2e"])
        .output()
        .expect("run scripts/images.sh");
    assert!(o.status.success(), "scripts/images.sh failed:\n{}", text(&o));
    eprintln!("{}", String::from_utf8_lossy(&o.stderr));
    started.elapsed()
}

/// The job spec of `bratsctl demo` (a small SegResNet on 32³ cases) as `bratsctl train start` flags.
fn demo_job_flags(datalist: &str, epochs: u32) -> Vec<String> {
    [
        "--datalist",
        datalist,
        "--epochs",
        &epochs.to_string(),
        "--lr",
        "5e-3",
        "--crop",
        "32,32,32",
        "--val-roi",
        "32,32,32",
        "--val-interval",
        "5",
        "--devices",
        "cpu",
        "--seed",
        "0",
        "--model",
        r#"{"init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}"#,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Starts a job with `bratsctl train start`; returns its id.
fn start_job(stack: &Stack, flags: &[String], extra: &[&str]) -> String {
    let server = stack.url("trainer");
    let mut args: Vec<&str> = vec!["train", "start", "--server", &server];
    args.extend(flags.iter().map(String::as_str));
    args.extend(extra);
    let (ok, out) = bratsctl(&args);
    assert!(ok, "bratsctl train start failed:\n{out}");
    // "job <id> QUEUED" (see bratsctl's print_job).
    out.split_whitespace()
        .skip_while(|w| *w != "job")
        .nth(1)
        .unwrap_or_else(|| panic!("no job id in bratsctl's output:\n{out}"))
        .to_string()
}

async fn trainer(stack: &Stack) -> TrainerClient<tonic::transport::Channel> {
    TrainerClient::connect(stack.url("trainer")).await.expect("connect to the trainer container")
}

async fn get_job(stack: &Stack, id: &str) -> pb::Job {
    let mut client = trainer(stack).await;
    client.get_job(pb::GetJobRequest { job_id: id.into() }).await.expect("GetJob").into_inner()
}

/// Polls the job until `done(job)` holds (reconnecting through restarts); panics after `within`.
async fn wait_job(stack: &Stack, id: &str, within: Duration, what: &str, done: impl Fn(&pb::Job) -> bool) -> pb::Job {
    let started = Instant::now();
    loop {
        if let Ok(mut client) = TrainerClient::connect(stack.url("trainer")).await
            && let Ok(job) = client.get_job(pb::GetJobRequest { job_id: id.into() }).await
        {
            let job = job.into_inner();
            if done(&job) {
                return job;
            }
            assert!(
                started.elapsed() < within,
                "job {id} not {what} within {within:?}: state {} epoch {} reason {:?}",
                job.state,
                job.epoch,
                job.failure_reason
            );
        } else {
            assert!(started.elapsed() < within, "trainer unreachable for {within:?} while waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every event of a finished job.
async fn job_events(stack: &Stack, id: &str) -> Vec<pb::JobEvent> {
    let mut client = trainer(stack).await;
    let mut stream = client
        .watch_job(pb::WatchJobRequest { job_id: id.into(), from_sequence: 0 })
        .await
        .expect("WatchJob")
        .into_inner();
    let mut events = Vec::new();
    while let Ok(Some(e)) =
        tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("WatchJob stalled")
    {
        events.push(e);
    }
    events
}

fn terminal(job: &pb::Job) -> bool {
    [pb::JobState::Succeeded, pb::JobState::Failed, pb::JobState::Cancelled].iter().any(|s| *s as i32 == job.state)
}

/// The held-out case (not in the training set) on the host; returns its images and its label.
fn held_out_case(dir: &Path) -> ([PathBuf; 4], Vec<u8>) {
    let seed = 1100;
    let case = brats_synthetic::generate(&brats_synthetic::SyntheticSpec::new([32, 32, 32], seed));
    let files = brats_synthetic::write_case(&case, &dir.join("held-out"), &format!("synth-{seed:05}")).unwrap();
    (files.images, case.label.clone())
}

/// Segments `images` through the inference container with `bratsctl segment`; returns the
/// mean Dice against `truth`, or the failure output.
fn segment(stack: &Stack, images: &[PathBuf; 4], truth: &[u8], out: &Path) -> Result<f64, String> {
    let server = stack.url("inference");
    let paths: Vec<String> = images.iter().map(|p| p.display().to_string()).collect();
    let out_s = out.display().to_string();
    let qc = out.with_extension("png");
    let qc_s = qc.display().to_string();
    let mut args = vec!["segment", "--server", &server, "--out", &out_s, "--qc", &qc_s, "--image"];
    args.extend(paths.iter().map(String::as_str));
    let (ok, output) = bratsctl(&args);
    if !ok {
        return Err(output);
    }
    assert!(std::fs::read(&qc).is_ok_and(|b| b.starts_with(b"\x89PNG")), "bratsctl segment --qc wrote no PNG");
    let seg = brats_volume::nifti_io::read_nifti(&std::fs::read(out).unwrap(), "seg", &Default::default()).unwrap();
    let seg: Vec<u8> = seg.data.iter().map(|&v| v as u8).collect();
    let dices =
        [region_dice(&seg, truth, &[1, 4]), region_dice(&seg, truth, &[1, 2, 4]), region_dice(&seg, truth, &[4])];
    Ok(dices.iter().sum::<f64>() / 3.0)
}

/// `Segment` on images in the stack's volume (the RPC that uses the preprocessing service).
async fn segment_uris(stack: &Stack, images: &[String; 4]) -> Result<pb::SegmentResponse, tonic::Status> {
    let mut client = brats_proto::v1::inference_client::InferenceClient::connect(stack.url("inference"))
        .await
        .expect("connect to the inference container");
    let request = pb::SegmentRequest { image_uris: images.to_vec(), ..Default::default() };
    client.segment(request).await.map(|r| r.into_inner())
}

/// Writes the synthetic training set into the stack's `data` volume with the preprocessing
/// image's own `brats-preprocess synth` (a one-off container of the service's configuration).
fn synth_into_volume(stack: &Stack) {
    stack.compose(&[
        "run",
        "--rm",
        "--no-deps",
        "--entrypoint",
        "brats-preprocess",
        "preprocess",
        "synth",
        "--shape",
        "32,32,32",
        "--seed",
        "100",
        "--count",
        "16",
        "--validation",
        "4",
        "--out",
        "/data/synth",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_stack_end_to_end_and_faults() {
    if let Some(why) = missing_docker() {
        eprintln!("SKIP compose end-to-end: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pulls = PullWatch::start(dir.path());
    let config = test_config(dir.path());

    build_binaries();
    let took = build_images();
    eprintln!("compose: images built in {:.0} s", took.as_secs_f64());
    // A second build of an unchanged tree reuses every layer: the same image id.
    let before = docker(&["image", "inspect", "-f", "{{.Id}}", "brats/preprocess:e2e"]);
    build_images();
    assert_eq!(docker(&["image", "inspect", "-f", "{{.Id}}", "brats/preprocess:e2e"]), before, "layers not reused");

    let stack = Stack::new("file", vec![], None, &config);
    let started = Instant::now();
    stack.compose(&["up", "-d", "--no-build"]);
    stack.wait_healthy(&["preprocess", "trainer"], Duration::from_secs(120));
    eprintln!("compose: preprocess and trainer healthy {:.1} s after up", started.elapsed().as_secs_f64());
    // Inference has no model yet: running, not healthy.
    assert_ne!(stack.health("inference"), "healthy", "inference cannot be SERVING without a model");

    // A container whose configuration cannot be read exits non-zero with one line naming it.
    let o = stack
        .command(&["run", "--rm", "--no-deps", "preprocess", "--config", "/etc/brats/config/missing.toml"])
        .output()
        .unwrap();
    let said = text(&o);
    assert!(!o.status.success(), "a missing config must stop the service: {said}");
    let errors: Vec<&str> = said.lines().filter(|l| l.contains("error")).collect();
    assert!(errors.len() == 1 && errors[0].contains("missing.toml"), "one line naming the file: {said}");

    // Preprocess one case from the host: URIs are the containers' view of the shared volume.
    synth_into_volume(&stack);
    let server = stack.url("preprocess");
    let images: Vec<String> =
        ["t1c", "t1n", "t2w", "t2f"].iter().map(|m| format!("file:///data/synth/synth-00100-{m}.nii.gz")).collect();
    let mut args = vec!["preprocess", "--server", &server, "--case-id", "synth-00100", "--image"];
    args.extend(images.iter().map(String::as_str));
    let (ok, out) = bratsctl(&args);
    assert!(ok, "bratsctl preprocess case failed:\n{out}");

    // Train the demo job; restart the trainer container mid-job: it resumes from its checkpoint.
    let flags = demo_job_flags("file:///data/synth/datalist.json", 25);
    let job_id = start_job(&stack, &flags, &["--promote"]);
    let running =
        wait_job(&stack, &job_id, Duration::from_secs(600), "past epoch 4", |j| j.epoch >= 4 || terminal(j)).await;
    assert!(!terminal(&running), "job ended before the restart: {running:?}");
    stack.compose(&["restart", "-t", "30", "trainer"]);
    stack.wait_healthy(&["trainer"], Duration::from_secs(120));
    let job = wait_job(&stack, &job_id, Duration::from_secs(900), "finished", terminal).await;
    assert_eq!(job.state, pb::JobState::Succeeded as i32, "job after the restart: {job:?}");
    let mut epochs_run = std::collections::BTreeMap::<u32, u32>::new();
    for e in job_events(&stack, &job_id).await {
        if let Some(pb::job_event::Event::Epoch(m)) = e.event {
            *epochs_run.entry(m.epoch).or_default() += 1;
        }
    }
    let repeated: Vec<u32> = epochs_run.iter().filter(|(_, n)| **n > 1).map(|(e, _)| *e).collect();
    assert!(repeated.len() <= 1, "the restart lost more than one epoch: epochs run again {repeated:?}");
    assert_eq!(epochs_run.len(), 25, "every epoch ran: {epochs_run:?}");

    // The registered model reaches inference (the alias is polled); segment the held-out case.
    let healthy_in = stack.wait_healthy(&["inference"], Duration::from_secs(180));
    eprintln!("compose: inference healthy {:.1} s after the job", healthy_in.as_secs_f64());
    let (held_out, truth) = held_out_case(dir.path());
    let dice = segment(&stack, &held_out, &truth, &dir.path().join("seg.nii.gz")).expect("segment");
    eprintln!("compose: Dice mean {dice:.3} through the containers");
    assert!(dice > 0.75, "Dice through the containers {dice:.3}");

    // The preprocessing container stops: Segment (which has the preprocessing service prepare
    // its inputs) answers UNAVAILABLE, naming it; once it is back, the same call succeeds.
    let volume_case = ["t1c", "t1n", "t2w", "t2f"].map(|m| format!("file:///data/synth/synth-00101-{m}.nii.gz"));
    stack.compose(&["stop", "-t", "5", "preprocess"]);
    let refused = segment_uris(&stack, &volume_case).await.expect_err("no preprocessing service");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("preprocessing service"), "the message names the service: {refused:?}");
    stack.compose(&["start", "preprocess"]);
    stack.wait_healthy(&["preprocess"], Duration::from_secs(120));
    segment_uris(&stack, &volume_case).await.expect("Segment once preprocessing is back");

    let project = stack.project.clone();
    drop(stack);
    let left = docker(&["ps", "-aq", "--filter", &format!("label=com.docker.compose.project={project}")]);
    assert!(left.is_empty(), "containers left after down -v: {left}");
    let volumes = docker(&["volume", "ls", "-q", "--filter", &format!("label=com.docker.compose.project={project}")]);
    assert!(volumes.is_empty(), "volumes left after down -v: {volumes}");

    tls_variant(dir.path()).await;
    s3_partition(dir.path()).await;
    pulls.assert_none();
}

/// The `tls` override: files from `bratsctl security init`; health checks pass over TLS, a
/// plaintext client is refused, the operator's key preprocesses a case, the trainer reaches
/// preprocessing over mutual TLS, and the audit log verifies.
async fn tls_variant(dir: &Path) {
    let uid = Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if uid.as_deref().unwrap_or("") != "0" {
        eprintln!("compose: SKIP the tls variant: `bratsctl security init --owner 65532:65532` needs root");
        return;
    }
    let tls = dir.join("tls");
    let tls_s = tls.display().to_string();
    let (ok, out) = bratsctl(&["security", "init", "--dir", &tls_s, "--owner", "65532:65532"]);
    assert!(ok, "bratsctl security init: {out}");
    let mut stack = Stack::new("tls", vec!["deploy/compose/tls.yml"], None, &test_config(dir));
    stack.env.push(("BRATS_TLS_DIR".into(), tls_s.clone()));
    stack.compose(&["up", "-d", "--no-build"]);
    stack.wait_healthy(&["preprocess", "trainer"], Duration::from_secs(120));

    let plain = stack.url("preprocess");
    let (ok, out) = bratsctl(&["health", "--server", &plain]);
    assert!(!ok, "a plaintext client reached the TLS port: {out}");
    let secure = plain.replace("http://", "https://");
    let ca = tls.join("ca.pem").display().to_string();
    let key = tls.join("operator.apikey").display().to_string();
    let creds = ["--ca", ca.as_str(), "--tls-domain", "localhost", "--api-key-file", key.as_str()];

    synth_into_volume(&stack);
    let images: Vec<String> =
        ["t1c", "t1n", "t2w", "t2f"].iter().map(|m| format!("file:///data/synth/synth-00101-{m}.nii.gz")).collect();
    let mut args = creds.to_vec();
    args.extend(["preprocess", "--server", &secure, "--case-id", "synth-00101", "--image"]);
    args.extend(images.iter().map(String::as_str));
    let (ok, out) = bratsctl(&args);
    assert!(ok, "preprocess over TLS with the operator's key: {out}");
    let (ok, out) =
        bratsctl(&["preprocess", "--server", &secure, "--ca", &ca, "--case-id", "x", "--image", &images[0]]);
    assert!(!ok && out.contains("Unauthenticated"), "no key must be refused: {out}");

    // The trainer prepares its dataset through preprocessing, over mutual TLS.
    let trainer = stack.url("trainer").replace("http://", "https://");
    let mut args = creds.to_vec();
    args.extend(["train", "start", "--server", &trainer, "--watch", "--max-steps-per-epoch", "2"]);
    let flags = demo_job_flags("file:///data/synth/datalist.json", 1);
    args.extend(flags.iter().map(String::as_str));
    let (ok, out) = bratsctl(&args);
    assert!(ok && out.contains("SUCCEEDED"), "a job over TLS: {out}");

    let audit = dir.join("preprocess-audit.jsonl");
    let records = stack.command(&["exec", "-T", "preprocess", "cat", "/data/audit/preprocess.jsonl"]).output().unwrap();
    assert!(records.status.success(), "read the audit log: {}", text(&records));
    std::fs::write(&audit, &records.stdout).unwrap();
    let (ok, out) = bratsctl(&["audit", "verify", &audit.display().to_string()]);
    assert!(ok, "the preprocessing audit log verifies: {out}");
}

/// The `s3` profile: the services on moto; moto cut off from the network mid-job fails the job
/// with a named reason; reconnected, `ResumeJob` finishes it.
async fn s3_partition(dir: &Path) {
    let stack = Stack::new("s3", vec![], Some("deploy/compose/s3.env"), &test_config(dir));
    stack.compose(&["up", "-d", "--no-build", "moto"]);
    stack.wait_healthy(&["moto"], Duration::from_secs(60));
    // The dataset into the bucket, from the host through moto's published port.
    let data = dir.join("s3-data");
    brats_synthetic::write_dataset(&data, [32, 32, 32], 100, 6, 2).unwrap();
    let stores = brats_core::Stores::new(brats_core::StoreConfig {
        s3_endpoint: Some(stack.url("moto")),
        s3_access_key_id: Some("brats".into()),
        s3_secret_access_key: Some("moto-accepts-any-key".into()),
        ..Default::default()
    });
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        let uri =
            brats_core::StoreUri::parse(&format!("s3://brats/synth/{}", path.file_name().unwrap().to_string_lossy()))
                .unwrap();
        stores.put(&uri, std::fs::read(&path).unwrap().into()).await.unwrap();
    }
    stack.compose(&["up", "-d", "--no-build"]);
    stack.wait_healthy(&["preprocess", "trainer"], Duration::from_secs(120));

    let flags = demo_job_flags("s3://brats/synth/datalist.json", 12);
    let job_id = start_job(&stack, &flags, &[]);
    wait_job(&stack, &job_id, Duration::from_secs(600), "past epoch 1", |j| j.epoch >= 1 || terminal(j)).await;
    let moto = stack.container("moto");
    docker(&["network", "disconnect", &stack.network(), &moto]);
    let failed = wait_job(&stack, &job_id, Duration::from_secs(300), "failed", terminal).await;
    assert_eq!(failed.state, pb::JobState::Failed as i32, "{failed:?}");
    assert_eq!(failed.failure_code, "UNAVAILABLE", "a store that cannot be reached: {failed:?}");
    let reason = failed.failure_reason.to_lowercase();
    assert!(
        reason.contains("store") || reason.contains("s3") || reason.contains("unavailable"),
        "the failure names the store: {}",
        failed.failure_reason
    );

    docker(&["network", "connect", "--alias", "moto", &stack.network(), &moto]);
    let mut client = trainer(&stack).await;
    let resumed = async {
        // The trainer may need a moment to reach the store again.
        for _ in 0..30 {
            match client.resume_job(pb::ResumeJobRequest { job_id: job_id.clone() }).await {
                Ok(_) => return,
                Err(s) if s.code() == tonic::Code::Unavailable => tokio::time::sleep(Duration::from_secs(2)).await,
                Err(s) => panic!("ResumeJob: {s:?}"),
            }
        }
        panic!("ResumeJob stayed UNAVAILABLE after the store came back");
    };
    resumed.await;
    let job = wait_job(&stack, &job_id, Duration::from_secs(900), "finished", terminal).await;
    assert_eq!(job.state, pb::JobState::Succeeded as i32, "after ResumeJob: {job:?}");
    let _ = get_job(&stack, &job_id).await;
}
