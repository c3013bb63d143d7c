//! The training data path: preprocessed cases held in memory or streamed from the store, the
//! bundle's augmentation drawn
//! per sample from a seed, torch's `DistributedSampler`, and loader threads that build batches
//! ahead of the training loop.
//!
//! Reproducibility is by construction rather than by scheduling: every sample's augmentation
//! comes from [`sample_seed`]`(job_seed, epoch, dataset_index)`, the sampler's permutation from
//! `(seed, epoch)` alone, and the loader hands batches out in sampler order whichever thread
//! finished first. A resumed job, a different worker count, or another rank asking for the same
//! `(epoch, index)` therefore sees the same voxels.

use brats_core::error::CoreError;
use brats_core::metadata::CropBox;
use brats_core::store::{StoreUri, Stores};
use brats_core::tensors::CaseTensors;
use brats_preprocess::pipeline::{CropMode, Draws, Options};
use brats_preprocess::transforms;
use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Image channels (T1c, T1, T2, FLAIR).
pub const IMAGE_CHANNELS: usize = 4;
/// Label channels (TC, WT, ET).
pub const LABEL_CHANNELS: usize = 3;

/// How many cases [`load_cases`] fetches and decodes at once: enough to overlap store latency
/// with decoding without holding many ~150 MB undecoded objects in memory.
const LOAD_CONCURRENCY: usize = 4;

/// Errors of the data path; each names the case or setting and the fix.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Reading or decoding a case's tensors failed.
    #[error("case '{case}': {source}")]
    Load {
        /// The case id.
        case: String,
        /// The store or format error, which names the object.
        #[source]
        source: CoreError,
    },
    /// A case's buffers do not agree with its shape, or its label is not binary.
    #[error("case '{case}': {reason}")]
    InvalidCase {
        /// The case id.
        case: String,
        /// What is inconsistent.
        reason: String,
    },
    /// A training case without label channels.
    #[error("case '{case}' has no label; training needs the TC/WT/ET label channels (preprocess it with its label)")]
    MissingLabel {
        /// The case id.
        case: String,
    },
    /// A sampler, augmentation or loader setting no caller could mean.
    #[error("{0}")]
    InvalidConfig(String),
    /// A loader worker panicked or a blocking decode task failed.
    #[error("data loader: {0}")]
    Worker(String),
    /// Building a batch tensor failed.
    #[error("batch tensor: {0}")]
    Tensor(#[from] tch::TchError),
}

/// Result alias of this module.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// A preprocessed case held in memory for the whole job; the buffers are shared, not copied,
/// between the loader threads.
#[derive(Debug, Clone)]
pub struct CachedCase {
    /// Case id (for logs and errors).
    pub id: String,
    /// Normalised image `[4, X, Y, Z]`, C order.
    pub image: Arc<Vec<f32>>,
    /// Label channels TC, WT, ET as 0/1, `[3, X, Y, Z]`, C order.
    pub label: Option<Arc<Vec<u8>>>,
    /// X, Y, Z.
    pub shape: [usize; 3],
}

impl CachedCase {
    /// Takes a decoded case, checking that its buffers match its shape and its label is 0/1.
    pub fn from_tensors(id: impl Into<String>, tensors: CaseTensors) -> Result<Self> {
        let case = CachedCase {
            id: id.into(),
            shape: tensors.metadata.shape,
            image: Arc::new(tensors.image),
            label: tensors.label.map(Arc::new),
        };
        case.validate()?;
        if let Some(label) = &case.label
            && let Some(v) = label.iter().find(|&&v| v > 1)
        {
            return Err(DataError::InvalidCase {
                case: case.id,
                reason: format!("label holds {v}; label channels must be 0/1 (TC, WT, ET)"),
            });
        }
        Ok(case)
    }

    /// Voxels per channel.
    pub fn voxels(&self) -> usize {
        self.shape.iter().product()
    }

