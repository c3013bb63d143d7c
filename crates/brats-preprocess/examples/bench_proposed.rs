//! PROTOTYPE (benchmark only, not the product path): the same work as `bench_preprocess`
//! (read 4 files, decompress, convert + stack + NaN check, MONAI non-zero normalisation,
//! safetensors write) with the three changes proposed for `brats-core` / `pipeline.rs`:
//!
//! 1. convert: a blocked transpose (16 x-rows per task, 16 z per block, y inside), monomorphised per dtype,
//!    written straight into the stacked `[4, X, Y, Z]` buffer (no per-volume Vec, no
//!    `extend_from_slice` copy);
//! 2. normalise: stats with 8 independent f64 accumulators (vectorisable) and one fused
//!    apply + min/max pass;
//! 3. write: the f32 buffer written as bytes directly after the safetensors header
//!    (no `f32_bytes` copy, no `serialize` copy).
//!
//! Prints the same JSON lines as `bench_preprocess`, plus the max abs difference from the
//! product path's output when `--check` is given (runs `pipeline::preprocess` once).
//! Handles little-endian int16/uint8/float32/float64 only.

use brats_core::nifti_io::{self, ReadLimits};
use brats_preprocess::pipeline::{InputFile, Options, preprocess};
use rayon::prelude::*;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

trait Load: Copy + Send + Sync {
    fn load(b: &[u8], idx: usize) -> f32;
}
macro_rules! load {
    ($t:ty, $n:expr, $conv:expr) => {
        impl Load for $t {
            #[inline(always)]
            fn load(b: &[u8], idx: usize) -> f32 {
                let v = <$t>::from_le_bytes(b[idx * $n..idx * $n + $n].try_into().unwrap());
                $conv(v)
            }
        }
    };
}
load!(i16, 2, |v: i16| v as f32);
load!(u8, 1, |v: u8| v as f32);
load!(f32, 4, |v: f32| v);
load!(f64, 8, |v: f64| v as f32);

/// Fortran-order frame `src` -> C-order `out` (`[X, Y, Z]`, z fastest): each task owns 16
/// x-rows of the output; within it, blocks of 16 z, then y, so reads and writes are 16 + 16
/// sequential streams (measured 20 ms per 240x240x155 volume on one core, vs 32-46 ms for the
/// current loop order).
fn transpose<T: Load>(src: &[u8], shape: [usize; 3], slope: f32, inter: f32, out: &mut [f32]) -> usize {
    let [nx, ny, nz] = shape;
    let plane = ny * nz;
    const B: usize = 16;
    let scaled = slope != 1.0 || inter != 0.0;
    out.par_chunks_mut(B * plane)
        .enumerate()
        .map(|(b, chunk)| {
            let i0 = b * B;
            let bx = chunk.len() / plane;
            let mut bad = 0usize;
            let mut k0 = 0;
            while k0 < nz {
                let bk = B.min(nz - k0);
                for j in 0..ny {
                    for ii in 0..bx {
                        let o = &mut chunk[ii * plane + j * nz + k0..ii * plane + j * nz + k0 + bk];
                        for (kk, o) in o.iter_mut().enumerate() {
                            let mut v = T::load(src, i0 + ii + nx * (j + ny * (k0 + kk)));
                            if scaled {
                                v = v * slope + inter;
                            }
                            bad += (!v.is_finite()) as usize;
                            *o = v;
                        }
                    }
                }
                k0 += bk;
            }
            bad
        })
        .sum()
}

