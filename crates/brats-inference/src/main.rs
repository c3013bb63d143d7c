//! `brats-inference`: in-process segmentation (`segment`), the gRPC service (`serve`), and the
//! model registry (`register`, `alias`).

use anyhow::Context;
use brats_artifacts::registry::Registry;
use brats_artifacts::window::{Blend, Extent, SlidingWindow};
use brats_core::nifti_io::ReadLimits;
use brats_core::store::{StoreConfig, StoreUri, Stores};
use brats_inference::cli::EngineArgs;
use brats_inference::config::InferenceConfig;
use brats_inference::runtime::{SegmentationModel, default_library};
use brats_inference::segment::segment;
use brats_preprocess::jobs::fetch_all;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "brats-inference", version, about = "SegResNet inference with ONNX Runtime")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC inference service.
    Serve {
        /// TOML configuration (also BRATS_INFERENCE_CONFIG); BRATS_INFERENCE_* variables override it.
        #[arg(long, env = "BRATS_INFERENCE_CONFIG")]
        config: Option<std::path::PathBuf>,
        #[command(flatten)]
        flags: brats_service::ServeFlags,
        /// Model registry root URI.
        #[arg(long)]
        registry: Option<String>,
        /// Default output root URI.
        #[arg(long)]
        output_root: Option<String>,
        /// Warm-up shape X,Y,Z (default: the roi).
        #[arg(long)]
        warmup_shape: Option<String>,
        /// Sliding-window size X,Y,Z (default 240,240,160).
        #[arg(long)]
        roi: Option<String>,
    },
    /// Add a model version to the registry (model.onnx + metadata.json), optionally moving an alias to it.
    Register {
        /// Registry root URI (e.g. file:data/models or s3://bucket/models).
        #[arg(long)]
        registry: String,
        /// Model name.
        #[arg(long, default_value = brats_artifacts::registry::DEFAULT_MODEL_NAME)]
        name: String,
        /// Version label; default: the next number (highest numeric version + 1). An existing
        /// version is refused: versions are immutable.
        #[arg(long)]
        version: Option<String>,
        /// The ONNX file (from `brats-trainer export-onnx`).
        #[arg(long)]
        model: String,
        /// Its metadata.json (default: beside the model).
        #[arg(long)]
        metadata: Option<String>,
        /// Alias to point at this version (e.g. production).
        #[arg(long)]
        alias: Option<String>,
    },
    /// Point an alias at an existing version (running services hot-reload it).
    Alias {
        /// Registry root URI.
        #[arg(long)]
        registry: String,
        /// Model name.
        #[arg(long, default_value = brats_artifacts::registry::DEFAULT_MODEL_NAME)]
        name: String,
        /// Alias.
        #[arg(long, default_value = "production")]
        alias: String,
        /// Version to point at.
        #[arg(long)]
        version: String,
    },
    /// Segment one case in-process: four modalities in, a uint8 label map NIfTI out.
    Segment(SegmentArgs),
}

/// `brats-inference segment`.
#[derive(clap::Args)]
struct SegmentArgs {
    /// ONNX model (path or store URI) with input `image` [N,4,X,Y,Z] and output `logits` [N,3,X,Y,Z].
    #[arg(long)]
    model: String,
    /// T1c T1 T2 FLAIR (paths or store URIs), or one 4D file.
    #[arg(long, num_args = 1..=4, required = true)]
    image: Vec<String>,
    /// Output label map (.nii.gz), written atomically.
    #[arg(long)]
    out: String,
    /// Also write the stitched logits (tensor `logits`, F32 [3,X,Y,Z]) as safetensors.
    #[arg(long)]
    logits: Option<String>,
    #[command(flatten)]
    engine: EngineArgs,
    /// Gaussian instead of constant blending.
    #[arg(long)]
    gaussian: bool,
    /// Test-time mirroring: average over the volume and its flips along X, Y and Z (4x the time).
    #[arg(long)]
    mirror: bool,
    /// Fast mode beyond MONAI's result: run the model on the brain's bounding box (the voxels
    /// where any modality is non-zero, on a 16-voxel grid) instead of the whole volume; outside
    /// it everything is background. Its agreement with the default: benchmarks/README.md.
    #[arg(long)]
    foreground_crop: bool,
    /// Also write a quick-look PNG (path or store URI): the labels over the T1c in axial,
    /// coronal and sagittal slices through the tumour.
    #[arg(long, value_name = "PNG")]
    qc: Option<String>,
}

fn triple(s: &str) -> anyhow::Result<[usize; 3]> {
    Ok(brats_cli::parse_xyz(s)?)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let serving = matches!(cli.command, Command::Serve { .. });
    let json = matches!(&cli.command, Command::Serve { flags, .. } if flags.json_logs);
    brats_service::init_logging(if serving { "info,ort=warn" } else { "warn" }, json);
    brats_service::run_main(run(cli.command))
}

