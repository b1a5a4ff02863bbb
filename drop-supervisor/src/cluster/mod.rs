//! The cluster: replicated desired state (more to come).

pub mod broadcast;
pub mod discovery;
pub mod leader;
pub mod membership;
pub mod node;
pub mod peer;
pub mod placement;
pub mod state;
