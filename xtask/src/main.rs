//! `cargo xtask`: the project's own developer tooling.
//!
//! Everything a fresh machine needs is installed or built from here (Debian packages, the
//! pinned Go modules under `tools/`), so the README needs only two commands:
//! `cargo xtask demo` and `cargo xtask test`.

mod bench;
mod bench_scale;
mod demo;
mod deps;
mod pki;
mod procs;
mod testenv;
mod tests;
mod tools;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Stateward developer tooling")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start, stop or inspect the local cluster (etcd, kube-apiserver,
    /// kube-controller-manager, kube-scheduler, an S3 server and the local node).
    Testenv {
        #[command(subcommand)]
        action: TestenvAction,
    },
    /// Run every test: unit tests, then the integration tests against the local cluster,
    /// which is brought up for the run and torn down afterwards, also on failure.
    Test {
        /// Keep the local cluster running after the tests (for debugging).
        #[arg(long)]
        keep: bool,
        /// Only run integration tests whose name contains this filter.
        filter: Option<String>,
    },
    /// Run the operator's main job on the local cluster and print what a user would see.
    Demo,
    /// Benchmarks that print figures (never asserted).
    Bench {
        #[command(subcommand)]
        which: BenchKind,
    },
    /// Build (or reuse from the cache) the pinned Go binaries and print where they are.
    Tools,
    /// Write the CRD YAML into the Helm chart (`--check`: fail when the committed file is stale).
    Crds {
        #[arg(long)]
        check: bool,
    },
}

#[derive(Subcommand)]
enum BenchKind {
    /// The backup agent against restic (and the local tar | zstd bound) on the same data
    /// and S3 server; the agent's peak RSS at 1 and 4 GiB.
    Backup(bench::BackupBench),
    /// The backup bench's data set restored by the agent (stream, verify, unpack, swap)
    /// and by restic from the same S3 server.
    Restore(bench::RestoreBench),
    /// What an idle manager costs at scale: N apps and M Backups, the release manager under
    /// the chart's RBAC; time to current status, requests by verb and resource over idle
    /// cycles (from the audit log), reconciles, RSS, and same-minute schedules.
    Scale(bench_scale::ScaleBench),
}

#[derive(Subcommand)]
enum TestenvAction {
    /// Start the local cluster; a healthy running one is reused, a stale one is cleaned.
    Up,
    /// Stop exactly what `up` started and remove mounts, loop devices and namespaces.
    Down,
    /// Print whether the local cluster runs, and its endpoints.
    Status,
    /// Print shell exports (KUBECONFIG, S3 endpoint and credentials).
    Env,
}

/// The repository root (the parent of this crate's directory).
pub fn repo_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // One TLS crypto provider for the process, chosen here.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::Testenv { action } => match action {
            TestenvAction::Up => testenv::up().map(|_| ()),
            TestenvAction::Down => testenv::down(),
            TestenvAction::Status => testenv::status(),
            TestenvAction::Env => testenv::print_env(),
        },
        Command::Test { keep, filter } => tests::run(keep, filter.as_deref()),
        Command::Crds { check } => crds(check),
        Command::Demo => demo::run(),
        Command::Bench { which } => match which {
            BenchKind::Backup(args) => bench::backup(args),
            BenchKind::Restore(args) => bench::restore(args),
            BenchKind::Scale(args) => bench_scale::scale(args),
        },
        Command::Tools => {
            let tools = tools::ensure_all()?;
            println!("{}", serde_json::to_string_pretty(&tools)?);
            Ok(())
        }
    }
}

/// Where the generated CRDs live in the chart (Helm installs `crds/` but never upgrades it).
pub fn crds_path() -> PathBuf {
    repo_root().join("charts/stateward/crds/stateward.io_crds.yaml")
}

fn crds(check: bool) -> Result<()> {
    let generated = stateward_api::crds_yaml()?;
    let path = crds_path();
    if check {
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        if committed != generated {
            anyhow::bail!(
                "{} is stale: the CRD types changed; run `cargo xtask crds` and commit the result",
                path.display()
            );
        }
        eprintln!("xtask: CRDs in the chart are up to date");
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, generated)?;
    eprintln!("xtask: wrote {}", path.display());
    Ok(())
}
