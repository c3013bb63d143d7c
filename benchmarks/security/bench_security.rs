//! What TLS and authentication cost per request: the same small `Segment` (a 32³ case through
//! a small SegResNet, ONNX Runtime on CPU) against two inference services in this process, one
//! in development mode (plaintext, no authentication) and one secured as a hospital runs it
//! (TLS 1.3, an API key checked against the hashed keys file, the caller's URIs checked against
//! its tenant, every decision written to a hash-chained audit file). Rounds alternate between the
//! two so drift hits both alike. Two client patterns: one connection reused (the services'
//! channels, a long-lived client) and a new connection per request (a script calling bratsctl),
//! which adds the TCP and TLS handshakes; and a cheap RPC (`ListModels`) on a reused connection,
//! where the per-request cost of the layer is not hidden under the inference time.
//!
//! `cargo run --example bench_security -- [--rounds 5] [--calls 20]` (benchmarks/README.md).

use std::path::Path;
use std::time::{Duration, Instant};

use brats_artifacts::registry::Registry;
use brats_cli::ClientSecurity;
use brats_inference::config::InferenceConfig;
use brats_model::SegResNetConfig;
use brats_model::onnx::{ExportOptions, to_onnx_bytes};
use brats_model::reference::det_state_dict;
use brats_proto::v1 as pb;
use brats_proto::v1::inference_client::InferenceClient;

fn file_uri(p: &Path) -> String {
    format!("file://{}", p.display())
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// A test CA and a server certificate for `localhost`, as PEM files in `dir`.
fn certificates(dir: &Path) -> anyhow::Result<(String, String, String)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key)?.pem();
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(vec!["localhost".to_string()])?.signed_by(&key, &Issuer::new(ca, ca_key))?;
    let paths = [dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key")];
    std::fs::write(&paths[0], ca_pem)?;
    std::fs::write(&paths[1], cert.pem())?;
    write_private(&paths[2], &key.serialize_pem())?;
    let [a, b, c] = paths.map(|p| p.display().to_string());
    Ok((a, b, c))
}

