//! The L4 balancer's shared half (DESIGN §7): map layout, the pure packet rules the XDP program
//! `drop_lb` follows, and the header helpers, so that both are unit-tested on the host.
//!
//! Data path, per frame:
//! 1. [`parse`]: untagged Ethernet, IPv4 without options, not a fragment, TCP or UDP with its
//!    ports in the frame — anything else passes to the kernel untouched ([`Pass`]).
//! 2. The VIP map ([`VIPS_MAP`], key [`VipKey`]): no entry, or [`VIP_STANDBY`] (another node
//!    holds the VIP) → pass.
//! 3. The connection table ([`FLOWS_MAP`], LRU, [`FlowKey`] → backend slot) first; a slot whose
//!    backend is gone or now serves another VIP ([`Backend::serves`] false) counts as a miss.
//! 4. Miss: the VIP's current Maglev ring ([`RINGS_MAP`], ring `VipMeta::ring`, entry
//!    `flow_hash % RING_SIZE`) names the backend; [`NO_BACKEND`] drops with a counter. The
//!    choice is recorded in the connection table.
//! 5. A backend that is this node (its MAC is the frame's destination already) gets the frame
//!    through the kernel (`XDP_PASS`); it holds the VIP itself.
//! 6. Forward with `XDP_TX`: rewrite the destination MAC to the backend's (backends on the same
//!    segment hold the VIP on `lo`; direct server return) or, for a VIP with
//!    [`VIP_IPIP`], prepend an outer IPv4 header ([`ipip_header`]) to the backend (routed
//!    backends). Checksums of the inner packet are never read nor changed.
//!
//! On a backend, the same program takes the encapsulation off again ([`parse_encapsulated`]):
//! an IPIP frame from an allowed balancer address ([`DECAP_MAP`]) whose inner packet is for a
//! VIP with [`VIP_IPIP`] loses its outer header and goes to the kernel, which delivers it to the
//! VIP held on `lo`; the reply goes straight to the client. Any other IPIP frame passes
//! untouched (to the kernel's own tunnel devices, if it has any).
//!
//! A whole new ring is written into the VIP's spare ring slot and then `VipMeta::ring` is
//! switched in one map update: no packet sees half a table. Draining (weight 0) leaves the
//! backend out of the ring but present, so its established flows stay.

use crate::{ETH_HLEN, ETH_P_IP, Frame, IPPROTO_TCP, IPPROTO_UDP};

/// Name of the balancer's XDP program in the object.
pub const LB_PROGRAM: &str = "drop_lb";
/// Slots of one Maglev ring (prime, as Katran's).
pub const RING_SIZE: u32 = 65_537;
/// VIP:port:proto entries the balancer serves.
pub const MAX_VIPS: u32 = 16;
/// Rings: two per VIP (current and spare).
pub const MAX_RINGS: u32 = MAX_VIPS * 2;
/// Backend slots.
pub const MAX_BACKENDS: u32 = 256;
/// Connection-table entries (LRU).
pub const MAX_FLOWS: u32 = 65_536;
/// A ring entry that names no backend (the VIP has none): the frame is dropped and counted.
pub const NO_BACKEND: u32 = u32::MAX;
/// `VipMeta::flags`: forward by IPIP encapsulation instead of a MAC rewrite.
pub const VIP_IPIP: u32 = 1;
/// `VipMeta::flags`: this node does not hold the VIP now; its frames go to the kernel. A
/// backend that also balances must not balance again what the holder sent it (the two could
/// send a frame back and forth while their rings differ for a moment).
pub const VIP_STANDBY: u32 = 2;
/// `Backend::flags`: the slot holds a backend.
pub const BACKEND_PRESENT: u32 = 1;
/// IP protocol number of IPv4-in-IPv4.
pub const IPPROTO_IPIP: u8 = 4;
/// TTL of the outer header.
pub const IPIP_TTL: u8 = 64;

