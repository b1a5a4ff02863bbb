//! The floating address ("VIP"): an IP address that DROP moves between nodes, on one interface.
//!
//! [`VipNet`] is everything the node holding the address does to the kernel: find the interface
//! towards a peer, add and remove the address, find addresses left behind by a crashed run,
//! announce the address to the link (gratuitous ARP, or an unsolicited IPv6 neighbour
//! advertisement) and watch the link for another holder. [`Netlink`] implements it for real
//! (rtnetlink, and `AF_PACKET` sockets); the supervisor's policy is unit-tested against a fake.
//!
//! Every address DROP adds carries a mark, the address protocol [`ADDRESS_PROTO`] (`IFA_PROTO`,
//! Linux ≥ 5.18; `ip -d addr` shows it as `proto 68`), so that [`VipNet::marked`] finds exactly
//! DROP's addresses after a crash and nothing else. Nothing here removes an unmarked address
//! unless [`VipNet::remove`] is called for that very address.

mod frame;
mod netlink;
mod packet;

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::str::FromStr;

use thiserror::Error;

pub use netlink::{Netlink, NextHop};

/// The mark on every address DROP adds: its `IFA_PROTO` value. The kernel reserves 1–3 for its
/// own addresses (loopback, router advertisement, link-local); 68 is ASCII `D`, used by no one
/// we know of.
pub const ADDRESS_PROTO: u8 = 68;

/// The mark of a balancer backend's copy of a VIP on `lo` (direct server return): another
/// value than [`ADDRESS_PROTO`], so that removing floating-address leftovers never takes away
/// an address that running service instances rely on.
pub const BACKEND_PROTO: u8 = 69;

/// An address DROP floats between nodes, on one interface.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Vip {
    /// The interface holding it, in the network namespace of the [`VipNet`].
    pub ifname: String,
    pub addr: IpAddr,
    /// Prefix length, as in `ip addr add ADDR/PREFIX`; chosen by the caller (a /32 or /128
    /// adds no subnet route).
    pub prefix: u8,
}

impl fmt::Display for Vip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} on {}", self.addr, self.prefix, self.ifname)
    }
}

/// An Ethernet address; displayed and parsed as `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// A string that is not six colon-separated hexadecimal bytes.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("not a MAC address (aa:bb:cc:dd:ee:ff): {0:?}")]
pub struct ParseMacError(pub String);

impl FromStr for Mac {
    type Err = ParseMacError;

    /// Six bytes of one or two hex digits each (either case), separated by `:`.
    fn from_str(s: &str) -> Result<Mac, ParseMacError> {
        let invalid = || ParseMacError(s.to_owned());
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or_else(invalid)?;
            if part.is_empty() || part.len() > 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
        }
        match parts.next() {
            Some(_) => Err(invalid()),
            None => Ok(Mac(mac)),
        }
    }
}

/// Errors of [`VipNet`]. Each message names the step and the interface or address; the
/// kernel's reason, when there is one, is the `source()` (an `io::Error` carrying the errno).
#[derive(Debug, Error)]
pub enum NetError {
    #[error("no interface named {0:?} in this network namespace")]
    NoSuchInterface(String),
    #[error("no route to {0}")]
    NoRoute(IpAddr),
    #[error("interface {0} is not an Ethernet interface (no 6-byte hardware address)")]
    NotEthernet(String),
    #[error("/{prefix} is not a prefix length for {addr}")]
    InvalidPrefix { addr: IpAddr, prefix: u8 },
    /// A netlink request the kernel refused or that failed; `source` has the errno if the
    /// kernel gave one (`raw_os_error()`).
    #[error("netlink: {op} {target}")]
    Netlink {
        op: &'static str,
        target: String,
        #[source]
        source: io::Error,
    },
    /// A socket or runtime operation that failed.
    #[error("{op} {target}")]
    Io {
        op: &'static str,
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("not supported: {0}")]
    Unsupported(String),
}

/// The privileged side of the floating IP. Implemented for real by [`Netlink`]; drop-supervisor
/// unit-tests its policy with a fake.
pub trait VipNet: Send {
    /// Interface whose route reaches `peer` (like `ip route get PEER` → dev).
    fn interface_towards(&mut self, peer: IpAddr) -> Result<String, NetError>;

    /// The interface's Ethernet address.
    fn mac(&mut self, ifname: &str) -> Result<Mac, NetError>;

