//! Turning a datalist into training data: the dataset is preprocessed (by the preprocessing
//! service over gRPC, or by its library in this process) into cached tensors in the store,
//! described by a manifest; workers read the manifest and load its cases.

use std::sync::Arc;

use brats_core::labels::LabelConvention;
use brats_core::{ErrorKind, StoreUri, Stores};
use brats_preprocess::dataset::{DatasetEvent, DatasetPlan, DatasetSpec};
use brats_preprocess::pipeline::Options;
use brats_proto::v1 as pb;
use futures::StreamExt;

use crate::data::{CaseCache, Cases};
use crate::spec::DataConfig;
use crate::train::Dataset;

/// Why a dataset could not be prepared or loaded.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// The preprocessing service refused or failed the request.
    #[error("preprocessing {field}: {message}")]
    Preprocess {
        /// The request field (or case) concerned.
        field: String,
        /// What went wrong.
        message: String,
        /// The gRPC status code of the failure.
        code: tonic::Code,
    },
    /// Some cases failed to preprocess.
    #[error("{failed} of {total} cases failed to preprocess; first: case {case_id}: {message}")]
    Cases {
        /// Failed cases.
        failed: u32,
        /// All cases.
        total: u32,
        /// The first failed case.
        case_id: String,
        /// Its error.
        message: String,
    },
    /// The manifest is unreadable.
    #[error("manifest {uri}: {message}")]
    Manifest {
        /// Where.
        uri: String,
        /// What.
        message: String,
    },
    /// The sections do not fit in this machine's memory and the job asked to hold them there.
    #[error(
        "the dataset needs {needed_gib:.1} GiB of memory per worker ({workers} worker(s) on this machine) but {available_gib:.1} GiB is available; case_cache is MEMORY: use AUTO or STREAM to read the cases from the store for every sample, or train on fewer cases, fewer devices per machine, or a machine with more memory"
    )]
    TooLarge {
        /// Bytes one worker needs, in GiB.
        needed_gib: f64,
        /// Workers sharing this machine.
        workers: usize,
        /// MemAvailable, in GiB.
        available_gib: f64,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] brats_core::CoreError),
}

pub use brats_artifacts::manifest::{Manifest, ManifestCase};

/// Where the dataset is preprocessed.
#[derive(Debug, Clone)]
pub enum Preprocessor {
    /// A preprocessing service at `endpoint` (`http://host:port`), reached with `client`'s TLS
    /// settings and credentials.
    Remote {
        /// `http://host:port` (spoken to over TLS when `client` names a CA).
        endpoint: String,
        /// TLS and credentials.
        client: brats_cli::ClientSecurity,
    },
    /// The preprocessing library ([`brats_preprocess::dataset`]), in this process.
    InProcess,
}

/// Preprocesses a datalist's sections (full volumes: normalised, label channels, no crop) into
/// `output_root`, reusing cached cases, and returns the manifest's URI. `progress` sees
/// (completed, total) as cases finish. Both preprocessors key the dataset alike, so a dataset
/// prepared one way is reused the other.
#[allow(clippy::too_many_arguments)] // the PreprocessDataset request's fields, each needed
pub async fn prepare(
    stores: Arc<Stores>,
    preprocessor: &Preprocessor,
    datalist_uri: &str,
    base_uri: &str,
    sections: &[String],
    label_convention: &str,
    output_root: &StoreUri,
    progress: impl FnMut(u32, u32),
) -> Result<StoreUri, DatasetError> {
    match preprocessor {
        Preprocessor::InProcess => {
            let invalid = |field: &str, e: brats_core::CoreError| DatasetError::Preprocess {
                field: field.to_string(),
                message: format!("{field}: {e}"),
                code: code_of(e.kind()),
            };
            let convention = LabelConvention::parse(label_convention).map_err(|e| invalid("label_convention", e))?;
            let options = Options { label_convention: convention, ..Options::default() };
            let spec = DatasetSpec {
                datalist: StoreUri::parse(datalist_uri).map_err(|e| invalid("datalist_uri", e))?,
                base: if base_uri.is_empty() {
                    None
                } else {
                    Some(StoreUri::parse(base_uri).map_err(|e| invalid("base_uri", e))?)
                },
                sections: sections.to_vec(),
                options,
                output_root: output_root.clone(),
                force: false,
            };
            let plan = DatasetPlan::load(&stores, spec).await.map_err(|e| invalid(e.field, e.source))?;
            let parallel = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).min(4);
            prepare_in_process(plan, stores, parallel, progress).await
        }
        Preprocessor::Remote { endpoint, client } => {
            let convention = match label_convention {
                "brats2023" => pb::LabelConvention::Brats2023,
                "brats2015" => pb::LabelConvention::Brats2015,
                _ => pb::LabelConvention::Brats2018,
            };
            let request = pb::PreprocessDatasetRequest {
                datalist_uri: datalist_uri.to_string(),
                base_uri: base_uri.to_string(),
                sections: sections.to_vec(),
                label_convention: convention as i32,
                crop: None,
                max_parallel: 0,
                output_uri: output_root.to_string(),
                force: false,
            };
            prepare_remote(endpoint, client, request, progress).await
        }
    }
}

