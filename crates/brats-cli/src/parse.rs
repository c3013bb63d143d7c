//! Parsers for the values several commands take: sizes `X,Y,Z`, device lists, storage URIs.

use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

/// A value that is not three comma-separated integers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}': expected three integers X,Y,Z")]
pub struct XyzError(pub String);

/// Parses sizes along X, Y and Z written `X,Y,Z` (spaces around the numbers allowed), e.g. a
/// crop `224,224,144`. Usable as a clap `value_parser`.
pub fn parse_xyz<T: FromStr>(s: &str) -> Result<[T; 3], XyzError> {
    let v: Vec<T> =
        s.split(',').map(|p| p.trim().parse::<T>()).collect::<Result<_, _>>().map_err(|_| XyzError(s.into()))?;
    v.try_into().map_err(|_| XyzError(s.into()))
}

/// A `--devices` value that names no device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown device '{0}': use cpu, or CUDA devices cuda:0,cuda:1,… (or 0,1,…)")]
pub struct DeviceError(pub String);

/// Parses `--devices`: `cpu`, or a comma-separated list of CUDA devices written `cuda:N` or
/// just `N`, into the JobSpec's device names (`cpu`, `cuda:N`). Whether the devices exist,
/// repeat or mix cpu with CUDA is the trainer's to judge (it knows the machine).
pub fn parse_devices(s: &str) -> Result<Vec<String>, DeviceError> {
    s.split(',')
        .map(|d| {
            let d = d.trim();
            if d.eq_ignore_ascii_case("cpu") {
                return Ok("cpu".to_string());
            }
            let index = d.strip_prefix("cuda:").unwrap_or(d);
            index.parse::<u32>().map(|i| format!("cuda:{i}")).map_err(|_| DeviceError(d.to_string()))
        })
        .collect()
}

/// A location that cannot become a URI.
#[derive(Debug, thiserror::Error)]
pub enum UriError {
    /// Nothing was given.
    #[error("empty URI: give s3://bucket/key, file:///path or a path")]
    Empty,
    /// `file://` needs an absolute path.
    #[error("'{0}': file:// URLs must be absolute (file:///abs/path); use file:relative/path for relative ones")]
    RelativeFileUrl(String),
    /// The working directory could not be read to make a path absolute.
    #[error("'{0}': {1}")]
    Absolute(String, #[source] std::io::Error),
}

/// Turns what a user typed into a URI the services accept: URIs with a scheme (`s3://…`,
/// `file:///…`) pass through, paths and `file:relative/path` become absolute `file://` URIs
/// (relative to this process's directory, since the user means the files where they typed).
/// The services check the scheme themselves.
pub fn to_uri(s: &str) -> Result<String, UriError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(UriError::Empty);
    }
    if let Some(rest) = s.strip_prefix("file://") {
        if !rest.starts_with('/') {
            return Err(UriError::RelativeFileUrl(s.into()));
        }
        return Ok(format!("file://{}", normalize(Path::new(rest)).display()));
    }
    if s.contains("://") {
        return Ok(s.to_string());
    }
    let path = s.strip_prefix("file:").unwrap_or(s);
    let abs = std::path::absolute(path).map_err(|e| UriError::Absolute(s.into(), e))?;
    Ok(format!("file://{}", normalize(&abs).display()))
}

/// Removes `.` and `..` components without touching the filesystem.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xyz_takes_three_integers() {
        assert_eq!(parse_xyz::<u32>("224,224,144"), Ok([224, 224, 144]));
        assert_eq!(parse_xyz::<usize>(" 32, 16 ,8 "), Ok([32, 16, 8]));
        for bad in ["", "1,2", "1,2,3,4", "1,x,3", "1,,3", "-1,2,3", "1.5,2,3"] {
            let e = parse_xyz::<u32>(bad).unwrap_err();
            assert_eq!(e.to_string(), format!("'{bad}': expected three integers X,Y,Z"));
        }
    }

    #[test]
    fn devices_are_cpu_or_cuda_in_either_spelling() {
        assert_eq!(parse_devices("cpu").unwrap(), ["cpu"]);
        assert_eq!(parse_devices("CPU").unwrap(), ["cpu"]);
        assert_eq!(parse_devices("cuda:0,cuda:1").unwrap(), ["cuda:0", "cuda:1"]);
        assert_eq!(parse_devices("0, 1").unwrap(), ["cuda:0", "cuda:1"]);
        assert_eq!(parse_devices("cuda:2,3").unwrap(), ["cuda:2", "cuda:3"]);
        for bad in ["gpu", "cuda:", "cuda:x", "0,,1", "", "cuda:-1"] {
            assert!(parse_devices(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_devices("tpu").unwrap_err().to_string().split(':').next(), Some("unknown device 'tpu'"));
    }

    #[test]
    fn paths_become_absolute_file_uris_and_uris_pass() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(to_uri("data/x.json").unwrap(), format!("file://{}/data/x.json", cwd.display()));
        assert_eq!(to_uri("file:data/./a/../x.json").unwrap(), format!("file://{}/data/x.json", cwd.display()));
        assert_eq!(to_uri("/abs/./p/../q").unwrap(), "file:///abs/q");
        assert_eq!(to_uri("file:///abs/q").unwrap(), "file:///abs/q");
        assert_eq!(to_uri("s3://bucket/key/x.json").unwrap(), "s3://bucket/key/x.json");
        assert!(matches!(to_uri("file://rel/x"), Err(UriError::RelativeFileUrl(_))));
        assert!(matches!(to_uri("  "), Err(UriError::Empty)));
    }
}
