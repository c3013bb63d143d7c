//! `brats-trainer`: training (offline `train`, the `serve` service and its `worker` processes),
//! MONAI checkpoint import and ONNX export.
//!
//! ```text
//! brats-trainer train --datalist DATALIST.json [--base-dir DIR] [--epochs N] [--lr LR] [--crop X,Y,Z]
//!                     [--val-roi X,Y,Z] [--devices cpu|cuda:0,cuda:1,…] [--seed N] --out DIR
//! brats-trainer serve [--config trainer.toml]
//! brats-trainer import-monai --checkpoint IN.pt|IN.safetensors --out WEIGHTS.safetensors
//! brats-trainer export-onnx --weights WEIGHTS.safetensors --out MODEL.onnx [--fp16]
//! ```

use std::path::PathBuf;

use anyhow::Context;
use brats_model::SegResNetConfig;
use brats_model::metadata::export_onnx_file;
use brats_model::onnx::{ExportOptions, GroupNormLowering, Precision};
use brats_model::weights;
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
    /// MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK) join a multi-node job instead.
    Train(TrainArgs),
    /// Run the trainer gRPC service.
    Serve {
        /// TOML configuration (also BRATS_TRAINER_CONFIG); BRATS_TRAINER_* variables override it.
        #[arg(long, env = "BRATS_TRAINER_CONFIG")]
        config: Option<PathBuf>,
        /// gRPC listen address (overrides the configuration).
        #[arg(long)]
        listen: Option<String>,
        /// Store root of jobs (overrides the configuration).
        #[arg(long)]
        store_root: Option<String>,
        /// Model registry root (overrides the configuration).
        #[arg(long)]
        registry: Option<String>,
        /// Prometheus `/metrics` address; "" disables (overrides the configuration).
        #[arg(long)]
        metrics_listen: Option<String>,
        /// Preprocessing service that prepares datasets, e.g. http://127.0.0.1:50051; "" = the
        /// same code in-process (overrides the configuration).
        #[arg(long)]
        preprocess_endpoint: Option<String>,
        /// Log JSON lines.
        #[arg(long)]
        json_logs: bool,
    },
    /// Time training steps of the bundle's network on random data (the Rust side of the
    /// training-step benchmark; benchmarks/trainer runs it beside MONAI's). Prints one JSON line.
    BenchStep(cli::BenchStepArgs),
    /// Write a synthetic BraTS-like dataset and its datalist (the preprocessing CLI's `synth
    /// --validation`, here too so a GPU machine needs only this binary).
    #[command(hide = true)]
    SynthDataset {
        /// Volume shape X,Y,Z.
        #[arg(long, default_value = "240,240,155")]
        shape: String,
        /// Seed of the first case.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Training cases.
        #[arg(long)]
        training: usize,
        /// Validation cases.
        #[arg(long)]
        validation: usize,
        /// Output folder (datalist.json and the cases).
        #[arg(long)]
        out: PathBuf,
    },
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
    /// Convert a MONAI checkpoint (torch.save `.pt`, plain or {"model": …}, or `.safetensors`)
    /// into our safetensors weights (MONAI's parameter names). Every key and shape is checked
    /// against the network; on any mismatch nothing is written.
    ImportMonai {
        /// The MONAI checkpoint (format detected from the content).
        #[arg(long)]
        checkpoint: PathBuf,
        /// The safetensors file to write.
        #[arg(long)]
        out: PathBuf,
        /// SegResNet configuration as JSON with MONAI's argument names (default: the
        /// brats_mri_segmentation bundle), e.g. '{"init_filters": 8}'.
        #[arg(long)]
        config: Option<String>,
    },
    /// Write freshly initialised SegResNet weights (libtorch's default initialisation, as a
    /// MONAI model before training), seeded — the starting point of a training run, and an
    /// untrained model for trying the pipeline end to end.
    Init {
        /// The safetensors file to write.
        #[arg(long)]
        out: PathBuf,
        /// Seed of the initialisation.
        #[arg(long, default_value_t = 0)]
        seed: i64,
        /// SegResNet configuration as JSON with MONAI's argument names (default: the bundle's).
        #[arg(long)]
        config: Option<String>,
    },
    /// Export weights to ONNX (opset 18) and write metadata.json beside the model.
    ExportOnnx {
        /// Our safetensors weights (or any checkpoint import-monai accepts).
        #[arg(long)]
        weights: PathBuf,
        /// The ONNX file to write.
        #[arg(long)]
        out: PathBuf,
        /// Float16 weights and convolutions (normalisations stay float32; I/O is float32).
        #[arg(long)]
        fp16: bool,
        /// Where to write the metadata (default: metadata.json in the output's folder).
        #[arg(long)]
        metadata: Option<PathBuf>,
        /// Lower GroupNorm as torch.onnx.export does (Reshape → InstanceNormalization →
        /// Reshape): fewer nodes, but ~3e-4 from torch on ONNX Runtime CPU instead of ~5e-6.
        #[arg(long)]
        instance_norm: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let serving = matches!(cli.command, Command::Serve { .. });
    let json = matches!(cli.command, Command::Serve { json_logs: true, .. });
    brats_service::init_logging(if serving { "info" } else { "warn" }, json);
    match cli.command {
        Command::Train(args) => exit_code(cli::train(args)),
        Command::BenchStep(args) => exit_code(cli::bench_step(args)),
        Command::SynthDataset { shape, seed, training, validation, out } => {
            exit_code(cli::synth_dataset(&shape, seed, training, validation, &out))
        }
        Command::Worker { job_uri, manifest_uri } => cli::worker(&job_uri, &manifest_uri),
        Command::Serve { config, listen, store_root, registry, metrics_listen, preprocess_endpoint, json_logs: _ } => {
            brats_service::run_main(cli::serve(
                config,
                cli::ServeOverrides { listen, store_root, registry, metrics_listen, preprocess_endpoint },
            ))
        }
        other => exit_code(tools(other)),
    }
}

