//! The model registry in object storage:
//!
//! ```text
//! <root>/<name>/<version>/model.onnx      the graph (input `image`, output `logits`)
//! <root>/<name>/<version>/metadata.json   channels, roi, sha256 of the graph, provenance
//! <root>/<name>/aliases.json              {"production": "<version>", ...}
//! ```
//! Aliases move by rewriting `aliases.json` (an atomic put); services watch it and hot-reload.

use crate::metadata::ModelMetadata;
use brats_core::error::{CoreError, Result};
use brats_core::store::{StoreUri, Stores};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;

/// File name of a version's graph.
pub const MODEL_FILE: &str = "model.onnx";

/// The registry name a model gets when nobody names it, and the name inference serves when
/// nobody configures one: MONAI's bundle name, so a model trained and promoted with default
/// settings is the model a service started with default settings serves.
pub const DEFAULT_MODEL_NAME: &str = "brats_mri_segmentation";

/// The alias a promoted model gets and inference serves by default.
pub const PRODUCTION_ALIAS: &str = "production";
/// File name of a version's metadata.
pub const METADATA_FILE: &str = "metadata.json";
/// File name of a model's alias map.
pub const ALIASES_FILE: &str = "aliases.json";

/// A model version fetched from the registry, its integrity checked.
pub struct FetchedModel {
    /// The ONNX graph.
    pub onnx: Bytes,
    /// `metadata.json`, or None when the version has none.
    pub metadata: Option<ModelMetadata>,
    /// Where the graph lives.
    pub uri: StoreUri,
}

/// A registry rooted at a store prefix (e.g. `s3://bucket/models` or `file:///data/models`).
#[derive(Clone)]
pub struct Registry {
    stores: Arc<Stores>,
    root: StoreUri,
}

/// Checks a model name, version or alias is safe inside an object key.
pub fn validate_name(field: &str, v: &str) -> Result<()> {
    if !v.is_empty()
        && v.len() <= 100
        && !v.starts_with('.')
        && v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        Ok(())
    } else {
        Err(CoreError::invalid(format!(
            "{field} '{v}': use 1–100 characters from A–Z a–z 0–9 - _ . (not starting with '.')"
        )))
    }
}

impl Registry {
    /// A registry at `root`.
    pub fn new(stores: Arc<Stores>, root: StoreUri) -> Self {
        Registry { stores, root }
    }

    /// The registry's root.
    pub fn root(&self) -> &StoreUri {
        &self.root
    }

    /// Where a version's files live.
    pub fn version_uri(&self, name: &str, version: &str) -> StoreUri {
        self.root.join(&format!("{name}/{version}"))
    }

