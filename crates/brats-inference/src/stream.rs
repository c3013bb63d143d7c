//! `SegmentStream`: inputs uploaded in chunks, the label map streamed back in chunks, every chunk
//! CRC-32C checked and every file SHA-256 checked, for clients without shared storage.
//!
//! Request stream: a header (files, options), chunks (`file_index`, `offset`, `data`,
//! optional `crc32c`) in order per file, then a trailer with each file's SHA-256. Response stream:
//! progress, the result, the list of output files, their chunks, and a trailer with their
//! SHA-256. A client that disconnects before its trailer leaves nothing behind.

use crate::service::InferenceService;
use brats_preprocess::pipeline::InputFile;
use brats_proto::v1 as pb;
use bytes::{Bytes, BytesMut};
use pb::segment_stream_request::Msg as In;
use pb::segment_stream_response::Msg as Out;
use sha2::{Digest, Sha256};
use std::pin::Pin;
use std::time::Instant;
use tokio::sync::mpsc;
use tonic::{Response, Status, Streaming};
use tracing::{Instrument, info, info_span, warn};

/// Largest accepted input file (a float64 240×240×155 volume is ~71 MB).
pub const MAX_FILE_BYTES: u64 = 1 << 30;
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

/// Receives the upload completely and checks it; returns the header and the files.
async fn receive(
    input: &mut Streaming<pb::SegmentStreamRequest>,
    tx: &mpsc::Sender<Result<pb::SegmentStreamResponse, Status>>,
    started: Instant,
) -> Result<(pb::SegmentStreamHeader, Vec<InputFile>), Status> {
    let first = input.message().await?.ok_or_else(|| Status::invalid_argument("the stream ended before its header"))?;
    let Some(In::Header(header)) = first.msg else {
        return Err(Status::invalid_argument("the first message must be the header (files, options)"));
    };
    if header.files.len() != 4 && header.files.len() != 1 {
        return Err(Status::invalid_argument(format!(
            "header.files: {} files declared; send 4 (T1c, T1, T2, FLAIR in that order) or one 4D file",
            header.files.len()
        )));
    }
    for (i, f) in header.files.iter().enumerate() {
        if f.size_bytes == 0 || f.size_bytes > MAX_FILE_BYTES {
            return Err(Status::invalid_argument(format!(
                "header.files[{i}] ({}): size_bytes {} must be in 1..={MAX_FILE_BYTES}",
                f.name, f.size_bytes
            )));
        }
    }
    let mut buffers: Vec<BytesMut> =
        header.files.iter().map(|f| BytesMut::with_capacity(f.size_bytes as usize)).collect();
    let mut received = 0u64;
    let total: u64 = header.files.iter().map(|f| f.size_bytes).sum();
    let mut last_report = 0u64;
    let trailer = loop {
        let msg = input.message().await.map_err(|s| {
            Status::cancelled(format!(
                "the upload broke off after {received} of {total} bytes ({}); nothing was kept",
                s.message()
            ))
        })?;
        let Some(msg) = msg else {
            return Err(Status::cancelled(format!(
                "the upload ended after {received} of {total} bytes without a trailer; nothing was kept"
            )));
        };
        match msg.msg {
            Some(In::Chunk(c)) => {
                let i = c.file_index as usize;
                let (Some(buf), Some(decl)) = (buffers.get_mut(i), header.files.get(i)) else {
                    return Err(Status::invalid_argument(format!("chunk.file_index {i} is not a declared file")));
                };
                if c.offset != buf.len() as u64 {
                    return Err(Status::invalid_argument(format!(
                        "chunk for {} at offset {}: expected offset {} (send each file's chunks in order)",
                        decl.name,
                        c.offset,
                        buf.len()
                    )));
                }
                if buf.len() as u64 + c.data.len() as u64 > decl.size_bytes {
                    return Err(Status::invalid_argument(format!(
                        "{}: more data than its declared size_bytes {}",
                        decl.name, decl.size_bytes
                    )));
                }
                if let Some(crc) = c.crc32c
                    && crc32c::crc32c(&c.data) != crc
                {
                    return Err(Status::data_loss(format!(
                        "{}: chunk at offset {} fails its CRC-32C; resend",
                        decl.name, c.offset
                    )));
                }
                buf.extend_from_slice(&c.data);
                received += c.data.len() as u64;
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
            Some(In::Trailer(t)) => break t,
            Some(In::Header(_)) => {
                return Err(Status::invalid_argument("a second header arrived; send one header per stream"));
            }
            None => return Err(Status::invalid_argument("empty message")),
        }
    };
    for (i, (buf, decl)) in buffers.iter().zip(&header.files).enumerate() {
        if buf.len() as u64 != decl.size_bytes {
            return Err(Status::data_loss(format!(
                "{}: received {} bytes of the declared {}",
                decl.name,
                buf.len(),
                decl.size_bytes
            )));
        }
        let sum = trailer.checksums.iter().find(|c| c.file_index as usize == i).ok_or_else(|| {
            Status::invalid_argument(format!(
                "trailer.checksums: no entry for file {i} ({}); send its sha256",
                decl.name
            ))
        })?;
        let got = hex::encode(Sha256::digest(buf));
        if !got.eq_ignore_ascii_case(&sum.sha256) {
            return Err(Status::data_loss(format!(
                "{}: sha256 of the received bytes is {got}, the trailer says {}; resend",
                decl.name, sum.sha256
            )));
        }
    }
    let files = buffers
        .into_iter()
        .zip(&header.files)
        .map(|(b, f)| InputFile { name: f.name.clone(), bytes: b.freeze() })
        .collect();
    Ok((header, files))
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
            let result = async {
                let (header, files) = receive(&mut input, &tx, started).await?;
                if !header.output_uri.is_empty() {
                    service.uris.check(principal.as_ref(), "header.output_uri", &header.output_uri)?;
                }
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
                    let _ = tx.send(Err(s)).await;
                }
            }
        }
        .instrument(span),
    );
    Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as ResponseStream))
}
