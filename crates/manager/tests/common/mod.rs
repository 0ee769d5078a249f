//! The `stateward` binary as a child process, shared by the manager's integration tests.

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use stateward_testkit::harness::{Cluster, wait_for};

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub struct Manager {
    pub child: Child,
    pub port: u16,
}

impl Manager {
    pub fn start(cluster: &Cluster, extra: &[&str]) -> Result<Self> {
        Self::start_with(&cluster.env.kubeconfig, extra)
    }

    /// A manager with its own kubeconfig (another identity, so the audit log tells its
    /// requests from the test's).
    pub fn start_with(kubeconfig: &std::path::Path, extra: &[&str]) -> Result<Self> {
        let port = free_port()?;
        let child = Command::new(env!("CARGO_BIN_EXE_stateward"))
            .arg("run")
            .arg("--admin-addr")
            .arg(format!("127.0.0.1:{port}"))
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(Self { child, port })
    }

    pub async fn get(&self, path: &str) -> Result<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let code = response
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no status")?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((code, body))
    }

    pub async fn wait_ready(&self) -> Result<()> {
        wait_for(
            "the manager to report ready",
            Duration::from_secs(60),
            || async { Ok(matches!(self.get("/readyz").await, Ok((200, _))).then_some(())) },
        )
        .await
    }

    pub async fn is_leader(&self) -> Result<bool> {
        let (_, metrics) = self.get("/metrics").await?;
        Ok(metrics.lines().any(|l| l.trim() == "stateward_leader 1"))
    }

    pub fn signal(&self, signal: &str) -> Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()?;
        ensure!(status.success(), "kill -{signal} failed");
        Ok(())
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
