//! The framing of a `SegmentStream` upload, as a pure, synchronous state machine: the header
//! (files and options), the chunks of each file in order, then the trailer with each file's
//! SHA-256. [`UploadAssembler`] checks every message as it arrives (order, file index, offset,
//! declared size, CRC-32C) and the trailer at the end, so that the async handler
//! ([`crate::stream`]) only moves messages from the network into it, and the fuzz target
//! `fuzz/fuzz_targets/upload_framing.rs` can drive exactly the same checks with no network.

use brats_preprocess::pipeline::InputFile;
use brats_proto::v1 as pb;
use bytes::BytesMut;
use pb::segment_stream_request::Msg;
use sha2::{Digest, Sha256};
use tonic::Status;

/// Largest accepted input file (a float64 240×240×155 volume is ~71 MB).
pub const MAX_FILE_BYTES: u64 = 1 << 30;

/// Most bytes reserved per file before its data arrives: a header alone may declare up to
/// 4 × [`MAX_FILE_BYTES`], and a caller that sends nothing more must not make the service
/// reserve gigabytes. Larger files grow their buffer as their chunks arrive.
const MAX_INITIAL_RESERVE: u64 = 64 << 20;

/// A complete, checked upload: the header and the files' bytes, in the header's order.
#[derive(Debug)]
pub struct Upload {
    /// The header as the client sent it.
    pub header: pb::SegmentStreamHeader,
    /// Each declared file with exactly its declared size and SHA-256.
    pub files: Vec<InputFile>,
}

/// What a message after the header did to the upload.
#[derive(Debug)]
pub enum Step {
    /// A chunk was appended; more messages are expected.
    Chunk,
    /// The trailer arrived: pass it to [`UploadAssembler::finish`].
    Trailer(pb::StreamTrailer),
}

/// Assembles one upload from its messages, refusing the first one that breaks the framing.
#[derive(Debug)]
pub struct UploadAssembler {
    header: pb::SegmentStreamHeader,
    buffers: Vec<BytesMut>,
    received: u64,
    total: u64,
}

impl UploadAssembler {
    /// Starts from the stream's first message, which must be the header (`None`: the stream
    /// ended before sending anything).
    pub fn start(first: Option<pb::SegmentStreamRequest>) -> Result<Self, Status> {
        let first = first.ok_or_else(|| Status::invalid_argument("the stream ended before its header"))?;
        let Some(Msg::Header(header)) = first.msg else {
            return Err(Status::invalid_argument("the first message must be the header (files, options)"));
        };
        Self::new(header)
    }

    /// Starts from a header: 4 files (T1c, T1, T2, FLAIR) or one 4D file, each of
    /// 1..=[`MAX_FILE_BYTES`] bytes.
    pub fn new(header: pb::SegmentStreamHeader) -> Result<Self, Status> {
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
        let buffers = header
            .files
            .iter()
            .map(|f| BytesMut::with_capacity(f.size_bytes.min(MAX_INITIAL_RESERVE) as usize))
            .collect();
        let total = header.files.iter().map(|f| f.size_bytes).sum();
        Ok(UploadAssembler { header, buffers, received: 0, total })
    }

    /// The header the upload started with.
    pub fn header(&self) -> &pb::SegmentStreamHeader {
        &self.header
    }

    /// Bytes of file data accepted so far, over all files.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Bytes the header declared, over all files.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Takes the next message after the header: a chunk, or the trailer that ends the upload.
    pub fn push(&mut self, message: pb::SegmentStreamRequest) -> Result<Step, Status> {
        match message.msg {
            Some(Msg::Chunk(chunk)) => self.push_chunk(chunk).map(|()| Step::Chunk),
            Some(Msg::Trailer(trailer)) => Ok(Step::Trailer(trailer)),
            Some(Msg::Header(_)) => {
                Err(Status::invalid_argument("a second header arrived; send one header per stream"))
            }
            None => Err(Status::invalid_argument("empty message")),
        }
    }

    /// Appends a chunk: it must name a declared file, continue that file exactly where its
    /// data ends, stay within its declared size and match its CRC-32C when it carries one.
    pub fn push_chunk(&mut self, chunk: pb::FileChunk) -> Result<(), Status> {
        let i = chunk.file_index as usize;
        let (Some(buf), Some(decl)) = (self.buffers.get_mut(i), self.header.files.get(i)) else {
            return Err(Status::invalid_argument(format!("chunk.file_index {i} is not a declared file")));
        };
        if chunk.offset != buf.len() as u64 {
            return Err(Status::invalid_argument(format!(
                "chunk for {} at offset {}: expected offset {} (send each file's chunks in order)",
                decl.name,
                chunk.offset,
                buf.len()
            )));
        }
        if buf.len() as u64 + chunk.data.len() as u64 > decl.size_bytes {
            return Err(Status::invalid_argument(format!(
                "{}: more data than its declared size_bytes {}",
                decl.name, decl.size_bytes
            )));
        }
        if let Some(crc) = chunk.crc32c
            && crc32c::crc32c(&chunk.data) != crc
        {
            return Err(Status::data_loss(format!(
                "{}: chunk at offset {} fails its CRC-32C; resend",
                decl.name, chunk.offset
            )));
        }
        buf.extend_from_slice(&chunk.data);
        self.received += chunk.data.len() as u64;
        Ok(())
    }