    /// Checks the buffer lengths against the shape (cheap: no pass over the voxels).
    pub fn validate(&self) -> Result<()> {
        let n = self.voxels();
        let invalid = |reason: String| Err(DataError::InvalidCase { case: self.id.clone(), reason });
        if n == 0 {
            return invalid(format!("shape {:?} is empty", self.shape));
        }
        if self.image.len() != IMAGE_CHANNELS * n {
            return invalid(format!(
                "image has {} values, shape {:?} needs {}",
                self.image.len(),
                self.shape,
                IMAGE_CHANNELS * n
            ));
        }
        if let Some(label) = &self.label
            && label.len() != LABEL_CHANNELS * n
        {
            return invalid(format!("label has {} values, shape {:?} needs {}", label.len(), self.shape, 3 * n));
        }
        Ok(())
    }
}

/// Reads and decodes the preprocessed cases (`CaseTensors` safetensors files) `(case id, uri)`,
/// a few at a time, in the given order. Decoding runs on tokio's blocking pool.
pub async fn load_cases(stores: &Stores, uris: &[(String, StoreUri)]) -> Result<Vec<CachedCase>> {
    use futures::stream::{self, StreamExt, TryStreamExt};
    stream::iter(uris.iter().map(|(id, uri)| async move {
        let load = |source| DataError::Load { case: id.clone(), source };
        let bytes = stores.get(uri).await.map_err(load)?;
        let (id, name) = (id.clone(), uri.to_string());
        tokio::task::spawn_blocking(move || {
            let tensors = CaseTensors::from_bytes(&bytes, &name)
                .map_err(|source| DataError::Load { case: id.clone(), source })?;
            CachedCase::from_tensors(id, tensors)
        })
        .await
        .map_err(|e| DataError::Worker(format!("decoding a case: {e}")))?
    }))
    .buffered(LOAD_CONCURRENCY)
    .try_collect()
    .await
}

/// How a job holds the preprocessed cases of one section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaseCache {
    /// In memory when every local worker's copy fits (see `dataset::resolve_cache`), else
    /// streamed: small datasets train without I/O, a full BraTS release still trains.
    #[default]
    Auto,
    /// Decoded once and held in RAM for the whole job (MONAI's `CacheDataset`, cache_rate 1).
    Memory,
    /// Read and decoded from the store for every sample (MONAI's `Dataset`; nnU-Net's lazy
    /// loading): memory per worker is bounded by the loader's prefetch, whatever the dataset size.
    Stream,
}

impl CaseCache {
    /// Parses the CLI / config spelling: `auto`, `memory` or `stream`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(CaseCache::Auto),
            "memory" => Ok(CaseCache::Memory),
            "stream" => Ok(CaseCache::Stream),
            other => Err(DataError::InvalidConfig(format!("case cache '{other}': use auto, memory or stream"))),
        }
    }
}

impl std::fmt::Display for CaseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CaseCache::Auto => "auto",
            CaseCache::Memory => "memory",
            CaseCache::Stream => "stream",
        })
    }
}

/// The cases of one section, held in memory or read from the store on demand; the loader and
/// the validation pass see both the same way through [`Cases::get`].
pub struct Cases {
    source: CaseSource,
}

impl std::fmt::Debug for Cases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cases").field("len", &self.len()).field("streamed", &self.is_streamed()).finish()
    }
}

enum CaseSource {
    Memory(Vec<CachedCase>),
    Store { stores: Arc<Stores>, runtime: tokio::runtime::Handle, entries: Vec<(String, StoreUri)> },
}

impl From<Vec<CachedCase>> for Cases {
    fn from(cases: Vec<CachedCase>) -> Self {
        Cases { source: CaseSource::Memory(cases) }
    }
}

impl Cases {
    /// Cases read from `entries` (`(case id, tensors uri)`) each time they are asked for.
    ///
    /// `runtime` must be a multi-threaded runtime's handle and [`Cases::get`] must be called
    /// from threads outside it (loader threads, the training loop), which block on the read.
    pub fn streamed(stores: Arc<Stores>, runtime: tokio::runtime::Handle, entries: Vec<(String, StoreUri)>) -> Self {
        Cases { source: CaseSource::Store { stores, runtime, entries } }
    }