async fn run(command: Command) -> anyhow::Result<()> {
    let a = match command {
        Command::Serve { config, flags, registry, output_root, warmup_shape, roi } => {
            let mut cfg = InferenceConfig::load(config.as_deref())?;
            flags.apply(&mut cfg.server);
            if let Some(v) = registry {
                cfg.registry = v;
            }
            if let Some(v) = output_root {
                cfg.output_root = v;
            }
            if let Some(v) = warmup_shape {
                cfg.warmup_shape = Some(triple(&v)?);
            }
            if let Some(v) = roi {
                cfg.roi = triple(&v)?;
            }
            return brats_inference::server::serve(cfg, brats_service::shutdown_signal(), None).await;
        }
        Command::Register { registry, name, version, model, metadata, alias } => {
            let stores = std::sync::Arc::new(Stores::new(StoreConfig::default()));
            let reg = Registry::new(stores.clone(), StoreUri::parse(&registry)?);
            let model_uri = StoreUri::parse(&model)?;
            let meta_uri = match metadata {
                Some(m) => StoreUri::parse(&m)?,
                None => model_uri.parent().join("metadata.json"),
            };
            let onnx = stores.get(&model_uri).await?;
            let meta = match stores.get(&meta_uri).await {
                Ok(b) => Some(b),
                Err(brats_core::CoreError::NotFound(_)) => None,
                Err(e) => return Err(e.into()),
            };
            let (version, dir) = match version {
                Some(v) => (v.clone(), reg.register(&name, &v, onnx, meta, alias.as_deref()).await?),
                None => reg.register_next(&name, onnx, meta, alias.as_deref()).await?,
            };
            let moved = alias.map(|a| format!("; alias {a} -> {version}")).unwrap_or_default();
            println!("registered {name} version {version} at {dir}{moved}");
            return Ok(());
        }
        Command::Alias { registry, name, alias, version } => {
            let reg =
                Registry::new(std::sync::Arc::new(Stores::new(StoreConfig::default())), StoreUri::parse(&registry)?);
            reg.set_alias(&name, &alias, &version).await?;
            println!("{name}: alias {alias} -> {version}");
            return Ok(());
        }
        Command::Segment(a) => a,
    };
    let window = SlidingWindow {
        blend: if a.gaussian { Blend::Gaussian } else { Blend::Constant },
        mirror: a.mirror,
        extent: if a.foreground_crop { Extent::FOREGROUND } else { Extent::Full },
        ..a.engine.window()?
    };
    let options = a.engine.session()?;
    let out = StoreUri::parse(&a.out)?;
    let logits_uri = a.logits.map(|l| StoreUri::parse(&l)).transpose()?;
    let stores = Stores::new(StoreConfig::default());
    let model_uri = StoreUri::parse(&a.model)?;
    let onnx = stores.get(&model_uri).await?;
    let uris = a.image.iter().map(|u| StoreUri::parse(u)).collect::<Result<Vec<_>, _>>()?;
    let files = fetch_all(&stores, &uris).await?;
    let started = std::time::Instant::now();
    let keep = logits_uri.is_some();
    let t1c = files[0].bytes.clone();
    let (seg, provider) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let model = SegmentationModel::load(&default_library(), &onnx, &options)
            .with_context(|| format!("model {model_uri}"))?;
        let seg = segment(&model, &files, &window, keep, &ReadLimits::default())?;
        Ok((seg, model.provider()))
    })
    .await??;
    let t = std::time::Instant::now();
    let label = seg.label_nifti()?;
    if let Some(qc) = &a.qc {
        let picture = brats_core::overlay::overlay_files(&t1c, &label)?;
        stores.put(&StoreUri::parse(qc)?, brats_core::overlay::png(&picture).into()).await?;
    }
    stores.put(&out, label.into()).await?;
    if let (Some(uri), Some(l)) = (&logits_uri, &seg.logits) {
        let [x, y, z] = seg.shape;
        let bytes: Vec<u8> = l.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![3, x, y, z], &bytes)?;
        stores.put(uri, safetensors::serialize([("logits", view)], None)?.into()).await?;
    }
    let encode = t.elapsed().as_secs_f64();
    let [tc, wt, et] = seg.volumes_ml;
    println!("wrote {out} on {} in {:.2} s", provider.name(), started.elapsed().as_secs_f64());
    println!("  volumes  TC {tc:.2} mL, WT {wt:.2} mL, ET {et:.2} mL");
    let stages: Vec<String> =
        seg.timings.iter().map(|(s, v)| format!("{s} {v:.3}s")).chain([format!("encode {encode:.3}s")]).collect();
    println!("  timing   {}", stages.join(", "));
    Ok(())
}
