//! `BackupRepository`: where backups live.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{Conditions, DNS_LABEL, SecretKeyRef};

/// An S3 bucket (and prefix) that stores backups. Credentials come only from Secret
/// references; the backup controller checks reachability and shows it as `Ready`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "stateward.io",
    version = "v1alpha1",
    kind = "BackupRepository",
    doc = "An S3 location that stores backups.",
    namespaced,
    status = "BackupRepositoryStatus",
    shortname = "brepo",
    category = "stateward",
    printcolumn = r#"{"name":"Bucket","type":"string","jsonPath":".spec.s3.bucket"}"#,
    printcolumn = r#"{"name":"Prefix","type":"string","jsonPath":".spec.s3.prefix"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BackupRepositorySpec {
    /// The S3 (or S3-compatible) location.
    pub s3: S3Location,
    /// Optional client-side encryption in the `age` format, so backups can be decrypted
    /// with standard tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    /// Namespaces (other than the repository's own) whose backups may be restored from
    /// this repository. Empty (default): only this namespace's prefix is readable. A set
    /// of namespace names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 63), regex(pattern = DNS_LABEL)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub allow_restore_from_namespaces: Vec<String>,
}

impl BackupRepositorySpec {
    /// Whether a Restore or an import in `namespace` may read the backup at `path`
    /// (`<namespace>/<app>/<backup>-<uid>`): its own namespace's, or one the repository
    /// lists in `allowRestoreFromNamespaces`. `Err` carries the sentence for the user.
    pub fn readable_from(
        &self,
        namespace: &str,
        path: &str,
        repository: &str,
    ) -> Result<(), String> {
        let owner = path.split('/').next().unwrap_or_default();
        if owner == namespace
            || self
                .allow_restore_from_namespaces
                .iter()
                .any(|n| n == owner)
        {
            return Ok(());
        }
        Err(format!(
            "the path {path} belongs to namespace {owner}; BackupRepository {repository} does not list it in spec.allowRestoreFromNamespaces"
        ))
    }

    /// The full key prefix of `path` in the bucket (the repository's prefix, then `path`).
    pub fn key_prefix(&self, path: &str) -> String {
        match self.s3.prefix.as_deref().map(|p| p.trim_end_matches('/')) {
            Some(p) if !p.is_empty() => format!("{p}/{path}"),
            _ => path.to_string(),
        }
    }
}

/// How the SDK computes request checksums.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum ChecksumMode {
    /// The SDK's default (trailing CRC checksums on uploads).
    #[default]
    WhenSupported,
    /// Only when the operation requires one: for S3-compatible servers that reject
    /// trailing checksums.
    WhenRequired,
}

/// An S3 bucket and prefix.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct S3Location {
    /// Bucket name, per S3's naming rules: 3-63 lower-case letters, digits, `.` and `-`,
    /// no `..`, not shaped like an IP address, no reserved prefix (`xn--`, `sthree-`) or
    /// suffix (`-s3alias`, `--ol-s3`).
    #[schemars(
        length(min = 3, max = 63),
        regex(pattern = r"^[a-z0-9][a-z0-9.\-]*[a-z0-9]$")
    )]
    #[x_kube(validation = Rule::new("!self.contains('..')").message("a bucket name has no two adjacent periods"))]
    #[x_kube(validation = Rule::new("!self.matches('^[0-9]+[.][0-9]+[.][0-9]+[.][0-9]+$')").message("a bucket name must not be shaped like an IP address"))]
    #[x_kube(validation = Rule::new("!self.startsWith('xn--') && !self.startsWith('sthree-') && !self.endsWith('-s3alias') && !self.endsWith('--ol-s3')").message("a bucket name must not use S3's reserved prefixes (xn--, sthree-) or suffixes (-s3alias, --ol-s3)"))]
    pub bucket: String,
    /// Key prefix under which this repository's backups live: `/`-separated segments, no
    /// leading or trailing `/`, no empty, `.` or `..` segment, no control character, no
    /// leading `-`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 512),
        regex(pattern = r"^[^-/[:cntrl:]][^/[:cntrl:]]*(/[^/[:cntrl:]]+)*$")
    )]
    #[x_kube(validation = Rule::new("!self.split('/').exists(p, p == '.' || p == '..')").message("a prefix has no . or .. segment"))]
    pub prefix: Option<String>,
    /// Region (default `us-east-1`): lower-case letters, digits and `-`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-z0-9][a-z0-9-]*$"))]
    pub region: Option<String>,
    /// Endpoint URL for S3-compatible servers, e.g. `https://s3.example.com:9000`: a
    /// scheme, a host and optionally a port (1-65535); no user, query or fragment
    /// (credentials come only from the Secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256), regex(pattern = r"^https?://[^/?#@]"))]
    #[x_kube(validation = Rule::new("isURL(self) && url(self).getHostname() != ''").message("endpoint must be a URL with a host, such as https://s3.example.com:9000"))]
    #[x_kube(validation = Rule::new("!self.matches('^https?://[^/?#]*:[0-9]+([/?#].*)?$') || self.matches('^https?://[^/?#]*:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])([/?#].*)?$')").message("endpoint port must be between 1 and 65535"))]
    #[x_kube(validation = Rule::new("!self.contains('?') && !self.contains('#')").message("endpoint has no query or fragment"))]
    #[x_kube(validation = Rule::new("!self.contains('@')").message("endpoint must not carry a user or password: credentials come from spec.s3.credentials"))]
    pub endpoint: Option<String>,
    /// Address buckets by path (`endpoint/bucket/key`) rather than virtual host.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force_path_style: bool,
    /// `WhenSupported` (default) or `WhenRequired`.
    #[serde(default)]
    pub checksum_mode: ChecksumMode,
    /// Access key id and secret access key.
    pub credentials: S3Credentials,
}

/// Where the S3 credentials are.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct S3Credentials {
    /// Secret key holding the access key id.
    pub access_key_id: SecretKeyRef,
    /// Secret key holding the secret access key.
    pub secret_access_key: SecretKeyRef,
}

/// age encryption: backups are encrypted to the recipient; restores decrypt with the
/// identity.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Encryption {
    /// Secret key holding the age recipient (`age1...`), used to encrypt backups.
    pub recipient: SecretKeyRef,
    /// Secret key holding the age identity (`AGE-SECRET-KEY-1...`), needed for restores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<SecretKeyRef>,
}

/// Observed state of a repository.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupRepositoryStatus {
    /// Generation of the spec last checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` with a reason a user can act on (`SecretNotFound`, `KeyMissing`,
    /// `EndpointUnreachable`, `AccessDenied`, `NoSuchBucket`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Conditions,
}
