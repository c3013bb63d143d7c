//! Loader threads that build batches ahead of the training loop, handed out in sampler order.

use super::augment::augment_into;
use super::{Augment, Cases, DataError, IMAGE_CHANNELS, LABEL_CHANNELS, Result, sample_seed};
use std::collections::BTreeMap;
use std::mem::MaybeUninit;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

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
        // do not outlive them. The memory is uninitialised (`empty`), hence `MaybeUninit`: it
        // is only written here, and `augment_into` writes every element of each item's slice
        // (see `crop_flip_map`) before the batch is returned; a batch that fails part-way is
        // dropped unread.
        let (image_data, label_data) = unsafe {
            (
                std::slice::from_raw_parts_mut(
                    image.data_ptr() as *mut MaybeUninit<f32>,
                    items.len() * IMAGE_CHANNELS * n,
                ),
                std::slice::from_raw_parts_mut(
                    label.data_ptr() as *mut MaybeUninit<f32>,
                    items.len() * LABEL_CHANNELS * n,
                ),
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
