//! Host integration: the node's seams over the machine it runs on — the sysctl profile
//! ([`tune`]), systemd's notify socket ([`notify`]), the state directory and node identity
//! ([`state`]) and where logs go ([`logging`]). Each takes the paths it touches from the
//! configuration, so tests point them at temporary folders.

pub mod logging;
pub mod notify;
pub mod state;
pub mod systemd;
pub mod tune;
