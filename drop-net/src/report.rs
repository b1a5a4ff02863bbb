//! What the counter reports, decoded from the raw map types of `drop-common`. Pure code: the
//! per-CPU values come in as slices, so all of it is unit-tested without a kernel.

use std::fmt;
use std::net::Ipv4Addr;

use drop_common::{DstCount, DstKey, IPPROTO_TCP, IPPROTO_UDP, STAT_SLOTS, Stat};

/// IP protocol of a [`Destination`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Icmp,
    Tcp,
    Udp,
    /// Any other IP protocol number.
    Other(u8),
}

impl Protocol {
    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Icmp => 1,
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
            Protocol::Other(n) => n,
        }
    }
}

impl From<u8> for Protocol {
    fn from(number: u8) -> Self {
        match number {
            1 => Protocol::Icmp,
            IPPROTO_TCP => Protocol::Tcp,
            IPPROTO_UDP => Protocol::Udp,
            n => Protocol::Other(n),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Icmp => f.write_str("icmp"),
            Protocol::Tcp => f.write_str("tcp"),
            Protocol::Udp => f.write_str("udp"),
            Protocol::Other(n) => write!(f, "proto-{n}"),
        }
    }
}

/// Where counted frames were going.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Destination {
    pub addr: Ipv4Addr,
    /// Destination port for TCP and UDP; 0 for other protocols and later fragments.
    pub port: u16,
    pub proto: Protocol,
}

impl From<DstKey> for Destination {
    fn from(key: DstKey) -> Self {
        Destination {
            addr: key.ip(),
            port: key.port,
            proto: Protocol::from(key.proto),
        }
    }
}

impl From<Destination> for DstKey {
    fn from(dst: Destination) -> Self {
        DstKey::new(dst.addr, dst.port, dst.proto.number())
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.proto {
            Protocol::Tcp | Protocol::Udp => {
                write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
            }
            _ => write!(f, "{}/{}", self.addr, self.proto),
        }
    }
}

/// Frames and bytes (Ethernet header included) counted for one destination, over all CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

impl Count {
    /// Sums the per-CPU values of one map entry.
    pub(crate) fn sum(per_cpu: &[DstCount]) -> Count {
        let total = per_cpu
            .iter()
            .fold(DstCount::default(), |acc, c| acc.plus(*c));
        Count {
            packets: total.packets,
            bytes: total.bytes,
        }
    }
}

/// The global counters, over all CPUs. `frames == ipv4 + other`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Every frame the program saw.
    pub frames: u64,
    /// IPv4 frames (each counted for its destination unless the map was full).
    pub ipv4: u64,
    /// Frames that are not IPv4 or too short to parse; passed like all the others.
    pub other: u64,
    /// IPv4 frames not counted per destination because the destination map was full.
    pub map_full: u64,
}

impl Stats {
    /// Builds the stats from each slot's per-CPU values, indexed by [`Stat`].
    pub(crate) fn from_slots(slots: &[Vec<u64>; STAT_SLOTS as usize]) -> Stats {
        let total = |stat: Stat| {
            slots[stat.index() as usize]
                .iter()
                .fold(0u64, |acc, v| acc.wrapping_add(*v))
        };
        Stats {
            frames: total(Stat::Frames),
            ipv4: total(Stat::Ipv4),
            other: total(Stat::Other),
            map_full: total(Stat::MapFull),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_decode_to_address_port_and_protocol() {
        let key = DstKey {
            addr: u32::from_ne_bytes([10, 201, 0, 11]),
            port: 5353,
            proto: 17,
            _pad: 0,
        };
        let dst = Destination::from(key);
        assert_eq!(dst.addr, Ipv4Addr::new(10, 201, 0, 11));
        assert_eq!(dst.port, 5353);
        assert_eq!(dst.proto, Protocol::Udp);
        assert_eq!(DstKey::from(dst), key);
        assert_eq!(dst.to_string(), "10.201.0.11:5353/udp");
    }

    #[test]
    fn protocols_round_trip_their_numbers() {
        for n in 0..=u8::MAX {
            assert_eq!(Protocol::from(n).number(), n);
        }
        assert_eq!(Protocol::from(6), Protocol::Tcp);
        assert_eq!(Protocol::from(47), Protocol::Other(47));
        let gre = Destination {
            addr: Ipv4Addr::new(10, 0, 0, 1),
            port: 0,
            proto: Protocol::Other(47),
        };
        assert_eq!(gre.to_string(), "10.0.0.1/proto-47");
    }

    #[test]
    fn per_cpu_values_are_summed() {
        let per_cpu = [
            DstCount {
                packets: 2,
                bytes: 120,
            },
            DstCount::default(),
            DstCount {
                packets: 1,
                bytes: 60,
            },
        ];
        assert_eq!(
            Count::sum(&per_cpu),
            Count {
                packets: 3,
                bytes: 180
            }
        );
        assert_eq!(Count::sum(&[]), Count::default());
    }

    #[test]
    fn stats_come_from_their_slots() {
        let slots = [vec![3, 4], vec![2, 3], vec![1, 1], vec![0, 1]];
        let stats = Stats::from_slots(&slots);
        assert_eq!(
            stats,
            Stats {
                frames: 7,
                ipv4: 5,
                other: 2,
                map_full: 1
            }
        );
    }
}