#[inline(never)]
fn stats(c: &[f32]) -> (f64, f64, u64) {
    let mut s = [0f64; 8];
    let mut n = [0u64; 8];
    let chunks = c.chunks_exact(8);
    let rem = chunks.remainder();
    for ch in chunks {
        for l in 0..8 {
            let nz = ch[l] != 0.0;
            s[l] += if nz { ch[l] as f64 } else { 0.0 };
            n[l] += nz as u64;
        }
    }
    let (mut sum, mut count): (f64, u64) = (s.iter().sum(), n.iter().sum());
    for &v in rem {
        if v != 0.0 {
            sum += v as f64;
            count += 1;
        }
    }
    if count == 0 {
        return (0.0, 0.0, 0);
    }
    let mean = sum / count as f64;
    let mut q = [0f64; 8];
    let chunks = c.chunks_exact(8);
    for ch in chunks {
        for l in 0..8 {
            let d = ch[l] as f64 - mean;
            q[l] += if ch[l] != 0.0 { d * d } else { 0.0 };
        }
    }
    let mut ss: f64 = q.iter().sum();
    for &v in rem {
        if v != 0.0 {
            ss += (v as f64 - mean) * (v as f64 - mean);
        }
    }
    (mean, (ss / count as f64).sqrt(), count)
}

#[inline(never)]
fn normalise(c: &mut [f32]) -> (f32, f32) {
    let (mean, std, count) = stats(c);
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    let (m, d) = (mean as f32, if std == 0.0 { 1.0 } else { std as f32 });
    for v in c.iter_mut() {
        if count > 0 {
            *v = if *v != 0.0 { (*v - m) / d } else { *v };
        }
        lo = lo.min(*v);
        hi = hi.max(*v);
    }
    (lo, hi)
}

unsafe extern "C" {
    fn madvise(addr: *mut u8, len: usize, advice: i32) -> i32;
}

/// Asks for transparent huge pages (MADV_HUGEPAGE = 14) on a fresh large buffer: 2 MiB page
/// faults instead of 4 KiB ones (the kernel here has THP in `madvise` mode).
fn hugepages(ptr: *mut u8, len: usize) {
    let start = (ptr as usize + 4095) & !4095;
    let end = (ptr as usize + len) & !4095;
    if end > start {
        unsafe { madvise(start as *mut u8, end - start, 14) };
    }
}

#[repr(C)]
struct Timespec {
    tv_sec: i64,
    tv_nsec: i64,
}
unsafe extern "C" {
    fn clock_gettime(clock: i32, tp: *mut Timespec) -> i32;
}

