//! NIfTI-1 header and body as a caller uploads them (plain, or gzip when the bytes say so).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| brats_fuzz_entry::nifti(data));

#[path = "../entry.rs"]
mod brats_fuzz_entry;