    /// The alias map of a model (empty when it has none).
    pub async fn aliases(&self, name: &str) -> Result<BTreeMap<String, String>> {
        let uri = self.root.join(&format!("{name}/{ALIASES_FILE}"));
        match self.stores.get(&uri).await {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| CoreError::invalid(format!("{uri}: not a JSON object of alias → version ({e})"))),
            Err(CoreError::NotFound(_)) => Ok(BTreeMap::new()),
            Err(e) => Err(e),
        }
    }

    /// The version an alias names.
    pub async fn resolve_alias(&self, name: &str, alias: &str) -> Result<String> {
        validate_name("model name", name)?;
        validate_name("alias", alias)?;
        self.aliases(name).await?.get(alias).cloned().ok_or_else(|| {
            CoreError::NotFound(format!(
                "model '{name}' has no alias '{alias}' in {}; register a version with `brats-inference register --name {name} --alias {alias}`",
                self.root
            ))
        })
    }

    /// Fetches a version's graph and metadata; a graph whose sha256 differs from its metadata's
    /// `onnx_sha256` is refused.
    pub async fn fetch(&self, name: &str, version: &str) -> Result<FetchedModel> {
        validate_name("model name", name)?;
        validate_name("model version", version)?;
        let dir = self.version_uri(name, version);
        let uri = dir.join(MODEL_FILE);
        let onnx = self.stores.get(&uri).await.map_err(|e| match e {
            CoreError::NotFound(_) => {
                CoreError::NotFound(format!("model '{name}' version '{version}' not found ({uri})"))
            }
            other => other,
        })?;
        let metadata_uri = dir.join(METADATA_FILE);
        let Some(raw) = self.metadata_bytes(&metadata_uri).await? else {
            return Ok(FetchedModel { onnx, metadata: None, uri });
        };
        // The integrity check comes first and needs only `onnx.sha256`: a graph that is not the
        // one described is refused as such, whatever else the file holds.
        let json: serde_json::Value = serde_json::from_slice(&raw)
            .map_err(|e| CoreError::invalid(format!("{metadata_uri}: invalid JSON ({e})")))?;
        if let Some(want) = find_sha256(&json) {
            let got = hex::encode(Sha256::digest(&onnx));
            if got != want {
                return Err(CoreError::invalid(format!(
                    "{uri}: sha256 {got} does not match its metadata ({want}); the upload is incomplete or the file was replaced"
                )));
            }
        }
        let metadata = ModelMetadata::from_slice(&raw, &metadata_uri.to_string())?;
        Ok(FetchedModel { onnx, metadata: Some(metadata), uri })
    }

    /// A version's `metadata.json`, typed, without fetching its graph; None when the version
    /// has none.
    pub async fn metadata(&self, name: &str, version: &str) -> Result<Option<ModelMetadata>> {
        validate_name("model name", name)?;
        validate_name("model version", version)?;
        let uri = self.version_uri(name, version).join(METADATA_FILE);
        match self.metadata_bytes(&uri).await? {
            Some(raw) => Ok(Some(ModelMetadata::from_slice(&raw, &uri.to_string())?)),
            None => Ok(None),
        }
    }

    /// When a version was registered: the modification time of its graph, which versions
    /// never rewrite (see [`Registry::register`]), in milliseconds since the Unix epoch.
    pub async fn registered_ms(&self, name: &str, version: &str) -> Result<i64> {
        validate_name("model name", name)?;
        validate_name("model version", version)?;
        Ok(self.stores.head(&self.version_uri(name, version).join(MODEL_FILE)).await?.last_modified_ms)
    }

    async fn metadata_bytes(&self, uri: &StoreUri) -> Result<Option<Bytes>> {
        match self.stores.get(uri).await {
            Ok(b) => Ok(Some(b)),
            Err(CoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Adds version `version` (graph, then metadata) and optionally points an alias at it.
    ///
    /// Versions are immutable, as in MLflow's registry: the graph is written with a
    /// create-if-absent put, so an existing version (or another writer registering the same one
    /// at the same moment) gives [`CoreError::AlreadyExists`] and changes nothing.
    pub async fn register(
        &self,
        name: &str,
        version: &str,
        onnx: Bytes,
        metadata: Option<Bytes>,
        alias: Option<&str>,
    ) -> Result<StoreUri> {
        validate_name("model name", name)?;
        validate_name("model version", version)?;
        if let Some(a) = alias {
            validate_name("alias", a)?;
        }
        let dir = self.version_uri(name, version);
        self.stores.put_new(&dir.join(MODEL_FILE), onnx).await.map_err(|e| match e {
            CoreError::AlreadyExists(_) => CoreError::AlreadyExists(format!(
                "model '{name}' version '{version}' exists already in {}; versions are immutable: register under a new version",
                self.root
            )),
            other => other,
        })?;
        if let Some(m) = metadata {
            self.stores.put(&dir.join(METADATA_FILE), m).await?;
        }
        if let Some(a) = alias {
            self.set_alias(name, a, version).await?;
        }
        Ok(dir)
    }

    /// Registers the graph as the next numbered version (highest numeric version + 1, from 1):
    /// writers that race for a number each end up with their own, the loser of a race taking
    /// the next one. Returns the version and its folder.
    pub async fn register_next(
        &self,
        name: &str,
        onnx: Bytes,
        metadata: Option<Bytes>,
        alias: Option<&str>,
    ) -> Result<(String, StoreUri)> {
        validate_name("model name", name)?;
        const ATTEMPTS: usize = 64;
        for _ in 0..ATTEMPTS {
            let versions = self.list().await?.remove(name).map(|(v, _)| v).unwrap_or_default();
            let version = (versions.iter().filter_map(|v| v.parse::<u64>().ok()).max().unwrap_or(0) + 1).to_string();
            match self.register(name, &version, onnx.clone(), metadata.clone(), alias).await {
                Ok(dir) => return Ok((version, dir)),
                // Taken between the listing and the put: list again.
                Err(CoreError::AlreadyExists(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(CoreError::Unavailable(format!(
            "model '{name}': {ATTEMPTS} version numbers were taken by other writers while registering; retry"
        )))
    }

    /// Points `alias` at `version` (which must exist).
    pub async fn set_alias(&self, name: &str, alias: &str, version: &str) -> Result<()> {
        validate_name("alias", alias)?;
        if !self.stores.exists(&self.version_uri(name, version).join(MODEL_FILE)).await? {
            return Err(CoreError::NotFound(format!(
                "model '{name}' version '{version}' not found; register it first"
            )));
        }
        let mut aliases = self.aliases(name).await?;
        aliases.insert(alias.to_string(), version.to_string());
        let body = serde_json::to_vec_pretty(&aliases).expect("alias map serialises");
        self.stores.put(&self.root.join(&format!("{name}/{ALIASES_FILE}")), body.into()).await
    }

    /// Every model: name → (versions, aliases).
    pub async fn list(&self) -> Result<BTreeMap<String, (Vec<String>, BTreeMap<String, String>)>> {
        let mut models: BTreeMap<String, (Vec<String>, BTreeMap<String, String>)> = BTreeMap::new();
        let prefix = self.root.to_string();
        for uri in self.stores.list(&self.root).await? {
            let s = uri.to_string();
            let Some(rel) = s.strip_prefix(&prefix).map(|r| r.trim_start_matches('/')) else { continue };
            let parts: Vec<&str> = rel.split('/').collect();
            if let [name, version, MODEL_FILE] = parts.as_slice() {
                models.entry(name.to_string()).or_default().0.push(version.to_string());
            }
        }
        for (name, entry) in models.iter_mut() {
            entry.1 = self.aliases(name).await?;
        }
        Ok(models)
    }
}

/// The graph's sha256 as `brats-trainer export-onnx` records it (`onnx.sha256`).
fn find_sha256(m: &serde_json::Value) -> Option<String> {
    m.pointer("/onnx/sha256").and_then(|v| v.as_str()).map(str::to_string)
}
