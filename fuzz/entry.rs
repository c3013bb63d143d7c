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
