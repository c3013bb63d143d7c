//! `brats-gateway serve`'s configuration (TOML; `deploy/gateway.toml` shows every key).

use crate::jobs::Destination;
use serde::Deserialize;
use std::path::PathBuf;

/// The DIMSE listener.
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
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

/// Everything `serve` reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// DIMSE listener.
    pub dimse: DimseConfig,
    /// Study stability.
    pub study: StudyConfig,
    /// Where received instances wait (a local folder).
    pub spool_dir: PathBuf,
    /// Root of job records (a store URI: `file:…` or `s3://…`).
    pub jobs_root: String,
    /// The model.
    pub model: ModelConfig,
    /// Where SEGs are sent (C-STORE).
    pub destinations: Vec<Destination>,
    /// Also send the quick-look Secondary Capture (for viewers without SEG support).
    pub send_quick_look: bool,
    /// Salt of hashed UIDs in logs and records.
    pub salt: String,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            dimse: DimseConfig::default(),
            study: StudyConfig::default(),
            spool_dir: PathBuf::from("data/gateway/spool"),
            jobs_root: "file:data/gateway/jobs".into(),
            model: ModelConfig::default(),
            destinations: Vec::new(),
            send_quick_look: true,
            salt: brats_dicom::phi::DEFAULT_SALT.into(),
        }
    }
}

impl GatewayConfig {
    /// Reads a TOML file; unknown keys are errors naming the key.
    pub fn load(path: &std::path::Path) -> anyhow::Result<GatewayConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        let config: GatewayConfig = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        for d in &config.destinations {
            d.target().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        }
        Ok(config)
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
