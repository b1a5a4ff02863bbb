//! The cluster: replicated desired state (more to come).

pub mod state;
