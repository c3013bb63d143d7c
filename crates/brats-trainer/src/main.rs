//! `brats-trainer`: training (offline `train`, the `serve` service and its `worker` processes).
//! The model tooling (MONAI checkpoint import, fresh weights, ONNX export) is `brats-model`.
//!
//! ```text
//! brats-trainer train --datalist DATALIST.json [--base-dir DIR] [--epochs N] [--lr LR] [--crop X,Y,Z]
//!                     [--val-roi X,Y,Z] [--devices cpu|cuda:0,cuda:1,…] [--seed N] --out DIR
//! brats-trainer node [--nnodes N --node-rank R --master-addr H --master-port P] -- train …
//! brats-trainer node [--nproc-per-node N|auto|gpu|cpu …] -- worker --job-uri URI --manifest-uri URI
//! brats-trainer render --backend slurm|kubernetes --nodes N --devices-per-node M --job-uri URI
//! brats-trainer serve [--config trainer.toml]
//! ```

use std::path::PathBuf;

use brats_train::train::TrainError;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod cli;
use cli::TrainArgs;

/// BraTS SegResNet trainer tools.
#[derive(Debug, Parser)]
#[command(name = "brats-trainer", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train offline (no servers): preprocess the datalist in-process, train, and write
    /// DIR/best.safetensors, model.onnx, metadata.json, metrics.csv and curves.png. Several
    /// devices launch one process per device; torchrun-style variables (MASTER_ADDR,
    /// MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK) join a multi-node job instead. With
    /// `--devices cpu`, LOCAL_WORLD_SIZE=N (without WORLD_SIZE) starts N Gloo ranks. A cancel
    /// (SIGINT/SIGTERM) exits with code 3 after the checkpoint.
    Train(TrainArgs),
    /// Launch this node's workers of a multi-node job (torchrun's role): reads where the node
    /// sits from Kubeflow Trainer's PET_* or Slurm's SLURM_* variables (flags override them),
    /// starts one `train` worker per local device with RANK, WORLD_SIZE, LOCAL_RANK,
    /// LOCAL_WORLD_SIZE and MASTER_*, forwards SIGINT/SIGTERM and fails when one worker fails.
    /// `brats-trainer node [--nnodes N --node-rank R --master-addr H --master-port P
    /// --nproc-per-node N|auto|gpu|cpu] -- train …`
    Node(cli::NodeArgs),
    /// Print what the trainer service submits for a job placed on a cluster engine: the sbatch
    /// script (`--backend slurm`) or the Kubeflow Trainer v2 TrainJob (`--backend kubernetes`),
    /// from the configuration's [cluster.*] section.
    /// `brats-trainer render --backend slurm|kubernetes --nodes N --devices-per-node M --job-uri URI`
    Render(cli::RenderArgs),
    /// Run the trainer gRPC service.
    Serve {
        /// TOML configuration (also BRATS_TRAINER_CONFIG); BRATS_TRAINER_* variables override it.
        #[arg(long, env = "BRATS_TRAINER_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        flags: brats_service::ServeFlags,
        /// Store root of jobs (overrides the configuration).
        #[arg(long)]
        store_root: Option<String>,
        /// Model registry root (overrides the configuration).
        #[arg(long)]
        registry: Option<String>,
        /// Preprocessing service that prepares datasets, e.g. http://127.0.0.1:50051; "" = the
        /// same code in-process (overrides the configuration).
        #[arg(long)]
        preprocess_endpoint: Option<String>,
    },
    /// Time training steps of the bundle's network on random data (the Rust side of the
    /// training-step benchmark; benchmarks/trainer runs it beside MONAI's). Prints one JSON line.
    BenchStep(cli::BenchStepArgs),
    /// One rank of a service job (launched by `serve`; not for direct use).
    #[command(hide = true)]
    Worker {
        /// The job's folder URI (config.json, checkpoints/, artifacts/).
        #[arg(long)]
        job_uri: String,
        /// The preprocessed dataset's manifest URI.
        #[arg(long)]
        manifest_uri: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let serving = matches!(cli.command, Command::Serve { .. });
    let json = matches!(&cli.command, Command::Serve { flags, .. } if flags.json_logs);
    brats_service::init_logging(if serving { "info" } else { "warn" }, json);
    match cli.command {
        Command::Train(args) => training_exit_code(cli::train(args)),
        Command::Node(args) => training_exit_code(cli::node(args)),
        Command::BenchStep(args) => exit_code(cli::bench_step(args)),
        Command::Render(args) => exit_code(cli::render(args)),
        Command::Worker { job_uri, manifest_uri } => cli::worker(&job_uri, &manifest_uri),
        Command::Serve { config, flags, store_root, registry, preprocess_endpoint } => brats_service::run_main(
            cli::serve(config, cli::ServeOverrides { flags, store_root, registry, preprocess_endpoint }),
        ),
    }
}

/// A cancel exits with [`cli::EXIT_CANCELLED`], so a launching parent (the node launcher, the
/// service, Slurm) tells a cancel from a failure and does not kill the peers that are still
/// writing the checkpoint.
fn training_exit_code(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Err(e) if matches!(e.downcast_ref::<TrainError>(), Some(TrainError::Cancelled)) => {
            eprintln!("error: cancelled; the latest checkpoint is kept, run the same command to resume");
            ExitCode::from(cli::EXIT_CANCELLED)
        }
        r => exit_code(r),
    }
}

fn exit_code(r: anyhow::Result<()>) -> ExitCode {
    brats_cli::exit_with(r, 2)
}