fn exit_code(r: anyhow::Result<()>) -> ExitCode {
    brats_cli::exit_with(r, 2)
}

fn tools(command: Command) -> anyhow::Result<()> {
    match command {
        Command::ImportMonai { checkpoint, out, config } => {
            let config: SegResNetConfig = match config {
                Some(s) => serde_json::from_str(&s).context("parsing --config")?,
                None => SegResNetConfig::default(),
            };
            let sd = weights::import_monai(&checkpoint, &config)
                .with_context(|| format!("importing {}", checkpoint.display()))?;
            weights::save_weights(&out, &sd, &config, None).with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {} ({} tensors, {} parameters)", out.display(), sd.len(), config.parameter_count());
        }
        Command::Init { out, seed, config } => {
            let config: SegResNetConfig = match config {
                Some(s) => serde_json::from_str(&s).context("parsing --config")?,
                None => SegResNetConfig::default(),
            };
            tch::manual_seed(seed);
            let vs = tch::nn::VarStore::new(tch::Device::Cpu);
            let _net = brats_model::SegResNet::new(&vs.root(), &config)?;
            let sd = weights::state_dict_from_var_store(&vs, &config)?;
            let provenance = serde_json::json!({"initialised": {"seed": seed, "trained": false}});
            weights::save_weights(&out, &sd, &config, Some(&provenance))
                .with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {} (untrained, seed {seed}, {} parameters)", out.display(), config.parameter_count());
        }
        Command::ExportOnnx { weights, out, fp16, metadata, instance_norm } => {
            let precision = if fp16 { Precision::Fp16 } else { Precision::Fp32 };
            let options = ExportOptions {
                precision,
                group_norm: if instance_norm {
                    GroupNormLowering::InstanceNorm
                } else {
                    GroupNormLowering::StagedMeans
                },
            };
            let report = export_onnx_file(&weights, &out, metadata.as_deref(), options)
                .with_context(|| format!("exporting {}", weights.display()))?;
            println!(
                "wrote {} ({}, sha256 {}) and {}",
                report.onnx_path.display(),
                precision.name(),
                report.metadata.onnx.sha256,
                report.metadata_path.display()
            );
        }
        Command::Train(_)
        | Command::BenchStep(_)
        | Command::SynthDataset { .. }
        | Command::Serve { .. }
        | Command::Worker { .. } => {
            unreachable!("dispatched in main")
        }
    }
    Ok(())
}
