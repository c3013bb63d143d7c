//! `SegmentStream`: inputs uploaded in chunks, the label map streamed back in chunks, every chunk
//! CRC-32C checked and every file SHA-256 checked, for clients without shared storage.
//!
//! Request stream: a header (files, options), chunks (`file_index`, `offset`, `data`,
//! optional `crc32c`) in order per file, then a trailer with each file's SHA-256. Response stream:
//! progress, the result, the list of output files, their chunks, and a trailer with their
//! SHA-256. A client that disconnects before its trailer leaves nothing behind. The framing
//! checks are [`crate::upload`]'s; this module moves messages between the network and them.

use crate::service::InferenceService;
use crate::upload::{Step, Upload, UploadAssembler};
use brats_proto::v1 as pb;
use brats_service::redact::RequestUris;
use bytes::Bytes;
use pb::segment_stream_response::Msg as Out;
use sha2::{Digest, Sha256};
use std::pin::Pin;
use std::time::Instant;
use tokio::sync::mpsc;
use tonic::{Response, Status, Streaming};
use tracing::{Instrument, info, info_span, warn};

/// Default size of the response chunks.
pub const DEFAULT_CHUNK: usize = 1 << 20;

type ResponseStream = Pin<Box<dyn futures::Stream<Item = Result<pb::SegmentStreamResponse, Status>> + Send>>;

fn progress(stage: pb::SegmentStage, started: Instant) -> pb::SegmentStreamResponse {
    pb::SegmentStreamResponse {
        msg: Some(Out::Progress(pb::SegmentProgress {
            stage: stage as i32,
            elapsed_seconds: started.elapsed().as_secs_f64(),
            ..Default::default()
        })),
    }
}

/// Receives the rest of an upload whose header `upload` holds, message by message, reporting
/// progress on `tx`; every check is [`UploadAssembler`]'s.
async fn receive(
    mut upload: UploadAssembler,
    input: &mut Streaming<pb::SegmentStreamRequest>,
    tx: &mpsc::Sender<Result<pb::SegmentStreamResponse, Status>>,
    started: Instant,
) -> Result<Upload, Status> {
    let mut last_report = 0u64;
    loop {
        let message = input.message().await.map_err(|s| {
            Status::cancelled(format!(
                "the upload broke off after {} of {} bytes ({}); nothing was kept",
                upload.received(),
                upload.total(),
                s.message()
            ))
        })?;
        let Some(message) = message else { return Err(upload.ended_early()) };
        match upload.push(message)? {
            Step::Trailer(trailer) => return upload.finish(&trailer),
            Step::Chunk => {
                let (received, total) = (upload.received(), upload.total());
                if received - last_report >= (8 << 20) || received == total {
                    last_report = received;
                    let mut p = progress(pb::SegmentStage::Receiving, started);
                    if let Some(Out::Progress(pp)) = p.msg.as_mut() {
                        pp.bytes_received = received;
                        pp.fraction = received as f64 / total as f64;
                    }
                    let _ = tx.try_send(Ok(p));
                }
            }
        }
    }
}

/// The locations an upload's header names (its output and the caller's file names), for
/// redacting the statuses the stream is answered with.
fn header_locations(header: &pb::SegmentStreamHeader) -> RequestUris {
    header
        .files
        .iter()
        .enumerate()
        .fold(RequestUris::new().with("header.output_uri", &header.output_uri), |uris, (i, file)| {
            uris.with(format!("header.files[{i}].name"), &file.name)
        })
}

fn send_file(out: &mut Vec<pb::SegmentStreamResponse>, index: u32, data: &Bytes, chunk: usize) {
    for (k, part) in data.chunks(chunk).enumerate() {
        out.push(pb::SegmentStreamResponse {
            msg: Some(Out::Chunk(pb::FileChunk {
                file_index: index,
                offset: (k * chunk) as u64,
                data: part.to_vec(),
                crc32c: Some(crc32c::crc32c(part)),
            })),
        });
    }
}

/// Handles one `SegmentStream` call.
pub async fn segment_stream(
    service: InferenceService,
    mut input: Streaming<pb::SegmentStreamRequest>,
    principal: Option<brats_service::security::Principal>,
) -> Result<Response<ResponseStream>, Status> {
    let started = Instant::now();
    let (tx, rx) = mpsc::channel(64);
    let span = info_span!("segment_stream");
    tokio::spawn(
        async move {
            let mut locations = RequestUris::new();
            let result = async {
                let upload = UploadAssembler::start(input.message().await?)?;
                locations = header_locations(upload.header());
                let Upload { header, files } = receive(upload, &mut input, &tx, started).await?;
                service.uris.check_fields(principal.as_ref(), &[("header.output_uri", &header.output_uri)])?;
                let _ = tx.send(Ok(progress(pb::SegmentStage::Queued, started))).await;
                let ptx = tx.clone();
                let report = Box::new(move |done: usize, total: usize| {
                    let mut p = progress(pb::SegmentStage::Inference, started);
                    if let Some(Out::Progress(pp)) = p.msg.as_mut() {
                        pp.windows_done = done as u32;
                        pp.windows_total = total as u32;
                        pp.fraction = done as f64 / total as f64;
                    }
                    let _ = ptx.try_send(Ok(p));
                });
                let (response, label, probabilities) = service.run_streamed(&header, files, started, report).await?;
                let chunk = if header.chunk_size == 0 {
                    DEFAULT_CHUNK
                } else {
                    (header.chunk_size as usize).clamp(4096, 4 << 20)
                };
                let mut msgs = vec![pb::SegmentStreamResponse { msg: Some(Out::Result(response)) }];
                if !header.skip_download {
                    let mut outputs = vec![(crate::LABEL_MAP_FILE.to_string(), label)];
                    if let Some(p) = probabilities {
                        outputs.push((crate::PROBABILITIES_FILE.into(), p));
                    }
                    msgs.push(pb::SegmentStreamResponse {
                        msg: Some(Out::Outputs(pb::StreamOutputs {
                            files: outputs
                                .iter()
                                .map(|(n, d)| pb::StreamFile {
                                    name: n.clone(),
                                    size_bytes: d.len() as u64,
                                    content_type: String::new(),
                                })
                                .collect(),
                        })),
                    });
                    let mut checksums = Vec::new();
                    for (i, (_, d)) in outputs.iter().enumerate() {
                        send_file(&mut msgs, i as u32, d, chunk);
                        checksums.push(pb::FileChecksum {
                            file_index: i as u32,
                            sha256: hex::encode(Sha256::digest(d)),
                            crc32c: Some(crc32c::crc32c(d)),
                            size_bytes: d.len() as u64,
                        });
                    }
                    msgs.push(pb::SegmentStreamResponse { msg: Some(Out::Trailer(pb::StreamTrailer { checksums })) });
                }
                Ok::<_, Status>(msgs)
            }
            .await;
            match result {
                Ok(msgs) => {
                    for m in msgs {
                        if tx.send(Ok(m)).await.is_err() {
                            info!("client went away during the download");
                            return;
                        }
                    }
                    info!(seconds = started.elapsed().as_secs_f64(), "streamed segmentation done");
                }
                Err(s) => {
                    warn!(code = ?s.code(), "segment stream failed");
                    let _ = tx.send(Err(locations.status(s))).await;
                }
            }
        }
        .instrument(span),
    );
    Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as ResponseStream))
}
