//! Names the operator derives stay within Kubernetes limits: a readable prefix plus a
//! short hash of the full name, so they are deterministic and unique.
//!
//! Object names are DNS subdomains of up to 253 characters, but much of what the operator
//! derives from them has a tighter limit: label values (63), Job and Lease names that
//! become label values (63), pod names under a Job (hostnames, 63). Every derived name and
//! label value goes through [`bounded`] or [`label_value`]; [`check_object`] is the judge
//! the unit tests use on the objects built from names of every length.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The longest label value, DNS label and name that becomes a label value.
pub const MAX_LABEL: usize = 63;
/// The longest object name (a DNS subdomain).
pub const MAX_SUBDOMAIN: usize = 253;

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

/// A label value naming an object (whose name may be up to 253 characters): the name
/// itself when it fits, else a readable prefix and a hash. Selectors must compare with
/// the same function; to find the object back, read its full name from an annotation.
pub fn label_value(name: &str) -> String {
    bounded(name, MAX_LABEL, false)
}

/// A DNS-1123 label: lowercase alphanumerics and `-`, starting and ending alphanumeric,
/// at most 63 characters.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_LABEL
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A DNS-1123 subdomain: dot-separated DNS labels, at most 253 characters.
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= MAX_SUBDOMAIN && s.split('.').all(is_dns_label)
}

/// A label value: empty, or up to 63 of `[A-Za-z0-9_.-]`, starting and ending
/// alphanumeric.
pub fn is_label_value(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() {
        return true;
    }
    b.len() <= MAX_LABEL
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(c))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// Checks what the API server would refuse for length or shape in a built object: its
/// name (a subdomain; a DNS label of at most 63 for kinds whose name is used as a label or
/// hostname), every label value in its metadata, pod template and selector. Returns the
/// first problem, naming the field.
pub fn check_object(object: &Value) -> Result<(), String> {
    let kind = object["kind"].as_str().unwrap_or_default();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    // A Job's and a Lease's name become label values (`job-name`); a StatefulSet's pods
    // are `<name>-<ordinal>` hostnames labelled with `<name>-<revision hash>`; a Service
    // name is a DNS label.
    let name_ok = match kind {
        "Job" | "Lease" => is_dns_subdomain(name) && name.len() <= MAX_LABEL,
        "StatefulSet" => is_dns_label(name) && name.len() <= 52,
        "Service" => is_dns_label(name),
        _ => is_dns_subdomain(name),
    };
    if !name_ok {
        return Err(format!(
            "{kind} metadata.name {name:?} is not a valid name ({} characters)",
            name.len()
        ));
    }
    for path in [
        "/metadata/labels",
        "/spec/template/metadata/labels",
        "/spec/selector/matchLabels",
        "/spec/selector",
    ] {
        let Some(Value::Object(labels)) = object.pointer(path) else {
            continue;
        };
        for (key, value) in labels {
            let Some(value) = value.as_str() else {
                continue;
            };
            if !is_label_value(value) {
                return Err(format!(
                    "{kind} {name}: {path} {key}={value:?} is not a label value"
                ));
            }
        }
    }
    Ok(())
}

/// Names of every length from 1 to 253 characters, for tests of what is derived from
/// them: DNS subdomains mixing labels and dots, so a cut can land on a `.` or a `-`.
pub fn sample_names() -> impl Iterator<Item = String> {
    (1..=MAX_SUBDOMAIN).map(|len| {
        let pattern = b"ab-c.d9-e";
        let mut name: Vec<u8> = (0..len).map(|i| pattern[i % pattern.len()]).collect();
        // A subdomain's labels start and end alphanumeric.
        for i in 0..name.len() {
            let edge = i == 0
                || i == name.len() - 1
                || name[i - 1] == b'.'
                || name.get(i + 1) == Some(&b'.');
            if edge && !name[i].is_ascii_alphanumeric() {
                name[i] = b'x';
            }
        }
        String::from_utf8(name).unwrap_or_default()
    })
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

    #[test]
    fn label_values_fit_for_names_of_every_length() {
        for name in sample_names() {
            assert!(is_dns_subdomain(&name), "sample {name:?}");
            let value = label_value(&name);
            assert!(is_label_value(&value), "{} -> {value:?}", name.len());
            if name.len() <= MAX_LABEL {
                assert_eq!(value, name, "a name that fits is kept");
            }
            // A cut that lands before a `.` never leaves it at the end.
            let job = bounded(&format!("{name}-stage-0"), 52, false);
            assert!(is_dns_subdomain(&job) && job.len() <= 52, "{job:?}");
        }
    }

    #[test]
    fn validators_follow_the_api_servers_rules() {
        type Row = (&'static str, bool, bool, bool);
        // (input, dns label, subdomain, label value)
        let rows: [Row; 8] = [
            ("db", true, true, true),
            ("db.prod", false, true, true),
            ("-db", false, false, false),
            ("db-", false, false, false),
            ("Db", false, false, true),
            ("a_b", false, false, true),
            ("", false, false, true),
            ("a..b", false, false, true),
        ];
        for (input, label, subdomain, value) in rows {
            assert_eq!(is_dns_label(input), label, "{input:?} label");
            assert_eq!(is_dns_subdomain(input), subdomain, "{input:?} subdomain");
            assert_eq!(is_label_value(input), value, "{input:?} label value");
        }
        assert!(!is_label_value(&"a".repeat(64)));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(is_dns_subdomain(
            &[
                "a".repeat(63),
                "b".repeat(63),
                "c".repeat(63),
                "d".repeat(61)
            ]
            .join(".")
        ));
    }

    #[test]
    fn check_object_names_the_field() {
        let job = serde_json::json!({"kind": "Job", "metadata": {"name": "r.-stage-0", "labels": {"a": "b"}}});
        assert!(check_object(&job).unwrap_err().contains("metadata.name"));
        let long = "a".repeat(64);
        let job = serde_json::json!({"kind": "Job", "metadata": {"name": "ok"}, "spec": {"template": {"metadata": {"labels": {"stateward.io/restore": long}}}}});
        assert!(
            check_object(&job)
                .unwrap_err()
                .contains("/spec/template/metadata/labels")
        );
    }
}
