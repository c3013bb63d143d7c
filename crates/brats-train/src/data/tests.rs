//! Tests of the data path; they share the synthetic cases and loader settings built here.

use super::augment::crop_flip_map;
use super::sampler::{Mt19937, torch_randperm};
use super::*;
use brats_core::nifti_io::{ReadLimits, write_nifti};
use brats_preprocess::pipeline::{self, InputFile};
use brats_preprocess::synthetic::{self, SyntheticSpec};
use std::mem::MaybeUninit;
use std::sync::Arc;
use std::time::{Duration, Instant};

use brats_core::metadata::CropBox;
use brats_core::store::{StoreUri, Stores};
use brats_core::tensors::CaseTensors;
use brats_preprocess::pipeline::{Draws, Options};
use brats_preprocess::transforms;

fn input(name: &str, data: &[f32], shape: [usize; 3], affine: &[[f64; 4]; 4]) -> InputFile {
    InputFile { name: name.into(), bytes: write_nifti(data, shape, affine, None, None).unwrap().into() }
}

/// A synthetic case through the real pipeline with `options` (default: whole volume).
fn tensors(shape: [usize; 3], seed: u64, options: &Options) -> CaseTensors {
    let c = synthetic::generate(&SyntheticSpec::new(shape, seed));
    let images: Vec<InputFile> =
        (0..4).map(|m| input(&format!("m{m}.nii"), &c.modalities[m], shape, &c.affine)).collect();
    let label: Vec<f32> = c.label.iter().map(|&v| v as f32).collect();
    let label = input("seg.nii", &label, shape, &c.affine);
    pipeline::preprocess(&images, Some(&label), options, &ReadLimits::default()).unwrap().0
}

fn case(shape: [usize; 3], seed: u64) -> CachedCase {
    CachedCase::from_tensors(format!("c{seed}"), tensors(shape, seed, &Options::default())).unwrap()
}

fn cases(n: usize, shape: [usize; 3]) -> Arc<Cases> {
    Arc::new(Cases::from((0..n as u64).map(|s| case(shape, s + 1)).collect::<Vec<_>>()))
}

/// `Loader::start`'s settings, so tests can vary one at a time.
#[derive(Clone, Copy)]
struct Cfg {
    batch_size: usize,
    augment: Augment,
    job_seed: u64,
    workers: usize,
    prefetch: usize,
}

impl Cfg {
    fn start(&self, cases: &Arc<Cases>, indices: &[usize], epoch: u64) -> Result<Loader> {
        let c = *self;
        Loader::start(
            cases.clone(),
            indices.to_vec(),
            c.batch_size,
            c.augment,
            c.job_seed,
            epoch,
            c.workers,
            c.prefetch,
        )
    }
}

fn config(workers: usize) -> Cfg {
    Cfg { batch_size: 2, augment: Augment::bundle([16, 16, 16]), job_seed: 42, workers, prefetch: 2 }
}

/// A batch as plain values: image, label, indices, image shape.
type Plain = (Vec<f32>, Vec<f32>, Vec<usize>, Vec<i64>);

fn collect(loader: Loader) -> Vec<Plain> {
    loader
        .map(|b| {
            let b = b.unwrap();
            let image = Vec::<f32>::try_from(b.image.flatten(0, -1)).unwrap();
            let label = Vec::<f32>::try_from(b.label.flatten(0, -1)).unwrap();
            (image, label, b.indices, b.image.size())
        })
        .collect()
}

/// `sample` is the pipeline's random crop + augmentation, bit for bit, for the same seed.
#[test]
fn sample_equals_the_preprocessing_pipeline() {
    let shape = [24, 20, 18];
    let c = case(shape, 3);
    let augment = Augment::bundle([16, 12, 18]);
    for seed in [0u64, 1, 99, 12345] {
        let options = Options { seed, ..augment.options(seed) };
        let want = tensors(shape, 3, &options);
        let got = sample(&c, &augment, seed).unwrap();
        assert_eq!(got.image, want.image, "seed {seed}");
        let want_label: Vec<f32> = want.label.unwrap().into_iter().map(f32::from).collect();
        assert_eq!(got.label, want_label, "seed {seed}");
    }
}

