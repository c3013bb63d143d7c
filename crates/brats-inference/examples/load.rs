//! Load generator for the inference service (benchmarks/inference/run.sh load): N clients,
//! each sending `Segment` requests for the same case (store URIs) back to back for a fixed
//! time. A RESOURCE_EXHAUSTED answer is counted and retried after the service's hint
//! (`grpc-retry-pushback-ms`), as a client with a gRPC retry policy would.
//!
//! ```text
//! cargo run --release -p brats-inference --example load -- --endpoint http://127.0.0.1:50052 \
//!     --image T1C --image T1 --image T2 --image FLAIR --output-root file:/tmp/out [--clients 4] [--seconds 180]
//! ```
//!
//! With `--requests N` each client stops after N completed requests instead (the warm-latency
//! form: `--clients 1 --warmup 3 --requests 20`); `--warmup W` requests per client are sent
//! first and not counted.
//!
//! Prints one JSON line: completed cases, cases per minute, p50/p95/max latency of completed
//! requests (s), refusals and the hints they carried, other errors by code.

use brats_proto::v1::inference_client::InferenceClient;
use brats_proto::v1::{self as pb};
use clap::Parser;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// The inference service.
    #[arg(long)]
    endpoint: String,
    /// T1c, T1, T2, FLAIR URIs (repeat --image).
    #[arg(long, required = true)]
    image: Vec<String>,
    /// Where each request writes its label map (one sub-folder per request).
    #[arg(long)]
    output_root: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// How long to send new requests; requests in flight at the end are awaited.
    #[arg(long, default_value_t = 180)]
    seconds: u64,
    /// Stop each client after this many completed (counted) requests.
    #[arg(long)]
    requests: Option<usize>,
    /// Uncounted requests per client before the measurement.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    #[command(flatten)]
    security: brats_cli::ClientSecurity,
}

#[derive(Default)]
struct Tally {
    latencies: Vec<f64>,
    refused: usize,
    hints_ms: Vec<u64>,
    errors: std::collections::BTreeMap<String, usize>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let channel = a.security.connect(&a.endpoint).await?;
    let request = |c: usize, n: usize| pb::SegmentRequest {
        image_uris: a.image.clone(),
        output_uri: format!("{}/client{c}-{n}", a.output_root.trim_end_matches('/')),
        ..Default::default()
    };
    for c in 0..a.clients {
        for w in 0..a.warmup {
            InferenceClient::new(channel.clone()).segment(request(c, 1_000_000 + w)).await?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(a.seconds);
    let started = Instant::now();
    let limit = a.requests.unwrap_or(usize::MAX);
    let mut tasks = Vec::new();
    for c in 0..a.clients {
        let mut client = InferenceClient::new(channel.clone()).max_decoding_message_size(64 << 20);
        let (images, root) = (a.image.clone(), a.output_root.clone());
        let timed = a.requests.is_none();
        tasks.push(tokio::spawn(async move {
            let mut t = Tally::default();
            let mut n = 0;
            while t.latencies.len() < limit && (!timed || Instant::now() < deadline) {
                n += 1;
                let sent = Instant::now();
                let request = pb::SegmentRequest {
                    image_uris: images.clone(),
                    output_uri: format!("{}/client{c}-{n}", root.trim_end_matches('/')),
                    ..Default::default()
                };
                match client.segment(request).await {
                    Ok(_) => t.latencies.push(sent.elapsed().as_secs_f64()),
                    Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                        t.refused += 1;
                        let hint = e
                            .metadata()
                            .get("grpc-retry-pushback-ms")
                            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                        t.hints_ms.extend(hint);
                        tokio::time::sleep(Duration::from_millis(hint.unwrap_or(1000))).await;
                    }
                    Err(e) => *t.errors.entry(format!("{:?}", e.code())).or_default() += 1,
                }
            }
            t
        }));
    }
    let mut all = Tally::default();
    for task in tasks {
        let t = task.await?;
        all.latencies.extend(t.latencies);
        all.refused += t.refused;
        all.hints_ms.extend(t.hints_ms);
        for (k, v) in t.errors {
            *all.errors.entry(k).or_default() += v;
        }
    }
    let wall = started.elapsed().as_secs_f64();
    all.latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| -> Option<f64> {
        let n = all.latencies.len();
        (n > 0).then(|| all.latencies[((p * (n - 1) as f64).round() as usize).min(n - 1)])
    };
    println!(
        "{}",
        serde_json::json!({
            "clients": a.clients, "seconds": wall, "completed": all.latencies.len(),
            "cases_per_minute": all.latencies.len() as f64 * 60.0 / wall,
            "latency_p50_s": pct(0.5), "latency_p95_s": pct(0.95), "latency_max_s": pct(1.0),
            "refused": all.refused, "retry_hint_ms_min": all.hints_ms.iter().min(),
            "retry_hint_ms_max": all.hints_ms.iter().max(), "errors": all.errors,
        })
    );
    Ok(())
}
