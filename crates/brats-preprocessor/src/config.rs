//! Service configuration: a TOML file, then `BRATS_PREPROCESS_*` environment overrides, then
//! command-line flags. Every default is documented on its field.

use brats_core::StoreConfig;
use brats_service::ServerConfig;
use serde::{Deserialize, Serialize};

/// Environment prefix of overrides; nested keys use `__`, e.g. `BRATS_PREPROCESS_STORE__S3_ENDPOINT`.
pub const ENV_PREFIX: &str = "BRATS_PREPROCESS_";

/// Everything `brats-preprocess serve` can be told.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// Where the gRPC server listens and how it stops (`[server]`, shared by every service):
    /// default listen `127.0.0.1:50051`, metrics `127.0.0.1:9464` (empty disables them), shutdown grace 30 s.
    pub server: ServerConfig,
    /// Where outputs go when a request names no `output_uri`: a `file://` path or `s3://bucket/prefix`;
    /// default `file:data` (relative to the working directory).
    pub output_root: String,
    /// Cases preprocessed at once (each holds ~0.5 GB for a full-size case); default 2.
    pub max_parallel: usize,
    /// Requests waiting beyond the running ones before RESOURCE_EXHAUSTED; default 16.
    pub max_queue: usize,
    /// Largest size per axis accepted; default 1024.
    pub max_axis: usize,
    /// Largest voxel count accepted per volume; default 2^28.
    pub max_voxels: usize,
    /// S3 settings (the `AWS_*` variables apply when unset).
    pub store: StoreConfig,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            server: ServerConfig::new("127.0.0.1:50051", "127.0.0.1:9464", 30),
            output_root: "file:data".into(),
            max_parallel: 2,
            max_queue: 16,
            max_axis: 1024,
            max_voxels: 1 << 28,
            store: StoreConfig::default(),
        }
    }
}

impl ServiceConfig {
    /// Loads the file (when given), then applies environment overrides.
    pub fn load(path: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let cfg = brats_service::load_config(ServiceConfig::default(), path, ENV_PREFIX)?;
        anyhow::ensure!(cfg.max_parallel >= 1, "max_parallel must be at least 1");
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_env() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "max_parallel = 3\n[store]\ns3_region = \"eu-west-1\"\n").unwrap();
        let cfg = ServiceConfig::load(Some(&p)).unwrap();
        assert_eq!(cfg.max_parallel, 3);
        assert_eq!(cfg.store.s3_region.as_deref(), Some("eu-west-1"));
        assert_eq!(cfg.server.listen, "127.0.0.1:50051");
        let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/preprocess.toml");
        assert_eq!(ServiceConfig::load(Some(&shipped)).unwrap().output_root, "file:///data");
        std::fs::write(&p, "max_paralel = 3\n").unwrap();
        assert!(ServiceConfig::load(Some(&p)).is_err());
    }

    /// The shared `[server]` section: a file may set any subset of it (the rest keeps this
    /// service's defaults), the shipped file sets all of it, and unknown keys are refused.
    #[test]
    fn server_section_overlays_key_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[server]\nlisten = \"0.0.0.0:6000\"\n").unwrap();
        let cfg = ServiceConfig::load(Some(&p)).unwrap();
        assert_eq!(cfg.server, ServerConfig::new("0.0.0.0:6000", "127.0.0.1:9464", 30));
        let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/preprocess.toml");
        assert_eq!(
            ServiceConfig::load(Some(&shipped)).unwrap().server,
            ServerConfig::new("0.0.0.0:50051", "0.0.0.0:9464", 30)
        );
        std::fs::write(&p, "[server]\nlisten_addr = \"0.0.0.0:6000\"\n").unwrap();
        assert!(ServiceConfig::load(Some(&p)).is_err());
        std::fs::write(&p, "listen = \"0.0.0.0:6000\"\n").unwrap();
        assert!(ServiceConfig::load(Some(&p)).is_err(), "listen belongs in [server]");
    }
}