#[test]
fn loader_is_deterministic_and_independent_of_workers() {
    let cases = cases(5, [20, 18, 17]);
    let indices = vec![4, 0, 3, 1, 2];
    let run = |workers| collect(config(workers).start(&cases, &indices, 3).unwrap());
    let one = run(1);
    assert_eq!(one, run(1));
    assert_eq!(one, run(3));
    assert_eq!(one, run(0));
    // Another epoch draws other augmentations.
    let other = collect(config(2).start(&cases, &indices, 4).unwrap());
    assert_ne!(one[0].0, other[0].0);
}

#[test]
fn loader_keeps_sampler_order_and_the_partial_last_batch() {
    let cases = cases(4, [12, 12, 12]);
    let indices = vec![3, 1, 1, 0, 2, 3, 0];
    let mut cfg = config(3);
    cfg.batch_size = 3;
    cfg.augment = Augment::center([8, 8, 8]);
    cfg.prefetch = 1;
    let loader = cfg.start(&cases, &indices, 0).unwrap();
    assert_eq!(loader.num_batches(), 3);
    let batches = collect(loader);
    let got: Vec<Vec<usize>> = batches.iter().map(|b| b.2.clone()).collect();
    assert_eq!(got, vec![vec![3, 1, 1], vec![0, 2, 3], vec![0]]);
    assert_eq!(batches[0].3, vec![3, 4, 8, 8, 8]);
    assert_eq!(batches[2].3, vec![1, 4, 8, 8, 8]);
    // Each item is that case's own sample (centre crop, no randomness).
    let n = 4 * 512;
    for (b, want) in batches.iter().zip([[3usize, 1, 1], [0, 2, 3], [0, 0, 0]]) {
        for (k, &i) in b.2.iter().enumerate() {
            assert_eq!(b.0[k * n..(k + 1) * n], sample(&cases.get(i).unwrap(), &cfg.augment, 0).unwrap().image[..]);
            assert_eq!(i, want[k]);
        }
    }
}

/// The one-pass kernel equals the library's crop, flips, scale and shift run one after
/// the other, bit for bit, for windows inside, across and outside the volume.
#[test]
fn one_pass_equals_the_library_transforms() {
    let shape = [5, 4, 6];
    let data: Vec<f32> = (0..2 * 120).map(|i| if i % 7 == 0 { -0.0 } else { (i as f32 - 100.0) * 0.37 }).collect();
    let boxes = [
        CropBox { start: [0, 0, 0], size: [5, 4, 6] },
        CropBox { start: [-2, 1, -3], size: [8, 2, 4] },
        CropBox { start: [3, -1, 4], size: [4, 7, 5] },
        CropBox { start: [-9, 0, 0], size: [3, 4, 6] },
        CropBox { start: [0, 0, 7], size: [5, 4, 2] },
        CropBox { start: [1, 1, -8], size: [2, 2, 3] },
        CropBox { start: [1, 0, -1], size: [3, 4, 9] },
    ];
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for b in boxes {
        for mask in 0..8 {
            let flips = [mask & 1 != 0, mask & 2 != 0, mask & 4 != 0];
            for (scale, shift) in [(None, None), (Some(-0.0731), None), (None, Some(0.0917)), (Some(0.05), Some(-0.02))]
            {
                let mut want = transforms::crop(&data, 2, shape, &b);
                for (axis, _) in flips.iter().enumerate().filter(|(_, f)| **f) {
                    transforms::flip(&mut want, 2, b.size, axis);
                }
                if let Some(s) = scale {
                    transforms::scale_intensity(&mut want, s);
                }
                if let Some(o) = shift {
                    transforms::shift_intensity(&mut want, o);
                }
                let f = |v: f32| {
                    let v = scale.map_or(v, |s| v * (1.0 + s) as f32);
                    shift.map_or(v, |o| v + o as f32)
                };
                // NaN everywhere first, so an element the pass forgot would show.
                let mut got = vec![MaybeUninit::new(f32::NAN); want.len()];
                crop_flip_map(&data, 2, shape, &b, flips, &mut got, f);
                // SAFETY: every element was initialised (to NaN) before the pass.
                let got: Vec<f32> = got.iter().map(|v| unsafe { v.assume_init() }).collect();
                assert_eq!(bits(&got), bits(&want), "{b:?} flips {flips:?} scale {scale:?} shift {shift:?}");
            }
        }
    }
}