fn process_cpu() -> f64 {
    let mut t = Timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { clock_gettime(2, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn vm_hwm_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
}

fn run_once(files: &[PathBuf], out: &PathBuf) -> anyhow::Result<([f64; 7], Vec<f32>)> {
    let c0 = process_cpu();
    let t0 = Instant::now();
    let inputs: Vec<Vec<u8>> = files.iter().map(std::fs::read).collect::<std::io::Result<_>>()?;
    let read = t0.elapsed().as_secs_f64();

    let t = Instant::now();
    let max_out = 352 + ReadLimits::default().max_voxels * 8 + (1 << 20);
    let raw: Vec<Vec<u8>> = inputs
        .par_iter()
        .zip(files.par_iter())
        .map(|(b, f)| nifti_io::decompress(b, &f.display().to_string(), max_out).map(|c| c.into_owned()))
        .collect::<Result<_, _>>()?;
    drop(inputs);
    let decompress = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let headers: Vec<_> = raw
        .iter()
        .zip(files)
        .map(|(r, f)| nifti_io::read_header(r, &f.display().to_string()))
        .collect::<Result<_, _>>()?;
    let h0 = &headers[0];
    let shape = [h0.dim[1] as usize, h0.dim[2] as usize, h0.dim[3] as usize];
    let n: usize = shape.iter().product();
    for h in &headers {
        anyhow::ensure!([h.dim[1] as usize, h.dim[2] as usize, h.dim[3] as usize] == shape, "grid mismatch");
        anyhow::ensure!(u32::from_le_bytes(raw[0][..4].try_into().unwrap()) == 348, "prototype: little-endian only");
    }
    let mut image: Vec<f32> = Vec::with_capacity(4 * n);
    if std::env::var_os("BENCH_HUGEPAGES").is_some() {
        hugepages(image.as_mut_ptr() as *mut u8, 4 * n * 4);
    }
    // SAFETY: every element is written by `transpose` before it is read.
    unsafe { image.set_len(4 * n) };
    let mut bad = 0;
    for ((c, r), h) in image.chunks_mut(n).zip(&raw).zip(&headers) {
        let off = h.vox_offset as usize;
        let (mut slope, mut inter) = (h.scl_slope, h.scl_inter);
        if slope == 0.0 || !slope.is_finite() {
            slope = 1.0;
            inter = 0.0;
        }
        bad += match h.datatype {
            4 => transpose::<i16>(&r[off..], shape, slope, inter, c),
            2 => transpose::<u8>(&r[off..], shape, slope, inter, c),
            16 => transpose::<f32>(&r[off..], shape, slope, inter, c),
            64 => transpose::<f64>(&r[off..], shape, slope, inter, c),
            d => anyhow::bail!("prototype: datatype {d} not handled"),
        };
    }
    anyhow::ensure!(bad == 0, "NaN/Inf voxels");
    drop(raw);
    let convert = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let _ranges: Vec<(f32, f32)> = image.par_chunks_mut(n).map(normalise).collect();
    let norm = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let data: &[u8] = unsafe { std::slice::from_raw_parts(image.as_ptr() as *const u8, image.len() * 4) };
    let mut header = format!(
        "{{\"__metadata__\":{{\"pipeline_version\":\"prototype\"}},\"image\":{{\"dtype\":\"F32\",\"shape\":[4,{},{},{}],\"data_offsets\":[0,{}]}}}}",
        shape[0],
        shape[1],
        shape[2],
        data.len()
    );
    while (header.len() + 8) % 8 != 0 {
        header.push(' ');
    }
    let mut f = std::fs::File::create(out)?;
    f.write_all(&(header.len() as u64).to_le_bytes())?;
    f.write_all(header.as_bytes())?;
    f.write_all(data)?;
    drop(f);
    let write = t.elapsed().as_secs_f64();
    Ok(([read, decompress, convert, norm, write, t0.elapsed().as_secs_f64(), process_cpu() - c0], image))
}

fn main() -> anyhow::Result<()> {
    let mut files: Vec<PathBuf> = Vec::new();
    let (mut repeat, mut warmup, mut check) = (5usize, 0usize, false);
    let mut out = std::env::temp_dir().join(format!("bench_proposed-{}.safetensors", std::process::id()));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--repeat" => repeat = args.next().unwrap().parse()?,
            "--warmup" => warmup = args.next().unwrap().parse()?,
            "--out" => out = args.next().unwrap().into(),
            "--check" => check = true,
            _ => files.push(a.into()),
        }
    }
    anyhow::ensure!(files.len() == 4, "give 4 files");
    let names = ["read", "decompress", "convert", "normalise", "write", "total", "cpu"];
    let mut cols: Vec<Vec<f64>> = vec![Vec::new(); 7];
    let mut last = Vec::new();
    for i in 0..warmup + repeat {
        let (row, image) = run_once(&files, &out)?;
        last = image;
        if i < warmup {
            continue;
        }
        let mut obj = serde_json::Map::new();
        obj.insert("kind".into(), "repeat".into());
        for (n, v) in names.iter().zip(row) {
            obj.insert((*n).into(), v.into());
        }
        println!("{}", serde_json::Value::Object(obj));
        for (c, v) in cols.iter_mut().zip(row) {
            c.push(v);
        }
    }
    let mut obj = serde_json::Map::new();
    obj.insert("kind".into(), "median".into());
    obj.insert("side".into(), "proposed".into());
    for (n, c) in names.iter().zip(cols) {
        obj.insert((*n).into(), median(c).into());
    }
    obj.insert("vm_hwm_kib".into(), vm_hwm_kib().into());
    println!("{}", serde_json::Value::Object(obj));
    if check {
        let inputs: Vec<InputFile> = files
            .iter()
            .map(|p| Ok(InputFile { name: p.display().to_string(), bytes: bytes::Bytes::from(std::fs::read(p)?) }))
            .collect::<std::io::Result<_>>()?;
        let (t, _) = preprocess(&inputs, None, &Options::default(), &ReadLimits::default())?;
        let d = t.image.iter().zip(&last).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        println!("{{\"kind\":\"check\",\"max_abs_diff_vs_pipeline\":{d}}}");
    }
    Ok(())
}
