//! Registration of a finished job's model in the inference registry.

use brats_core::error::CoreError;
use brats_core::store::StoreUri;
use bytes::Bytes;
use tracing::info;

use brats_train::events::{EventKind, TrainOutcome};
use brats_train::spec::TrainConfig;

use super::*;

impl TrainerService {
    /// Registers the trained model: next version = highest numeric version + 1; model.onnx and
    /// metadata.json copied; "production" moved only if the spec asks.
    pub(super) async fn register(
        &self,
        job: &Job,
        config: &TrainConfig,
        outcome: &TrainOutcome,
    ) -> Result<(), CoreError> {
        let reg = &config.registration;
        if reg.skip {
            let mut inner = job.inner.lock().await;
            let note =
                EventKind::info("registration skipped (registration.skip); artefacts are under the job's artifacts/");
            let _ = self.emit(job, &mut inner, note, Durability::Now).await;
            return Ok(());
        }
        brats_artifacts::registry::validate_name("registration.model_name", &reg.model_name)?;
        let onnx = self.stores.get(&StoreUri::parse(&outcome.onnx_uri)?).await?;
        let mut metadata: serde_json::Value = match self.stores.get(&StoreUri::parse(&outcome.metadata_uri)?).await {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| CoreError::invalid(format!("{}: not JSON ({e})", outcome.metadata_uri)))?,
            Err(CoreError::NotFound(_)) => serde_json::json!({}),
            Err(e) => return Err(e),
        };
        if let Some(m) = metadata.as_object_mut() {
            // The version's description is the operator's words; the exported metadata only
            // carries the bundle's generic one.
            if !reg.description.is_empty() {
                m.insert("description".into(), reg.description.clone().into());
            }
            m.entry("trainer_job").or_insert_with(|| {
                serde_json::json!({ "job_id": job.id, "labels": config.labels, "seed": config.seed,
                                    "epochs": outcome.epochs, "best_epoch": outcome.best_epoch })
            });
            // Where the run's curves and parameters are, when it was tracked.
            if let Some(run_id) = &outcome.mlflow_run_id {
                m.insert("mlflow_run_id".into(), run_id.clone().into());
            }
        }
        let alias = reg.promote_to_production.then_some("production");
        let body = Bytes::from(serde_json::to_vec_pretty(&metadata).expect("metadata serialises"));
        let (version, dir) = self.registry.register_next(&reg.model_name, onnx, Some(body), alias).await?;
        info!(model = %reg.model_name, version = %version, promoted = alias.is_some(), "model registered");
        {
            use brats_service::security::audit::{Action, AuditEvent, Outcome, Resource};
            let id = format!("{}/{version}", reg.model_name);
            let actions: &[(Action, &str)] = if alias.is_some() {
                &[(Action::ModelRegistered, "registered"), (Action::AliasMoved, "production")]
            } else {
                &[(Action::ModelRegistered, "registered")]
            };
            for &(action, reason) in actions {
                let event = AuditEvent {
                    rpc: "registry",
                    action,
                    outcome: Outcome::Succeeded,
                    grpc_code: tonic::Code::Ok,
                    reason,
                    principal: None,
                    source_ip: None,
                    resource: Some(Resource { kind: "model_version", id: &id }),
                    latency_ms: None,
                };
                if let Err(e) = self.settings.audit.record(event) {
                    tracing::warn!(error = %e, "audit record of a registration could not be written");
                }
            }
        }
        let mut inner = job.inner.lock().await;
        let event = EventKind::ModelRegistered {
            name: reg.model_name.clone(),
            version,
            uri: format!("{dir}/"),
            aliases: alias.map(|a| vec![a.to_string()]).unwrap_or_default(),
        };
        let _ = self.emit(job, &mut inner, event, Durability::Now).await;
        Ok(())
    }
}