#[test]
fn crops_larger_than_the_case_are_zero_padded() {
    let shape = [6, 5, 4];
    let c = case(shape, 7);
    let n = 6 * 5 * 4;
    for random_crop in [false, true] {
        let augment = Augment { random_crop, ..Augment::center([10, 5, 3]) };
        // Several seeds: the random crop's z start varies, x is padded 2 before and 2 after.
        for seed in 0..6 {
            let s = sample(&c, &augment, seed).unwrap();
            let z0 = if random_crop {
                Draws::draw(&augment.options(seed), shape).crop_start[2].min(1)
            } else {
                shape[2] / 2 - 3 / 2
            };
            assert_eq!(s.image.len(), 4 * 10 * 5 * 3);
            for ch in 0..4 {
                for x in 0..10 {
                    for y in 0..5 {
                        for z in 0..3 {
                            let got = s.image[((ch * 10 + x) * 5 + y) * 3 + z];
                            let want = if (2..8).contains(&x) {
                                c.image[ch * n + ((x - 2) * 5 + y) * 4 + z + z0]
                            } else {
                                0.0
                            };
                            assert_eq!(got, want, "ch {ch} x {x} y {y} z {z} random {random_crop}");
                        }
                    }
                }
            }
        }
    }
    // Larger than the case on every axis: the whole case sits in the middle.
    let s = sample(&c, &Augment::center([8, 8, 8]), 0).unwrap();
    assert_eq!(s.image.iter().filter(|&&v| v != 0.0).count(), c.image.iter().filter(|&&v| v != 0.0).count());
    assert_eq!(s.image[(3 * 8 + 4) * 8 + 3], c.image[(2 * 5 + 3) * 4 + 1]);
}

#[test]
fn labels_stay_binary_and_follow_the_flips() {
    let shape = [16, 14, 12];
    let c = case(shape, 5);
    let label = c.label.as_ref().unwrap();
    assert!(label.contains(&1));
    let augment = Augment { flip_prob: 1.0, ..Augment::bundle([16, 14, 12]) };
    let s = sample(&c, &augment, 9).unwrap();
    assert!(s.label.iter().all(|&v| v == 0.0 || v == 1.0));
    let n = 16 * 14 * 12;
    for ch in 0..3 {
        for x in 0..16 {
            for y in 0..14 {
                for z in 0..12 {
                    let src = label[ch * n + ((15 - x) * 14 + (13 - y)) * 12 + (11 - z)] as f32;
                    assert_eq!(s.label[ch * n + (x * 14 + y) * 12 + z], src);
                }
            }
        }
    }
    // Image: flipped, then x · (1 + f) + o with the drawn f and o.
    let d = Draws::draw(&augment.options(9), shape);
    assert_eq!(d.flips, [true; 3]);
    let want = (c.image[n - 1] * (1.0 + d.scale) as f32) + d.shift as f32;
    assert_eq!(s.image[0], want);
}

#[test]
fn sample_seed_mixes_every_input() {
    let s = sample_seed(1, 2, 3);
    assert_eq!(s, sample_seed(1, 2, 3));
    let others = [sample_seed(0, 2, 3), sample_seed(1, 3, 3), sample_seed(1, 2, 4), sample_seed(1, 3, 2)];
    assert!(others.iter().all(|&o| o != s));
    let mut all: Vec<u64> = (0..50).flat_map(|e| (0..50).map(move |i| sample_seed(7, e, i))).collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 2500);
}

