//! The one rule for files that hold secrets (private keys, API keys, the API keys file, the
//! audit HMAC key), shared by the clients and the services: other accounts must not be able to
//! read them.
//!
//! Allowed: mode 0600 or stricter; or, for a file owned by root, 0640 or stricter, so that a
//! service's group can read it. The second form is PostgreSQL's rule for `ssl_key_file`, and it
//! is what Kubernetes Secret volumes with an `fsGroup` and root-owned Docker secrets give a
//! non-root container. Anything readable by others, or group-writable, is refused.

use std::path::Path;

/// Why a secret file is refused: a sentence naming the mode and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ExposedSecret(String);

/// Checks `path` against the rule (see the module docs). A file that cannot be inspected is
/// refused too; reading it is the caller's business.
pub fn check_secret_file(path: &Path) -> Result<(), ExposedSecret> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(path).map_err(|e| ExposedSecret(format!("cannot inspect it ({e})")))?;
        check_mode(meta.permissions().mode() & 0o777, meta.uid())
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}

/// The rule on a mode and an owner.
fn check_mode(mode: u32, owner_uid: u32) -> Result<(), ExposedSecret> {
    let allowed = if owner_uid == 0 { 0o640 } else { 0o600 };
    if mode & !allowed & 0o777 == 0 {
        return Ok(());
    }
    Err(ExposedSecret(format!(
        "is accessible to {} (mode {mode:04o}); run chmod 600 on it (or, owned by root, chmod 640 with the \
         service's group)",
        if mode & 0o007 != 0 { "others" } else { "its group" }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_only_files_pass_for_any_owner() {
        for mode in [0o600, 0o400, 0o200, 0o000] {
            assert!(check_mode(mode, 1000).is_ok(), "{mode:o}");
            assert!(check_mode(mode, 0).is_ok(), "{mode:o}");
        }
    }

    #[test]
    fn group_read_passes_only_when_root_owns_the_file() {
        assert!(check_mode(0o640, 0).is_ok());
        assert!(check_mode(0o440, 0).is_ok());
        let refused = check_mode(0o640, 65532).unwrap_err().to_string();
        assert!(
            refused.contains("its group") && refused.contains("0640") && refused.contains("chmod 600"),
            "{refused}"
        );
    }

    #[test]
    fn others_or_group_write_are_always_refused() {
        for (mode, uid) in [(0o644, 0), (0o604, 1000), (0o660, 0), (0o620, 1000), (0o777, 0)] {
            assert!(check_mode(mode, uid).is_err(), "{mode:o} owned by {uid}");
        }
        assert!(check_mode(0o644, 0).unwrap_err().to_string().contains("others"));
    }

    #[test]
    fn the_file_itself_is_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "secret").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o604)).unwrap();
        assert!(check_secret_file(&path).is_err());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(check_secret_file(&path).is_ok());
        assert!(check_secret_file(&dir.path().join("missing")).is_err());
    }
}
