//! Preprocessing of one case between object stores: fetch the inputs, reuse an earlier result
//! with the same inputs and pipeline version, or run [`crate::pipeline::preprocess`] and write
//! the tensors and their JSON sidecar. Used by the service; testable without a network.

use crate::pipeline::{self, InputFile, Options, PIPELINE_VERSION};
use brats_core::error::{CoreError, Result};
use brats_core::metadata::CaseMetadata;
use brats_core::nifti_io::ReadLimits;
use brats_core::store::{ObjectVersion, StoreUri, Stores};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Instant;

/// Name of the tensor file inside a case's output prefix.
pub const TENSORS_FILE: &str = "case.safetensors";
/// Name of the JSON sidecar inside a case's output prefix; written last, so its presence means
/// the case is complete.
pub const SIDECAR_FILE: &str = "case.json";

/// One case to preprocess.
#[derive(Debug, Clone)]
pub struct CaseJob {
    /// Caller-chosen id, used in output keys.
    pub case_id: String,
    /// T1c, T1, T2, FLAIR (or one 4D file).
    pub images: Vec<StoreUri>,
    /// Optional label file.
    pub label: Option<StoreUri>,
    /// Pipeline options.
    pub options: Options,
    /// Output prefix; `None` = `<root>/cases/<case_id>/prep/<key>`.
    pub output: Option<StoreUri>,
    /// Recompute even when a complete earlier result exists.
    pub force: bool,
}

/// What the sidecar JSON holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sidecar {
    /// Hash of the pipeline version, options and input object versions.
    pub cache_key: String,
    /// Where the tensors are.
    pub tensors_uri: String,
    /// The case metadata (also inside the safetensors header).
    pub metadata: CaseMetadata,
    /// Stage timings of the run that produced it, seconds.
    pub timings: Vec<(String, f64)>,
}

/// The result of one case.
#[derive(Debug, Clone)]
pub struct CaseOutput {
    /// The case id.
    pub case_id: String,
    /// Tensor file URI.
    pub tensors_uri: StoreUri,
    /// Sidecar URI.
    pub metadata_uri: StoreUri,
    /// Metadata of the tensors.
    pub metadata: CaseMetadata,
    /// True when an earlier result was reused.
    pub reused: bool,
    /// Stage timings of this request (fetch, pipeline stages, encode, write), seconds.
    pub timings: Vec<(String, f64)>,
}

/// The cache key: SHA-256 of the pipeline version, the options and each input's URI and version.
pub fn cache_key(options: &Options, inputs: &[(String, ObjectVersion)]) -> String {
    let record = serde_json::json!({ "pipeline": PIPELINE_VERSION, "options": options, "inputs": inputs });
    hex::encode(Sha256::digest(record.to_string().as_bytes()))
}

/// Checks an id is safe inside an object key.
pub fn validate_case_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(CoreError::invalid(format!(
            "case_id '{id}': use 1–128 characters from A–Z a–z 0–9 - _ . (not starting with '.')"
        )))
    }
}

/// Fetches objects concurrently.
pub async fn fetch_all(stores: &Stores, uris: &[StoreUri]) -> Result<Vec<InputFile>> {
    let futs = uris.iter().map(|u| async move {
        let bytes = stores.get(u).await?;
        Ok::<_, CoreError>(InputFile { name: u.file_name(), bytes })
    });
    futures::future::try_join_all(futs).await
}

