//! The `brats-model` command line (import-monai, export-onnx) on real MONAI fixtures.

use std::path::PathBuf;
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/monai/segresnet").join(name)
}

fn model_tool() -> Command {
    Command::new(env!("CARGO_BIN_EXE_brats-model"))
}

const SMALL: &str = r#"{"blocks_down":[1,1,1],"blocks_up":[1,1],"init_filters":8}"#;

#[test]
fn import_then_export() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("w.safetensors");
    let o = model_tool()
        .args(["import-monai", "--checkpoint"])
        .arg(fixture("small_wrapped.pt"))
        .arg("--out")
        .arg(&w)
        .args(["--config", SMALL])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("39 tensors"));

    let onnx = dir.path().join("model.onnx");
    let o = model_tool().args(["export-onnx", "--weights"]).arg(&w).arg("--out").arg(&onnx).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(onnx.exists() && dir.path().join("metadata.json").exists());

    let fp16 = dir.path().join("fp16/model.onnx");
    let o = model_tool().args(["export-onnx", "--fp16", "--weights"]).arg(&w).arg("--out").arg(&fp16).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let meta = std::fs::read_to_string(dir.path().join("fp16/metadata.json")).unwrap();
    assert!(meta.contains("\"precision\": \"fp16\""), "{meta}");
}

#[test]
fn mismatched_checkpoint_fails_naming_keys_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("w.safetensors");
    // The small network's weights against the bundle configuration (the default).
    let o = model_tool()
        .args(["import-monai", "--checkpoint"])
        .arg(fixture("small_state_dict.pt"))
        .arg("--out")
        .arg(&w)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("missing keys: ") && err.contains("down_layers.3.0.conv.weight"), "{err}");
    assert!(err.contains("mis-shaped: convInit.conv.weight"), "{err}");
    assert!(!w.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    // A truncated checkpoint.
    let bytes = std::fs::read(fixture("small_state_dict.pt")).unwrap();
    let cut = dir.path().join("cut.pt");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let o = model_tool().args(["import-monai", "--checkpoint"]).arg(&cut).arg("--out").arg(&w).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("zip"));
    assert!(!w.exists());
}
