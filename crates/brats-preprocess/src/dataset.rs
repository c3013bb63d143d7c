//! A whole datalist preprocessed into cached full volumes plus a manifest: what the gRPC
//! `PreprocessDataset` handler serves and what the trainer runs in-process, one code path.
//!
//! [`DatasetPlan::load`] reads and checks the datalist; [`DatasetPlan::run`] preprocesses its
//! cases (each through the caller's runner, so the service can bound them by its slots) and
//! yields one [`DatasetEvent::Case`] per case as it finishes, then one [`DatasetEvent::Done`]
//! after the manifest is written. The stream is lazy: dropping it stops starting cases (the
//! ones finished stay cached and are reused next time).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use brats_artifacts::manifest::{MANIFEST_FILE, Manifest, ManifestCase};
use brats_core::error::CoreError;
use brats_core::store::{StoreUri, Stores};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};

use crate::jobs::{self, CaseJob, CaseOutput, DatalistCase};
use crate::pipeline::{Options, PIPELINE_VERSION};

/// What to preprocess.
#[derive(Debug, Clone)]
pub struct DatasetSpec {
    /// The MONAI decathlon datalist.
    pub datalist: StoreUri,
    /// Base for its relative paths; None = the datalist's folder.
    pub base: Option<StoreUri>,
    /// Sections to preprocess; empty = `training` and `validation`.
    pub sections: Vec<String>,
    /// Pipeline options (each case's seed is derived from its id).
    pub options: Options,
    /// Where cases and the manifest go (`cases/…`, `datasets/<key>/manifest.json`).
    pub output_root: StoreUri,
    /// Recompute cases even when cached outputs exist.
    pub force: bool,
}

/// Why a dataset could not be planned: the request field concerned and the error.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {source}")]
pub struct PlanError {
    /// `datalist_uri` (unreadable or not a datalist).
    pub field: &'static str,
    /// What went wrong.
    pub source: CoreError,
}

/// A checked datalist, ready to run.
#[derive(Debug, Clone)]
pub struct DatasetPlan {
    datalist: StoreUri,
    cases: Vec<DatalistCase>,
    options: Options,
    output_root: StoreUri,
    key: String,
    force: bool,
}

/// Cases done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Cases in the dataset.
    pub total: u32,
    /// Cases finished (either way).
    pub completed: u32,
    /// Finished cases whose cached outputs were reused.
    pub reused: u32,
    /// Finished cases that failed.
    pub failed: u32,
}

/// One finished case.
#[derive(Debug)]
pub struct CaseOutcome<E> {
    /// Case id.
    pub case_id: String,
    /// Datalist section.
    pub section: String,
    /// Its outputs, or why it failed.
    pub result: Result<CaseOutput, E>,
    /// Wall time of the case.
    pub seconds: f64,
}

/// What a running dataset reports.
#[derive(Debug)]
pub enum DatasetEvent<E> {
    /// A case finished (boxed: a case's output is much larger than the final event).
    Case(Counts, Box<CaseOutcome<E>>),
    /// Every case finished; the manifest (of the cases that succeeded) was written, or not.
    Done(Counts, Result<(StoreUri, Manifest), CoreError>),
}

impl DatasetPlan {
    /// Reads and parses the datalist.
    pub async fn load(stores: &Stores, spec: DatasetSpec) -> Result<Self, PlanError> {
        let err = |source| PlanError { field: "datalist_uri", source };
        let base = spec.base.clone().unwrap_or_else(|| spec.datalist.parent());
        let sections = if spec.sections.is_empty() {
            vec!["training".to_string(), "validation".to_string()]
        } else {
            spec.sections.clone()
        };
        let json = stores.get(&spec.datalist).await.map_err(err)?;
        let cases = jobs::parse_datalist(&json, &base, &sections, &spec.datalist.file_name()).map_err(err)?;
        // The key records the sections as requested (empty = default), as it always has, so
        // existing datasets keep their folder.
        let record = serde_json::json!({"datalist": spec.datalist.to_string(), "sections": spec.sections,
                                        "options": spec.options, "pipeline": PIPELINE_VERSION});
        let key = hex::encode(&Sha256::digest(record.to_string().as_bytes())[..8]);
        Ok(DatasetPlan {
            datalist: spec.datalist,
            cases,
            options: spec.options,
            output_root: spec.output_root,
            key,
            force: spec.force,
        })
    }

