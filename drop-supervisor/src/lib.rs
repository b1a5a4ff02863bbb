//! DROP's node daemon as a library: configuration, node state, the control API and its
//! server, host tuning, and the client `dropctl` uses. The binaries (`drop-supervisor`,
//! `dropctl`) are thin: they parse arguments, set up logging and call in here.
//!
//! Owns all policy and node state. Must never touch the host outside what the configuration
//! names (state directory, control socket, sysctl root), so that tests can point it at
//! temporary folders.

pub mod api;
pub mod cgroup;
pub mod client;
pub mod cluster;
pub mod config;
pub mod control;
pub mod daemon;
pub mod flow;
pub mod gateway;
pub mod http;
pub mod images;
pub mod logging;
pub mod logs;
pub mod metrics;
pub mod notify;
pub mod runtime;
pub mod state;
pub mod tune;
pub mod worker;
