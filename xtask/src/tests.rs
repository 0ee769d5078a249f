//! `cargo xtask test`: every test of the project, in one command.
//!
//! 1. unit tests (no cluster);
//! 2. the local cluster comes up (built binaries are cached);
//! 3. integration tests run against it, several test threads per binary; then the tests
//!    named `exclusive_...` (the chart installed cluster-wide), alone;
//! 4. the cluster is torn down, also when a step failed.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::testenv;

pub fn run(keep: bool, filter: Option<&str>) -> Result<()> {
    let started = Instant::now();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = crate::repo_root();

    let mut totals = Totals::default();
    step("generated files");
    crate::crds(true)?;

    step("helm lint and template");
    let tools = crate::tools::ensure_all()?;
    chart_checks(tools.get("helm").context("helm was not built")?)?;

    step("unit tests");
    let mut unit = Command::new(&cargo);
    unit.current_dir(&root)
        .args(["test", "--workspace", "--lib", "--bins"]);
    if !run_counting(&mut unit, &mut totals)? {
        totals.print();
        bail!("unit tests failed");
    }

    step("local cluster");
    // Always a fresh cluster: one left by `demo` or `--keep` runs a cluster-wide manager
    // and holds other objects that would act on (or confuse) the tests.
    if testenv::state_dir().join("env.json").exists() {
        eprintln!("xtask: stopping the running local cluster so the tests start from a fresh one");
        testenv::down()?;
    }
    let result = testenv::up().and_then(|env| {
        let integration = |exclusive: bool, totals: &mut Totals| {
            let mut cmd = Command::new(&cargo);
            cmd.current_dir(&root)
                .args(["test", "--workspace", "--test", "*"])
                .env("STATEWARD_TESTENV", env.state_dir.join("env.json"))
                .env("KUBECONFIG", &env.kubeconfig);
            cmd.arg("--");
            if exclusive {
                // One at a time, with the cluster to themselves. (libtest ORs filters: a
                // filter given to `cargo xtask test` must name exclusive tests itself.)
                match filter {
                    Some(f) if f.contains(EXCLUSIVE) => cmd.arg(f),
                    Some(_) => return Ok(true),
                    None => cmd.arg(EXCLUSIVE),
                };
                cmd.args(["--test-threads", "1"]);
            } else {
                if let Some(filter) = filter {
                    cmd.arg(filter);
                }
                cmd.args(["--skip", EXCLUSIVE]);
            }
            run_counting(&mut cmd, totals)
        };
        step("integration tests");
        if !integration(false, &mut totals)? {
            bail!("integration tests failed (cluster logs: target/testenv/logs/)");
        }
        step("exclusive integration tests (cluster-wide: nothing else runs)");
        if !integration(true, &mut totals)? {
            bail!("exclusive integration tests failed (cluster logs: target/testenv/logs/)");
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
    totals.print();
    result?;
    eprintln!(
        "xtask: all tests passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Tests whose names start with this need the cluster to themselves (a cluster-wide
/// manager, cluster-scoped objects): they run after the others, one at a time.
const EXCLUSIVE: &str = "exclusive_";

fn step(name: &str) {
    eprintln!("\n==== xtask test: {name} ====");
}

/// Test counts summed over every `test result:` line cargo printed.
#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(kind), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match kind {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }

    /// The closing line CI reads.
    fn print(&self) {
        println!(
            "tests: {} passed, {} failed, {} skipped",
            self.passed, self.failed, self.ignored
        );
    }
}

/// Runs cargo test, echoing its output and counting results; true when it succeeded.
fn run_counting(cmd: &mut Command, totals: &mut Totals) -> Result<bool> {
    use std::io::{BufRead, BufReader, Write};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    if let Some(stdout) = child.stdout.take() {
        let mut out = std::io::stdout().lock();
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            totals.add_line(&line);
            writeln!(out, "{line}")?;
        }
    }
    Ok(child.wait()?.success())
}

/// `helm lint` and `helm template` of the chart, with the default values and with the
/// optional parts switched on.
fn chart_checks(helm: &std::path::Path) -> Result<()> {
    let chart = crate::repo_root().join("charts/stateward");
    let version = crate::tools::KUBERNETES_VERSION.trim_start_matches('v');
    let variants: [&[&str]; 3] = [
        &[],
        &[
            "--set",
            "watchNamespaces={team-a,team-b}",
            "--set",
            "features.monitoringObjects=false",
            "--set",
            "features.cloneStatefulSets=false",
            "--set",
            "features.volumeExpansion=false",
        ],
        &[
            "--set",
            "namespaced=true",
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--set",
            "metrics.prometheusRule.enabled=true",
            "--set",
            "metrics.grafanaDashboard.enabled=true",
            "--set",
            "replicaCount=2",
            "--set",
            "apiPriority.enabled=true",
            "--set",
            "networkPolicy.enabled=true",
            "--set",
            "managerPolicy.enabled=false",
        ],
    ];
    for extra in variants {
        let lint = Command::new(helm)
            .arg("lint")
            .arg("--strict")
            .arg(&chart)
            .args(["--kube-version", version])
            .args(extra)
            .output()?;
        if !lint.status.success() {
            bail!(
                "helm lint {extra:?} failed:\n{}{}",
                String::from_utf8_lossy(&lint.stdout),
                String::from_utf8_lossy(&lint.stderr)
            );
        }
        let template = Command::new(helm)
            .args(["template", "stateward"])
            .arg(&chart)
            .args(["--kube-version", version, "--namespace", "stateward-system"])
            .args(extra)
            .output()?;
        if !template.status.success() {
            bail!(
                "helm template {extra:?} failed:\n{}",
                String::from_utf8_lossy(&template.stderr)
            );
        }
        let rendered = String::from_utf8_lossy(&template.stdout);
        let kinds = rendered.lines().filter(|l| l.starts_with("kind:")).count();
        eprintln!("xtask: helm lint and template {extra:?}: ok ({kinds} objects)");
    }
    Ok(())
}

#[cfg(test)]
mod unit {
    use super::Totals;

    #[test]
    fn sums_cargo_test_result_lines() {
        let mut t = Totals::default();
        t.add_line("test result: ok. 9 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 2.1s");
        t.add_line(
            "test result: FAILED. 2 passed; 3 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        t.add_line("something else");
        assert_eq!((t.passed, t.failed, t.ignored), (11, 3, 1));
    }
}