    /// Every image and label the dataset will read, for callers that must check where they
    /// lie before anything is read.
    pub fn input_uris(&self) -> impl Iterator<Item = &StoreUri> {
        self.cases.iter().flat_map(|c| c.images.iter().chain(c.label.iter()))
    }

    /// Cases in the dataset.
    pub fn total(&self) -> u32 {
        self.cases.len() as u32
    }

    /// Where the manifest will be written.
    pub fn manifest_uri(&self) -> StoreUri {
        self.output_root.join(&format!("datasets/{}/{MANIFEST_FILE}", self.key))
    }

    /// Runs the cases, `parallel` at a time, each through `run_case(job, output_root)`.
    pub fn run<E, F, Fut>(
        self,
        stores: Arc<Stores>,
        parallel: usize,
        run_case: F,
    ) -> impl Stream<Item = DatasetEvent<E>>
    where
        F: Fn(CaseJob, StoreUri) -> Fut,
        Fut: Future<Output = Result<CaseOutput, E>>,
    {
        let counts = Counts { total: self.total(), ..Counts::default() };
        let manifest_uri = self.manifest_uri();
        let DatasetPlan { datalist, cases, options, output_root, force, .. } = self;
        let jobs = cases.into_iter().enumerate().map(move |(position, c)| {
            // Each case draws its own crop from a seed derived from its id: the same seed a
            // PreprocessCase request without `seed` gets.
            let seed = crate::pipeline::case_seed(&c.case_id);
            let job = CaseJob {
                case_id: c.case_id.clone(),
                images: c.images,
                label: c.label,
                options: Options { seed, ..options.clone() },
                output: None,
                force,
            };
            let started = Instant::now();
            let run = run_case(job, output_root.clone());
            async move {
                let result = run.await;
                let seconds = started.elapsed().as_secs_f64();
                (position, CaseOutcome { case_id: c.case_id, section: c.section, result, seconds })
            }
        });
        let state = Run {
            finished: Box::pin(futures::stream::iter(jobs).buffer_unordered(parallel.max(1))),
            counts,
            entries: BTreeMap::new(),
            datalist: datalist.to_string(),
            stores,
            manifest_uri,
            done: false,
        };
        futures::stream::unfold(state, |mut run| async move {
            if run.done {
                return None;
            }
            if let Some((position, outcome)) = run.finished.next().await {
                run.counts.completed += 1;
                match &outcome.result {
                    Ok(out) => {
                        run.counts.reused += out.reused as u32;
                        let case = ManifestCase {
                            case_id: outcome.case_id.clone(),
                            tensors: out.tensors_uri.to_string(),
                            metadata: out.metadata_uri.to_string(),
                        };
                        run.entries.entry(outcome.section.clone()).or_default().push((position, case));
                    }
                    Err(_) => run.counts.failed += 1,
                }
                return Some((DatasetEvent::Case(run.counts, Box::new(outcome)), run));
            }
            run.done = true;
            // Cases finish in any order; the manifest lists them in datalist order, so a dataset
            // index means the same case in every run (samplers and resumes rely on it).
            let manifest = Manifest {
                datalist: run.datalist.clone(),
                pipeline_version: PIPELINE_VERSION.to_string(),
                cases: std::mem::take(&mut run.entries)
                    .into_iter()
                    .map(|(section, mut cases)| {
                        cases.sort_by_key(|(position, _)| *position);
                        (section, cases.into_iter().map(|(_, case)| case).collect())
                    })
                    .collect(),
            };
            let uri = run.manifest_uri.clone();
            let written = run.stores.put(&uri, Bytes::from(manifest.to_bytes())).await.map(|()| (uri, manifest));
            Some((DatasetEvent::Done(run.counts, written), run))
        })
    }

    /// Runs the cases in this process with [`jobs::run_case`] and default read limits.
    pub fn run_local(self, stores: Arc<Stores>, parallel: usize) -> impl Stream<Item = DatasetEvent<CoreError>> {
        let runner = stores.clone();
        self.run(stores, parallel, move |job, root| {
            let stores = runner.clone();
            async move { jobs::run_case(stores, job, &root, Default::default()).await }
        })
    }
}

/// The state of a running dataset between events.
struct Run<S> {
    finished: std::pin::Pin<Box<S>>,
    counts: Counts,
    entries: BTreeMap<String, Vec<(usize, ManifestCase)>>,
    datalist: String,
    stores: Arc<Stores>,
    manifest_uri: StoreUri,
    done: bool,
}
