//! `bratsctl preprocess` and `bratsctl preprocess-dataset`: jobs on a preprocessing service.

use brats_cli::to_uri;
use brats_proto::v1 as pb;
use brats_proto::v1::preprocessor_client::PreprocessorClient;

use super::{join, status_line};

/// Arguments of `bratsctl preprocess`.
#[derive(clap::Args)]
pub(crate) struct PreprocessArgs {
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
}

/// Arguments of `bratsctl preprocess-dataset`.
#[derive(clap::Args)]
pub(crate) struct PreprocessDatasetArgs {
    /// Preprocessing service address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    /// Datalist URI or path.
    #[arg(long)]
    datalist: String,
    /// Output prefix URI; default the server's store.
    #[arg(long)]
    out: Option<String>,
}

async fn client(server: &str) -> anyhow::Result<PreprocessorClient<brats_cli::AuthChannel>> {
    Ok(PreprocessorClient::new(super::connect(server).await?))
}

/// Preprocesses one case and prints what came out.
pub(crate) async fn run_case(a: PreprocessArgs) -> anyhow::Result<()> {
    let PreprocessArgs { server, image, label, case_id, out, force } = a;
    let mut client = client(&server).await?;
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

/// Preprocesses a datalist, printing a line per case as the service reports it.
pub(crate) async fn run_dataset(a: PreprocessDatasetArgs) -> anyhow::Result<()> {
    let PreprocessDatasetArgs { server, datalist, out } = a;
    let mut client = client(&server).await?;
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
            println!("{} cases, {} reused, {} failed; manifest {}", p.total, p.reused, p.failed, p.manifest_uri);
        }
    }
    Ok(())
}

/// The case's metadata, channel statistics and timings.
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
