//! The binary's training commands: offline `train`, the service's `worker` processes and
//! `serve`. Everything here is glue over the library; errors become one `error:` line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use brats_core::{StoreConfig, StoreUri, Stores};
use brats_proto::v1 as pb;
use brats_tracking::mlflow::MlflowSettings;
use brats_train::data::CaseCache;
use brats_train::dataset::{self, Preprocessor};
use brats_train::dist::{Backend, DistEnv, ProcessGroup};
use brats_train::events::{EventKind, WorkerLine};
use brats_train::spec::{self, Device, TrainConfig};
use brats_train::train::{self, RunEnv, Tracking, TrainError};
use brats_trainer::cluster::outbox::{NodeFailure, OUTBOX_ENV, OutboxWriter};
use brats_trainer::launcher::{self, LaunchSpec, WorkerOutput};
use clap::Args;

/// Exit code of a worker that stopped because it was cancelled.
pub(crate) const EXIT_CANCELLED: u8 = 3;

/// Arguments of `brats-trainer train`: the shared training flags plus what only an offline
/// run has.
#[derive(Debug, Clone, Args)]
pub(crate) struct TrainArgs {
    /// The job: every flag `bratsctl train start` takes too, with the same meaning. The seed
    /// defaults to 0 here (a service job without one gets a drawn seed).
    #[command(flatten)]
    job: brats_cli::JobSpecArgs,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Continue from this training checkpoint (e.g. DIR/checkpoints/latest.safetensors of an
    /// earlier run); a run whose --out already holds a checkpoint resumes from it by itself.
    /// Offline only: a service job resumes with `bratsctl train resume JOB`.
    #[arg(long)]
    resume_from: Option<String>,
    /// Print every step (default: a line per epoch and a progress line every 10 s).
    #[arg(long)]
    verbose: bool,
    /// Write TensorBoard event files to OUT/tensorboard/ (scalars loss, lr, throughput per
    /// step; epoch/loss, dice/tc, dice/wt, dice/et, dice/mean, loader_wait per epoch).
    #[arg(long)]
    tensorboard: bool,
    /// Log the run to this MLflow tracking server (http://HOST:PORT): the resolved
    /// configuration as parameters, the scalars as metrics, the model and curves as artefacts.
    /// Credentials from MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD. A server
    /// that goes away never fails the run (retried, then reported).
    #[arg(long, env = "MLFLOW_TRACKING_URI")]
    mlflow_uri: Option<String>,
    /// The MLflow experiment (created when missing).
    #[arg(long, env = "MLFLOW_EXPERIMENT_NAME", default_value = brats_tracking::mlflow::DEFAULT_EXPERIMENT)]
    mlflow_experiment: String,
}

impl TrainArgs {
    /// What the run reports to; a malformed MLflow URI is an error before training starts.
    fn tracking(&self) -> anyhow::Result<Tracking> {
        let mlflow = match self.mlflow_uri.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
            Some(uri) => {
                brats_tracking::mlflow::Client::new(uri).context("--mlflow-uri")?;
                Some(MlflowSettings { uri: uri.to_string(), experiment: self.mlflow_experiment.clone() })
            }
            None => None,
        };
        Ok(Tracking { tensorboard: self.tensorboard, mlflow })
    }
}

/// What a service worker reports to: the service passes its `[tracking]` settings as
/// `BRATS_TRAINER_TRACKING` (JSON: `tensorboard`, `mlflow_uri`, `mlflow_experiment`).
fn worker_tracking() -> anyhow::Result<Tracking> {
    use brats_trainer::cluster::TRACKING_ENV;
    let Ok(json) = std::env::var(TRACKING_ENV) else { return Ok(Tracking::default()) };
    let settings: brats_trainer::config::TrackingConfig = serde_json::from_str(&json).context(TRACKING_ENV)?;
    Ok(settings.to_tracking())
}

/// The spec the offline flags describe (validated by the same code as StartJob).
fn spec_of(a: &TrainArgs) -> anyhow::Result<pb::JobSpec> {
    let mut spec = a.job.to_spec()?;
    spec.resume_from = a.resume_from.as_deref().map(brats_cli::to_uri).transpose()?.unwrap_or_default();
    Ok(spec)
}

/// Every CUDA device, or the CPU when there is none.
pub(crate) fn available_devices() -> Vec<Device> {
    let n = tch::Cuda::device_count().max(0) as usize;
    if n == 0 { vec![Device::Cpu] } else { (0..n).map(Device::Cuda).collect() }
}

