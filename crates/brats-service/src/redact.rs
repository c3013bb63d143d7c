//! Keeps a caller's locations out of the statuses a service answers. Paths and URIs carry
//! patient names in real archives (`/archive/DOE^JOHN/t1c.nii.gz`), and errors from the store
//! or a decoder name the file they failed on; each service therefore passes its answer through
//! [`RequestUris::status`], which replaces every location the request named, in any of the forms
//! the lower layers print it, by the name of the request field it came from (`image_uris[2]`).
//! The message still says which field is wrong and what to do about it.

use brats_core::StoreUri;
use tonic::Status;

/// One text to replace in messages and the field that replaces it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Form {
    /// The location as some layer may print it.
    text: String,
    /// The request field it came from.
    field: String,
    /// Whether the text is a bare name (no `/`): replaced only as a whole word, so that a
    /// short name does not cut through the words of the message.
    whole_word: bool,
}

/// The locations one request names, each with its request field, for redacting the messages
/// of the statuses the request is answered with.
#[derive(Debug, Clone, Default)]
pub struct RequestUris {
    /// Longest text first, so a full path is replaced before the file name inside it.
    forms: Vec<Form>,
}

impl RequestUris {
    /// A request that names no location (nothing is redacted until fields are added).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the location in request field `field`: a URI, a path or a file name as the caller
    /// sent it. An empty value names nothing and is skipped. Besides the value itself, its
    /// parsed forms are redacted: the canonical URI (`file:///abs/path`, `s3://bucket/key`),
    /// the path (with and without its leading `/`, as the object store prints it), the bucket
    /// and key, and the last path segment (the file name).
    pub fn with(mut self, field: impl Into<String>, value: &str) -> Self {
        let field = field.into();
        let value = value.trim();
        if value.is_empty() {
            return self;
        }
        let mut texts = vec![value.to_string()];
        if let Some(path) = value.strip_prefix("file://").or_else(|| value.strip_prefix("file:")) {
            texts.push(path.to_string());
        }
        if let Ok(parsed) = StoreUri::parse(value) {
            texts.push(parsed.to_string());
            match &parsed {
                StoreUri::File(path) => {
                    let path = path.to_string_lossy();
                    texts.push(path.trim_start_matches('/').to_string());
                    texts.push(path.into_owned());
                }
                StoreUri::S3 { bucket, key } => {
                    texts.push(format!("{bucket}/{key}"));
                    texts.push(key.clone());
                }
            }
            texts.push(parsed.file_name());
        }
        texts.extend(value.trim_end_matches('/').rsplit('/').next().map(str::to_string));
        for text in texts {
            let text = text.trim_end_matches('/');
            // A root (`/`, `file:///`) names no one and would cut every message apart.
            let root = text.trim_start_matches('/').is_empty() || text.ends_with(':');
            if root || self.forms.iter().any(|f| f.text == text) {
                continue;
            }
            self.forms.push(Form { text: text.to_string(), field: field.clone(), whole_word: !text.contains('/') });
        }
        self.forms.sort_by_key(|f| std::cmp::Reverse(f.text.len()));
        self
    }

    /// Adds each location of a repeated field, as `field[i]`.
    pub fn with_each(self, field: &str, values: &[String]) -> Self {
        values.iter().enumerate().fold(self, |uris, (i, value)| uris.with(format!("{field}[{i}]"), value))
    }

    /// `message` with every form of every location replaced by its field's name. One pass
    /// from left to right, trying the longest form first at each position; replaced text is
    /// not searched again.
    pub fn redact(&self, message: &str) -> String {
        let mut out = String::with_capacity(message.len());
        let mut rest = message;
        'scan: while let Some(c) = rest.chars().next() {
            for form in &self.forms {
                if rest.starts_with(form.text.as_str()) && (!form.whole_word || Self::is_word(&out, rest, &form.text)) {
                    out.push_str(&form.field);
                    rest = &rest[form.text.len()..];
                    continue 'scan;
                }
            }
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
        out
    }

    /// Whether `text`, at the start of `rest` and after `before`, stands as a word: no letter,
    /// digit or `_` touches it on either side.
    fn is_word(before: &str, rest: &str, text: &str) -> bool {
        let outside = |c: Option<char>| !c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        outside(before.chars().next_back()) && outside(rest[text.len()..].chars().next())
    }

