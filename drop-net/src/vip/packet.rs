//! The two `AF_PACKET` raw sockets of the floating address: one sends the announcements, one
//! watches an interface for frames saying that someone else holds the address.
//!
//! Both are opened when [`super::Netlink`] is created, so they belong to the network namespace
//! of the creating thread whatever thread uses them later. The send socket has protocol 0: the
//! kernel delivers nothing to it. The watch socket receives nothing either until
//! [`PacketSockets::watch`] binds it to an interface and an ethertype.

use std::io::{self, Read as _};
use std::net::IpAddr;

use socket2::{Domain, SockAddr, SockAddrStorage, SockFilter, Socket, Type};

use super::Mac;
use super::frame::{self, ETHERTYPE_ARP, ETHERTYPE_IPV6};

/// Largest frame read from the watch socket; longer ones are truncated, which is harmless: the
/// parts that matter (ARP, or the neighbour-discovery header and its options) come first.
const READ_BUFFER: usize = 2048;
/// Most frames one [`PacketSockets::conflicts`] call reads, so that a flood cannot keep the
/// caller in the loop; the rest wait for the next call (or are dropped by the kernel when the
/// socket's receive buffer is full).
const MAX_FRAMES_PER_DRAIN: usize = 4096;

/// What the watch socket is bound to.
#[derive(Debug, Clone, Copy)]
struct Watch {
    vip: IpAddr,
    ours: Mac,
}

pub(super) struct PacketSockets {
    send: Socket,
    watch: Socket,
    watching: Option<Watch>,
}

impl std::fmt::Debug for PacketSockets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketSockets")
            .field("watching", &self.watching)
            .finish_non_exhaustive()
    }
}

impl PacketSockets {
    /// Opens both sockets (needs CAP_NET_RAW), nonblocking and close-on-exec.
    pub(super) fn open() -> io::Result<PacketSockets> {
        let open = || -> io::Result<Socket> {
            // Protocol 0: bound to nothing, receives nothing.
            let socket = Socket::new(Domain::PACKET, Type::RAW, None)?;
            socket.set_nonblocking(true)?;
            Ok(socket)
        };
        Ok(PacketSockets {
            send: open()?,
            watch: open()?,
            watching: None,
        })
    }

    /// Sends one whole Ethernet frame (header included) out of interface `ifindex`.
    pub(super) fn send(
        &self,
        ifindex: u32,
        ethertype: u16,
        dst: Mac,
        frame: &[u8],
    ) -> io::Result<()> {
        let to = link_addr(ifindex, ethertype, Some(dst))?;
        let sent = self.send.send_to(frame, &to)?;
        if sent != frame.len() {
            return Err(io::Error::other(format!(
                "sent {sent} of {} bytes",
                frame.len()
            )));
        }
        Ok(())
    }

    /// Watches interface `ifindex` for frames about `vip` from a MAC other than `ours`: ARP
    /// for IPv4, neighbour discovery for IPv6. Replaces any earlier watch; frames already
    /// queued from it are discarded.
    pub(super) fn watch(&mut self, ifindex: u32, vip: IpAddr, ours: Mac) -> io::Result<()> {
        self.watching = None;
        let (ethertype, filter) = match vip {
            IpAddr::V4(_) => (ETHERTYPE_ARP, ARP_FILTER),
            IpAddr::V6(_) => (ETHERTYPE_IPV6, ND_FILTER),
        };
        // The filter first, so that the new binding never queues frames it would reject.
        self.watch.attach_filter(&program(filter))?;
        self.watch.bind(&link_addr(ifindex, ethertype, None)?)?;
        self.drain(|_| ())?;
        self.watching = Some(Watch { vip, ours });
        Ok(())
    }

    /// The distinct conflicting sender MACs among the frames queued since the last call, in the
    /// order first seen; empty when not watching.
    pub(super) fn conflicts(&mut self) -> io::Result<Vec<Mac>> {
        let Some(Watch { vip, ours }) = self.watching else {
            return Ok(Vec::new());
        };
        let mut seen = Vec::new();
        self.drain(|frame| {
            if let Some(mac) = frame::conflict(frame, vip, ours)
                && !seen.contains(&mac)
            {
                seen.push(mac);
            }
        })?;
        Ok(seen)
    }