/// `VipKey` → [`VipMeta`].
pub const VIPS_MAP: &str = "DROP_LB_VIPS";
/// [`VipKey6`] → [`VipMeta`]: the IPv6 VIPs (they share the rings, backends and stats slots).
pub const VIPS6_MAP: &str = "DROP_LB_VIPS6";
/// LRU hash [`FlowKey6`] → backend slot (`u32`): the IPv6 connection table.
pub const FLOWS6_MAP: &str = "DROP_LB_FLOWS6";
/// Ethertype of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// Array of `MAX_RINGS * RING_SIZE` backend slots (`u32`).
pub const RINGS_MAP: &str = "DROP_LB_RINGS";
/// Array of `MAX_BACKENDS` [`Backend`]s.
pub const BACKENDS_MAP: &str = "DROP_LB_BACKS";
/// LRU hash `FlowKey` → backend slot (`u32`).
pub const FLOWS_MAP: &str = "DROP_LB_FLOWS";
/// Per-CPU array of `MAX_VIPS` [`VipStats`].
pub const VIP_STATS_MAP: &str = "DROP_LB_VSTAT";
/// Per-CPU array of `MAX_BACKENDS` [`Traffic`].
pub const BACKEND_STATS_MAP: &str = "DROP_LB_BSTAT";
/// Per-CPU array of [`LB_STAT_SLOTS`] `u64`, indexed by [`LbStat`].
pub const LB_STATS_MAP: &str = "DROP_LB_STATS";
/// Hash of outer source addresses (`[u8; 4]` → `u32` 1) whose IPIP frames this node takes the
/// encapsulation off: the members that may hold the VIP.
pub const DECAP_MAP: &str = "DROP_LB_DECAP";
/// Entries of [`DECAP_MAP`].
pub const MAX_DECAP_SOURCES: u32 = 64;
/// Array of [`CONF_SLOTS`] `u32` settings of the node, indexed by [`Conf`].
pub const CONF_MAP: &str = "DROP_LB_CONF";
/// Slots of [`CONF_MAP`].
pub const CONF_SLOTS: u32 = 1;
/// Length of the ICMP "fragmentation needed" frame [`icmp_too_big`] builds.
pub const TOO_BIG_FRAME_LEN: usize = ETH_HLEN + 20 + 8 + 20 + 8;
/// Slots of [`LB_STATS_MAP`].
pub const LB_STAT_SLOTS: u32 = 13;

/// Settings of the node in [`CONF_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conf {
    /// The largest IPv4 packet the balancer's interface sends (its MTU); 0: unknown, not
    /// checked. An IPIP frame whose inner packet no longer fits with the outer header is not
    /// sent: with DF, the client gets an ICMP "fragmentation needed" naming `MTU − 20`.
    IpipMtu = 0,
}

impl Conf {
    pub const fn index(self) -> u32 {
        self as u32
    }
}

/// Global counters of the balancer.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbStat {
    Frames = 0,
    /// Passed: not IPv4 (ARP, IPv6, VLAN-tagged).
    NotIpv4 = 1,
    /// Passed: too short to read what the rules need.
    Truncated = 2,
    /// Passed: IPv4 with options.
    Options = 3,
    /// Passed: a fragment.
    Fragment = 4,
    /// Passed: neither TCP nor UDP, or no VIP of that address/port/protocol.
    NotVip = 5,
    /// Forwarded with `XDP_TX`.
    Forwarded = 6,
    /// Dropped: the VIP has no backend (or a ring or backend slot could not be read).
    NoBackend = 7,
    /// Passed: the chosen backend is this node (the frame is already addressed to it).
    Local = 8,
    /// Passed after taking the IPIP header off (this node is a routed backend).
    Decapsulated = 9,
    /// Passed: a VIP this node does not hold now ([`VIP_STANDBY`]).
    Standby = 10,
    /// Answered with ICMP "fragmentation needed": too big for IPIP, DF set.
    TooBigIcmp = 11,
    /// Dropped: too big for IPIP, DF clear (the balancer does not fragment).
    TooBigDropped = 12,
}