/// The gRPC code a library error maps to (as the services map it).
fn code_of(kind: ErrorKind) -> tonic::Code {
    match kind {
        ErrorKind::InvalidInput => tonic::Code::InvalidArgument,
        ErrorKind::NotFound => tonic::Code::NotFound,
        ErrorKind::AlreadyExists => tonic::Code::AlreadyExists,
        ErrorKind::Unavailable => tonic::Code::Unavailable,
        ErrorKind::Internal => tonic::Code::Internal,
    }
}

async fn prepare_in_process(
    plan: DatasetPlan,
    stores: Arc<Stores>,
    parallel: usize,
    mut progress: impl FnMut(u32, u32),
) -> Result<StoreUri, DatasetError> {
    let mut events = std::pin::pin!(plan.run_local(stores, parallel));
    let mut first_failure: Option<(String, String)> = None;
    while let Some(event) = events.next().await {
        match event {
            DatasetEvent::Case(counts, outcome) => {
                progress(counts.completed, counts.total);
                if let Err(e) = &outcome.result
                    && first_failure.is_none()
                {
                    first_failure = Some((outcome.case_id.clone(), e.to_string()));
                }
            }
            DatasetEvent::Done(counts, manifest) => {
                if counts.failed > 0 {
                    let (case_id, message) = first_failure.unwrap_or_default();
                    return Err(DatasetError::Cases { failed: counts.failed, total: counts.total, case_id, message });
                }
                return Ok(manifest?.0);
            }
        }
    }
    Err(DatasetError::Preprocess {
        field: "request".into(),
        message: "preprocessing ended before the dataset was done".into(),
        code: tonic::Code::Internal,
    })
}

async fn prepare_remote(
    endpoint: &str,
    client: &brats_cli::ClientSecurity,
    request: pb::PreprocessDatasetRequest,
    mut progress: impl FnMut(u32, u32),
) -> Result<StoreUri, DatasetError> {
    let refused = |s: tonic::Status| {
        let message = s.message().to_string();
        let field = message.split(':').next().filter(|f| f.len() < 40 && !f.contains(' ')).unwrap_or("request");
        DatasetError::Preprocess { field: field.to_string(), message, code: s.code() }
    };
    let channel = client.connect(endpoint).await.map_err(|e| DatasetError::Preprocess {
        field: "preprocess_endpoint".into(),
        message: format!("cannot reach the preprocessing service at {endpoint}: {e}"),
        code: tonic::Code::Unavailable,
    })?;
    let mut client = pb::preprocessor_client::PreprocessorClient::new(channel);
    let mut stream = client.preprocess_dataset(request).await.map_err(refused)?.into_inner();
    let mut first_failure: Option<(String, String)> = None;
    while let Some(msg) = stream.next().await {
        let p = msg.map_err(refused)?;
        progress(p.completed, p.total);
        if let Some(c) = &p.case
            && !c.error.is_empty()
            && first_failure.is_none()
        {
            first_failure = Some((c.case_id.clone(), c.error.clone()));
        }
        if p.done {
            if p.failed > 0 {
                let (case_id, message) = first_failure.unwrap_or_default();
                return Err(DatasetError::Cases { failed: p.failed, total: p.total, case_id, message });
            }
            return Ok(StoreUri::parse(&p.manifest_uri)?);
        }
    }
    Err(DatasetError::Preprocess {
        field: "request".into(),
        message: "the preprocessing stream ended before the dataset was done".into(),
        code: tonic::Code::Unavailable,
    })
}

/// Reads a manifest.
pub async fn read_manifest(stores: &Stores, uri: &StoreUri) -> Result<Manifest, DatasetError> {
    let bytes = stores.get(uri).await?;
    serde_json::from_slice(&bytes).map_err(|e| DatasetError::Manifest { uri: uri.to_string(), message: e.to_string() })
}

