//! DROP's XDP programs, in one object:
//!
//! - `drop_count` counts every frame per IPv4 destination (address, port, protocol) and in a
//!   few global slots, and passes every frame, malformed ones included. It never drops,
//!   redirects or rewrites anything: a failure to count must not cost a packet.
//! - `drop_lb` is the L4 balancer (DESIGN §7; the rules are in `drop_common::lb`): frames to a
//!   VIP:port go to a backend chosen by the connection table or the VIP's Maglev ring and leave
//!   again with `XDP_TX` (MAC rewrite, or IPIP); on a routed backend it takes the IPIP header of
//!   a VIP's frame off again and passes it to the kernel; everything else passes untouched.
//!
//! The map layouts and the parsing rules live in `drop-common` (host-tested there); this file
//! only supplies bounds-checked access to the frame and the map updates.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action},
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::XdpContext,
};
use drop_common::lb::{
    self, Backend, CONF_SLOTS, Conf, FlowKey, FlowKey6, LB_STAT_SLOTS, LbStat, MAX_BACKENDS,
    MAX_DECAP_SOURCES, MAX_FLOWS, MAX_RINGS, MAX_VIPS, NO_BACKEND, Pass, RING_SIZE,
    TOO_BIG_FRAME_LEN, Traffic, VIP_IPIP, VIP_STANDBY, VipKey, VipKey6, VipMeta, VipStats,
};
use drop_common::{
    Class, DstCount, DstKey, ETH_HLEN, ETH_P_IP, Frame, MAX_DESTINATIONS, STAT_SLOTS, Stat,
    classify,
};

/// `drop_common::DESTINATIONS_MAP`: per-CPU frames and bytes per destination.
#[map(name = "DROP_DSTS")]
static DESTINATIONS: PerCpuHashMap<DstKey, DstCount> =
    PerCpuHashMap::with_max_entries(MAX_DESTINATIONS, 0);

/// `drop_common::STATS_MAP`: per-CPU global counters, indexed by `drop_common::Stat`.
#[map(name = "DROP_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_SLOTS, 0);

#[map(name = "DROP_LB_VIPS")]
static LB_VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(MAX_VIPS, 0);

#[map(name = "DROP_LB_RINGS")]
static LB_RINGS: Array<u32> = Array::with_max_entries(MAX_RINGS * RING_SIZE, 0);

#[map(name = "DROP_LB_BACKS")]
static LB_BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

#[map(name = "DROP_LB_FLOWS")]
static LB_FLOWS: LruHashMap<FlowKey, u32> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

#[map(name = "DROP_LB_VIPS6")]
static LB_VIPS6: HashMap<VipKey6, VipMeta> = HashMap::with_max_entries(MAX_VIPS, 0);

#[map(name = "DROP_LB_FLOWS6")]
static LB_FLOWS6: LruHashMap<FlowKey6, u32> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

#[map(name = "DROP_LB_VSTAT")]
static LB_VSTATS: PerCpuArray<VipStats> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

#[map(name = "DROP_LB_BSTAT")]
static LB_BSTATS: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

#[map(name = "DROP_LB_STATS")]
static LB_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(LB_STAT_SLOTS, 0);

#[map(name = "DROP_LB_CONF")]
static LB_CONF: Array<u32> = Array::with_max_entries(CONF_SLOTS, 0);

#[map(name = "DROP_LB_DECAP")]
static LB_DECAP: HashMap<[u8; 4], u32> = HashMap::with_max_entries(MAX_DECAP_SOURCES, 0);