    /// Number of cases.
    pub fn len(&self) -> usize {
        match &self.source {
            CaseSource::Memory(c) => c.len(),
            CaseSource::Store { entries, .. } => entries.len(),
        }
    }

    /// True when the section has no case.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when cases are read from the store on demand.
    pub fn is_streamed(&self) -> bool {
        matches!(self.source, CaseSource::Store { .. })
    }

    /// Case `i`'s id; panics when `i` is out of range, like indexing.
    pub fn id(&self, i: usize) -> &str {
        match &self.source {
            CaseSource::Memory(c) => &c[i].id,
            CaseSource::Store { entries, .. } => &entries[i].0,
        }
    }

    /// Case `i`: shared buffers when held in memory, else read, decoded and checked now.
    pub fn get(&self, i: usize) -> Result<CachedCase> {
        if i >= self.len() {
            return Err(DataError::InvalidConfig(format!("case index {i} is outside the {} cases", self.len())));
        }
        match &self.source {
            CaseSource::Memory(c) => Ok(c[i].clone()),
            CaseSource::Store { stores, runtime, entries } => {
                let (id, uri) = &entries[i];
                let load = |source| DataError::Load { case: id.clone(), source };
                let bytes = runtime.block_on(stores.get(uri)).map_err(load)?;
                let tensors = CaseTensors::from_bytes(&bytes, &uri.to_string()).map_err(load)?;
                drop(bytes);
                CachedCase::from_tensors(id.clone(), tensors)
            }
        }
    }

    /// Checks the cases `indices` name before an epoch: in range, and for cases in memory
    /// consistent and labelled (streamed cases are checked as they are read).
    pub fn check_for_training(&self, indices: &[usize]) -> Result<()> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(DataError::InvalidConfig(format!("loader: index {bad} is outside the {} cases", self.len())));
        }
        if let CaseSource::Memory(cases) = &self.source {
            let mut used = vec![false; cases.len()];
            for &i in indices {
                if !std::mem::replace(&mut used[i], true) {
                    cases[i].validate()?;
                    if cases[i].label.is_none() {
                        return Err(DataError::MissingLabel { case: cases[i].id.clone() });
                    }
                }
            }
        }
        Ok(())
    }
}

/// The training augmentation, in MONAI's order: crop, flip X, Y, Z, scale, shift.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augment {
    /// Output size X, Y, Z. Axes where the case is smaller are zero-padded symmetrically
    /// (`diff // 2` before, like MONAI's `SpatialPad`) so every sample of a batch has one shape.
    pub crop: [usize; 3],
    /// `true`: MONAI `RandSpatialCrop(random_size=False)`; `false`: `CenterSpatialCrop`.
    pub random_crop: bool,
    /// `RandFlip` probability, drawn once per axis; 0 = no flips (and no flip draws).
    pub flip_prob: f64,
    /// `RandScaleIntensity(factors)`: `x · (1 + f)`, f ~ U(−s, s); 0 = off. Held as f32 like
    /// the preprocessing options, so 0.1 draws exactly what the pipeline draws.
    pub intensity_scale: f64,
    /// `RandShiftIntensity(offsets)`: `x + o`, o ~ U(−s, s), background included; 0 = off.
    pub intensity_shift: f64,
}

impl Augment {
    /// The bundle's training augmentation at `crop` (the bundle uses 224×224×144).
    pub fn bundle(crop: [usize; 3]) -> Self {
        Augment { crop, random_crop: true, flip_prob: 0.5, intensity_scale: 0.1, intensity_shift: 0.1 }
    }

    /// A centre crop without any random transform.
    pub fn center(crop: [usize; 3]) -> Self {
        Augment { crop, random_crop: false, flip_prob: 0.0, intensity_scale: 0.0, intensity_shift: 0.0 }
    }

    /// Rejects values the preprocessing pipeline would reject, naming the field.
    pub fn validate(&self) -> Result<()> {
        self.options(0).validate().map_err(|e| DataError::InvalidConfig(format!("augmentation: {e}")))
    }

