//! `brats-gateway`: the PACS gateway. Offline subcommands run the DICOM path in one process:
//! `volumes` (a study → the four NIfTI volumes the model sees + selection.json) and `segment`
//! (a study → DICOM SEG). On bad input: exit 2 and one line naming the series (by hashed UID)
//! and the fix; nothing is written.

use anyhow::Context;
use brats_artifacts::window::{Blend, SlidingWindow};
use brats_dicom::seg::SegOptions;
use brats_dicom::{LoadOptions, Role, load_study};
use brats_gateway::offline::{GatewayError, segment_study, volume_files, write_atomically, write_files};
use brats_inference::runtime::{Provider, SegmentationModel, SessionOptions, default_library};
use clap::{Parser, Subcommand};
use sha2::Digest;
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
        /// Execution providers in order, comma-separated: tensorrt, cuda, cpu.
        #[arg(long, default_value = "cpu")]
        provider: String,
        /// Intra-op threads (0 = all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Sliding-window size X,Y,Z.
        #[arg(long, default_value = "240,240,160")]
        roi: String,
        /// Sliding-window overlap.
        #[arg(long, default_value_t = 0.5)]
        overlap: f64,
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
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(serve(config))?;
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
        Command::Segment {
            study,
            model,
            out,
            label_map,
            qc,
            qc_dicom,
            model_name,
            model_version,
            provider,
            threads,
            roi,
            overlap,
        } => {
            let options = study.options()?;
            anyhow::ensure!((0.0..1.0).contains(&overlap), "--overlap {overlap} must be in [0, 1)");
            let roi = brats_cli::parse_xyz::<usize>(&roi).map_err(|e| anyhow::anyhow!("--roi: {e}"))?;
            let providers = provider.split(',').map(Provider::parse).collect::<Result<Vec<_>, _>>()?;
            let onnx = std::fs::read(&model).with_context(|| format!("reading --model {}", model.display()))?;
            let digest = hex::encode(sha2::Sha256::digest(&onnx));
            let started = std::time::Instant::now();
            let loaded = load_study(&study.dicom, &options).map_err(GatewayError::from)?;
            let read_s = started.elapsed().as_secs_f64();
            print_selection(&loaded);
            let session = SessionOptions { providers, intra_threads: threads, ..Default::default() };
            let model = SegmentationModel::load(&default_library(), &onnx, &session)
                .with_context(|| format!("loading --model {}", model.display()))?;
            let window = SlidingWindow { roi, overlap, blend: Blend::Constant, mirror: false };
            let seg_options = SegOptions {
                algorithm_name: model_name,
                algorithm_version: model_version.unwrap_or_else(|| format!("sha256:{}", &digest[..12])),
                software_versions: format!(
                    "brats-gateway {}; model sha256:{}",
                    env!("CARGO_PKG_VERSION"),
                    &digest[..12]
                ),
                ..SegOptions::default()
            };
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

/// Starts the SCP and the job runner; returns on SIGINT/SIGTERM.
async fn serve(config: brats_gateway::config::GatewayConfig) -> anyhow::Result<()> {
    use brats_gateway::{
        jobs::Runner,
        scp::{Scp, ScpConfig},
        spool::Spool,
    };
    use std::sync::Arc;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ort=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let hasher = brats_dicom::phi::UidHasher::new(&config.salt);
    let spool = Arc::new(
        Spool::open(&config.spool_dir, hasher).with_context(|| format!("spool_dir {}", config.spool_dir.display()))?,
    );
    let onnx =
        std::fs::read(&config.model.onnx).with_context(|| format!("model.onnx {}", config.model.onnx.display()))?;
    let digest = hex::encode(sha2::Sha256::digest(&onnx));
    let version = config.model.version.clone().unwrap_or_else(|| format!("sha256:{}", &digest[..12]));
    let session = SessionOptions { intra_threads: config.model.threads, ..Default::default() };
    let model = Arc::new(
        SegmentationModel::load(&default_library(), &onnx, &session)
            .with_context(|| format!("model.onnx {}", config.model.onnx.display()))?,
    );
    let stores = Arc::new(brats_core::store::Stores::new(brats_core::store::StoreConfig::default()));
    let jobs_root = brats_core::store::StoreUri::parse(&config.jobs_root)
        .with_context(|| format!("jobs_root {}", config.jobs_root))?;
    let d = &config.dimse;
    let scp = Arc::new(Scp::new(
        ScpConfig {
            ae_title: d.ae_title.clone(),
            allowed_calling_aes: d.allowed_calling_aes.clone(),
            max_associations: d.max_associations,
            max_pdu: d.max_pdu,
            min_free_bytes: d.min_free_mb << 20,
            max_instance_bytes: d.max_instance_mb << 20,
            timeout: std::time::Duration::from_secs(d.timeout_s),
        },
        spool.clone(),
        if d.tls.enabled() {
            Some(brats_service::security::tls::ServerTls::load_without_alpn(&d.tls).context("dimse.tls")?)
        } else {
            None
        },
    ));
    let runner = Arc::new(Runner {
        spool,
        stores,
        jobs_root,
        model,
        model_version: version.clone(),
        window: SlidingWindow {
            roi: config.model.roi,
            overlap: config.model.overlap,
            blend: Blend::Constant,
            mirror: false,
        },
        seg_options: SegOptions {
            algorithm_name: config.model.name.clone(),
            algorithm_version: version,
            software_versions: format!("brats-gateway {}; model sha256:{}", env!("CARGO_PKG_VERSION"), &digest[..12]),
            ..SegOptions::default()
        },
        load_options: LoadOptions { salt: config.salt.clone(), ..LoadOptions::default() },
        destinations: config.destinations.clone(),
        calling_ae: d.ae_title.clone(),
        send_quick_look: config.send_quick_look,
        stable_after: std::time::Duration::from_secs_f64(config.study.stable_after_s),
        max_wait: std::time::Duration::from_secs_f64(config.study.max_wait_s),
    });
    let listener =
        tokio::net::TcpListener::bind(&d.listen).await.with_context(|| format!("dimse.listen {}", d.listen))?;
    tracing::info!(address = %listener.local_addr()?, ae_title = %d.ae_title, tls = d.tls.enabled(), "DIMSE SCP listening");
    // C-ECHO each DIMSE destination once at start-up: a wrong AE title or port shows now, not
    // at the first study.
    for destination in &config.destinations {
        if let Ok(brats_gateway::jobs::Target::Dimse(peer)) = destination.target() {
            let (name, calling) = (destination.name.clone(), d.ae_title.clone());
            tokio::spawn(async move {
                match brats_gateway::scu::echo(&peer, &calling).await {
                    Ok(()) => tracing::info!(destination = %name, "destination answers C-ECHO"),
                    Err(e) => tracing::warn!(destination = %name, error = %e, "destination does not answer C-ECHO"),
                }
            });
        }
    }
    let scp_task = tokio::spawn(scp.serve(listener));
    let jobs_task = tokio::spawn(runner.run());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    scp_task.abort();
    jobs_task.abort();
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
