//! Writes the deterministic bundle weights of `tests/monai/detgen.py`
//! (`brats_model::reference::det_state_dict` for the bundle's `SegResNetConfig::default()`) as our
//! safetensors weight file, so that the same weights can be exported to ONNX
//! (`brats-trainer export-onnx --weights W --out M.onnx`) and loaded by MONAI
//! (`detgen.det_state_dict`) — used by `benchmarks/inference/run.sh`.
//!
//! Usage: `cargo run --release -p brats-model --example write_reference_weights -- OUT.safetensors`

use brats_model::SegResNetConfig;
use brats_model::reference::det_state_dict;
use brats_model::weights::save_weights;
use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "reference-weights.safetensors".into()));
    let config = SegResNetConfig::default();
    let sd = det_state_dict(&config);
    let training = serde_json::json!({"source": "brats_model::reference::det_state_dict (tests/monai/detgen.py)"});
    if let Err(e) = save_weights(&out, &sd, &config, Some(&training)) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    println!("wrote {} ({} tensors)", out.display(), sd.len());
}
