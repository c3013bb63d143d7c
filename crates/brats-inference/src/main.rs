//! `brats-inference`: in-process segmentation (`segment`); the service comes with its issue.

use anyhow::Context;
use brats_core::nifti_io::ReadLimits;
use brats_core::store::{StoreConfig, StoreUri, Stores};
use brats_inference::runtime::{Provider, SegmentationModel, SessionOptions, default_library};
use brats_inference::segment::segment;
use brats_inference::window::{Blend, SlidingWindow};
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
    /// Segment one case in-process: four modalities in, a uint8 label map NIfTI out.
    Segment {
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
        /// Execution providers in order, comma-separated: tensorrt, cuda, cpu.
        #[arg(long, default_value = "cpu")]
        provider: String,
        /// Fall back to the next provider when one fails to load (the fallback is logged).
        #[arg(long)]
        allow_fallback: bool,
        /// Intra-op threads (0 = all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Sliding-window size X,Y,Z.
        #[arg(long, default_value = "240,240,160")]
        roi: String,
        /// Sliding-window overlap.
        #[arg(long, default_value_t = 0.5)]
        overlap: f64,
        /// Gaussian instead of constant blending.
        #[arg(long)]
        gaussian: bool,
    },
}

fn triple(s: &str) -> anyhow::Result<[usize; 3]> {
    let v: Vec<usize> = s
        .split(',')
        .map(|p| p.trim().parse())
        .collect::<Result<_, _>>()
        .with_context(|| format!("'{s}': expected X,Y,Z"))?;
    v.try_into().map_err(|_| anyhow::anyhow!("'{s}': expected three values X,Y,Z"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", msg.join(": "));
            ExitCode::from(2)
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    let Command::Segment { model, image, out, logits, provider, allow_fallback, threads, roi, overlap, gaussian } =
        command;
    let providers = provider.split(',').map(Provider::parse).collect::<Result<Vec<_>, _>>()?;
    let window =
        SlidingWindow { roi: triple(&roi)?, overlap, blend: if gaussian { Blend::Gaussian } else { Blend::Constant } };
    anyhow::ensure!((0.0..1.0).contains(&overlap), "--overlap {overlap} must be in [0, 1)");
    let out = StoreUri::parse(&out)?;
    let logits_uri = logits.map(|l| StoreUri::parse(&l)).transpose()?;
    let stores = Stores::new(StoreConfig::default());
    let model_uri = StoreUri::parse(&model)?;
    let onnx = stores.get(&model_uri).await?;
    let uris = image.iter().map(|u| StoreUri::parse(u)).collect::<Result<Vec<_>, _>>()?;
    let files = fetch_all(&stores, &uris).await?;
    let options = SessionOptions { providers, allow_fallback, intra_threads: threads, ..Default::default() };
    let started = std::time::Instant::now();
    let keep = logits_uri.is_some();
    let (seg, provider) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let model = SegmentationModel::load(&default_library(), &onnx, &options)
            .with_context(|| format!("model {model_uri}"))?;
        let seg = segment(&model, &files, &window, keep, &ReadLimits::default())?;
        Ok((seg, model.provider()))
    })
    .await??;
    let t = std::time::Instant::now();
    stores.put(&out, seg.label_nifti()?.into()).await?;
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
