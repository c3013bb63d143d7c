//! `bratsctl`: the client of the platform's gRPC services, and `bratsctl demo`, the first-run
//! demonstration that starts the services on loopback and runs the main job through them.

use anyhow::{Context, bail};
use brats_proto::v1 as pb;
use brats_proto::v1::inference_client::InferenceClient;
use brats_proto::v1::preprocessor_client::PreprocessorClient;
use brats_proto::v1::trainer_client::TrainerClient;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

#[derive(Parser)]
#[command(name = "bratsctl", version, about = "Client of the BraTS segmentation platform")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Ask a service whether it is SERVING (grpc.health.v1).
    Health {
        /// Service address, e.g. http://127.0.0.1:50051.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
    },
    /// Preprocess one case on a running preprocessing service.
    Preprocess {
        /// Preprocessing service address.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
        /// T1c T1 T2 FLAIR URIs (or paths, made absolute file:// URIs).
        #[arg(long, num_args = 1..=4, required = true)]
        image: Vec<String>,
        /// Label URI.
        #[arg(long)]
        label: Option<String>,
        /// Case id used in output keys.
        #[arg(long, default_value = "case")]
        case_id: String,
        /// Output prefix URI; default the server's store.
        #[arg(long)]
        out: Option<String>,
        /// Recompute even if cached.
        #[arg(long)]
        force: bool,
    },
    /// Preprocess a MONAI decathlon datalist on a running service, showing progress.
    PreprocessDataset {
        /// Preprocessing service address.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
        /// Datalist URI or path.
        #[arg(long)]
        datalist: String,
        /// Output prefix URI; default the server's store.
        #[arg(long)]
        out: Option<String>,
    },
    /// Segment a case on a running inference service: upload the four modalities in chunks
    /// (SegmentStream, no shared storage needed), download the label map, verify its checksum.
    Segment {
        /// Inference service address.
        #[arg(long, default_value = "http://127.0.0.1:50052")]
        server: String,
        /// T1c T1 T2 FLAIR files (or one 4D file).
        #[arg(long, num_args = 1..=4, required = true)]
        image: Vec<PathBuf>,
        /// Where to write the label map (.nii.gz).
        #[arg(long)]
        out: PathBuf,
        /// Model version to use (default: the server's production alias).
        #[arg(long)]
        model_version: Option<String>,
        /// Request id (appears in the server's logs).
        #[arg(long)]
        request_id: Option<String>,
    },
    /// List the models a running inference service knows.
    Models {
        /// Inference service address.
        #[arg(long, default_value = "http://127.0.0.1:50052")]
        server: String,
    },
    /// Training jobs on a running trainer service: start, watch, list, get, cancel, resume.
    Train {
        #[command(subcommand)]
        command: TrainCmd,
    },
    /// The first-run demo: generate a synthetic dataset and a held-out case, start the
    /// preprocessing and trainer services on loopback, train a small SegResNet through the
    /// trainer (its dataset prepared by the preprocessing service), register it as
    /// `segresnet@production`, start the inference service, segment the held-out case through
    /// it and print the Dice against its label.
    Demo {
        /// Working directory for the demo's data and store.
        #[arg(long, default_value = "demo-out")]
        dir: PathBuf,
        /// Shape of the synthetic cases, X,Y,Z (small, so training takes minutes on a CPU).
        #[arg(long, default_value = "32,32,32")]
        shape: String,
        /// Seed of the synthetic dataset (its cases use seed, seed + 1, …).
        #[arg(long, default_value_t = 100)]
        seed: u64,
        /// Seed of the training job (weights, sampling, augmentation).
        #[arg(long, default_value_t = 0)]
        train_seed: u64,
        /// Training epochs (12 steps each).
        #[arg(long, default_value_t = 25)]
        epochs: u32,
    },
}

/// Default address of the trainer service.
const TRAINER: &str = "http://127.0.0.1:50053";

