//! DROP's XDP program `drop_count`: counts every frame per IPv4 destination (address, port,
//! protocol) and in a few global slots, and passes every frame, malformed ones included.
//!
//! It never drops, redirects or rewrites anything: a failure to count must not cost a packet.
//! The map layout and the parsing rules live in `drop-common` (host-tested there); this file only
//! supplies bounds-checked access to the frame and the map updates.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action},
    macros::{map, xdp},
    maps::{PerCpuArray, PerCpuHashMap},
    programs::XdpContext,
};
use drop_common::{Class, DstCount, DstKey, Frame, MAX_DESTINATIONS, STAT_SLOTS, Stat, classify};

/// `drop_common::DESTINATIONS_MAP`: per-CPU frames and bytes per destination.
#[map(name = "DROP_DSTS")]
static DESTINATIONS: PerCpuHashMap<DstKey, DstCount> =
    PerCpuHashMap::with_max_entries(MAX_DESTINATIONS, 0);

/// `drop_common::STATS_MAP`: per-CPU global counters, indexed by `drop_common::Stat`.
#[map(name = "DROP_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_SLOTS, 0);

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

/// The one bounds check of the program: a pointer to a `T` at `offset`, if it ends within
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
