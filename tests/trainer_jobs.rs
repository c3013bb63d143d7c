//! The trainer's real-training lifecycle end to end: jobs that train the tiny SegResNet on the
//! CPU with the real `brats-trainer worker` and register a model that learned, a trainer killed
//! mid-training that resumes, a job against S3 (moto), `bratsctl train`, and a default-named
//! model served by inference. The harness is shared with `trainer_service.rs`.

mod common;
mod trainer_harness;

use brats_proto::v1 as pb;
use common::secured::bratsctl_flags;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};
use tonic::Code;
use trainer_harness::*;

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
    let (url, security) = (t.url.clone(), bratsctl_flags(&t.admin()));
    let ctl = move |args: &[&str]| {
        let out = Command::new(bratsctl_exe()).args(&security).args(args).args(["--server", &url]).output().unwrap();
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
    let defaults = brats_inference::config::InferenceConfig::default();
    let server = InferenceServer::start(|c| {
        c.registry = file_uri(&store.join("models"));
        assert_eq!((c.model.as_str(), c.alias.as_str()), (defaults.model.as_str(), defaults.alias.as_str()));
    })
    .await;
    let mut inference = server.client().await;
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
    server.stop().await;
    t.stop();
}
