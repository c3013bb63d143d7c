//! The gzip path of the NIfTI reader with valid deflate streams: the input is compressed first,
//! so the mutations reach the header and body behind the decompressor.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| brats_fuzz_entry::nifti_gzip(data));

#[path = "../entry.rs"]
mod brats_fuzz_entry;
