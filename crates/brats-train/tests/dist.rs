//! Multi-process tests of `brats_train::dist` over Gloo on CPU.
//!
//! A test that needs several ranks re-runs this test binary once per rank, filtered to itself,
//! with `BRATS_DIST_TEST_RANK` and torchrun's variables set; the same test function then takes
//! its rank's branch and reports through its exit status, and the parent checks every rank.

use std::collections::HashMap;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use brats_train::dist::{self, BUCKET_CAP_BYTES, Backend, DistEnv, DistError, ProcessGroup, average_gradients};
use tch::{Kind, Tensor};

const ROLE_VAR: &str = "BRATS_DIST_TEST_RANK";

/// This process's rank when it was spawned as one, else `None` (the parent).
fn child_rank() -> Option<usize> {
    std::env::var(ROLE_VAR).ok().map(|r| r.parse().expect("rank"))
}

fn free_port() -> u16 {
    brats_cli::free_port().expect("a free loopback port")
}

struct Rank {
    child: Child,
    rank: usize,
}

/// Starts `world` ranks of `test` and returns each rank's exit success and output, killing any
/// rank still running at `deadline`.
fn run_ranks(test: &str, world: usize, deadline: Duration) -> Vec<(bool, String)> {
    let port = free_port();
    let exe = std::env::current_exe().unwrap();
    let ranks: Vec<Rank> = (0..world)
        .map(|rank| {
            let child = Command::new(&exe)
                .args(["--exact", test, "--nocapture", "--test-threads", "1"])
                .env(ROLE_VAR, rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            Rank { child, rank }
        })
        .collect();
    let start = Instant::now();
    ranks
        .into_iter()
        .map(|mut r| {
            let status = loop {
                if let Some(status) = r.child.try_wait().unwrap() {
                    break Some(status);
                }
                if start.elapsed() > deadline {
                    let _ = r.child.kill();
                    let _ = r.child.wait();
                    break None;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let mut out = String::new();
            r.child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
            r.child.stderr.take().unwrap().read_to_string(&mut out).unwrap();
            let ok = status.is_some_and(|s| s.success());
            if !ok {
                eprintln!("--- rank {} ({:?}) output:\n{out}", r.rank, status);
            }
            (ok, out)
        })
        .collect()
}

fn env_of_child() -> DistEnv {
    DistEnv::from_env().expect("valid torchrun variables").expect("WORLD_SIZE is set")
}

/// Rank r's tensor number i: arange scaled by (r + 1), plus r, so the mean over ranks 0 and 1 is
/// arange * 1.5 + 0.5, exact in f32 for the sizes used.
fn rank_tensor(shape: &[i64], kind: Kind, rank: usize) -> Tensor {
    let n: i64 = shape.iter().product();
    Tensor::arange(n, (kind, tch::Device::Cpu)).reshape(shape) * (rank as f64 + 1.0) + rank as f64
}

fn mean_tensor(shape: &[i64], kind: Kind) -> Tensor {
    let n: i64 = shape.iter().product();
    Tensor::arange(n, (kind, tch::Device::Cpu)).reshape(shape) * 1.5 + 0.5
}

// (shape, kind): small ones, f64 between f32 runs, and two large ones that force a second f32
// bucket, 38 MB in all.
fn mean_case() -> Vec<(Vec<i64>, Kind)> {
    vec![
        (vec![3, 4], Kind::Float),
        (vec![1000], Kind::Float),
        (vec![7, 1, 5], Kind::Double),
        (vec![3_500_000], Kind::Float),
        (vec![6, 5], Kind::Float),
        (vec![4_000_000], Kind::Float),
        (vec![2, 3, 4], Kind::Float),
    ]
}

#[test]
fn two_ranks_all_reduce_broadcast_and_sums() {
    let Some(rank) = child_rank() else {
        // The plan the ranks will use has more than one bucket per kind, so the test covers
        // bucket boundaries and the kind split.
        let ts: Vec<Tensor> =
            mean_case().iter().map(|(s, k)| Tensor::zeros(s.as_slice(), (*k, tch::Device::Cpu))).collect();
        let plan = dist::buckets(&ts, BUCKET_CAP_BYTES);
        assert_eq!(plan, vec![0..2, 2..3, 3..5, 5..7], "{plan:?}");
        let results = run_ranks("two_ranks_all_reduce_broadcast_and_sums", 2, Duration::from_secs(20));
        for (r, (ok, out)) in results.iter().enumerate() {
            assert!(ok, "rank {r} failed:\n{out}");
            assert!(out.contains("RANK_OK"), "rank {r} did not finish:\n{out}");
        }
        return;
    };
    let env = env_of_child();
    assert_eq!(env.rank, rank);
    let t0 = Instant::now();
    let pg = ProcessGroup::init(&env, Backend::Gloo, Duration::from_secs(10)).unwrap();
    println!("init took {:?}", t0.elapsed());
    assert_eq!((pg.rank(), pg.world_size()), (rank, 2));

    // Mean, including a non-contiguous tensor that must be written back through its strides.
    let case = mean_case();
    let mut ts: Vec<Tensor> = case.iter().map(|(s, k)| rank_tensor(s, *k, rank)).collect();
    ts.push(rank_tensor(&[5, 3], Kind::Float, rank).transpose(0, 1));
    let t = Instant::now();
    pg.all_reduce_mean(&ts).unwrap();
    println!("all_reduce_mean of 38 MB took {:?}", t.elapsed());
    for (i, (s, k)) in case.iter().enumerate() {
        assert!(ts[i].equal(&mean_tensor(s, *k)), "tensor {i} {s:?} is not the exact mean");
    }
    assert!(ts[case.len()].equal(&mean_tensor(&[5, 3], Kind::Float).transpose(0, 1)));

    // Broadcast from rank 0: rank 1's different values (and an integer buffer) become rank 0's.
    let weights = [
        Tensor::full([4, 4], rank as f64 + 10.0, (Kind::Float, tch::Device::Cpu)),
        Tensor::full([3], rank as i64 + 7, (Kind::Int64, tch::Device::Cpu)),
        Tensor::randn([64, 32], (Kind::Float, tch::Device::Cpu)),
    ];
    let before = weights[2].copy();
    pg.broadcast(&weights, 0).unwrap();
    assert!(weights[0].equal(&Tensor::full([4, 4], 10.0, (Kind::Float, tch::Device::Cpu))));
    assert!(weights[1].equal(&Tensor::full([3], 7i64, (Kind::Int64, tch::Device::Cpu))));
    // Rank 0 keeps its own; the sum over ranks shows rank 1 now holds the same.
    if rank == 0 {
        assert!(weights[2].equal(&before));
    }
    let doubled = weights[2].copy();
    pg.all_reduce_mean(std::slice::from_ref(&doubled)).unwrap();
    assert!(doubled.equal(&weights[2]), "rank {rank}'s broadcast weights differ from rank 0's");

    let mut sums = [1.0 + rank as f64, 0.25, -3.0 * rank as f64];
    pg.all_reduce_sum_f64(&mut sums).unwrap();
    assert_eq!(sums, [3.0, 0.5, -3.0]);

    // Gradients: rank 0 used both parameters, rank 1 only the first, so rank 1's second
    // gradient is undefined and must come out as the average (rank 0's / 2) on both ranks.
    let a = Tensor::ones([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let b = Tensor::ones([2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let frozen = Tensor::ones([2], (Kind::Float, tch::Device::Cpu));
    let loss = if rank == 0 { (&a * 2.0).sum(Kind::Float) + (&b * 4.0).sum(Kind::Float) } else { a.sum(Kind::Float) };
    loss.backward();
    average_gradients(&pg, &[a.shallow_clone(), b.shallow_clone(), frozen.shallow_clone()]).unwrap();
    assert!(a.grad().equal(&Tensor::full([3], 1.5, (Kind::Float, tch::Device::Cpu))));
    assert!(b.grad().defined(), "rank {rank}: b's gradient is still undefined");
    assert!(b.grad().equal(&Tensor::full([2], 2.0, (Kind::Float, tch::Device::Cpu))));
    assert!(!frozen.grad().defined());

    pg.barrier().unwrap();
    println!("RANK_OK {rank}");
}

#[test]
fn dead_peer_fails_all_reduce_within_timeout() {
    let Some(rank) = child_rank() else {
        let t = Instant::now();
        let results = run_ranks("dead_peer_fails_all_reduce_within_timeout", 2, Duration::from_secs(15));
        assert!(results[0].0, "rank 0 failed:\n{}", results[0].1);
        assert!(results[0].1.contains("GOT_ERROR"), "{}", results[0].1);
        assert!(t.elapsed() < Duration::from_secs(12), "took {:?}", t.elapsed());
        return;
    };
    let env = env_of_child();
    let timeout = Duration::from_secs(5);
    let pg = ProcessGroup::init(&env, Backend::Gloo, timeout).unwrap();
    pg.barrier().unwrap();
    if rank == 1 {
        // Dies without a word, as a crashed or OOM-killed worker would.
        std::process::exit(0);
    }
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let err = pg.all_reduce_mean(&[Tensor::ones([1000], (Kind::Float, tch::Device::Cpu))]).unwrap_err();
    let elapsed = t.elapsed();
    println!("GOT_ERROR after {elapsed:?}: {err}");
    assert!(elapsed <= timeout + Duration::from_secs(2), "took {elapsed:?}");
    assert!(matches!(err, DistError::Collective { op: "all_reduce", .. }), "{err:?}");
    assert!(err.to_string().contains("peer was lost"), "{err}");
}

#[test]
fn silent_peer_fails_all_reduce_at_timeout() {
    let Some(rank) = child_rank() else {
        let t = Instant::now();
        let results = run_ranks("silent_peer_fails_all_reduce_at_timeout", 2, Duration::from_secs(12));
        assert!(results[0].0, "rank 0 failed:\n{}", results[0].1);
        assert!(results[0].1.contains("GOT_ERROR"), "{}", results[0].1);
        assert!(t.elapsed() < Duration::from_secs(12), "took {:?}", t.elapsed());
        return;
    };
    let env = env_of_child();
    let timeout = Duration::from_secs(2);
    let pg = ProcessGroup::init(&env, Backend::Gloo, timeout).unwrap();
    pg.barrier().unwrap();
    if rank == 1 {
        // Alive but stuck (a deadlock, a hung data loader) for longer than the timeout.
        std::thread::sleep(timeout + Duration::from_secs(3));
        std::process::exit(0);
    }
    let t = Instant::now();
    let err = pg.all_reduce_mean(&[Tensor::ones([10], (Kind::Float, tch::Device::Cpu))]).unwrap_err();
    let elapsed = t.elapsed();
    println!("GOT_ERROR after {elapsed:?}: {err}");
    assert!(
        elapsed >= timeout - Duration::from_millis(100) && elapsed <= timeout + Duration::from_secs(2),
        "{elapsed:?}"
    );
    assert!(matches!(err, DistError::Collective { .. }), "{err:?}");
    // The group stays failed instead of hanging on the next call.
    let t = Instant::now();
    assert!(pg.barrier().is_err());
    assert!(t.elapsed() <= timeout + Duration::from_secs(2));
}

#[test]
fn missing_peer_fails_init_within_timeout() {
    let timeout = Duration::from_millis(1500);
    // Rank 0 hosts the store and waits for a rank 1 that never comes.
    let env =
        DistEnv { master_addr: "127.0.0.1".into(), master_port: free_port(), world_size: 2, rank: 0, local_rank: 0 };
    let t = Instant::now();
    let err = ProcessGroup::init(&env, Backend::Gloo, timeout).unwrap_err();
    let elapsed = t.elapsed();
    println!("rank 0 gave up after {elapsed:?}: {err}");
    assert!(elapsed <= timeout + Duration::from_secs(2), "{elapsed:?}");
    let msg = err.to_string();
    assert!(matches!(err, DistError::Rendezvous { rank: 0, world_size: 2, .. }), "{err:?}");
    for needle in ["MASTER_ADDR=127.0.0.1", &format!("MASTER_PORT={}", env.master_port), "WORLD_SIZE=2"] {
        assert!(msg.contains(needle), "{needle} missing from: {msg}");
    }

    // Rank 1 looks for a rank 0 that never comes.
    let env = DistEnv { rank: 1, local_rank: 1, master_port: free_port(), ..env };
    let t = Instant::now();
    let err = ProcessGroup::init(&env, Backend::Gloo, timeout).unwrap_err();
    let elapsed = t.elapsed();
    println!("rank 1 gave up after {elapsed:?}: {err}");
    assert!(elapsed <= timeout + Duration::from_secs(2), "{elapsed:?}");
    assert!(matches!(err, DistError::Rendezvous { rank: 1, .. }), "{err:?}");
}

#[test]
fn env_parsing_and_validation() {
    let vars = |pairs: &[(&str, &str)]| {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k: &str| m.get(k).cloned()
    };
    assert_eq!(DistEnv::from_lookup(vars(&[])).unwrap(), None);
    let env = DistEnv::from_lookup(vars(&[
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "29500"),
        ("WORLD_SIZE", "4"),
        ("RANK", "3"),
        ("LOCAL_RANK", "1"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(env, DistEnv { master_addr: "node0".into(), master_port: 29500, world_size: 4, rank: 3, local_rank: 1 });
    assert!(!env.is_master());
    // LOCAL_RANK defaults to 0 (one process per node), not to RANK.
    let env =
        DistEnv::from_lookup(vars(&[("MASTER_ADDR", "h"), ("MASTER_PORT", "1"), ("WORLD_SIZE", "2"), ("RANK", "1")]))
            .unwrap()
            .unwrap();
    assert_eq!(env.local_rank, 0);

    let err = |pairs: &[(&str, &str)]| DistEnv::from_lookup(vars(pairs)).unwrap_err().to_string();
    let e = err(&[("MASTER_ADDR", "h"), ("MASTER_PORT", "1"), ("WORLD_SIZE", "2"), ("RANK", "2")]);
    assert!(e.contains("RANK=\"2\"") && e.contains("below WORLD_SIZE=2"), "{e}");
    let e = err(&[("MASTER_PORT", "1"), ("WORLD_SIZE", "2"), ("RANK", "0")]);
    assert!(e.contains("MASTER_ADDR") && e.contains("unset") && e.contains("torchrun"), "{e}");
    let e = err(&[("MASTER_ADDR", "h"), ("MASTER_PORT", "70000"), ("WORLD_SIZE", "2"), ("RANK", "0")]);
    assert!(e.contains("MASTER_PORT=\"70000\""), "{e}");
    let e = err(&[("MASTER_ADDR", "h"), ("MASTER_PORT", "1"), ("WORLD_SIZE", "two"), ("RANK", "0")]);
    assert!(e.contains("WORLD_SIZE=\"two\""), "{e}");
    let e = err(&[("MASTER_ADDR", "h"), ("MASTER_PORT", "1"), ("WORLD_SIZE", "0"), ("RANK", "0")]);
    assert!(e.contains("at least 1"), "{e}");
}

#[test]
fn nccl_on_cpu_libtorch_is_unsupported() {
    let env =
        DistEnv { master_addr: "127.0.0.1".into(), master_port: free_port(), world_size: 1, rank: 0, local_rank: 0 };
    let err = ProcessGroup::init(&env, Backend::Nccl, Duration::from_secs(1)).unwrap_err();
    assert!(matches!(err, DistError::Unsupported { backend: Backend::Nccl, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("CUDA") && msg.contains("Backend::Gloo"), "{msg}");
}

#[test]
fn single_rank_group_is_a_no_op_and_rejects_bad_arguments() {
    let env =
        DistEnv { master_addr: "127.0.0.1".into(), master_port: free_port(), world_size: 1, rank: 0, local_rank: 0 };
    let pg = ProcessGroup::init(&env, Backend::Gloo, Duration::from_secs(5)).unwrap();
    let t = Tensor::from_slice(&[1.0f32, 2.0]);
    pg.all_reduce_mean(std::slice::from_ref(&t)).unwrap();
    assert!(t.equal(&Tensor::from_slice(&[1.0f32, 2.0])));
    let mut v = [2.5];
    pg.all_reduce_sum_f64(&mut v).unwrap();
    assert_eq!(v, [2.5]);
    pg.barrier().unwrap();
    let e = pg.all_reduce_mean(&[Tensor::from_slice(&[1i64])]).unwrap_err();
    assert!(e.to_string().contains("floating-point"), "{e}");
    let e = pg.broadcast(&[t], 1).unwrap_err();
    assert!(e.to_string().contains("root 1"), "{e}");
}

/// Runs only where a CUDA libtorch is loaded (it passes, saying so, everywhere else): one rank, so
/// one GPU suffices; it proves that the NCCL shim loads, that ProcessGroupNCCL is built from this
/// crate's headers and that a collective (the barrier) runs through it.
#[test]
fn nccl_single_rank_smoke_on_cuda() {
    if !tch::Cuda::is_available() {
        println!("skipped: no CUDA libtorch in this process");
        return;
    }
    let env =
        DistEnv { master_addr: "127.0.0.1".into(), master_port: free_port(), world_size: 1, rank: 0, local_rank: 0 };
    let pg = ProcessGroup::init(&env, Backend::Nccl, Duration::from_secs(60)).unwrap();
    assert_eq!(pg.device(), tch::Device::Cuda(0));
    pg.barrier().unwrap();
    let t = Tensor::from_slice(&[1.0f32, 3.0]).to_device(pg.device());
    pg.all_reduce_mean(std::slice::from_ref(&t)).unwrap();
    pg.broadcast(std::slice::from_ref(&t), 0).unwrap();
    println!("NCCL_OK {:?}", Vec::<f32>::try_from(t.to_device(tch::Device::Cpu)).unwrap());
}
