//! Names the operator derives stay within Kubernetes limits: a readable prefix plus a
//! short hash of the full name, so they are deterministic and unique.

use sha2::{Digest, Sha256};

/// `prefix` cut to fit `max` with `-<8 hex>` appended when it is too long (or always,
/// with `always_hash`). The result is a valid DNS label when `prefix` is one.
pub fn bounded(prefix: &str, max: usize, always_hash: bool) -> String {
    if !always_hash && prefix.len() <= max {
        return prefix.to_string();
    }
    let hash = hex::encode(&Sha256::digest(prefix.as_bytes())[..4]);
    let keep = max.saturating_sub(hash.len() + 1);
    let head: String = prefix.chars().take(keep).collect();
    format!("{}-{hash}", head.trim_end_matches(['-', '.']))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_stay_long_ones_get_a_stable_hash() {
        assert_eq!(bounded("redis", 63, false), "redis");
        let long = "a".repeat(80);
        let name = bounded(&long, 63, false);
        assert_eq!(name.len(), 63);
        assert_eq!(name, bounded(&long, 63, false));
        assert_ne!(bounded(&format!("{long}x"), 63, false), name);
        assert!(bounded("app-", 63, true).starts_with("app-"));
    }
}
