//! Pull mode's DICOMweb client (PS3.18): QIDO-RS lists a study's series, WADO-RS retrieves the
//! MR ones as `multipart/related; type="application/dicom"` into a folder, and a QIDO-RS query
//! checks that an archive answers. Only MR series are fetched: a study's SEG, SR or our own
//! results are never pulled back in.
//!
//! Errors name the archive's host and the HTTP status; response bodies (which may carry
//! patient data) are not repeated.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a DICOMweb request failed.
#[derive(Debug, thiserror::Error)]
pub enum DicomWebError {
    /// The archive could not be reached or the transfer broke off.
    #[error("DICOMweb {host}: {reason}")]
    Unavailable {
        /// The archive's host.
        host: String,
        /// Why.
        reason: String,
    },
    /// The archive answered with an error status.
    #[error("DICOMweb {host}: HTTP {status} for {what}")]
    Status {
        /// The archive's host.
        host: String,
        /// HTTP status.
        status: u16,
        /// What was asked (QIDO series list, WADO series).
        what: &'static str,
    },
    /// The answer could not be read.
    #[error("DICOMweb {host}: unreadable {what}: {reason}")]
    Malformed {
        /// The archive's host.
        host: String,
        /// What was asked.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// Writing a retrieved instance failed.
    #[error("writing a retrieved instance: {0}")]
    Write(#[from] std::io::Error),
}

/// A study's series as QIDO-RS lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesEntry {
    /// SeriesInstanceUID.
    pub uid: String,
    /// Modality (MR, SEG, …).
    pub modality: String,
}

/// A DICOMweb archive at `base` (the URL below which `/studies` lives).
#[derive(Debug, Clone)]
pub struct Archive {
    base: String,
    host: String,
    client: reqwest::Client,
}

impl Archive {
    /// A client for the archive at `base_url`.
    pub fn new(base_url: &str) -> Result<Archive, DicomWebError> {
        brats_service::security::tls::install_crypto_provider();
        let base = base_url.trim_end_matches('/').to_string();
        let host = reqwest::Url::parse(&base).ok().and_then(|u| u.host_str().map(String::from)).unwrap_or_default();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(600))
            .build()
            .map_err(|e| DicomWebError::Unavailable { host: host.clone(), reason: e.to_string() })?;
        Ok(Archive { base, host, client })
    }

    fn unavailable(&self, e: reqwest::Error) -> DicomWebError {
        DicomWebError::Unavailable { host: self.host.clone(), reason: e.without_url().to_string() }
    }

    async fn get(&self, url: &str, accept: &str, what: &'static str) -> Result<reqwest::Response, DicomWebError> {
        let response = self.client.get(url).header("Accept", accept).send().await.map_err(|e| self.unavailable(e))?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(DicomWebError::Status { host: self.host.clone(), status, what });
        }
        Ok(response)
    }

    /// QIDO-RS: every series of the study (empty when the archive does not have it).
    pub async fn series(&self, study_uid: &str) -> Result<Vec<SeriesEntry>, DicomWebError> {
        let url = format!("{}/studies/{study_uid}/series", self.base);
        let response = self.client.get(&url).header("Accept", "application/dicom+json").send().await;
        let response = response.map_err(|e| self.unavailable(e))?;
        match response.status().as_u16() {
            // "No such study": Orthanc answers 404 or 204, others an empty array.
            204 | 404 => return Ok(Vec::new()),
            s if !(200..300).contains(&s) => {
                return Err(DicomWebError::Status { host: self.host.clone(), status: s, what: "QIDO-RS series list" });
            }
            _ => {}
        }
        let text = response.text().await.map_err(|e| self.unavailable(e))?;
        let malformed =
            |reason: String| DicomWebError::Malformed { host: self.host.clone(), what: "QIDO-RS series list", reason };
        if text.trim().is_empty() {
            return Ok(Vec::new());
        }
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| malformed(e.to_string()))?;
        let items = json.as_array().ok_or_else(|| malformed("not a JSON array".into()))?;
        let first_string = |item: &serde_json::Value, tag: &str| {
            item.get(tag)
                .and_then(|e| e.get("Value"))
                .and_then(|v| v.get(0))
                .and_then(|v| v.as_str())
                .map(|s| s.trim().to_string())
        };
        items
            .iter()
            .map(|item| {
                Ok(SeriesEntry {
                    uid: first_string(item, "0020000E").ok_or_else(|| malformed("a series without its UID".into()))?,
                    modality: first_string(item, "00080060").unwrap_or_default(),
                })
            })
            .collect()
    }

    /// WADO-RS: retrieves every instance of a series into `dir` as Part 10 files named
    /// `{prefix}-{n}.dcm`; returns their paths.
    pub async fn retrieve_series(
        &self,
        study_uid: &str,
        series_uid: &str,
        dir: &Path,
        prefix: &str,
    ) -> Result<Vec<PathBuf>, DicomWebError> {
        let url = format!("{}/studies/{study_uid}/series/{series_uid}", self.base);
        let what = "WADO-RS series";
        let response = self.get(&url, "multipart/related; type=\"application/dicom\"", what).await?;
        let content_type =
            response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        let malformed = |reason: String| DicomWebError::Malformed { host: self.host.clone(), what, reason };
        let boundary = boundary(&content_type).ok_or_else(|| malformed("no multipart boundary".into()))?;
        let body = response.bytes().await.map_err(|e| self.unavailable(e))?;
        let parts = multipart_parts(&body, &boundary).map_err(malformed)?;
        let mut files = Vec::with_capacity(parts.len());
        for (n, part) in parts.into_iter().enumerate() {
            if part.len() < 132 || &part[128..132] != b"DICM" {
                return Err(malformed(format!("part {n} is not a DICOM Part 10 file")));
            }
            let path = dir.join(format!("{prefix}-{n}.dcm"));
            std::fs::write(&path, part)?;
            files.push(path);
        }
        Ok(files)
    }

    /// Whether the archive answers a QIDO-RS study query (`GET {base}/studies?limit=1`).
    pub async fn echo(&self) -> Result<(), DicomWebError> {
        self.get(&format!("{}/studies?limit=1", self.base), "application/dicom+json", "QIDO-RS studies").await?;
        Ok(())
    }
}

