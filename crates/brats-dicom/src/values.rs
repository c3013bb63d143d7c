//! Typed reads of optional attributes: absent, empty and unparsable values are all `None`, so
//! each caller decides whether the attribute is required (and names it in its error).

use dicom_core::Tag;
use dicom_object::InMemDicomObject;

/// A string attribute, trimmed; `None` when absent or empty.
pub(crate) fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let v = obj.element_opt(tag).ok().flatten()?.to_str().ok()?;
    let v = v.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!v.is_empty()).then(|| v.to_string())
}

/// All values of a multi-valued string attribute (e.g. ImageType), upper-cased and trimmed.
pub(crate) fn texts(obj: &InMemDicomObject, tag: Tag) -> Vec<String> {
    let Some(e) = obj.element_opt(tag).ok().flatten() else { return Vec::new() };
    match e.to_multi_str() {
        Ok(v) => v.iter().map(|s| s.trim().to_ascii_uppercase()).filter(|s| !s.is_empty()).collect(),
        Err(_) => Vec::new(),
    }
}

/// A numeric attribute (DS, IS, FD, US…) as f64.
pub(crate) fn float(obj: &InMemDicomObject, tag: Tag) -> Option<f64> {
    obj.element_opt(tag).ok().flatten()?.to_float64().ok().filter(|v| v.is_finite())
}

/// Exactly `N` numbers, or `None`.
pub(crate) fn floats<const N: usize>(obj: &InMemDicomObject, tag: Tag) -> Option<[f64; N]> {
    let v = obj.element_opt(tag).ok().flatten()?.to_multi_float64().ok()?;
    if v.len() != N || v.iter().any(|x| !x.is_finite()) {
        return None;
    }
    Some(std::array::from_fn(|i| v[i]))
}

/// An integer attribute.
pub(crate) fn int(obj: &InMemDicomObject, tag: Tag) -> Option<i64> {
    obj.element_opt(tag).ok().flatten()?.to_int::<i64>().ok()
}

/// The first item of a sequence attribute.
pub(crate) fn item(obj: &InMemDicomObject, tag: Tag) -> Option<&InMemDicomObject> {
    obj.element_opt(tag).ok().flatten()?.items()?.first()
}

/// All items of a sequence attribute (empty when absent).
pub(crate) fn items(obj: &InMemDicomObject, tag: Tag) -> &[InMemDicomObject] {
    obj.element_opt(tag).ok().flatten().and_then(|e| e.items()).unwrap_or(&[])
}
