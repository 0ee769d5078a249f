//! `cargo xtask test`: every test of the project, in one command.
//!
//! 1. unit tests (no cluster);
//! 2. the local cluster comes up (built binaries are cached);
//! 3. integration tests run against it, several test threads per binary;
//! 4. the cluster is torn down, also when a step failed.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::testenv;

pub fn run(keep: bool, filter: Option<&str>) -> Result<()> {
    let started = Instant::now();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = crate::repo_root();

    step("unit tests");
    let unit = Command::new(&cargo)
        .current_dir(&root)
        .args(["test", "--workspace", "--lib", "--bins"])
        .status()
        .context("running cargo test")?;
    if !unit.success() {
        bail!("unit tests failed");
    }

    step("local cluster");
    let result = testenv::up().and_then(|env| {
        step("integration tests");
        let mut cmd = Command::new(&cargo);
        cmd.current_dir(&root)
            .args(["test", "--workspace", "--test", "*"])
            .env("STATEWARD_TESTENV", env.state_dir.join("env.json"))
            .env("KUBECONFIG", &env.kubeconfig);
        cmd.arg("--");
        if let Some(filter) = filter {
            cmd.arg(filter);
        }
        let status = cmd.status().context("running cargo test")?;
        if !status.success() {
            bail!("integration tests failed (cluster logs: target/testenv/logs/)");
        }
        Ok(())
    });

    if keep {
        eprintln!("xtask: --keep: the local cluster stays up; `cargo xtask testenv down` stops it");
    } else {
        step("tear-down");
        if let Err(e) = testenv::down() {
            eprintln!("xtask: tear-down failed: {e:#}");
        }
    }
    result?;
    eprintln!(
        "xtask: all tests passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn step(name: &str) {
    eprintln!("\n==== xtask test: {name} ====");
}