#[test]
fn mersenne_twister_and_randperm_match_torch() {
    // std::mt19937 with its default seed: the 10000th output is 4123659995 (C++ standard).
    let mut g = Mt19937::new(5489);
    assert_eq!(g.next_u32(), 3_499_211_612);
    let mut g = Mt19937::new(5489);
    assert_eq!((0..10_000).map(|_| g.next_u32()).last(), Some(4_123_659_995));
    // torch.randperm(n, generator=torch.Generator().manual_seed(s)).tolist(), pinned from
    // libtorch's randperm after torch::manual_seed(s).
    for (n, seed, want) in TORCH_RANDPERM {
        assert_eq!(torch_randperm(*n, *seed), *want, "n {n} seed {seed}");
    }
}

/// Pinned outputs of libtorch's CPU randperm (see `mersenne_twister_and_randperm_match_torch`).
const TORCH_RANDPERM: &[(usize, u64, &[usize])] = &[
    (10, 0, &[4, 1, 7, 5, 3, 9, 0, 8, 6, 2]),
    (7, 11, &[4, 0, 2, 6, 3, 1, 5]),
    (16, 12, &[11, 14, 8, 1, 5, 13, 15, 0, 12, 10, 9, 3, 2, 6, 4, 7]),
    (25, 3, &[11, 9, 16, 6, 0, 5, 10, 18, 21, 12, 14, 24, 17, 7, 23, 4, 19, 3, 15, 8, 2, 22, 20, 1, 13]),
    (1, 5, &[0]),
    // torch keeps the seed's low 32 bits: 2^32 + 5 seeds like 5.
    (3, 4_294_967_301, &[2, 1, 0]),
];

#[test]
fn sampler_shards_partition_the_padded_permutation() {
    // Hand-computed from torch's rule: 5 items over 2 ranks → total 6, padded [0,1,2,3,4,0].
    let s = |len, world, rank| DistributedSampler::new(len, world, rank, false, 0).unwrap();
    assert_eq!(s(5, 2, 0).indices(0), vec![0, 2, 4]);
    assert_eq!(s(5, 2, 1).indices(0), vec![1, 3, 0]);
    // 2 items over 5 ranks: pad 3 > len 2, so whole repeats: [0,1,0,1,0].
    let shards: Vec<Vec<usize>> = (0..5).map(|r| s(2, 5, r).indices(0)).collect();
    assert_eq!(shards, vec![vec![0], vec![1], vec![0], vec![1], vec![0]]);
    assert_eq!(s(2, 5, 0).num_samples(), 1);
    assert!(s(0, 3, 1).indices(0).is_empty());
    assert!(DistributedSampler::new(4, 2, 2, true, 0).is_err());

    // Shuffled: interleaving the ranks' shards rebuilds the wrapped permutation of seed + epoch.
    for (len, world) in [(10usize, 3usize), (7, 7), (3, 4), (16, 4)] {
        for epoch in [0u64, 1, 5] {
            let perm = torch_randperm(len, 11 + epoch);
            let shards: Vec<Vec<usize>> =
                (0..world).map(|r| DistributedSampler::new(len, world, r, true, 11).unwrap().indices(epoch)).collect();
            let ns = len.div_ceil(world);
            assert!(shards.iter().all(|s| s.len() == ns));
            let rebuilt: Vec<usize> = (0..ns * world).map(|p| shards[p % world][p / world]).collect();
            let want: Vec<usize> = (0..ns * world).map(|p| perm[p % len]).collect();
            assert_eq!(rebuilt, want, "len {len} world {world} epoch {epoch}");
            let mut sorted = perm.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..len).collect::<Vec<_>>());
        }
    }
    let a = DistributedSampler::new(20, 1, 0, true, 0).unwrap();
    assert_ne!(a.indices(0), a.indices(1));
    assert_eq!(validation_shard(7, 3, 0), vec![0, 3, 6]);
    assert_eq!(validation_shard(7, 3, 2), vec![2, 5]);
    assert!(validation_shard(2, 3, 2).is_empty());
}