    /// `status` with its message redacted ([`Self::redact`]); code and metadata kept.
    pub fn status(&self, status: Status) -> Status {
        if self.forms.is_empty() {
            return status;
        }
        let mut redacted = Status::new(status.code(), self.redact(status.message()));
        *redacted.metadata_mut() = status.metadata().clone();
        redacted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATIENT: &str = "DOE^JOHN";

    #[test]
    fn every_printed_form_of_a_file_uri_is_replaced_by_its_field() {
        let uris = RequestUris::new()
            .with_each("image_uris", &[format!("file:///archive/{PATIENT}/t1c.nii.gz"), String::new()])
            .with("output_uri", &format!("file:///out/{PATIENT}/"));
        for (message, expected) in [
            (
                format!("image_uris: file:///archive/{PATIENT}/t1c.nii.gz: no such object; check the URI"),
                "image_uris: image_uris[0]: no such object; check the URI",
            ),
            (
                format!("Object at location archive/{PATIENT}/t1c.nii.gz not found"),
                "Object at location image_uris[0] not found",
            ),
            (format!("/archive/{PATIENT}/t1c.nii.gz: not a NIfTI-1 file"), "image_uris[0]: not a NIfTI-1 file"),
            ("t1c.nii.gz: truncated body".to_string(), "image_uris[0]: truncated body"),
            (
                format!("output_uri: file:///out/{PATIENT}/seg.nii.gz exists already"),
                "output_uri: output_uri/seg.nii.gz exists already",
            ),
        ] {
            assert_eq!(uris.redact(&message), expected);
        }
    }

    #[test]
    fn s3_relative_and_bare_names_are_replaced() {
        let uris = RequestUris::new()
            .with("datalist_uri", &format!("s3://bucket/{PATIENT}/datalist.json"))
            .with("base_uri", &format!("file:cases/{PATIENT}"))
            .with("header.files[1].name", &format!("{PATIENT}_t1.nii"));
        let cwd = std::env::current_dir().unwrap();
        for (message, expected) in [
            (
                format!("s3://bucket/{PATIENT}/datalist.json: no such object"),
                "datalist_uri: no such object".to_string(),
            ),
            (format!("store failed for {PATIENT}/datalist.json"), "store failed for datalist_uri".to_string()),
            (format!("{}/cases/{PATIENT}/x.nii: missing", cwd.display()), "base_uri/x.nii: missing".to_string()),
            (format!("cases/{PATIENT}/x.nii: missing"), "base_uri/x.nii: missing".to_string()),
            (format!("{PATIENT}_t1.nii: received 3 bytes"), "header.files[1].name: received 3 bytes".to_string()),
        ] {
            assert_eq!(uris.redact(&message), expected);
        }
    }

    #[test]
    fn bare_names_are_replaced_only_as_whole_words_and_replacements_are_not_searched_again() {
        let uris = RequestUris::new().with("label_uri", "file:///data/seg").with("image_uris[0]", "file:///data/0");
        assert_eq!(uris.redact("segmentation of seg failed"), "segmentation of label_uri failed");
        assert_eq!(uris.redact("seg_2 and seg: 0 bytes"), "seg_2 and label_uri: image_uris[0] bytes");
    }

    #[test]
    fn empty_and_root_locations_redact_nothing() {
        let uris = RequestUris::new().with("output_uri", "").with("base_uri", "file:///").with("x", "/");
        assert_eq!(uris.redact("a/b: failed"), "a/b: failed");
        let status = uris.status(Status::not_found("a/b: failed"));
        assert_eq!((status.code(), status.message()), (tonic::Code::NotFound, "a/b: failed"));
    }

    #[test]
    fn statuses_keep_their_code() {
        let uris = RequestUris::new().with("image_uris[0]", &format!("/archive/{PATIENT}/t1.nii"));
        let status = uris.status(Status::data_loss(format!("/archive/{PATIENT}/t1.nii: truncated")));
        assert_eq!(status.code(), tonic::Code::DataLoss);
        assert_eq!(status.message(), "image_uris[0]: truncated");
    }
}
