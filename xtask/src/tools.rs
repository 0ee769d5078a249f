//! The pinned Go binaries of the local cluster, built from the tools modules under
//! `tools/` and cached outside the work tree, keyed by the module's go.mod + go.sum.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// Kubernetes release the control plane is built from; keep in step with tools/k8s/go.mod
/// and the k8s-openapi feature in the workspace Cargo.toml.
pub const KUBERNETES_VERSION: &str = "v1.36.3";

struct GoTool {
    /// Folder under `tools/` holding the module.
    module: &'static str,
    /// (binary name, package path)
    binaries: &'static [(&'static str, &'static str)],
    ldflags: fn() -> String,
}

fn kubernetes_ldflags() -> String {
    let v = "k8s.io/component-base/version";
    let minor = KUBERNETES_VERSION.split('.').nth(1).unwrap_or("0");
    format!(
        "-s -w -X {v}.gitVersion={KUBERNETES_VERSION} -X {v}.gitMajor=1 -X {v}.gitMinor={minor} \
         -X {v}.gitTreeState=clean -X {v}.buildDate=1970-01-01T00:00:00Z"
    )
}

fn plain_ldflags() -> String {
    "-s -w".to_string()
}

const TOOLS: &[GoTool] = &[
    GoTool {
        module: "k8s",
        binaries: &[
            ("kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver"),
            (
                "kube-controller-manager",
                "k8s.io/kubernetes/cmd/kube-controller-manager",
            ),
            ("kube-scheduler", "k8s.io/kubernetes/cmd/kube-scheduler"),
            // The matching client: tests judge the node's exec by kubectl's exit codes.
            ("kubectl", "k8s.io/kubernetes/cmd/kubectl"),
        ],
        ldflags: kubernetes_ldflags,
    },
    GoTool {
        module: "etcd",
        binaries: &[("etcd", "go.etcd.io/etcd/server/v3")],
        ldflags: plain_ldflags,
    },
    GoTool {
        module: "versitygw",
        binaries: &[("versitygw", "github.com/versity/versitygw/cmd/versitygw")],
        ldflags: plain_ldflags,
    },
    GoTool {
        module: "helm",
        binaries: &[("helm", "helm.sh/helm/v3/cmd/helm")],
        ldflags: plain_ldflags,
    },
    GoTool {
        module: "promcrds",
        binaries: &[(
            "controller-gen",
            "sigs.k8s.io/controller-tools/cmd/controller-gen",
        )],
        ldflags: plain_ldflags,
    },
];

/// The Prometheus Operator's CRD manifests, generated from its pinned API types (the
/// `tools/promcrds` module) with controller-gen as upstream generates them, into the
/// tool's cache folder (`crds/`). Never committed: the monitoring tests install them.
pub fn prometheus_crds(controller_gen: &Path) -> Result<PathBuf> {
    let dir = controller_gen
        .parent()
        .context("controller-gen has no folder")?
        .join("crds");
    if dir
        .join("monitoring.coreos.com_prometheusrules.yaml")
        .is_file()
    {
        return Ok(dir);
    }
    let staging = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    let status = Command::new(controller_gen)
        .current_dir(crate::repo_root().join("tools").join("promcrds"))
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=mod")
        .arg("crd:crdVersions=v1")
        .arg("paths=github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1")
        .arg(format!("output:crd:dir={}", staging.display()))
        .status()
        .context("running controller-gen")?;
    if !status.success() {
        bail!("controller-gen failed to generate the Prometheus Operator CRDs (see above)");
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&staging, &dir)?;
    Ok(dir)
}

/// Where built binaries are cached: `$STATEWARD_CACHE_DIR`, else `~/.cache/stateward`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STATEWARD_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache").join("stateward")
}

fn module_key(module_dir: &Path) -> Result<String> {
    let mut hash = Sha256::new();
    for file in ["go.mod", "go.sum"] {
        let path = module_dir.join(file);
        hash.update(std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?);
    }
    Ok(hex::encode(&hash.finalize()[..6]))
}

/// Builds what is missing and returns binary name -> path.
pub fn ensure_all() -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    for tool in TOOLS {
        let dir = ensure(tool)?;
        for (name, _) in tool.binaries {
            out.insert(name.to_string(), dir.join(name));
        }
    }
    Ok(out)
}

fn ensure(tool: &GoTool) -> Result<PathBuf> {
    let module_dir = crate::repo_root().join("tools").join(tool.module);
    let key = module_key(&module_dir)?;
    let dest = cache_dir()
        .join("tools")
        .join(format!("{}-{key}", tool.module));
    if tool
        .binaries
        .iter()
        .all(|(name, _)| dest.join(name).is_file())
    {
        return Ok(dest);
    }
    let go = which("go").context(
        "the Go toolchain is needed to build the local cluster's binaries: install Go 1.26 or \
         newer (https://go.dev/dl/) or the Debian package golang-go from bookworm-backports",
    )?;
    let staging = dest.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    let started = Instant::now();
    eprintln!(
        "xtask: building {} from tools/{} (cached in {}; the first build takes minutes)",
        tool.binaries
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", "),
        tool.module,
        dest.display()
    );
    // One `go build` per binary name so each gets its own output name; go caches the
    // shared packages, so the Kubernetes binaries compile their common code once.
    for (name, package) in tool.binaries {
        let status = Command::new(&go)
            .current_dir(&module_dir)
            .env("GOTOOLCHAIN", "local")
            .env("GOFLAGS", "-mod=mod -buildvcs=false")
            .env("CGO_ENABLED", "0")
            .args(["build", "-trimpath", "-ldflags", &(tool.ldflags)(), "-o"])
            .arg(staging.join(name))
            .arg(package)
            .status()
            .with_context(|| format!("running go build for {name}"))?;
        if !status.success() {
            bail!(
                "go build of {package} failed (see the output above); the Go module proxy \
                 must be reachable for a first build"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::rename(&staging, &dest)?;
    eprintln!(
        "xtask: built tools/{} in {:.0} s",
        tool.module,
        started.elapsed().as_secs_f64()
    );
    Ok(dest)
}

/// Finds an executable on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
