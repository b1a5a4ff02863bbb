//! Services (DESIGN §6): systemd units kept at their desired count across a namespace.
//!
//! - [`spec`]: what a service is, its validation and unit names (pure).
//! - [`placement`]: the leader's sticky placement of instances on nodes (pure).
//! - [`agent`]: the node side, which makes this node's systemd run its share over the
//!   [`crate::host::systemd`] seam and reports every instance's state.
//!
//! The cluster stores services and assignments in the replicated state and drives both halves;
//! see `cluster::node` for the keys.

pub mod agent;
pub mod logs;
pub mod placement;
pub mod probe;
pub mod spec;
