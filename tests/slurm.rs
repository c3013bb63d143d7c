//! Training on a real Slurm: a two-node cluster started on this machine by
//! `scripts/slurm/cluster.sh` (munge, slurmctld and two slurmd from Debian's slurm-wlm), with
//! Gloo on CPU between the nodes.
//!
//! - Two nodes through `sbatch`/`srun` reach the same weights and averaged gradients after one
//!   step as one process on the concatenated batch (the node launcher reads `SLURM_*`).
//! - A trainer-service job with backend SLURM: submitted as an sbatch job of two nodes,
//!   followed to a registered model; more nodes than `[cluster.slurm] max_nodes` is refused.
//! - `scancel` mid-epoch (outside the trainer): the job fails with Slurm's reason and
//!   ResumeJob finishes it from its checkpoint.
//! - A worker killed on node 1: the job fails naming the rank and the node, the cause first (node
//!   0's worker then fails too, its collective broken).
//!
//! The cluster needs root (it runs daemons and installs slurm-wlm and munge when missing).

mod common;
mod trainer_harness;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use brats_proto::v1 as pb;
use common::{file_uri, free_port};
use trainer_harness::{Trainer, get, start_req, trainer_exe, wait_state, watch_all, watch_until};

/// A running test cluster; stopped when dropped.
struct Cluster {
    dir: PathBuf,
    env: Vec<(String, String)>,
}

impl Cluster {
    fn up(dir: &Path) -> Cluster {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let o = Command::new("bash").arg(root.join("scripts/slurm/cluster.sh")).arg("up").arg(dir).output().unwrap();
        assert!(
            o.status.success(),
            "scripts/slurm/cluster.sh up failed:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let env = String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Cluster { dir: dir.to_path_buf(), env }
    }

    /// A Slurm command with the cluster's environment.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let _ = Command::new("bash").arg(root.join("scripts/slurm/cluster.sh")).arg("down").arg(&self.dir).status();
    }
}

const SMALL_NO_DROPOUT: &str = r#"{"init_filters":8,"blocks_down":[1,1,1],"blocks_up":[1,1],"dropout_prob":null}"#;

/// `brats-trainer train` arguments of the one-step equivalence run (as train_cli.rs's).
fn one_step_args(datalist: &Path, out: &Path, batch: &str) -> Vec<String> {
    let mut a: Vec<String> = ["train", "--datalist"].map(String::from).to_vec();
    a.push(datalist.display().to_string());
    a.extend(["--epochs", "1", "--crop", "16,16,16", "--val-roi", "16,16,16", "--devices", "cpu"].map(String::from));
    a.extend(
        ["--max-steps-per-epoch", "1", "--lr", "1e-5", "--seed", "3", "--model", SMALL_NO_DROPOUT].map(String::from),
    );
    a.extend(["--batch-size".to_string(), batch.to_string(), "--out".to_string(), out.display().to_string()]);
    a
}

