//! The container runner: the node re-executes its own binary as `stateward-node
//! run-container` (start a container) or `stateward-node enter` (exec into one). The
//! runner joins or creates the namespaces, sets up mounts, drops privileges and then
//! replaces itself with the container's program, so the pid the node waits on is the
//! container's own. It runs before any thread exists: `setns` into a mount namespace
//! requires a single-threaded process.

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, setns, unshare};
use nix::unistd::{Gid, Uid, setgid, setgroups, sethostname, setuid};
use serde::{Deserialize, Serialize};

/// Environment variable carrying the JSON [`RunSpec`] to the runner.
pub const SPEC_VAR: &str = "STATEWARD_RUN_SPEC";

/// One mount inside the container's private mount namespace.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct MountSpec {
    /// Host path to bind, or `None` for a fresh tmpfs.
    pub source: Option<PathBuf>,
    pub target: PathBuf,
    pub read_only: bool,
}

/// Everything the runner needs to become the container (or an exec in it).
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct RunSpec {
    /// Network namespace to join (`/run/netns/<name>`), for a new container.
    pub netns: Option<PathBuf>,
    /// For exec: join the namespaces of this running container process instead.
    pub enter_pid: Option<u32>,
    pub hostname: Option<String>,
    pub mounts: Vec<MountSpec>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub supplemental_groups: Vec<u32>,
    pub working_dir: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    pub argv: Vec<String>,
    /// For a new container: after its own mounts are bound, detach every host mount
    /// below this directory (the node's volumes) from the container's mount namespace.
    /// Otherwise each container's copy of the host's mounts pins every volume mounted on
    /// the node, and an offline resize of another pod's volume fails with "Device or
    /// resource busy" for as long as this container lives.
    #[serde(default)]
    pub detach_under: Option<PathBuf>,
    /// `allowPrivilegeEscalation: false`: `PR_SET_NO_NEW_PRIVS` before the program runs
    /// (and before every exec into the container), so a setuid binary gains nothing.
    #[serde(default)]
    pub no_new_privs: bool,
    /// The capabilities the process may hold (see `privileges`); `None` leaves the
    /// node's own.
    #[serde(default)]
    pub capabilities: Option<Vec<u8>>,
    /// Where to record what the process started as.
    #[serde(default)]
    pub record: Option<super::privileges::RecordTarget>,
    /// The `cgroup.procs` of the container's memory cgroup, joined before the exec.
    #[serde(default)]
    pub memory_cgroup: Option<PathBuf>,
}

/// Entry point of the runner; returns only on error (else it has exec'd).
pub fn run(spec_json: &str) -> Result<std::convert::Infallible> {
    let spec: RunSpec = serde_json::from_str(spec_json).context("parsing the run spec")?;
    if let Some(pid) = spec.enter_pid {
        join_namespaces(pid)?;
    } else {
        if let Some(netns) = &spec.netns {
            let file = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
            setns(file, CloneFlags::CLONE_NEWNET).context("joining the pod network namespace")?;
        }
        unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS)
            .context("creating the container's mount namespace")?;
        // Private propagation: our mounts stay ours and the host's later mounts stay out.
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .context("making / private")?;
        if let Some(hostname) = &spec.hostname {
            sethostname(hostname).context("setting the hostname")?;
        }
        let mut mounts = spec.mounts.clone();
        mounts.sort_by_key(|m| m.target.components().count());
        // Open every bind source first: a tmpfs mounted at /tmp would otherwise hide
        // sources that live below /tmp (a checkout in /tmp, say). Binding through
        // /proc/self/fd/N reaches them whatever is mounted later.
        let sources = mounts
            .iter()
            .map(|m| m.source.as_ref().map(|s| open_path(s)).transpose())
            .collect::<Result<Vec<_>>>()?;
        for (m, source) in mounts.iter().zip(&sources) {
            apply_mount(m, source.as_ref())?;
        }
        if let Some(root) = &spec.detach_under {
            detach_mounts_under(root);
        }
    }
    if let Some(dir) = &spec.working_dir {
        std::fs::create_dir_all(dir).ok();
        std::env::set_current_dir(dir)
            .with_context(|| format!("changing into the working directory {}", dir.display()))?;
    }
    if let Some(procs) = &spec.memory_cgroup {
        std::fs::write(procs, std::process::id().to_string())
            .with_context(|| format!("joining the memory cgroup {}", procs.display()))?;
    }
    // Opened while still root: the record file is the node's.
    let mut record = spec
        .record
        .as_ref()
        .and_then(|t| super::privileges::open_record(t).map(|f| (f, t)));
    if let Some(caps) = &spec.capabilities {
        super::privileges::restrict_bounding(caps)?;
    }
    if let Some(gid) = spec.gid {
        let mut groups: Vec<Gid> = vec![Gid::from_raw(gid)];
        groups.extend(spec.supplemental_groups.iter().map(|g| Gid::from_raw(*g)));
        setgroups(&groups).context("setting supplemental groups")?;
        setgid(Gid::from_raw(gid)).context("setting the group id")?;
    } else if !spec.supplemental_groups.is_empty() {
        let mut groups: Vec<Gid> = vec![Gid::from_raw(0)];
        groups.extend(spec.supplemental_groups.iter().map(|g| Gid::from_raw(*g)));
        setgroups(&groups).context("setting supplemental groups")?;
    }
    if let Some(uid) = spec.uid {
        setuid(Uid::from_raw(uid)).context("setting the user id")?;
    }
    // Still root: exactly the container's capabilities (a non-root process has none left
    // after the user switch).
    if let Some(caps) = &spec.capabilities
        && nix::unistd::geteuid().is_root()
    {
        super::privileges::set_capabilities(caps)?;
    }
    if spec.no_new_privs {
        nix::sys::prctl::set_no_new_privs().context("setting no_new_privs")?;
    }
    let Some((program, args)) = spec.argv.split_first() else {
        bail!("the container has no command: set command/args or use an image with an entrypoint");
    };
    let path = spec
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let resolved = resolve_program(program, &path)
        .with_context(|| format!("executable {program:?} not found in $PATH ({path})"))?;
    if let Some((file, target)) = &mut record {
        super::privileges::write_record(file, target, program);
    }
    let err = Command::new(&resolved)
        .arg0(program)
        .args(args)
        .env_clear()
        .envs(
            spec.env
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        )
        .exec();
    Err(anyhow::Error::new(err).context(format!("starting {program}")))
}

