//! Object-store handles built from URLs, so every service reads and writes `file://`
//! directories and `s3://` buckets through the same calls.
//!
//! Accepted forms: `s3://bucket/key`, `file:///absolute/path`, `file:relative/path`, and a
//! plain filesystem path (absolute or relative to the working directory). Writes are atomic
//! (a local write goes to a temporary file that is renamed; an S3 PUT is all-or-nothing), so a
//! failed request never leaves a partial object behind.

use crate::error::{CoreError, Result};
use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How to reach S3-compatible stores. Unset fields fall back to the standard `AWS_*`
/// environment variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_REGION`), then to defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Endpoint URL, e.g. `http://127.0.0.1:9000` for MinIO/Garage/moto; empty means AWS.
    pub s3_endpoint: Option<String>,
    /// Region name; default `us-east-1`.
    pub s3_region: Option<String>,
    /// Access key id.
    pub s3_access_key_id: Option<String>,
    /// Secret access key (never logged).
    pub s3_secret_access_key: Option<String>,
    /// A file holding the secret access key (a Docker or Kubernetes secret, e.g.
    /// `/run/secrets/s3_secret_access_key`), so that no secret sits in a configuration file or
    /// the environment; read when a bucket's client is built, surrounding whitespace trimmed.
    /// `s3_secret_access_key` wins when both are set.
    pub s3_secret_access_key_file: Option<String>,
    /// Seconds before one request is abandoned; default 30.
    pub request_timeout_s: Option<u64>,
    /// Retries of a failed request; default 2 (so an unreachable store fails fast).
    pub max_retries: Option<usize>,
}

impl StoreConfig {
    fn env(name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }

    /// The secret access key: the key itself, else the file's contents, else `AWS_SECRET_ACCESS_KEY`.
    fn secret_access_key(&self) -> Result<Option<String>> {
        if let Some(k) = &self.s3_secret_access_key {
            return Ok(Some(k.clone()));
        }
        if let Some(file) = &self.s3_secret_access_key_file {
            let text = std::fs::read_to_string(file).map_err(|e| {
                CoreError::invalid(format!(
                    "store.s3_secret_access_key_file: cannot read {file} ({e}); mount the secret there or unset the key"
                ))
            })?;
            return Ok(Some(text.trim().to_string()));
        }
        Ok(StoreConfig::env("AWS_SECRET_ACCESS_KEY"))
    }
}

/// A parsed store location: a local path or an S3 bucket and key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StoreUri {
    /// An absolute local filesystem path.
    File(std::path::PathBuf),
    /// An object key in an S3 bucket (no leading slash; may be empty for the bucket root).
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key or key prefix.
        key: String,
    },
}

impl StoreUri {
    /// Parses a URL or path; relative paths resolve against the working directory.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() {
            return Err(CoreError::invalid("empty URI: give s3://bucket/key, file:///path or a path"));
        }
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(CoreError::invalid(format!("'{s}' has no bucket: use s3://bucket/key")));
            }
            return Ok(StoreUri::S3 { bucket: bucket.to_string(), key: key.trim_matches('/').to_string() });
        }
        let path = if let Some(rest) = s.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(CoreError::invalid(format!(
                    "'{s}': file:// URLs must be absolute (file:///abs/path); use file:relative/path for relative ones"
                )));
            }
            rest
        } else if let Some(rest) = s.strip_prefix("file:") {
            rest
        } else if s.contains("://") {
            return Err(CoreError::invalid(format!("'{s}': unsupported scheme; use s3://, file:// or a path")));
        } else {
            s
        };
        let abs = std::path::absolute(path).map_err(|e| CoreError::invalid(format!("'{s}': {e}")))?;
        Ok(StoreUri::File(normalize(&abs)))
    }

    /// The location `rel` below this one (`rel` uses `/` separators).
    pub fn join(&self, rel: &str) -> StoreUri {
        let rel = rel.trim_matches('/');
        match self {
            StoreUri::File(p) => StoreUri::File(normalize(&p.join(rel))),
            StoreUri::S3 { bucket, key } => StoreUri::S3 {
                bucket: bucket.clone(),
                key: if key.is_empty() { rel.to_string() } else { format!("{key}/{rel}") },
            },
        }
    }

    /// The location one level up.
    pub fn parent(&self) -> StoreUri {
        match self {
            StoreUri::File(p) => StoreUri::File(p.parent().map(|p| p.to_path_buf()).unwrap_or_else(|| p.clone())),
            StoreUri::S3 { bucket, key } => StoreUri::S3 {
                bucket: bucket.clone(),
                key: key.rsplit_once('/').map(|(a, _)| a.to_string()).unwrap_or_default(),
            },
        }
    }

    /// The last path component.
    pub fn file_name(&self) -> String {
        match self {
            StoreUri::File(p) => p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            StoreUri::S3 { key, .. } => key.rsplit('/').next().unwrap_or("").to_string(),
        }
    }

    fn object_path(&self) -> Result<ObjectPath> {
        match self {
            StoreUri::File(p) => ObjectPath::from_absolute_path(p)
                .map_err(|e| CoreError::invalid(format!("{}: not a valid local path ({e})", p.display()))),
            StoreUri::S3 { key, .. } => ObjectPath::parse(key).map_err(|e| CoreError::invalid(format!("{self}: {e}"))),
        }
    }
}

