//! Preprocessed cases: decoded once and held in memory, or read from the store per sample.

use brats_core::store::{StoreUri, Stores};
use brats_core::tensors::CaseTensors;
use std::sync::Arc;

/// How many cases [`load_cases`] fetches and decodes at once: enough to overlap store latency
/// with decoding without holding many ~150 MB undecoded objects in memory.
const LOAD_CONCURRENCY: usize = 4;

use super::{DataError, IMAGE_CHANNELS, LABEL_CHANNELS, Result};

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
