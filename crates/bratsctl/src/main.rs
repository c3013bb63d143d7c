//! `bratsctl`: the client of the platform's gRPC services, and `bratsctl demo`, the first-run
//! demonstration that starts the services on loopback and runs the main job through them.

use anyhow::{Context, bail};
use brats_proto::v1 as pb;
use brats_proto::v1::preprocessor_client::PreprocessorClient;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

#[derive(Parser)]
#[command(name = "bratsctl", version, about = "Client of the BraTS segmentation platform")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Ask a service whether it is SERVING (grpc.health.v1).
    Health {
        /// Service address, e.g. http://127.0.0.1:50051.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
    },
    /// Preprocess one case on a running preprocessing service.
    Preprocess {
        /// Preprocessing service address.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
        /// T1c T1 T2 FLAIR URIs (or paths, made absolute file:// URIs).
        #[arg(long, num_args = 1..=4, required = true)]
        image: Vec<String>,
        /// Label URI.
        #[arg(long)]
        label: Option<String>,
        /// Case id used in output keys.
        #[arg(long, default_value = "case")]
        case_id: String,
        /// Output prefix URI; default the server's store.
        #[arg(long)]
        out: Option<String>,
        /// Recompute even if cached.
        #[arg(long)]
        force: bool,
    },
    /// Preprocess a MONAI decathlon datalist on a running service, showing progress.
    PreprocessDataset {
        /// Preprocessing service address.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
        /// Datalist URI or path.
        #[arg(long)]
        datalist: String,
        /// Output prefix URI; default the server's store.
        #[arg(long)]
        out: Option<String>,
    },
    /// The first-run demo: generate a synthetic case, start the preprocessing service on
    /// loopback, preprocess the case through it and print a summary.
    Demo {
        /// Working directory for the demo's data and store.
        #[arg(long, default_value = "demo-out")]
        dir: PathBuf,
        /// Shape of the synthetic case, X,Y,Z.
        #[arg(long, default_value = "240,240,155")]
        shape: String,
        /// Seed of the synthetic case.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli.command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", msg.join(": "));
            std::process::ExitCode::from(2)
        }
    }
}

/// Turns a path into an absolute `file://` URI; URIs pass through.
fn to_uri(s: &str) -> anyhow::Result<String> {
    Ok(brats_core::StoreUri::parse(s)?.to_string())
}

fn status_line(s: &tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

async fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Health { server } => {
            let status = health(&server, "brats.v1.Preprocessor").await?;
            println!("{server}: {status}");
            Ok(())
        }
        Cmd::Preprocess { server, image, label, case_id, out, force } => {
            let mut client =
                PreprocessorClient::connect(server.clone()).await.with_context(|| format!("connect {server}"))?;
            let req = pb::PreprocessCaseRequest {
                case_id,
                image_uris: image.iter().map(|i| to_uri(i)).collect::<Result<_, _>>()?,
                label_uri: label.map(|l| to_uri(&l)).transpose()?.unwrap_or_default(),
                output_uri: out.map(|o| to_uri(&o)).transpose()?.unwrap_or_default(),
                force,
                ..Default::default()
            };
            let resp = client.preprocess_case(req).await.map_err(|s| status_line(&s))?.into_inner();
            print_case(&resp);
            Ok(())
        }
        Cmd::PreprocessDataset { server, datalist, out } => {
            let mut client =
                PreprocessorClient::connect(server.clone()).await.with_context(|| format!("connect {server}"))?;
            let req = pb::PreprocessDatasetRequest {
                datalist_uri: to_uri(&datalist)?,
                output_uri: out.map(|o| to_uri(&o)).transpose()?.unwrap_or_default(),
                ..Default::default()
            };
            let mut stream = client.preprocess_dataset(req).await.map_err(|s| status_line(&s))?.into_inner();
            while let Some(p) = stream.message().await.map_err(|s| status_line(&s))? {
                if let Some(c) = &p.case {
                    let what = if !c.error.is_empty() {
                        format!("FAILED {}: {}", c.error_code, c.error)
                    } else if c.reused {
                        "reused".into()
                    } else {
                        format!("done in {:.2} s", c.seconds)
                    };
                    println!("[{}/{}] {} ({}) {what}", p.completed, p.total, c.case_id, c.section);
                }
                if p.done {
                    println!(
                        "{} cases, {} reused, {} failed; manifest {}",
                        p.total, p.reused, p.failed, p.manifest_uri
                    );
                }
            }
            Ok(())
        }
        Cmd::Demo { dir, shape, seed } => demo(&dir, &shape, seed).await,
    }
}

