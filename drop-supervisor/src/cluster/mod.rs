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
