//! Configuration of `brats-inference serve`: a TOML file, then `BRATS_INFERENCE_*` environment
//! overrides (nested keys with `__`), then flags. Every default is documented on its field.

use brats_core::StoreConfig;
use brats_service::ServerConfig;
use serde::{Deserialize, Serialize};

/// Environment prefix of overrides.
pub const ENV_PREFIX: &str = "BRATS_INFERENCE_";

/// Everything the inference service can be told.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InferenceConfig {
    /// Where the gRPC server listens and how it stops (`[server]`, shared by every service):
    /// default listen `127.0.0.1:50052`, metrics `127.0.0.1:9465` (empty disables them), shutdown grace 60 s.
    pub server: ServerConfig,
    /// Model registry root (`file://…/models` or `s3://bucket/models`); default `file:data/models`.
    pub registry: String,
    /// Where outputs go when a request names no `output_uri`; default `file:data/predictions`.
    pub output_root: String,
    /// Address of a preprocessing service (e.g. `http://preprocess:50051`) that `Segment`
    /// requests are preprocessed by, tensors passing through the store; empty (the default) =
    /// the same preprocessing code in-process. `SegmentStream` always preprocesses in-process.
    pub preprocess_endpoint: String,
    /// Model served by default; default `segresnet`.
    pub model: String,
    /// Alias served by default and watched for hot reload; default `production`.
    pub alias: String,
    /// Execution providers in order: `tensorrt`, `cuda`, `cpu`; default `["cpu"]`.
    pub providers: Vec<String>,
    /// Fall through to the next provider when one fails to load (logged, reported per response).
    pub allow_fallback: bool,
    /// TensorRT fp16 engines; default true.
    pub fp16: bool,
    /// TensorRT engine and timing cache directory; default `data/trt-cache`.
    pub trt_cache_dir: String,
    /// ONNX Runtime intra-op threads; 0 = all cores.
    pub intra_threads: usize,
    /// ONNX Runtime graph optimisation level 0–3; default 3.
    pub optimization_level: u8,
    /// Sliding-window size X, Y, Z; default the bundle's 240, 240, 160.
    pub roi: [usize; 3],
    /// Sliding-window overlap; default 0.5.
    pub overlap: f64,
    /// Shape of the warm-up run before SERVING; default the roi (one full-size window).
    pub warmup_shape: Option<[usize; 3]>,
    /// Segmentations run at once; default 1 (one volume already uses every core).
    pub max_concurrent: usize,
    /// Requests waiting beyond the running ones before RESOURCE_EXHAUSTED; default 4.
    pub max_queue: usize,
    /// Seconds between checks of the alias for hot reload; 0 disables; default 10.
    pub reload_interval_s: u64,
    /// S3 settings (`AWS_*` variables apply when unset).
    pub store: StoreConfig,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        InferenceConfig {
            server: ServerConfig::new("127.0.0.1:50052", "127.0.0.1:9465", 60),
            registry: "file:data/models".into(),
            output_root: "file:data/predictions".into(),
            preprocess_endpoint: String::new(),
            model: brats_artifacts::registry::DEFAULT_MODEL_NAME.into(),
            alias: "production".into(),
            providers: vec!["cpu".into()],
            allow_fallback: false,
            fp16: true,
            trt_cache_dir: "data/trt-cache".into(),
            intra_threads: 0,
            optimization_level: 3,
            roi: [240, 240, 160],
            overlap: 0.5,
            warmup_shape: None,
            max_concurrent: 1,
            max_queue: 4,
            reload_interval_s: 10,
            store: StoreConfig::default(),
        }
    }
}

impl InferenceConfig {
    /// Loads the file (when given), then applies environment overrides.
    pub fn load(path: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let cfg = brats_service::load_config(InferenceConfig::default(), path, ENV_PREFIX)?;
        anyhow::ensure!(cfg.max_concurrent >= 1, "max_concurrent must be at least 1");
        anyhow::ensure!((0.0..1.0).contains(&cfg.overlap), "overlap must be in [0, 1)");
        anyhow::ensure!(
            cfg.roi.iter().all(|&r| r > 0 && r % 8 == 0),
            "roi sizes must be positive multiples of 8 (SegResNet)"
        );
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_parses_and_typos_are_refused() {
        let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/inference.toml");
        let cfg = InferenceConfig::load(Some(&shipped)).unwrap();
        assert_eq!(cfg.providers, vec!["tensorrt", "cuda", "cpu"]);
        assert_eq!(cfg.roi, [240, 240, 160]);
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "max_concurent = 2\n").unwrap();
        assert!(InferenceConfig::load(Some(&bad)).is_err());
        std::fs::write(&bad, "roi = [240, 240, 150]\n").unwrap();
        assert!(InferenceConfig::load(Some(&bad)).unwrap_err().to_string().contains("multiples of 8"));
    }
}
