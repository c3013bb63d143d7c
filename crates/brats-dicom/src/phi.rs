//! Names for series and instances that carry no patient data.
//!
//! DICOM UIDs are not secret, but they link to a patient through the archive; logs, errors and
//! metrics therefore name a series by `sha256(salt ‖ uid)[..12]` (hex), which an operator who
//! holds the salt and the study can match, and nobody else can reverse.

use sha2::{Digest, Sha256};

/// The salt the offline CLI uses when none is configured.
pub const DEFAULT_SALT: &str = "brats-dicom";

/// Hashes UIDs into short, stable, non-reversible names.
#[derive(Debug, Clone)]
pub struct UidHasher {
    salt: Vec<u8>,
}

impl Default for UidHasher {
    fn default() -> Self {
        UidHasher::new(DEFAULT_SALT)
    }
}

impl UidHasher {
    /// A hasher with this salt.
    pub fn new(salt: &str) -> Self {
        UidHasher { salt: salt.as_bytes().to_vec() }
    }

    /// The first 12 hex digits of `sha256(salt ‖ uid)`.
    pub fn hash(&self, uid: &str) -> String {
        let mut h = Sha256::new();
        h.update(&self.salt);
        h.update(uid.as_bytes());
        hex::encode(&h.finalize()[..6])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_short_stable_and_salted() {
        let a = UidHasher::new("s1");
        assert_eq!(a.hash("1.2.3"), a.hash("1.2.3"));
        assert_eq!(a.hash("1.2.3").len(), 12);
        assert_ne!(a.hash("1.2.3"), UidHasher::new("s2").hash("1.2.3"));
        assert!(!a.hash("1.2.3").contains("1.2.3"));
    }
}
