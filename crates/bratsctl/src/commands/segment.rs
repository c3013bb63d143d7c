//! `bratsctl segment`: a case through an inference service's SegmentStream, the label map
//! downloaded and checked.

use std::path::{Path, PathBuf};

use anyhow::Context;
use brats_proto::v1 as pb;
use brats_proto::v1::inference_client::InferenceClient;

use super::{join, status_line};

/// Arguments of `bratsctl segment`.
#[derive(clap::Args)]
pub(crate) struct SegmentArgs {
    /// Inference service address.
    #[arg(long, default_value = "http://127.0.0.1:50052")]
    server: String,
    /// T1c T1 T2 FLAIR files (or one 4D file).
    #[arg(long, num_args = 1..=4, required = true)]
    image: Vec<PathBuf>,
    /// Where to write the label map (.nii.gz).
    #[arg(long)]
    out: PathBuf,
    /// Model version to use (default: the server's production alias).
    #[arg(long)]
    model_version: Option<String>,
    /// Request id (appears in the server's logs).
    #[arg(long)]
    request_id: Option<String>,
    /// Also write a quick-look PNG: the labels over the T1c in axial, coronal and sagittal
    /// slices through the tumour.
    #[arg(long, value_name = "PNG")]
    qc: Option<PathBuf>,
    /// When the service is busy (RESOURCE_EXHAUSTED), wait as long as it asks
    /// (`grpc-retry-pushback-ms`) and send the case again, up to this many times.
    #[arg(long, default_value_t = 3)]
    retries: u32,
}

/// The service refused the request for now (RESOURCE_EXHAUSTED) and said when to come back.
#[derive(Debug)]
pub(crate) struct Busy {
    /// The status as `status_line` prints it.
    line: String,
    /// The service's hint (1 s when it gave none).
    retry_after: std::time::Duration,
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.line)
    }
}

impl std::error::Error for Busy {}

/// A status as an error: [`Busy`] for RESOURCE_EXHAUSTED (with the retry hint), else
/// `status_line`.
fn status_error(s: tonic::Status) -> anyhow::Error {
    if s.code() != tonic::Code::ResourceExhausted {
        return status_line(&s);
    }
    let ms = s.metadata().get("grpc-retry-pushback-ms").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    Busy { line: status_line(&s).to_string(), retry_after: std::time::Duration::from_millis(ms.unwrap_or(1000)) }.into()
}

/// Segments the case and prints the volumes and timings.
pub(crate) async fn run(a: SegmentArgs) -> anyhow::Result<()> {
    let SegmentArgs { server, image, out, model_version, request_id, qc, retries } = a;
    let channel = super::connect(&server).await?;
    let model = model_version.map(|v| pb::ModelSelector { version: v, ..Default::default() });
    let request_id = request_id.unwrap_or_default();
    let mut attempt = 0;
    let r = loop {
        match segment_stream(channel.clone(), &image, &out, model.clone(), request_id.clone(), true).await {
            Err(e) if attempt < retries && e.downcast_ref::<Busy>().is_some() => {
                let wait = e.downcast_ref::<Busy>().map(|b| b.retry_after).unwrap_or_default();
                attempt += 1;
                eprintln!("{e}; retry {attempt} of {retries} in {:.1} s", wait.as_secs_f64());
                tokio::time::sleep(wait).await;
            }
            r => break r?,
        }
    };
    print_segmentation(&r, &out);
    if let Some(png) = qc {
        write_quick_look(&image[0], &out, &png)?;
        println!("  quick look {}", png.display());
    }
    Ok(())
}

/// Renders the quick-look PNG of the label map `label` over the T1c file `t1c`.
pub(crate) fn write_quick_look(t1c: &Path, label: &Path, png: &Path) -> anyhow::Result<()> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("{}", p.display()));
    let picture = brats_volume::overlay::overlay_files(&read(t1c)?, &read(label)?)?;
    let tmp = png.with_extension("part");
    std::fs::write(&tmp, brats_volume::overlay::png(&picture)).with_context(|| format!("{}", tmp.display()))?;
    std::fs::rename(&tmp, png).with_context(|| format!("{}", png.display()))
}