/// Every f32 tensor of a run's latest checkpoint (weights and Adam's moments), by name.
fn checkpoint_tensors(out: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(out.join("checkpoints/latest.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .filter(|(_, t)| t.dtype() == safetensors::Dtype::F32)
        .map(|(n, t)| (n, t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

fn two_nodes_equal_one_process(cluster: &Cluster, dir: &Path) {
    let datalist = brats_preprocess::synthetic::write_dataset(&dir.join("data"), [24, 24, 24], 100, 4, 0).unwrap();
    let single = dir.join("single");
    let o = Command::new(trainer_exe())
        .args(one_step_args(&datalist, &single, "2"))
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let nodes = dir.join("nodes");
    let args: Vec<String> = one_step_args(&datalist, &nodes, "1").iter().map(|a| format!("'{a}'")).collect();
    let script = format!(
        "#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n#SBATCH --output={out}/equivalence-%j.out\n\
         export OMP_NUM_THREADS=1\n\
         srun --kill-on-bad-exit=1 {exe} node --nproc-per-node 1 --master-port {port} --rdzv-timeout-s 60 -- {args}\n",
        out = dir.display(),
        exe = trainer_exe().display(),
        port = free_port(),
        args = args.join(" ")
    );
    let path = dir.join("equivalence.sbatch");
    std::fs::write(&path, script).unwrap();
    let started = Instant::now();
    // --wait: sbatch returns when the job ends, with its exit code.
    let o = cluster.command("sbatch").args(["--parsable", "--wait"]).arg(&path).output().unwrap();
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let log = std::fs::read_to_string(dir.join(format!("equivalence-{id}.out"))).unwrap_or_default();
    assert!(o.status.success(), "the two-node sbatch job failed: {}\n{log}", String::from_utf8_lossy(&o.stderr));
    eprintln!("two-node Slurm job {id} took {:.1} s", started.elapsed().as_secs_f64());
    for node in 0..2 {
        let line = format!("node {node} of 2 (slurm): 1 worker(s) on cpu, ranks {node}..{node} of 2");
        assert!(log.contains(&line), "missing {line:?} in\n{log}");
    }
    let (a, b) = (checkpoint_tensors(&single), checkpoint_tensors(&nodes));
    assert_eq!(a.iter().map(|t| &t.0).collect::<Vec<_>>(), b.iter().map(|t| &t.0).collect::<Vec<_>>());
    assert!(a.iter().any(|(n, _)| n.contains("exp_avg.")), "the checkpoint holds Adam's moments");
    let mut worst = 0f32;
    for ((_, x), (_, y)) in a.iter().zip(&b) {
        for (p, q) in x.iter().zip(y) {
            worst = worst.max((p - q).abs());
        }
    }
    eprintln!("two Slurm nodes against one process: max |difference| = {worst:.3e}");
    assert!(worst <= 1e-6, "weights or averaged gradients differ by {worst:e}");
}

/// The service's `[cluster.slurm]` for the test cluster: the node launcher is this build's
/// binary, status polled every second.
fn slurm_section(dir: &Path) -> String {
    format!(
        "[cluster.slurm]\nmax_nodes = 2\npoll_s = 1\nrdzv_timeout_s = 60\nworker_exe = \"{}\"\nworkdir = \"{}\"\n",
        trainer_exe().display(),
        dir.display()
    )
}

fn on_slurm(spec: &mut pb::JobSpec, nodes: u32) {
    spec.placement = Some(pb::Placement { backend: pb::Backend::Slurm as i32, nodes, devices_per_node: 1 });
}

/// The pid of the worker of `job` with `RANK=rank`, once it runs.
fn worker_pid(job: &str, rank: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        if !String::from_utf8_lossy(&cmdline).split('\0').any(|a| a == "worker") {
            return None;
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        let vars: Vec<String> = environ.split(|&b| b == 0).map(|v| String::from_utf8_lossy(v).into_owned()).collect();
        let mine = vars.iter().any(|v| v.starts_with("BRATS_WORKER_OUTBOX=") && v.contains(job));
        (mine && vars.iter().any(|v| *v == format!("RANK={rank}"))).then_some(pid)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_runs_on_a_real_two_node_slurm_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::up(&dir.path().join("slurm"));
    two_nodes_equal_one_process(&cluster, &dir.path().join("equivalence"));

    let store = dir.path().join("store");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let t = Trainer::start_with_env(
        Arc::new(common::secured::setup()),
        dir.path(),
        &file_uri(&store),
        &file_uri(&store.join("models")),
        None,
        &slurm_section(&work),
        &cluster.env,
    )
    .await;
    let mut client = t.client().await;
    let datalist = trainer_harness::dataset(&dir.path().join("data"), 2, 1);

    // More nodes than the cluster section allows: refused before anything is stored.
    let mut spec = trainer_harness::spec(&datalist, 2);
    on_slurm(&mut spec, 3);
    let refused = client.start_job(start_req(spec)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("spec.placement.nodes") && refused.message().contains("at most 2"),
        "{refused:?}"
    );

    // A two-node job, from submission to a registered model.
    let mut spec = trainer_harness::spec(&datalist, 2);
    on_slurm(&mut spec, 2);
    spec.registration = Some(pb::ModelRegistration { model_name: "slurm".into(), ..Default::default() });
    let job = client.start_job(start_req(spec)).await.unwrap().into_inner();
    let events = watch_all(&mut client, &job.id, 0, 300).await;
    let done = get(&mut client, &job.id).await;
    assert_eq!(done.state(), pb::JobState::Succeeded, "{}\n{}", done.failure_reason, t.log_text());
    assert!(!done.cluster_job_id.is_empty());
    assert_eq!(done.registered_model.as_ref().map(|m| m.name.as_str()), Some("slurm"));
    let submitted = events.iter().any(|e| match &e.event {
        Some(pb::job_event::Event::Log(l)) => {
            l.message.contains(&format!("submitted to Slurm as {}", done.cluster_job_id))
        }
        _ => false,
    });
    assert!(submitted, "no submission event");
    let script = std::fs::read_to_string(store.join("jobs").join(&job.id).join("cluster/0/job.sbatch")).unwrap();
    assert!(script.contains("#SBATCH --nodes=2") && script.contains("-- worker --job-uri"), "{script}");
    assert!(!script.contains("BRATS_TRAINER_STORE"), "store settings (credentials) stay out of the script");
    let sacct_or_scontrol =
        cluster.command("scontrol").args(["show", "job", "-o", &done.cluster_job_id]).output().unwrap();
    let shown = String::from_utf8_lossy(&sacct_or_scontrol.stdout);
    assert!(shown.contains("NumNodes=2") && shown.contains("JobState=COMPLETED"), "{shown}");

    // scancel mid-training, outside the trainer: FAILED with Slurm's reason; ResumeJob finishes it.
    let mut spec = trainer_harness::spec(&datalist, 6);
    on_slurm(&mut spec, 2);
    let job = client.start_job(start_req(spec)).await.unwrap().into_inner();
    let checkpointed =
        |events: &[pb::JobEvent]| events.iter().any(|e| matches!(e.event, Some(pb::job_event::Event::Checkpoint(_))));
    watch_until(&mut client, &job.id, 0, 300, checkpointed).await;
    let running = get(&mut client, &job.id).await;
    let o = cluster.command("scancel").arg(&running.cluster_job_id).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let failed = wait_state(&t, &job.id, pb::JobState::Failed, 120).await;
    assert!(
        failed.failure_reason.contains(&format!("Slurm job {} ended CANCELLED", running.cluster_job_id)),
        "{}",
        failed.failure_reason
    );
    assert!(failed.epoch < 6, "cancelled mid-training");
    client.resume_job(pb::ResumeJobRequest { job_id: job.id.clone() }).await.unwrap();
    let events = watch_all(&mut client, &job.id, failed.last_sequence + 1, 300).await;
    let resumed = get(&mut client, &job.id).await;
    assert_eq!(resumed.state(), pb::JobState::Succeeded, "{}\n{}", resumed.failure_reason, t.log_text());
    assert_ne!(resumed.cluster_job_id, running.cluster_job_id, "a new submission");
    let first_epoch = events.iter().find_map(|e| match &e.event {
        Some(pb::job_event::Event::Epoch(m)) => Some(m.epoch),
        _ => None,
    });
    assert!(first_epoch.is_some_and(|e| e > 1), "resumed from the checkpoint, not from epoch 1: {first_epoch:?}");

    // A worker killed on node 1: the job fails naming the rank and the node.
    let mut spec = trainer_harness::spec(&datalist, trainer_harness::LONG);
    on_slurm(&mut spec, 2);
    let job = client.start_job(start_req(spec)).await.unwrap().into_inner();
    let deadline = Instant::now() + Duration::from_secs(120);
    let pid = loop {
        if let Some(pid) = worker_pid(&job.id, "1") {
            break pid;
        }
        assert!(Instant::now() < deadline, "rank 1 never started:\n{}", t.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    trainer_harness::wait_step_after(&mut client, &job.id, 0).await;
    assert!(Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());
    let failed = wait_state(&t, &job.id, pb::JobState::Failed, 180).await;
    eprintln!("node failure: {}", failed.failure_reason);
    assert!(
        failed.failure_reason.contains("worker rank 1 on node 1 (local rank 0)")
            && failed.failure_reason.contains("SIGKILL")
            && failed.failure_reason.contains("first node 1 (brats-n2)"),
        "{}",
        failed.failure_reason
    );
    t.stop();
}
