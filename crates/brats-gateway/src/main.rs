//! `brats-gateway`: the PACS gateway. Offline subcommands run the DICOM path in one process:
//! `volumes` (a study → the four NIfTI volumes the model sees + selection.json) and `segment`
//! (a study → DICOM SEG). On bad input: exit 2 and one line naming the series (by hashed UID)
//! and the fix; nothing is written.

use anyhow::Context;
use brats_dicom::{LoadOptions, Role, load_study};
use brats_gateway::offline::{GatewayError, segment_study, volume_files, write_atomically, write_files};
use brats_inference::cli::EngineArgs;
use brats_inference::runtime::{SegmentationModel, default_library};
use clap::{Parser, Subcommand};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "brats-gateway", version, about = "DICOM MR studies in, DICOM SEG out")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Flags shared by the subcommands that read a study.
#[derive(clap::Args)]
struct StudyArgs {
    /// Folder holding the study's DICOM files (any depth, any names).
    #[arg(long)]
    dicom: PathBuf,
    /// Force a series for a role: ROLE=SERIES_INSTANCE_UID (roles t1c, t1n, t2w, t2f). Repeatable.
    #[arg(long = "role", value_name = "ROLE=SERIES_UID")]
    roles: Vec<String>,
    /// Salt of the hashed UIDs in messages (also BRATS_PHI_SALT).
    #[arg(long, env = "BRATS_PHI_SALT", hide_env_values = true, default_value = brats_dicom::phi::DEFAULT_SALT)]
    salt: String,
}

impl StudyArgs {
    fn options(&self) -> anyhow::Result<LoadOptions> {
        let mut overrides = BTreeMap::new();
        for r in &self.roles {
            let (role, uid) = r.split_once('=').with_context(|| format!("--role {r}: use ROLE=SERIES_UID"))?;
            let role = Role::parse(role)
                .with_context(|| format!("--role {role}=…: unknown role; use t1c, t1n, t2w or t2f"))?;
            anyhow::ensure!(
                overrides.insert(role, uid.trim().to_string()).is_none(),
                "--role {}: given twice",
                role.name()
            );
        }
        Ok(LoadOptions { overrides, salt: self.salt.clone(), ..LoadOptions::default() })
    }
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
enum Command {
    /// Run the gateway: a DIMSE C-STORE/C-ECHO SCP; each stable study becomes a job whose SEG is
    /// sent to the configured destinations.
    Serve {
        /// TOML configuration (deploy/gateway.toml shows every key).
        #[arg(long, env = "BRATS_GATEWAY_CONFIG")]
        config: PathBuf,
    },
    /// Read a study, choose the four series, and write OUT/{t1c,t1n,t2w,t2f}.nii.gz (the arrays
    /// the model sees, with their affine) and OUT/selection.json.
    Volumes {
        #[command(flatten)]
        study: StudyArgs,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
    },
    /// Read a study, segment it in-process and write a DICOM SEG on the T1c's geometry.
    Segment {
        #[command(flatten)]
        study: StudyArgs,
        /// ONNX model (input `image` [N,4,X,Y,Z], output `logits` [N,3,X,Y,Z]).
        #[arg(long)]
        model: PathBuf,
        /// Output SEG file.
        #[arg(long)]
        out: PathBuf,
        /// Also write the label map (uint8 .nii.gz on the T1c's grid).
        #[arg(long)]
        label_map: Option<PathBuf>,
        /// Also write the quick-look picture as PNG (labels over the T1c, three planes).
        #[arg(long, value_name = "PNG")]
        qc: Option<PathBuf>,
        /// Also write the quick-look picture as a DICOM Secondary Capture.
        #[arg(long, value_name = "DCM")]
        qc_dicom: Option<PathBuf>,
        /// Model name recorded in the SEG.
        #[arg(long, default_value = "SegResNet")]
        model_name: String,
        /// Model version recorded in the SEG (default: sha256 prefix of the ONNX file).
        #[arg(long)]
        model_version: Option<String>,
        #[command(flatten)]
        engine: EngineArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<GatewayError>() {
            Some(GatewayError::Input(d)) => {
                eprintln!("brats-gateway: error[{}]: {d}", d.code());
                ExitCode::from(2)
            }
            Some(GatewayError::Segment(s)) => {
                eprintln!("brats-gateway: error: {s}");
                ExitCode::from(2)
            }
            _ => {
                eprintln!("brats-gateway: error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config } => {
            let config = brats_gateway::config::GatewayConfig::load(&config)?;
            brats_service::init_logging("info,ort=warn", false);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(brats_gateway::server::serve(config, brats_service::shutdown_signal(), None))?;
        }
        Command::Volumes { study, out } => {
            let options = study.options()?;
            let loaded = load_study(&study.dicom, &options).map_err(GatewayError::from)?;
            let mut files = volume_files(&loaded, true)?;
            files.push(("selection.json".into(), serde_json::to_vec_pretty(&loaded.report())?));
            write_files(&out, &files)?;
            print_selection(&loaded);
            println!("wrote {} (shape {:?})", out.display(), loaded.volumes[0].shape);
        }
        Command::Segment { study, model, out, label_map, qc, qc_dicom, model_name, model_version, engine } => {
            let options = study.options()?;
            let window = engine.window()?;
            let session = engine.session()?;
            let onnx = std::fs::read(&model).with_context(|| format!("reading --model {}", model.display()))?;
            let seg_options = brats_gateway::server::seg_options(&model_name, model_version.as_deref(), &onnx);
            let started = std::time::Instant::now();
            let loaded = load_study(&study.dicom, &options).map_err(GatewayError::from)?;
            let read_s = started.elapsed().as_secs_f64();
            print_selection(&loaded);
            let model = SegmentationModel::load(&default_library(), &onnx, &session)
                .with_context(|| format!("loading --model {}", model.display()))?;
            let result = segment_study(&loaded, &model, &window, &seg_options)?;
            if let Some(path) = &label_map {
                write_atomically(path, &result.label_nifti()?)?;
            }
            if let Some(path) = &qc {
                write_atomically(path, &brats_core::overlay::png(&result.quick_look))?;
            }
            if let Some(path) = &qc_dicom {
                write_atomically(path, &result.capture.bytes)?;
            }
            write_atomically(&out, &result.seg.bytes)?;
            let [tc, wt, et] = result.volumes_ml;
            println!(
                "wrote {} ({} frames, {} bytes) in {:.2} s",
                out.display(),
                result.seg.frames,
                result.seg.bytes.len(),
                started.elapsed().as_secs_f64()
            );
            println!("  volumes  TC {tc:.2} mL, WT {wt:.2} mL, ET {et:.2} mL");
            let stages: Vec<String> = std::iter::once(format!("read_dicom {read_s:.3}s"))
                .chain(result.timings.iter().map(|(s, v)| format!("{s} {v:.3}s")))
                .collect();
            println!("  timing   {}", stages.join(", "));
        }
    }
    Ok(())
}

/// One line per role: hashed series, score; then warnings. No patient data.
fn print_selection(study: &brats_dicom::StudyVolumes) {
    for (role, choice) in &study.selection.roles {
        println!("  {:<5} series {} (score {})", role.label(), choice.series_hash, choice.score);
    }
    for w in &study.warnings {
        println!("  warning: {w}");
    }
}
