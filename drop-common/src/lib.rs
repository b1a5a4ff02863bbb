//! Types shared by the XDP program (`drop-ebpf`) and user space (`drop-net`).
//!
//! Owns the layout of every BPF map the two sides exchange (keys, values, slot numbers, map and
//! program names) and the pure frame classification the XDP program runs, so that the parsing
//! rules get host unit tests. It must never do I/O or depend on anything but `core`: it is
//! compiled for `bpfel-unknown-none` as well as for the host.
//!
//! Every map type is `#[repr(C)]` and `Copy`, with explicit padding fields, so both sides agree
//! on the bytes without relying on the compiler's layout choices. With the `user` feature the
//! types implement `aya::Pod`.
#![no_std]

pub mod lb;
pub mod maglev;

use core::net::Ipv4Addr;

/// Name of the XDP program in the object (the `#[xdp]` function in `drop-ebpf`).
pub const PROGRAM: &str = "drop_count";

/// Name of the per-CPU hash map `DstKey -> DstCount`.
///
/// Kernel object names are cut at 15 bytes, so names stay short.
pub const DESTINATIONS_MAP: &str = "DROP_DSTS";
/// Entries of [`DESTINATIONS_MAP`]; a frame to a new destination is counted in
/// [`Stat::MapFull`] once the map holds this many.
pub const MAX_DESTINATIONS: u32 = 4096;

/// Name of the per-CPU array `u32 -> u64` of global counters, indexed by [`Stat`].
pub const STATS_MAP: &str = "DROP_STATS";
/// Slots of [`STATS_MAP`].
pub const STAT_SLOTS: u32 = 4;

/// Slots of [`STATS_MAP`]. `Frames == Ipv4 + Other` always holds.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Every frame the program saw.
    Frames = 0,
    /// Frames classified as IPv4 (see [`classify`]), whether or not a destination entry
    /// could be recorded for them.
    Ipv4 = 1,
    /// Frames that are not IPv4, or too short/malformed to read the fields we need.
    Other = 2,
    /// IPv4 frames whose destination could not be recorded because [`DESTINATIONS_MAP`] was full.
    MapFull = 3,
}

impl Stat {
    /// All slots, in index order.
    pub const ALL: [Stat; STAT_SLOTS as usize] =
        [Stat::Frames, Stat::Ipv4, Stat::Other, Stat::MapFull];

    /// Index of this slot in [`STATS_MAP`].
    pub const fn index(self) -> u32 {
        self as u32
    }
}

/// IP protocol numbers the program looks into.
pub const IPPROTO_TCP: u8 = 6;
/// See [`IPPROTO_TCP`].
pub const IPPROTO_UDP: u8 = 17;
/// Ethertype of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// Length of an Ethernet header without VLAN tags.
pub const ETH_HLEN: usize = 14;

/// Key of [`DESTINATIONS_MAP`]: where an IPv4 frame was going.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DstKey {
    /// IPv4 destination exactly as the four bytes appear in the packet (network byte order, read
    /// with `from_ne_bytes`); use [`DstKey::ip`] to get an address.
    pub addr: u32,
    /// Destination port in host byte order; 0 unless the protocol is TCP or UDP (and for the
    /// non-first fragments of a fragmented datagram, which carry no ports).
    pub port: u16,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, ...).
    pub proto: u8,
    /// Always zero: the padding takes part in hashing, so it must be deterministic.
    pub _pad: u8,
}

impl DstKey {
    /// The key for `ip:port` over `proto`.
    pub const fn new(ip: Ipv4Addr, port: u16, proto: u8) -> Self {
        DstKey {
            addr: u32::from_ne_bytes(ip.octets()),
            port,
            proto,
            _pad: 0,
        }
    }

    /// The destination address.
    pub const fn ip(&self) -> Ipv4Addr {
        let [a, b, c, d] = self.addr.to_ne_bytes();
        Ipv4Addr::new(a, b, c, d)
    }
}

/// Value of [`DESTINATIONS_MAP`] (one per CPU): frames and bytes seen for a destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DstCount {
    /// Frames to the destination.
    pub packets: u64,
    /// Bytes of those frames, Ethernet header included (`data_end - data` in XDP).
    pub bytes: u64,
}

impl DstCount {
    /// Adds one frame of `len` bytes.
    pub fn add_frame(&mut self, len: u64) {
        self.packets = self.packets.wrapping_add(1);
        self.bytes = self.bytes.wrapping_add(len);
    }

