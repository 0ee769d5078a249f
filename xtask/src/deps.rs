//! Debian packages the local cluster needs, installed when missing.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// (a file that proves the package is installed, the Debian package that provides it)
const PACKAGES: &[(&str, &str)] = &[
    ("/usr/bin/redis-server", "redis-server"),
    ("/usr/bin/redis-cli", "redis-tools"),
    ("/usr/share/postgresql-common/pg_wrapper", "postgresql"),
    // The postgres image's entrypoint runs initdb as a uid without a passwd entry
    // (`runAsUser: 999` in a restricted namespace) through nss_wrapper, as the official
    // image does.
    (
        "/usr/lib/x86_64-linux-gnu/libnss_wrapper.so",
        "libnss-wrapper",
    ),
    ("/usr/sbin/mkfs.ext4", "e2fsprogs"),
    ("/usr/sbin/resize2fs", "e2fsprogs"),
    ("/usr/sbin/ip", "iproute2"),
    ("/usr/sbin/losetup", "mount"),
    ("/usr/bin/nsenter", "util-linux"),
    ("/usr/bin/setpriv", "util-linux"),
    ("/usr/bin/restic", "restic"),
    ("/usr/bin/zstd", "zstd"),
    // `age -d` / `age-keygen`: the tests decrypt backups by hand, as users would.
    ("/usr/bin/age", "age"),
    // A real Prometheus scrapes the manager in the monitoring tests; promtool checks and
    // unit-tests the alert rules Stateward generates.
    ("/usr/bin/prometheus", "prometheus"),
    ("/usr/bin/promtool", "prometheus"),
];

/// Installs the missing packages with apt-get (we run as root on dev machines and in CI).
pub fn ensure() -> Result<()> {
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(file, _)| !Path::new(file).exists())
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "the local cluster needs these Debian packages: {}; install them with \
             `sudo apt-get install -y {}` (the local cluster also needs root for loop \
             devices and network namespaces)",
            missing.join(" "),
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    let update = Command::new("apt-get")
        .args(["update", "-q"])
        .status()
        .context("running apt-get update")?;
    if !update.success() {
        bail!("apt-get update failed");
    }
    let install = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get install")?;
    if !install.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}
