//! Per-study jobs: a stable study → selection → volumes → segmentation → SEG → export, each
//! step recorded in a durable job record in the object store (`<jobs root>/<id>/job.json`,
//! beside `seg.dcm` and `label.nii.gz`), as the trainer records its jobs.
//!
//! The job id is a hash of the study UID, the chosen series with their instance counts and the
//! model version: the same study sent twice is one job (a finished job is not redone), a
//! changed selection (a new series, a re-sent series with more slices) or a new model is a new
//! job. Records carry hashed UIDs and codes, never patient data.

use crate::offline::{GatewayError, segment_study};
use crate::scu::{self, DimsePeer};
use crate::spool::Spool;
use crate::stow;
use brats_artifacts::window::SlidingWindow;
use brats_core::store::{StoreUri, Stores};
use brats_dicom::phi::UidHasher;
use brats_dicom::scan::scan_dir;
use brats_dicom::seg::SegOptions;
use brats_dicom::select::{Role, Selector, select};
use brats_dicom::study::load_scan;
use brats_dicom::{DicomError, LoadOptions};
use brats_inference::runtime::SegmentationModel;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    /// Series chosen; volumes being made and segmented.
    Selected,
    /// The SEG is written to the store.
    SegWritten,
    /// Sending to the destinations.
    Exporting,
    /// Every destination has the SEG.
    Done,
    /// The input is unusable (a named problem; resend a fixed study).
    Rejected,
    /// Something on our side failed (model, store, a destination after its retries).
    Failed,
}

/// One destination's export result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportResult {
    /// The destination's name.
    pub destination: String,
    /// Stored there.
    pub stored: bool,
    /// Attempts made.
    pub attempts: u32,
    /// The last error, if any (AE titles and statuses only).
    pub error: Option<String>,
}

/// The durable record of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Job id (hash of study, selection and model version).
    pub id: String,
    /// Hashed StudyInstanceUID.
    pub study: String,
    /// State.
    pub state: JobState,
    /// Role → hashed series UID.
    pub series: std::collections::BTreeMap<Role, String>,
    /// Grid method and warnings of the volume step.
    pub volumes: Option<serde_json::Value>,
    /// The SEG's SeriesInstanceUID.
    pub seg_series_uid: Option<String>,
    /// Frames in the SEG.
    pub seg_frames: Option<usize>,
    /// TC, WT, ET in millilitres.
    pub volumes_ml: Option<[f64; 3]>,
    /// Seconds per stage.
    pub timings: Vec<(String, f64)>,
    /// Per-destination export results.
    pub exports: Vec<ExportResult>,
    /// For REJECTED/FAILED: a stable code and the message.
    pub error: Option<(String, String)>,
}

/// A configured export destination: a DIMSE peer (`ae_title`, `host`, `port`) or a DICOMweb
/// archive (`stow_url`, the base URL: `{stow_url}/studies` is posted to).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// Its name (in job records).
    pub name: String,
    /// C-STORE: the peer's AE title.
    #[serde(default)]
    pub ae_title: Option<String>,
    /// C-STORE: host.
    #[serde(default)]
    pub host: Option<String>,
    /// C-STORE: port.
    #[serde(default)]
    pub port: Option<u16>,
    /// STOW-RS: the archive's DICOMweb base URL.
    #[serde(default)]
    pub stow_url: Option<String>,
}

/// How a destination is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// DIMSE C-STORE.
    Dimse(DimsePeer),
    /// STOW-RS base URL.
    Stow(String),
}

impl Destination {
    /// The target, or what is missing (names the destination and the keys).
    pub fn target(&self) -> Result<Target, String> {
        match (&self.ae_title, &self.host, &self.port, &self.stow_url) {
            (Some(ae), Some(host), Some(port), None) => {
                Ok(Target::Dimse(DimsePeer { ae_title: ae.clone(), host: host.clone(), port: *port }))
            }
            (None, None, None, Some(url)) => Ok(Target::Stow(url.clone())),
            _ => Err(format!(
                "destinations.{}: give either ae_title, host and port (C-STORE) or stow_url (STOW-RS)",
                self.name
            )),
        }
    }
}

