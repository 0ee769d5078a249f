//! Capabilities as a container runtime grants them, and the node's record of what each
//! container process (and each exec) really ran with.
//!
//! A root container gets the runtime's default capability set (containerd's and
//! Docker's), minus `securityContext.capabilities.drop`, plus `add` (`privileged`: all).
//! The runner drops everything else from the bounding set before it switches user (so no
//! setuid binary can regain it) and sets the permitted, effective and inheritable sets to
//! exactly that list when the process stays root; a non-root process keeps none (the
//! kernel clears them at the user switch), as under a real runtime without ambient
//! capabilities.
//!
//! Every start and exec appends one JSON line to `<node state>/processes.jsonl`, read
//! from `/proc/self/status` right before the program replaces the runner: uid, gids,
//! `NoNewPrivs` and the effective capabilities. Tests read it with [`records`].

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::SecurityContext;
use serde::{Deserialize, Serialize};

/// Capability names (without `CAP_`) by number, as in `linux/capability.h`.
const NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// The capabilities containerd and Docker give a container by default.
const RUNTIME_DEFAULT: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

fn number(name: &str) -> Option<u8> {
    let name = name.trim().to_ascii_uppercase();
    let name = name.strip_prefix("CAP_").unwrap_or(&name);
    NAMES.iter().position(|n| *n == name).map(|i| i as u8)
}

/// The names of capability numbers (for records and messages).
pub fn names(caps: &[u8]) -> Vec<String> {
    caps.iter()
        .filter_map(|c| NAMES.get(usize::from(*c)))
        .map(|n| n.to_string())
        .collect()
}

/// The capabilities a container's processes may hold, sorted: the runtime default,
/// `drop` removed (`ALL` removes all), `add` added (`ALL` adds all), all of them when
/// privileged. Unknown names are ignored, as containerd does.
pub fn container_capabilities(sc: &SecurityContext) -> Vec<u8> {
    let all: Vec<u8> = (0..NAMES.len() as u8).collect();
    if sc.privileged == Some(true) {
        return all;
    }
    let caps = sc.capabilities.clone().unwrap_or_default();
    let listed = |list: &Option<Vec<String>>| list.clone().unwrap_or_default();
    let has_all = |list: &[String]| list.iter().any(|n| n.eq_ignore_ascii_case("ALL"));
    let (drop, add) = (listed(&caps.drop), listed(&caps.add));
    let mut set: Vec<u8> = if has_all(&drop) {
        Vec::new()
    } else {
        RUNTIME_DEFAULT
            .iter()
            .filter_map(|n| number(n))
            .filter(|c| !drop.iter().any(|d| number(d) == Some(*c)))
            .collect()
    };
    if has_all(&add) {
        return all;
    }
    set.extend(add.iter().filter_map(|n| number(n)));
    set.sort_unstable();
    set.dedup();
    set
}

/// The `caps` crate's capabilities among `keep` (by number).
fn kept(keep: &[u8]) -> caps::CapsHashSet {
    caps::all()
        .into_iter()
        .filter(|c| keep.contains(&c.index()))
        .collect()
}

/// Runner side, before the user switch: every capability not in `keep` leaves the
/// bounding set.
pub fn restrict_bounding(keep: &[u8]) -> Result<()> {
    let bounding = caps::read(None, caps::CapSet::Bounding).context("reading the bounding set")?;
    for cap in bounding.into_iter().filter(|c| !keep.contains(&c.index())) {
        caps::drop(None, caps::CapSet::Bounding, cap)
            .with_context(|| format!("dropping {cap} from the bounding set"))?;
    }
    Ok(())
}

/// Runner side, for a process that stays root: effective, permitted and inheritable are
/// exactly `keep` (with the bounding set, what the program keeps across its exec). Only
/// what the node itself holds can be kept (our VMs lack CAP_SYS_RESOURCE even for root):
/// a privileged container gets everything the node has.
pub fn set_capabilities(keep: &[u8]) -> Result<()> {
    let held = caps::read(None, caps::CapSet::Permitted).context("reading the permitted set")?;
    let keep: caps::CapsHashSet = kept(keep).intersection(&held).copied().collect();
    // Effective first: it must stay within permitted at every step.
    for set in [
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
        caps::CapSet::Inheritable,
    ] {
        caps::set(None, set, &keep).with_context(|| format!("setting the {set:?} capabilities"))?;
    }
    Ok(())
}