/// Uploads `images` through SegmentStream with a progress bar, writes the returned label map to
/// `out` after checking every chunk's CRC-32C and the file's SHA-256.
pub(crate) async fn segment_stream(
    channel: brats_cli::AuthChannel,
    images: &[PathBuf],
    out: &Path,
    model: Option<pb::ModelSelector>,
    request_id: String,
    show_progress: bool,
) -> anyhow::Result<pb::SegmentResponse> {
    use pb::segment_stream_request::Msg as In;
    use pb::segment_stream_response::Msg as Out;
    use sha2::Digest;
    let files: Vec<Vec<u8>> = images
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("{}", p.display())))
        .collect::<Result<_, _>>()?;
    let total: u64 = files.iter().map(|f| f.len() as u64).sum();
    let bar = if show_progress { indicatif::ProgressBar::new(total) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap()
            .progress_chars("=> "),
    );
    bar.set_message("uploading");
    let header = pb::SegmentStreamHeader {
        request_id,
        model,
        files: files
            .iter()
            .zip(images)
            .map(|(f, p)| pb::StreamFile {
                name: p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                size_bytes: f.len() as u64,
                content_type: "application/gzip".into(),
            })
            .collect(),
        ..Default::default()
    };
    const CHUNK: usize = 1 << 20;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let upload_bar = bar.clone();
    tokio::spawn(async move {
        let _ = tx.send(pb::SegmentStreamRequest { msg: Some(In::Header(header)) }).await;
        let mut checksums = Vec::new();
        for (i, f) in files.iter().enumerate() {
            for (k, part) in f.chunks(CHUNK).enumerate() {
                let chunk = pb::FileChunk {
                    file_index: i as u32,
                    offset: (k * CHUNK) as u64,
                    data: part.to_vec(),
                    crc32c: Some(crc32c::crc32c(part)),
                };
                if tx.send(pb::SegmentStreamRequest { msg: Some(In::Chunk(chunk)) }).await.is_err() {
                    return;
                }
                upload_bar.inc(part.len() as u64);
            }
            checksums.push(pb::FileChecksum {
                file_index: i as u32,
                sha256: hex::encode(sha2::Sha256::digest(f)),
                crc32c: None,
                size_bytes: f.len() as u64,
            });
        }
        let _ = tx.send(pb::SegmentStreamRequest { msg: Some(In::Trailer(pb::StreamTrailer { checksums })) }).await;
    });
    let mut client = InferenceClient::new(channel).max_decoding_message_size(16 << 20);
    let mut stream = client
        .segment_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(status_error)?
        .into_inner();
    let mut result = None;
    let mut label = Vec::new();
    let mut expected_size = 0u64;
    while let Some(msg) = stream.message().await.map_err(status_error)? {
        match msg.msg {
            Some(Out::Progress(p)) if p.windows_total > 0 => {
                if bar.length() != Some(p.windows_total as u64) {
                    bar.set_length(p.windows_total as u64);
                    bar.set_style(
                        indicatif::ProgressStyle::with_template("{msg:>12} [{bar:40}] window {pos}/{len} {elapsed}")
                            .unwrap()
                            .progress_chars("=> "),
                    );
                    bar.set_message("inference");
                }
                bar.set_position(p.windows_done as u64);
            }
            Some(Out::Progress(_)) => {}
            Some(Out::Result(r)) => result = Some(r),
            Some(Out::Outputs(o)) => {
                expected_size = o.files.first().map(|f| f.size_bytes).unwrap_or(0);
                bar.set_length(expected_size);
                bar.set_position(0);
                bar.set_style(
                    indicatif::ProgressStyle::with_template("{msg:>12} [{bar:40}] {bytes}/{total_bytes}")
                        .unwrap()
                        .progress_chars("=> "),
                );
                bar.set_message("downloading");
            }
            Some(Out::Chunk(c)) if c.file_index == 0 => {
                anyhow::ensure!(c.offset as usize == label.len(), "chunk at offset {} arrived out of order", c.offset);
                if let Some(crc) = c.crc32c {
                    anyhow::ensure!(
                        crc32c::crc32c(&c.data) == crc,
                        "label chunk at offset {} is corrupt (CRC-32C)",
                        c.offset
                    );
                }
                label.extend_from_slice(&c.data);
                bar.inc(c.data.len() as u64);
            }
            Some(Out::Chunk(_)) => {}
            Some(Out::Trailer(t)) => {
                let want = t.checksums.iter().find(|c| c.file_index == 0).map(|c| c.sha256.clone()).unwrap_or_default();
                anyhow::ensure!(
                    label.len() as u64 == expected_size,
                    "label map truncated: {} of {expected_size} bytes",
                    label.len()
                );
                anyhow::ensure!(
                    hex::encode(sha2::Sha256::digest(&label)) == want,
                    "label map checksum mismatch; retry"
                );
            }
            None => {}
        }
    }
    bar.finish_and_clear();
    let result = result.context("the server ended the stream without a result")?;
    let tmp = out.with_extension("part");
    std::fs::write(&tmp, &label).with_context(|| format!("{}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("{}", out.display()))?;
    Ok(result)
}

/// The segmentation's model, provider, volumes and server timings.
pub(crate) fn print_segmentation(r: &pb::SegmentResponse, out: &Path) {
    let v = r.volumes.unwrap_or_default();
    let t = r.timings.unwrap_or_default();
    let provider = pb::ExecutionProvider::try_from(r.provider).map(|p| p.as_str_name()).unwrap_or("?");
    println!(
        "segmentation {} ({}), model {} version {}, provider {provider}{}",
        out.display(),
        join(&r.shape),
        r.model_name,
        r.model_version,
        if r.fallback { format!(" (fallback: {})", r.fallback_reason) } else { String::new() }
    );
    println!("  volumes  TC {:.2} mL   WT {:.2} mL   ET {:.2} mL", v.tc_ml, v.wt_ml, v.et_ml);
    println!(
        "  timing   queue {:.3}s, decode {:.3}s, preprocess {:.3}s, inference {:.3}s, postprocess {:.3}s, encode {:.3}s; total on the server {:.2}s",
        t.queue_seconds,
        t.decode_seconds,
        t.preprocess_seconds,
        t.inference_seconds,
        t.postprocess_seconds,
        t.encode_seconds,
        t.total_seconds
    );
}