async fn health(server: &str, service: &str) -> anyhow::Result<String> {
    let channel = Channel::from_shared(server.to_string())?.connect_timeout(Duration::from_secs(2)).connect().await?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = client
        .check(tonic_health::pb::HealthCheckRequest { service: service.to_string() })
        .await
        .map_err(|s| status_line(&s))?;
    Ok(format!("{:?}", r.into_inner().status()))
}

fn print_case(r: &pb::PreprocessCaseResponse) {
    let m = r.metadata.clone().unwrap_or_default();
    println!("case {} ({})", r.case_id, if r.reused { "reused from the store" } else { "computed" });
    println!("  image   [4, {}]  float32, channels T1c T1 T2 FLAIR", join(&m.shape));
    if m.has_label {
        println!("  label   [3, {}]  uint8, channels TC WT ET", join(&m.shape));
    }
    println!(
        "  source  {} voxels, spacing {:?} mm, pipeline {}",
        join(&m.original_shape),
        m.spacing,
        m.pipeline_version
    );
    println!(
        "  {:<6} {:>12} {:>10} {:>12} {:>9} {:>9}",
        "chan", "mean(in)", "std(in)", "nonzero", "min(out)", "max(out)"
    );
    for c in &m.channels {
        println!(
            "  {:<6} {:>12.3} {:>10.3} {:>12} {:>9.3} {:>9.3}",
            c.name, c.mean, c.std, c.nonzero_voxels, c.min, c.max
        );
    }
    let timing: Vec<String> = r.timings.iter().map(|t| format!("{} {:.3}s", t.stage, t.seconds)).collect();
    println!("  timing  {}", timing.join(", "));
    println!("  tensors {}", r.tensors_uri);
    println!("  sidecar {}", r.metadata_uri);
}

fn join(v: &[u32]) -> String {
    v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ")
}

/// A service started as a child process, stopped with SIGTERM when dropped.
struct ServiceProcess {
    child: Child,
    name: String,
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        // SIGTERM lets the service drain and report NOT_SERVING; then reap it.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
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

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
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
        if let Ok(s) = health(addr, health_name).await
            && s == "Serving"
        {
            return Ok(svc);
        }
        if Instant::now() > deadline {
            bail!("{bin} did not report SERVING within 30 s; see {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn demo(dir: &Path, shape: &str, seed: u64) -> anyhow::Result<()> {
    let dir = std::path::absolute(dir)?;
    std::fs::create_dir_all(&dir)?;
    let shape: Vec<usize> =
        shape.split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>().context("--shape X,Y,Z")?;
    let shape: [usize; 3] = shape.try_into().map_err(|_| anyhow::anyhow!("--shape needs three values"))?;

    println!("1. generating a synthetic BraTS-like case {shape:?} (seed {seed})");
    let t = Instant::now();
    let case = brats_preprocess::synthetic::generate(&brats_preprocess::synthetic::SyntheticSpec::new(shape, seed));
    let files = brats_preprocess::synthetic::write_case(&case, &dir.join("cases"), &format!("synth-{seed:05}"))?;
    println!("   wrote 4 modalities + label to {} in {:.1} s", dir.join("cases").display(), t.elapsed().as_secs_f64());

    let port = free_port()?;
    let addr = format!("http://127.0.0.1:{port}");
    let store = dir.join("store");
    println!("2. starting the preprocessing service on {addr} (store file://{})", store.display());
    let args = vec![
        "serve".to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--metrics-listen".into(),
        format!("127.0.0.1:{}", free_port()?),
        "--output-root".into(),
        format!("file://{}", store.display()),
    ];
    let _service =
        start_service("brats-preprocess", &args, &dir.join("preprocess.log"), "brats.v1.Preprocessor", &addr).await?;

    println!("3. PreprocessCase through gRPC");
    let mut client = PreprocessorClient::connect(addr.clone()).await?;
    let req = pb::PreprocessCaseRequest {
        case_id: format!("synth-{seed:05}"),
        image_uris: files.images.iter().map(|p| format!("file://{}", p.display())).collect(),
        label_uri: format!("file://{}", files.label.display()),
        ..Default::default()
    };
    let t = Instant::now();
    let resp = client.preprocess_case(req.clone()).await.map_err(|s| status_line(&s))?.into_inner();
    let first = t.elapsed().as_secs_f64();
    print_case(&resp);
    println!("   round trip {first:.2} s");
    let t = Instant::now();
    let again = client.preprocess_case(req).await.map_err(|s| status_line(&s))?.into_inner();
    println!(
        "   the same request again: {} in {:.3} s",
        if again.reused { "reused" } else { "recomputed" },
        t.elapsed().as_secs_f64()
    );
    println!("4. done; service log at {}", dir.join("preprocess.log").display());
    Ok(())
}
