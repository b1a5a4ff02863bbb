//! DROP's node daemon as a library: configuration, node state, the control API and its
//! server, host tuning, and the client `dropctl` uses. The binaries (`drop-supervisor`,
//! `dropctl`) are thin: they parse arguments, set up logging and call in here.
//!
//! Owns all policy and node state. Must never touch the host outside what the configuration
//! names (state directory, control socket, sysctl root), so that tests can point it at
//! temporary folders.

pub mod cluster;
pub mod config;
pub mod control;
pub mod daemon;
pub mod error;
pub mod gateway;
pub mod host;
pub mod http;
pub mod runtime;
