//! Which model versions are loaded, and loading them: the default model's alias (polled and
//! hot-swapped), versions pinned by requests, single-flight loads.
//!
//! A load (fetch, integrity check, ONNX Runtime session, optional warm-up) costs seconds and
//! hundreds of MB, so concurrent requests for the same uncached version share one load, and a
//! load takes one of the service's concurrency slots like a segmentation does: an uncached
//! version never runs outside the limit.

use crate::runtime::{Provider, SegmentationModel, SessionOptions, default_library};
use brats_artifacts::metadata::ModelMetadata;
use brats_artifacts::registry::Registry;
use brats_core::error::CoreError;
use brats_proto::v1 as pb;
use brats_service::field_status as with_field;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{OnceCell, Semaphore};
use tonic::Status;
use tracing::{info, warn};

/// A model version loaded into a session.
pub struct LoadedModel {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: String,
    /// The session.
    pub model: SegmentationModel,
    /// Its `metadata.json`, when the version has one.
    pub metadata: Option<ModelMetadata>,
    /// Why the first requested provider was not used, if it was not.
    pub fallback_reason: Option<String>,
}

type Key = (String, String);
/// A load's outcome, shared by everyone who waited for it (errors too: a version that fails
/// to load fails once for all of them, not once each).
type LoadResult = Result<Arc<LoadedModel>, Arc<CoreError>>;

/// Versions other than the default's: loaded ones, and loads in flight (one cell per version
/// that every caller awaits). One lock over both, so a version is never loaded twice.
#[derive(Default)]
struct Pinned {
    loaded: HashMap<Key, Arc<LoadedModel>>,
    loading: HashMap<Key, Arc<OnceCell<LoadResult>>>,
}

/// At most this many versions besides the default stay resident.
const MAX_PINNED: usize = 2;

/// The models a service holds.
pub struct ModelManager {
    registry: Registry,
    session_options: SessionOptions,
    default_model: String,
    default_alias: String,
    current: RwLock<Option<Arc<LoadedModel>>>,
    pinned: Mutex<Pinned>,
    slots: Arc<Semaphore>,
    loads: AtomicU64,
}

impl ModelManager {
    /// A manager serving `default_model`@`default_alias` from `registry`; loads take a permit of
    /// `slots` (the service's concurrency limit).
    pub fn new(
        registry: Registry,
        session_options: SessionOptions,
        default_model: String,
        default_alias: String,
        slots: Arc<Semaphore>,
    ) -> Self {
        ModelManager {
            registry,
            session_options,
            default_model,
            default_alias,
            current: RwLock::new(None),
            pinned: Mutex::new(Pinned::default()),
            slots,
            loads: AtomicU64::new(0),
        }
    }