    /// The refusal for a stream that ended before its trailer: nothing is kept.
    pub fn ended_early(&self) -> Status {
        Status::cancelled(format!(
            "the upload ended after {} of {} bytes without a trailer; nothing was kept",
            self.received, self.total
        ))
    }

    /// Ends the upload with its trailer: every file must be complete and match the trailer's
    /// SHA-256 for it.
    pub fn finish(self, trailer: &pb::StreamTrailer) -> Result<Upload, Status> {
        for (i, (buf, decl)) in self.buffers.iter().zip(&self.header.files).enumerate() {
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
        let files = self
            .buffers
            .into_iter()
            .zip(&self.header.files)
            .map(|(b, f)| InputFile { name: f.name.clone(), bytes: b.freeze() })
            .collect();
        Ok(Upload { header: self.header, files })
    }
}

/// Assembles an upload from all of its messages at once (the fuzz target, tests): the same
/// checks, in the same order, as the streaming handler applies to messages as they arrive.
pub fn assemble(messages: impl IntoIterator<Item = pb::SegmentStreamRequest>) -> Result<Upload, Status> {
    let mut messages = messages.into_iter();
    let mut upload = UploadAssembler::start(messages.next())?;
    for message in messages.by_ref() {
        if let Step::Trailer(trailer) = upload.push(message)? {
            return upload.finish(&trailer);
        }
    }
    Err(upload.ended_early())
}

/// A complete upload of `files` (name, bytes) as a client sends it: header, chunks of at most
/// `chunk` bytes with their CRC-32C, trailer. For tests and the fuzz seeds.
pub fn upload_messages(files: &[(&str, &[u8])], chunk: usize) -> Vec<pb::SegmentStreamRequest> {
    let header = pb::SegmentStreamHeader {
        files: files
            .iter()
            .map(|(name, data)| pb::StreamFile {
                name: name.to_string(),
                size_bytes: data.len() as u64,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let mut messages = vec![pb::SegmentStreamRequest { msg: Some(Msg::Header(header)) }];
    for (i, (_, data)) in files.iter().enumerate() {
        for (k, part) in data.chunks(chunk.max(1)).enumerate() {
            messages.push(pb::SegmentStreamRequest {
                msg: Some(Msg::Chunk(pb::FileChunk {
                    file_index: i as u32,
                    offset: (k * chunk.max(1)) as u64,
                    data: part.to_vec(),
                    crc32c: Some(crc32c::crc32c(part)),
                })),
            });
        }
    }
    let checksums = files
        .iter()
        .enumerate()
        .map(|(i, (_, data))| pb::FileChecksum {
            file_index: i as u32,
            sha256: hex::encode(Sha256::digest(data)),
            crc32c: Some(crc32c::crc32c(data)),
            size_bytes: data.len() as u64,
        })
        .collect();
    messages.push(pb::SegmentStreamRequest { msg: Some(Msg::Trailer(pb::StreamTrailer { checksums })) });
    messages
}

#[cfg(test)]
mod tests {
    use super::*;

    const FOUR: [(&str, &[u8]); 4] =
        [("t1c.nii", b"first file"), ("t1.nii", b"second"), ("t2.nii", b"third file bytes"), ("flair.nii", b"4th")];

    fn refusal(messages: Vec<pb::SegmentStreamRequest>) -> Status {
        assemble(messages).expect_err("the upload should be refused")
    }

    fn chunk_of(message: &mut pb::SegmentStreamRequest) -> &mut pb::FileChunk {
        match message.msg.as_mut() {
            Some(Msg::Chunk(c)) => c,
            other => panic!("not a chunk: {other:?}"),
        }
    }

    fn trailer_of(message: &mut pb::SegmentStreamRequest) -> &mut pb::StreamTrailer {
        match message.msg.as_mut() {
            Some(Msg::Trailer(t)) => t,
            other => panic!("not a trailer: {other:?}"),
        }
    }

    fn header_of(message: &mut pb::SegmentStreamRequest) -> &mut pb::SegmentStreamHeader {
        match message.msg.as_mut() {
            Some(Msg::Header(h)) => h,
            other => panic!("not a header: {other:?}"),
        }
    }

    #[test]
    fn complete_uploads_of_one_and_four_files_are_assembled() {
        let upload = assemble(upload_messages(&FOUR, 3)).unwrap();
        assert_eq!(upload.files.len(), 4);
        for (file, (name, data)) in upload.files.iter().zip(FOUR) {
            assert_eq!((file.name.as_str(), &file.bytes[..]), (name, data));
        }
        let one = assemble(upload_messages(&[("image.nii.gz", b"a 4D file".as_slice())], 4)).unwrap();
        assert_eq!(&one.files[0].bytes[..], b"a 4D file");
    }

    #[test]
    fn message_order_is_enforced() {
        assert_eq!(refusal(vec![]).message(), "the stream ended before its header");
        let mut messages = upload_messages(&FOUR, 8);
        messages.remove(0);
        assert_eq!(refusal(messages).message(), "the first message must be the header (files, options)");
        let mut messages = upload_messages(&FOUR, 8);
        messages.insert(2, messages[0].clone());
        assert_eq!(refusal(messages).message(), "a second header arrived; send one header per stream");
        let mut messages = upload_messages(&FOUR, 8);
        messages.insert(1, pb::SegmentStreamRequest { msg: None });
        assert_eq!(refusal(messages).message(), "empty message");
        let mut messages = upload_messages(&FOUR, 8);
        messages.pop();
        let e = refusal(messages);
        assert_eq!(e.code(), tonic::Code::Cancelled);
        assert_eq!(e.message(), "the upload ended after 35 of 35 bytes without a trailer; nothing was kept");
    }

    #[test]
    fn headers_with_a_wrong_file_count_or_size_are_refused() {
        let mut messages = upload_messages(&FOUR[..2], 8);
        assert!(refusal(messages.clone()).message().starts_with("header.files: 2 files declared; send 4"));
        header_of(&mut messages[0]).files.truncate(1);
        header_of(&mut messages[0]).files[0].size_bytes = MAX_FILE_BYTES + 1;
        let e = refusal(messages.clone());
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            e.message(),
            format!("header.files[0] (t1c.nii): size_bytes {} must be in 1..=1073741824", MAX_FILE_BYTES + 1)
        );
        header_of(&mut messages[0]).files[0].size_bytes = 0;
        assert!(refusal(messages).message().contains("size_bytes 0 must be in 1..="));
    }

    #[test]
    fn chunks_out_of_place_too_long_or_corrupt_are_refused() {
        let mut messages = upload_messages(&FOUR, 4);
        chunk_of(&mut messages[1]).file_index = 4;
        assert_eq!(refusal(messages).message(), "chunk.file_index 4 is not a declared file");

        let mut messages = upload_messages(&FOUR, 4);
        messages.swap(1, 2);
        assert_eq!(
            refusal(messages).message(),
            "chunk for t1c.nii at offset 4: expected offset 0 (send each file's chunks in order)"
        );

        let mut messages = upload_messages(&FOUR, 4);
        let chunk = chunk_of(&mut messages[1]);
        chunk.data.extend_from_slice(b"0123456789");
        chunk.crc32c = None;
        assert_eq!(refusal(messages).message(), "t1c.nii: more data than its declared size_bytes 10");

        let mut messages = upload_messages(&FOUR, 4);
        chunk_of(&mut messages[2]).data[0] ^= 1;
        let e = refusal(messages);
        assert_eq!(e.code(), tonic::Code::DataLoss);
        assert_eq!(e.message(), "t1c.nii: chunk at offset 4 fails its CRC-32C; resend");
    }

    #[test]
    fn incomplete_files_and_wrong_or_missing_checksums_are_refused() {
        let mut messages = upload_messages(&FOUR, 4);
        messages.retain(|m| !matches!(&m.msg, Some(Msg::Chunk(c)) if c.file_index == 0));
        let e = refusal(messages);
        assert_eq!(e.code(), tonic::Code::DataLoss);
        assert_eq!(e.message(), "t1c.nii: received 0 bytes of the declared 10");

        let mut messages = upload_messages(&FOUR, 4);
        trailer_of(messages.last_mut().unwrap()).checksums.remove(2);
        assert_eq!(refusal(messages).message(), "trailer.checksums: no entry for file 2 (t2.nii); send its sha256");

        let mut messages = upload_messages(&FOUR, 4);
        let trailer = trailer_of(messages.last_mut().unwrap());
        trailer.checksums[3].sha256 = "00".repeat(32);
        let e = refusal(messages);
        assert_eq!(e.code(), tonic::Code::DataLoss);
        assert!(e.message().starts_with("flair.nii: sha256 of the received bytes is "), "{}", e.message());

        let mut messages = upload_messages(&FOUR, 4);
        let trailer = trailer_of(messages.last_mut().unwrap());
        trailer.checksums[1].sha256 = trailer.checksums[1].sha256.to_ascii_uppercase();
        assert!(assemble(messages).is_ok(), "the checksum's case does not matter");
    }

    #[test]
    fn a_large_declared_size_reserves_little_before_data_arrives() {
        let mut messages = upload_messages(&FOUR[..1], 4);
        header_of(&mut messages[0]).files[0].size_bytes = MAX_FILE_BYTES;
        let upload = UploadAssembler::start(messages.into_iter().next()).unwrap();
        assert!(upload.buffers[0].capacity() as u64 <= MAX_INITIAL_RESERVE);
        assert_eq!(upload.total(), MAX_FILE_BYTES);
    }
}