/// Runs one case: reuse, or fetch → preprocess → write tensors → write sidecar.
pub async fn run_case(stores: Arc<Stores>, job: CaseJob, root: &StoreUri, limits: ReadLimits) -> Result<CaseOutput> {
    validate_case_id(&job.case_id)?;
    job.options.validate()?;
    let started = Instant::now();
    let mut all: Vec<StoreUri> = job.images.clone();
    all.extend(job.label.clone());
    let versions = futures::future::try_join_all(all.iter().map(|u| stores.head(u))).await?;
    let ident: Vec<(String, ObjectVersion)> = all.iter().map(|u| u.to_string()).zip(versions).collect();
    let key = cache_key(&job.options, &ident);
    let prefix = job.output.clone().unwrap_or_else(|| root.join(&format!("cases/{}/prep/{}", job.case_id, &key[..16])));
    let tensors_uri = prefix.join(TENSORS_FILE);
    let metadata_uri = prefix.join(SIDECAR_FILE);
    let mut timings = vec![("check".to_string(), started.elapsed().as_secs_f64())];

    if !job.force
        && let Some(side) = read_sidecar(&stores, &metadata_uri).await?
        && side.cache_key == key
        && stores.exists(&tensors_uri).await?
    {
        return Ok(CaseOutput {
            case_id: job.case_id,
            tensors_uri,
            metadata_uri,
            metadata: side.metadata,
            reused: true,
            timings,
        });
    }

    let t = Instant::now();
    let files = fetch_all(&stores, &all).await?;
    timings.push(("fetch".into(), t.elapsed().as_secs_f64()));
    let n_images = job.images.len();
    let options = job.options.clone();
    let case_id = job.case_id.clone();
    let (encoded, mut metadata, stage_times) = tokio::task::spawn_blocking(move || {
        let (images, label) = files.split_at(n_images);
        let (mut tensors, stage) = pipeline::preprocess(images, label.first(), &options, &limits)?;
        tensors.metadata.case_id = case_id;
        let t = Instant::now();
        let (encoded, metadata) = tensors.encode()?;
        let mut stages: Vec<(String, f64)> = stage.stages().into_iter().map(|(s, v)| (s.to_string(), v)).collect();
        stages.push(("encode".into(), t.elapsed().as_secs_f64()));
        Ok::<_, CoreError>((encoded, metadata, stages))
    })
    .await
    .map_err(|e| CoreError::Internal(format!("preprocessing task failed: {e}")))??;
    timings.extend(stage_times);
    metadata.case_id = job.case_id.clone();

    let t = Instant::now();
    stores.put_parts(&tensors_uri, encoded.parts).await?;
    let sidecar = Sidecar {
        cache_key: key,
        tensors_uri: tensors_uri.to_string(),
        metadata: metadata.clone(),
        timings: timings.clone(),
    };
    let json = serde_json::to_vec_pretty(&sidecar).map_err(|e| CoreError::Internal(e.to_string()))?;
    if let Err(e) = stores.put(&metadata_uri, Bytes::from(json)).await {
        // Without its sidecar the tensor file is an orphan: remove it rather than leave half a case.
        let _ = stores.delete(&tensors_uri).await;
        return Err(e);
    }
    timings.push(("write".into(), t.elapsed().as_secs_f64()));
    Ok(CaseOutput { case_id: job.case_id, tensors_uri, metadata_uri, metadata, reused: false, timings })
}