    /// The preprocessing options that draw exactly this augmentation from `seed`.
    fn options(&self, seed: u64) -> Options {
        Options {
            crop: if self.random_crop { CropMode::Random } else { CropMode::Center },
            crop_size: self.crop,
            random_flip: self.flip_prob > 0.0,
            flip_prob: self.flip_prob,
            intensity_scale: self.intensity_scale as f32,
            intensity_shift: self.intensity_shift as f32,
            seed,
            ..Options::default()
        }
    }
}

/// One augmented training sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Image `[4, crop]`, C order.
    pub image: Vec<f32>,
    /// Label channels `[3, crop]` as 0.0/1.0 (DiceLoss needs float targets).
    pub label: Vec<f32>,
}

/// The crop window: the pipeline's centre or random box, then symmetric zero padding on every
/// axis where the case is smaller than the crop.
fn crop_box(shape: [usize; 3], augment: &Augment, draws: &Draws) -> CropBox {
    let mut b = if augment.random_crop {
        transforms::random_crop_box(shape, augment.crop, draws.crop_start)
    } else {
        transforms::center_crop_box(shape, augment.crop)
    };
    for (((start, size), &roi), &n) in b.start.iter_mut().zip(&mut b.size).zip(&augment.crop).zip(&shape) {
        if roi > n {
            *start = -(((roi - n) / 2) as i64);
            *size = roi;
        }
    }
    b
}

/// Draws and applies `augment` to a labelled case, bit for bit as `pipeline::preprocess` with
/// the same options and seed would (the library's draws from ChaCha8, then crop, flip X, Y, Z,
/// scale, shift with the same f32 operations); only the zero padding of crops larger than the
/// case is added. Same case and seed → same sample.
pub fn sample(case: &CachedCase, augment: &Augment, seed: u64) -> Result<Sample> {
    let n: usize = augment.crop.iter().product();
    let mut image = vec![0f32; IMAGE_CHANNELS * n];
    let mut label = vec![0f32; LABEL_CHANNELS * n];
    augment_into(case, augment, seed, &mut image, &mut label)?;
    Ok(Sample { image, label })
}

/// [`sample`] written into `image` (`[4, crop]`) and `label` (`[3, crop]`), which may hold
/// anything beforehand: the loader passes batch tensor memory, saving a copy of each item.
///
/// The draws come from the preprocessing library's [`Draws::draw`]; crop, flips, scale and
/// shift are applied in one pass ([`crop_flip_map`]) with the same f32 operations in the same
/// order as `transforms::{crop, flip, scale_intensity, shift_intensity}`, so the result is
/// bit-identical (a test holds it so). The separate transforms make ~5 read-write passes
/// over the crop, and sampling is memory-bound: one pass samples several times faster.
fn augment_into(case: &CachedCase, augment: &Augment, seed: u64, image: &mut [f32], label: &mut [f32]) -> Result<()> {
    case.validate()?;
    augment.validate()?;
    let source_label = case.label.as_ref().ok_or_else(|| DataError::MissingLabel { case: case.id.clone() })?;
    let draws = Draws::draw(&augment.options(seed), case.shape);
    let b = crop_box(case.shape, augment, &draws);
    // The pipeline tests its f32 options against 0; a disabled step must not run at all
    // (`-0.0 + 0.0` is `+0.0`).
    let scale = (augment.intensity_scale as f32 > 0.0).then_some((1.0 + draws.scale) as f32);
    let shift = (augment.intensity_shift as f32 > 0.0).then_some(draws.shift as f32);
    let intensity = |v: f32| {
        let v = match scale {
            Some(m) => v * m,
            None => v,
        };
        match shift {
            Some(o) => v + o,
            None => v,
        }
    };
    crop_flip_map(&case.image, IMAGE_CHANNELS, case.shape, &b, draws.flips, image, intensity);
    crop_flip_map(source_label, LABEL_CHANNELS, case.shape, &b, draws.flips, label, f32::from);
    Ok(())
}

