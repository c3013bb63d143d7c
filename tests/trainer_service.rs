//! The trainer service end to end: the real `brats-trainer serve` binary on loopback, a local
//! directory store, synthetic NIfTI datasets preprocessed in-process, and every StartJob
//! refusal. Every job runs the real `brats-trainer worker` on a tiny SegResNet (8 filters, one
//! block per level, 32³ crops): jobs that must stay busy while a test queues, lists, cancels or
//! restarts around them are simply given many epochs.

mod common;
mod trainer_harness;

use brats_proto::v1 as pb;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};
use tonic::Code;
use trainer_harness::*;

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
    assert!(e.message().starts_with("datalist_uri: spec.datalist_uri") && !e.message().contains("nope.json"), "{e:?}");

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
    assert!(e.message().starts_with("spec.resume_from: spec.resume_from does not exist"), "{e:?}");

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
