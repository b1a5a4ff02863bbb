//! Every kernel-network side effect of DROP lives here. Today that is one thing: the XDP counter
//! program `drop_count` (built from `drop-ebpf`, embedded at compile time), which counts the
//! frames arriving on an interface per IPv4 destination and passes all of them.
//!
//! [`XdpCounter`] loads it, attaches it to an interface (`ip link set dev IF xdp…` does the same
//! by hand), reads its per-CPU maps, and runs it on a hand-made frame through
//! `BPF_PROG_TEST_RUN` without any traffic.
//!
//! What this crate must never do: drop, redirect or rewrite traffic (the program only counts),
//! touch interfaces it was not asked to, or leave a program attached after its [`XdpCounter`] is
//! gone. Interface names resolve in the network namespace of the calling *thread*.
//!
//! All kernel access goes through aya, so this crate has no `unsafe` of its own.
#![forbid(unsafe_code)]

mod counter;
mod report;

pub use counter::{TestRun, XdpCounter, XdpError, XdpMode, XdpVerdict};
pub use report::{Count, Destination, Protocol, Stats};
