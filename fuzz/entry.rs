//! What each fuzz target feeds its parser, shared with the replay test (tests/fuzz_corpus.rs)
//! so the corpus is replayed exactly as it was fuzzed. Errors are the expected outcome; a
//! panic, a hang or a sanitizer report is the bug.
#![allow(dead_code)] // each target uses one entry

use std::io::Write;

/// Limits as the services set them, small enough that a fuzzed header cannot ask for
/// gigabytes (the limit check itself is under test).
fn limits() -> brats_volume::nifti_io::ReadLimits {
    brats_volume::nifti_io::ReadLimits { max_axis: 512, max_voxels: 1 << 22 }
}

/// The NIfTI reader on the bytes as given.
pub(crate) fn nifti(data: &[u8]) {
    let _ = brats_volume::nifti_io::read_nifti(data, "fuzz.nii", &limits());
}

/// The NIfTI reader on the bytes gzip-compressed.
pub(crate) fn nifti_gzip(data: &[u8]) {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    if gz.write_all(data).is_err() {
        return;
    }
    let Ok(bytes) = gz.finish() else { return };
    let _ = brats_volume::nifti_io::read_nifti(&bytes, "fuzz.nii.gz", &limits());
}

/// The case-tensors reader.
pub(crate) fn safetensors(data: &[u8]) {
    let _ = brats_volume::tensors::CaseTensors::from_bytes(data, "fuzz.safetensors");
}

/// The `.pt` reader (zip container, pickle machine, tensor storages).
pub(crate) fn pt(data: &[u8]) {
    let _ = brats_model::pt::read_state_dict(data);
}

/// An upload as the fuzz bytes encode it: `SegmentStreamRequest` messages, each
/// length-delimited (a varint length, then the message), as a client streams them; decoding
/// stops at the first malformed message, so every input is some sequence of messages.
pub(crate) fn upload_messages(mut data: &[u8]) -> Vec<brats_proto::v1::SegmentStreamRequest> {
    use prost::Message;
    let mut messages = Vec::new();
    while !data.is_empty() {
        match brats_proto::v1::SegmentStreamRequest::decode_length_delimited(&mut data) {
            Ok(message) => messages.push(message),
            Err(_) => break,
        }
    }
    messages
}

/// The `SegmentStream` upload framing (header, chunks, trailer) through the same assembler
/// the handler drives.
pub(crate) fn upload_framing(data: &[u8]) {
    let _ = brats_inference::upload::assemble(upload_messages(data));
}

/// The seeds of `upload_framing`, by file name: complete 1-file and 4-file uploads (`valid-*`)
/// and uploads broken in the ways the assembler refuses (`broken-*`). `fuzz/seed.sh` writes
/// them into the corpus; the replay test checks each still assembles, or is refused, as named.
pub(crate) fn upload_framing_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use brats_inference::upload::upload_messages as upload;
    use brats_proto::v1::segment_stream_request::Msg;
    use brats_proto::v1::{FileChunk, SegmentStreamRequest};
    use prost::Message;
    fn chunk(messages: &mut [SegmentStreamRequest], i: usize) -> &mut FileChunk {
        match messages[i].msg.as_mut() {
            Some(Msg::Chunk(c)) => c,
            _ => unreachable!("message {i} is a chunk"),
        }
    }
    let volume: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
    let one = [("image.nii.gz", &volume[..])];
    let four = [
        ("t1c.nii.gz", &volume[..700]),
        ("t1.nii.gz", &volume[700..1400]),
        ("t2.nii.gz", &volume[1400..2100]),
        ("flair.nii.gz", &volume[2100..]),
    ];
    let mut seeds = vec![("valid-1-file", upload(&one, 1024)), ("valid-4-files", upload(&four, 256))];

    let mut messages = upload(&four, 256);
    chunk(&mut messages, 2).data[0] ^= 0xff;
    seeds.push(("broken-crc32c", messages));

    let mut messages = upload(&four, 256);
    messages.swap(1, 2);
    seeds.push(("broken-offset", messages));

    let mut messages = upload(&four, 256);
    chunk(&mut messages, 3).file_index = 7;
    seeds.push(("broken-file-index", messages));

    let mut messages = upload(&[("image.nii.gz", &volume[..100])], 64);
    let c = chunk(&mut messages, 2);
    c.data.extend_from_slice(&volume);
    c.crc32c = None;
    seeds.push(("broken-too-much-data", messages));

    let mut messages = upload(&four, 256);
    messages.pop();
    seeds.push(("broken-no-trailer", messages));

    let mut messages = upload(&one, 1024);
    if let Some(Msg::Trailer(t)) = messages.last_mut().and_then(|m| m.msg.as_mut()) {
        t.checksums[0].sha256 = "0".repeat(64);
    }
    seeds.push(("broken-sha256", messages));

    let mut messages = upload(&four, 256);
    messages.insert(3, messages[0].clone());
    seeds.push(("broken-second-header", messages));

    seeds.push(("broken-three-files", upload(&four[..3], 256)));
    seeds
        .into_iter()
        .map(|(name, messages)| {
            let mut bytes = Vec::new();
            for message in &messages {
                message.encode_length_delimited(&mut bytes).expect("a Vec grows");
            }
            (name, bytes)
        })
        .collect()
}
