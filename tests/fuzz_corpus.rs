//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`, made by `cargo +nightly fuzz run
//! <target>`; crashes fixed and kept there) through the same entry points the fuzz targets call:
//! every input must end, without a panic, within a few seconds.

#[path = "../fuzz/entry.rs"]
mod entry;

use std::path::Path;
use std::time::{Duration, Instant};

/// Replays `fuzz/corpus/<target>/` and the large seeds `fuzz/seed.sh` took from the committed
/// fixtures (left out of the corpus to keep it small): `seeds` are paths below the repository.
fn replay(target: &str, seeds: &[&str], run: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("fuzz/corpus").join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (the committed corpus)", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "{} holds no inputs", dir.display());
    inputs.extend(seeds.iter().map(|s| root.join(s)));
    for input in &inputs {
        let bytes = std::fs::read(input).unwrap();
        let started = Instant::now();
        run(&bytes);
        assert!(started.elapsed() < Duration::from_secs(5), "{} took {:?}", input.display(), started.elapsed());
    }
}

#[test]
fn nifti_corpus_replays() {
    replay("nifti", &["tests/fixtures/monai/preprocess/dtypes/t2.nii.gz"], entry::nifti);
}

#[test]
fn nifti_gzip_corpus_replays() {
    replay("nifti_gzip", &[], entry::nifti_gzip);
}

#[test]
fn safetensors_corpus_replays() {
    replay("safetensors", &[], entry::safetensors);
}

#[test]
fn pt_corpus_replays() {
    replay(
        "pt",
        &["tests/fixtures/monai/segresnet/small_state_dict.pt", "tests/fixtures/monai/segresnet/small_wrapped.pt"],
        entry::pt,
    );
}

#[test]
fn upload_framing_corpus_replays() {
    replay("upload_framing", &[], entry::upload_framing);
}

/// The seeds `fuzz/seed.sh` writes still mean what their names say: the valid uploads assemble,
/// each broken one is refused.
#[test]
fn upload_framing_seeds_assemble_or_are_refused_as_named() {
    for (name, bytes) in entry::upload_framing_seeds() {
        let result = brats_inference::upload::assemble(entry::upload_messages(&bytes));
        assert_eq!(result.is_ok(), name.starts_with("valid-"), "{name}: {:?}", result.err());
    }
}

/// Writes the `upload_framing` seeds into `fuzz/corpus/upload_framing/` (`seed-<name>`); run by
/// `fuzz/seed.sh`, not by `make test`.
#[test]
#[ignore = "writes the fuzz seeds; run by fuzz/seed.sh"]
fn write_upload_framing_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/upload_framing");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in entry::upload_framing_seeds() {
        std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
    }
}