/// `transforms::crop` (zero outside the source) then `transforms::flip` on each axis in
/// `flips`, then `f` on every voxel — padding included, as the library's scale and shift
/// reach it — written into `out`, whose every element is set.
fn crop_flip_map<T: Copy + Default, U: Copy>(
    data: &[T],
    channels: usize,
    shape: [usize; 3],
    b: &CropBox,
    flips: [bool; 3],
    out: &mut [U],
    f: impl Fn(T) -> U,
) {
    let [nx, ny, nz] = shape;
    let [sx, sy, sz] = b.size;
    assert_eq!(out.len(), channels * sx * sy * sz, "crop output length");
    let pad = f(T::default());
    // The window offsets [z0, z1) of each z row lie inside the source; after a z flip they
    // land at [sz − z1, sz − z0), reversed.
    let z0 = ((-b.start[2]).max(0) as usize).min(sz);
    let z1 = ((nz as i64 - b.start[2]).min(sz as i64)).max(z0 as i64) as usize;
    let (o0, o1) = if flips[2] { (sz - z1, sz - z0) } else { (z0, z1) };
    for c in 0..channels {
        for x in 0..sx {
            let gx = b.start[0] + (if flips[0] { sx - 1 - x } else { x }) as i64;
            for y in 0..sy {
                let gy = b.start[1] + (if flips[1] { sy - 1 - y } else { y }) as i64;
                let dst = ((c * sx + x) * sy + y) * sz;
                let row = &mut out[dst..dst + sz];
                if gx < 0 || gx >= nx as i64 || gy < 0 || gy >= ny as i64 || z0 == z1 {
                    row.fill(pad);
                    continue;
                }
                let src = c * nx * ny * nz + (gx as usize * ny + gy as usize) * nz;
                let gz0 = (b.start[2] + z0 as i64) as usize;
                let inside = &data[src + gz0..src + gz0 + (z1 - z0)];
                row[..o0].fill(pad);
                if flips[2] {
                    row[o0..o1].iter_mut().zip(inside.iter().rev()).for_each(|(d, &v)| *d = f(v));
                } else {
                    row[o0..o1].iter_mut().zip(inside).for_each(|(d, &v)| *d = f(v));
                }
                row[o1..].fill(pad);
            }
        }
    }
}

/// splitmix64's finaliser: a bijection on u64 whose outputs pass BigCrush, so chained calls
/// decorrelate neighbouring seeds, epochs and indices.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The augmentation seed of dataset item `dataset_index` in `epoch`: a function of those and
/// the job seed only, so resumes, ranks and worker threads agree. (A padded duplicate of an
/// index in the same epoch therefore gets the same augmentation.)
pub fn sample_seed(job_seed: u64, epoch: u64, dataset_index: usize) -> u64 {
    splitmix64(splitmix64(splitmix64(job_seed) ^ epoch) ^ dataset_index as u64)
}

/// The 32-bit Mersenne Twister as `at::mt19937` seeds and runs it (the CPU generator behind
/// `torch.Generator().manual_seed(s)`), so sampler permutations equal torch's.
struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    fn new(seed: u64) -> Self {
        // torch keeps only the low 32 bits of the seed.
        let mut state = [0u32; 624];
        state[0] = seed as u32;
        for i in 1..624 {
            state[i] = 1_812_433_253u32.wrapping_mul(state[i - 1] ^ (state[i - 1] >> 30)).wrapping_add(i as u32);
        }
        Mt19937 { state, index: 624 }
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            for i in 0..624 {
                let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
                let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
                self.state[i] = self.state[(i + 397) % 624] ^ (y >> 1) ^ mag;
            }
            self.index = 0;
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
}

/// `torch.randperm(n, generator=torch.Generator().manual_seed(seed))` on CPU: torch's
/// forward Fisher–Yates with `random() % (n − i)`.
fn torch_randperm(n: usize, seed: u64) -> Vec<usize> {
    let mut r: Vec<usize> = (0..n).collect();
    let mut g = Mt19937::new(seed);
    for i in 0..n.saturating_sub(1) {
        let z = (g.next_u32() as u64 % (n - i) as u64) as usize;
        r.swap(i, i + z);
    }
    r
}

