//! STOW-RS (PS3.18 §10.5): send Part 10 objects to a DICOMweb archive with one
//! `multipart/related; type="application/dicom"` POST to `{base}/studies`.

use std::time::Duration;

/// Why a STOW-RS request failed (URL host and status only; the body may carry patient data
/// and is not repeated).
#[derive(Debug, thiserror::Error)]
pub enum StowError {
    /// The request did not complete.
    #[error("STOW-RS to {host}: {reason}")]
    Request {
        /// The archive's host.
        host: String,
        /// Why.
        reason: String,
    },
    /// The archive refused (non-2xx), or listed failed instances.
    #[error("STOW-RS to {host}: HTTP {status}{}", if *failed { " with failed instances" } else { "" })]
    Refused {
        /// The archive's host.
        host: String,
        /// HTTP status.
        status: u16,
        /// The response listed failed instances (FailedSOPSequence not empty).
        failed: bool,
    },
}

/// POSTs `objects` (Part 10 files) to `{base_url}/studies`.
pub async fn store(base_url: &str, objects: &[&[u8]]) -> Result<(), StowError> {
    brats_service::security::tls::install_crypto_provider();
    let url = format!("{}/studies", base_url.trim_end_matches('/'));
    let host = reqwest::Url::parse(&url).ok().and_then(|u| u.host_str().map(String::from)).unwrap_or_default();
    let request = |reason: String| StowError::Request { host: host.clone(), reason };
    let boundary = format!("brats-{:016x}", rand_u64());
    let mut body = Vec::new();
    for object in objects {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").as_bytes());
        body.extend_from_slice(object);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let client =
        reqwest::Client::builder().timeout(Duration::from_secs(120)).build().map_err(|e| request(e.to_string()))?;
    let response = client
        .post(&url)
        .header("Content-Type", format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"))
        .header("Accept", "application/dicom+json")
        .body(body)
        .send()
        .await
        .map_err(|e| request(e.without_url().to_string()))?;
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    // FailedSOPSequence (0008,1198): Orthanc sends it empty on success.
    let failed = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("00081198").and_then(|f| f.get("Value")).and_then(|v| v.as_array()).map(|a| !a.is_empty()))
        .unwrap_or(false);
    if !(200..300).contains(&status) || failed {
        return Err(StowError::Refused { host, status, failed });
    }
    Ok(())
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish()
}
