#!/usr/bin/env bash
# Seeds the fuzz corpora from committed fixtures and from the real CLI (each file small, so the
# fuzzer starts near real inputs). Run once before the first `cargo +nightly fuzz run`; the
# fuzzer then grows fuzz/corpus/<target>/ and `cargo +nightly fuzz cmin <target>` keeps it small.
# What is committed is the minimised corpus of inputs under 4 KiB (64 KiB for pt; 1 KiB for
# upload_framing, plus its named seed-* uploads); the large seeds stay in tests/fixtures, and
# tests/fuzz_corpus.rs replays them beside the corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
fx=tests/fixtures/monai/preprocess
mkdir -p fuzz/corpus/{nifti,nifti_gzip,safetensors,pt}
for case in dtypes edge brats2023; do
    for f in "$fx/$case"/*.nii.gz; do
        name="$case-$(basename "$f" .nii.gz)"
        gzip -dc "$f" > "fuzz/corpus/nifti/$name.nii"
        cp "fuzz/corpus/nifti/$name.nii" "fuzz/corpus/nifti_gzip/$name.nii"
    done
done
cp "$fx/edge/t1.nii.gz" fuzz/corpus/nifti/edge-t1.nii.gz   # the reader's own gzip path
# A case's tensors from the real preprocessing CLI, on an 8³ synthetic case.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cargo build --quiet -p brats-preprocessor --bin brats-preprocess
bin=target/debug/brats-preprocess
"$bin" synth --shape 8,8,8 --seed 1 --out "$tmp" >/dev/null
case_id=$(basename "$(ls "$tmp"/*-t1c.nii.gz)" -t1c.nii.gz)
"$bin" run --image "$tmp/$case_id"-{t1c,t1n,t2w,t2f}.nii.gz --label "$tmp/$case_id-seg.nii.gz" \
    --out fuzz/corpus/safetensors/synth-8.safetensors >/dev/null
"$bin" run --image "$tmp/$case_id"-{t1c,t1n,t2w,t2f}.nii.gz --out fuzz/corpus/safetensors/synth-8-nolabel.safetensors >/dev/null
# MONAI checkpoints: plain state dict and {"model": ...} (tests/monai/make_segresnet_fixtures.py).
cp tests/fixtures/monai/segresnet/small_state_dict.pt tests/fixtures/monai/segresnet/small_wrapped.pt fuzz/corpus/pt/
# Uploads to SegmentStream (length-delimited messages): valid 1-file and 4-file ones and broken
# ones, built by fuzz/entry.rs's upload_framing_seeds through the root test package.
cargo test --quiet --test fuzz_corpus -- --ignored --exact write_upload_framing_seeds >/dev/null
echo "seeded: $(for t in nifti nifti_gzip safetensors pt upload_framing; do echo -n "$t $(ls fuzz/corpus/$t | wc -l)  "; done)"
