//! DROP's node daemon as a library. The binaries (`drop-supervisor`, `dropctl`) are thin: they
//! parse arguments, set up logging and call in here.
//!
//! The modules are layered; each depends only on those below it (`cargo xtask layers` checks
//! that no sibling modules depend on each other in a circle):
//!
//! - [`daemon`], [`config`]: the process and its config file, wiring everything below.
//! - Edges — [`control`] (the operators' API on a Unix socket, its client, and the
//!   `Supervisor` that owns node state) and [`gateway`] (HTTP in front of pools).
//! - Capabilities — [`cluster`] (membership, replicated state, leaders, placement, peer
//!   transport) on top of [`runtime`] (flows, pools of workers, cgroups, images). Services, the
//!   floating IP and the balancer join here as siblings, and [`plugins`] (flows that packages
//!   install, applied through the runtime).
//! - Seams — [`host`] (sysctl tuning, sd_notify, the state directory, logging).
//! - Shared vocabulary — [`error`] (`ApiError`, the one shape of every error answer),
//!   [`http`] (framing) and [`events`] (the node's bounded event log, which every capability
//!   records into).
//!
//! Owns all policy and node state. Must never touch the host outside what the configuration
//! names (state directory, control socket, sysctl root, images, logs, its own cgroup subtree),
//! so that tests can point it at temporary folders.

/// This build's version: `DROP_VERSION` when it was set at build time (`cargo xtask rpm
/// --version V` sets it, so a package and the daemon in it name the same version), else the
/// crate's.
pub const VERSION: &str = match option_env!("DROP_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

pub mod balancer;
pub mod cluster;
pub mod config;
pub mod control;
pub mod daemon;
pub mod error;
pub mod events;
pub mod gateway;
pub mod host;
pub mod http;
pub mod plugins;
pub mod runtime;
pub mod services;
pub mod vip;
