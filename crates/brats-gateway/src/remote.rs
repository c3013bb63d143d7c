//! The inference service as the gateway's model: the four volumes go to the job's folder in
//! the object store, `brats.v1.Inference/Segment` reads them there and writes the label map
//! (and, when the grids were resampled, the probabilities) beside them, and the gateway reads
//! those back to build the SEG. The gateway then needs no model and no accelerator of its own;
//! the store must be one both services reach (a shared volume or a bucket).

use crate::offline::{GatewayError, ModelOutput, volume_files};
use brats_cli::{AuthChannel, ClientSecurity};
use brats_core::nifti_io::{ReadLimits, read_nifti};
use brats_core::store::{StoreUri, Stores};
use brats_dicom::StudyVolumes;
use brats_dicom::grid::GridMethod;
use brats_proto::v1 as pb;
use brats_proto::v1::inference_client::InferenceClient;
use std::sync::Arc;
use std::time::Instant;

/// Why the inference service could not segment a study (statuses and our own job URIs only).
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The service answered with an error.
    #[error("inference service: {code:?}: {message}")]
    Status {
        /// The gRPC status code.
        code: tonic::Code,
        /// Its message.
        message: String,
    },
    /// The store could not be written or read.
    #[error("store: {0}")]
    Store(#[from] brats_core::CoreError),
    /// What came back is not what the contract says.
    #[error("inference service output: {0}")]
    Output(String),
    /// The volumes could not be encoded.
    #[error(transparent)]
    Encode(#[from] GatewayError),
}

/// A model served by a `brats-inference` service.
pub struct RemoteModel {
    client: InferenceClient<AuthChannel>,
    selector: pb::ModelSelector,
    stores: Arc<Stores>,
    roi: [usize; 3],
    overlap: f64,
}

/// Parses `name`, `name@alias` or `name:version` (empty: the service's default at
/// "production").
pub fn parse_selector(text: &str) -> Result<pb::ModelSelector, String> {
    let text = text.trim();
    let (name, version, alias) = if let Some((name, alias)) = text.split_once('@') {
        (name, "", alias)
    } else if let Some((name, version)) = text.split_once(':') {
        (name, version, "")
    } else {
        (text, "", "")
    };
    if (text.contains('@') && alias.is_empty()) || (text.contains(':') && version.is_empty()) {
        return Err(format!("{text:?}: use NAME, NAME@ALIAS or NAME:VERSION"));
    }
    Ok(pb::ModelSelector { name: name.into(), version: version.into(), alias: alias.into() })
}

impl RemoteModel {
    /// A client of the service at `endpoint`, connecting lazily (the service may start later)
    /// with `security` (`[server.client]`: CA, our certificate, credentials).
    pub fn connect(
        endpoint: &str,
        security: &ClientSecurity,
        model: &str,
        stores: Arc<Stores>,
        roi: [usize; 3],
        overlap: f64,
    ) -> anyhow::Result<RemoteModel> {
        let selector = parse_selector(model).map_err(|e| anyhow::anyhow!("inference.model {e}"))?;
        let channel =
            security.connect_lazy(endpoint).map_err(|e| anyhow::anyhow!("inference.endpoint {endpoint}: {e}"))?;
        Ok(RemoteModel {
            client: InferenceClient::new(channel).max_decoding_message_size(16 << 20),
            selector,
            stores,
            roi,
            overlap,
        })
    }

    /// What job ids and SEGs name this model by until the service says which version ran.
    pub fn label(&self) -> String {
        let s = &self.selector;
        let name = if s.name.is_empty() { "default" } else { s.name.as_str() };
        match (s.version.as_str(), s.alias.as_str()) {
            ("", "") => format!("remote:{name}@production"),
            ("", alias) => format!("remote:{name}@{alias}"),
            (version, _) => format!("remote:{name}:{version}"),
        }
    }

    /// Segments `study`: volumes to `job_dir/inputs/`, Segment with outputs to
    /// `job_dir/inference/`, results read back. Returns the output and the model version that ran.
    pub async fn run(
        &self,
        study: &StudyVolumes,
        job_dir: &StoreUri,
        request_id: &str,
    ) -> Result<(ModelOutput, String), RemoteError> {
        let mut timings = Vec::new();
        let t = Instant::now();
        let inputs = job_dir.join("inputs");
        let mut image_uris = Vec::with_capacity(4);
        for (name, bytes) in volume_files(study, false)? {
            let uri = inputs.join(&name);
            self.stores.put(&uri, bytes.into()).await?;
            image_uris.push(uri.to_string());
        }
        timings.push(("volumes_to_store".to_string(), t.elapsed().as_secs_f64()));
        let resampled = matches!(study.grid, GridMethod::Resampled { .. });
        let t = Instant::now();
        let request = pb::SegmentRequest {
            request_id: request_id.to_string(),
            image_uris,
            model: Some(self.selector.clone()),
            output_uri: job_dir.join("inference").to_string(),
            options: Some(pb::SegmentOptions {
                overlap: Some(self.overlap as f32),
                roi_size: self.roi.iter().map(|&v| v as u32).collect(),
                write_probabilities: resampled,
                ..Default::default()
            }),
        };
        let response = self
            .client
            .clone()
            .segment(request)
            .await
            .map_err(|s| RemoteError::Status { code: s.code(), message: s.message().to_string() })?
            .into_inner();
        timings.push(("inference_service".to_string(), t.elapsed().as_secs_f64()));
        let t = Instant::now();
        let uri =
            StoreUri::parse(&response.label_map_uri).map_err(|e| RemoteError::Output(format!("label_map_uri: {e}")))?;
        let label = read_nifti(&self.stores.get(&uri).await?, brats_inference::LABEL_MAP_FILE, &ReadLimits::default())?;
        let expected = study.volumes[0].shape;
        if label.shape != expected {
            return Err(RemoteError::Output(format!(
                "a label map of shape {:?} for volumes of shape {expected:?}",
                label.shape
            )));
        }
        let probabilities = if resampled {
            let uri = StoreUri::parse(&response.probabilities_uri)
                .map_err(|e| RemoteError::Output(format!("probabilities_uri: {e}")))?;
            let bytes = self.stores.get(&uri).await?;
            let tensors = safetensors::SafeTensors::deserialize(&bytes)
                .map_err(|e| RemoteError::Output(format!("probabilities: {e}")))?;
            let view =
                tensors.tensor("probabilities").map_err(|e| RemoteError::Output(format!("probabilities: {e}")))?;
            if view.shape() != [3, expected[0], expected[1], expected[2]] {
                return Err(RemoteError::Output(format!("probabilities of shape {:?}", view.shape())));
            }
            Some(view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        } else {
            None
        };
        timings.push(("results_from_store".to_string(), t.elapsed().as_secs_f64()));
        let output = ModelOutput {
            label: label.data.iter().map(|&v| v as u8).collect(),
            shape: label.shape,
            probabilities,
            timings,
        };
        Ok((output, response.model_version))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_selectors_parse_and_mistakes_are_named() {
        let s = parse_selector("brats_mri_segmentation@staging").unwrap();
        assert_eq!((s.name.as_str(), s.version.as_str(), s.alias.as_str()), ("brats_mri_segmentation", "", "staging"));
        let s = parse_selector("m:3").unwrap();
        assert_eq!((s.name.as_str(), s.version.as_str(), s.alias.as_str()), ("m", "3", ""));
        assert_eq!(parse_selector("").unwrap(), pb::ModelSelector::default());
        assert!(parse_selector("m@").unwrap_err().contains("NAME@ALIAS"));
        assert!(parse_selector("m:").is_err());
    }
}