/// Lazily unmounts, in this (private) mount namespace, every mount point below `root`,
/// deepest first. The container's binds of its own volumes are separate mounts and stay.
fn detach_mounts_under(root: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(root) && p != root)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    for point in points {
        let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn join_namespaces(pid: u32) -> Result<()> {
    // Network first: after joining the mount namespace /proc may be a different view.
    let net = File::open(format!("/proc/{pid}/ns/net")).context("the container is gone")?;
    let uts = File::open(format!("/proc/{pid}/ns/uts")).context("the container is gone")?;
    let mnt = File::open(format!("/proc/{pid}/ns/mnt")).context("the container is gone")?;
    setns(net, CloneFlags::CLONE_NEWNET).context("joining the network namespace")?;
    setns(uts, CloneFlags::CLONE_NEWUTS).context("joining the UTS namespace")?;
    setns(mnt, CloneFlags::CLONE_NEWNS).context("joining the mount namespace")?;
    Ok(())
}

/// An O_PATH handle on a mount source (no read permission needed, works for files and
/// directories).
fn open_path(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_PATH.bits() | nix::fcntl::OFlag::O_CLOEXEC.bits())
        .open(path)
        .with_context(|| format!("opening mount source {}", path.display()))
}

fn apply_mount(m: &MountSpec, handle: Option<&File>) -> Result<()> {
    let target = &m.target;
    match (&m.source, handle) {
        (Some(named), Some(handle)) => {
            use std::os::fd::AsRawFd;
            let source = PathBuf::from(format!("/proc/self/fd/{}", handle.as_raw_fd()));
            let is_dir = handle.metadata().map(|m| m.is_dir()).unwrap_or(false);
            if is_dir {
                std::fs::create_dir_all(target)
                    .with_context(|| format!("creating mount point {}", target.display()))?;
            } else {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                if !target.exists() {
                    File::create(target)
                        .with_context(|| format!("creating mount point {}", target.display()))?;
                }
            }
            mount(
                Some(source.as_path()),
                target.as_path(),
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .with_context(|| {
                format!("bind-mounting {} at {}", named.display(), target.display())
            })?;
            if m.read_only {
                mount(
                    None::<&str>,
                    target.as_path(),
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    None::<&str>,
                )
                .with_context(|| format!("making {} read-only", target.display()))?;
            }
        }
        (Some(named), None) => bail!("mount source {} was not opened", named.display()),
        (None, _) => {
            std::fs::create_dir_all(target)?;
            mount(
                Some("tmpfs"),
                target.as_path(),
                Some("tmpfs"),
                MsFlags::empty(),
                Some("mode=1777"),
            )
            .with_context(|| format!("mounting a tmpfs at {}", target.display()))?;
        }
    }
    Ok(())
}

fn resolve_program(program: &str, path: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    path.split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_programs_on_the_given_path() {
        assert_eq!(
            resolve_program("/bin/sh", ""),
            Some(PathBuf::from("/bin/sh"))
        );
        assert!(resolve_program("sh", "/nonexistent:/bin").is_some());
        assert_eq!(resolve_program("no-such-program-here", "/bin"), None);
    }
}
