//! `brats-gateway serve`'s configuration: a TOML file (`deploy/gateway.toml` shows every key),
//! then `BRATS_GATEWAY_*` environment overrides (nested keys with `__`, e.g.
//! `BRATS_GATEWAY_DIMSE__AE_TITLE`), as for the other services.

use crate::jobs::Destination;
use brats_service::ServerConfig;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Environment prefix of overrides.
pub const ENV_PREFIX: &str = "BRATS_GATEWAY_";

/// The DIMSE listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DimseConfig {
    /// Listen address.
    pub listen: String,
    /// Our AE title.
    pub ae_title: String,
    /// Calling AE titles allowed (empty: any).
    pub allowed_calling_aes: Vec<String>,
    /// Associations open at once.
    pub max_associations: usize,
    /// Largest PDU received.
    pub max_pdu: u32,
    /// Free space the spool's file system keeps, MiB; below it stores are refused.
    pub min_free_mb: u64,
    /// Largest instance, MiB.
    pub max_instance_mb: usize,
    /// Idle seconds before an association is dropped.
    pub timeout_s: u64,
    /// DICOM TLS for the listener (the services' `[server.tls]` keys; `client_auth =
    /// "required"` with `client_ca_file` for mutual TLS). Empty `cert_file`: plain TCP.
    pub tls: brats_service::security::tls::TlsConfig,
}

impl Default for DimseConfig {
    fn default() -> Self {
        DimseConfig {
            listen: "0.0.0.0:11112".into(),
            ae_title: "BRATS".into(),
            allowed_calling_aes: Vec::new(),
            max_associations: 16,
            max_pdu: 131_072,
            min_free_mb: 1024,
            max_instance_mb: 1024,
            timeout_s: 60,
            tls: Default::default(),
        }
    }
}

/// When a study counts as complete.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StudyConfig {
    /// Seconds without a new instance (and no open association) before a study is stable.
    pub stable_after_s: f64,
    /// Longest wait for a study, seconds.
    pub max_wait_s: f64,
}

impl Default for StudyConfig {
    fn default() -> Self {
        StudyConfig { stable_after_s: 30.0, max_wait_s: 900.0 }
    }
}

/// The model the gateway runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// The ONNX file.
    pub onnx: PathBuf,
    /// Name recorded in the SEG.
    pub name: String,
    /// Version recorded in the SEG and part of job ids (default: sha256 prefix of the file).
    pub version: Option<String>,
    /// Sliding-window size.
    pub roi: [usize; 3],
    /// Sliding-window overlap.
    pub overlap: f64,
    /// Intra-op threads (0: all cores).
    pub threads: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            onnx: PathBuf::from("model.onnx"),
            name: "SegResNet".into(),
            version: None,
            roi: [240, 240, 160],
            overlap: 0.5,
            threads: 0,
        }
    }
}

/// Where the model runs: in this process (`[model] onnx`) or on a `brats-inference` service.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RemoteInferenceConfig {
    /// The inference service's gRPC address (e.g. `https://inference:50052`); empty: run
    /// `[model] onnx` in-process. Volumes and results travel through `jobs_root`, which the
    /// service must reach too; it is called with `[server.client]`'s TLS and credentials.
    pub endpoint: String,
    /// The model: `NAME`, `NAME@ALIAS` or `NAME:VERSION` (empty: the service's default model
    /// at "production"). Job ids use this text; pin a version to redo studies on a new one.
    pub model: String,
}

/// A DICOMweb archive studies can be pulled from (SubmitStudy, the webhook).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// Its name (SubmitStudyRequest.source).
    pub name: String,
    /// The archive's DICOMweb base URL (below which `/studies` lives).
    pub url: String,
}

/// The HTTP webhook an archive's script calls when a study is stable (pull mode).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Listen address; empty: no webhook.
    pub listen: String,
    /// The source the announced studies are pulled from (empty: the only one).
    pub source: String,
    /// A file holding the shared secret callers send as `Authorization: Bearer <secret>`;
    /// empty: any caller that reaches the port may announce a study (loopback only).
    pub token_file: String,
}

