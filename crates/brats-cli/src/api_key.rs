//! API keys, minted here and checked by the services: `brats_<id>_<secret>`, of which the
//! services' keys file stores only the SHA-256 (the secret has 256 bits of entropy, so a slow
//! password hash would add nothing).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Every API key starts with this.
pub const PREFIX: &str = "brats_";

/// The hash the keys file stores for a key: hex SHA-256 of the whole key string
/// (`brats_<id>_<secret>`).
pub fn hash_api_key(secret_key: &str) -> String {
    hex::encode(Sha256::digest(secret_key.as_bytes()))
}

/// A new API key `brats_<id>_<secret>`, the secret 32 random bytes in unpadded base64url. `id`
/// must be 1–64 ASCII letters, digits or `-` (no `_`), else the keys file that lists it will not
/// load. Store only [`hash_api_key`] of the result; hand the key itself to its owner once.
pub fn new_api_key(id: &str) -> String {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    format!("{PREFIX}{id}_{}", URL_SAFE_NO_PAD.encode(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_hash_to_64_hex_digits() {
        let (a, b) = (new_api_key("ci"), new_api_key("ci"));
        assert_ne!(a, b);
        assert!(a.starts_with("brats_ci_") && a.len() == "brats_ci_".len() + 43, "{a}");
        assert_eq!(hash_api_key(&a).len(), 64);
        assert_eq!(hash_api_key(&a), hash_api_key(&a.clone()));
    }
}
