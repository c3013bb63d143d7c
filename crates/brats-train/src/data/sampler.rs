//! torch's `DistributedSampler` (its Mersenne Twister and `randperm` reimplemented) and the
//! validation shards.

use super::{DataError, Result};

/// The 32-bit Mersenne Twister as `at::mt19937` seeds and runs it (the CPU generator behind
/// `torch.Generator().manual_seed(s)`), so sampler permutations equal torch's.
pub(super) struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    pub(super) fn new(seed: u64) -> Self {
        // torch keeps only the low 32 bits of the seed.
        let mut state = [0u32; 624];
        state[0] = seed as u32;
        for i in 1..624 {
            state[i] = 1_812_433_253u32.wrapping_mul(state[i - 1] ^ (state[i - 1] >> 30)).wrapping_add(i as u32);
        }
        Mt19937 { state, index: 624 }
    }

    pub(super) fn next_u32(&mut self) -> u32 {
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
pub(super) fn torch_randperm(n: usize, seed: u64) -> Vec<usize> {
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
