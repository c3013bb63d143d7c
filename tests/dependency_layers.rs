//! The dependency layers hold (scripts/check-deps.sh): the client links neither the
//! preprocessing library nor the S3 client, and neither it nor preprocessing links libtorch or
//! ONNX Runtime.

use std::process::Command;

#[test]
fn the_client_and_preprocessing_stay_light() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash")
        .arg(format!("{root}/scripts/check-deps.sh"))
        .env("CARGO", std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .output()
        .expect("run scripts/check-deps.sh");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("dependency layers hold"), "{text}");
}