/// torch's `DistributedSampler(drop_last=False)`: each epoch a permutation of `0..len` from
/// `seed + epoch` (identical to torch's, Mersenne Twister and all), padded by wrapping around
/// to a multiple of `world_size`; rank `r` takes positions `r, r + W, …`. `world_size = 1`,
/// `rank = 0` is the single-process sampler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DistributedSampler {
    /// Dataset length.
    pub len: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// This process's rank.
    pub rank: usize,
    /// Permute each epoch (training); `false` keeps dataset order.
    pub shuffle: bool,
    /// Base seed; torch's default is 0.
    pub seed: u64,
}

impl DistributedSampler {
    /// A sampler, checking `rank < world_size`.
    pub fn new(len: usize, world_size: usize, rank: usize, shuffle: bool, seed: u64) -> Result<Self> {
        if world_size == 0 || rank >= world_size {
            return Err(DataError::InvalidConfig(format!(
                "sampler: rank {rank} with world size {world_size}; need world_size >= 1 and rank < world_size"
            )));
        }
        Ok(DistributedSampler { len, world_size, rank, shuffle, seed })
    }

    /// Indices per rank per epoch: `ceil(len / world_size)`.
    pub fn num_samples(&self) -> usize {
        self.len.div_ceil(self.world_size.max(1))
    }

    /// This rank's dataset indices for `epoch`, in order.
    pub fn indices(&self, epoch: u64) -> Vec<usize> {
        if self.len == 0 {
            return Vec::new();
        }
        let order = if self.shuffle {
            torch_randperm(self.len, self.seed.wrapping_add(epoch))
        } else {
            (0..self.len).collect()
        };
        let world = self.world_size.max(1);
        let total = self.num_samples() * world;
        // torch pads with `indices[:pad]`, or whole repeats of `indices` when pad > len: both
        // are position `i % len`.
        (self.rank..total).step_by(world).map(|i| order[i % self.len]).collect()
    }
}

/// Validation cases of rank `rank`: `rank, rank + W, …` with no padding, so metrics summed over
/// ranks count every case exactly once.
pub fn validation_shard(n_cases: usize, world_size: usize, rank: usize) -> Vec<usize> {
    (rank..n_cases).step_by(world_size.max(1)).collect()
}

/// One batch, ready for the model.
#[derive(Debug)]
pub struct Batch {
    /// `[B, 4, X, Y, Z]` float32, CPU.
    pub image: Tensor,
    /// `[B, 3, X, Y, Z]` float32 0/1, CPU.
    pub label: Tensor,
    /// The dataset indices of the batch items, in order.
    pub indices: Vec<usize>,
}

/// The loader's settings, fixed for one epoch.
#[derive(Debug, Clone, Copy, PartialEq)]
struct LoaderConfig {
    batch_size: usize,
    augment: Augment,
    job_seed: u64,
    prefetch: usize,
}

/// State shared by the consumer and the workers.
struct Shared {
    cases: Arc<Cases>,
    indices: Vec<usize>,
    config: LoaderConfig,
    epoch: u64,
    num_batches: usize,
    /// Also read without the lock between samples, so a drop interrupts a batch in progress.
    stop: AtomicBool,
    queue: Mutex<Queue>,
    /// Signalled when a batch is ready (consumer waits).
    ready: Condvar,
    /// Signalled when the consumer takes a batch or the loader stops (workers wait).
    space: Condvar,
}