/// Opens one section as `cache` says ([`CaseCache::Memory`]: loaded now; otherwise streamed
/// through the current tokio runtime, which must be multi-threaded).
pub async fn open_section(
    stores: &Arc<Stores>,
    manifest: &Manifest,
    section: &str,
    cache: CaseCache,
) -> Result<Cases, DatasetError> {
    let entries = manifest.section(section)?;
    if cache != CaseCache::Memory {
        return Ok(Cases::streamed(stores.clone(), tokio::runtime::Handle::current(), entries));
    }
    let cases = crate::data::load_cases(stores, &entries)
        .await
        .map_err(|e| DatasetError::Manifest { uri: format!("section {section}"), message: e.to_string() })?;
    Ok(Cases::from(cases))
}

/// Opens the training and validation sections of `data` for one of `local_workers` workers on
/// this machine; returns them and the cache mode used ([`resolve_cache`]).
pub async fn open_dataset(
    stores: &Arc<Stores>,
    manifest: &Manifest,
    data: &DataConfig,
    local_workers: usize,
) -> Result<(Dataset, CaseCache), DatasetError> {
    let sections = [data.train_section.as_str(), data.validation_section.as_str()];
    let cache = resolve_cache(stores, manifest, &sections, local_workers, data.case_cache).await?;
    let train = open_section(stores, manifest, &data.train_section, cache).await?;
    let validation = open_section(stores, manifest, &data.validation_section, cache).await?;
    Ok((Dataset { train: Arc::new(train), validation: Arc::new(validation) }, cache))
}

/// Decides, before loading anything, whether the sections are held in memory or streamed:
/// [`CaseCache::Auto`] keeps them in memory when their cached tensors (their stored size is
/// what a worker holds in RAM) fit `local_workers` times into three quarters of the memory
/// available now, and streams them otherwise; [`CaseCache::Memory`] refuses a dataset that does
/// not fit, so it is a clear job failure instead of an out-of-memory kill mid-epoch.
pub async fn resolve_cache(
    stores: &Stores,
    manifest: &Manifest,
    sections: &[&str],
    local_workers: usize,
    requested: CaseCache,
) -> Result<CaseCache, DatasetError> {
    if requested == CaseCache::Stream {
        return Ok(CaseCache::Stream);
    }
    let Some(available) = mem_available_bytes() else { return Ok(CaseCache::Memory) };
    let mut needed = 0u64;
    for section in sections {
        for case in manifest.cases.get(*section).into_iter().flatten() {
            needed += stores.head(&StoreUri::parse(&case.tensors)?).await?.size;
        }
    }
    // Decoded f32 images are the stored bytes; leave a quarter for the network and batches.
    let workers = local_workers.max(1);
    if needed.saturating_mul(workers as u64) <= available / 4 * 3 {
        return Ok(CaseCache::Memory);
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    if requested == CaseCache::Memory {
        return Err(DatasetError::TooLarge { needed_gib: gib(needed), workers, available_gib: gib(available) });
    }
    tracing::info!(
        needed_gib = gib(needed),
        workers,
        available_gib = gib(available),
        "dataset does not fit in memory; streaming cases from the store"
    );
    Ok(CaseCache::Stream)
}

/// `MemAvailable` from /proc/meminfo (None where it cannot be read).
fn mem_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dataset_too_large_for_memory_is_streamed_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("case.safetensors");
        std::fs::write(&file, vec![0u8; 1 << 20]).unwrap();
        let manifest = Manifest {
            cases: BTreeMap::from([(
                "training".to_string(),
                vec![ManifestCase {
                    case_id: "a".into(),
                    tensors: format!("file://{}", file.display()),
                    ..Default::default()
                }],
            )]),
            ..Default::default()
        };
        let stores = Stores::new(Default::default());
        let sections = ["training", "validation"];
        for requested in [CaseCache::Auto, CaseCache::Memory] {
            assert_eq!(resolve_cache(&stores, &manifest, &sections, 1, requested).await.unwrap(), CaseCache::Memory);
        }
        assert_eq!(
            resolve_cache(&stores, &manifest, &sections, 1, CaseCache::Stream).await.unwrap(),
            CaseCache::Stream
        );
        // A million workers of 1 MiB each: a terabyte, more than any test machine has.
        let huge = 1_000_000;
        assert_eq!(
            resolve_cache(&stores, &manifest, &sections, huge, CaseCache::Auto).await.unwrap(),
            CaseCache::Stream
        );
        let e = resolve_cache(&stores, &manifest, &sections, huge, CaseCache::Memory).await.unwrap_err();
        assert!(matches!(e, DatasetError::TooLarge { workers: 1_000_000, .. }), "{e}");
        assert!(e.to_string().contains("GiB of memory per worker"), "{e}");
        assert!(e.to_string().contains("STREAM"), "{e}");
    }
}
