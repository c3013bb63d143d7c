//! Per-study jobs: a stable study → selection → volumes → segmentation → SEG → export, each
//! step recorded in a durable job record in the object store (`<jobs root>/<id>/job.json`,
//! beside `seg.dcm` and `label.nii.gz`), as the trainer records its jobs.
//!
//! The job id is a hash of the study UID, the chosen series with their instance counts and the
//! model version: the same study sent twice is one job (a finished job is not redone), a
//! changed selection (a new series, a re-sent series with more slices) or a new model is a new
//! job. Records carry hashed UIDs and codes, never patient data.
//!
//! Resuming: a study's instances stay in the spool until its job is DONE or REJECTED, so after
//! a restart (or when the study is sent again) an unfinished job runs again. A job whose SEG is
//! already in the store (SEG_WRITTEN, EXPORTING, or FAILED at export) is not segmented again:
//! the stored SEG goes to the destinations that do not have it yet, so a destination that was
//! down gets the very same SEG and one that took it gets nothing twice.

use crate::offline::{GatewayError, finish, segment_study};
use crate::scu::{self, DimsePeer};
use crate::spool::Spool;
use crate::stow;
use brats_artifacts::window::SlidingWindow;
use brats_core::store::{StoreUri, Stores};
use brats_dicom::phi::UidHasher;
use brats_dicom::scan::scan_dir;
use brats_dicom::seg::SegOptions;
use brats_dicom::select::{Role, Selector, select};
use brats_dicom::study::load_selected;
use brats_dicom::{DicomError, LoadOptions};
use brats_inference::runtime::SegmentationModel;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
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
    /// How the study came: "dimse" or "dicomweb:<source>".
    #[serde(default)]
    pub origin: String,
    /// When the record was last written (ms since the Unix epoch).
    #[serde(default)]
    pub updated_ms: i64,
}

impl JobRecord {
    /// Whether the job's SEG is in the store and only its export is unfinished.
    pub fn awaits_export(&self) -> bool {
        self.seg_series_uid.is_some()
            && match self.state {
                JobState::SegWritten | JobState::Exporting => true,
                JobState::Failed => self.error.as_ref().is_some_and(|(code, _)| code == "export"),
                _ => false,
            }
    }
}

impl JobState {
    /// Whether the job is settled: it changes no more unless its study is sent again or the
    /// gateway restarts (which resumes a FAILED export).
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Done | JobState::Rejected | JobState::Failed)
    }
}

/// A configured export destination: a DIMSE peer (`ae_title`, `host`, `port`, optionally `tls`)
/// or a DICOMweb archive (`stow_url`, the base URL: `{stow_url}/studies` is posted to).
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
    /// C-STORE over DICOM TLS: the peer's CA (and our certificate for mutual TLS).
    #[serde(default)]
    pub tls: Option<crate::scu::PeerTls>,
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
            (Some(ae), Some(host), Some(port), None) => Ok(Target::Dimse(DimsePeer {
                ae_title: ae.clone(),
                host: host.clone(),
                port: *port,
                tls: self.tls.clone(),
            })),
            (None, None, None, Some(url)) if self.tls.is_none() => Ok(Target::Stow(url.clone())),
            (None, None, None, Some(_)) => Err(format!(
                "destinations.{}: tls is for C-STORE destinations; for STOW-RS use an https:// stow_url",
                self.name
            )),
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
    /// The model: in-process or on an inference service.
    pub model: Segmenter,
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
    /// Held while a job converts, segments and exports: one job at a time uses the model
    /// (and its threads), whether it came by DIMSE or by pull.
    pub busy: tokio::sync::Mutex<()>,
    /// Job outcomes for `/metrics`.
    pub metrics: crate::metrics::Metrics,
}

/// Where a job's segmentation runs.
pub enum Segmenter {
    /// An ONNX model in this process.
    Local(Arc<SegmentationModel>),
    /// A `brats-inference` service, through the store.
    Remote(Arc<crate::remote::RemoteModel>),
}

/// What [`Runner::prepare`] found.
pub enum Prepared {
    /// Nothing to run: the same selection is already DONE, or the study was REJECTED at
    /// selection (the record says why).
    Settled(JobRecord),
    /// A new (or unfinished) job: its record is saved as SELECTED; [`Runner::complete`] runs it.
    Run(PendingJob),
}

