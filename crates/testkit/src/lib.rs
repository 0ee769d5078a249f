//! Test-only support: the local node that stands in for kubelet and a container runtime,
//! and helpers for integration tests against the local cluster.

pub mod audit;
pub mod harness;
pub mod node;
