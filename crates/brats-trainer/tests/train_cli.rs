//! `brats-trainer train` end to end on synthetic BraTS-like data: it learns, two Gloo ranks
//! (started by hand with torchrun's variables, or as two nodes by `brats-trainer node` from
//! Kubeflow's) equal one process on the concatenated batch, a second run resumes, bad input is
//! refused, the ranks it launches itself stop together when one of them dies, and so do nodes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use brats_train::checkpoint;

/// The test network: SegResNet with three levels and 8 filters (MONAI's class, smaller).
const SMALL: &str = r#"{"init_filters":8,"blocks_down":[1,1,1],"blocks_up":[1,1]}"#;
const SMALL_NO_DROPOUT: &str = r#"{"init_filters":8,"blocks_down":[1,1,1],"blocks_up":[1,1],"dropout_prob":null}"#;

fn trainer() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_brats-trainer"));
    c.env_remove("WORLD_SIZE").env_remove("RANK").env_remove("LOCAL_RANK").env_remove("LOCAL_WORLD_SIZE");
    c
}

/// `brats-trainer train` on CPU with 16³ crops and validation windows, the flags every small
/// run here shares; tests add what they vary.
fn train_16(datalist: &Path, epochs: &str, out: &Path) -> Command {
    let mut c = trainer();
    c.args(["train", "--datalist"]).arg(datalist).args(["--epochs", epochs]);
    c.args(["--crop", "16,16,16", "--val-roi", "16,16,16", "--devices", "cpu", "--out"]).arg(out);
    c
}

fn dataset(dir: &Path, shape: [usize; 3], training: usize, validation: usize) -> PathBuf {
    brats_preprocess::synthetic::write_dataset(dir, shape, 100, training, validation).unwrap()
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "status {}\nstdout {}\nstderr {err}", o.status, String::from_utf8_lossy(&o.stdout));
    format!("{}{err}", String::from_utf8_lossy(&o.stdout))
}

fn checkpoint_weights(out: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(out.join("checkpoints/latest.safetensors")).unwrap();
    let ck = checkpoint::from_bytes(&bytes, "latest").unwrap();
    ck.weights.iter().map(|(n, t)| (n.to_string(), t.to_f32_vec().unwrap())).collect()
}