/// Batch bookkeeping under the lock.
#[derive(Default)]
struct Queue {
    /// Next batch number a worker will take.
    claimed: usize,
    /// Batches handed to the consumer.
    consumed: usize,
    /// Finished batches by number, waiting for their turn.
    done: BTreeMap<usize, Result<Batch>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A worker that panicked did so outside the lock (batches are built unlocked), so the
        // queue is consistent even if the mutex reports poisoning.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Builds batch `b`; `None` when the loader stopped part-way.
    fn build(&self, b: usize) -> Option<Result<Batch>> {
        let bs = self.config.batch_size;
        let items = &self.indices[b * bs..((b + 1) * bs).min(self.indices.len())];
        let [x, y, z] = self.config.augment.crop;
        let n = x * y * z;
        let shape = |c: usize| [items.len() as i64, c as i64, x as i64, y as i64, z as i64];
        let cpu = (Kind::Float, Device::Cpu);
        // Items are augmented straight into uninitialised tensor memory: building them in
        // vectors and calling `from_slice` costs two more passes over ~25 MB per 96³ item
        // (`from_slice` zero-fills through libtorch's thread pool, then copies).
        let (image, label) = match Tensor::f_empty(shape(IMAGE_CHANNELS), cpu)
            .and_then(|i| Ok((i, Tensor::f_empty(shape(LABEL_CHANNELS), cpu)?)))
        {
            Ok(t) => t,
            Err(e) => return Some(Err(e.into())),
        };
        // SAFETY: both tensors were just allocated here as contiguous CPU float32 of exactly
        // these lengths, nothing else references them until they are returned, and the slices
        // do not outlive them.
        let (image_data, label_data) = unsafe {
            (
                std::slice::from_raw_parts_mut(image.data_ptr() as *mut f32, items.len() * IMAGE_CHANNELS * n),
                std::slice::from_raw_parts_mut(label.data_ptr() as *mut f32, items.len() * LABEL_CHANNELS * n),
            )
        };
        let per_image = IMAGE_CHANNELS * n;
        let per_label = LABEL_CHANNELS * n;
        for (k, &i) in items.iter().enumerate() {
            if self.stop.load(Ordering::Relaxed) {
                return None;
            }
            let seed = sample_seed(self.config.job_seed, self.epoch, i);
            let image_k = &mut image_data[k * per_image..(k + 1) * per_image];
            let label_k = &mut label_data[k * per_label..(k + 1) * per_label];
            let case = match self.cases.get(i) {
                Ok(case) => case,
                Err(e) => return Some(Err(e)),
            };
            if let Err(e) = augment_into(&case, &self.config.augment, seed, image_k, label_k) {
                return Some(Err(e));
            }
        }
        Some(Ok(Batch { image, label, indices: items.to_vec() }))
    }

    /// A loader thread: claim the next batch number while the prefetch window allows, build it
    /// unlocked, file it under its number.
    fn work(&self) {
        loop {
            let b = {
                let mut q = self.lock();
                loop {
                    if self.stop.load(Ordering::Relaxed) || q.claimed >= self.num_batches {
                        return;
                    }
                    if q.claimed < q.consumed + self.config.prefetch.max(1) {
                        break;
                    }
                    q = self.space.wait(q).unwrap_or_else(|e| e.into_inner());
                }
                q.claimed += 1;
                q.claimed - 1
            };
            let built = std::panic::catch_unwind(AssertUnwindSafe(|| self.build(b))).unwrap_or_else(|p| {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Some(Err(DataError::Worker(format!("building batch {b} panicked: {msg}"))))
            });
            let Some(built) = built else { return };
            self.lock().done.insert(b, built);
            self.ready.notify_all();
        }
    }
}

/// Prefetching batch loader over one epoch of sampler indices.
///
/// Worker threads build batches ahead (at most `prefetch` in flight) and [`Iterator::next`]
/// returns them in sampler order whatever the thread timing; it yields `Err` for a batch that
/// could not be built. Dropping the loader stops and joins its threads (a thread in the middle
/// of a batch stops after its current sample).
pub struct Loader {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    next_batch: usize,
    waited: Duration,
}