impl LbStat {
    pub const ALL: [LbStat; LB_STAT_SLOTS as usize] = [
        LbStat::Frames,
        LbStat::NotIpv4,
        LbStat::Truncated,
        LbStat::Options,
        LbStat::Fragment,
        LbStat::NotVip,
        LbStat::Forwarded,
        LbStat::NoBackend,
        LbStat::Local,
        LbStat::Decapsulated,
        LbStat::Standby,
        LbStat::TooBigIcmp,
        LbStat::TooBigDropped,
    ];
    pub const fn index(self) -> u32 {
        self as u32
    }
}

/// A VIP as the program looks it up: the frame's destination address, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    /// As the bytes appear in the packet.
    pub addr: [u8; 4],
    /// Host byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// What the program knows of a VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipMeta {
    /// The ring in use (`0..MAX_RINGS`).
    pub ring: u32,
    /// The VIP's slot of [`VIP_STATS_MAP`].
    pub index: u32,
    /// [`VIP_IPIP`] and [`VIP_STANDBY`] bits.
    pub flags: u32,
    /// Source address of the outer header (IPIP).
    pub ipip_src: [u8; 4],
}

/// A backend slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Its address (the outer destination with IPIP).
    pub addr: [u8; 4],
    /// Its MAC on this segment, or the next hop's for a routed (IPIP) backend.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// [`BACKEND_PRESENT`] or 0.
    pub flags: u32,
    /// The `VipMeta::index` of the VIP this slot belongs to: slots are per VIP, so taking a
    /// backend out of one VIP moves that VIP's flows even if another VIP still uses it.
    pub vip: u32,
}

impl Backend {
    pub const fn present(&self) -> bool {
        self.flags & BACKEND_PRESENT != 0
    }

    /// Present and serving the VIP of stats slot `vip`.
    pub const fn serves(&self, vip: u32) -> bool {
        self.present() && self.vip == vip
    }
}

/// A flow: the connection table's key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    pub const fn vip(&self) -> VipKey {
        VipKey {
            addr: self.dst,
            port: self.dport,
            proto: self.proto,
            _pad: 0,
        }
    }

    /// [`crate::maglev::flow_hash`] of the flow.
    pub const fn hash(&self) -> u32 {
        crate::maglev::flow_hash(self.src, self.dst, self.sport, self.dport, self.proto)
    }

    /// Its slot in a ring.
    pub const fn ring_slot(&self) -> u32 {
        self.hash() % RING_SIZE
    }
}

/// An IPv6 VIP as the program looks it up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey6 {
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// An IPv6 flow: the IPv6 connection table's key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey6 {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// The four 32-bit words of an IPv6 address folded into one (xor), for the flow hash.
#[inline(always)]
const fn fold(a: [u8; 16]) -> [u8; 4] {
    [
        a[0] ^ a[4] ^ a[8] ^ a[12],
        a[1] ^ a[5] ^ a[9] ^ a[13],
        a[2] ^ a[6] ^ a[10] ^ a[14],
        a[3] ^ a[7] ^ a[11] ^ a[15],
    ]
}

impl FlowKey6 {
    pub const fn vip(&self) -> VipKey6 {
        VipKey6 {
            addr: self.dst,
            port: self.dport,
            proto: self.proto,
            _pad: 0,
        }
    }

    /// [`crate::maglev::flow_hash`] over the folded addresses.
    pub const fn hash(&self) -> u32 {
        crate::maglev::flow_hash(
            fold(self.src),
            fold(self.dst),
            self.sport,
            self.dport,
            self.proto,
        )
    }

    /// Its slot in a ring.
    pub const fn ring_slot(&self) -> u32 {
        self.hash() % RING_SIZE
    }
}

/// Packets and bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

/// Per-VIP counters (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipStats {
    pub packets: u64,
    pub bytes: u64,
    /// Frames that found their flow in the connection table.
    pub conn_hits: u64,
    /// Flows placed by the ring (and recorded).
    pub new_flows: u64,
    /// Frames dropped for want of a backend.
    pub no_backend: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): `repr(C)`, integer and byte-array fields only, explicit padding: every bit
    // pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipMeta {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::VipKey6 {}
    unsafe impl aya::Pod for super::FlowKey6 {}
    unsafe impl aya::Pod for super::Traffic {}
    unsafe impl aya::Pod for super::VipStats {}
}

