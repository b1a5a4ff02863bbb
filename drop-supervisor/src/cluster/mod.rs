//! The cluster: membership, the replicated desired state, a leader per namespace, placement,
//! and the peer transport that reaches pools on other nodes. Sits on the function runtime (it
//! applies this node's share of the flows) and is driven by the edges (control API, gateway).

pub mod broadcast;
pub mod discovery;
pub mod leader;
pub mod membership;
pub mod node;
pub mod peer;
pub mod placement;
pub mod seal;
pub mod services;
pub mod state;

use std::net::SocketAddr;
use std::path::PathBuf;

/// The validated `[cluster]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub bind: SocketAddr,
    pub advertise: SocketAddr,
    pub peer: SocketAddr,
    pub seeds: Vec<SocketAddr>,
    pub key_file: PathBuf,
    pub profile: String,
    pub timing: membership::Timing,
    pub capacity: u32,
    /// LAN discovery group, if on.
    pub multicast: Option<std::net::SocketAddrV4>,
}

/// The floating IP as the cluster sees it: the cluster tells it, after every reconcile pass,
/// which namespace this node is in and that namespace's address and members; it answers who
/// holds the address, and that holder is the namespace's leader. Implemented by
/// `vip::VipService` (which sits above the cluster).
pub trait VipHook: Send + Sync {
    /// `None`: this node is in no namespace, or its namespace has no address.
    fn update(&self, input: Option<VipInput>);
    /// The holder of `ns`'s address as this node's agent sees it now.
    fn holder(&self, ns: &str) -> Option<state::NodeId>;
    /// What `ns show` and `vip show` print for this node's namespace.
    fn status(&self) -> Option<serde_json::Value>;
}

/// This node's namespace, for the floating IP.
#[derive(Debug, Clone, PartialEq)]
pub struct VipInput {
    pub ns: String,
    pub vip: String,
    /// Every declared member: id, name, membership IP.
    pub members: Vec<(state::NodeId, String, std::net::IpAddr)>,
    /// The leader this pass elected.
    pub leader: Option<state::NodeId>,
    /// The namespace's health check, as stored.
    pub health: Option<serde_json::Value>,
}
