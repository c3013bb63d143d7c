//! `ListModels` and `GetModel`: the registry's models with every version's metadata, in pages.

use crate::models::ModelManager;
use brats_artifacts::metadata::{INPUT_CHANNELS, ModelMetadata, OUTPUT_CHANNELS};
use brats_artifacts::registry::{MODEL_FILE, validate_name};
use brats_core::labels::LabelConvention;
use brats_proto::v1 as pb;
use brats_service::status as core_status;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use tonic::Status;
use tracing::warn;

/// Models per page when the request leaves `page_size` at 0.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// The largest page served; bigger requests get this many.
pub const MAX_PAGE_SIZE: usize = 1000;

/// One page of models, by name, after the request's token.
pub(crate) async fn list_models(
    models: &ModelManager,
    req: &pb::ListModelsRequest,
) -> Result<pb::ListModelsResponse, Status> {
    let registry = models.registry();
    let scope = token_scope(&registry.root().to_string());
    let after = decode_token(&scope, &req.page_token)?;
    let size = match req.page_size as usize {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    };
    let all = registry.list().await.map_err(core_status)?;
    let rest: Vec<&String> = match &after {
        Some(a) => all.keys().filter(|name| name.as_str() > a.as_str()).collect(),
        None => all.keys().collect(),
    };
    let mut page = Vec::with_capacity(size.min(rest.len()));
    for name in rest.iter().take(size) {
        let (versions, aliases) = &all[name.as_str()];
        page.push(model_pb(models, name, versions, aliases).await?);
    }
    let next_page_token = match page.last() {
        Some(last) if rest.len() > size => encode_token(&scope, &last.name),
        _ => String::new(),
    };
    Ok(pb::ListModelsResponse { models: page, next_page_token })
}

/// One model with its versions and aliases.
pub(crate) async fn get_model(models: &ModelManager, name: &str) -> Result<pb::Model, Status> {
    validate_name("name", name).map_err(core_status)?;
    let registry = models.registry();
    let all = registry.list().await.map_err(core_status)?;
    let (versions, aliases) =
        all.get(name).ok_or_else(|| Status::not_found(format!("name: no model '{name}' in {}", registry.root())))?;
    model_pb(models, name, versions, aliases).await
}

async fn model_pb(
    models: &ModelManager,
    name: &str,
    versions: &[String],
    aliases: &BTreeMap<String, String>,
) -> Result<pb::Model, Status> {
    let registry = models.registry();
    let mut versions = versions.to_vec();
    // Newest first: numeric versions by number, then any others by name.
    versions.sort_by(|a, b| match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => y.cmp(&x),
        (Ok(_), Err(_)) => std::cmp::Ordering::Less,
        (Err(_), Ok(_)) => std::cmp::Ordering::Greater,
        (Err(_), Err(_)) => b.cmp(a),
    });
    let mut out = Vec::with_capacity(versions.len());
    for v in versions {
        let metadata = match registry.metadata(name, &v).await {
            Ok(m) => m,
            Err(e) if e.kind() == brats_core::ErrorKind::Unavailable => return Err(core_status(e)),
            // One unreadable file must not hide the rest of the registry.
            Err(e) => {
                warn!(model = name, version = %v, error = %e, "metadata.json unreadable; listed without it");
                None
            }
        };
        let created_at = match registry.registered_ms(name, &v).await {
            Ok(ms) => Some(brats_proto::timestamp_from_ms(ms)),
            Err(e) if e.kind() == brats_core::ErrorKind::Unavailable => return Err(core_status(e)),
            Err(e) => {
                warn!(model = name, version = %v, error = %e, "model graph unreadable; listed without its time");
                None
            }
        };
        out.push(pb::ModelVersion {
            created_at,
            aliases: aliases.iter().filter(|(_, to)| **to == v).map(|(a, _)| a.clone()).collect(),
            uri: registry.version_uri(name, &v).join(MODEL_FILE).to_string(),
            loaded: models.is_loaded(name, &v),
            metadata: metadata.as_ref().map(metadata_pb),
            version: v,
        });
    }
    Ok(pb::Model { name: name.to_string(), versions: out, aliases: aliases.clone().into_iter().collect() })
}