/// The `boundary` parameter of a multipart content type (quoted or not).
fn boundary(content_type: &str) -> Option<String> {
    content_type.split(';').map(str::trim).find_map(|p| {
        let (key, value) = p.split_once('=')?;
        key.trim().eq_ignore_ascii_case("boundary").then(|| value.trim().trim_matches('"').to_string())
    })
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack.get(from..)?.windows(needle.len()).position(|w| w == needle).map(|p| p + from)
}

/// The bodies of a multipart message (RFC 2046): the parts between `--boundary` lines, each
/// after its header block.
fn multipart_parts<'a>(body: &'a [u8], boundary: &str) -> Result<Vec<&'a [u8]>, String> {
    let open = format!("--{boundary}");
    let next_delimiter = format!("\r\n--{boundary}");
    let mut at = find(body, open.as_bytes(), 0).ok_or("no opening boundary")?;
    let mut parts = Vec::new();
    loop {
        let after = at + open.len();
        if body.get(after..after + 2) == Some(b"--") {
            return Ok(parts);
        }
        let headers_end = find(body, b"\r\n\r\n", after).ok_or("a part without a header block")? + 4;
        // A delimiter is the boundary on its own line: followed by CRLF (next part), "--"
        // (the end) or transport padding; the same bytes inside a part do not count.
        let mut from = headers_end;
        let end = loop {
            let candidate = find(body, next_delimiter.as_bytes(), from).ok_or("a part without a closing boundary")?;
            let tail = &body[candidate + next_delimiter.len()..];
            if tail.starts_with(b"\r\n") || tail.starts_with(b"--") || tail.starts_with(b" ") || tail.starts_with(b"\t")
            {
                break candidate;
            }
            from = candidate + 1;
        };
        parts.push(&body[headers_end..end]);
        at = end + 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_bodies_are_split_at_their_boundaries() {
        assert_eq!(
            boundary("multipart/related; type=\"application/dicom\"; boundary=\"abc 1\"").as_deref(),
            Some("abc 1")
        );
        assert_eq!(boundary("multipart/related;boundary=xyz").as_deref(), Some("xyz"));
        assert_eq!(boundary("application/dicom"), None);
        let body = b"--b\r\nContent-Type: application/dicom\r\n\r\nAB\r\n--bC\r\n--b\r\nContent-Type: x\r\n\r\n\r\nD\r\n--b--\r\n";
        let parts = multipart_parts(body, "b").unwrap();
        assert_eq!(parts, vec![&b"AB\r\n--bC"[..], &b"\r\nD"[..]]);
        assert_eq!(multipart_parts(b"--b--\r\n", "b").unwrap().len(), 0);
        assert!(multipart_parts(b"--b\r\nX: y\r\n\r\nunterminated", "b").is_err());
        assert!(multipart_parts(b"nothing", "b").is_err());
    }
}
