//! Benchmark of the preprocessing path on one case: read the 4 modality files, decompress,
//! convert + validate, normalise (the exact `pipeline::preprocess` the CLI and service use),
//! then encode the safetensors bytes and write them.
//!
//! ```text
//! cargo run --release -p brats-preprocess --example bench_preprocess -- \
//!     T1C T1 T2 FLAIR [--repeat N] [--warmup W] [--out OUT.safetensors]
//! ```
//!
//! `--warmup W` runs W untimed passes first. Stages: `read` (the 4 files into memory),
//! `decompress`, `convert` (header parse, type conversion, stacking, grid checks), `normalise`,
//! `write` (encode the safetensors bytes and write the file; `encode` is its first part); `total` is all of them (wall
//! clock); `cpu` is the CPU time (user + system, all threads) the process spent on them.
//! Prints one JSON line per timed repeat (`"kind":"repeat"`), then one with the medians
//! (`"kind":"median"`) and the process's peak RSS (`VmHWM`, KiB).

use brats_core::nifti_io::ReadLimits;
use brats_preprocess::pipeline::{InputFile, Options, preprocess};
use std::path::PathBuf;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// CPU seconds (user + system, all threads) this process has used: CLOCK_PROCESS_CPUTIME_ID.
fn process_cpu() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

fn vm_hwm_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
}

fn main() -> anyhow::Result<()> {
    let mut files: Vec<PathBuf> = Vec::new();
    let mut repeat = 5usize;
    let mut warmup = 0usize;
    let mut out: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--repeat" => repeat = args.next().ok_or_else(|| anyhow::anyhow!("--repeat needs N"))?.parse()?,
            "--warmup" => warmup = args.next().ok_or_else(|| anyhow::anyhow!("--warmup needs N"))?.parse()?,
            "--out" => out = Some(args.next().ok_or_else(|| anyhow::anyhow!("--out needs a path"))?.into()),
            "-h" | "--help" => {
                eprintln!("usage: bench_preprocess T1C T1 T2 FLAIR [--repeat N] [--warmup W] [--out OUT.safetensors]");
                return Ok(());
            }
            _ => files.push(a.into()),
        }
    }
    anyhow::ensure!(files.len() == 4, "give 4 files (T1c, T1, T2, FLAIR), got {}", files.len());
    anyhow::ensure!(repeat >= 1, "--repeat must be at least 1");
    let out = out
        .unwrap_or_else(|| std::env::temp_dir().join(format!("bench_preprocess-{}.safetensors", std::process::id())));
    let options = Options::default();
    let limits = ReadLimits::default();

    let names = ["read", "decompress", "convert", "normalise", "write", "encode", "total", "cpu"];
    let mut cols: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut shape = [0usize; 3];
    for i in 0..warmup + repeat {
        let c0 = process_cpu();
        let t0 = Instant::now();
        let inputs: Vec<InputFile> = files
            .iter()
            .map(|p| Ok(InputFile { name: p.display().to_string(), bytes: bytes::Bytes::from(std::fs::read(p)?) }))
            .collect::<std::io::Result<_>>()?;
        let read = t0.elapsed().as_secs_f64();
        let (tensors, timings) = preprocess(&inputs, None, &options, &limits)?;
        drop(inputs);
        let tw = Instant::now();
        let (encoded, metadata) = tensors.encode()?;
        let encode = tw.elapsed().as_secs_f64();
        // As the local store writes an object: each part in turn, no joined buffer.
        let mut file = std::fs::File::create(&out)?;
        for part in &encoded.parts {
            std::io::Write::write_all(&mut file, part)?;
        }
        drop(file);
        let write = tw.elapsed().as_secs_f64();
        let total = t0.elapsed().as_secs_f64();
        let cpu = process_cpu() - c0;
        shape = metadata.shape;
        drop(encoded);
        if i < warmup {
            continue;
        }
        let r = i - warmup;
        let row = [
            read,
            timings.decompress,
            timings.convert,
            timings.normalise + timings.crop_augment,
            write,
            encode,
            total,
            cpu,
        ];
        for (c, v) in cols.iter_mut().zip(row) {
            c.push(v);
        }
        let mut obj = serde_json::Map::new();
        obj.insert("kind".into(), "repeat".into());
        obj.insert("repeat".into(), r.into());
        for (n, v) in names.iter().zip(row) {
            obj.insert((*n).into(), v.into());
        }
        println!("{}", serde_json::Value::Object(obj));
    }
    let mut obj = serde_json::Map::new();
    obj.insert("kind".into(), "median".into());
    obj.insert("side".into(), "ours".into());
    obj.insert("repeats".into(), repeat.into());
    obj.insert("shape".into(), serde_json::json!([4, shape[0], shape[1], shape[2]]));
    for (n, c) in names.iter().zip(cols) {
        obj.insert((*n).into(), median(c).into());
    }
    obj.insert("threads".into(), rayon::current_num_threads().into());
    obj.insert("vm_hwm_kib".into(), vm_hwm_kib().into());
    obj.insert("out".into(), out.display().to_string().into());
    println!("{}", serde_json::Value::Object(obj));
    Ok(())
}
