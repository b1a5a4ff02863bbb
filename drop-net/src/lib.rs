//! Every kernel-network side effect of DROP lives here:
//!
//! - the XDP counter `drop_count` ([`XdpCounter`]), which counts the frames arriving on an
//!   interface per IPv4 destination and passes all of them;
//! - the L4 balancer `drop_lb` ([`Balancer`]): VIPs, backends, the Maglev ring written whole
//!   and switched in one update, the connection table, pinned maps and link (both programs are
//!   built from `drop-ebpf` and embedded at compile time);
//! - the floating address ([`vip`]): the IP address DROP moves between nodes, added and removed
//!   with DROP's mark, announced with gratuitous ARP or an unsolicited neighbour advertisement,
//!   and watched for another holder ([`VipNet`], implemented by [`Netlink`]).
//!
//! Both loaders attach to an interface (`ip link set dev IF xdp…` does the same by hand), read
//! their per-CPU maps, and run their program on a hand-made frame through `BPF_PROG_TEST_RUN`
//! without any traffic.
//!
//! What this crate must never do: rewrite or redirect traffic other than the balancer's VIPs
//! (everything else `drop_lb` sees passes untouched; the counter only counts), touch interfaces
//! it was not asked to, leave an unpinned program attached after its loader is gone, or remove
//! an address that does not carry DROP's mark ([`ADDRESS_PROTO`]) unless asked to remove that
//! very address. Interface names resolve in the network namespace of the calling *thread* (for
//! [`Netlink`]: of the thread that created it).
//!
//! Kernel access goes through aya, rtnetlink and socket2. The one `unsafe` block of this crate
//! builds a `sockaddr_ll` for the packet sockets of [`vip`] (socket2 has no safe constructor
//! for it); it is confined to one small function.
#![deny(unsafe_code)]

mod balancer;
mod counter;
mod report;
pub mod vip;

pub use balancer::{Balancer, Forwarding, LbBackend, LbCounters, LbRun, LbVip};
pub use counter::{TestRun, XdpCounter, XdpError, XdpMode, XdpVerdict};
pub use drop_common::lb::LbStat;
pub use report::{Count, Destination, Protocol, Stats};
pub use vip::{
    ADDRESS_PROTO, BACKEND_PROTO, Mac, NetError, Netlink, NextHop, ParseMacError, Vip, VipNet,
};