/// Everything a job needs.
pub struct Runner {
    /// The spool studies come from.
    pub spool: Arc<Spool>,
    /// Object stores.
    pub stores: Arc<Stores>,
    /// Root of the job records.
    pub jobs_root: StoreUri,
    /// The model.
    pub model: Arc<SegmentationModel>,
    /// Its version (part of the job id).
    pub model_version: String,
    /// Sliding window.
    pub window: SlidingWindow,
    /// What the SEG says about its maker.
    pub seg_options: SegOptions,
    /// Loading options (rules, salt, limits).
    pub load_options: LoadOptions,
    /// Where SEGs go.
    pub destinations: Vec<Destination>,
    /// Our AE title when calling.
    pub calling_ae: String,
    /// Also send the quick-look Secondary Capture to the destinations.
    pub send_quick_look: bool,
    /// Quiet time before a study is stable.
    pub stable_after: Duration,
    /// Longest wait for a study.
    pub max_wait: Duration,
}

impl Runner {
    /// Processes stable studies, one at a time, until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            for study in self.spool.take_stable(self.stable_after, self.max_wait) {
                if let Err(e) = self.process(&study).await {
                    tracing::error!(study = %study, error = %e, "job failed");
                }
            }
        }
    }

    fn record_uri(&self, id: &str) -> StoreUri {
        self.jobs_root.join(&format!("{id}/job.json"))
    }

    async fn save(&self, record: &JobRecord) -> anyhow::Result<()> {
        self.stores.put(&self.record_uri(&record.id), serde_json::to_vec_pretty(record)?.into()).await?;
        Ok(())
    }

    /// Reads a job record.
    pub async fn load(&self, id: &str) -> anyhow::Result<JobRecord> {
        Ok(serde_json::from_slice(&self.stores.get(&self.record_uri(id)).await?)?)
    }

    /// Runs the job for one stable study folder.
    pub async fn process(&self, study: &str) -> anyhow::Result<()> {
        let dir = self.spool.study_dir(study);
        let started = Instant::now();
        let hasher = UidHasher::new(&self.load_options.salt);
        let scan = {
            let dir = dir.clone();
            let max = self.load_options.max_files;
            tokio::task::spawn_blocking(move || scan_dir(&dir, max)).await??
        };
        let selector = Selector::new(self.load_options.rules.clone()).map_err(anyhow::Error::msg)?;
        let selection = select(&scan, &selector, &self.load_options.overrides, &hasher);
        // The job id: study, chosen series with their sizes, model version.
        let mut h = Sha256::new();
        h.update(study.as_bytes());
        let series = match &selection {
            Ok(sel) => {
                for role in Role::ALL {
                    let uid = sel.uid(role);
                    h.update(uid.as_bytes());
                    h.update(scan.get(uid).map(|s| s.frame_count()).unwrap_or(0).to_le_bytes());
                }
                sel.roles.iter().map(|(r, c)| (*r, c.series_hash.clone())).collect()
            }
            Err(_) => {
                for s in &scan.series {
                    h.update(s.uid.as_bytes());
                    h.update(s.frame_count().to_le_bytes());
                }
                Default::default()
            }
        };
        h.update(self.model_version.as_bytes());
        let id = hex::encode(&h.finalize()[..8]);
        if let Ok(existing) = self.load(&id).await
            && existing.state == JobState::Done
        {
            tracing::info!(job = %id, study, "study already done; nothing to do");
            let _ = std::fs::remove_dir_all(&dir);
            return Ok(());
        }
        let mut record = JobRecord {
            id: id.clone(),
            study: study.to_string(),
            state: JobState::Selected,
            series,
            volumes: None,
            seg_series_uid: None,
            seg_frames: None,
            volumes_ml: None,
            timings: vec![("select".into(), started.elapsed().as_secs_f64())],
            exports: Vec::new(),
            error: None,
        };
        let reject = |record: &mut JobRecord, e: &DicomError| {
            record.state = JobState::Rejected;
            record.error = Some((e.code().to_string(), e.to_string()));
        };
        if let Err(e) = &selection {
            reject(&mut record, e);
            self.save(&record).await?;
            tracing::warn!(job = %id, code = e.code(), "study rejected");
            let _ = std::fs::remove_dir_all(&dir);
            return Ok(());
        }
        self.save(&record).await?;
        tracing::info!(job = %id, study, "job started");

        let t = Instant::now();
        let options = self.load_options.clone();
        let loaded = tokio::task::spawn_blocking(move || load_scan(&scan, &options)).await?;
        record.timings.push(("convert".into(), t.elapsed().as_secs_f64()));
        let loaded = match loaded {
            Ok(l) => l,
            Err(e) => {
                reject(&mut record, &e);
                self.save(&record).await?;
                tracing::warn!(job = %id, code = e.code(), "study rejected");
                let _ = std::fs::remove_dir_all(&dir);
                return Ok(());
            }
        };
        record.volumes = Some(serde_json::json!({ "grid": loaded.grid, "warnings": loaded.warnings }));
        let model = self.model.clone();
        let window = self.window;
        let seg_options = self.seg_options.clone();
        let result = tokio::task::spawn_blocking(move || segment_study(&loaded, &model, &window, &seg_options)).await?;
        let result = match result {
            Ok(r) => r,
            Err(GatewayError::Input(e)) => {
                reject(&mut record, &e);
                self.save(&record).await?;
                let _ = std::fs::remove_dir_all(&dir);
                return Ok(());
            }
            Err(e) => {
                record.state = JobState::Failed;
                record.error = Some(("segment".into(), e.to_string()));
                self.save(&record).await?;
                return Err(e.into());
            }
        };
        record.timings.extend(result.timings.iter().cloned());
        let job_dir = self.jobs_root.join(&id);
        self.stores.put(&job_dir.join("seg.dcm"), result.seg.bytes.clone().into()).await?;
        self.stores.put(&job_dir.join("label.nii.gz"), result.label_nifti()?.into()).await?;
        self.stores.put(&job_dir.join("quick-look.dcm"), result.capture.bytes.clone().into()).await?;
        record.state = JobState::SegWritten;
        record.seg_series_uid = Some(result.seg.series_uid.clone());
        record.seg_frames = Some(result.seg.frames);
        record.volumes_ml = Some(result.volumes_ml);
        self.save(&record).await?;

        record.state = JobState::Exporting;
        self.save(&record).await?;
        let t = Instant::now();
        for destination in &self.destinations {
            let mut export =
                ExportResult { destination: destination.name.clone(), stored: false, attempts: 0, error: None };
            for attempt in 0..3u32 {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_secs(1 << (attempt - 1))).await;
                }
                export.attempts += 1;
                let mut objects: Vec<&[u8]> = vec![&result.seg.bytes];
                if self.send_quick_look {
                    objects.push(&result.capture.bytes);
                }
                let sent = match destination.target() {
                    Ok(Target::Dimse(peer)) => {
                        let mut sent = Ok(());
                        for object in &objects {
                            sent = scu::store(&peer, &self.calling_ae, object).await.map_err(|e| e.to_string());
                            if sent.is_err() {
                                break;
                            }
                        }
                        sent
                    }
                    Ok(Target::Stow(url)) => stow::store(&url, &objects).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e),
                };
                match sent {
                    Ok(()) => {
                        export.stored = true;
                        export.error = None;
                        break;
                    }
                    Err(e) => export.error = Some(e),
                }
            }
            record.exports.push(export);
        }
        record.timings.push(("export".into(), t.elapsed().as_secs_f64()));
        record.timings.push(("total".into(), started.elapsed().as_secs_f64()));
        if record.exports.iter().all(|e| e.stored) {
            record.state = JobState::Done;
            let _ = std::fs::remove_dir_all(&dir);
            tracing::info!(job = %id, seconds = started.elapsed().as_secs_f64(), "job done");
        } else {
            record.state = JobState::Failed;
            record.error = Some(("export".into(), "a destination did not take the SEG after 3 attempts".into()));
            tracing::warn!(job = %id, "export failed");
        }
        self.save(&record).await?;
        Ok(())
    }
}