/// A selected job waiting for [`Runner::complete`].
pub struct PendingJob {
    /// Its record (state SELECTED).
    pub record: JobRecord,
    scan: brats_dicom::scan::Scan,
    selection: brats_dicom::select::Selection,
    dir: PathBuf,
    started: Instant,
    /// The record has a stored SEG still to export: [`Runner::complete`] only exports it.
    resume: bool,
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Runner {
    /// Processes stable studies from the spool until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            for study in self.spool.take_stable(self.stable_after, self.max_wait) {
                let dir = self.spool.study_dir(&study);
                if let Err(e) = self.process(&study, &dir, "dimse").await {
                    tracing::error!(study = %study, error = %e, "job failed");
                }
            }
        }
    }

    fn record_uri(&self, id: &str) -> StoreUri {
        self.jobs_root.join(&format!("{id}/job.json"))
    }

    async fn save(&self, record: &mut JobRecord) -> anyhow::Result<()> {
        record.updated_ms = now_ms();
        self.stores.put(&self.record_uri(&record.id), serde_json::to_vec_pretty(record)?.into()).await?;
        Ok(())
    }

    /// Reads a job record.
    pub async fn load(&self, id: &str) -> Result<JobRecord, brats_core::CoreError> {
        let bytes = self.stores.get(&self.record_uri(id)).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| brats_core::CoreError::Internal(format!("job {id}: unreadable record ({e})")))
    }

    /// Every job record, most recently updated first (unreadable records are skipped with a
    /// warning: one damaged file must not hide the others).
    pub async fn list(&self) -> Result<Vec<JobRecord>, brats_core::CoreError> {
        let mut records = Vec::new();
        for uri in self.stores.list(&self.jobs_root).await? {
            if uri.file_name() != "job.json" {
                continue;
            }
            match self.stores.get(&uri).await.map(|b| serde_json::from_slice::<JobRecord>(&b)) {
                Ok(Ok(r)) => records.push(r),
                Ok(Err(e)) => tracing::warn!(record = %uri, error = %e, "unreadable job record skipped"),
                Err(e) => tracing::warn!(record = %uri, error = %e, "job record vanished while listing"),
            }
        }
        records.sort_by(|a, b| b.updated_ms.cmp(&a.updated_ms).then_with(|| a.id.cmp(&b.id)));
        Ok(records)
    }

    /// Runs the job for the study (hash `study`) whose instances are in `dir`, from selection
    /// to export; `origin` is recorded ("dimse", "dicomweb:<source>").
    pub async fn process(&self, study: &str, dir: &Path, origin: &str) -> anyhow::Result<JobRecord> {
        match self.prepare(study, dir, origin, Vec::new()).await? {
            Prepared::Settled(record) => Ok(record),
            Prepared::Run(job) => self.complete(job).await,
        }
    }

    /// Reads the study's headers, chooses the four series and derives the job id; saves the
    /// record (SELECTED or REJECTED) with `earlier` stages' timings first (a pull's fetch).
    /// Fast (headers only), so an RPC can answer with the record.
    pub async fn prepare(
        &self,
        study: &str,
        dir: &Path,
        origin: &str,
        earlier: Vec<(String, f64)>,
    ) -> anyhow::Result<Prepared> {
        let started = Instant::now();
        let hasher = UidHasher::new(&self.load_options.salt);
        let scan = {
            let dir = dir.to_path_buf();
            let max = self.load_options.max_files;
            tokio::task::spawn_blocking(move || scan_dir(&dir, max)).await??
        };
        let selector = Selector::new(self.load_options.rules.clone()).map_err(anyhow::Error::msg)?;
        let selection = if scan.series.is_empty() {
            Err(DicomError::NoInstances { skipped: scan.skipped })
        } else {
            select(&scan, &selector, &self.load_options.overrides, &hasher)
        };
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
        let existing = self.load(&id).await.ok();
        if let Some(existing) = existing.as_ref().filter(|r| r.state == JobState::Done) {
            tracing::info!(job = %id, study, "study already done; nothing to do");
            let _ = std::fs::remove_dir_all(dir);
            return Ok(Prepared::Settled(existing.clone()));
        }
        if let (Some(existing), Ok(selection)) = (existing.as_ref().filter(|r| r.awaits_export()), &selection) {
            tracing::info!(job = %id, study, "the SEG is already stored; resuming at export");
            let selection = selection.clone();
            let record = existing.clone();
            return Ok(Prepared::Run(PendingJob {
                record,
                scan,
                selection,
                dir: dir.to_path_buf(),
                started,
                resume: true,
            }));
        }
        // A job picked up again after a restart keeps the origin it was first recorded with.
        let origin = existing.map(|r| r.origin).filter(|o| !o.is_empty()).unwrap_or_else(|| origin.to_string());
        let mut timings = earlier;
        timings.push(("select".into(), started.elapsed().as_secs_f64()));
        let mut record = JobRecord {
            id: id.clone(),
            study: study.to_string(),
            state: JobState::Selected,
            series,
            volumes: None,
            seg_series_uid: None,
            seg_frames: None,
            volumes_ml: None,
            timings,
            exports: Vec::new(),
            error: None,
            origin: origin.clone(),
            updated_ms: 0,
        };
        match selection {
            Err(e) => {
                self.reject(&mut record, &e, dir).await?;
                Ok(Prepared::Settled(record))
            }
            Ok(selection) => {
                self.save(&mut record).await?;
                tracing::info!(job = %id, study, origin = %origin, "job selected");
                Ok(Prepared::Run(PendingJob {
                    record,
                    scan,
                    selection,
                    dir: dir.to_path_buf(),
                    started,
                    resume: false,
                }))
            }
        }
    }

    /// A REJECTED record is final: saved, counted, the study's instances dropped (resend a
    /// fixed study).
    async fn reject(&self, record: &mut JobRecord, e: &DicomError, dir: &Path) -> anyhow::Result<()> {
        record.state = JobState::Rejected;
        record.error = Some((e.code().to_string(), e.to_string()));
        self.save(record).await?;
        self.metrics.finished(record);
        tracing::warn!(job = %record.id, code = e.code(), "study rejected");
        let _ = std::fs::remove_dir_all(dir);
        Ok(())
    }

    /// Converts, segments, writes and exports a selected job (one at a time).
    pub async fn complete(&self, job: PendingJob) -> anyhow::Result<JobRecord> {
        let _busy = self.busy.lock().await;
        let PendingJob { mut record, scan, selection, dir, started, resume } = job;
        let id = record.id.clone();
        // The same study may have been selected twice while another job held the model.
        if let Ok(existing) = self.load(&id).await
            && existing.state == JobState::Done
        {
            return Ok(existing);
        }
        let job_dir = self.jobs_root.join(&id);
        if resume {
            match self.stored_objects(&job_dir).await {
                Ok((seg, capture)) => return self.export_all(record, &seg, &capture, &dir, started).await,
                Err(e) => {
                    // The record says SEG written but the store lost it: segment again.
                    tracing::warn!(job = %id, error = %e, "the stored SEG is unreadable; segmenting again");
                    record = JobRecord { state: JobState::Selected, exports: Vec::new(), error: None, ..record };
                    record.timings.retain(|(stage, _)| stage == "fetch");
                }
            }
        }
        let t = Instant::now();
        let options = self.load_options.clone();
        let loaded = tokio::task::spawn_blocking(move || load_selected(&scan, selection, &options)).await?;
        record.timings.push(("dicom_to_volumes".into(), t.elapsed().as_secs_f64()));
        let loaded = match loaded {
            Ok(l) => l,
            Err(e) => {
                self.reject(&mut record, &e, &dir).await?;
                return Ok(record);
            }
        };
        record.volumes = Some(serde_json::json!({ "grid": loaded.grid, "warnings": loaded.warnings }));
        let mut seg_options = self.seg_options.clone();
        let result = match &self.model {
            Segmenter::Local(model) => {
                let (model, window) = (model.clone(), self.window);
                tokio::task::spawn_blocking(move || segment_study(&loaded, &model, &window, &seg_options)).await?
            }
            Segmenter::Remote(remote) => match remote.run(&loaded, &job_dir, &format!("gateway-{id}")).await {
                Ok((output, version)) => {
                    seg_options.algorithm_version = version;
                    tokio::task::spawn_blocking(move || finish(&loaded, output, &seg_options)).await?
                }
                Err(e) => {
                    record.state = JobState::Failed;
                    record.error = Some(("inference".into(), e.to_string()));
                    self.save(&mut record).await?;
                    self.metrics.finished(&record);
                    tracing::warn!(job = %id, error = %e, "the inference service did not segment the study");
                    return Ok(record);
                }
            },
        };
        let result = match result {
            Ok(r) => r,
            Err(GatewayError::Input(e)) => {
                self.reject(&mut record, &e, &dir).await?;
                return Ok(record);
            }
            Err(e) => {
                record.state = JobState::Failed;
                record.error = Some(("segment".into(), e.to_string()));
                self.save(&mut record).await?;
                self.metrics.finished(&record);
                return Err(e.into());
            }
        };
        record.timings.extend(result.timings.iter().cloned());
        self.stores.put(&job_dir.join("seg.dcm"), result.seg.bytes.clone().into()).await?;
        self.stores.put(&job_dir.join("label.nii.gz"), result.label_nifti()?.into()).await?;
        self.stores.put(&job_dir.join("quick-look.dcm"), result.capture.bytes.clone().into()).await?;
        record.state = JobState::SegWritten;
        record.seg_series_uid = Some(result.seg.series_uid.clone());
        record.seg_frames = Some(result.seg.frames);
        record.volumes_ml = Some(result.volumes_ml);
        self.save(&mut record).await?;
        self.export_all(record, &result.seg.bytes, &result.capture.bytes, &dir, started).await
    }

    /// The SEG and the quick-look written by an earlier run of the job.
    async fn stored_objects(&self, job_dir: &StoreUri) -> Result<(Vec<u8>, Vec<u8>), brats_core::CoreError> {
        let seg = self.stores.get(&job_dir.join("seg.dcm")).await?;
        let capture = self.stores.get(&job_dir.join("quick-look.dcm")).await?;
        Ok((seg.to_vec(), capture.to_vec()))
    }

    /// Sends the SEG (and the quick-look when configured) to every destination that does not
    /// have it yet; DONE when all have it (the study's instances are then dropped), else FAILED
    /// with the instances kept for a resume.
    async fn export_all(
        &self,
        mut record: JobRecord,
        seg: &[u8],
        capture: &[u8],
        dir: &Path,
        started: Instant,
    ) -> anyhow::Result<JobRecord> {
        let id = record.id.clone();
        record.state = JobState::Exporting;
        record.error = None;
        self.save(&mut record).await?;
        let t = Instant::now();
        let mut objects: Vec<&[u8]> = vec![seg];
        if self.send_quick_look {
            objects.push(capture);
        }
        let earlier = std::mem::take(&mut record.exports);
        for destination in &self.destinations {
            let before = earlier.iter().find(|e| e.destination == destination.name);
            let export = match before {
                Some(done) if done.stored => done.clone(),
                _ => {
                    let mut export = self.export(destination, &objects).await;
                    export.attempts += before.map(|b| b.attempts).unwrap_or(0);
                    export
                }
            };
            record.exports.push(export);
        }
        // A resumed job's stages: the latest export and total replace the earlier ones.
        record.timings.retain(|(stage, _)| stage != "export" && stage != "total");
        record.timings.push(("export".into(), t.elapsed().as_secs_f64()));
        record.timings.push(("total".into(), started.elapsed().as_secs_f64()));
        if record.exports.iter().all(|e| e.stored) {
            record.state = JobState::Done;
            let _ = std::fs::remove_dir_all(dir);
            tracing::info!(job = %id, seconds = started.elapsed().as_secs_f64(), "job done");
        } else {
            record.state = JobState::Failed;
            record.error = Some(("export".into(), "a destination did not take the SEG after 3 attempts".into()));
            tracing::warn!(job = %id, "export failed; the study is kept and the export resumes when it is sent again or the gateway restarts");
        }
        self.save(&mut record).await?;
        self.metrics.finished(&record);
        Ok(record)
    }

    /// Sends `objects` to one destination, up to 3 attempts (1 s, then 2 s apart).
    async fn export(&self, destination: &Destination, objects: &[&[u8]]) -> ExportResult {
        let mut export =
            ExportResult { destination: destination.name.clone(), stored: false, attempts: 0, error: None };
        for attempt in 0..3u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_secs(1 << (attempt - 1))).await;
            }
            export.attempts += 1;
            let sent = match destination.target() {
                Ok(Target::Dimse(peer)) => {
                    let mut sent = Ok(());
                    for object in objects {
                        sent = scu::store(&peer, &self.calling_ae, object).await.map_err(|e| e.to_string());
                        if sent.is_err() {
                            break;
                        }
                    }
                    sent
                }
                Ok(Target::Stow(url)) => stow::store(&url, objects).await.map_err(|e| e.to_string()),
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
        export
    }
}
