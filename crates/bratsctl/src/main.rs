//! `bratsctl`: the client of the platform's gRPC services, and `bratsctl demo`, the first-run
//! demonstration that starts the services on loopback and runs the main job through them.
//!
//! This file parses and dispatches; each command lives in `commands/`, the demo in `demo.rs`.

mod commands;
mod demo;
mod demo_security;
mod pki;

use clap::{Parser, Subcommand};
use commands::{audit, health, keys, models, pacs, preprocess, security, segment, train};

#[derive(Parser)]
#[command(name = "bratsctl", version, about = "Client of the BraTS segmentation platform")]
struct Cli {
    /// TLS and credentials for every command (also from BRATS_CA, BRATS_CERT, …).
    #[command(flatten)]
    security: brats_cli::ClientSecurity,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Ask a server whether its services are SERVING (grpc.health.v1): the one --service names,
    /// else every brats.v1 service the server lists through reflection. Exits 0 only when all
    /// of them are SERVING (usable as a container healthcheck).
    Health(health::HealthArgs),
    /// Preprocess one case on a running preprocessing service.
    Preprocess(preprocess::PreprocessArgs),
    /// Preprocess a MONAI decathlon datalist on a running service, showing progress.
    PreprocessDataset(preprocess::PreprocessDatasetArgs),
    /// Segment a case on a running inference service: upload the four modalities in chunks
    /// (SegmentStream, no shared storage needed), download the label map, verify its checksum.
    Segment(segment::SegmentArgs),
    /// List the models a running inference service knows.
    Models(models::ModelsArgs),
    /// Training jobs on a running trainer service: start, watch, list, get, cancel, resume.
    Train {
        #[command(subcommand)]
        command: train::TrainCmd,
    },
    /// The first-run demo: generate a synthetic dataset and a held-out case, start the
    /// preprocessing and trainer services on loopback, train a small SegResNet through the
    /// trainer (its dataset prepared by the preprocessing service), register it as
    /// `brats_mri_segmentation@production`, start the inference service, segment the held-out case through
    /// it and print the Dice against its label.
    Demo(demo::DemoArgs),
    /// The PACS gateway's study jobs: `pacs submit --study UID [--watch]` pulls a study from a
    /// DICOMweb archive and segments it; `watch`, `get`, `list` jobs; `echo` a destination.
    Pacs {
        #[command(flatten)]
        address: pacs::GatewayAddress,
        #[command(subcommand)]
        command: pacs::PacsCmd,
    },
    /// Audit logs written by the services: `audit verify FILE...` checks their hash chains.
    Audit {
        #[command(subcommand)]
        command: audit::AuditCmd,
    },
    /// API keys: `keys new` mints one for a caller (the key to a file, its hashed entry for the
    /// services' api_keys_file to stdout).
    Keys {
        #[command(subcommand)]
        command: keys::KeysCmd,
    },
    /// Deployment security files: `security init` makes a CA, service certificates and an
    /// operator API key in the layout the compose `tls` variant mounts.
    Security {
        #[command(subcommand)]
        command: security::SecurityCmd,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    commands::set_security(cli.security);
    let result = match cli.command {
        Cmd::Health(a) => health::run(a).await,
        Cmd::Preprocess(a) => preprocess::run_case(a).await,
        Cmd::PreprocessDataset(a) => preprocess::run_dataset(a).await,
        Cmd::Segment(a) => segment::run(a).await,
        Cmd::Models(a) => models::run(a).await,
        Cmd::Train { command } => train::run(command).await,
        Cmd::Demo(a) => demo::run(a).await,
        Cmd::Pacs { address, command } => pacs::run(address, command).await,
        Cmd::Audit { command } => audit::run(command),
        Cmd::Keys { command } => keys::run(command),
        Cmd::Security { command } => security::run(command),
    };
    brats_cli::exit_with(result, 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every command's flags are well-formed and unique, the flattened training flags included.
    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// `train start` takes the shared training flags, `--devices` in either spelling.
    #[test]
    fn train_start_takes_the_shared_flags() {
        let cli = Cli::try_parse_from([
            "bratsctl",
            "train",
            "start",
            "--datalist",
            "/d.json",
            "--devices",
            "0,1",
            "--batch-size",
            "2",
            "--no-amp",
            "--promote",
        ])
        .unwrap();
        let Cmd::Train { command: train::TrainCmd::Start { job, promote, .. } } = cli.command else {
            panic!("not train start")
        };
        let spec = job.to_spec().unwrap();
        assert_eq!(spec.devices, ["cuda:0", "cuda:1"]);
        assert_eq!((spec.hyperparameters.unwrap().batch_size, spec.amp, promote), (2, Some(false), true));
    }
}