    /// Adds another count (used to sum the per-CPU values).
    #[must_use]
    pub const fn plus(self, other: DstCount) -> DstCount {
        DstCount {
            packets: self.packets.wrapping_add(other.packets),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, only integer fields, explicit padding: every bit pattern is valid and there
// are no uninitialised bytes.
unsafe impl aya::Pod for DstKey {}
#[cfg(feature = "user")]
// SAFETY: as for `DstKey`.
unsafe impl aya::Pod for DstCount {}

/// Read access to the bytes of a frame, the one thing [`classify`] needs.
///
/// The XDP program implements it with its bounds-checked `ptr_at`, host tests with a slice.
pub trait Frame {
    /// The `N` bytes at `offset`, or `None` if the frame ends before `offset + N`.
    fn bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;
}

impl Frame for [u8] {
    fn bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let end = offset.checked_add(N)?;
        self.get(offset..end)?.try_into().ok()
    }
}

/// What [`classify`] made of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// An IPv4 frame going to this destination.
    Ipv4(DstKey),
    /// Anything else: not IPv4 (ARP, IPv6, VLAN-tagged), or too short or malformed to read the
    /// IPv4 header and, for TCP/UDP, the ports.
    Other,
}

/// Classifies an Ethernet frame. The rules:
///
/// - Only untagged Ethernet with ethertype 0x0800 is IPv4; VLAN tags count as [`Class::Other`].
/// - The IPv4 header must be complete: version 4, IHL at least 5 (20 bytes) and all IHL*4 bytes
///   present; otherwise [`Class::Other`].
/// - For TCP and UDP the destination port is read from the first 4 bytes after the IPv4 header;
///   if they are missing the frame is [`Class::Other`]. A non-first fragment (fragment offset
///   != 0) carries no L4 header, so its port is 0.
/// - Other protocols have port 0.
#[inline(always)]
pub fn classify<F: Frame + ?Sized>(frame: &F) -> Class {
    match try_classify(frame) {
        Some(key) => Class::Ipv4(key),
        None => Class::Other,
    }
}

#[inline(always)]
fn try_classify<F: Frame + ?Sized>(frame: &F) -> Option<DstKey> {
    let ethertype = frame.bytes::<2>(12)?;
    if u16::from_be_bytes(ethertype) != ETH_P_IP {
        return None;
    }
    // The fixed 20 bytes in one read, before any check at a variable offset: the BPF verifier
    // cannot follow a compiler that proves a fixed read safe from a later variable check.
    let header = frame.bytes::<20>(ETH_HLEN)?;
    let version_ihl = header[0];
    if version_ihl >> 4 != 4 {
        return None;
    }
    // At most 15 * 4 = 60 bytes: the mask keeps the offset bounded for the verifier too.
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if ihl < 20 {
        return None;
    }
    if ihl > 20 {
        // Options: the last byte of the header must be in the frame.
        frame.bytes::<1>(ETH_HLEN + ihl - 1)?;
    }
    let proto = header[9];
    let addr = u32::from_ne_bytes([header[16], header[17], header[18], header[19]]);
    let first_fragment = u16::from_be_bytes([header[6], header[7]]) & 0x1fff == 0;
    let port = if (proto == IPPROTO_TCP || proto == IPPROTO_UDP) && first_fragment {
        let ports = frame.bytes::<4>(ETH_HLEN + ihl)?;
        u16::from_be_bytes([ports[2], ports[3]])
    } else {
        0
    };
    Some(DstKey {
        addr,
        port,
        proto,
        _pad: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DST: [u8; 4] = [10, 201, 0, 11];

    /// Ethernet + IPv4 (`ihl` words) + `l4` bytes, with the given ethertype and fragment field.
    fn frame(ethertype: u16, ihl: u8, proto: u8, fragment: u16, l4: &[u8]) -> ([u8; 128], usize) {
        let mut f = [0u8; 128];
        f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&ethertype.to_be_bytes());
        let ip = ETH_HLEN;
        let hlen = usize::from(ihl) * 4;
        f[ip] = 0x40 | ihl;
        f[ip + 6..ip + 8].copy_from_slice(&fragment.to_be_bytes());
        f[ip + 8] = 64;
        f[ip + 9] = proto;
        f[ip + 12..ip + 16].copy_from_slice(&[10, 201, 0, 10]);
        f[ip + 16..ip + 20].copy_from_slice(&DST);
        f[ip + hlen..ip + hlen + l4.len()].copy_from_slice(l4);
        (f, ip + hlen + l4.len())
    }

    fn ipv4(port: u16, proto: u8) -> Class {
        Class::Ipv4(DstKey::new(Ipv4Addr::from(DST), port, proto))
    }

    #[test]
    fn udp_and_tcp_give_address_port_and_protocol() {
        let ports = [0x30, 0x39, 0x14, 0xe9]; // 12345 -> 5353
        let (f, len) = frame(ETH_P_IP, 5, IPPROTO_UDP, 0, &ports);
        assert_eq!(classify(&f[..len]), ipv4(5353, IPPROTO_UDP));
        let (f, len) = frame(ETH_P_IP, 5, IPPROTO_TCP, 0x4000 /* DF */, &ports);
        assert_eq!(classify(&f[..len]), ipv4(5353, IPPROTO_TCP));
    }

    #[test]
    fn options_move_the_ports() {
        // IHL 6: 4 bytes of (zero) options, then the ports: 1 -> 8080.
        let (f, len) = frame(ETH_P_IP, 6, IPPROTO_UDP, 0, &[0, 1, 0x1f, 0x90]);
        assert_eq!(classify(&f[..len]), ipv4(8080, IPPROTO_UDP));
    }

    #[test]
    fn other_protocols_and_later_fragments_have_port_zero() {
        let (f, len) = frame(ETH_P_IP, 5, 1 /* ICMP */, 0, &[8, 0, 0, 0]);
        assert_eq!(classify(&f[..len]), ipv4(0, 1));
        // Offset 185 * 8: the payload bytes are no ports, and there may be none at all.
        let (f, len) = frame(ETH_P_IP, 5, IPPROTO_UDP, 185, &[]);
        assert_eq!(classify(&f[..len]), ipv4(0, IPPROTO_UDP));
    }

    #[test]
    fn non_ipv4_and_malformed_frames_are_other() {
        let (f, len) = frame(0x0806 /* ARP */, 5, 0, 0, &[0; 8]);
        assert_eq!(classify(&f[..len]), Class::Other);
        let (f, len) = frame(0x86dd /* IPv6 */, 5, 0, 0, &[0; 8]);
        assert_eq!(classify(&f[..len]), Class::Other);
        let (mut f, len) = frame(ETH_P_IP, 5, IPPROTO_UDP, 0, &[0; 4]);
        f[ETH_HLEN] = 0x65; // version 6 in an IPv4 ethertype
        assert_eq!(classify(&f[..len]), Class::Other);
        f[ETH_HLEN] = 0x44; // IHL 4 < 5
        assert_eq!(classify(&f[..len]), Class::Other);
    }

    #[test]
    fn truncated_frames_are_other() {
        let (f, len) = frame(ETH_P_IP, 5, IPPROTO_UDP, 0, &[0, 1, 0, 2]);
        assert_eq!(classify(&f[..len]), ipv4(2, IPPROTO_UDP));
        // Every shorter prefix lacks the ports or part of the header.
        for cut in 0..len {
            assert_eq!(classify(&f[..cut]), Class::Other, "cut at {cut}");
        }
        // IHL says 24 bytes but only 20 are there.
        let (f, _) = frame(ETH_P_IP, 6, 1, 0, &[]);
        assert_eq!(classify(&f[..ETH_HLEN + 20]), Class::Other);
    }

    #[test]
    fn key_round_trips_the_address_in_packet_order() {
        let key = DstKey::new(Ipv4Addr::new(10, 201, 0, 11), 53, IPPROTO_UDP);
        assert_eq!(key.addr.to_ne_bytes(), [10, 201, 0, 11]);
        assert_eq!(key.ip(), Ipv4Addr::new(10, 201, 0, 11));
        assert_eq!(key._pad, 0);
    }

    #[test]
    fn map_types_have_the_agreed_layout() {
        assert_eq!(size_of::<DstKey>(), 8);
        assert_eq!(align_of::<DstKey>(), 4);
        assert_eq!(size_of::<DstCount>(), 16);
        for (i, stat) in Stat::ALL.iter().enumerate() {
            assert_eq!(stat.index() as usize, i);
        }
    }

    #[test]
    fn counts_add_up() {
        let mut c = DstCount::default();
        c.add_frame(60);
        c.add_frame(100);
        assert_eq!(
            c,
            DstCount {
                packets: 2,
                bytes: 160
            }
        );
        assert_eq!(
            c.plus(c),
            DstCount {
                packets: 4,
                bytes: 320
            }
        );
    }
}
