//! `bratsctl demo`: synthetic data, the three services started on loopback as child
//! processes, a small model trained, registered and used to segment a held-out case.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use brats_cli::free_port;
use brats_proto::v1 as pb;
use brats_proto::v1::trainer_client::TrainerClient;
use brats_volume::labels::region_dice;
use rustix::process::{Pid, Signal, kill_process};

use crate::commands::health::serving;
use crate::commands::segment::{print_segmentation, segment_stream};
use crate::commands::status_line;
use crate::commands::watch::{job_state, watch_job};

/// Arguments of `bratsctl demo`.
#[derive(clap::Args)]
pub(crate) struct DemoArgs {
    /// Working directory for the demo's data and store.
    #[arg(long, default_value = "demo-out")]
    dir: PathBuf,
    /// Shape of the synthetic cases, X,Y,Z (small, so training takes minutes on a CPU).
    #[arg(long, default_value = "32,32,32", value_parser = brats_cli::parse_xyz::<usize>)]
    shape: [usize; 3],
    /// Seed of the synthetic dataset (its cases use seed, seed + 1, …).
    #[arg(long, default_value_t = 100)]
    seed: u64,
    /// Seed of the training job (weights, sampling, augmentation).
    #[arg(long, default_value_t = 0)]
    train_seed: u64,
    /// Training epochs (12 steps each).
    #[arg(long, default_value_t = 25)]
    epochs: u32,
}

/// A service started as a child process, stopped with SIGTERM when dropped.
struct ServiceProcess {
    child: Child,
    name: String,
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        // SIGTERM lets the service drain and report NOT_SERVING; then reap it. The child is
        // not reaped yet, so its pid still names it.
        let _ = kill_process(Pid::from_child(&self.child), Signal::TERM);
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

/// The binary `name` next to this one (cargo puts all workspace binaries in one folder).
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.parent().context("bratsctl has no parent directory")?.join(name);
    if !p.exists() {
        bail!("{} not found next to bratsctl; build the workspace (cargo build) first", p.display());
    }
    Ok(p)
}

/// Starts the workspace binary `bin` with `args`, its stderr in `log`, and waits (30 s at most)
/// until its `health_name` service is SERVING at `addr`.
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
        if serving(addr, health_name).await {
            return Ok(svc);
        }
        if Instant::now() > deadline {
            bail!("{bin} did not report SERVING within 30 s; see {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the demo (see `bratsctl demo --help`).
pub(crate) async fn run(a: DemoArgs) -> anyhow::Result<()> {
    let DemoArgs { dir, shape, seed, train_seed, epochs } = a;
    let dir = std::path::absolute(dir)?;
    std::fs::create_dir_all(&dir)?;
    let (training, validation) = (12, 4);

    println!(
        "1. generating a synthetic BraTS-like dataset: {training} training + {validation} validation cases {shape:?}, and one held-out case"
    );
    let t = Instant::now();
    let data = dir.join("data");
    let datalist = brats_synthetic::write_dataset(&data, shape, seed, training, validation)?;
    let held_out_seed = seed + 1000;
    let held_out = brats_synthetic::generate(&brats_synthetic::SyntheticSpec::new(shape, held_out_seed));
    let files = brats_synthetic::write_case(&held_out, &dir.join("held-out"), &format!("synth-{held_out_seed:05}"))?;
    println!("   datalist {} ({:.1} s)", datalist.display(), t.elapsed().as_secs_f64());

    let security = crate::demo_security::set_up(&dir)?;
    println!(
        "   security (throwaway, in {}): a private CA; a certificate per service (TLS 1.3 on its port, and its \
         identity for mutual TLS to the others); an API key for you (demo.apikey; roles train, segment, viewer; \
         only its hash in api-keys.toml); tenant 'demo' confined to {}; audit logs in {}",
        security.dir.display(),
        dir.display(),
        dir.join("audit").display()
    );
    crate::commands::set_security(security.client.clone());
    let [preprocess_config, trainer_config, inference_config] = security.configs.clone();

    let store = dir.join("store");
    let paddr_port = free_port()?;
    let paddr = format!("https://127.0.0.1:{paddr_port}");
    println!("2. starting the preprocessing service on {paddr} (store file://{})", store.display());
    let pargs = vec![
        "serve".to_string(),
        "--config".into(),
        preprocess_config.display().to_string(),
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
    let taddr = format!("https://127.0.0.1:{tport}");
    let registry = format!("file://{}", store.join("models").display());
    println!("3. starting the trainer service on {taddr} (datasets prepared by the preprocessing service)");
    let targs = vec![
        "serve".to_string(),
        "--config".into(),
        trainer_config.display().to_string(),
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
            model_name: String::new(), // the default name, which inference serves by default
            promote_to_production: true,
            description: "bratsctl demo: synthetic data".into(),
            ..Default::default()
        }),
        labels: [("owner".to_string(), "demo".to_string())].into(),
        ..Default::default()
    };
    let mut trainer = TrainerClient::new(crate::commands::connect(&taddr).await?);
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
    let iaddr = format!("https://127.0.0.1:{iport}");
    println!(
        "5. starting the inference service on {iaddr} (its default model, brats_mri_segmentation@production, from the registry; ONNX Runtime, CPU)"
    );
    let iargs = vec![
        "serve".to_string(),
        "--config".into(),
        inference_config.display().to_string(),
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
    let channel = crate::commands::connect(&iaddr).await?;
    let t = Instant::now();
    let r = segment_stream(channel, &files.images, &out, None, format!("demo-{seed}"), false).await?;
    print_segmentation(&r, &out);
    println!("   round trip {:.2} s", t.elapsed().as_secs_f64());
    let quick_look = dir.join("quick-look.png");
    crate::commands::segment::write_quick_look(&files.images[0], &out, &quick_look)?;
    println!("   quick look (labels over the T1c, three planes through the tumour): {}", quick_look.display());
    let seg =
        brats_volume::nifti_io::read_nifti(&std::fs::read(&out)?, &out.display().to_string(), &Default::default())?;
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
        "8. audit: every call above was authenticated, authorised and recorded; the hash chains verify: {}",
        security
            .audit_logs
            .iter()
            .zip(crate::demo_security::SERVICES)
            .map(|(log, service)| match brats_cli::audit_chain::verify_file(log) {
                Ok(r) => format!("{service} {} records", r.records),
                Err(e) => format!("{service} BROKEN ({e})"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "9. done; job artefacts under {}, service logs in {}",
        store.join("jobs").join(&job.id).display(),
        dir.display()
    );
    Ok(())
}