/// Everything `serve` reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// The gRPC API (`[server]`, shared by every service: listen, metrics, TLS, auth, audit):
    /// default listen `127.0.0.1:50054`, metrics `127.0.0.1:9467`.
    pub server: ServerConfig,
    /// DIMSE listener.
    pub dimse: DimseConfig,
    /// Study stability.
    pub study: StudyConfig,
    /// Where received instances wait (a local folder).
    pub spool_dir: PathBuf,
    /// Root of job records (a store URI: `file:…` or `s3://…`).
    pub jobs_root: String,
    /// The model (in-process) and the sliding window (both modes).
    pub model: ModelConfig,
    /// The inference service, when the model runs there.
    pub inference: RemoteInferenceConfig,
    /// Where SEGs are sent (C-STORE or STOW-RS).
    pub destinations: Vec<Destination>,
    /// DICOMweb archives studies may be pulled from.
    pub sources: Vec<Source>,
    /// The pull-mode webhook.
    pub webhook: WebhookConfig,
    /// Also send the quick-look Secondary Capture (for viewers without SEG support).
    pub send_quick_look: bool,
    /// Salt of hashed UIDs in logs and records.
    pub salt: String,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            server: ServerConfig::new("127.0.0.1:50054", "127.0.0.1:9467", 30),
            dimse: DimseConfig::default(),
            study: StudyConfig::default(),
            spool_dir: PathBuf::from("data/gateway/spool"),
            jobs_root: "file:data/gateway/jobs".into(),
            model: ModelConfig::default(),
            inference: RemoteInferenceConfig::default(),
            destinations: Vec::new(),
            sources: Vec::new(),
            webhook: WebhookConfig::default(),
            send_quick_look: true,
            salt: brats_dicom::phi::DEFAULT_SALT.into(),
        }
    }
}

impl GatewayConfig {
    /// Reads a TOML file, then the `BRATS_GATEWAY_*` overrides; unknown keys are errors
    /// naming the key, and every destination, source and the webhook are checked here, so a
    /// mistake stops the start rather than the first study.
    pub fn load(path: &std::path::Path) -> anyhow::Result<GatewayConfig> {
        let config: GatewayConfig = brats_service::load_config(GatewayConfig::default(), Some(path), ENV_PREFIX)?;
        let at = |e: String| anyhow::anyhow!("{}: {e}", path.display());
        for d in &config.destinations {
            d.target().map_err(at)?;
        }
        let mut names = std::collections::BTreeSet::new();
        for d in &config.destinations {
            anyhow::ensure!(names.insert(&d.name), "{}: destinations.{} is named twice", path.display(), d.name);
        }
        let mut names = std::collections::BTreeSet::new();
        for s in &config.sources {
            anyhow::ensure!(names.insert(&s.name), "{}: sources.{} is named twice", path.display(), s.name);
            reqwest::Url::parse(&s.url)
                .map_err(|e| at(format!("sources.{}: url {e}; give the archive's DICOMweb base URL", s.name)))?;
        }
        if !config.webhook.listen.is_empty() {
            config.source(&config.webhook.source).map_err(|e| at(format!("webhook.source: {e}")))?;
        }
        Ok(config)
    }

    /// The source named `name` (empty: the only one), or what is configured instead.
    pub fn source(&self, name: &str) -> Result<&Source, String> {
        let names = || self.sources.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ");
        match (name, self.sources.as_slice()) {
            (_, []) => Err("no [[sources]] configured: add the DICOMweb archive to pull from".into()),
            ("", [only]) => Ok(only),
            ("", _) => Err(format!("several sources are configured ({}); name one", names())),
            (name, sources) => sources
                .iter()
                .find(|s| s.name == name)
                .ok_or_else(|| format!("no source named {name:?}; configured: {}", names())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_configuration_parses_to_the_defaults_and_typos_are_named() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/gateway.toml");
        let shipped = GatewayConfig::load(&path).unwrap();
        let defaults = GatewayConfig::default();
        assert_eq!(format!("{shipped:?}"), format!("{defaults:?}"));
        let e = toml::from_str::<GatewayConfig>("[dimse]\nae_titel = \"X\"\n").unwrap_err().to_string();
        assert!(e.contains("ae_titel"), "{e}");
        let tmp = tempfile::tempdir().unwrap();
        let half = tmp.path().join("g.toml");
        std::fs::write(&half, "[[destinations]]\nname = \"pacs\"\nhost = \"h\"\n").unwrap();
        let e = GatewayConfig::load(&half).unwrap_err().to_string();
        assert!(e.contains("destinations.pacs") && e.contains("stow_url"), "{e}");
    }
}
