//! Starting the local cluster's processes detached from xtask, and finding and stopping
//! everything a testenv left behind: processes (by an environment marker, which children
//! inherit), mounts, loop devices and network namespaces.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Every process the testenv starts carries this variable; its children inherit it, so a
/// scan of /proc finds them even when the process that started them died.
pub const MARKER_VAR: &str = "STATEWARD_TESTENV_ID";

/// Prefix of the network namespaces the local node creates (one per pod).
pub const NETNS_PREFIX: &str = "stw-";

/// Starts `cmd` in its own process group with output appended to `log`, detached from
/// xtask so it outlives this command. Returns its pid.
pub fn spawn_detached(mut cmd: Command, log: &Path, marker: &str) -> Result<u32> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .env(MARKER_VAR, marker)
        .process_group(0);
    let program = cmd.get_program().to_string_lossy().into_owned();
    let child = cmd.spawn().with_context(|| format!("starting {program}"))?;
    Ok(child.id())
}

pub fn alive(pid: u32) -> bool {
    // A zombie still "exists" for kill(0); treat it as dead.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Pids of every live process whose environment carries our marker.
pub fn marked_processes(marker: &str) -> Vec<u32> {
    let needle = format!("{MARKER_VAR}={marker}");
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
                .unwrap_or(false)
        })
        .filter(|pid| alive(*pid))
        .collect()
}

pub fn signal(pid: u32, sig: Signal) {
    if let Ok(raw) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(raw), sig);
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL whatever is left.
pub fn terminate(pids: &[u32], grace: Duration) {
    for pid in pids {
        signal(*pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && pids.iter().any(|p| alive(*p)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    for pid in pids.iter().filter(|p| alive(**p)) {
        signal(*pid, Signal::SIGKILL);
    }
}

/// Unmounts everything mounted at or below `dir` (deepest first).
pub fn unmount_below(dir: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut targets: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    targets.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for target in targets {
        let ok = Command::new("umount")
            .arg(&target)
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&target).status();
        }
    }
}

/// Detaches loop devices whose backing file lies below `dir`.
pub fn detach_loops_below(dir: &Path) {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue;
        };
        let backing = backing.trim().trim_end_matches(" (deleted)");
        if Path::new(backing).starts_with(dir) {
            let _ = Command::new("losetup")
                .arg("-d")
                .arg(format!("/dev/{name}"))
                .status();
        }
    }
}

/// Deletes the local node's per-pod network namespaces.
pub fn delete_netns() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(NETNS_PREFIX) {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// Deletes a network link if it exists.
pub fn delete_link(name: &str) {
    if Path::new("/sys/class/net").join(name).exists() {
        let _ = Command::new("ip").args(["link", "del", name]).status();
    }
}

/// Runs a command and fails with its stderr when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let output = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !output.status.success() {
        anyhow::bail!(
            "{:?} {:?} failed: {}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// A cgroup that holds every process of the testenv, so `down` finds them all, even
/// those that overwrite their environment (redis-server rewrites its process title over
/// it). Children inherit the cgroup at fork: xtask joins it while it starts the cluster.
pub struct Cgroup {
    pub dir: PathBuf,
    root: PathBuf,
}

fn cgroup_root() -> Option<PathBuf> {
    // cgroup v2 (unified or hybrid), else the v1 pids hierarchy.
    [
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/pids",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.join("cgroup.procs").is_file())
}

impl Cgroup {
    pub fn for_marker(marker: &str) -> Option<Self> {
        let root = cgroup_root()?;
        Some(Self {
            dir: root.join(format!("stateward-testenv-{marker}")),
            root,
        })
    }

    /// Moves this process into the cgroup until the guard is dropped.
    pub fn join(&self) -> Result<CgroupMembership<'_>> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating cgroup {}", self.dir.display()))?;
        std::fs::write(
            self.dir.join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .with_context(|| format!("joining cgroup {}", self.dir.display()))?;
        Ok(CgroupMembership { cgroup: self })
    }

    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .filter(|pid| *pid != std::process::id())
            .collect()
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// While alive, xtask itself is in the testenv's cgroup.
pub struct CgroupMembership<'a> {
    cgroup: &'a Cgroup,
}

impl Drop for CgroupMembership<'_> {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.cgroup.root.join("cgroup.procs"),
            std::process::id().to_string(),
        );
    }
}