    /// Adds the address marked as DROP's; idempotent (`Ok(false)` if it was already there).
    /// IPv6 with NODAD. An address that was already there is left as it was, mark included.
    fn add(&mut self, vip: &Vip) -> Result<bool, NetError>;

    /// Removes it; idempotent (`Ok(false)` if absent).
    fn remove(&mut self, vip: &Vip) -> Result<bool, NetError>;

    /// Every address in this network namespace carrying DROP's mark (for cleanup after a
    /// crash); never others.
    fn marked(&mut self) -> Result<Vec<Vip>, NetError>;

    /// Whether this exact address (address and prefix) is present on that interface (marked or
    /// not).
    fn present(&mut self, vip: &Vip) -> Result<bool, NetError>;

    /// Sends one gratuitous announcement from `mac`: IPv4 = ARP request, sender IP = target
    /// IP = VIP, target MAC 00:00:00:00:00:00, Ethernet destination ff:ff:ff:ff:ff:ff, 42 bytes
    /// (like keepalived / `arping -U`); IPv6 = unsolicited neighbour advertisement to ff02::1
    /// with the Override flag and the target link-layer address option.
    fn announce(&mut self, vip: &Vip, mac: Mac) -> Result<(), NetError>;

    /// Starts (or restarts, for another VIP) watching the interface for conflicts: ARP
    /// replies or gratuitous ARPs (requests with sender IP = VIP) whose sender IP is the VIP
    /// and whose sender MAC is not `ours`. For IPv6: neighbour advertisements for the VIP, or
    /// solicitations sent from it, from a MAC that is not `ours`.
    fn watch(&mut self, vip: &Vip, ours: Mac) -> Result<(), NetError>;

    /// Drains, without blocking, the conflicting sender MACs seen since the last call (empty
    /// when not watching). Each MAC appears once per call, in the order first seen.
    fn conflicts(&mut self) -> Result<Vec<Mac>, NetError>;
}

/// `InvalidPrefix` unless `vip.prefix` fits its address family.
fn check_prefix(vip: &Vip) -> Result<(), NetError> {
    let max = match vip.addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    if vip.prefix > max {
        return Err(NetError::InvalidPrefix {
            addr: vip.addr,
            prefix: vip.prefix,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_displays_and_parses() {
        let mac = Mac([0x02, 0, 0xab, 0xcd, 0xef, 0x1]);
        assert_eq!(mac.to_string(), "02:00:ab:cd:ef:01");
        assert_eq!("02:00:ab:cd:ef:01".parse(), Ok(mac));
        assert_eq!("02:0:AB:Cd:eF:1".parse(), Ok(mac));
        for bad in [
            "",
            "02:00:ab:cd:ef",
            "02:00:ab:cd:ef:01:02",
            "02:00:ab:cd:ef:",
            "02-00-ab-cd-ef-01",
            "02:00:ab:cd:ef:001",
            "02:00:ab:cd:ef:+1",
            "02:00:ab:cd:ef:g1",
        ] {
            assert_eq!(
                bad.parse::<Mac>(),
                Err(ParseMacError(bad.to_owned())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn vip_display_and_prefix_check() {
        let vip = Vip {
            ifname: "eth0".into(),
            addr: "10.201.0.100".parse().unwrap(),
            prefix: 32,
        };
        assert_eq!(vip.to_string(), "10.201.0.100/32 on eth0");
        assert!(check_prefix(&vip).is_ok());
        let too_long = Vip { prefix: 33, ..vip };
        let err = check_prefix(&too_long).unwrap_err();
        assert_eq!(
            err.to_string(),
            "/33 is not a prefix length for 10.201.0.100"
        );
        let v6 = Vip {
            ifname: "eth0".into(),
            addr: "fd00:201::100".parse().unwrap(),
            prefix: 128,
        };
        assert!(check_prefix(&v6).is_ok());
        assert!(check_prefix(&Vip { prefix: 129, ..v6 }).is_err());
    }

    #[test]
    fn errors_name_interface_and_address() {
        let err = NetError::NoSuchInterface("eth9".into());
        assert_eq!(
            err.to_string(),
            "no interface named \"eth9\" in this network namespace"
        );
        let err = NetError::Netlink {
            op: "adding",
            target: "10.201.0.100/32 on eth0".into(),
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        assert_eq!(err.to_string(), "netlink: adding 10.201.0.100/32 on eth0");
        let source = std::error::Error::source(&err).map(ToString::to_string);
        assert!(source.is_some_and(|s| s.contains("Operation not permitted")));
    }
}