impl std::fmt::Display for StoreUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUri::File(p) => write!(f, "file://{}", p.display()),
            StoreUri::S3 { bucket, key } => write!(f, "s3://{bucket}/{key}"),
        }
    }
}

/// Removes `.` and `..` components without touching the filesystem.
fn normalize(p: &std::path::Path) -> std::path::PathBuf {
    let mut out = std::path::PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Identity of one stored object version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectVersion {
    /// Size in bytes.
    pub size: u64,
    /// ETag or modification time.
    pub version: String,
    /// Last modification, milliseconds since the Unix epoch. Not part of the identity (a
    /// rewrite already changes `version`), so it is left out of serialised cache keys.
    #[serde(skip)]
    pub last_modified_ms: i64,
}

/// Store handles for every bucket a process touches, built once and shared.
pub struct Stores {
    config: StoreConfig,
    local: Arc<LocalFileSystem>,
    buckets: Mutex<HashMap<String, Arc<dyn ObjectStore>>>,
}

impl Stores {
    /// Creates the registry; S3 clients are built lazily per bucket.
    pub fn new(config: StoreConfig) -> Self {
        Stores { config, local: Arc::new(LocalFileSystem::new()), buckets: Mutex::new(HashMap::new()) }
    }

    fn store(&self, uri: &StoreUri) -> Result<(Arc<dyn ObjectStore>, ObjectPath)> {
        let path = uri.object_path()?;
        match uri {
            StoreUri::File(_) => Ok((self.local.clone(), path)),
            StoreUri::S3 { bucket, .. } => {
                let mut buckets = self.buckets.lock().expect("store registry lock");
                if let Some(s) = buckets.get(bucket) {
                    return Ok((s.clone(), path));
                }
                let c = &self.config;
                let endpoint = c.s3_endpoint.clone().or_else(|| StoreConfig::env("AWS_ENDPOINT_URL"));
                let mut b = AmazonS3Builder::new()
                    .with_bucket_name(bucket)
                    .with_region(
                        c.s3_region
                            .clone()
                            .or_else(|| StoreConfig::env("AWS_REGION"))
                            .unwrap_or_else(|| "us-east-1".into()),
                    )
                    .with_retry(RetryConfig {
                        max_retries: c.max_retries.unwrap_or(2),
                        retry_timeout: Duration::from_secs(15),
                        ..Default::default()
                    })
                    .with_client_options(
                        ClientOptions::new()
                            .with_connect_timeout(Duration::from_secs(3))
                            .with_timeout(Duration::from_secs(c.request_timeout_s.unwrap_or(30)))
                            .with_allow_http(endpoint.as_deref().is_some_and(|e| e.starts_with("http://"))),
                    );
                if let Some(e) = &endpoint {
                    b = b.with_endpoint(e).with_virtual_hosted_style_request(false);
                }
                if let Some(k) = c.s3_access_key_id.clone().or_else(|| StoreConfig::env("AWS_ACCESS_KEY_ID")) {
                    b = b.with_access_key_id(k);
                }
                if let Some(k) = c.secret_access_key()? {
                    b = b.with_secret_access_key(k);
                }
                let s: Arc<dyn ObjectStore> = Arc::new(
                    b.build()
                        .map_err(|e| CoreError::invalid(format!("{uri}: cannot configure the S3 client ({e})")))?,
                );
                buckets.insert(bucket.clone(), s.clone());
                Ok((s, path))
            }
        }
    }

    /// Reads a whole object.
    pub async fn get(&self, uri: &StoreUri) -> Result<Bytes> {
        let (store, path) = self.store(uri)?;
        let r = store.get(&path).await.map_err(|e| map_err(uri, e))?;
        r.bytes().await.map_err(|e| map_err(uri, e))
    }

    /// Writes a whole object atomically (readers see the old object or the new one).
    pub async fn put(&self, uri: &StoreUri, data: Bytes) -> Result<()> {
        let (store, path) = self.store(uri)?;
        store.put(&path, data.into()).await.map_err(|e| map_err(uri, e))?;
        Ok(())
    }

    /// [`Stores::put`] of an object given as consecutive parts (e.g. a file header and a large
    /// tensor buffer), written in order without first joining them into one buffer.
    pub async fn put_parts(&self, uri: &StoreUri, parts: Vec<Bytes>) -> Result<()> {
        let (store, path) = self.store(uri)?;
        store.put(&path, parts.into_iter().collect()).await.map_err(|e| map_err(uri, e))?;
        Ok(())
    }

    /// Writes an object only if none exists under `uri` (one atomic create-if-absent: S3's
    /// `If-None-Match: *`, an exclusive create on local disks), so two writers racing for one
    /// name cannot both win; the loser gets [`CoreError::AlreadyExists`].
    pub async fn put_new(&self, uri: &StoreUri, data: Bytes) -> Result<()> {
        let (store, path) = self.store(uri)?;
        let opts = object_store::PutOptions { mode: object_store::PutMode::Create, ..Default::default() };
        store.put_opts(&path, data.into(), opts).await.map_err(|e| map_err(uri, e))?;
        Ok(())
    }

    /// Whether an object exists (errors other than "not found" are reported).
    pub async fn exists(&self, uri: &StoreUri) -> Result<bool> {
        let (store, path) = self.store(uri)?;
        match store.head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(map_err(uri, e)),
        }
    }

    /// Size and version (ETag, else modification time) of an object: a cheap identity that
    /// changes whenever the object is rewritten, used for cache keys.
    pub async fn head(&self, uri: &StoreUri) -> Result<ObjectVersion> {
        let (store, path) = self.store(uri)?;
        let meta = store.head(&path).await.map_err(|e| map_err(uri, e))?;
        Ok(ObjectVersion {
            size: meta.size,
            last_modified_ms: meta.last_modified.timestamp_millis(),
            version: meta.e_tag.unwrap_or_else(|| meta.last_modified.to_rfc3339()),
        })
    }

    /// Every object below `prefix` (recursively), as URIs, sorted.
    pub async fn list(&self, prefix: &StoreUri) -> Result<Vec<StoreUri>> {
        use futures::TryStreamExt;
        let (store, path) = self.store(prefix)?;
        let metas: Vec<object_store::ObjectMeta> =
            store.list(Some(&path)).try_collect().await.map_err(|e| map_err(prefix, e))?;
        let mut out: Vec<StoreUri> = metas
            .into_iter()
            .map(|m| match prefix {
                StoreUri::File(_) => StoreUri::File(std::path::PathBuf::from(format!("/{}", m.location))),
                StoreUri::S3 { bucket, .. } => StoreUri::S3 { bucket: bucket.clone(), key: m.location.to_string() },
            })
            .collect();
        out.sort_by_key(|u| u.to_string());
        Ok(out)
    }

    /// Deletes an object; a missing one is not an error.
    pub async fn delete(&self, uri: &StoreUri) -> Result<()> {
        let (store, path) = self.store(uri)?;
        match store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(map_err(uri, e)),
        }
    }
}

