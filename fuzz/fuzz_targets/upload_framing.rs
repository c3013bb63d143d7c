//! The `SegmentStream` upload framing (header, chunks with offsets and CRC-32C, trailer with
//! SHA-256) as a caller streams it: the bytes are length-delimited `SegmentStreamRequest`
//! messages, assembled by the same `UploadAssembler` the inference service drives.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| brats_fuzz_entry::upload_framing(data));

#[path = "../entry.rs"]
mod brats_fuzz_entry;