struct Server {
    url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(cfg: InferenceConfig) -> anyhow::Result<Server> {
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let handle = tokio::spawn(brats_inference::server::serve(
        cfg,
        async {
            let _ = stop_rx.await;
        },
        Some(addr_tx),
    ));
    Ok(Server { url: format!("http://{}", addr_rx.await?), stop, handle })
}

async fn segment(channel: brats_cli::AuthChannel, images: &[String]) -> anyhow::Result<()> {
    let req = pb::SegmentRequest { image_uris: images.to_vec(), ..Default::default() };
    InferenceClient::new(channel).segment(req).await?;
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut rounds, mut calls) = (5usize, 20usize);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => rounds = args.next().unwrap_or_default().parse()?,
            "--calls" => calls = args.next().unwrap_or_default().parse()?,
            other => anyhow::bail!("unknown argument {other}: use --rounds N --calls N"),
        }
    }
    let dir = tempfile::tempdir()?;
    let root = dir.path().canonicalize()?;
    let case = brats_synthetic::generate(&brats_synthetic::SyntheticSpec::new([32, 32, 32], 7));
    let files = brats_synthetic::write_case(&case, &root.join("in"), "bench")?;
    let images: Vec<String> = files.images.iter().map(|p| file_uri(p)).collect();
    let small =
        SegResNetConfig { init_filters: 8, blocks_down: vec![1, 1, 1], blocks_up: vec![1, 1], ..Default::default() };
    let onnx = to_onnx_bytes(&small, &det_state_dict(&small), ExportOptions::default())?;
    let registry = Registry::new(
        std::sync::Arc::new(brats_core::Stores::new(Default::default())),
        brats_core::StoreUri::parse(&file_uri(&root.join("models")))?,
    );
    registry
        .register(brats_artifacts::registry::DEFAULT_MODEL_NAME, "1", onnx.into(), None, Some("production"))
        .await?;

    let base = InferenceConfig {
        server: brats_service::ServerConfig::new("127.0.0.1:0", "", 5),
        registry: file_uri(&root.join("models")),
        output_root: file_uri(&root.join("out")),
        roi: [32, 32, 32],
        warmup_shape: Some([32, 32, 32]),
        intra_threads: 1,
        ..InferenceConfig::default()
    };
    let (ca, cert, key) = certificates(&root)?;
    let api_key = brats_cli::api_key::new_api_key("bench");
    write_private(&root.join("bench.apikey"), &api_key)?;
    write_private(
        &root.join("keys.toml"),
        &format!(
            "[[keys]]\nid = \"bench\"\nsha256 = \"{}\"\nroles = [\"segment\"]\ntenant = \"bench\"\n",
            brats_cli::api_key::hash_api_key(&api_key)
        ),
    )?;
    let mut secured = base.clone();
    secured.server.tls.cert_file = cert;
    secured.server.tls.key_file = key;
    secured.server.auth.enabled = true;
    secured.server.auth.api_keys_file = root.join("keys.toml").display().to_string();
    secured.server.audit.file = root.join("audit.jsonl").display().to_string();
    secured.server.tenants.insert(
        "bench".into(),
        brats_service::security::tenants::TenantConfig { allowed_prefixes: vec![file_uri(&root)] },
    );
    let plain_client = ClientSecurity::default();
    let secure_client = ClientSecurity {
        ca_file: Some(ca.into()),
        domain: Some("localhost".into()),
        api_key_file: Some(root.join("bench.apikey")),
        ..ClientSecurity::default()
    };
    let servers = [
        ("plaintext, no auth", start(base).await?, plain_client),
        ("TLS 1.3 + API key + tenant + audit", start(secured).await?, secure_client),
    ];

    // Warm up: the model loads in the background; wait until each answers.
    for (name, s, client) in &servers {
        let deadline = Instant::now() + Duration::from_secs(120);
        while segment(client.connect(&s.url).await?, &images).await.is_err() {
            anyhow::ensure!(Instant::now() < deadline, "{name}: never answered");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let mut reused: [Vec<Duration>; 2] = Default::default();
    let mut fresh: [Vec<Duration>; 2] = Default::default();
    let mut cheap: [Vec<Duration>; 2] = Default::default();
    for _ in 0..rounds {
        for (i, (_, s, client)) in servers.iter().enumerate() {
            let channel = client.connect(&s.url).await?;
            for _ in 0..calls {
                let t = Instant::now();
                segment(channel.clone(), &images).await?;
                reused[i].push(t.elapsed());
            }
            for _ in 0..calls {
                let t = Instant::now();
                segment(client.connect(&s.url).await?, &images).await?;
                fresh[i].push(t.elapsed());
            }
            // A cheap RPC shows the per-request cost itself, not hidden under inference.
            for _ in 0..calls * 5 {
                let t = Instant::now();
                InferenceClient::new(channel.clone()).list_models(pb::ListModelsRequest::default()).await?;
                cheap[i].push(t.elapsed());
            }
        }
    }
    println!(
        "Segment, 32³ case, small SegResNet on ONNX Runtime CPU; {rounds} rounds × {calls} calls per pattern, alternating"
    );
    println!("| pattern | server | p50 ms | p95 ms | p50 overhead vs plaintext |");
    println!("|---|---|---|---|---|");
    for (pattern, samples) in [
        ("Segment, one connection reused", &mut reused),
        ("Segment, new connection per call", &mut fresh),
        ("ListModels, one connection reused", &mut cheap),
    ] {
        for s in samples.iter_mut() {
            s.sort();
        }
        let base = percentile(&samples[0], 0.5);
        for (i, (name, _, _)) in servers.iter().enumerate() {
            let p50 = percentile(&samples[i], 0.5);
            let over = if i == 0 { "—".to_string() } else { format!("{:+.3} ms ({:.3}×)", p50 - base, p50 / base) };
            println!("| {pattern} | {name} | {p50:.3} | {:.3} | {over} |", percentile(&samples[i], 0.95));
        }
    }
    for (_, s, _) in servers {
        let _ = s.stop.send(());
        s.handle.await??;
    }
    Ok(())
}
