//! Memory limits as a kubelet sets them: each container with `resources.limits.memory`
//! runs in a memory cgroup of its own (below the node's own, in the cgroup v1 memory
//! hierarchy, or cgroup v2's `memory.max`) holding that limit; the kernel's OOM killer
//! ends it at the limit, and the container terminates as `OOMKilled` (exit code 137).
//! Execs join their container's cgroup. Without a writable memory controller the node
//! says so in its log once and runs containers unlimited (docs/local-cluster.md).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// A container's memory cgroup, removed when dropped (when the container is done for
/// good).
#[derive(Debug)]
pub struct MemoryCgroup {
    path: PathBuf,
    v2: bool,
}

/// Where this node makes its containers' memory cgroups: a `stateward-pods` directory
/// below its own memory cgroup, or `None` when there is no writable memory controller.
pub fn node_root() -> Option<(PathBuf, bool)> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let v1 = own.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then(|| PathBuf::from("/sys/fs/cgroup/memory").join(path.trim_start_matches('/')))
    });
    let candidates = v1.map(|p| (p, false)).into_iter().chain(
        own.lines().find_map(|l| l.strip_prefix("0::")).map(|path| {
            (
                PathBuf::from("/sys/fs/cgroup").join(path.trim_start_matches('/')),
                true,
            )
        }),
    );
    for (base, v2) in candidates {
        let root = base.join("stateward-pods");
        let limit_file = if v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        if std::fs::create_dir_all(&root).is_ok() && root.join(limit_file).exists() {
            return Some((root, v2));
        }
    }
    None
}

impl MemoryCgroup {
    /// A fresh cgroup `name` below `root` limited to `limit` bytes.
    pub fn create(root: &Path, v2: bool, name: &str, limit: u64) -> Result<Self> {
        let path = root.join(name);
        let _ = std::fs::remove_dir(&path); // a leftover of an earlier start
        std::fs::create_dir_all(&path)
            .with_context(|| format!("creating memory cgroup {}", path.display()))?;
        let file = if v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        std::fs::write(path.join(file), limit.to_string())
            .with_context(|| format!("setting {} in {}", file, path.display()))?;
        if v2 {
            // No swap: the limit is the limit, as with a kubelet's default.
            let _ = std::fs::write(path.join("memory.swap.max"), "0");
        }
        Ok(Self { path, v2 })
    }

    /// What the runner joins (writing its own pid to `cgroup.procs`).
    pub fn procs(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// How many processes of this cgroup the kernel's OOM killer ended so far.
    pub fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        std::fs::read_to_string(self.path.join(file))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|n| n.trim().parse::<u64>().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // Empty by now (the container's process group was killed); if not, the kernel
        // refuses and the leftover goes with the node's own cgroup.
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Bytes of a memory quantity (`128Mi`, `1Gi`, `500M`, `1000000`); `None` for anything
/// else (the API server validated it already, so only exotic forms end here).
pub fn quantity_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    number.checked_mul(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_quantities_in_bytes() {
        for (q, bytes) in [
            ("128Mi", Some(128 << 20)),
            ("1Gi", Some(1 << 30)),
            ("500M", Some(500_000_000)),
            ("1000000", Some(1_000_000)),
            ("1.5Gi", None),
            ("lots", None),
        ] {
            assert_eq!(quantity_bytes(q), bytes, "{q}");
        }
    }
}