fn metrics(out: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(out.join("metrics.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

/// It learns, whatever the seed: the demo's recipe (a few minutes of CPU training on 16
/// synthetic 32³ cases) reaches a mean validation Dice of at least 0.8 for training seeds 1 and
/// 4 — the two whose TC or ET channel collapsed before the synthetic regions got a minimum size
/// (benchmarks/trainer/seeds.sh sweeps seeds 0–4) — and the run leaves every artefact.
#[test]
fn learns_synthetic_brats_to_dice_above_0_8_for_every_seed() {
    let dir = tempfile::tempdir().unwrap();
    let datalist = dataset(&dir.path().join("data"), [32, 32, 32], 12, 4);
    for seed in ["1", "4"] {
        let out = dir.path().join(format!("run-{seed}"));
        let started = std::time::Instant::now();
        let o = trainer()
            .args(["train", "--datalist"])
            .arg(&datalist)
            .args(["--epochs", "25", "--lr", "5e-3", "--crop", "32,32,32", "--val-roi", "32,32,32", "--devices", "cpu"])
            .args(["--val-interval", "5", "--seed", seed, "--model", SMALL, "--out"])
            .arg(&out)
            .output()
            .unwrap();
        let text = ok(&o);
        let rows = metrics(&out);
        assert_eq!(rows.len(), 25, "{text}");
        let best =
            |column: usize| rows.iter().filter_map(|r| r[column].parse::<f64>().ok()).fold(f64::NEG_INFINITY, f64::max);
        let (tc, wt, et, mean) = (best(3), best(4), best(5), best(6));
        eprintln!(
            "seed {seed}: best Dice mean {mean:.4} (TC {tc:.4}, WT {wt:.4}, ET {et:.4}) in {:.0} s",
            started.elapsed().as_secs_f64()
        );
        assert!(mean >= 0.8, "seed {seed}: best mean validation Dice {mean:.4} < 0.8\n{text}");
        assert!(tc.min(wt).min(et) >= 0.05, "seed {seed}: a region collapsed (TC {tc}, WT {wt}, ET {et})");
        for f in ["best.safetensors", "model.onnx", "metadata.json", "metrics.csv", "curves.png"] {
            assert!(out.join(f).exists(), "{f} missing");
        }
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("metadata.json")).unwrap()).unwrap();
        assert!(meta["training"]["validation_dice"]["mean"].as_f64().unwrap() >= 0.8, "{meta}");
        let png = std::fs::read(out.join("curves.png")).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
}

/// Two processes with Gloo (batch 1 each) produce, after a step, the gradients and weights of one
/// process on the concatenated batch (batch 2): DDP's equivalence, with real c10d collectives.
///
/// Adam's first step moves every weight by about lr·sign(g), so a weight whose two per-sample
/// gradients nearly cancel amplifies the last-bit differences of batch-2 vs batch-1 convolutions
/// (1e-3 gave 1.2e-5): the step uses lr 1e-5, and the averaged gradients themselves (Adam's first
/// moment, 0.1·g) are compared too.
#[test]
fn two_gloo_ranks_equal_one_process_on_the_concatenated_batch() {
    let dir = tempfile::tempdir().unwrap();
    let datalist = dataset(&dir.path().join("data"), [24, 24, 24], 4, 0);
    let common = |out: &Path, batch: &str| {
        let mut c = train_16(&datalist, "1", out);
        c.args(["--max-steps-per-epoch", "1", "--lr", "1e-5", "--seed", "3", "--model", SMALL_NO_DROPOUT])
            .args(["--batch-size", batch])
            .env("OMP_NUM_THREADS", "1");
        c
    };
    let single = dir.path().join("single");
    ok(&common(&single, "2").output().unwrap());

    let ddp = dir.path().join("ddp");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            let mut c = common(&ddp, "1");
            c.env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("WORLD_SIZE", "2")
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("BRATS_DIST_TIMEOUT_S", "60")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for r in ranks {
        ok(&r.wait_with_output().unwrap());
    }
    assert_one_step_equal(&single, &ddp);

    // The same two ranks as two nodes of a Kubeflow TrainJob: each `brats-trainer node` reads
    // its place from PET_* and starts its worker with torchrun's variables.
    let nodes_out = dir.path().join("nodes");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let nodes: Vec<_> = (0..2)
        .map(|node| {
            let mut c = as_node(&common(&nodes_out, "1"), &["--rdzv-timeout-s", "60"]);
            pet(&mut c, 2, node, port)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (node, n) in nodes.into_iter().enumerate() {
        let text = ok(&n.wait_with_output().unwrap());
        let expected = format!("node {node} of 2 (kubeflow): 1 worker(s) on cpu, ranks {node}..{node} of 2");
        assert!(text.contains(&expected), "{text}");
    }
    assert_one_step_equal(&single, &nodes_out);
}

/// `brats-trainer node FLAGS -- <the train command's arguments>`, with its environment.
fn as_node(train: &Command, flags: &[&str]) -> Command {
    let mut c = trainer();
    c.arg("node").args(flags).arg("--").args(train.get_args());
    for (k, v) in train.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

/// Kubeflow Trainer's variables for node `node` of `nnodes`, one CPU worker each, rank 0 on
/// loopback at `port`.
fn pet(c: &mut Command, nnodes: usize, node: usize, port: u16) -> &mut Command {
    c.env("PET_NNODES", nnodes.to_string())
        .env("PET_NPROC_PER_NODE", "1")
        .env("PET_NODE_RANK", node.to_string())
        .env("PET_MASTER_ADDR", "127.0.0.1")
        .env("PET_MASTER_PORT", port.to_string())
}

/// Inconsistent node settings fail at once, naming the setting, before any worker starts (no
/// output written); nodes that disagree on the workers per node fail within the rendezvous
/// timeout with the settings to check, never hang.
#[test]
fn a_node_with_inconsistent_settings_fails_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let datalist = dataset(&dir.path().join("data"), [16, 16, 16], 2, 1);
    let out = dir.path().join("run");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let run = |c: &mut Command| {
        let started = std::time::Instant::now();
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!o.status.success(), "{err}");
        assert!(started.elapsed().as_secs() < 10, "took {:?}: {err}", started.elapsed());
        err
    };
    let train = train_16(&datalist, "1", &out);
    let err = run(pet(&mut as_node(&train, &[]), 2, 2, port));
    assert!(err.contains("node_rank=\"2\": must be below the node count 2"), "{err}");
    let err = run(pet(&mut as_node(&train, &[]), 2, 0, port).env("WORLD_SIZE", "8"));
    assert!(err.contains("WORLD_SIZE=\"8\": does not add up: 2 node(s) × 1 worker(s) per node = 2"), "{err}");
    let err = run(&mut as_node(&train, &["--nproc-per-node", "many"]));
    assert!(err.contains("nproc_per_node=\"many\": expected a number"), "{err}");
    let mut slurm = as_node(&train, &[]);
    slurm
        .env("SLURM_NNODES", "2")
        .env("SLURM_NTASKS", "4")
        .env("SLURM_NODEID", "0")
        .env("SLURM_JOB_NODELIST", "n[1-2]");
    let err = run(&mut slurm);
    assert!(err.contains("SLURM_NTASKS") && err.contains("--ntasks-per-node=1"), "{err}");
    if !Path::new("/dev/nvidia0").exists() {
        let err = run(&mut as_node(&train, &["--nproc-per-node", "gpu"]));
        assert!(err.contains("no CUDA device"), "{err}");
    }
    let err = run(trainer().args(["node", "--", "serve"]));
    assert!(err.contains("must be `train …`"), "{err}");
    assert!(!out.exists(), "a refused node wrote {}", out.display());

    // Node 0 starts one worker, node 1 two: the world sizes differ (2 against 4).
    let started = std::time::Instant::now();
    let nodes: Vec<_> = [("0", "1"), ("1", "2")]
        .into_iter()
        .map(|(node, nproc)| {
            let mut c =
                as_node(train_16(&datalist, "1", &out).env("OMP_NUM_THREADS", "1"), &["--rdzv-timeout-s", "10"]);
            pet(&mut c, 2, 0, port)
                .env("PET_NODE_RANK", node)
                .env("PET_NPROC_PER_NODE", nproc)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for n in nodes {
        let o = n.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{err}");
        assert!(err.contains("could not rendezvous") || err.contains("WORLD_SIZE"), "{err}");
    }
    let seconds = started.elapsed().as_secs_f64();
    eprintln!("mismatched nodes failed in {seconds:.1} s");
    assert!(seconds < 60.0, "mismatched nodes took {seconds:.0} s to fail");
}

/// A worker that dies fails its node at once, naming its rank and node; the other node's
/// worker fails in its next collective, so the whole job ends instead of hanging.
#[test]
fn a_dead_worker_fails_its_node_and_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let datalist = dataset(&dir.path().join("data"), [16, 16, 16], 2, 1);
    let out = dir.path().join("run");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let started = std::time::Instant::now();
    let nodes: Vec<_> = (0..2)
        .map(|node| {
            let mut c =
                as_node(train_16(&datalist, "500", &out).env("OMP_NUM_THREADS", "1"), &["--rdzv-timeout-s", "30"]);
            pet(&mut c, 2, node, port)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let worker = loop {
        let found: Vec<u32> =
            children(nodes[1].id()).into_iter().filter(|&p| rank_of(p).as_deref() == Some("1")).collect();
        if let Some(&p) = found.first() {
            break p;
        }
        assert!(started.elapsed().as_secs() < 60, "node 1's worker did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // Let the two workers meet and train a little.
    std::thread::sleep(std::time::Duration::from_secs(3));
    // SAFETY: kill(2) on a process this test found among its child's children.
    assert_eq!(unsafe { libc::kill(worker as i32, libc::SIGKILL) }, 0);
    let mut nodes = nodes.into_iter();
    let (node0, node1) = (nodes.next().unwrap(), nodes.next().unwrap());
    let o = node1.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("worker rank 1 on node 1 (local rank 0)") && err.contains("SIGKILL"), "{err}");
    let o = node0.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    let seconds = started.elapsed().as_secs_f64();
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("worker rank 0 on node 0"), "{err}");
    eprintln!("both nodes failed {seconds:.1} s after the start; node 0: {}", err.lines().last().unwrap_or(""));
    assert!(seconds < 90.0, "node 0 took {seconds:.0} s to fail");
}

/// After one step, the weights and Adam's first moments (0.1·g, the averaged gradients) of a
/// multi-rank run `ddp` equal those of one process `single` on the concatenated batch.
fn assert_one_step_equal(single: &Path, ddp: &Path) {
    let a = checkpoint_weights(single);
    let b = checkpoint_weights(ddp);
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((x - y).abs());
        }
    }
    eprintln!("max |single - ddp| = {worst:.3e}");
    assert!(worst <= 1e-6, "weights differ by {worst:e}");
    // The averaged gradients: Adam's first moments after one step are 0.1·g.
    let moments = |out: &Path| {
        let ck =
            checkpoint::from_bytes(&std::fs::read(out.join("checkpoints/latest.safetensors")).unwrap(), "ck").unwrap();
        assert_eq!(ck.state.global_step, 1);
        ck.optimizer_tensors
            .into_iter()
            .filter(|(n, _)| n.starts_with("exp_avg."))
            .map(|(n, t)| (n, Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()))
            .collect::<Vec<_>>()
    };
    let (ma, mb) = (moments(single), moments(ddp));
    assert_eq!(ma.len(), a.len());
    let (mut worst_grad, mut largest) = (0f32, 0f32);
    for ((na, va), (nb, vb)) in ma.iter().zip(&mb) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            worst_grad = worst_grad.max((x - y).abs());
            largest = largest.max(x.abs());
        }
    }
    eprintln!("max |m_single - m_ddp| = {worst_grad:.3e} (largest |m| {largest:.3e})");
    assert!(largest > 1e-4, "the gradients are all ~zero: nothing was compared");
    assert!(worst_grad <= 1e-6, "averaged gradients differ by {worst_grad:e}");
}

/// A second run into the same folder resumes from its latest checkpoint instead of starting over.
#[test]
fn rerun_resumes_from_the_latest_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let datalist = dataset(&dir.path().join("data"), [16, 16, 16], 2, 1);
    let out = dir.path().join("run");
    let run = |epochs: &str| train_16(&datalist, epochs, &out).args(["--model", SMALL]).output().unwrap();
    ok(&run("2"));
    assert_eq!(metrics(&out).len(), 2);
    let text = ok(&run("3"));
    assert!(text.contains("resumed from") && text.contains("after epoch 2"), "{text}");
    let rows = metrics(&out);
    assert_eq!(rows.iter().map(|r| r[0].as_str()).collect::<Vec<_>>(), ["1", "2", "3"]);
}

/// `--lr-schedule warmup-cosine` moves the rate every step: over 4 epochs of 2 steps with 4
/// warm-up steps, the epochs start at steps 0, 2, 4, 6, i.e. at 0, half, all and half the rate.
#[test]
fn warmup_cosine_moves_the_rate_per_step() {
    let dir = tempfile::tempdir().unwrap();
    let datalist = dataset(&dir.path().join("data"), [16, 16, 16], 2, 1);
    let out = dir.path().join("run");
    let o = train_16(&datalist, "4", &out)
        .args(["--lr", "1e-2", "--lr-schedule", "warmup-cosine", "--warmup-steps", "4", "--val-interval", "4"])
        .args(["--model", SMALL])
        .output()
        .unwrap();
    let text = ok(&o);
    let lrs: Vec<f64> = metrics(&out).iter().map(|r| r[2].parse().unwrap()).collect();
    let expected = [0.0, 5e-3, 1e-2, 5e-3];
    assert!(lrs.iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-12), "{lrs:?}\n{text}");
}

