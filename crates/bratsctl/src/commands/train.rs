//! `bratsctl train …`: jobs on a trainer service.

use anyhow::Context;
use brats_proto::v1 as pb;

use super::status_line;
use super::watch::{job_state, print_job, trainer, utc, watch_job};

/// Default address of the trainer service.
pub(crate) const TRAINER: &str = "http://127.0.0.1:50053";

#[derive(clap::Subcommand)]
// Parsed once per process: boxing `Start`'s many options would only add noise.
#[allow(clippy::large_enum_variant)]
pub(crate) enum TrainCmd {
    /// Start a training job (SegResNet, the MONAI bundle's recipe; unset options take the
    /// bundle's values) and print it; --watch follows it to the end.
    Start {
        /// Trainer service address.
        #[arg(long, default_value = TRAINER)]
        server: String,
        /// The job: the flags `brats-trainer train` takes too, with the same meaning. Without
        /// --seed the trainer draws one and shows it in the job.
        #[command(flatten)]
        job: brats_cli::JobSpecArgs,
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
        /// Where the workers run: on the trainer's host (local, the default), or handed to the
        /// trainer's Slurm cluster (an sbatch job) or Kubernetes (a Kubeflow TrainJob).
        #[arg(long, value_enum)]
        backend: Option<BackendArg>,
        /// Nodes of a slurm or kubernetes job (default 1).
        #[arg(long)]
        nodes: Option<u32>,
        /// Workers per node of a slurm or kubernetes job: GPUs per node, or CPU ranks with
        /// --devices cpu (default every GPU of the node, or one CPU rank).
        #[arg(long)]
        devices_per_node: Option<u32>,
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

/// `--backend`: the engine a job's workers run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum BackendArg {
    /// Child processes on the trainer's host.
    Local,
    /// An sbatch job on the trainer's Slurm cluster.
    Slurm,
    /// A Kubeflow Trainer v2 TrainJob.
    Kubernetes,
}

impl BackendArg {
    fn to_proto(self) -> pb::Backend {
        match self {
            BackendArg::Local => pb::Backend::Local,
            BackendArg::Slurm => pb::Backend::Slurm,
            BackendArg::Kubernetes => pb::Backend::Kubernetes,
        }
    }
}

/// Runs one `bratsctl train` command.
pub(crate) async fn run(cmd: TrainCmd) -> anyhow::Result<()> {
    match cmd {
        TrainCmd::Start {
            server,
            job,
            model_name,
            promote,
            job_id,
            request_id,
            backend,
            nodes,
            devices_per_node,
            watch,
        } => {
            let mut spec = job.to_spec()?;
            if backend.is_some() || nodes.is_some() || devices_per_node.is_some() {
                spec.placement = Some(pb::Placement {
                    backend: backend.map_or(pb::Backend::Unspecified, BackendArg::to_proto) as i32,
                    nodes: nodes.unwrap_or(0),
                    devices_per_node: devices_per_node.unwrap_or(0),
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