impl Loader {
    /// Starts loading `indices` (indices into `cases`, e.g. from [`DistributedSampler::indices`])
    /// for `epoch` in batches of `batch_size` (the last one may be smaller, torch's
    /// `drop_last=False`), each item augmented by `augment` with
    /// [`sample_seed`]`(job_seed, epoch, index)`.
    ///
    /// `workers` threads build batches; 0 builds each one on the caller's thread inside
    /// `next()`. At most `prefetch` batches (at least 1) are ready or being built ahead of the
    /// consumer: torch's equivalent is `prefetch_factor × num_workers`, so `prefetch < workers`
    /// leaves threads idle. Every setting and every case the epoch uses is checked before any
    /// thread starts.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        cases: Arc<Cases>,
        indices: Vec<usize>,
        batch_size: usize,
        augment: Augment,
        job_seed: u64,
        epoch: u64,
        workers: usize,
        prefetch: usize,
    ) -> Result<Self> {
        let config = LoaderConfig { batch_size, augment, job_seed, prefetch };
        if config.batch_size == 0 {
            return Err(DataError::InvalidConfig("batch_size must be at least 1 (the bundle uses 1)".into()));
        }
        config.augment.validate()?;
        cases.check_for_training(&indices)?;
        let shared = Arc::new(Shared {
            num_batches: indices.len().div_ceil(config.batch_size),
            cases,
            indices,
            config,
            epoch,
            stop: AtomicBool::new(false),
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            space: Condvar::new(),
        });
        let mut loader = Loader { shared, threads: Vec::new(), next_batch: 0, waited: Duration::ZERO };
        for w in 0..workers.min(loader.shared.num_batches) {
            let shared = loader.shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("brats-loader-{w}"))
                .spawn(move || shared.work())
                .map_err(|e| DataError::Worker(format!("cannot start loader thread: {e}")))?;
            loader.threads.push(handle);
        }
        Ok(loader)
    }

    /// Batches in this epoch, the partial last one included.
    pub fn num_batches(&self) -> usize {
        self.shared.num_batches
    }

    /// Seconds the consumer has spent blocked in `next()` waiting for a batch (with 0 workers:
    /// building it), i.e. the loader's share of the step time.
    pub fn wait_seconds(&self) -> f64 {
        self.waited.as_secs_f64()
    }

    /// Stops the workers and waits for them; idempotent.
    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        {
            // Taking the lock orders the store before any worker's next check-then-wait.
            let _q = self.shared.lock();
            self.shared.space.notify_all();
        }
        for t in self.threads.drain(..) {
            // A worker's panics are caught per batch; a join error leaves nothing to clean up.
            let _ = t.join();
        }
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        let b = self.next_batch;
        if b >= self.shared.num_batches {
            return None;
        }
        self.next_batch += 1;
        let t = Instant::now();
        if self.threads.is_empty() {
            let built = self.shared.build(b);
            self.waited += t.elapsed();
            return built;
        }
        let mut q = self.shared.lock();
        let built = loop {
            if let Some(built) = q.done.remove(&b) {
                break built;
            }
            if self.threads.iter().all(|t| t.is_finished()) && !q.done.contains_key(&b) {
                // Unreachable while workers catch their panics; guards against a silent hang.
                break Err(DataError::Worker(format!("all loader threads exited before batch {b}")));
            }
            q = self
                .shared
                .ready
                .wait_timeout(q, Duration::from_millis(500))
                .map(|r| r.0)
                .unwrap_or_else(|e| e.into_inner().0);
        };
        q.consumed += 1;
        drop(q);
        self.shared.space.notify_all();
        self.waited += t.elapsed();
        Some(built)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.shared.num_batches - self.next_batch;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Loader {}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use brats_core::nifti_io::{ReadLimits, write_nifti};
    use brats_preprocess::pipeline::{self, InputFile};
    use brats_preprocess::synthetic::{self, SyntheticSpec};

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
                for (scale, shift) in
                    [(None, None), (Some(-0.0731), None), (None, Some(0.0917)), (Some(0.05), Some(-0.02))]
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
                    let mut got = vec![f32::NAN; want.len()];
                    crop_flip_map(&data, 2, shape, &b, flips, &mut got, f);
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
                let shards: Vec<Vec<usize>> = (0..world)
                    .map(|r| DistributedSampler::new(len, world, r, true, 11).unwrap().indices(epoch))
                    .collect();
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
    /// `cargo test -p brats-trainer --lib data::tests::sampling_speed -- --ignored --nocapture`.
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
}