/// Streaming the cases from the store trains exactly as holding them in memory does: same
/// seed, same samples, bit-identical weights after two epochs.
#[test]
fn streamed_cases_train_like_cases_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let datalist = dataset(&dir.path().join("data"), [16, 16, 16], 3, 1);
    let run = |cache: &str| {
        let out = dir.path().join(cache);
        let o = train_16(&datalist, "2", &out)
            .args(["--seed", "3", "--case-cache", cache, "--model", SMALL_NO_DROPOUT])
            .output()
            .unwrap();
        (ok(&o), checkpoint_weights(&out))
    };
    let (memory_log, memory) = run("memory");
    let (stream_log, stream) = run("stream");
    assert!(memory_log.contains("cases in memory"), "{memory_log}");
    assert!(stream_log.contains("cases streamed from the store"), "{stream_log}");
    assert_eq!(memory.len(), stream.len());
    for ((name, a), (_, b)) in memory.iter().zip(&stream) {
        assert_eq!(a, b, "{name} differs between memory and stream");
    }
}

#[test]
fn bad_input_is_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let datalist = dataset(&dir.path().join("data"), [16, 16, 16], 1, 0);
    let cases: [(&[&str], &str); 4] = [
        (&["--datalist", "/nonexistent/datalist.json"], "datalist"),
        (&["--devices", "cuda:0"], "cuda:0 is not present"),
        (&["--lr", "50"], "learning_rate"),
        (&["--crop", "20,16,16"], "data.crop.size"),
    ];
    for (args, expect) in cases {
        let mut c = trainer();
        c.args(["train", "--datalist"]).arg(&datalist).args(["--epochs", "1", "--val-roi", "16,16,16"]);
        if !args.contains(&"--crop") {
            c.args(["--crop", "16,16,16"]);
        }
        let o = c.args(args).arg("--out").arg(dir.path().join("out")).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(expect), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// The child processes of `pid` (of any of its threads: the launcher forks from its own thread).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| s.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>())
        .collect()
}

