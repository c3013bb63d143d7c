//! A case's tensors file (safetensors with our metadata record), as the services read it back
//! from the store or a client uploads it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| brats_fuzz_entry::safetensors(data));

#[path = "../entry.rs"]
mod brats_fuzz_entry;