/// Sets libtorch's threads: OMP_NUM_THREADS when set, else the cores shared among the local
/// ranks (two ranks on two cores must not each spawn two threads).
fn set_threads(local_world: usize) {
    if std::env::var_os("OMP_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        tch::set_num_threads((cores / local_world.max(1)).max(1) as i32);
    }
}

fn process_group(env: Option<&DistEnv>, device: Device) -> anyhow::Result<Option<ProcessGroup>> {
    // An explicit WORLD_SIZE=1 still builds a group: it checks the backend (e.g. NCCL) end to end.
    let Some(env) = env else { return Ok(None) };
    let backend = if device == Device::Cpu { Backend::Gloo } else { Backend::Nccl };
    let timeout = std::env::var("BRATS_DIST_TIMEOUT_S").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    Ok(Some(
        ProcessGroup::init(env, backend, Duration::from_secs(timeout))
            .with_context(|| format!("joining the process group as rank {} of {}", env.rank, env.world_size))?,
    ))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

/// Cancellation on SIGTERM/SIGINT (and, for workers, when stdin closes).
fn cancel_flag(watch_stdin: bool) -> Arc<AtomicBool> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    let flag = FLAG.get_or_init(|| Arc::new(AtomicBool::new(false))).clone();
    extern "C" fn on_signal(_: libc::c_int) {
        if let Some(f) = FLAG.get() {
            f.store(true, Ordering::SeqCst);
        }
    }
    // SAFETY: the handler only stores to an atomic that outlives the process.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    if watch_stdin {
        let f = flag.clone();
        std::thread::spawn(move || {
            let mut sink = [0u8; 256];
            let mut stdin = std::io::stdin().lock();
            while matches!(std::io::Read::read(&mut stdin, &mut sink), Ok(n) if n > 0) {}
            f.store(true, Ordering::SeqCst);
        });
    }
    flag
}

