//! `stateward-node`: the local cluster's node. Also its own container runner
//! (`run-container`, `enter`), which must run before any thread is started.

use anyhow::Result;
use clap::Parser;
use stateward_testkit::node::{self, runner};

fn main() -> Result<()> {
    let mode = std::env::args().nth(1).unwrap_or_default();
    if mode == "run-container" || mode == "enter" {
        let spec = std::env::var(runner::SPEC_VAR).unwrap_or_default();
        // On success `run` never returns: the process became the container.
        let err = match runner::run(&spec) {
            Ok(never) => match never {},
            Err(e) => e,
        };
        eprintln!("stateward-node {mode}: {err:#}");
        std::process::exit(127);
    }
    let args = node::Args::parse();
    // One TLS crypto provider for the process (kube and others must not pick their own).
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(node::run(args))
}