    /// The registry the models come from.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// How many version loads have started since the manager was made (the single-flight
    /// guarantee is checked against it).
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }

    /// Loads a version into a session and runs one warm-up inference of `warmup` shape.
    pub async fn load_version(
        &self,
        name: &str,
        version: &str,
        warmup: Option<[usize; 3]>,
    ) -> Result<Arc<LoadedModel>, CoreError> {
        self.loads.fetch_add(1, Ordering::Relaxed);
        let fetched = self.registry.fetch(name, version).await?;
        let options = self.session_options.clone();
        let (name, version) = (name.to_string(), version.to_string());
        tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let model = SegmentationModel::load(&default_library(), &fetched.onnx, &options)
                .map_err(|e| CoreError::invalid(format!("{}: {e}", fetched.uri)))?;
            let fallback_reason = (model.provider() != options.providers.first().copied().unwrap_or(Provider::Cpu))
                .then(|| format!("{} could not be loaded; running on {}", options.providers[0].name(), model.provider().name()));
            if let Some(shape) = warmup {
                let n: usize = shape.iter().product();
                model
                    .run(&vec![0f32; 4 * n], [1, 4, shape[0], shape[1], shape[2]])
                    .map_err(|e| CoreError::invalid(format!("{}: warm-up failed: {e}", fetched.uri)))?;
            }
            info!(model = %name, version = %version, provider = model.provider().name(), seconds = t.elapsed().as_secs_f64(), "model loaded and warm");
            Ok(Arc::new(LoadedModel { name, version, model, metadata: fetched.metadata, fallback_reason }))
        })
        .await
        .map_err(|e| CoreError::Internal(format!("model load task failed: {e}")))?
    }

    /// Loads the default model's alias and makes it current. Returns whether the version changed.
    pub async fn load_default(&self, warmup: Option<[usize; 3]>) -> Result<bool, CoreError> {
        let version = self.registry.resolve_alias(&self.default_model, &self.default_alias).await?;
        if self.current().is_some_and(|c| c.version == version) {
            return Ok(false);
        }
        let loaded = self.load_version(&self.default_model, &version, warmup).await?;
        // The old session keeps serving the requests that already hold it.
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(loaded);
        Ok(true)
    }

    /// Keeps the default alias loaded: loads it, then every `interval_s` seconds (0 = once, as
    /// soon as a load succeeds) follows it, hot-swapping when it moves. `serving` is told after
    /// each attempt whether a model is being served.
    pub async fn follow_default<F, Fut>(&self, warmup: Option<[usize; 3]>, interval_s: u64, mut serving: F)
    where
        F: FnMut(bool) -> Fut,
        Fut: Future<Output = ()>,
    {
        loop {
            match self.load_default(warmup).await {
                Ok(changed) => {
                    if changed && let Some(c) = self.current() {
                        info!(version = %c.version, provider = c.model.provider().name(), "serving");
                    }
                    serving(true).await;
                }
                Err(e) => {
                    warn!(error = %e, "cannot load the default model");
                    if self.current().is_none() {
                        serving(false).await;
                    }
                }
            }
            if interval_s == 0 && self.current().is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(interval_s.max(1))).await;
        }
    }

    /// The model serving the default alias, if loaded.
    pub fn current(&self) -> Option<Arc<LoadedModel>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether `name`@`version` is loaded (the default's or a pinned one).
    pub fn is_loaded(&self, name: &str, version: &str) -> bool {
        self.current().is_some_and(|c| c.name == name && c.version == version)
            || self.lock_pinned().loaded.contains_key(&(name.to_string(), version.to_string()))
    }

    /// The model a request selects: the default alias's (loaded at start), or a version by
    /// number or alias, loaded once and kept.
    pub async fn select(&self, sel: Option<&pb::ModelSelector>) -> Result<Arc<LoadedModel>, Status> {
        let sel = sel.cloned().unwrap_or_default();
        if !sel.version.is_empty() && !sel.alias.is_empty() {
            return Err(Status::invalid_argument("model: give a version or an alias, not both"));
        }
        let name = if sel.name.is_empty() { self.default_model.clone() } else { sel.name.clone() };
        let alias =
            if sel.alias.is_empty() && sel.version.is_empty() { self.default_alias.clone() } else { sel.alias.clone() };
        if name == self.default_model && alias == self.default_alias {
            return self
                .current()
                .ok_or_else(|| Status::unavailable("the default model is not loaded yet; retry shortly"));
        }
        let version = if !sel.version.is_empty() {
            sel.version.clone()
        } else {
            self.registry.resolve_alias(&name, &alias).await.map_err(|e| with_field("model.alias", e))?
        };
        self.pinned_version(name, version).await.map_err(|e| with_field("model", e))
    }

    /// A version other than the current default: from the cache, or loaded once however many
    /// callers ask at the same time, in a concurrency slot.
    async fn pinned_version(&self, name: String, version: String) -> Result<Arc<LoadedModel>, CoreError> {
        if let Some(cur) = self.current()
            && cur.name == name
            && cur.version == version
        {
            return Ok(cur);
        }
        let key = (name, version);
        let cell = {
            let mut pinned = self.lock_pinned();
            if let Some(m) = pinned.loaded.get(&key) {
                return Ok(m.clone());
            }
            pinned.loading.entry(key.clone()).or_default().clone()
        };
        let result = cell
            .get_or_init(|| async {
                let _slot = self.slots.clone().acquire_owned().await.map_err(|_| {
                    CoreError::Unavailable("the service is shutting down; retry on another instance".into())
                })?;
                self.load_version(&key.0, &key.1, None).await.map_err(Arc::new)
            })
            .await
            .clone();
        let mut pinned = self.lock_pinned();
        // The first caller back moves the load to the cache; a failed load is forgotten, so
        // the next request tries again.
        if pinned.loading.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            pinned.loading.remove(&key);
            if let Ok(m) = &result {
                if pinned.loaded.len() >= MAX_PINNED {
                    pinned.loaded.clear(); // keep memory bounded
                }
                pinned.loaded.insert(key, m.clone());
            }
        }
        result.map_err(|e| copy_error(&e))
    }

    fn lock_pinned(&self) -> std::sync::MutexGuard<'_, Pinned> {
        // The maps stay consistent under any panic (single inserts/removes), so a poisoned
        // lock is safe to keep using.
        self.pinned.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The same error for another waiter (the variants carry only their message).
fn copy_error(e: &CoreError) -> CoreError {
    match e {
        CoreError::Invalid(m) => CoreError::Invalid(m.clone()),
        CoreError::NotFound(m) => CoreError::NotFound(m.clone()),
        CoreError::Unavailable(m) => CoreError::Unavailable(m.clone()),
        CoreError::AlreadyExists(m) => CoreError::AlreadyExists(m.clone()),
        CoreError::Internal(m) => CoreError::Internal(m.clone()),
    }
}