#[derive(Subcommand)]
// Parsed once per process: boxing `Start`'s many options would only add noise.
#[allow(clippy::large_enum_variant)]
enum TrainCmd {
    /// Start a training job (SegResNet, the MONAI bundle's recipe; unset options take the
    /// bundle's values) and print it; --watch follows it to the end.
    Start {
        /// Trainer service address.
        #[arg(long, default_value = TRAINER)]
        server: String,
        /// MONAI decathlon datalist URI (or a path, made an absolute file:// URI).
        #[arg(long)]
        datalist: String,
        /// Base URI of the datalist's relative paths (default: the datalist's folder).
        #[arg(long)]
        base_uri: Option<String>,
        /// Epochs (default 300).
        #[arg(long)]
        epochs: Option<u32>,
        /// Initial learning rate (default 1e-4).
        #[arg(long)]
        lr: Option<f64>,
        /// Learning-rate schedule: cosine (per epoch, the bundle's; the default), constant, or
        /// warmup-cosine (linear warm-up over --warmup-steps, then cosine, per step).
        #[arg(long, value_parser = ["cosine", "constant", "warmup-cosine"])]
        lr_schedule: Option<String>,
        /// Warm-up steps of --lr-schedule warmup-cosine (default 5% of all steps).
        #[arg(long)]
        warmup_steps: Option<u32>,
        /// Random training crop X,Y,Z (default 224,224,144).
        #[arg(long)]
        crop: Option<String>,
        /// Validation sliding-window size X,Y,Z (default 240,240,160).
        #[arg(long)]
        val_roi: Option<String>,
        /// How workers hold the preprocessed cases: auto (in memory when they fit, else read
        /// from the store for every sample; the default), memory, or stream.
        #[arg(long, value_parser = ["auto", "memory", "stream"])]
        case_cache: Option<String>,
        /// Devices: cpu, or CUDA devices cuda:0,cuda:1,… (default: every GPU of the trainer, else cpu).
        #[arg(long)]
        devices: Option<String>,
        /// Seed (default: drawn by the trainer and shown in the job).
        #[arg(long)]
        seed: Option<u64>,
        /// Registry name of the trained model (default brats_mri_segmentation).
        #[arg(long)]
        model_name: Option<String>,
        /// Move the "production" alias to the trained model (inference services hot-reload it).
        #[arg(long)]
        promote: bool,
        /// Job id ([a-z0-9-]{1,63}); default chosen by the trainer.
        #[arg(long)]
        job_id: Option<String>,
        /// Idempotency key: retrying with the same one returns the job the first call created.
        #[arg(long)]
        request_id: Option<String>,
        /// Follow the job until it ends (as `train watch`).
        #[arg(long)]
        watch: bool,
    },
    /// Follow a job's events live (progress bar, loss, lr, throughput, ETA, per-epoch Dice);
    /// reconnects after transient errors. Exits non-zero if the job FAILED.
    Watch {
        /// Trainer service address.
        #[arg(long, default_value = TRAINER)]
        server: String,
        /// The job's id.
        job: String,
        /// First event sequence number to show.
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
    /// List jobs, newest first.
    List {
        /// Trainer service address.
        #[arg(long, default_value = TRAINER)]
        server: String,
        /// Only jobs in these states (queued, preparing, running, succeeded, failed, cancelling, cancelled).
        #[arg(long, value_delimiter = ',')]
        state: Vec<String>,
        /// At most this many jobs.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Show one job.
    Get {
        /// Trainer service address.
        #[arg(long, default_value = TRAINER)]
        server: String,
        /// The job's id.
        job: String,
    },
    /// Cancel a job (a running one stops at the next step boundary; its checkpoint is kept).
    Cancel {
        /// Trainer service address.
        #[arg(long, default_value = TRAINER)]
        server: String,
        /// The job's id.
        job: String,
        /// Reason, recorded with the job.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Resume a CANCELLED or FAILED job from its latest checkpoint.
    Resume {
        /// Trainer service address.
        #[arg(long, default_value = TRAINER)]
        server: String,
        /// The job's id.
        job: String,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli.command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", msg.join(": "));
            std::process::ExitCode::from(2)
        }
    }
}

/// Turns a path into an absolute `file://` URI; URIs pass through.
fn to_uri(s: &str) -> anyhow::Result<String> {
    Ok(brats_core::StoreUri::parse(s)?.to_string())
}

fn status_line(s: &tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

async fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Health { server } => {
            let status = health(&server, "brats.v1.Preprocessor").await?;
            println!("{server}: {status}");
            Ok(())
        }
        Cmd::Preprocess { server, image, label, case_id, out, force } => {
            let mut client =
                PreprocessorClient::connect(server.clone()).await.with_context(|| format!("connect {server}"))?;
            let req = pb::PreprocessCaseRequest {
                case_id,
                image_uris: image.iter().map(|i| to_uri(i)).collect::<Result<_, _>>()?,
                label_uri: label.map(|l| to_uri(&l)).transpose()?.unwrap_or_default(),
                output_uri: out.map(|o| to_uri(&o)).transpose()?.unwrap_or_default(),
                force,
                ..Default::default()
            };
            let resp = client.preprocess_case(req).await.map_err(|s| status_line(&s))?.into_inner();
            print_case(&resp);
            Ok(())
        }
        Cmd::PreprocessDataset { server, datalist, out } => {
            let mut client =
                PreprocessorClient::connect(server.clone()).await.with_context(|| format!("connect {server}"))?;
            let req = pb::PreprocessDatasetRequest {
                datalist_uri: to_uri(&datalist)?,
                output_uri: out.map(|o| to_uri(&o)).transpose()?.unwrap_or_default(),
                ..Default::default()
            };
            let mut stream = client.preprocess_dataset(req).await.map_err(|s| status_line(&s))?.into_inner();
            while let Some(p) = stream.message().await.map_err(|s| status_line(&s))? {
                if let Some(c) = &p.case {
                    let what = if !c.error.is_empty() {
                        format!("FAILED {}: {}", c.error_code, c.error)
                    } else if c.reused {
                        "reused".into()
                    } else {
                        format!("done in {:.2} s", c.seconds)
                    };
                    println!("[{}/{}] {} ({}) {what}", p.completed, p.total, c.case_id, c.section);
                }
                if p.done {
                    println!(
                        "{} cases, {} reused, {} failed; manifest {}",
                        p.total, p.reused, p.failed, p.manifest_uri
                    );
                }
            }
            Ok(())
        }
        Cmd::Segment { server, image, out, model_version, request_id } => {
            let channel =
                Channel::from_shared(server.clone())?.connect().await.with_context(|| format!("connect {server}"))?;
            let model = model_version.map(|v| pb::ModelSelector { version: v, ..Default::default() });
            let r = segment_stream(channel, &image, &out, model, request_id.unwrap_or_default(), true).await?;
            print_segmentation(&r, &out);
            Ok(())
        }
        Cmd::Models { server } => {
            let mut c = InferenceClient::connect(server.clone()).await.with_context(|| format!("connect {server}"))?;
            for m in
                c.list_models(pb::ListModelsRequest::default()).await.map_err(|s| status_line(&s))?.into_inner().models
            {
                let aliases: Vec<String> = m.aliases.iter().map(|(a, v)| format!("{a}→{v}")).collect();
                println!(
                    "{}  versions {}  aliases {}",
                    m.name,
                    m.versions
                        .iter()
                        .map(|v| if v.loaded { format!("{} (serving)", v.version) } else { v.version.clone() })
                        .collect::<Vec<_>>()
                        .join(", "),
                    aliases.join(", ")
                );
            }
            Ok(())
        }
        Cmd::Train { command } => train(command).await,
        Cmd::Demo { dir, shape, seed, train_seed, epochs } => demo(&dir, &shape, seed, train_seed, epochs).await,
    }
}

async fn health(server: &str, service: &str) -> anyhow::Result<String> {
    let channel = Channel::from_shared(server.to_string())?.connect_timeout(Duration::from_secs(2)).connect().await?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = client
        .check(tonic_health::pb::HealthCheckRequest { service: service.to_string() })
        .await
        .map_err(|s| status_line(&s))?;
    Ok(format!("{:?}", r.into_inner().status()))
}

async fn trainer(server: &str) -> anyhow::Result<TrainerClient<Channel>> {
    TrainerClient::connect(server.to_string()).await.with_context(|| format!("connect {server}"))
}

fn triple_arg(flag: &str, s: &str) -> anyhow::Result<Vec<u32>> {
    let v: Vec<u32> = s
        .split(',')
        .map(|p| p.trim().parse())
        .collect::<Result<_, _>>()
        .with_context(|| format!("{flag} '{s}': expected X,Y,Z"))?;
    anyhow::ensure!(v.len() == 3, "{flag} '{s}': expected three sizes X,Y,Z");
    Ok(v)
}

async fn train(cmd: TrainCmd) -> anyhow::Result<()> {
    match cmd {
        TrainCmd::Start {
            server,
            datalist,
            base_uri,
            epochs,
            lr,
            lr_schedule,
            warmup_steps,
            crop,
            val_roi,
            case_cache,
            devices,
            seed,
            model_name,
            promote,
            job_id,
            request_id,
            watch,
        } => {
            let mut spec = pb::JobSpec {
                datalist_uri: to_uri(&datalist)?,
                base_uri: base_uri.map(|b| to_uri(&b)).transpose()?.unwrap_or_default(),
                devices: devices
                    .map(|d| d.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect())
                    .unwrap_or_default(),
                seed,
                ..Default::default()
            };
            if epochs.is_some() || lr.is_some() || lr_schedule.is_some() || warmup_steps.is_some() {
                let schedule = lr_schedule.map(|s| {
                    pb::LrSchedule::from_str_name(&format!("LR_SCHEDULE_{}", s.replace('-', "_").to_ascii_uppercase()))
                        .expect("clap allows only cosine, constant and warmup-cosine")
                });
                spec.hyperparameters = Some(pb::Hyperparameters {
                    epochs: epochs.unwrap_or(0),
                    learning_rate: lr,
                    lr_schedule: schedule.unwrap_or(pb::LrSchedule::Unspecified) as i32,
                    warmup_steps,
                    ..Default::default()
                });
            }
            if let Some(c) = crop {
                spec.data = Some(pb::TrainingData {
                    crop: Some(pb::CropSpec {
                        mode: pb::CropMode::Random as i32,
                        size: triple_arg("--crop", &c)?,
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            }
            if let Some(c) = case_cache {
                spec.data.get_or_insert_with(Default::default).case_cache =
                    pb::CaseCache::from_str_name(&format!("CASE_CACHE_{}", c.to_ascii_uppercase()))
                        .expect("clap allows only auto, memory and stream") as i32;
            }
            if let Some(r) = val_roi {
                spec.validation = Some(pb::ValidationSpec {
                    sliding_window: Some(pb::SlidingWindowSpec {
                        roi_size: triple_arg("--val-roi", &r)?,
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            }
            if model_name.is_some() || promote {
                spec.registration = Some(pb::ModelRegistration {
                    model_name: model_name.unwrap_or_default(),
                    promote_to_production: promote,
                    ..Default::default()
                });
            }
            let mut client = trainer(&server).await?;
            let req = pb::StartJobRequest {
                spec: Some(spec),
                job_id: job_id.unwrap_or_default(),
                request_id: request_id.unwrap_or_default(),
            };
            let job = client.start_job(req).await.map_err(|s| status_line(&s))?.into_inner();
            println!(
                "job {} {} (seed {}, {} epochs, {})",
                job.id,
                job_state(job.state),
                job.seed,
                job.total_epochs,
                job.job_uri
            );
            if watch { watch_job(&server, &job.id, 0).await } else { Ok(()) }
        }
        TrainCmd::Watch { server, job, from } => watch_job(&server, &job, from).await,
        TrainCmd::List { server, state, limit } => {
            let states = state
                .iter()
                .map(|s| {
                    pb::JobState::from_str_name(&format!("JOB_STATE_{}", s.trim().to_ascii_uppercase()))
                        .map(|v| v as i32)
                        .with_context(|| format!("--state '{s}': use queued, preparing, running, succeeded, failed, cancelling or cancelled"))
                })
                .collect::<anyhow::Result<Vec<i32>>>()?;
            let mut client = trainer(&server).await?;
            let mut jobs = Vec::new();
            let mut token = String::new();
            while jobs.len() < limit {
                let req = pb::ListJobsRequest {
                    page_size: (limit - jobs.len()).min(1000) as u32,
                    page_token: token.clone(),
                    states: states.clone(),
                };
                let page = client.list_jobs(req).await.map_err(|s| status_line(&s))?.into_inner();
                jobs.extend(page.jobs);
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            println!("{:<24} {:<11} {:>9} {:>9} {:<20} model", "job", "state", "epoch", "best", "created (UTC)");
            for j in &jobs {
                println!(
                    "{:<24} {:<11} {:>9} {:>9} {:<20} {}",
                    j.id,
                    job_state(j.state),
                    format!("{}/{}", j.epoch, j.total_epochs),
                    j.best_metrics.map(|m| format!("{:.4}", m.mean)).unwrap_or_else(|| "-".into()),
                    j.created_at.as_ref().map(|t| utc(t.seconds)).unwrap_or_default(),
                    j.registered_model.as_ref().map(|m| format!("{}/{}", m.name, m.version)).unwrap_or_default()
                );
            }
            Ok(())
        }
        TrainCmd::Get { server, job } => {
            let mut client = trainer(&server).await?;
            let j = client.get_job(pb::GetJobRequest { job_id: job }).await.map_err(|s| status_line(&s))?.into_inner();
            print_job(&j);
            Ok(())
        }
        TrainCmd::Cancel { server, job, reason } => {
            let mut client = trainer(&server).await?;
            let req = pb::CancelJobRequest { job_id: job, reason: reason.unwrap_or_default() };
            let j = client.cancel_job(req).await.map_err(|s| status_line(&s))?.into_inner();
            println!("job {} {}", j.id, job_state(j.state));
            Ok(())
        }
        TrainCmd::Resume { server, job } => {
            let mut client = trainer(&server).await?;
            let j = client
                .resume_job(pb::ResumeJobRequest { job_id: job })
                .await
                .map_err(|s| status_line(&s))?
                .into_inner();
            println!("job {} {} (resume {})", j.id, job_state(j.state), j.resume_count);
            Ok(())
        }
    }
}

fn job_state(v: i32) -> &'static str {
    pb::JobState::try_from(v).map(|s| s.as_str_name().trim_start_matches("JOB_STATE_")).unwrap_or("UNKNOWN")
}

/// A timestamp as `YYYY-MM-DD HH:MM:SS` (UTC).
fn utc(seconds: i64) -> String {
    let days = seconds.div_euclid(86_400);
    let secs = seconds.rem_euclid(86_400);
    let (y, m, d) = brats_core::time::civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

fn dice(d: &pb::DiceScores) -> String {
    format!("TC {:.4}  WT {:.4}  ET {:.4}  mean {:.4}", d.tc, d.wt, d.et, d.mean)
}

fn print_job(j: &pb::Job) {
    println!("job {}  {}", j.id, job_state(j.state));
    if !j.failure_reason.is_empty() {
        let code = if j.failure_code.is_empty() { String::new() } else { format!(" [{}]", j.failure_code) };
        println!("  reason     {}{code}", j.failure_reason);
    }
    println!("  progress   epoch {}/{}, step {}", j.epoch, j.total_epochs, j.global_step);
    if j.samples_per_second > 0.0 {
        println!("  speed      {:.2} samples/s, ETA {}", j.samples_per_second, duration(j.eta_seconds));
    }
    if let Some(b) = &j.best_metrics {
        println!("  best       {} (epoch {})", dice(b), j.best_epoch);
    }
    let when = |seconds: Option<i64>| seconds.map(utc).unwrap_or_else(|| "-".into());
    println!(
        "  created    {} UTC; started {}; finished {}",
        when(j.created_at.as_ref().map(|t| t.seconds)),
        when(j.started_at.as_ref().map(|t| t.seconds)),
        when(j.finished_at.as_ref().map(|t| t.seconds))
    );
    println!("  seed       {}; resumed {} time(s); last event {}", j.seed, j.resume_count, j.last_sequence);
    if let Some(s) = &j.spec {
        println!("  datalist   {}", s.datalist_uri);
    }
    println!("  folder     {}", j.job_uri);
    if !j.latest_checkpoint_uri.is_empty() {
        println!("  latest     {}", j.latest_checkpoint_uri);
    }
    if !j.best_checkpoint_uri.is_empty() {
        println!("  best ckpt  {}", j.best_checkpoint_uri);
    }
    if let Some(m) = &j.registered_model {
        println!("  model      {} version {}", m.name, m.version);
    }
}

fn duration(s: f64) -> String {
    if !s.is_finite() || s <= 0.0 {
        return "-".into();
    }
    let s = s.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

/// Follows a job: a bar over the current epoch's steps, a line per epoch, state changes and
/// logs. Transient errors (the trainer restarting, a dropped connection) reconnect with
/// from_sequence = last seen + 1, for up to two minutes without news.
async fn watch_job(server: &str, job: &str, from: u64) -> anyhow::Result<()> {
    use pb::job_event::Event;
    let bar = indicatif::ProgressBar::new(1);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg}")
            .unwrap()
            .progress_chars("=> "),
    );
    let say = |line: String| bar.suspend(|| println!("{line}"));
    let mut next = from;
    let mut total_epochs = 0;
    let mut last_news = Instant::now();
    let mut retry_in = Duration::from_millis(250);
    loop {
        let attempt: Result<(), tonic::Status> = async {
            let mut client = TrainerClient::connect(server.to_string())
                .await
                .map_err(|e| tonic::Status::unavailable(format!("connect {server}: {e}")))?;
            if total_epochs == 0 {
                total_epochs = client.get_job(pb::GetJobRequest { job_id: job.to_string() }).await?.into_inner().total_epochs;
            }
            let mut stream = client
                .watch_job(pb::WatchJobRequest { job_id: job.to_string(), from_sequence: next })
                .await?
                .into_inner();
            while let Some(e) = stream.message().await? {
                next = e.sequence + 1;
                last_news = Instant::now();
                retry_in = Duration::from_millis(250);
                match e.event {
                    Some(Event::StateChanged(s)) => {
                        let reason = if s.reason.is_empty() { String::new() } else { format!(": {}", s.reason) };
                        say(format!("[{}] {} → {}{reason}", e.sequence, job_state(s.from), job_state(s.to)));
                    }
                    Some(Event::Step(s)) => {
                        bar.set_length(s.steps_per_epoch.max(1) as u64);
                        bar.set_position(s.step as u64);
                        bar.set_prefix(format!("epoch {}/{}", s.epoch, total_epochs));
                        bar.set_message(format!(
                            "loss {:.4}  lr {:.2e}  {:.2} samples/s  ETA {}",
                            s.loss,
                            s.learning_rate,
                            s.samples_per_second,
                            duration(s.eta_seconds)
                        ));
                    }
                    Some(Event::Epoch(m)) => {
                        let val = match &m.validation {
                            Some(d) => format!("  Dice {}{}", dice(d), if m.is_best { " (best)" } else { "" }),
                            None => String::new(),
                        };
                        say(format!(
                            "epoch {}/{}: loss {:.4}  lr {:.2e}{val}  [{:.1}s train, {:.1}s val, {:.2} samples/s, ETA {}]",
                            m.epoch,
                            total_epochs,
                            m.train_loss,
                            m.learning_rate,
                            m.train_seconds,
                            m.validation_seconds,
                            m.samples_per_second,
                            duration(m.eta_seconds)
                        ));
                    }
                    Some(Event::Checkpoint(c)) if c.best => say(format!("  best checkpoint (epoch {}) {}", c.epoch, c.uri)),
                    Some(Event::Checkpoint(_)) => {}
                    Some(Event::ModelRegistered(m)) => {
                        let model = m.model.unwrap_or_default();
                        let aliases =
                            if m.aliases.is_empty() { String::new() } else { format!(" ({})", m.aliases.join(", ")) };
                        say(format!("registered {} version {}{aliases} at {}", model.name, model.version, m.uri));
                    }
                    Some(Event::Log(l)) => say(format!("[{}] {}: {}", e.sequence, l.level, l.message)),
                    None => {}
                }
            }
            Ok(())
        }
        .await;
        match attempt {
            Ok(()) => break,
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled
                ) && last_news.elapsed() < Duration::from_secs(120) =>
            {
                say(format!("  ({}; reconnecting from event {next})", s.message()));
                tokio::time::sleep(retry_in).await;
                retry_in = (retry_in * 2).min(Duration::from_secs(5));
            }
            Err(s) => {
                bar.finish_and_clear();
                return Err(status_line(&s));
            }
        }
    }
    bar.finish_and_clear();
    let mut client = trainer(server).await?;
    let j =
        client.get_job(pb::GetJobRequest { job_id: job.to_string() }).await.map_err(|s| status_line(&s))?.into_inner();
    print_job(&j);
    if j.state == pb::JobState::Failed as i32 {
        bail!("job {} FAILED: {}", j.id, j.failure_reason);
    }
    Ok(())
}

fn print_case(r: &pb::PreprocessCaseResponse) {
    let m = r.metadata.clone().unwrap_or_default();
    println!("case {} ({})", r.case_id, if r.reused { "reused from the store" } else { "computed" });
    println!("  image   [4, {}]  float32, channels T1c T1 T2 FLAIR", join(&m.shape));
    if m.has_label {
        println!("  label   [3, {}]  uint8, channels TC WT ET", join(&m.shape));
    }
    println!(
        "  source  {} voxels, spacing {:?} mm, pipeline {}",
        join(&m.original_shape),
        m.spacing,
        m.pipeline_version
    );
    println!(
        "  {:<6} {:>12} {:>10} {:>12} {:>9} {:>9}",
        "chan", "mean(in)", "std(in)", "nonzero", "min(out)", "max(out)"
    );
    for c in &m.channels {
        println!(
            "  {:<6} {:>12.3} {:>10.3} {:>12} {:>9.3} {:>9.3}",
            c.name, c.mean, c.std, c.nonzero_voxels, c.min, c.max
        );
    }
    let timing: Vec<String> = r.timings.iter().map(|t| format!("{} {:.3}s", t.stage, t.seconds)).collect();
    println!("  timing  {}", timing.join(", "));
    println!("  tensors {}", r.tensors_uri);
    println!("  sidecar {}", r.metadata_uri);
}

/// Uploads `images` through SegmentStream with a progress bar, writes the returned label map to
/// `out` after checking every chunk's CRC-32C and the file's SHA-256.
async fn segment_stream(
    channel: Channel,
    images: &[PathBuf],
    out: &Path,
    model: Option<pb::ModelSelector>,
    request_id: String,
    show_progress: bool,
) -> anyhow::Result<pb::SegmentResponse> {
    use pb::segment_stream_request::Msg as In;
    use pb::segment_stream_response::Msg as Out;
    use sha2::Digest;
    let files: Vec<Vec<u8>> = images
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("{}", p.display())))
        .collect::<Result<_, _>>()?;
    let total: u64 = files.iter().map(|f| f.len() as u64).sum();
    let bar = if show_progress { indicatif::ProgressBar::new(total) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap()
            .progress_chars("=> "),
    );
    bar.set_message("uploading");
    let header = pb::SegmentStreamHeader {
        request_id,
        model,
        files: files
            .iter()
            .zip(images)
            .map(|(f, p)| pb::StreamFile {
                name: p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                size_bytes: f.len() as u64,
                content_type: "application/gzip".into(),
            })
            .collect(),
        ..Default::default()
    };
    const CHUNK: usize = 1 << 20;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let upload_bar = bar.clone();
    tokio::spawn(async move {
        let _ = tx.send(pb::SegmentStreamRequest { msg: Some(In::Header(header)) }).await;
        let mut checksums = Vec::new();
        for (i, f) in files.iter().enumerate() {
            for (k, part) in f.chunks(CHUNK).enumerate() {
                let chunk = pb::FileChunk {
                    file_index: i as u32,
                    offset: (k * CHUNK) as u64,
                    data: part.to_vec(),
                    crc32c: Some(crc32c::crc32c(part)),
                };
                if tx.send(pb::SegmentStreamRequest { msg: Some(In::Chunk(chunk)) }).await.is_err() {
                    return;
                }
                upload_bar.inc(part.len() as u64);
            }
            checksums.push(pb::FileChecksum {
                file_index: i as u32,
                sha256: hex::encode(sha2::Sha256::digest(f)),
                crc32c: None,
                size_bytes: f.len() as u64,
            });
        }
        let _ = tx.send(pb::SegmentStreamRequest { msg: Some(In::Trailer(pb::StreamTrailer { checksums })) }).await;
    });
    let mut client = InferenceClient::new(channel).max_decoding_message_size(16 << 20);
    let mut stream = client
        .segment_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| status_line(&s))?
        .into_inner();
    let mut result = None;
    let mut label = Vec::new();
    let mut expected_size = 0u64;
    while let Some(msg) = stream.message().await.map_err(|s| status_line(&s))? {
        match msg.msg {
            Some(Out::Progress(p)) if p.windows_total > 0 => {
                if bar.length() != Some(p.windows_total as u64) {
                    bar.set_length(p.windows_total as u64);
                    bar.set_style(
                        indicatif::ProgressStyle::with_template("{msg:>12} [{bar:40}] window {pos}/{len} {elapsed}")
                            .unwrap()
                            .progress_chars("=> "),
                    );
                    bar.set_message("inference");
                }
                bar.set_position(p.windows_done as u64);
            }
            Some(Out::Progress(_)) => {}
            Some(Out::Result(r)) => result = Some(r),
            Some(Out::Outputs(o)) => {
                expected_size = o.files.first().map(|f| f.size_bytes).unwrap_or(0);
                bar.set_length(expected_size);
                bar.set_position(0);
                bar.set_style(
                    indicatif::ProgressStyle::with_template("{msg:>12} [{bar:40}] {bytes}/{total_bytes}")
                        .unwrap()
                        .progress_chars("=> "),
                );
                bar.set_message("downloading");
            }
            Some(Out::Chunk(c)) if c.file_index == 0 => {
                anyhow::ensure!(c.offset as usize == label.len(), "chunk at offset {} arrived out of order", c.offset);
                if let Some(crc) = c.crc32c {
                    anyhow::ensure!(
                        crc32c::crc32c(&c.data) == crc,
                        "label chunk at offset {} is corrupt (CRC-32C)",
                        c.offset
                    );
                }
                label.extend_from_slice(&c.data);
                bar.inc(c.data.len() as u64);
            }
            Some(Out::Chunk(_)) => {}
            Some(Out::Trailer(t)) => {
                let want = t.checksums.iter().find(|c| c.file_index == 0).map(|c| c.sha256.clone()).unwrap_or_default();
                anyhow::ensure!(
                    label.len() as u64 == expected_size,
                    "label map truncated: {} of {expected_size} bytes",
                    label.len()
                );
                anyhow::ensure!(
                    hex::encode(sha2::Sha256::digest(&label)) == want,
                    "label map checksum mismatch; retry"
                );
            }
            None => {}
        }
    }
    bar.finish_and_clear();
    let result = result.context("the server ended the stream without a result")?;
    let tmp = out.with_extension("part");
    std::fs::write(&tmp, &label).with_context(|| format!("{}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("{}", out.display()))?;
    Ok(result)
}

fn print_segmentation(r: &pb::SegmentResponse, out: &Path) {
    let v = r.volumes.unwrap_or_default();
    let t = r.timings.unwrap_or_default();
    let provider = pb::ExecutionProvider::try_from(r.provider).map(|p| p.as_str_name()).unwrap_or("?");
    println!(
        "segmentation {} ({}), model {} version {}, provider {provider}{}",
        out.display(),
        join(&r.shape),
        r.model_name,
        r.model_version,
        if r.fallback { format!(" (fallback: {})", r.fallback_reason) } else { String::new() }
    );
    println!("  volumes  TC {:.2} mL   WT {:.2} mL   ET {:.2} mL", v.tc_ml, v.wt_ml, v.et_ml);
    println!(
        "  timing   queue {:.3}s, decode {:.3}s, preprocess {:.3}s, inference {:.3}s, postprocess {:.3}s, encode {:.3}s; total on the server {:.2}s",
        t.queue_seconds,
        t.decode_seconds,
        t.preprocess_seconds,
        t.inference_seconds,
        t.postprocess_seconds,
        t.encode_seconds,
        t.total_seconds
    );
}

fn join(v: &[u32]) -> String {
    v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ")
}

/// A service started as a child process, stopped with SIGTERM when dropped.
struct ServiceProcess {
    child: Child,
    name: String,
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        // SIGTERM lets the service drain and report NOT_SERVING; then reap it.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} did not stop in 10 s; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The binary `name` next to this one (cargo puts all workspace binaries in one folder).
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.parent().context("bratsctl has no parent directory")?.join(name);
    if !p.exists() {
        bail!("{} not found next to bratsctl; build the workspace (cargo build) first", p.display());
    }
    Ok(p)
}

async fn start_service(
    bin: &str,
    args: &[String],
    log: &Path,
    health_name: &str,
    addr: &str,
) -> anyhow::Result<ServiceProcess> {
    let logfile = std::fs::File::create(log)?;
    let child = Command::new(sibling(bin)?)
        .args(args)
        .stdout(Stdio::null())
        .stderr(logfile)
        .spawn()
        .with_context(|| format!("start {bin}"))?;
    let mut svc = ServiceProcess { child, name: bin.to_string() };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = svc.child.try_wait() {
            bail!("{bin} exited with {status} during start-up; see {}", log.display());
        }
        if let Ok(s) = health(addr, health_name).await
            && s == "Serving"
        {
            return Ok(svc);
        }
        if Instant::now() > deadline {
            bail!("{bin} did not report SERVING within 30 s; see {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Dice of one region between two label maps (BraTS codes), 1 when both are empty.
fn region_dice(pred: &[u8], truth: &[u8], codes: &[u8]) -> f64 {
    let (mut both, mut p, mut t) = (0u64, 0u64, 0u64);
    for (&a, &b) in pred.iter().zip(truth) {
        let (x, y) = (codes.contains(&a), codes.contains(&b));
        both += u64::from(x && y);
        p += u64::from(x);
        t += u64::from(y);
    }
    if p + t == 0 { 1.0 } else { 2.0 * both as f64 / (p + t) as f64 }
}

async fn demo(dir: &Path, shape: &str, seed: u64, train_seed: u64, epochs: u32) -> anyhow::Result<()> {
    let dir = std::path::absolute(dir)?;
    std::fs::create_dir_all(&dir)?;
    let shape: Vec<usize> =
        shape.split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>().context("--shape X,Y,Z")?;
    let shape: [usize; 3] = shape.try_into().map_err(|_| anyhow::anyhow!("--shape needs three values"))?;
    let (training, validation) = (12, 4);

    println!(
        "1. generating a synthetic BraTS-like dataset: {training} training + {validation} validation cases {shape:?}, and one held-out case"
    );
    let t = Instant::now();
    let data = dir.join("data");
    let datalist = brats_preprocess::synthetic::write_dataset(&data, shape, seed, training, validation)?;
    let held_out_seed = seed + 1000;
    let held_out =
        brats_preprocess::synthetic::generate(&brats_preprocess::synthetic::SyntheticSpec::new(shape, held_out_seed));
    let files = brats_preprocess::synthetic::write_case(
        &held_out,
        &dir.join("held-out"),
        &format!("synth-{held_out_seed:05}"),
    )?;
    println!("   datalist {} ({:.1} s)", datalist.display(), t.elapsed().as_secs_f64());

    let store = dir.join("store");
    let paddr_port = free_port()?;
    let paddr = format!("http://127.0.0.1:{paddr_port}");
    println!("2. starting the preprocessing service on {paddr} (store file://{})", store.display());
    let pargs = vec![
        "serve".to_string(),
        "--listen".into(),
        format!("127.0.0.1:{paddr_port}"),
        "--metrics-listen".into(),
        format!("127.0.0.1:{}", free_port()?),
        "--output-root".into(),
        format!("file://{}", store.display()),
    ];
    let _preprocess =
        start_service("brats-preprocess", &pargs, &dir.join("preprocess.log"), "brats.v1.Preprocessor", &paddr).await?;

    let tport = free_port()?;
    let taddr = format!("http://127.0.0.1:{tport}");
    let registry = format!("file://{}", store.join("models").display());
    println!("3. starting the trainer service on {taddr} (datasets prepared by the preprocessing service)");
    let targs = vec![
        "serve".to_string(),
        "--listen".into(),
        format!("127.0.0.1:{tport}"),
        "--metrics-listen".into(),
        format!("127.0.0.1:{}", free_port()?),
        "--store-root".into(),
        format!("file://{}", store.display()),
        "--registry".into(),
        registry.clone(),
        "--preprocess-endpoint".into(),
        paddr.clone(),
    ];
    let _trainer = start_service("brats-trainer", &targs, &dir.join("trainer.log"), "brats.v1.Trainer", &taddr).await?;

    let roi: Vec<u32> = shape.iter().map(|s| (s.div_ceil(8) * 8) as u32).collect();
    println!(
        "4. StartJob: SegResNet (8 filters, 3 levels), {epochs} epochs, Adam lr 5e-3 with cosine decay, DiceLoss, crop {roi:?} with flips and intensity jitter, validation every 5 epochs"
    );
    let spec = pb::JobSpec {
        datalist_uri: format!("file://{}", datalist.display()),
        hyperparameters: Some(pb::Hyperparameters { epochs, learning_rate: Some(5e-3), ..Default::default() }),
        data: Some(pb::TrainingData {
            crop: Some(pb::CropSpec { mode: pb::CropMode::Random as i32, size: roi.clone(), ..Default::default() }),
            ..Default::default()
        }),
        validation: Some(pb::ValidationSpec {
            interval_epochs: 5,
            sliding_window: Some(pb::SlidingWindowSpec { roi_size: roi.clone(), ..Default::default() }),
            max_cases: 0,
        }),
        devices: vec!["cpu".into()],
        seed: Some(train_seed),
        model: Some(pb::SegResNetSpec {
            blocks_down: vec![1, 1, 1],
            blocks_up: vec![1, 1],
            init_filters: Some(8),
            ..Default::default()
        }),
        registration: Some(pb::ModelRegistration {
            model_name: "segresnet".into(),
            promote_to_production: true,
            description: "bratsctl demo: synthetic data".into(),
            ..Default::default()
        }),
        labels: [("owner".to_string(), "demo".to_string())].into(),
        ..Default::default()
    };
    let mut trainer = TrainerClient::connect(taddr.clone()).await?;
    let job = trainer
        .start_job(pb::StartJobRequest { spec: Some(spec), request_id: format!("demo-{seed}"), ..Default::default() })
        .await
        .map_err(|s| status_line(&s))?
        .into_inner();
    println!("   job {} {}", job.id, job_state(job.state));
    let t = Instant::now();
    watch_job(&taddr, &job.id, 0).await?;
    let job =
        trainer.get_job(pb::GetJobRequest { job_id: job.id.clone() }).await.map_err(|s| status_line(&s))?.into_inner();
    anyhow::ensure!(job.state == pb::JobState::Succeeded as i32, "job {} ended {}", job.id, job_state(job.state));
    println!("   trained in {:.0} s", t.elapsed().as_secs_f64());

    let iport = free_port()?;
    let iaddr = format!("http://127.0.0.1:{iport}");
    println!(
        "5. starting the inference service on {iaddr} (model segresnet@production from the registry; ONNX Runtime, CPU)"
    );
    let iargs = vec![
        "serve".to_string(),
        "--listen".into(),
        format!("127.0.0.1:{iport}"),
        "--metrics-listen".into(),
        format!("127.0.0.1:{}", free_port()?),
        "--registry".into(),
        registry,
        "--output-root".into(),
        format!("file://{}", store.join("predictions").display()),
        "--roi".into(),
        roi.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(","),
        "--warmup-shape".into(),
        roi.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(","),
    ];
    let _inference =
        start_service("brats-inference", &iargs, &dir.join("inference.log"), "brats.v1.Inference", &iaddr).await?;
    println!(
        "6. SegmentStream on the held-out case: upload the 4 modalities in checked chunks, segment, download the label map"
    );
    let out = dir.join("seg.nii.gz");
    let channel = Channel::from_shared(iaddr)?.connect().await?;
    let t = Instant::now();
    let r = segment_stream(channel, &files.images, &out, None, format!("demo-{seed}"), false).await?;
    print_segmentation(&r, &out);
    println!("   round trip {:.2} s", t.elapsed().as_secs_f64());
    let seg = brats_core::nifti_io::read_nifti(&std::fs::read(&out)?, &out.display().to_string(), &Default::default())?;
    let seg: Vec<u8> = seg.data.iter().map(|&v| v as u8).collect();
    let dices = [
        ("TC", region_dice(&seg, &held_out.label, &[1, 4])),
        ("WT", region_dice(&seg, &held_out.label, &[1, 2, 4])),
        ("ET", region_dice(&seg, &held_out.label, &[4])),
    ];
    let mean = dices.iter().map(|(_, d)| d).sum::<f64>() / 3.0;
    println!(
        "7. Dice against the held-out label: {}  mean {mean:.3}",
        dices.iter().map(|(n, d)| format!("{n} {d:.3}")).collect::<Vec<_>>().join("  ")
    );
    println!(
        "8. done; job artefacts under {}, service logs in {}",
        store.join("jobs").join(&job.id).display(),
        dir.display()
    );
    Ok(())
}