async fn read_sidecar(stores: &Stores, uri: &StoreUri) -> Result<Option<Sidecar>> {
    match stores.get(uri).await {
        Ok(b) => Ok(serde_json::from_slice(&b).ok()),
        Err(CoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// One case of a MONAI decathlon datalist.
#[derive(Debug, Clone, PartialEq)]
pub struct DatalistCase {
    /// `training`, `validation`, …
    pub section: String,
    /// Derived id, unique within the datalist.
    pub case_id: String,
    /// Image URIs (relative paths resolved against the base).
    pub images: Vec<StoreUri>,
    /// Label URI, if any.
    pub label: Option<StoreUri>,
}

/// Parses a MONAI decathlon datalist (`{"training": [{"image": [...], "label": ...}], ...}`),
/// resolving relative paths against `base`; ids come from the first image's file name with
/// the modality suffix removed.
pub fn parse_datalist(json: &[u8], base: &StoreUri, sections: &[String], source: &str) -> Result<Vec<DatalistCase>> {
    let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| {
        CoreError::invalid(format!("{source}: not valid JSON ({e}); expected a MONAI decathlon datalist"))
    })?;
    let resolve = |p: &str| -> Result<StoreUri> {
        if p.contains("://") || p.starts_with('/') || p.starts_with("file:") {
            StoreUri::parse(p)
        } else {
            Ok(base.join(p))
        }
    };
    let mut cases = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for section in sections {
        let Some(list) = v.get(section) else { continue };
        let list = list
            .as_array()
            .ok_or_else(|| CoreError::invalid(format!("{source}: '{section}' must be a list of cases")))?;
        for (i, item) in list.iter().enumerate() {
            let field = format!("{source}: {section}[{i}]");
            let images: Vec<String> = match item.get("image") {
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .map(|x| x.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .ok_or_else(|| CoreError::invalid(format!("{field}.image must be a list of paths")))?,
                Some(serde_json::Value::String(s)) => vec![s.clone()],
                _ => return Err(CoreError::invalid(format!("{field}: missing 'image' (4 paths T1c, T1, T2, FLAIR)"))),
            };
            if images.len() != 4 && images.len() != 1 {
                return Err(CoreError::invalid(format!(
                    "{field}.image has {} paths; give 4 (T1c, T1, T2, FLAIR)",
                    images.len()
                )));
            }
            let label = match item.get("label") {
                Some(serde_json::Value::String(s)) => Some(resolve(s)?),
                None | Some(serde_json::Value::Null) => None,
                _ => return Err(CoreError::invalid(format!("{field}.label must be a path"))),
            };
            let mut id = case_id(&images[0]);
            if !seen.insert(id.clone()) {
                id = format!("{id}-{section}{i}");
                seen.insert(id.clone());
            }
            cases.push(DatalistCase {
                section: section.clone(),
                case_id: id,
                images: images.iter().map(|p| resolve(p)).collect::<Result<_>>()?,
                label,
            });
        }
    }
    if cases.is_empty() {
        return Err(CoreError::invalid(format!("{source}: no cases in sections {sections:?}")));
    }
    Ok(cases)
}

/// Why a datalist was refused: the request field concerned (`datalist_uri`, `base_uri`) and
/// the error, whose kind says the status (a missing file is NotFound, the rest Invalid).
#[derive(Debug, thiserror::Error)]
#[error("{field}: {source}")]
pub struct DatalistError {
    /// The request field concerned.
    pub field: &'static str,
    /// What went wrong.
    pub source: CoreError,
}

/// Checks, before a training job is accepted, that the datalist at `datalist_uri` (relative
/// paths against `base_uri`, empty = its folder) exists, parses, has a non-empty
/// `train_section`, 4 images and a label for every case of both sections, and that every file
/// it references exists. Returns the number of cases.
pub async fn check_datalist(
    stores: &Stores,
    datalist_uri: &str,
    base_uri: &str,
    train_section: &str,
    validation_section: &str,
) -> std::result::Result<usize, DatalistError> {
    let on = |field| move |source| DatalistError { field, source };
    let datalist = on("datalist_uri");
    let uri = StoreUri::parse(datalist_uri).map_err(datalist)?;
    let base = if base_uri.is_empty() { uri.parent() } else { StoreUri::parse(base_uri).map_err(on("base_uri"))? };
    let bytes = stores.get(&uri).await.map_err(datalist)?;
    let invalid = |m: String| DatalistError { field: "datalist_uri", source: CoreError::invalid(m) };
    let json: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| invalid(format!("{uri} is not valid JSON ({e}); expected a MONAI decathlon datalist")))?;
    let (train, val) = (train_section, validation_section);
    match json.get(train).and_then(|v| v.as_array()) {
        Some(a) if !a.is_empty() => {}
        Some(_) => {
            return Err(invalid(format!(
                "section '{train}' of {uri} is empty; training needs at least one case (or set data.train_section)"
            )));
        }
        None => {
            return Err(invalid(format!(
                "{uri} has no '{train}' section (a list of cases); add it or set data.train_section"
            )));
        }
    }
    for section in [train, val] {
        let Some(items) = json.get(section).and_then(|v| v.as_array()) else { continue };
        for (i, item) in items.iter().enumerate() {
            let images: Vec<&str> = match item.get("image") {
                Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_str()).collect(),
                Some(serde_json::Value::String(s)) => vec![s.as_str()],
                _ => Vec::new(),
            };
            let name = images.first().map(|f| case_id(f)).unwrap_or_else(|| format!("{section}[{i}]"));
            if images.len() != 4 {
                return Err(invalid(format!(
                    "case '{name}' ({section}[{i}]) has {} image{}; every case needs 4 modalities, T1c, T1, T2 and FLAIR, in that order",
                    images.len(),
                    if images.len() == 1 { "" } else { "s" }
                )));
            }
            if !item.get("label").is_some_and(|l| l.is_string()) {
                return Err(invalid(format!(
                    "case '{name}' ({section}[{i}]) has no label; training and validation cases need their segmentation"
                )));
            }
        }
    }
    let sections = [train.to_string(), val.to_string()];
    let cases = parse_datalist(&bytes, &base, &sections, &uri.file_name()).map_err(datalist)?;
    let mut checks: Vec<(String, String, StoreUri)> = Vec::new();
    for c in &cases {
        for u in c.images.iter().chain(c.label.as_ref()) {
            checks.push((c.case_id.clone(), c.section.clone(), u.clone()));
        }
    }
    use futures::StreamExt;
    // Owned values: the future must be Send for any caller's lifetimes (gRPC handlers).
    let results: Vec<(String, String, StoreUri, Result<bool>)> =
        futures::stream::iter(checks.into_iter().map(|(case, section, u)| async move {
            let r = stores.exists(&u).await;
            (case, section, u, r)
        }))
        .buffered(32)
        .collect()
        .await;
    for (case, section, u, r) in results {
        match r {
            Ok(true) => {}
            Ok(false) => {
                return Err(DatalistError {
                    field: "datalist_uri",
                    source: CoreError::NotFound(format!(
                        "case '{case}' ({section}): {u} does not exist; check the datalist's paths and base_uri"
                    )),
                });
            }
            Err(e) => return Err(datalist(e)),
        }
    }
    Ok(cases.len())
}

/// The case id a datalist entry gets from its first image path (before de-duplication within
/// the datalist): the file name without `.nii[.gz]` and a trailing modality suffix (`_t1c`,
/// `-t1`, …), restricted to the characters a case id allows.
pub fn case_id(first_image: &str) -> String {
    let name = first_image.rsplit('/').next().unwrap_or(first_image);
    let mut stem = name.trim_end_matches(".gz").trim_end_matches(".nii").to_string();
    for suffix in ["t1c", "t1ce", "t1gd", "t1"] {
        for sep in ["-", "_"] {
            if let Some(s) = stem.strip_suffix(&format!("{sep}{suffix}")) {
                stem = s.to_string();
            }
        }
    }
    let id: String =
        stem.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    let id = id.trim_start_matches('.').to_string();
    if id.is_empty() { "case".into() } else { id.chars().take(100).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datalist_resolves_and_names() {
        let base = StoreUri::parse("s3://b/data").unwrap();
        let json = br#"{"training":[{"image":["a/BraTS-001-t1c.nii.gz","a/x","a/y","a/z"],"label":"a/seg.nii.gz"}],
                       "validation":[{"image":["s3://o/BraTS-002_t1ce.nii.gz","b","c","d"]}]}"#;
        let cases = parse_datalist(json, &base, &["training".into(), "validation".into()], "dl.json").unwrap();
        assert_eq!(cases.len(), 2);
        assert_eq!(cases[0].case_id, "BraTS-001");
        assert_eq!(cases[0].images[0].to_string(), "s3://b/data/a/BraTS-001-t1c.nii.gz");
        assert_eq!(cases[1].case_id, "BraTS-002");
        assert!(cases[1].label.is_none());
        let e = parse_datalist(br#"{"training":[{"image":["a","b"]}]}"#, &base, &["training".into()], "dl.json")
            .unwrap_err();
        assert!(e.to_string().contains("training[0].image has 2 paths"), "{e}");
        assert!(parse_datalist(b"{", &base, &["training".into()], "dl.json").is_err());
    }

    #[test]
    fn case_ids_are_checked() {
        assert!(validate_case_id("BraTS-GLI-00001-000").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(validate_case_id(bad).is_err(), "{bad}");
        }
    }
}
