//! Running functions: the worker line protocol, starting worker processes, and pools of them.

pub mod deadline;
pub mod dispatch;
pub mod image;
pub mod pool;
pub mod process;
pub mod protocol;
pub mod stats;
