//! Readiness, liveness and startup probes: exec, TCP and HTTP, as the kubelet runs them.

use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::pods::ExecTarget;

/// Timing of a probe with the kubelet's defaults.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

pub fn timing(probe: &Probe) -> Timing {
    let secs =
        |v: Option<i32>, d: u64| Duration::from_secs(v.map(|v| v.max(0) as u64).unwrap_or(d));
    Timing {
        initial_delay: secs(probe.initial_delay_seconds, 0),
        period: secs(probe.period_seconds, 10).max(Duration::from_secs(1)),
        timeout: secs(probe.timeout_seconds, 1).max(Duration::from_secs(1)),
        success_threshold: probe
            .success_threshold
            .map(|v| v.max(1) as u32)
            .unwrap_or(1),
        failure_threshold: probe
            .failure_threshold
            .map(|v| v.max(1) as u32)
            .unwrap_or(3),
    }
}

fn port_of(container: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).ok(),
        IntOrString::String(name) => container
            .ports
            .as_ref()?
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// Runs one probe; `true` when it succeeded.
pub async fn run_once(
    probe: &Probe,
    container: &Container,
    ip: Ipv4Addr,
    exec: &ExecTarget,
) -> bool {
    let timeout = timing(probe).timeout;
    if let Some(action) = &probe.exec {
        let command = action.command.clone().unwrap_or_default();
        return match tokio::time::timeout(timeout, exec.run_to_completion(&command)).await {
            Ok(Ok(output)) => output.status.success(),
            _ => false,
        };
    }
    if let Some(tcp) = &probe.tcp_socket {
        let Some(port) = port_of(container, &tcp.port) else {
            return false;
        };
        return matches!(
            tokio::time::timeout(timeout, tokio::net::TcpStream::connect((ip, port))).await,
            Ok(Ok(_))
        );
    }
    if let Some(http) = &probe.http_get {
        let Some(port) = port_of(container, &http.port) else {
            return false;
        };
        let path = http.path.clone().unwrap_or_else(|| "/".into());
        let attempt = async {
            let mut stream = tokio::net::TcpStream::connect((ip, port)).await?;
            let mut request = format!(
                "GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nUser-Agent: kube-probe/1.36\r\nConnection: close\r\n"
            );
            for header in http.http_headers.clone().unwrap_or_default() {
                request.push_str(&format!("{}: {}\r\n", header.name, header.value));
            }
            request.push_str("\r\n");
            stream.write_all(request.as_bytes()).await?;
            let mut buf = vec![0u8; 32];
            let n = stream.read(&mut buf).await?;
            let head = String::from_utf8_lossy(&buf[..n]).into_owned();
            Ok::<_, std::io::Error>(head)
        };
        return match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(head)) => head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse::<u16>().ok())
                .map(|c| (200..400).contains(&c))
                .unwrap_or(false),
            _ => false,
        };
    }
    if probe.grpc.is_some() {
        tracing::warn!("gRPC probes are not supported by the local node; treating as success");
        return true;
    }
    true
}
