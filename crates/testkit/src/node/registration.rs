//! Node objects: registration, status heartbeats and Leases, as the kubelet keeps them.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use super::{NodeConfig, NodeSpec};

/// The node declares this feature so the API server proxies exec to it over WebSocket.
pub const WEBSOCKET_FEATURE: &str = "ExtendWebSocketsToKubelet";

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn now_micro() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn node_status(cfg: &NodeConfig, node: &NodeSpec) -> serde_json::Value {
    let t = now();
    let condition = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({
            "type": type_, "status": status, "reason": reason, "message": message,
            "lastHeartbeatTime": t, "lastTransitionTime": cfg.started_at,
        })
    };
    let resources = json!({
        "cpu": "8", "memory": "16Gi", "pods": "110", "ephemeral-storage": "100Gi",
    });
    json!({
        "capacity": resources,
        "allocatable": resources,
        "conditions": [
            condition("Ready", "True", "KubeletReady", "stateward local node is posting ready status"),
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "no memory pressure"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk pressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "no PID pressure"),
        ],
        "addresses": [
            { "type": "InternalIP", "address": cfg.node_ip.to_string() },
            { "type": "Hostname", "address": node.name },
        ],
        "daemonEndpoints": { "kubeletEndpoint": { "Port": node.port } },
        "declaredFeatures": [WEBSOCKET_FEATURE],
        "nodeInfo": {
            "machineID": node.name, "systemUUID": node.name, "bootID": cfg.started_at,
            "kernelVersion": kernel_version(), "osImage": "stateward local node",
            "containerRuntimeVersion": "stateward-local://0.1.0",
            "kubeletVersion": cfg.kubernetes_version, "kubeProxyVersion": "",
            "operatingSystem": "linux", "architecture": "amd64",
        },
    })
}

fn kernel_version() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Creates the Node (or takes over an existing one) and publishes its status.
pub async fn register(client: &Client, cfg: &NodeConfig, node: &NodeSpec) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let object: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": node.name,
            "labels": {
                "kubernetes.io/hostname": node.name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node.kubernetes.io/instance-type": "stateward-local",
                "topology.kubernetes.io/zone": format!("local-{}", node.name.rsplit('-').next().unwrap_or("x")),
            },
        },
    }))?;
    match nodes.create(&PostParams::default(), &object).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    let patch = json!({ "status": node_status(cfg, node) });
    nodes
        .patch_status(&node.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

async fn renew_lease(client: &Client, node: &NodeSpec) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": { "name": node.name },
        "spec": {
            "holderIdentity": node.name, "leaseDurationSeconds": 40, "renewTime": now_micro(),
        },
    });
    leases
        .patch(
            &node.name,
            &PatchParams::apply("stateward-node").force(),
            &Patch::Apply(&lease),
        )
        .await?;
    Ok(())
}

/// Keeps every node's Lease fresh (10 s) and its status current (60 s), forever.
pub async fn heartbeat(client: Client, cfg: Arc<NodeConfig>) {
    let mut tick = 0u64;
    loop {
        for node in &cfg.nodes {
            if let Err(e) = renew_lease(&client, node).await {
                tracing::warn!(node = %node.name, error = %e, "renewing the node lease failed");
            }
            if tick.is_multiple_of(6)
                && let Err(e) = register(&client, &cfg, node).await
            {
                tracing::warn!(node = %node.name, error = %e, "updating the node status failed");
            }
        }
        tick += 1;
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}