/// `brats-trainer train`.
pub(crate) fn train(args: TrainArgs) -> anyhow::Result<()> {
    let dist_env = DistEnv::from_env().context("torchrun-style environment")?;
    let spec = spec_of(&args)?;
    let tracking = args.tracking()?;
    let config =
        spec::resolve(&spec, spec.seed.unwrap_or(0), &available_devices()).map_err(|e| anyhow::anyhow!("{e}"))?;
    for d in &config.devices {
        if let Device::Cuda(i) = d
            && *i as i64 >= tch::Cuda::device_count()
        {
            bail!("devices: cuda:{i} is not present (this machine has {} CUDA devices)", tch::Cuda::device_count());
        }
    }
    if dist_env.is_none() {
        let local = local_rank_devices(&config)?;
        if local.len() > 1 {
            return launch_local_ranks(local);
        }
    }
    let (rank, world, local_rank) =
        dist_env.as_ref().map(|e| (e.rank, e.world_size, e.local_rank)).unwrap_or((0, 1, 0));
    let device = match config.devices.as_slice() {
        [Device::Cpu] => Device::Cpu,
        devs => *devs.get(local_rank).with_context(|| format!("LOCAL_RANK {local_rank} has no device in {devs:?}"))?,
    };
    set_threads(if device == Device::Cpu { local_world(dist_env.as_ref()) } else { 1 });
    let rt = runtime()?;
    let stores = Arc::new(Stores::new(StoreConfig::default()));
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let out = StoreUri::parse(&brats_cli::to_uri(&args.out.to_string_lossy())?)?;
    let group = process_group(dist_env.as_ref(), device)?;
    let lead = rank == 0;

    // Rank 0 preprocesses (or finds the cache); the others then find everything cached.
    let sections = vec![config.data.train_section.clone(), config.data.validation_section.clone()];
    let prepare = |quiet: bool| {
        let started = Instant::now();
        rt.block_on(dataset::prepare(
            stores.clone(),
            &Preprocessor::InProcess,
            &config.datalist_uri,
            &config.base_uri,
            &sections,
            &config.data.label_convention,
            &out.join("cache"),
            |done, total| {
                if !quiet && (done == total || started.elapsed() > Duration::from_secs(5)) {
                    eprint!("\rpreprocessing: {done}/{total} cases");
                }
            },
        ))
    };
    let manifest_uri = if lead {
        let m = prepare(false).context("preparing the dataset")?;
        eprintln!();
        if let Some(g) = &group {
            g.barrier()?;
        }
        m
    } else {
        if let Some(g) = &group {
            g.barrier()?;
        }
        prepare(true).context("preparing the dataset")?
    };
    let manifest = rt.block_on(dataset::read_manifest(&stores, &manifest_uri))?;
    let (data, cache) =
        rt.block_on(dataset::open_dataset(&stores, &manifest, &config.data, local_world(dist_env.as_ref())))?;
    if lead {
        eprintln!(
            "training on {} cases, validating on {}, {} epoch(s), device {device}, world size {world}, cases {}",
            data.train.len(),
            data.validation.len(),
            config.epochs,
            if cache == CaseCache::Memory { "in memory" } else { "streamed from the store" },
        );
    }
    let env = RunEnv {
        stores: stores.clone(),
        runtime: rt.handle().clone(),
        checkpoints: out.join("checkpoints"),
        artifacts: out.clone(),
        device,
        group,
        resume_from: config.resume_from.as_deref().map(StoreUri::parse).transpose()?,
        run_name: args.out.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "train".into()),
        tracking,
    };
    let cancel = cancel_flag(false);
    let mut printer = ProgressPrinter { epochs: config.epochs, verbose: args.verbose, last: Instant::now() };
    let result = train::run(
        &config,
        &data,
        &env,
        &mut |e| {
            if lead {
                printer.print(&e)
            }
        },
        &cancel,
    );
    match result {
        Ok(outcome) => {
            if lead {
                let best = outcome
                    .best_metrics
                    .map(|d| {
                        format!(
                            "best mean Dice {:.4} (TC {:.4}, WT {:.4}, ET {:.4}) at epoch {}",
                            d.mean, d.tc, d.wt, d.et, outcome.best_epoch
                        )
                    })
                    .unwrap_or_else(|| "no validation".into());
                println!("done: {} epochs, {} steps; {best}", outcome.epochs, outcome.global_step);
                println!("wrote {}", args.out.display());
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn local_world(env: Option<&DistEnv>) -> usize {
    std::env::var("LOCAL_WORLD_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| env.map(|e| e.world_size).unwrap_or(1))
}

/// The ranks an offline `train` without torchrun's variables starts on this machine: one per
/// listed CUDA device, or `LOCAL_WORLD_SIZE` (default 1) Gloo ranks for `--devices cpu`.
fn local_rank_devices(config: &TrainConfig) -> anyhow::Result<Vec<Device>> {
    Ok(match config.devices.as_slice() {
        [Device::Cpu] => {
            let n = match std::env::var("LOCAL_WORLD_SIZE") {
                Ok(v) => v.trim().parse::<usize>().ok().filter(|&n| n >= 1).with_context(|| {
                    format!("LOCAL_WORLD_SIZE={v:?}: expected the number of CPU ranks to start (at least 1)")
                })?,
                Err(_) => 1,
            };
            vec![Device::Cpu; n]
        }
        devices => devices.to_vec(),
    })
}

/// One process per local rank, like torchrun on one node, through the service's launcher:
/// the ranks die with this process (PDEATHSIG), and the first rank to fail takes its peers down
/// at once instead of leaving them to wait out the c10d timeout. SIGINT/SIGTERM are forwarded,
/// so every rank stops at a step boundary with the latest checkpoint kept.
fn launch_local_ranks(devices: Vec<Device>) -> anyhow::Result<()> {
    run_ranks(LaunchSpec {
        exe: std::env::current_exe().context("finding this executable")?,
        job_id: "train".into(),
        args: std::env::args_os().skip(1).collect(),
        devices,
        env: Vec::new(),
        output: WorkerOutput::Inherited,
        rendezvous: None,
    })
}

/// Runs the ranks of `spec` to their end, forwarding SIGINT/SIGTERM to them once; the first
/// failure is the error (rank, node, exit, stderr), a cancel is [`TrainError::Cancelled`].
fn run_ranks(spec: LaunchSpec) -> anyhow::Result<()> {
    let cancel = cancel_flag(false);
    let rt = runtime()?;
    let outcome = rt.block_on(async {
        let (mut group, _no_lines) = launcher::launch(&spec).await?;
        let mut forwarded = false;
        loop {
            tokio::select! {
                done = group.done() => break anyhow::Ok(done.context("waiting for the ranks")?),
                _ = tokio::time::sleep(Duration::from_millis(100)), if !forwarded => {
                    if cancel.load(Ordering::SeqCst) {
                        forwarded = true;
                        group.signal(libc::SIGINT);
                    }
                }
            }
        }
    })?;
    if let Some(failure) = outcome.failure() {
        return Err(RanksFailed { describe: failure.describe(), code: failure.failure_code() }.into());
    }
    if !outcome.all_exited_with(0) {
        return Err(TrainError::Cancelled.into());
    }
    Ok(())
}

/// Arguments of `brats-trainer node`: where this node sits (each flag overrides the engine's
/// variable) and the command its workers run.
#[derive(Debug, Clone, Args)]
pub(crate) struct NodeArgs {
    /// Nodes in the job [default: PET_NNODES (Kubeflow), SLURM_NNODES (Slurm), else 1].
    #[arg(long)]
    nnodes: Option<usize>,
    /// Workers on this node: N, auto (one per GPU, else one CPU rank), gpu or cpu [default:
    /// PET_NPROC_PER_NODE, SLURM_GPUS_ON_NODE, else auto]. Every node must start as many.
    #[arg(long)]
    nproc_per_node: Option<String>,
    /// This node's index [default: PET_NODE_RANK or JOB_COMPLETION_INDEX, SLURM_NODEID, else 0].
    #[arg(long)]
    node_rank: Option<usize>,
    /// Rank 0's host [default: PET_MASTER_ADDR, MASTER_ADDR or the first host of
    /// SLURM_JOB_NODELIST, else 127.0.0.1].
    #[arg(long)]
    master_addr: Option<String>,
    /// The rendezvous port on the master [default: PET_MASTER_PORT, MASTER_PORT, else 29500; a
    /// free loopback port for a single node].
    #[arg(long)]
    master_port: Option<u16>,
    /// Seconds the workers wait for every rank to join before failing with the settings to
    /// check [default: BRATS_DIST_TIMEOUT_S, else 300].
    #[arg(long)]
    rdzv_timeout_s: Option<u64>,
    /// What every worker runs: `train …` (the offline command's flags), or `worker …` for a
    /// service job an engine placed (what the trainer's sbatch scripts and TrainJobs run).
    #[arg(last = true, required = true, value_name = "train ARGS")]
    command: Vec<std::ffi::OsString>,
}

/// `brats-trainer node`: torchrun's role on one node of a job an engine placed (Kubeflow
/// Trainer, Slurm) or that flags describe. Starts one worker per local device with torchrun's
/// variables, forwards SIGINT/SIGTERM, and fails the node when one worker fails (naming its
/// rank and node); inconsistent settings are an error before any worker starts.
pub(crate) fn node(args: NodeArgs) -> anyhow::Result<()> {
    use brats_trainer::launcher::Rendezvous;
    use brats_trainer::node::{NodeFlags, NodeTopology};
    if !matches!(args.command.first().and_then(|c| c.to_str()), Some("train" | "worker")) {
        bail!(
            "node: the workers' command must be `train …` or a service job's `worker …` (got {:?}); e.g. \
             brats-trainer node --nproc-per-node 2 -- train --datalist D.json --devices cpu --out RUN",
            args.command.first().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
        );
    }
    let flags = NodeFlags {
        nnodes: args.nnodes,
        nproc_per_node: args.nproc_per_node.clone(),
        node_rank: args.node_rank,
        master_addr: args.master_addr.clone(),
        master_port: args.master_port,
    };
    let topology = NodeTopology::resolve(&flags, |v| std::env::var(v).ok()).context("node settings")?;
    let cuda = tch::Cuda::device_count().max(0) as usize;
    let devices = topology.nproc.devices(cuda).context("node settings")?;
    topology.check_world_size(devices.len(), std::env::var("WORLD_SIZE").ok()).context("node settings")?;
    let rendezvous = match topology.master_port {
        Some(master_port) => Some(Rendezvous {
            master_addr: topology.master_addr.clone(),
            master_port,
            node_rank: topology.node_rank,
            nnodes: topology.nnodes,
        }),
        None => None,
    };
    let first = topology.node_rank * devices.len();
    eprintln!(
        "node {} of {} ({}): {} worker(s) on {}, ranks {}..{} of {}, rendezvous at {}",
        topology.node_rank,
        topology.nnodes,
        topology.source,
        devices.len(),
        devices.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        first,
        first + devices.len() - 1,
        topology.nnodes * devices.len(),
        rendezvous
            .as_ref()
            .map(|r| format!("{}:{}", r.master_addr, r.master_port))
            .unwrap_or_else(|| "a free loopback port".into()),
    );
    let mut env = Vec::new();
    if let Some(t) = args.rdzv_timeout_s {
        env.push(("BRATS_DIST_TIMEOUT_S".to_string(), t.to_string()));
    }
    let ran = run_ranks(LaunchSpec {
        exe: std::env::current_exe().context("finding this executable")?,
        job_id: format!("node-{}", topology.node_rank),
        args: args.command,
        devices,
        env,
        output: WorkerOutput::Inherited,
        rendezvous,
    });
    if let Err(e) = &ran
        && let Some(failure) = e.downcast_ref::<RanksFailed>()
        && let Ok(outbox) = std::env::var(OUTBOX_ENV)
        && !outbox.is_empty()
        && let Err(report) = report_node_failure(&outbox, topology.node_rank, failure)
    {
        eprintln!("warning: cannot report the failure to the job's outbox: {report:#}");
    }
    ran
}

/// A worker of the node failed: its description (rank, node, exit) and gRPC code name.
#[derive(Debug, thiserror::Error)]
#[error("{describe}")]
struct RanksFailed {
    describe: String,
    code: &'static str,
}

/// Writes `nodes/<node>.json` in a cluster job's outbox, so the trainer names the rank and node.
fn report_node_failure(outbox: &str, node: usize, failure: &RanksFailed) -> anyhow::Result<()> {
    let store_config = worker_store_config()?;
    let stores = Stores::new(store_config);
    let dir = StoreUri::parse(outbox)?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string();
    let report = NodeFailure {
        node,
        host,
        failure: failure.describe.clone(),
        code: failure.code.to_string(),
        time_ms: brats_train::events::now_ms(),
    };
    runtime()?.block_on(brats_trainer::cluster::outbox::report_node_failure(&stores, &dir, &report))?;
    Ok(())
}

/// Human-readable progress of the offline command.
struct ProgressPrinter {
    epochs: u32,
    verbose: bool,
    last: Instant,
}

impl ProgressPrinter {
    fn print(&mut self, e: &EventKind) {
        match e {
            EventKind::Step(s) if self.verbose || self.last.elapsed() > Duration::from_secs(10) => {
                self.last = Instant::now();
                eprintln!(
                    "epoch {}/{} step {}/{} loss {:.4} lr {:.2e} {:.2} samples/s eta {:.0}s",
                    s.epoch,
                    self.epochs,
                    s.step,
                    s.steps_per_epoch,
                    s.loss,
                    s.learning_rate,
                    s.samples_per_second,
                    s.eta_seconds
                );
            }
            EventKind::Epoch(m) => {
                let dice = m
                    .validation
                    .map(|d| {
                        format!(
                            " dice mean {:.4} tc {:.4} wt {:.4} et {:.4}{}",
                            d.mean,
                            d.tc,
                            d.wt,
                            d.et,
                            if m.is_best { " *" } else { "" }
                        )
                    })
                    .unwrap_or_default();
                eprintln!(
                    "epoch {} loss {:.4} lr {:.2e}{dice} ({:.1}s train, {:.1}s val, loader wait {:.0}%)",
                    m.epoch,
                    m.train_loss,
                    m.learning_rate,
                    m.train_seconds,
                    m.validation_seconds,
                    m.loader_wait_fraction * 100.0
                );
            }
            EventKind::Log { level, message } => eprintln!("{level}: {message}"),
            _ => {}
        }
    }
}

/// `brats-trainer worker`: one rank of a service job. Exit 0 = finished, 3 = cancelled,
/// 75 = the store could not be reached, 1 = failed (the reason is the last stderr line).
pub(crate) fn worker(job_uri: &str, manifest_uri: &str) -> ExitCode {
    let cancel = cancel_flag(true);
    match run_worker(job_uri, manifest_uri, &cancel) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if matches!(e.downcast_ref::<TrainError>(), Some(TrainError::Cancelled)) => {
            ExitCode::from(EXIT_CANCELLED)
        }
        Err(e) => {
            eprintln!("{}", brats_cli::error_line(&e));
            ExitCode::from(if is_transient(&e) { brats_train::train::EXIT_UNAVAILABLE } else { 1 })
        }
    }
}

/// Whether the failure is the store being unreachable, which `ResumeJob` fixes once it is back.
fn is_transient(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause.downcast_ref::<TrainError>().is_some_and(TrainError::is_unavailable)
            || cause
                .downcast_ref::<brats_core::CoreError>()
                .is_some_and(|c| c.kind() == brats_core::ErrorKind::Unavailable)
    })
}

/// A worker's store settings: `BRATS_TRAINER_STORE` (JSON) as its trainer or node launcher set
/// it, else the defaults (the local filesystem).
fn worker_store_config() -> anyhow::Result<StoreConfig> {
    use brats_trainer::cluster::STORE_ENV;
    Ok(match std::env::var(STORE_ENV) {
        Ok(json) if !json.is_empty() => serde_json::from_str(&json).context(STORE_ENV)?,
        _ => StoreConfig::default(),
    })
}

fn run_worker(job_uri: &str, manifest_uri: &str, cancel: &AtomicBool) -> anyhow::Result<()> {
    let store_config = worker_store_config()?;
    let device = match std::env::var("BRATS_TRAINER_DEVICE") {
        Ok(d) => Device::parse(&d).with_context(|| format!("BRATS_TRAINER_DEVICE '{d}'"))?,
        Err(_) => Device::Cpu,
    };
    let dist_env = DistEnv::from_env().context("worker environment")?;
    set_threads(if device == Device::Cpu { local_world(dist_env.as_ref()) } else { 1 });
    let rt = runtime()?;
    let stores = Arc::new(Stores::new(store_config));
    let job = StoreUri::parse(job_uri)?;
    let config: TrainConfig =
        serde_json::from_slice(&rt.block_on(stores.get(&job.join("config.json")))?).context("the job's config.json")?;
    let group = process_group(dist_env.as_ref(), device)?;
    let lead = group.as_ref().map(|g| g.rank() == 0).unwrap_or(true);
    let manifest = rt.block_on(dataset::read_manifest(&stores, &StoreUri::parse(manifest_uri)?))?;
    let (data, cache) =
        rt.block_on(dataset::open_dataset(&stores, &manifest, &config.data, local_world(dist_env.as_ref())))?;
    tracing::info!(%cache, train = data.train.len(), validation = data.validation.len(), "dataset opened");
    let env = RunEnv {
        stores,
        runtime: rt.handle().clone(),
        checkpoints: job.join("checkpoints"),
        artifacts: job.join("artifacts"),
        device,
        group,
        resume_from: config.resume_from.as_deref().map(StoreUri::parse).transpose()?,
        run_name: job.file_name(),
        tracking: worker_tracking()?,
    };
    // A cluster job's rank 0 also reports through the store: the service cannot read its stdout.
    let outbox = match std::env::var(OUTBOX_ENV) {
        Ok(uri) if lead && !uri.is_empty() => Some(OutboxWriter::new(
            env.stores.clone(),
            StoreUri::parse(&uri).with_context(|| format!("{OUTBOX_ENV} '{uri}'"))?,
            rt.handle().clone(),
        )),
        _ => None,
    };
    let report = |line: &WorkerLine| {
        if let Some(o) = &outbox
            && let Err(e) = o.push(line)
        {
            eprintln!("warning: cannot write the job's outbox (the trainer sees this later): {e}");
        }
    };
    let stdout = std::io::stdout();
    let mut emit = |e: EventKind| {
        if lead {
            let line = WorkerLine::Event(e);
            report(&line);
            let mut out = stdout.lock();
            let _ = writeln!(out, "{}", line.encode());
            let _ = out.flush();
        }
    };
    emit(EventKind::info(format!(
        "{} training and {} validation cases, {}",
        data.train.len(),
        data.validation.len(),
        if cache == CaseCache::Memory {
            "held in memory"
        } else {
            "streamed from the store for every sample (case_cache STREAM, or AUTO and they do not fit in memory)"
        }
    )));
    let outcome = train::run(&config, &data, &env, &mut emit, cancel);
    if let Some(o) = &outbox {
        if let Ok(outcome) = &outcome {
            report(&WorkerLine::Finished(outcome.clone()));
        }
        o.flush().context("writing the job's outbox")?;
    }
    let outcome = outcome?;
    if lead {
        let mut out = stdout.lock();
        writeln!(out, "{}", WorkerLine::Finished(outcome).encode())?;
        out.flush()?;
    }
    Ok(())
}

/// Flags of `brats-trainer serve` that override the configuration.
pub(crate) struct ServeOverrides {
    /// The flags every service takes (listen addresses).
    pub flags: brats_service::ServeFlags,
    /// Store root of jobs.
    pub store_root: Option<String>,
    /// Model registry root.
    pub registry: Option<String>,
    /// Preprocessing service endpoint.
    pub preprocess_endpoint: Option<String>,
}

/// `brats-trainer serve`.
pub(crate) async fn serve(config: Option<PathBuf>, o: ServeOverrides) -> anyhow::Result<()> {
    let mut cfg = brats_trainer::config::TrainerConfig::load(config.as_deref())?;
    o.flags.apply(&mut cfg.server);
    for (field, value) in [
        (&mut cfg.store_root, o.store_root),
        (&mut cfg.registry, o.registry),
        (&mut cfg.preprocess_endpoint, o.preprocess_endpoint),
    ] {
        if let Some(v) = value {
            *field = v;
        }
    }
    brats_trainer::server::serve(cfg, brats_service::shutdown_signal(), None).await
}

/// Arguments of `brats-trainer bench-step`.
#[derive(Debug, Clone, Args)]
pub(crate) struct BenchStepArgs {
    /// Crop X,Y,Z of the random input.
    #[arg(long, default_value = "64,64,64")]
    crop: String,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// libtorch intra-op threads (0 = libtorch's default).
    #[arg(long, default_value_t = 0)]
    threads: i32,
    /// Seed of the weights, the input and dropout.
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// "cpu" or "cuda:N".
    #[arg(long, default_value = "cpu")]
    device: String,
    /// fp16 autocast with gradient scaling (CUDA only).
    #[arg(long)]
    amp: bool,
}

/// `brats-trainer bench-step`: the bundle's training step (zero_grad, forward in train mode,
/// DiceLoss, backward, Adam lr 1e-4 wd 1e-5; with AMP: autocast + GradScaler) on a fixed random
/// input and target, timed per step, exactly the work `benchmarks/trainer/monai_train_step.py`
/// times for MONAI.
pub(crate) fn bench_step(a: BenchStepArgs) -> anyhow::Result<()> {
    use brats_train::loss::DiceLoss;
    use brats_train::optim::{Adam, AdamConfig, GradScaler, GradScalerConfig};
    let crop: Vec<i64> = brats_cli::parse_xyz::<u32>(&a.crop).context("--crop")?.into_iter().map(i64::from).collect();
    let device = Device::parse(&a.device).with_context(|| format!("--device '{}'", a.device))?;
    if a.threads > 0 {
        tch::set_num_threads(a.threads);
    }
    let dev = device.to_tch();
    let amp = a.amp && dev.is_cuda();
    tch::manual_seed(a.seed);
    let config = brats_model::SegResNetConfig::default();
    let vs = tch::nn::VarStore::new(dev);
    let net = brats_model::SegResNet::new(&vs.root(), &config)?;
    let vars = vs.variables();
    let params: Vec<(String, tch::Tensor)> =
        config.parameters().into_iter().map(|p| (p.name.clone(), vars[&p.name].shallow_clone())).collect();
    let grads_of: Vec<tch::Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
    let mut adam = Adam::new(params, AdamConfig::adam(1e-5))?;
    let mut scaler = if amp { GradScaler::new(GradScalerConfig::default())? } else { GradScaler::disabled() };
    let loss_fn = DiceLoss::bundle();
    let x = tch::Tensor::randn([1, 4, crop[0], crop[1], crop[2]], (tch::Kind::Float, dev));
    let y =
        tch::Tensor::rand([1, 3, crop[0], crop[1], crop[2]], (tch::Kind::Float, dev)).lt(0.5).to_kind(tch::Kind::Float);
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let mut times = Vec::new();
    let mut last_loss = 0.0;
    for i in 0..a.warmup + a.steps {
        sync();
        let t = Instant::now();
        adam.zero_grad();
        let logits = tch::autocast(amp, || net.forward(&x, true));
        let loss = loss_fn.forward(&logits, &y);
        let t_fwd = t.elapsed().as_secs_f64();
        scaler.scale(&loss).backward();
        let t_bwd = t.elapsed().as_secs_f64();
        let grads: Vec<tch::Tensor> = grads_of.iter().map(|p| p.grad()).filter(|g| g.defined()).collect();
        scaler.unscale_(&grads)?;
        if scaler.should_step()? {
            adam.step(1e-4);
        }
        scaler.update()?;
        last_loss = loss.double_value(&[]);
        if std::env::var_os("BRATS_BENCH_DETAIL").is_some() {
            eprintln!(
                "forward+loss {t_fwd:.3}s backward {:.3}s optimiser {:.3}s",
                t_bwd - t_fwd,
                t.elapsed().as_secs_f64() - t_bwd
            );
        }
        sync();
        if i >= a.warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let pct = |q: f64| {
        let pos = q * (sorted.len() - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
    };
    let rss_kib = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
    });
    println!(
        "{}",
        serde_json::json!({
            "impl": "brats-trainer (tch)", "median_s": pct(0.5), "p90_s": pct(0.9), "times_s": times,
            "steps": a.steps, "crop": crop, "threads": tch::get_num_threads(), "seed": a.seed,
            "device": device.to_string(), "amp": amp, "final_loss": last_loss, "peak_rss_kib": rss_kib,
        })
    );
    Ok(())
}

/// Arguments of `brats-trainer render`.
#[derive(Debug, Clone, Args)]
pub(crate) struct RenderArgs {
    /// The engine: slurm (an sbatch script) or kubernetes (a Kubeflow Trainer v2 TrainJob).
    #[arg(long, value_parser = ["slurm", "kubernetes"])]
    backend: String,
    /// Nodes.
    #[arg(long, default_value_t = 1)]
    nodes: u32,
    /// Workers per node: GPUs per node, or CPU ranks with --cpu (0 = every GPU of the node).
    #[arg(long, default_value_t = 0)]
    devices_per_node: u32,
    /// The job's folder in the store (`<store_root>/jobs/<id>/`).
    #[arg(long)]
    job_uri: String,
    /// The preprocessed dataset's manifest [default: the job record's, when the job exists].
    #[arg(long)]
    manifest_uri: Option<String>,
    /// CPU ranks (Gloo) instead of GPUs.
    #[arg(long)]
    cpu: bool,
    /// The trainer's configuration, whose [cluster.slurm] / [cluster.kubernetes] section is
    /// used (also BRATS_TRAINER_CONFIG) [default: the sections' defaults].
    #[arg(long, env = "BRATS_TRAINER_CONFIG")]
    config: Option<PathBuf>,
}

/// `brats-trainer render`: prints exactly what the trainer service would submit for a job.
pub(crate) fn render(a: RenderArgs) -> anyhow::Result<()> {
    use brats_trainer::cluster::{BackendKind, Placement, SubmitRequest, kubernetes, slurm};
    let cfg = brats_trainer::config::TrainerConfig::load(a.config.as_deref())?;
    let job_uri = format!("{}/", a.job_uri.trim_end_matches('/'));
    let job_dir = StoreUri::parse(&job_uri).context("--job-uri")?;
    let job_id = job_dir.file_name();
    brats_trainer::jobs::validate_job_id(&job_id)
        .map_err(|m| anyhow::anyhow!("--job-uri: the last segment is the job id: {m}"))?;
    let stores = Arc::new(Stores::new(cfg.store.clone()));
    let record: Option<brats_trainer::jobs::JobRecord> = runtime()?
        .block_on(stores.get(&job_dir.join(brats_trainer::jobs::JOB_FILE)))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let manifest_uri = match (&a.manifest_uri, &record) {
        (Some(m), _) => m.clone(),
        (None, Some(r)) if !r.manifest_uri.is_empty() => r.manifest_uri.clone(),
        _ => {
            let guess = format!("{job_uri}manifest.json");
            eprintln!("note: no prepared job at {job_uri}; pass --manifest-uri (showing {guess})");
            guess
        }
    };
    let attempt = record.as_ref().and_then(|r| r.submission.as_ref()).map_or(0, |s| s.attempt + 1);
    let backend = if a.backend == "slurm" { BackendKind::Slurm } else { BackendKind::Kubernetes };
    let placement = Placement { backend, nodes: a.nodes.max(1), devices_per_node: a.devices_per_node };
    let outbox_uri = format!("{job_uri}cluster/{attempt}/");
    let (env, secret_env) = brats_trainer::cluster::job_env(backend, &outbox_uri, &cfg.store, &cfg.tracking);
    let request = SubmitRequest {
        job_id,
        job_uri: job_uri.clone(),
        manifest_uri,
        outbox_uri,
        placement,
        cpu: a.cpu,
        env,
        secret_env,
    };
    let text = match backend {
        BackendKind::Slurm => {
            render_for(&slurm::Slurm::new(cfg.cluster.slurm.clone().unwrap_or_default()), "[cluster.slurm]", &request)?
        }
        _ => render_for(
            &kubernetes::Kubernetes::new(cfg.cluster.kubernetes.clone().unwrap_or_default()),
            "[cluster.kubernetes]",
            &request,
        )?,
    };
    print!("{text}");
    Ok(())
}

/// What `backend` would submit for `request` (the secret environment is never part of it).
fn render_for<B: brats_trainer::cluster::ClusterBackend>(
    backend: &B,
    section: &str,
    request: &brats_trainer::cluster::SubmitRequest,
) -> anyhow::Result<String> {
    let nodes = request.placement.nodes;
    anyhow::ensure!(nodes <= backend.max_nodes(), "--nodes {nodes}: {section} max_nodes is {}", backend.max_nodes());
    Ok(backend.render(request))
}
