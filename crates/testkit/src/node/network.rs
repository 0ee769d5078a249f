//! Pod networking: one network namespace per pod, a veth pair into the testenv's bridge,
//! an address from the pod CIDR, and a default route through the host's bridge address.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use tokio::process::Command;

/// Prefix of our network namespaces; `cargo xtask testenv down` deletes them by it.
pub const NETNS_PREFIX: &str = "stw-";

pub struct Network {
    bridge: String,
    gateway: Ipv4Addr,
    prefix_len: u8,
    /// Host offsets in the CIDR that are in use.
    used: Mutex<BTreeSet<u32>>,
    /// `ip netns add` races with itself when it first sets up /run/netns; one at a time.
    setup: tokio::sync::Mutex<()>,
    base: u32,
    size: u32,
}

/// A pod's network sandbox.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub netns: String,
    pub ip: Ipv4Addr,
    host_veth: String,
}

impl Sandbox {
    pub fn netns_path(&self) -> std::path::PathBuf {
        std::path::Path::new("/run/netns").join(&self.netns)
    }
}

async fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .await
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Network {
    pub fn new(bridge: &str, gateway: Ipv4Addr, cidr: &str) -> Result<Self> {
        let (addr, len) = cidr.split_once('/').context("pod CIDR must be a.b.c.d/n")?;
        let addr: Ipv4Addr = addr.parse()?;
        let prefix_len: u8 = len.parse()?;
        if !(8..=30).contains(&prefix_len) {
            bail!("pod CIDR prefix must be between /8 and /30");
        }
        let size = 1u32 << (32 - u32::from(prefix_len));
        Ok(Self {
            bridge: bridge.to_string(),
            gateway,
            prefix_len,
            used: Mutex::new(BTreeSet::new()),
            setup: tokio::sync::Mutex::new(()),
            base: u32::from(addr),
            size,
        })
    }

    fn allocate(&self) -> Result<Ipv4Addr> {
        let mut used = self
            .used
            .lock()
            .map_err(|_| anyhow::anyhow!("IP allocator poisoned"))?;
        let gateway_offset = u32::from(self.gateway).wrapping_sub(self.base);
        // Start at .1.0 of the range so the host's own /24 stays free; skip network,
        // broadcast and the gateway.
        let first = 256.min(self.size / 2).max(2);
        for offset in first..self.size - 1 {
            if offset != gateway_offset
                && offset % 256 != 0
                && offset % 256 != 255
                && !used.contains(&offset)
            {
                used.insert(offset);
                return Ok(Ipv4Addr::from(self.base + offset));
            }
        }
        bail!("the pod CIDR is exhausted")
    }

    fn release_ip(&self, ip: Ipv4Addr) {
        if let Ok(mut used) = self.used.lock() {
            used.remove(&u32::from(ip).wrapping_sub(self.base));
        }
    }

    /// Creates the pod's namespace and wires it to the bridge.
    pub async fn create(&self, pod_uid: &str) -> Result<Sandbox> {
        let short: String = pod_uid
            .chars()
            .filter(|c| c.is_ascii_hexdigit())
            .take(10)
            .collect();
        let netns = format!("{NETNS_PREFIX}{short}");
        let _serialised = self.setup.lock().await;
        let host_veth = format!("vstw{short}");
        // A leftover from a crashed attempt would make `ip netns add` fail.
        let _ = ip(&["netns", "del", &netns]).await;
        let _ = ip(&["link", "del", &host_veth]).await;
        let address = self.allocate()?;
        let result = async {
            ip(&["netns", "add", &netns]).await?;
            ip(&[
                "link", "add", &host_veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ])
            .await?;
            ip(&["link", "set", &host_veth, "master", &self.bridge, "up"]).await?;
            let cidr = format!("{address}/{}", self.prefix_len);
            ip(&["-n", &netns, "addr", "add", &cidr, "dev", "eth0"]).await?;
            ip(&["-n", &netns, "link", "set", "lo", "up"]).await?;
            ip(&["-n", &netns, "link", "set", "eth0", "up"]).await?;
            ip(&[
                "-n",
                &netns,
                "route",
                "add",
                "default",
                "via",
                &self.gateway.to_string(),
            ])
            .await?;
            Ok::<_, anyhow::Error>(())
        }
        .await;
        let sandbox = Sandbox {
            netns,
            ip: address,
            host_veth,
        };
        if let Err(e) = result {
            self.delete(&sandbox).await;
            return Err(e.context("setting up the pod network"));
        }
        Ok(sandbox)
    }

    pub async fn delete(&self, sandbox: &Sandbox) {
        let _ = ip(&["netns", "del", &sandbox.netns]).await;
        let _ = ip(&["link", "del", &sandbox.host_veth]).await;
        self.release_ip(sandbox.ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_distinct_addresses_and_reuses_released_ones() -> Result<()> {
        let net = Network::new("br", Ipv4Addr::new(10, 213, 0, 1), "10.213.0.0/16")?;
        let a = net.allocate()?;
        let b = net.allocate()?;
        assert_ne!(a, b);
        assert_eq!(a, Ipv4Addr::new(10, 213, 1, 1));
        net.release_ip(a);
        assert_eq!(net.allocate()?, a);
        Ok(())
    }
}