    /// Reads queued frames without blocking, at most [`MAX_FRAMES_PER_DRAIN`], handing each to
    /// `each`.
    fn drain(&self, mut each: impl FnMut(&[u8])) -> io::Result<()> {
        let mut buffer = [0u8; READ_BUFFER];
        for _ in 0..MAX_FRAMES_PER_DRAIN {
            match (&self.watch).read(&mut buffer) {
                Ok(len) => each(&buffer[..len]),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }
}

// Classic BPF, run by the kernel on each frame (from its Ethernet header) before queueing it.
// Kept as plain tuples (code, jump if true, jump if false, k) so that the tests can run them.
type Insn = (u16, u8, u8, u32);
const LD_H_ABS: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
const LD_B_ABS: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
/// "Keep this many bytes": all of any frame.
const ACCEPT: u32 = 0xffff_ffff;
const REJECT: u32 = 0;

/// ARP frames only (the binding to ETH_P_ARP already ensures it; this replaces an earlier
/// IPv6 filter).
const ARP_FILTER: &[Insn] = &[
    (LD_H_ABS, 0, 0, 12),                // 0: ethertype
    (JEQ_K, 0, 1, ETHERTYPE_ARP as u32), // 1: ARP, else reject (3)
    (RET_K, 0, 0, ACCEPT),               // 2
    (RET_K, 0, 0, REJECT),               // 3
];

/// IPv6 neighbour solicitations and advertisements only (ICMPv6 right after the IPv6 header,
/// as neighbour discovery always is), not every IPv6 frame of the interface.
const ND_FILTER: &[Insn] = &[
    (LD_H_ABS, 0, 0, 12),                 // 0: ethertype
    (JEQ_K, 0, 5, ETHERTYPE_IPV6 as u32), // 1: IPv6, else reject (7)
    (LD_B_ABS, 0, 0, 14 + 6),             // 2: next header
    (JEQ_K, 0, 3, 58),                    // 3: ICMPv6, else reject (7)
    (LD_B_ABS, 0, 0, 14 + 40),            // 4: ICMPv6 type
    (JEQ_K, 2, 0, 135),                   // 5: neighbour solicitation: accept (8)
    (JEQ_K, 1, 0, 136),                   // 6: neighbour advertisement: accept (8)
    (RET_K, 0, 0, REJECT),                // 7
    (RET_K, 0, 0, ACCEPT),                // 8
];

fn program(insns: &[Insn]) -> Vec<SockFilter> {
    insns
        .iter()
        .map(|&(code, jt, jf, k)| SockFilter::new(code, jt, jf, k))
        .collect()
}

/// A `sockaddr_ll` for interface `ifindex` and `ethertype`: to bind a socket (no `dst`) or to
/// send a frame to `dst`.
fn link_addr(ifindex: u32, ethertype: u16, dst: Option<Mac>) -> io::Result<SockAddr> {
    let ifindex = i32::try_from(ifindex)
        .map_err(|_| io::Error::other(format!("interface index {ifindex} out of range")))?;
    let (halen, addr) = match dst {
        Some(Mac(mac)) => (6, [mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 0, 0]),
        None => (0, [0; 8]),
    };
    let ll = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as libc::c_ushort,
        sll_protocol: ethertype.to_be(),
        sll_ifindex: ifindex,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: halen,
        sll_addr: addr,
    };
    Ok(sock_addr_ll(ll))
}

/// `ll` as a [`SockAddr`]. The only `unsafe` of this crate: socket2 has no safe constructor for
/// link-layer addresses.
#[allow(unsafe_code)]
fn sock_addr_ll(ll: libc::sockaddr_ll) -> SockAddr {
    const LEN: socket2::socklen_t = size_of::<libc::sockaddr_ll>() as socket2::socklen_t;
    let mut storage = SockAddrStorage::zeroed();
    // SAFETY: `sockaddr_ll` is one of Linux's `sockaddr_*` types (what `view_as` requires; it
    // also asserts that it fits the storage). The storage then holds a fully initialised
    // `sockaddr_ll` whose family field is AF_PACKET, and `LEN` is exactly its size, which is
    // what `SockAddr::new` requires.
    unsafe {
        *storage.view_as::<libc::sockaddr_ll>() = ll;
        SockAddr::new(storage, LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_addr_carries_index_protocol_and_destination() {
        let addr = link_addr(7, ETHERTYPE_ARP, Some(Mac([0xff; 6]))).unwrap();
        assert_eq!(i32::from(addr.family()), libc::AF_PACKET);
        assert_eq!(addr.len() as usize, size_of::<libc::sockaddr_ll>());
        assert!(link_addr(u32::MAX, ETHERTYPE_ARP, None).is_err());
    }

    /// Runs a classic BPF program of the few opcodes used here on `frame`; `None` if the
    /// program is invalid (unknown opcode, jump or read out of bounds, no return).
    fn run(insns: &[Insn], frame: &[u8]) -> Option<u32> {
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let (code, jt, jf, k) = *insns.get(pc)?;
            let at = usize::try_from(k).ok();
            pc += 1;
            match code {
                LD_H_ABS => {
                    acc = u32::from(u16::from_be_bytes(
                        frame.get(at?..at? + 2)?.try_into().ok()?,
                    ))
                }
                LD_B_ABS => acc = u32::from(*frame.get(at?)?),
                JEQ_K => pc += usize::from(if acc == k { jt } else { jf }),
                RET_K => return Some(k),
                _ => return None,
            }
        }
    }

    #[test]
    fn filters_keep_what_the_watch_parses_and_nothing_else() {
        let mac = Mac([2, 0, 0, 0, 0, 1]);
        let arp = frame::arp_announcement(mac, "10.201.0.100".parse().unwrap());
        let na = frame::neighbour_advertisement(mac, "fd00:201::100".parse().unwrap());
        let mut ns = na;
        ns[14 + 40] = 135;
        let mut echo = na;
        echo[14 + 40] = 128; // ICMPv6 echo request
        let mut tcp = na;
        tcp[14 + 6] = 6;
        assert_eq!(run(ARP_FILTER, &arp), Some(ACCEPT));
        assert_eq!(run(ARP_FILTER, &na), Some(REJECT));
        assert_eq!(run(ND_FILTER, &na), Some(ACCEPT));
        assert_eq!(run(ND_FILTER, &ns), Some(ACCEPT));
        assert_eq!(run(ND_FILTER, &echo), Some(REJECT));
        assert_eq!(run(ND_FILTER, &tcp), Some(REJECT));
        assert_eq!(run(ND_FILTER, &arp), Some(REJECT));
        assert_eq!((LD_H_ABS, LD_B_ABS, JEQ_K, RET_K), (0x28, 0x30, 0x15, 0x06));
    }
}
