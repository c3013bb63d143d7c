//! A PyTorch checkpoint (`.pt`: the zip container and the pickle machine) as `brats-model
//! import-monai` and `init_weights_uri` read it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| brats_fuzz_entry::pt(data));

#[path = "../entry.rs"]
mod brats_fuzz_entry;