fn map_err(uri: &StoreUri, e: object_store::Error) -> CoreError {
    match e {
        object_store::Error::NotFound { .. } => {
            CoreError::NotFound(format!("{uri}: no such object; check the URI and that the upload finished"))
        }
        object_store::Error::AlreadyExists { .. } => CoreError::AlreadyExists(format!("{uri} exists already")),
        object_store::Error::InvalidPath { source } => CoreError::invalid(format!("{uri}: invalid path ({source})")),
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
            CoreError::Unavailable(format!("{uri}: access denied by the store; check the credentials ({e})"))
        }
        other => CoreError::Unavailable(format!(
            "{uri}: the store could not be reached or failed ({other}); check the endpoint and retry"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_accepted_forms() {
        assert_eq!(
            StoreUri::parse("s3://b/x/y.nii.gz").unwrap(),
            StoreUri::S3 { bucket: "b".into(), key: "x/y.nii.gz".into() }
        );
        assert_eq!(StoreUri::parse("file:///tmp/a/../b").unwrap(), StoreUri::File("/tmp/b".into()));
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(StoreUri::parse("file:rel/x").unwrap(), StoreUri::File(cwd.join("rel/x")));
        assert_eq!(StoreUri::parse("rel/x").unwrap(), StoreUri::File(cwd.join("rel/x")));
        assert!(StoreUri::parse("file://relative").is_err());
        assert!(StoreUri::parse("gs://b/k").is_err());
        assert!(StoreUri::parse("s3:///k").is_err());
        let u = StoreUri::parse("s3://b/p").unwrap().join("cases/c1");
        assert_eq!(u.to_string(), "s3://b/p/cases/c1");
        assert_eq!(u.parent().to_string(), "s3://b/p/cases");
        assert_eq!(u.file_name(), "c1");
    }

    #[tokio::test]
    async fn local_put_get_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::new(StoreConfig::default());
        let uri = StoreUri::File(dir.path().join("a/b.bin"));
        stores.put(&uri, Bytes::from_static(b"hello")).await.unwrap();
        assert_eq!(stores.get(&uri).await.unwrap(), Bytes::from_static(b"hello"));
        assert!(stores.exists(&uri).await.unwrap());
        let listed = stores.list(&StoreUri::File(dir.path().to_path_buf())).await.unwrap();
        assert_eq!(listed, vec![uri.clone()]);
        let missing = StoreUri::File(dir.path().join("nope"));
        let e = stores.get(&missing).await.unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::NotFound);
        assert!(!stores.exists(&missing).await.unwrap());
    }
}