/// Every field of the proto's `ModelMetadata` from the version's `metadata.json`.
pub(crate) fn metadata_pb(m: &ModelMetadata) -> pb::ModelMetadata {
    let provenance = m.provenance();
    let labels = if provenance.labels.is_empty() {
        m.trainer_job.as_ref().map(|j| j.labels.clone()).unwrap_or_default()
    } else {
        provenance.labels.clone()
    };
    pb::ModelMetadata {
        input_channels: INPUT_CHANNELS.iter().map(|s| s.to_string()).collect(),
        output_channels: OUTPUT_CHANNELS.iter().map(|s| s.to_string()).collect(),
        roi_size: m.sliding_window().map(|w| w.roi_size.to_vec()).unwrap_or_default(),
        validation_dice: provenance.validation_dice.map(|d| pb::DiceScores {
            tc: d.tc,
            wt: d.wt,
            et: d.et,
            mean: d.mean,
        }),
        weights_sha256: m.weights.sha256.clone(),
        onnx_sha256: m.onnx.sha256.clone(),
        architecture: m.architecture().map(|a| pb::SegResNetSpec {
            blocks_down: a.blocks_down,
            blocks_up: a.blocks_up,
            init_filters: a.init_filters,
            in_channels: a.in_channels,
            out_channels: a.out_channels,
            dropout_prob: a.dropout_prob.map(|p| p as f32),
        }),
        training_job_id: m.training_job_id().unwrap_or_default(),
        pipeline_version: provenance.pipeline_version.clone().unwrap_or_default(),
        label_convention: match provenance.label_convention {
            None => pb::LabelConvention::Unspecified,
            Some(LabelConvention::Brats2018) => pb::LabelConvention::Brats2018,
            Some(LabelConvention::Brats2023) => pb::LabelConvention::Brats2023,
            Some(LabelConvention::Brats2015) => pb::LabelConvention::Brats2015,
        } as i32,
        description: m.description.clone(),
        labels: labels.into_iter().collect(),
    }
}

/// Tokens name the registry they page through, so one from another server (another registry)
/// is refused rather than silently paging something else. They are plain cursors, not secrets.
fn token_scope(registry_root: &str) -> String {
    hex::encode(&Sha256::digest(registry_root.as_bytes())[..8])
}

fn encode_token(scope: &str, last_name: &str) -> String {
    format!("m1.{scope}.{}", hex::encode(last_name.as_bytes()))
}

/// The last model name of the previous page (None for the first page).
fn decode_token(scope: &str, token: &str) -> Result<Option<String>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = |why: &str| {
        Status::invalid_argument(format!(
            "page_token: {why}; pass a next_page_token this server returned, or none for the first page"
        ))
    };
    let mut parts = token.splitn(3, '.');
    let (Some("m1"), Some(s), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad("not a ListModels page token"));
    };
    if s != scope {
        return Err(bad("issued for another registry"));
    }
    let name = hex::decode(name).ok().and_then(|b| String::from_utf8(b).ok()).ok_or_else(|| bad("malformed"))?;
    validate_name("page_token", &name).map_err(|_| bad("malformed"))?;
    Ok(Some(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_foreign_or_malformed_ones_are_refused() {
        let scope = token_scope("file:///models");
        let t = encode_token(&scope, "brats_mri_segmentation");
        assert_eq!(decode_token(&scope, &t).unwrap().as_deref(), Some("brats_mri_segmentation"));
        assert_eq!(decode_token(&scope, "").unwrap(), None);
        let other = encode_token(&token_scope("s3://elsewhere/models"), "brats_mri_segmentation");
        for bad in [other.as_str(), "garbage", "m1.x", &format!("m1.{scope}.zz"), &format!("m1.{scope}.2e2e")] {
            let e = decode_token(&scope, bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(e.message().starts_with("page_token:"), "{}", e.message());
        }
    }
}
