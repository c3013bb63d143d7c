//! `brats-preprocess`: the offline CLI (`run`, `synth`) and the service (`serve`), over the same
//! library code.

use anyhow::Context;
use brats_core::labels::LabelConvention;
use brats_core::nifti_io::ReadLimits;
use brats_core::store::{StoreConfig, StoreUri, Stores};
use brats_preprocess::pipeline::{self, CropMode, Options};
use brats_preprocess::{jobs, synthetic};
use brats_preprocessor::config::ServiceConfig;
use brats_preprocessor::server;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "brats-preprocess", version, about = "MONAI-exact BraTS preprocessing: CLI and gRPC service")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Preprocess one case into a safetensors file (tensor `image` F32 [4,X,Y,Z], optional `label` U8 [3,X,Y,Z]).
    Run {
        /// The four modalities in the order T1c T1 T2 FLAIR (paths or store URIs), or one 4D file.
        #[arg(long, num_args = 1..=4, required = true)]
        image: Vec<String>,
        /// Segmentation file to convert into TC/WT/ET channels.
        #[arg(long)]
        label: Option<String>,
        /// Label codes of the segmentation: brats2018 (1,2,4), brats2023 (1,2,3), brats2015.
        #[arg(long, default_value = "brats2018")]
        label_convention: String,
        /// none (inference path), center, random (training) or foreground.
        #[arg(long, default_value = "none")]
        crop: String,
        /// Crop size X,Y,Z for center and random crops.
        #[arg(long, default_value = "224,224,144", value_parser = brats_cli::parse_xyz::<usize>)]
        crop_size: [usize; 3],
        /// Seed of the random crop, flips and intensity draws.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Flip each axis with probability 0.5 (MONAI RandFlipd).
        #[arg(long)]
        flip: bool,
        /// RandScaleIntensity factor range (bundle: 0.1); 0 disables.
        #[arg(long, default_value_t = 0.0)]
        intensity_scale: f32,
        /// RandShiftIntensity offset range (bundle: 0.1); 0 disables.
        #[arg(long, default_value_t = 0.0)]
        intensity_shift: f32,
        /// Output .safetensors path or store URI (written atomically).
        #[arg(long)]
        out: String,
    },
    /// Run the gRPC service.
    Serve {
        /// TOML configuration file (also BRATS_PREPROCESS_CONFIG); BRATS_PREPROCESS_* variables override it.
        #[arg(long, env = "BRATS_PREPROCESS_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        flags: brats_service::ServeFlags,
        /// Default output root URI (overrides the configuration).
        #[arg(long)]
        output_root: Option<String>,
    },
    /// Write deterministic synthetic BraTS-like cases as .nii.gz files.
    Synth {
        /// Volume shape X,Y,Z.
        #[arg(long, default_value = "240,240,155", value_parser = brats_cli::parse_xyz::<usize>)]
        shape: [usize; 3],
        /// Seed of the first case (case i uses seed + i).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// How many cases.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Also write DIR/datalist.json (MONAI decathlon format), the last N cases in its
        /// "validation" section and the others in "training".
        #[arg(long)]
        validation: Option<usize>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let serving = matches!(cli.command, Command::Serve { .. });
    let json = matches!(&cli.command, Command::Serve { flags, .. } if flags.json_logs);
    brats_service::init_logging(if serving { "info" } else { "warn" }, json);
    brats_service::run_main(run(cli.command))
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run {
            image,
            label,
            label_convention,
            crop,
            crop_size,
            seed,
            flip,
            intensity_scale,
            intensity_shift,
            out,
        } => {
            let options = Options {
                label_convention: LabelConvention::parse(&label_convention)?,
                crop: CropMode::parse(&crop)?,
                crop_size,
                seed,
                random_flip: flip,
                intensity_scale,
                intensity_shift,
                ..Options::default()
            };
            options.validate()?;
            let out = StoreUri::parse(&out)?;
            let stores = Stores::new(StoreConfig::default());
            let mut uris = image.iter().map(|u| StoreUri::parse(u)).collect::<Result<Vec<_>, _>>()?;
            let n_images = uris.len();
            if let Some(l) = &label {
                uris.push(StoreUri::parse(l)?);
            }
            let started = std::time::Instant::now();
            let files = jobs::fetch_all(&stores, &uris).await?;
            let (tensors, timings) = tokio::task::spawn_blocking(move || {
                let (images, label) = files.split_at(n_images);
                pipeline::preprocess(images, label.first(), &options, &ReadLimits::default())
            })
            .await??;
            let (encoded, m) = tensors.encode()?;
            stores.put_parts(&out, encoded.parts).await?;
            println!(
                "wrote {out}: image [4, {}, {}, {}]{} crop {:?}+{:?} in {:.3} s ({})",
                m.shape[0],
                m.shape[1],
                m.shape[2],
                if m.has_label { ", label [3, …]" } else { "" },
                m.crop_box.start,
                m.crop_box.size,
                started.elapsed().as_secs_f64(),
                timings.stages().iter().map(|(s, v)| format!("{s} {v:.3}")).collect::<Vec<_>>().join(", ")
            );
            Ok(())
        }
        Command::Serve { config, flags, output_root } => {
            let mut cfg = ServiceConfig::load(config.as_deref())?;
            flags.apply(&mut cfg.server);
            if let Some(o) = output_root {
                cfg.output_root = o;
            }
            server::serve(cfg, server::shutdown_signal(), None).await
        }
        Command::Synth { shape, seed, count, out, validation: Some(val) } => {
            anyhow::ensure!(val < count, "--validation {val} must leave at least one training case of --count {count}");
            let path =
                synthetic::write_dataset(&out, shape, seed, count - val, val).context("writing synthetic dataset")?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Synth { shape, seed, count, out, validation: None } => {
            for i in 0..count {
                let id = format!("synth-{:05}", seed + i as u64);
                let case = synthetic::generate(&synthetic::SyntheticSpec::new(shape, seed + i as u64));
                let files = synthetic::write_case(&case, &out, &id).context("writing synthetic case")?;
                println!("{}", files.label.display());
            }
            Ok(())
        }
    }
}