#[test]
fn dropping_a_loader_mid_epoch_joins_its_threads() {
    let cases = cases(2, [20, 20, 20]);
    let indices: Vec<usize> = (0..200).map(|i| i % 2).collect();
    let mut cfg = config(3);
    cfg.batch_size = 1;
    cfg.prefetch = 4;
    let mut loader = cfg.start(&cases, &indices, 0).unwrap();
    loader.next().unwrap().unwrap();
    assert!(Arc::strong_count(&cases) > 1);
    let t = Instant::now();
    drop(loader);
    // Every worker held a reference through the shared state: all are gone after the drop.
    assert_eq!(Arc::strong_count(&cases), 1);
    assert!(t.elapsed() < Duration::from_secs(5), "drop took {:?}", t.elapsed());
}

#[test]
fn refuses_what_cannot_train() {
    let mut c = case([8, 8, 8], 1);
    c.label = None;
    let cases = Arc::new(Cases::from(vec![c.clone()]));
    assert!(matches!(config(1).start(&cases, &[0], 0), Err(DataError::MissingLabel { .. })));
    assert!(matches!(config(1).start(&cases, &[1], 0), Err(DataError::InvalidConfig(_))));
    assert!(matches!(sample(&c, &Augment::center([4, 4, 4]), 0), Err(DataError::MissingLabel { .. })));
    let mut cfg = config(1);
    cfg.batch_size = 0;
    assert!(cfg.start(&cases, &[], 0).is_err());
    let bad = Augment { flip_prob: 1.5, ..Augment::bundle([8, 8, 8]) };
    assert!(bad.validate().unwrap_err().to_string().contains("flip_prob"));
    let mut t = tensors([6, 6, 6], 1, &Options::default());
    t.image.pop();
    assert!(matches!(CachedCase::from_tensors("x", t), Err(DataError::InvalidCase { .. })));
    let mut t = tensors([6, 6, 6], 1, &Options::default());
    t.label.as_mut().unwrap()[3] = 2;
    assert!(CachedCase::from_tensors("x", t).unwrap_err().to_string().contains("label holds 2"));
    // An empty epoch is simply empty.
    let mut empty = config(2).start(&Arc::new(Cases::from(vec![case([8, 8, 8], 1)])), &[], 0).unwrap();
    assert!(empty.next().is_none());
}

#[test]
fn streamed_cases_give_the_same_batches_as_cases_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let stores = Arc::new(Stores::new(Default::default()));
    let mut entries = Vec::new();
    for s in 1..=3u64 {
        let path = dir.path().join(format!("c{s}.safetensors"));
        std::fs::write(&path, tensors([20, 18, 17], s, &Options::default()).to_bytes().unwrap()).unwrap();
        entries.push((format!("c{s}"), StoreUri::parse(path.to_str().unwrap()).unwrap()));
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let streamed = Arc::new(Cases::streamed(stores.clone(), rt.handle().clone(), entries.clone()));
    let in_memory = cases(3, [20, 18, 17]);
    assert!(streamed.is_streamed() && !in_memory.is_streamed());
    assert_eq!((streamed.len(), streamed.id(2)), (3, "c3"));
    let indices = vec![2, 0, 1, 1, 0, 2];
    for workers in [0, 2] {
        let got = collect(config(workers).start(&streamed, &indices, 5).unwrap());
        assert_eq!(got, collect(config(workers).start(&in_memory, &indices, 5).unwrap()), "{workers} workers");
    }
    // A case that disappears from the store fails its batch, naming the case; the loader
    // goes on with the next batch.
    std::fs::remove_file(dir.path().join("c1.safetensors")).unwrap();
    let mut cfg = config(1);
    cfg.batch_size = 1;
    let results: Vec<_> = cfg.start(&streamed, &[1, 0, 2], 0).unwrap().collect();
    assert!(results[0].is_ok() && results[2].is_ok());
    let e = results[1].as_ref().unwrap_err();
    assert!(matches!(e, DataError::Load { case, .. } if case == "c1"), "{e}");
    assert!(e.to_string().contains("c1"), "{e}");
    // A streamed case whose label is not 0/1 is refused when read, as in memory.
    let mut bad = tensors([6, 6, 6], 1, &Options::default());
    bad.label.as_mut().unwrap()[0] = 7;
    let path = dir.path().join("bad.safetensors");
    std::fs::write(&path, bad.to_bytes().unwrap()).unwrap();
    let one = Cases::streamed(
        stores,
        rt.handle().clone(),
        vec![("bad".into(), StoreUri::parse(path.to_str().unwrap()).unwrap())],
    );
    assert!(one.get(0).unwrap_err().to_string().contains("label holds 7"));
    assert!(matches!(one.get(1), Err(DataError::InvalidConfig(_))));
}