/// The `RANK` a process was started with.
fn rank_of(pid: u32) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ.split(|&b| b == 0).find_map(|kv| kv.strip_prefix(b"RANK=").map(|v| String::from_utf8_lossy(v).into_owned()))
}

/// `LOCAL_WORLD_SIZE=2 … --devices cpu` starts two Gloo ranks through the service's launcher;
/// they train together and the command succeeds.
#[test]
fn local_world_size_starts_cpu_ranks_that_train_together() {
    let dir = tempfile::tempdir().unwrap();
    let datalist = dataset(&dir.path().join("data"), [16, 16, 16], 2, 1);
    let out = dir.path().join("run");
    let o = train_16(&datalist, "1", &out)
        .args(["--model", SMALL])
        .env("LOCAL_WORLD_SIZE", "2")
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    let text = ok(&o);
    assert!(text.contains("world size 2"), "{text}");
    assert_eq!(metrics(&out).len(), 1);
}

/// A rank that dies takes its peers down at once: the launcher kills rank 0, which would
/// otherwise wait in its next collective for the c10d timeout (300 s), and the command fails
/// naming the dead rank.
#[test]
fn a_dead_rank_ends_an_offline_multi_rank_run_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let datalist = dataset(&dir.path().join("data"), [16, 16, 16], 2, 1);
    let started = std::time::Instant::now();
    let parent = train_16(&datalist, "500", &dir.path().join("run"))
        .args(["--model", SMALL])
        .env("LOCAL_WORLD_SIZE", "2")
        .env("OMP_NUM_THREADS", "1")
        .env_remove("BRATS_DIST_TIMEOUT_S")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ranks = loop {
        let ranks: Vec<(u32, String)> =
            children(parent.id()).into_iter().filter_map(|p| Some((p, rank_of(p)?))).collect();
        if ranks.len() == 2 {
            break ranks;
        }
        assert!(started.elapsed().as_secs() < 60, "the ranks did not start: {ranks:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let (rank0, _) = *ranks.iter().find(|(_, r)| r == "0").unwrap();
    let (rank1, _) = *ranks.iter().find(|(_, r)| r == "1").unwrap();
    // Rank 0 is preprocessing or already waiting for rank 1 in the rendezvous.
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SAFETY: kill(2) on a process this test found among its child's children.
    assert_eq!(unsafe { libc::kill(rank1 as i32, libc::SIGKILL) }, 0);
    let o = parent.wait_with_output().unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(seconds < 60.0, "took {seconds:.0} s: rank 0 waited for the dead rank\n{err}");
    assert!(err.contains("rank 1") && err.contains("SIGKILL"), "{err}");
    assert!(!Path::new(&format!("/proc/{rank0}")).exists(), "rank 0 outlived the run");
}