/// Where and as what a runner records its process.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct RecordTarget {
    pub path: PathBuf,
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub exec: bool,
}

/// One process as it started: what `/proc/self/status` said right before its exec.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProcessRecord {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    /// An exec into the container (else its main process).
    pub exec: bool,
    pub argv0: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub no_new_privs: bool,
    /// Effective capabilities, by name.
    pub capabilities: Vec<String>,
}

/// The record file of a node state directory.
pub fn record_path(state_dir: &Path) -> PathBuf {
    state_dir.join("processes.jsonl")
}

/// Runner side: opened while still root (the file is the node's).
pub fn open_record(target: &RecordTarget) -> Option<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&target.path)
        .ok()
}

/// Runner side, last step before the exec: appends what this process is now.
pub fn write_record(file: &mut std::fs::File, target: &RecordTarget, argv0: &str) {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return;
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let first = |v: String| {
        v.split_whitespace()
            .next()
            .and_then(|x| x.parse().ok())
            .unwrap_or(u32::MAX)
    };
    let cap_eff = u64::from_str_radix(&field("CapEff:"), 16).unwrap_or(0);
    let record = ProcessRecord {
        namespace: target.namespace.clone(),
        pod: target.pod.clone(),
        container: target.container.clone(),
        exec: target.exec,
        argv0: argv0.to_string(),
        uid: first(field("Uid:")),
        gid: first(field("Gid:")),
        groups: field("Groups:")
            .split_whitespace()
            .filter_map(|g| g.parse().ok())
            .collect(),
        no_new_privs: field("NoNewPrivs:") == "1",
        capabilities: names(
            &(0..64u8)
                .filter(|c| cap_eff & (1u64 << c) != 0)
                .collect::<Vec<_>>(),
        ),
    };
    if let Ok(mut line) = serde_json::to_vec(&record) {
        line.push(b'\n');
        // One write of a short line to an O_APPEND file: lines never interleave.
        let _ = file.write_all(&line);
    }
}

/// Test side: every process the node started in `namespace` so far.
pub fn records(node_state_dir: &Path, namespace: &str) -> Vec<ProcessRecord> {
    std::fs::read_to_string(record_path(node_state_dir))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<ProcessRecord>(l).ok())
        .filter(|r| r.namespace == namespace)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sc(yaml: &str) -> SecurityContext {
        serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{e}: {yaml}"))
    }

    #[test]
    fn capabilities_follow_the_runtime_default_drop_add_and_privileged() {
        let rows: Vec<(&str, &str, Vec<&str>)> = vec![
            ("nothing said: the runtime default", "{}", {
                let mut d = RUNTIME_DEFAULT.to_vec();
                d.sort_by_key(|n| number(n));
                d
            }),
            ("drop ALL", "{capabilities: {drop: [ALL]}}", vec![]),
            (
                "drop ALL, add two",
                "{capabilities: {drop: [ALL], add: [CHOWN, CAP_FOWNER]}}",
                vec!["CHOWN", "FOWNER"],
            ),
            (
                "drop one",
                "{capabilities: {drop: [MKNOD, SETFCAP, NET_RAW, KILL, AUDIT_WRITE, SYS_CHROOT, NET_BIND_SERVICE, SETPCAP, SETUID, SETGID]}}",
                vec!["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID"],
            ),
            (
                "add beyond the default",
                "{capabilities: {drop: [ALL], add: [DAC_READ_SEARCH, NOT_A_CAP]}}",
                vec!["DAC_READ_SEARCH"],
            ),
        ];
        for (case, yaml, expected) in rows {
            assert_eq!(
                names(&container_capabilities(&sc(yaml))),
                expected,
                "{case}"
            );
        }
        assert_eq!(
            container_capabilities(&sc("{privileged: true, capabilities: {drop: [ALL]}}")).len(),
            NAMES.len()
        );
    }
}