#[test]
fn case_cache_spellings() {
    for c in [CaseCache::Auto, CaseCache::Memory, CaseCache::Stream] {
        assert_eq!(CaseCache::parse(&c.to_string()).unwrap(), c);
    }
    assert!(CaseCache::parse("disk").unwrap_err().to_string().contains("auto, memory or stream"));
}

#[test]
fn loads_cases_from_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let stores = Stores::new(Default::default());
    let mut uris = Vec::new();
    for s in 1..=3u64 {
        let t = tensors([8, 7, 6], s, &Options::default());
        let path = dir.path().join(format!("c{s}.safetensors"));
        std::fs::write(&path, t.to_bytes().unwrap()).unwrap();
        uris.push((format!("c{s}"), StoreUri::parse(path.to_str().unwrap()).unwrap()));
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let loaded = rt.block_on(load_cases(&stores, &uris)).unwrap();
    assert_eq!(loaded.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), ["c1", "c2", "c3"]);
    assert_eq!(*loaded[1].image, tensors([8, 7, 6], 2, &Options::default()).image);
    assert_eq!(loaded[0].shape, [8, 7, 6]);
    uris.push(("gone".into(), StoreUri::parse(dir.path().join("gone").to_str().unwrap()).unwrap()));
    let e = rt.block_on(load_cases(&stores, &uris)).unwrap_err();
    assert!(matches!(&e, DataError::Load { case, .. } if case == "gone"), "{e}");
}

/// Sampling throughput at the size the brief asks about: run with
/// `cargo test -p brats-train --lib data::tests::sampling_speed -- --ignored --nocapture`.
#[test]
#[ignore]
fn sampling_speed() {
    let cases = cases(2, [128, 128, 128]);
    let augment = Augment::bundle([96, 96, 96]);
    let t = Instant::now();
    for i in 0..20 {
        sample(&cases.get(i % 2).unwrap(), &augment, i as u64).unwrap();
    }
    println!("sample(), caller's thread: {:.1} ms each", t.elapsed().as_secs_f64() * 1e3 / 20.0);
    let indices: Vec<usize> = (0..200).map(|i| i % 2).collect();
    for workers in [0, 1, 2, 2] {
        let cfg = Cfg { batch_size: 1, augment, job_seed: 1, workers, prefetch: 4 };
        let t = Instant::now();
        let mut loader = cfg.start(&cases, &indices, 0).unwrap();
        let mut n = 0;
        for batch in loader.by_ref() {
            batch.unwrap();
            n += 1;
        }
        let dt = t.elapsed().as_secs_f64();
        println!(
            "loader, {workers} workers, batch 1, 128³ → 96³: {:.1} samples/s (consumer waited {:.0} % of the time)",
            n as f64 / dt,
            100.0 * loader.wait_seconds() / dt
        );
    }
}