#[xdp]
pub fn drop_lb(ctx: XdpContext) -> u32 {
    balance(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
fn balance(ctx: &XdpContext) -> Result<u32, ()> {
    lb_bump(LbStat::Frames);
    match lb::parse(&Packet(ctx)) {
        Ok(flow) => {
            // SAFETY: the value is copied out at once; no reference outlives this statement.
            let Some(meta) = (unsafe { LB_VIPS.get(&flow.vip()) }).copied() else {
                lb_bump(LbStat::NotVip);
                return Ok(xdp_action::XDP_PASS);
            };
            Ok(forward(ctx, &meta, Flow::V4(&flow)))
        }
        Err(Pass::Encapsulated) => Ok(decapsulate(ctx)),
        Err(Pass::NotIpv4) => match lb::parse6(&Packet(ctx)) {
            Ok(flow) => {
                // SAFETY: as above.
                let Some(meta) = (unsafe { LB_VIPS6.get(&flow.vip()) }).copied() else {
                    lb_bump(LbStat::NotVip);
                    return Ok(xdp_action::XDP_PASS);
                };
                Ok(forward(ctx, &meta, Flow::V6(&flow)))
            }
            Err(pass) => {
                lb_bump(pass.stat());
                Ok(xdp_action::XDP_PASS)
            }
        },
        Err(pass) => {
            lb_bump(pass.stat());
            Ok(xdp_action::XDP_PASS)
        }
    }
}

/// A frame's flow, in the connection table of its family.
enum Flow<'a> {
    V4(&'a FlowKey),
    V6(&'a FlowKey6),
}

impl Flow<'_> {
    /// The backend slot the connection table holds for it.
    #[inline(always)]
    fn known(&self) -> Option<u32> {
        // SAFETY (both): copied out at once.
        match self {
            Flow::V4(f) => unsafe { LB_FLOWS.get(*f) }.copied(),
            Flow::V6(f) => unsafe { LB_FLOWS6.get(*f) }.copied(),
        }
    }

    #[inline(always)]
    fn ring_slot(&self) -> u32 {
        match self {
            Flow::V4(f) => f.ring_slot(),
            Flow::V6(f) => f.ring_slot(),
        }
    }

    /// Records its backend. The LRU evicts the oldest flow when full; a failed insert only
    /// costs stickiness across a table change.
    #[inline(always)]
    fn record(&self, slot: u32) {
        let _ = match self {
            Flow::V4(f) => LB_FLOWS.insert(*f, &slot, 0),
            Flow::V6(f) => LB_FLOWS6.insert(*f, &slot, 0),
        };
    }
}

/// A frame for a VIP: its backend from the connection table, else the VIP's ring (recorded),
/// and out again (`XDP_TX`) — or to the kernel when the VIP is in standby or the backend is
/// this node.
#[inline(always)]
fn forward(ctx: &XdpContext, meta: &VipMeta, flow: Flow<'_>) -> u32 {
    if meta.flags & VIP_STANDBY != 0 {
        // Another node holds the VIP: this frame was sent here by it (this node is a backend).
        lb_bump(LbStat::Standby);
        return xdp_action::XDP_PASS;
    }
    let len = (ctx.data_end() - ctx.data()) as u64;
    let vstats = LB_VSTATS.get_ptr_mut(meta.index);
    // The connection table first: an established flow stays with its backend while that
    // backend is present (drained or not).
    let mut slot = NO_BACKEND;
    let mut backend = None;
    if let Some(s) = flow.known()
        && let Some(b) = LB_BACKENDS.get(s)
        && b.serves(meta.index)
    {
        slot = s;
        backend = Some(*b);
        if let Some(v) = vstats {
            // SAFETY: this CPU's slot; only this CPU writes it.
            unsafe { (*v).conn_hits += 1 };
        }
    }
    if backend.is_none() {
        let index = meta
            .ring
            .wrapping_mul(RING_SIZE)
            .wrapping_add(flow.ring_slot());
        let s = LB_RINGS.get(index).copied().unwrap_or(NO_BACKEND);
        let b = if s == NO_BACKEND {
            None
        } else {
            LB_BACKENDS.get(s).copied()
        };
        match b {
            Some(b) if b.serves(meta.index) => {
                slot = s;
                backend = Some(b);
                flow.record(s);
                if let Some(v) = vstats {
                    // SAFETY: as above.
                    unsafe { (*v).new_flows += 1 };
                }
            }
            _ => {
                if let Some(v) = vstats {
                    // SAFETY: as above.
                    unsafe { (*v).no_backend += 1 };
                }
                lb_bump(LbStat::NoBackend);
                return xdp_action::XDP_DROP;
            }
        }
    }
    let Some(backend) = backend else {
        return xdp_action::XDP_PASS;
    };
    if let Some(v) = vstats {
        // SAFETY: as above.
        unsafe {
            (*v).packets += 1;
            (*v).bytes += len;
        }
    }
    if let Some(t) = LB_BSTATS.get_ptr_mut(slot) {
        // SAFETY: as above.
        unsafe {
            (*t).packets += 1;
            (*t).bytes += len;
        }
    }
    if is_local(ctx, &backend) {
        // This node is the backend (it holds the VIP): its own kernel answers. (For an IPIP
        // VIP the loader gives this node's backend slot the interface's own MAC.)
        lb_bump(LbStat::Local);
        return xdp_action::XDP_PASS;
    }
    let sent = match (meta.flags & VIP_IPIP != 0, &flow) {
        (true, Flow::V4(_)) => {
            if let Some(verdict) = too_big_for_ipip(ctx) {
                return verdict;
            }
            encapsulate(ctx, &backend, meta)
        }
        // IPv6 VIPs are forwarded by MAC rewrite only (the loader refuses IPIP for them).
        (true, Flow::V6(_)) => Err(()),
        (false, _) => rewrite_macs(ctx, &backend),
    };
    if sent.is_err() {
        lb_bump(LbStat::NoBackend);
        return xdp_action::XDP_DROP;
    }
    lb_bump(LbStat::Forwarded);
    xdp_action::XDP_TX
}

/// Whether the backend is this node: the frame already goes to its MAC.
#[inline(always)]
fn is_local(ctx: &XdpContext, backend: &Backend) -> bool {
    match ptr_at::<[u8; 6]>(ctx, 0) {
        // SAFETY: checked by `ptr_at`.
        Some(dst) => (unsafe { *dst }) == backend.mac,
        None => false,
    }
}

/// Direct server return on the same segment: the frame goes to the backend's MAC, from the
/// MAC it was sent to (this interface's).
#[inline(always)]
fn rewrite_macs(ctx: &XdpContext, backend: &Backend) -> Result<(), ()> {
    let eth = ptr_at_mut::<[u8; 12]>(ctx, 0).ok_or(())?;
    // SAFETY: `ptr_at_mut` checked the 12 bytes are inside the frame.
    unsafe {
        let mut macs = *eth;
        let old_dst = [macs[0], macs[1], macs[2], macs[3], macs[4], macs[5]];
        macs[..6].copy_from_slice(&backend.mac);
        macs[6..].copy_from_slice(&old_dst);
        *eth = macs;
    }
    Ok(())
}

/// IPIP to a routed backend: 20 bytes more at the front, a new Ethernet header to the next hop
/// (`backend.mac`) and an outer IPv4 header from the VIP's `ipip_src` to the backend.
#[inline(always)]
fn encapsulate(ctx: &XdpContext, backend: &Backend, meta: &VipMeta) -> Result<(), ()> {
    let head = ptr_at::<[u8; 18]>(ctx, 0).ok_or(())?;
    // SAFETY: checked by `ptr_at`: Ethernet header and the first 4 bytes of IPv4.
    let head = unsafe { *head };
    let old_dst = [head[0], head[1], head[2], head[3], head[4], head[5]];
    let tos = head[15];
    let inner_len = u16::from_be_bytes([head[16], head[17]]);
    // SAFETY: a plain helper call on this program's context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -20) } != 0 {
        return Err(());
    }
    let out = ptr_at_mut::<[u8; 34]>(ctx, 0).ok_or(())?;
    let ip = lb::ipip_header(meta.ipip_src, backend.addr, tos, inner_len);
    let mut h = [0u8; 34];
    h[..6].copy_from_slice(&backend.mac);
    h[6..12].copy_from_slice(&old_dst);
    h[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
    h[ETH_HLEN..].copy_from_slice(&ip);
    // SAFETY: `ptr_at_mut` checked the 34 bytes are inside the (grown) frame.
    unsafe { *out = h };
    Ok(())
}

/// A packet that would not fit the interface once IPIP adds its 20 bytes (the MTU in
/// `Conf::IpipMtu`) is not sent on: with DF, the frame becomes the ICMP "fragmentation needed"
/// answer to its sender (`XDP_TX`), so that its TCP sends smaller segments; without, it is
/// dropped (the balancer does not fragment). Both are counted. `None`: it fits.
#[inline(always)]
fn too_big_for_ipip(ctx: &XdpContext) -> Option<u32> {
    let mtu = LB_CONF.get(Conf::IpipMtu.index()).copied().unwrap_or(0);
    // SAFETY (the reads below): checked by `ptr_at`.
    let ip = unsafe { *ptr_at::<[u8; 20]>(ctx, ETH_HLEN)? };
    if lb::ipip_fits(u16::from_be_bytes([ip[2], ip[3]]), mtu) {
        return None;
    }
    if ip[6] & 0x40 == 0 {
        lb_bump(LbStat::TooBigDropped);
        return Some(xdp_action::XDP_DROP);
    }
    let (Some(macs), Some(l4)) = (
        ptr_at::<[u8; 12]>(ctx, 0),
        ptr_at::<[u8; 8]>(ctx, ETH_HLEN + 20),
    ) else {
        lb_bump(LbStat::TooBigDropped);
        return Some(xdp_action::XDP_DROP);
    };
    // SAFETY: as above.
    let answer = lb::icmp_too_big(unsafe { *macs }, ip, unsafe { *l4 }, (mtu - 20) as u16);
    let len = (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: a plain helper call on this program's context (the frame only shrinks).
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, TOO_BIG_FRAME_LEN as i32 - len) } != 0 {
        lb_bump(LbStat::TooBigDropped);
        return Some(xdp_action::XDP_DROP);
    }
    let Some(out) = ptr_at_mut::<[u8; TOO_BIG_FRAME_LEN]>(ctx, 0) else {
        lb_bump(LbStat::TooBigDropped);
        return Some(xdp_action::XDP_DROP);
    };
    // SAFETY: checked by `ptr_at_mut`.
    unsafe { *out = answer };
    lb_bump(LbStat::TooBigIcmp);
    Some(xdp_action::XDP_TX)
}

/// A routed backend's side of IPIP: an IPIP frame from an allowed balancer address whose inner
/// packet is for a VIP forwarded by IPIP loses its outer header and goes to the kernel (the VIP
/// is on `lo`). Anything else passes untouched.
#[inline(always)]
fn decapsulate(ctx: &XdpContext) -> u32 {
    let Ok((outer_src, flow)) = lb::parse_encapsulated(&Packet(ctx)) else {
        lb_bump(LbStat::NotVip);
        return xdp_action::XDP_PASS;
    };
    // SAFETY (both lookups): the values are copied out or only tested at once.
    let allowed = unsafe { LB_DECAP.get(&outer_src) }.is_some();
    let ipip_vip = unsafe { LB_VIPS.get(&flow.vip()) }.is_some_and(|m| m.flags & VIP_IPIP != 0);
    if !allowed || !ipip_vip {
        lb_bump(LbStat::NotVip);
        return xdp_action::XDP_PASS;
    }
    // The Ethernet header moves 20 bytes on, over the outer IPv4 header, and the frame starts
    // there.
    let Some(eth) = ptr_at::<[u8; ETH_HLEN]>(ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: checked by `ptr_at`.
    let eth = unsafe { *eth };
    let Some(to) = ptr_at_mut::<[u8; ETH_HLEN]>(ctx, 20) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: checked by `ptr_at_mut` (the inner header starts at 34, so 20..34 is inside).
    unsafe { *to = eth };
    // SAFETY: a plain helper call on this program's context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, 20) } != 0 {
        // Cannot happen for a frame this long; the kernel then sees a broken frame and drops
        // it, as it would a bad one.
        return xdp_action::XDP_DROP;
    }
    lb_bump(LbStat::Decapsulated);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn lb_bump(stat: LbStat) {
    if let Some(slot) = LB_STATS.get_ptr_mut(stat.index()) {
        // SAFETY: this CPU's copy; only this CPU writes it.
        unsafe { *slot += 1 };
    }
}

#[xdp]
pub fn drop_count(ctx: XdpContext) -> u32 {
    try_count(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

/// Counts the frame. `Err` only if a stats slot is missing, which the map size rules out; the
/// frame is passed either way.
#[inline(always)]
fn try_count(ctx: &XdpContext) -> Result<u32, ()> {
    bump(Stat::Frames)?;
    match classify(&Packet(ctx)) {
        Class::Ipv4(key) => {
            bump(Stat::Ipv4)?;
            let len = (ctx.data_end() - ctx.data()) as u64;
            if !record(&key, len) {
                bump(Stat::MapFull)?;
            }
        }
        Class::Other => bump(Stat::Other)?,
    }
    Ok(xdp_action::XDP_PASS)
}

/// Adds one frame of `len` bytes to `key`'s entry; `false` if the map is full.
#[inline(always)]
fn record(key: &DstKey, len: u64) -> bool {
    // Per-CPU values: only this CPU writes this copy, so plain adds are race-free.
    if let Some(count) = DESTINATIONS.get_ptr_mut(key) {
        // SAFETY: the pointer comes from a successful map lookup and is this CPU's value.
        unsafe { (*count).add_frame(len) };
        return true;
    }
    let first = DstCount {
        packets: 1,
        bytes: len,
    };
    if DESTINATIONS
        .insert(key, first, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        return true;
    }
    // Another CPU may have created the entry between our lookup and insert (EEXIST): retry the
    // lookup once. If it is still missing, the insert failed because the map is full.
    match DESTINATIONS.get_ptr_mut(key) {
        Some(count) => {
            // SAFETY: as above.
            unsafe { (*count).add_frame(len) };
            true
        }
        None => false,
    }
}

#[inline(always)]
fn bump(stat: Stat) -> Result<(), ()> {
    let slot = STATS.get_ptr_mut(stat.index()).ok_or(())?;
    // SAFETY: a valid slot of this CPU's copy of the array; only this CPU writes it.
    unsafe { *slot += 1 };
    Ok(())
}

/// The frame as `drop_common::classify` reads it.
struct Packet<'a>(&'a XdpContext);

impl Frame for Packet<'_> {
    #[inline(always)]
    fn bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let ptr = ptr_at::<[u8; N]>(self.0, offset)?;
        // SAFETY: `ptr_at` checked that all N bytes lie inside the frame; `[u8; N]` needs no
        // alignment.
        Some(unsafe { *ptr })
    }
}

/// [`ptr_at`], writable.
#[inline(always)]
fn ptr_at_mut<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    ptr_at::<T>(ctx, offset).map(|p| p as *mut T)
}

/// The one bounds check of the programs: a pointer to a `T` at `offset`, if it ends within
/// `data_end`. Every packet access goes through here, so the verifier sees the same check.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // Unreachable in a verified program (no panicking paths survive the verifier); required by
    // no_std.
    loop {}
}

/// Every BPF object declares a license; the kernel offers GPL-only helpers to GPL programs only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