/// Why a frame is not balanced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    NotIpv4,
    Truncated,
    Options,
    Fragment,
    /// Neither TCP nor UDP.
    NotTcpUdp,
    /// IPv4 in IPv4: maybe for this node to take the encapsulation off
    /// ([`parse_encapsulated`]).
    Encapsulated,
}

impl Pass {
    pub const fn stat(self) -> LbStat {
        match self {
            Pass::NotIpv4 => LbStat::NotIpv4,
            Pass::Truncated => LbStat::Truncated,
            Pass::Options => LbStat::Options,
            Pass::Fragment => LbStat::Fragment,
            Pass::NotTcpUdp | Pass::Encapsulated => LbStat::NotVip,
        }
    }
}

/// The frame's flow, or why it passes. The rules are in the module docs.
#[inline(always)]
pub fn parse<F: Frame + ?Sized>(frame: &F) -> Result<FlowKey, Pass> {
    let Some(ethertype) = frame.bytes::<2>(12) else {
        return Err(Pass::Truncated);
    };
    if u16::from_be_bytes(ethertype) != ETH_P_IP {
        return Err(Pass::NotIpv4);
    }
    parse_ip::<F, ETH_HLEN>(frame)
}

/// An IPv6 frame's flow, or why it passes: untagged Ethernet, IPv6 whose next header is TCP or
/// UDP itself (any extension header — hop-by-hop, routing, fragment, … — passes as
/// [`Pass::Options`]), with its ports in the frame. [`Pass::NotIpv4`] means "not IPv6" here.
#[inline(always)]
pub fn parse6<F: Frame + ?Sized>(frame: &F) -> Result<FlowKey6, Pass> {
    let Some(ethertype) = frame.bytes::<2>(12) else {
        return Err(Pass::Truncated);
    };
    if u16::from_be_bytes(ethertype) != ETH_P_IPV6 {
        return Err(Pass::NotIpv4);
    }
    let Some(ip) = frame.bytes::<40>(ETH_HLEN) else {
        return Err(Pass::Truncated);
    };
    if ip[0] >> 4 != 6 {
        return Err(Pass::NotIpv4);
    }
    let proto = ip[6];
    if proto == IPV6_FRAGMENT {
        return Err(Pass::Fragment);
    }
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(if is_extension_header(proto) {
            Pass::Options
        } else {
            Pass::NotTcpUdp
        });
    }
    let Some(ports) = frame.bytes::<4>(ETH_HLEN + 40) else {
        return Err(Pass::Truncated);
    };
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        src[i] = ip[8 + i];
        dst[i] = ip[24 + i];
        i += 1;
    }
    Ok(FlowKey6 {
        src,
        dst,
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
        proto,
        _pad: [0; 3],
    })
}

/// IPv6's fragment header.
pub const IPV6_FRAGMENT: u8 = 44;

/// IPv6 extension headers (RFC 8200 §4, plus AH, ESP-less mobility, HIP and shim6).
#[inline(always)]
const fn is_extension_header(next: u8) -> bool {
    matches!(next, 0 | 43 | 44 | 51 | 60 | 135 | 139 | 140)
}

/// An IPIP frame's outer source and inner flow, if the inner packet is one [`parse`] would
/// balance: outer and inner IPv4 without options and not fragments, the inner one TCP or UDP.
/// Call it on a frame [`parse`] answered [`Pass::Encapsulated`].
#[inline(always)]
pub fn parse_encapsulated<F: Frame + ?Sized>(frame: &F) -> Result<([u8; 4], FlowKey), Pass> {
    let Some(src) = frame.bytes::<4>(ETH_HLEN + 12) else {
        return Err(Pass::Truncated);
    };
    match parse_ip::<F, { ETH_HLEN + 20 }>(frame) {
        Ok(flow) => Ok((src, flow)),
        // IPIP in IPIP is not ours.
        Err(Pass::Encapsulated) => Err(Pass::NotTcpUdp),
        Err(pass) => Err(pass),
    }
}

/// The IPv4 header at `AT` and the ports after it.
#[inline(always)]
fn parse_ip<F: Frame + ?Sized, const AT: usize>(frame: &F) -> Result<FlowKey, Pass> {
    let Some(ip) = frame.bytes::<20>(AT) else {
        return Err(Pass::Truncated);
    };
    if ip[0] >> 4 != 4 {
        return Err(Pass::NotIpv4);
    }
    match ip[0] & 0x0f {
        5 => {}
        0..=4 => return Err(Pass::Truncated),
        _ => return Err(Pass::Options),
    }
    // More-fragments set, or an offset: a fragment (only the first carries ports).
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return Err(Pass::Fragment);
    }
    let proto = ip[9];
    if proto == IPPROTO_IPIP {
        return Err(Pass::Encapsulated);
    }
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(Pass::NotTcpUdp);
    }
    let Some(ports) = frame.bytes::<4>(AT + 20) else {
        return Err(Pass::Truncated);
    };
    Ok(FlowKey {
        src: [ip[12], ip[13], ip[14], ip[15]],
        dst: [ip[16], ip[17], ip[18], ip[19]],
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
        proto,
        _pad: [0; 3],
    })
}

/// The Internet checksum of an IPv4 header (its checksum field taken as zero).
#[inline(always)]
pub fn ipv4_checksum(header: &[u8; 20]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 20 {
        if i != 10 {
            sum += u32::from(u16::from_be_bytes([header[i], header[i + 1]]));
        }
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The outer IPv4 header for IPIP: `inner_len` bytes of inner packet from `src` to `dst`,
/// TOS copied from the inner header, DF clear, id 0, TTL [`IPIP_TTL`], checksum filled.
#[inline(always)]
pub fn ipip_header(src: [u8; 4], dst: [u8; 4], tos: u8, inner_len: u16) -> [u8; 20] {
    let total = inner_len.wrapping_add(20).to_be_bytes();
    let mut h = [
        0x45,
        tos,
        total[0],
        total[1],
        0,
        0,
        0,
        0,
        IPIP_TTL,
        IPPROTO_IPIP,
        0,
        0,
        src[0],
        src[1],
        src[2],
        src[3],
        dst[0],
        dst[1],
        dst[2],
        dst[3],
    ];
    let c = ipv4_checksum(&h).to_be_bytes();
    h[10] = c[0];
    h[11] = c[1];
    h
}

/// Whether an IPv4 packet of `total_len` bytes (its header's total length) still fits an
/// interface of `mtu` once IPIP adds its 20 bytes. `mtu` 0: not checked.
#[inline(always)]
pub const fn ipip_fits(total_len: u16, mtu: u32) -> bool {
    mtu == 0 || total_len as u32 + 20 <= mtu
}

/// The ICMP "fragmentation needed" (type 3, code 4) answer to a frame too big to forward:
/// back to the sender's MAC from ours (`macs` is the frame's destination then source, as it
/// came), from the address it was sent to (the VIP) to its source, naming `mtu` as the next
/// hop's, and quoting its IPv4 header `ip` and the first 8 bytes after it `l4` (RFC 792).
/// Checksums filled. The sender's TCP lowers its segment size for the VIP and sends again.
#[inline(always)]
pub fn icmp_too_big(
    macs: [u8; 12],
    ip: [u8; 20],
    l4: [u8; 8],
    mtu: u16,
) -> [u8; TOO_BIG_FRAME_LEN] {
    let mut f = [0u8; TOO_BIG_FRAME_LEN];
    let mut i = 0;
    while i < 6 {
        f[i] = macs[6 + i];
        f[6 + i] = macs[i];
        i += 1;
    }
    let et = ETH_P_IP.to_be_bytes();
    f[12] = et[0];
    f[13] = et[1];
    let total = ((20 + 8 + 20 + 8) as u16).to_be_bytes();
    let mut h = [
        0x45, 0, total[0], total[1], 0, 0, 0, 0, 64, 1, 0, 0, ip[16], ip[17], ip[18], ip[19],
        ip[12], ip[13], ip[14], ip[15],
    ];
    let c = ipv4_checksum(&h).to_be_bytes();
    h[10] = c[0];
    h[11] = c[1];
    i = 0;
    while i < 20 {
        f[ETH_HLEN + i] = h[i];
        i += 1;
    }
    let at = ETH_HLEN + 20;
    let m = mtu.to_be_bytes();
    f[at] = 3;
    f[at + 1] = 4;
    f[at + 6] = m[0];
    f[at + 7] = m[1];
    i = 0;
    while i < 20 {
        f[at + 8 + i] = ip[i];
        i += 1;
    }
    i = 0;
    while i < 8 {
        f[at + 28 + i] = l4[i];
        i += 1;
    }
    // The ICMP checksum over its 36 bytes.
    let mut sum: u32 = 0;
    i = 0;
    while i < 36 {
        sum += u32::from(u16::from_be_bytes([f[at + i], f[at + i + 1]]));
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let c = (!(sum as u16)).to_be_bytes();
    f[at + 2] = c[0];
    f[at + 3] = c[1];
    f
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    fn frame(ethertype: u16, ver_ihl: u8, frag: u16, proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&ethertype.to_be_bytes());
        let mut ip = [0u8; 20];
        ip[0] = ver_ihl;
        ip[6..8].copy_from_slice(&frag.to_be_bytes());
        ip[8] = 64;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 0, 0, 100]);
        f.extend_from_slice(&ip);
        if ver_ihl & 0x0f > 5 {
            f.extend(core::iter::repeat_n(
                1u8,
                usize::from(ver_ihl & 0x0f) * 4 - 20,
            ));
        }
        f.extend_from_slice(l4);
        f
    }

    const PORTS: [u8; 4] = [0x9c, 0x40, 0x00, 0x50]; // 40000 → 80

    #[test]
    fn tcp_and_udp_give_the_five_tuple() {
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            let k = parse(&frame(ETH_P_IP, 0x45, 0x4000, proto, &PORTS)[..]).unwrap();
            assert_eq!(
                k,
                FlowKey {
                    src: [10, 0, 0, 1],
                    dst: [10, 0, 0, 100],
                    sport: 40000,
                    dport: 80,
                    proto,
                    _pad: [0; 3]
                }
            );
            assert_eq!(k.vip().port, 80);
        }
    }

    #[test]
    fn everything_else_passes_with_its_reason() {
        let p = |f: Vec<u8>| parse(&f[..]).unwrap_err();
        assert_eq!(
            p(frame(0x0806, 0x45, 0, IPPROTO_TCP, &PORTS)),
            Pass::NotIpv4
        );
        assert_eq!(
            p(frame(0x86dd, 0x45, 0, IPPROTO_TCP, &PORTS)),
            Pass::NotIpv4
        );
        assert_eq!(
            p(frame(ETH_P_IP, 0x65, 0, IPPROTO_TCP, &PORTS)),
            Pass::NotIpv4
        );
        assert_eq!(
            p(frame(ETH_P_IP, 0x46, 0, IPPROTO_TCP, &PORTS)),
            Pass::Options
        );
        assert_eq!(
            p(frame(ETH_P_IP, 0x44, 0, IPPROTO_TCP, &PORTS)),
            Pass::Truncated
        );
        assert_eq!(
            p(frame(ETH_P_IP, 0x45, 0x2000, IPPROTO_TCP, &PORTS)),
            Pass::Fragment
        );
        assert_eq!(
            p(frame(ETH_P_IP, 0x45, 0x0010, IPPROTO_UDP, &PORTS)),
            Pass::Fragment
        );
        assert_eq!(p(frame(ETH_P_IP, 0x45, 0, 1, &PORTS)), Pass::NotTcpUdp);
        assert_eq!(
            p(frame(ETH_P_IP, 0x45, 0, IPPROTO_TCP, &PORTS[..3])),
            Pass::Truncated
        );
        let mut short = frame(ETH_P_IP, 0x45, 0, IPPROTO_TCP, &PORTS);
        short.truncate(30);
        assert_eq!(p(short), Pass::Truncated);
        assert_eq!(p(std::vec![0u8; 10]), Pass::Truncated);
    }

    /// RFC 1071's way, written apart from [`ipv4_checksum`]: summing a header that carries its
    /// checksum gives 0xffff.
    fn verifies(h: &[u8]) -> bool {
        let mut sum: u64 = 0;
        for c in h.chunks(2) {
            sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum == 0xffff
    }

    #[test]
    fn the_outer_header_is_right_and_its_checksum_verifies() {
        let h = ipip_header([10, 0, 0, 2], [10, 9, 0, 3], 0x10, 60);
        assert_eq!(h[0], 0x45);
        assert_eq!(u16::from_be_bytes([h[2], h[3]]), 80);
        assert_eq!((h[8], h[9]), (64, IPPROTO_IPIP));
        assert_eq!(&h[12..16], &[10, 0, 0, 2]);
        assert_eq!(&h[16..20], &[10, 9, 0, 3]);
        assert!(verifies(&h));
        // A known header (Wikipedia's example): checksum 0xb861.
        let known: [u8; 20] = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_checksum(&known), 0xb861);
    }

    #[test]
    fn an_ipip_frame_gives_its_outer_source_and_inner_flow() {
        let inner = frame(ETH_P_IP, 0x45, 0x4000, IPPROTO_TCP, &PORTS);
        let wrap = |outer_ver_ihl: u8, outer_frag: u16, inner: &[u8]| {
            let mut f = frame(ETH_P_IP, outer_ver_ihl, outer_frag, IPPROTO_IPIP, &[]);
            f[ETH_HLEN + 12..ETH_HLEN + 16].copy_from_slice(&[10, 9, 0, 7]);
            f.extend_from_slice(&inner[ETH_HLEN..]);
            f
        };
        let f = wrap(0x45, 0, &inner);
        assert_eq!(parse(&f[..]), Err(Pass::Encapsulated));
        assert_eq!(Pass::Encapsulated.stat(), LbStat::NotVip);
        let (src, flow) = parse_encapsulated(&f[..]).unwrap();
        assert_eq!(src, [10, 9, 0, 7]);
        assert_eq!(flow, parse(&inner[..]).unwrap());
        // The inner packet follows the same rules as a plain one.
        let p = |f: Vec<u8>| parse_encapsulated(&f[..]).unwrap_err();
        assert_eq!(
            p(wrap(
                0x45,
                0,
                &frame(ETH_P_IP, 0x45, 0x2000, IPPROTO_TCP, &PORTS)
            )),
            Pass::Fragment
        );
        assert_eq!(
            p(wrap(
                0x45,
                0,
                &frame(ETH_P_IP, 0x46, 0, IPPROTO_TCP, &PORTS)
            )),
            Pass::Options
        );
        assert_eq!(
            p(wrap(0x45, 0, &frame(ETH_P_IP, 0x45, 0, 1, &PORTS))),
            Pass::NotTcpUdp
        );
        // IPIP in IPIP is not taken apart.
        assert_eq!(
            p(wrap(
                0x45,
                0,
                &frame(ETH_P_IP, 0x45, 0, IPPROTO_IPIP, &PORTS)
            )),
            Pass::NotTcpUdp
        );
        let mut short = f.clone();
        short.truncate(ETH_HLEN + 20 + 22);
        assert_eq!(p(short), Pass::Truncated);
        // An outer header with options or a fragment never gets that far.
        assert_eq!(parse(&wrap(0x46, 0, &inner)[..]), Err(Pass::Options));
        assert_eq!(parse(&wrap(0x45, 0x2000, &inner)[..]), Err(Pass::Fragment));
    }

    #[test]
    fn ipip_fits_within_the_mtu_with_its_20_bytes() {
        assert!(ipip_fits(1480, 1500));
        assert!(!ipip_fits(1481, 1500));
        assert!(ipip_fits(65535, 0));
    }

    #[test]
    fn the_too_big_answer_quotes_the_packet_and_both_checksums_verify() {
        let f = frame(
            ETH_P_IP,
            0x45,
            0x4000,
            IPPROTO_TCP,
            &[0x9c, 0x40, 0, 80, 1, 2, 3, 4, 5],
        );
        let macs: [u8; 12] = f[..12].try_into().unwrap();
        let ip: [u8; 20] = f[ETH_HLEN..ETH_HLEN + 20].try_into().unwrap();
        let l4: [u8; 8] = f[ETH_HLEN + 20..ETH_HLEN + 28].try_into().unwrap();
        let a = icmp_too_big(macs, ip, l4, 1480);
        // Back to the sender, from us.
        assert_eq!(&a[..6], &f[6..12]);
        assert_eq!(&a[6..12], &f[..6]);
        let h = &a[ETH_HLEN..ETH_HLEN + 20];
        assert_eq!(
            (h[0], h[9], u16::from_be_bytes([h[2], h[3]])),
            (0x45, 1, 56)
        );
        // From the address it was sent to, to its source.
        assert_eq!(&h[12..16], &ip[16..20]);
        assert_eq!(&h[16..20], &ip[12..16]);
        assert!(verifies(h));
        let icmp = &a[ETH_HLEN + 20..];
        assert_eq!((icmp[0], icmp[1]), (3, 4));
        assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1480);
        assert_eq!(&icmp[8..28], &ip);
        assert_eq!(&icmp[28..36], &l4);
        assert!(verifies(icmp));
    }

    fn frame6(next: u8, l4: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
        let mut ip = [0u8; 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
        ip[6] = next;
        ip[7] = 64;
        ip[8] = 0xfd;
        ip[23] = 1;
        ip[24] = 0xfd;
        ip[39] = 0x64;
        f.extend_from_slice(&ip);
        f.extend_from_slice(l4);
        f
    }

    #[test]
    fn ipv6_tcp_and_udp_give_the_five_tuple_and_the_rest_passes() {
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            let k = parse6(&frame6(proto, &PORTS)[..]).unwrap();
            assert_eq!((k.src[0], k.src[15], k.dst[15]), (0xfd, 1, 0x64));
            assert_eq!((k.sport, k.dport, k.proto), (40000, 80, proto));
            assert_eq!(k.vip().port, 80);
            assert_eq!(k.ring_slot(), k.hash() % RING_SIZE);
        }
        let p = |f: Vec<u8>| parse6(&f[..]).unwrap_err();
        assert_eq!(p(frame6(IPV6_FRAGMENT, &PORTS)), Pass::Fragment);
        assert_eq!(p(frame6(0, &PORTS)), Pass::Options);
        assert_eq!(p(frame6(43, &PORTS)), Pass::Options);
        assert_eq!(p(frame6(58, &PORTS)), Pass::NotTcpUdp); // ICMPv6
        assert_eq!(p(frame6(IPPROTO_TCP, &PORTS[..2])), Pass::Truncated);
        let mut v4 = frame6(IPPROTO_TCP, &PORTS);
        v4[ETH_HLEN] = 0x40;
        assert_eq!(p(v4), Pass::NotIpv4);
        assert_eq!(
            p(frame(ETH_P_IP, 0x45, 0, IPPROTO_TCP, &PORTS)),
            Pass::NotIpv4
        );
        // Addresses differing only in a folded word still hash apart in the table (the key is
        // whole); the ring slot may coincide, which is only a spread matter.
        let a = parse6(&frame6(IPPROTO_TCP, &PORTS)[..]).unwrap();
        let mut other = frame6(IPPROTO_TCP, &PORTS);
        other[ETH_HLEN + 8 + 15] = 2;
        assert_ne!(parse6(&other[..]).unwrap(), a);
    }

    #[test]
    fn the_ring_slot_is_the_flow_hash_modulo_the_ring() {
        let k = parse(&frame(ETH_P_IP, 0x45, 0, IPPROTO_TCP, &PORTS)[..]).unwrap();
        assert_eq!(k.ring_slot(), k.hash() % RING_SIZE);
        assert!(crate::maglev::is_prime(RING_SIZE as usize));
    }
}
