//! [`Netlink`]: the real [`VipNet`], over rtnetlink and `AF_PACKET` sockets.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::pin::pin;

use futures_util::{Stream, TryStreamExt as _};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressProtocol,
};
use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use rtnetlink::{AddressMessageBuilder, Handle, RouteMessageBuilder};
use tokio::runtime::Runtime;
use tracing::debug;

use super::frame::{self, ETHERTYPE_ARP, ETHERTYPE_IPV6};
use super::packet::PacketSockets;
use super::{ADDRESS_PROTO, Mac, NetError, Vip, VipNet, check_prefix};

/// Longest interface name the kernel accepts (`IFNAMSIZ` − 1).
const IFNAME_MAX: usize = 15;

/// The real [`VipNet`]: addresses and routes over rtnetlink, announcements and the conflict
/// watch over `AF_PACKET` raw sockets. Needs CAP_NET_ADMIN and CAP_NET_RAW.
///
/// **Network namespace:** everything happens in the network namespace of the thread that called
/// [`Netlink::new`] (its netlink and packet sockets are opened there), whichever thread uses it
/// afterwards.
///
/// **Threads:** the API is synchronous. `Netlink` owns a private current-thread tokio runtime
/// that drives its rtnetlink connection, and each method blocks on its request with
/// `Runtime::block_on`. Call it from a plain OS thread only, never from inside a tokio runtime
/// (tokio panics when a runtime is blocked on from within another).
pub struct Netlink {
    // Field order is drop order: the handle goes before the runtime that runs its connection.
    handle: Handle,
    packets: PacketSockets,
    runtime: Runtime,
}

impl fmt::Debug for Netlink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Netlink")
            .field("packets", &self.packets)
            .finish_non_exhaustive()
    }
}

impl Netlink {
    /// Opens the rtnetlink connection and the packet sockets in the calling thread's network
    /// namespace. Must not be called from inside a tokio runtime.
    pub fn new() -> Result<Netlink, NetError> {
        let io_error = |op| {
            move |source| NetError::Io {
                op,
                target: "for the floating address".to_owned(),
                source,
            }
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(io_error("building the netlink runtime"))?;
        // The netlink socket registers with the runtime's I/O driver: create it inside.
        let (connection, handle, _unsolicited) = {
            let _entered = runtime.enter();
            rtnetlink::new_connection().map_err(io_error("opening the rtnetlink socket"))?
        };
        // Without the connection task running, every request would wait forever. On a
        // current-thread runtime it runs whenever a method blocks on a request.
        runtime.spawn(connection);
        let packets = PacketSockets::open().map_err(io_error("opening the packet sockets"))?;
        Ok(Netlink {
            handle,
            packets,
            runtime,
        })
    }

    fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// The first item of a netlink response (the only one of a non-dump request).
    fn first<T>(
        &self,
        response: impl Stream<Item = Result<T, rtnetlink::Error>>,
    ) -> Result<Option<T>, rtnetlink::Error> {
        self.block_on(async move { pin!(response).try_next().await })
    }

    /// The link called `ifname`.
    fn link(&self, ifname: &str) -> Result<LinkMessage, NetError> {
        let missing = || NetError::NoSuchInterface(ifname.to_owned());
        if ifname.is_empty() || ifname.len() > IFNAME_MAX || ifname.contains(['/', '\0']) {
            return Err(missing());
        }
        let request = self.handle.link().get().match_name(ifname).execute();
        match self.first(request) {
            Ok(Some(link)) => Ok(link),
            Ok(None) => Err(missing()),
            Err(err) if errno(&err) == Some(libc::ENODEV) => Err(missing()),
            Err(err) => Err(netlink_error("looking up interface", ifname, err)),
        }
    }

    fn ifindex(&self, ifname: &str) -> Result<u32, NetError> {
        Ok(self.link(ifname)?.header.index)
    }

    /// Name of the link with index `index`.
    fn link_name(&self, index: u32) -> Result<String, NetError> {
        let request = self.handle.link().get().match_index(index).execute();
        let missing = || NetError::NoSuchInterface(format!("#{index}"));
        match self.first(request) {
            Ok(link) => link.as_ref().and_then(link_name).ok_or_else(missing),
            Err(err) if errno(&err) == Some(libc::ENODEV) => Err(missing()),
            Err(err) => Err(netlink_error("looking up interface index", index, err)),
        }
    }

    /// All addresses of family `family` (`Unspec`: all), optionally only of interface `index`.
    fn addresses(
        &self,
        family: AddressFamily,
        index: Option<u32>,
    ) -> Result<Vec<AddressMessage>, NetError> {
        let mut request = self.handle.address().get();
        request.message_mut().header.family = family;
        if let Some(index) = index {
            request = request.set_link_index_filter(index);
        }
        let stream = request.execute();
        self.block_on(stream.try_collect::<Vec<_>>())
            .map_err(|err| netlink_error("listing addresses", "in this network namespace", err))
    }
}

impl Netlink {
    /// Adds `vip` marked with `mark` (`IFA_PROTO`): [`ADDRESS_PROTO`] for floating addresses,
    /// [`BACKEND_PROTO`](super::BACKEND_PROTO) for a balancer backend's VIP on `lo` (which [`VipNet::marked`] does
    /// not list, so floating-address cleanup leaves it alone).
    pub fn add_with_mark(&mut self, vip: &Vip, mark: u8) -> Result<bool, NetError> {
        check_prefix(vip)?;
        let index = self.ifindex(&vip.ifname)?;
        // Without `.replace()`: NLM_F_EXCL, so that an address already there is an EEXIST we can
        // report (and leave untouched) instead of being silently re-added.
        let mut request = self.handle.address().add(index, vip.addr, vip.prefix);
        let message = request.message_mut();
        message
            .attributes
            .push(AddressAttribute::Protocol(AddressProtocol::from(mark)));
        if vip.addr.is_ipv6() {
            // The address moves between nodes: duplicate address detection would hold it
            // "tentative" (unusable) for a second and fail it during a takeover.
            message.header.flags |= AddressHeaderFlags::Nodad;
            message
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match self.block_on(request.execute()) {
            Ok(()) => {
                debug!(%vip, "added the floating address");
                Ok(true)
            }
            Err(err) if errno(&err) == Some(libc::EEXIST) => Ok(false),
            Err(err) => Err(netlink_error("adding", vip, err)),
        }
    }
}

/// How a frame for an address leaves this node ([`Netlink::next_hop`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextHop {
    /// The interface the route goes out of (`lo` for an address of this node).
    pub ifname: String,
    /// The router, or the address itself when it is on the interface's segment.
    pub via: Ipv4Addr,
    /// `via`'s MAC from the neighbour table; `None` while it is being resolved.
    pub mac: Option<Mac>,
    /// The address is this node's own.
    pub local: bool,
}

impl Netlink {
    /// The next hop towards `dst` as the kernel routes it (like `ip route get DST` and then
    /// `ip neigh`): the interface, the gateway or `dst` itself, and that hop's MAC if the
    /// neighbour table has a usable entry. When it has none, the kernel is asked to resolve it
    /// (`NTF_USE`: the ARP request a first packet would cause) and `mac` is `None`; ask again
    /// a little later.
    pub fn next_hop(&mut self, dst: Ipv4Addr) -> Result<NextHop, NetError> {
        let target = IpAddr::V4(dst);
        let route = self.route_to(target)?;
        let mut oif = None;
        let mut gateway = None;
        for a in &route.attributes {
            match a {
                RouteAttribute::Oif(index) => oif = Some(*index),
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(*g),
                _ => {}
            }
        }
        let oif = oif.ok_or(NetError::NoRoute(target))?;
        let ifname = self.link_name(oif)?;
        let local = route.header.kind == RouteType::Local;
        let via = gateway.unwrap_or(dst);
        if local {
            return Ok(NextHop {
                ifname,
                via,
                mac: None,
                local,
            });
        }
        let mac = self.neighbour(oif, via)?;
        if mac.is_none() {
            let request = self
                .handle
                .neighbours()
                .add(oif, IpAddr::V4(via))
                .state(NeighbourState::None)
                .flags(NeighbourFlags::Use)
                .replace()
                .execute();
            if let Err(err) = self.block_on(request) {
                return Err(netlink_error("asking to resolve the next hop", via, err));
            }
        }
        Ok(NextHop {
            ifname,
            via,
            mac,
            local,
        })
    }

    /// The MTU of interface `ifname`.
    pub fn mtu(&mut self, ifname: &str) -> Result<u32, NetError> {
        let link = self.link(ifname)?;
        link.attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
            .ok_or_else(|| NetError::Unsupported(format!("no MTU reported for {ifname}")))
    }

    /// The route the kernel takes to `dst` (`ip route get DST`); unreachable is
    /// [`NetError::NoRoute`].
    fn route_to(&self, dst: IpAddr) -> Result<RouteMessage, NetError> {
        let full = if dst.is_ipv4() { 32 } else { 128 };
        let message = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst, full)
            .map_err(|_| NetError::NoRoute(dst))?
            .build();
        let request = self.handle.route().get(message).execute();
        match self.first(request) {
            Ok(Some(route)) => Ok(route),
            Ok(None) => Err(NetError::NoRoute(dst)),
            Err(err)
                if matches!(
                    errno(&err),
                    Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ENETDOWN)
                ) =>
            {
                Err(NetError::NoRoute(dst))
            }
            Err(err) => Err(netlink_error("looking up the route to", dst, err)),
        }
    }

    /// `addr`'s MAC on interface `index`, if the neighbour table has a usable entry.
    fn neighbour(&self, index: u32, addr: Ipv4Addr) -> Result<Option<Mac>, NetError> {
        let stream = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute();
        let entries = self
            .block_on(stream.try_collect::<Vec<_>>())
            .map_err(|err| netlink_error("listing neighbours", "in this network namespace", err))?;
        Ok(entries.iter().find_map(|n| {
            let usable = matches!(
                n.header.state,
                NeighbourState::Reachable
                    | NeighbourState::Stale
                    | NeighbourState::Delay
                    | NeighbourState::Probe
                    | NeighbourState::Permanent
            );
            let this = n.header.ifindex == index
                && n.attributes.iter().any(|a| {
                    matches!(a, NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) if *d == addr)
                });
            if !(usable && this) {
                return None;
            }
            n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(b) => {
                    <[u8; 6]>::try_from(b.as_slice()).ok().map(Mac)
                }
                _ => None,
            })
        }))
    }
}

impl VipNet for Netlink {
    fn interface_towards(&mut self, peer: IpAddr) -> Result<String, NetError> {
        let route = self.route_to(peer)?;
        let oif = route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(index) => Some(*index),
            _ => None,
        });
        let oif = oif.ok_or(NetError::NoRoute(peer))?;
        self.link_name(oif)
    }

    fn mac(&mut self, ifname: &str) -> Result<Mac, NetError> {
        let link = self.link(ifname)?;
        let not_ethernet = || NetError::NotEthernet(ifname.to_owned());
        if link.header.link_layer_type != LinkLayerType::Ether {
            return Err(not_ethernet());
        }
        let address = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
            _ => None,
        });
        address.map(Mac).ok_or_else(not_ethernet)
    }

    fn add(&mut self, vip: &Vip) -> Result<bool, NetError> {
        self.add_with_mark(vip, ADDRESS_PROTO)
    }

    fn remove(&mut self, vip: &Vip) -> Result<bool, NetError> {
        check_prefix(vip)?;
        let index = self.ifindex(&vip.ifname)?;
        // Address and prefix identify the address on the interface (the kernel also matches
        // the prefix length when IFA_ADDRESS is given, as it is here).
        let message = match vip.addr {
            IpAddr::V4(addr) => AddressMessageBuilder::<Ipv4Addr>::new()
                .index(index)
                .address(addr, vip.prefix)
                .build(),
            IpAddr::V6(addr) => AddressMessageBuilder::<Ipv6Addr>::new()
                .index(index)
                .address(addr, vip.prefix)
                .build(),
        };
        match self.block_on(self.handle.address().del(message).execute()) {
            Ok(()) => {
                debug!(%vip, "removed the floating address");
                Ok(true)
            }
            Err(err) if errno(&err) == Some(libc::EADDRNOTAVAIL) => Ok(false),
            Err(err) => Err(netlink_error("removing", vip, err)),
        }
    }

    fn marked(&mut self) -> Result<Vec<Vip>, NetError> {
        let ours = self
            .addresses(AddressFamily::Unspec, None)?
            .into_iter()
            .filter(|message| {
                message.attributes.iter().any(
                    |a| matches!(a, AddressAttribute::Protocol(p) if u8::from(*p) == ADDRESS_PROTO),
                )
            })
            .collect::<Vec<_>>();
        let mut names: HashMap<u32, String> = HashMap::new();
        let mut vips = Vec::with_capacity(ours.len());
        for message in ours {
            let Some(addr) = address_of(&message) else {
                continue;
            };
            let index = message.header.index;
            let ifname = match names.get(&index) {
                Some(name) => name.clone(),
                None => {
                    let name = self.link_name(index)?;
                    names.insert(index, name.clone());
                    name
                }
            };
            vips.push(Vip {
                ifname,
                addr,
                prefix: message.header.prefix_len,
            });
        }
        Ok(vips)
    }

    fn present(&mut self, vip: &Vip) -> Result<bool, NetError> {
        check_prefix(vip)?;
        let index = self.ifindex(&vip.ifname)?;
        let family = match vip.addr {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        Ok(self.addresses(family, Some(index))?.iter().any(|message| {
            message.header.prefix_len == vip.prefix && address_of(message) == Some(vip.addr)
        }))
    }

    fn announce(&mut self, vip: &Vip, mac: Mac) -> Result<(), NetError> {
        let index = self.ifindex(&vip.ifname)?;
        let (sent, op) = match vip.addr {
            IpAddr::V4(addr) => (
                self.packets.send(
                    index,
                    ETHERTYPE_ARP,
                    Mac([0xff; 6]),
                    &frame::arp_announcement(mac, addr),
                ),
                "sending a gratuitous ARP for",
            ),
            IpAddr::V6(addr) => (
                self.packets.send(
                    index,
                    ETHERTYPE_IPV6,
                    Mac([0x33, 0x33, 0, 0, 0, 1]),
                    &frame::neighbour_advertisement(mac, addr),
                ),
                "sending an unsolicited neighbour advertisement for",
            ),
        };
        sent.map_err(|source| NetError::Io {
            op,
            target: vip.to_string(),
            source,
        })
    }

    fn watch(&mut self, vip: &Vip, ours: Mac) -> Result<(), NetError> {
        let index = self.ifindex(&vip.ifname)?;
        self.packets
            .watch(index, vip.addr, ours)
            .map_err(|source| NetError::Io {
                op: "watching for conflicts over",
                target: vip.to_string(),
                source,
            })
    }

    fn conflicts(&mut self) -> Result<Vec<Mac>, NetError> {
        self.packets.conflicts().map_err(|source| NetError::Io {
            op: "reading the conflict watch",
            target: String::new(),
            source,
        })
    }
}

/// The address of an address message: IFA_LOCAL if present (IPv4, and IPv6 with a peer),
/// else IFA_ADDRESS.
fn address_of(message: &AddressMessage) -> Option<IpAddr> {
    let local = message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(addr) => Some(*addr),
        _ => None,
    });
    local.or_else(|| {
        message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(addr) => Some(*addr),
            _ => None,
        })
    })
}

fn link_name(link: &LinkMessage) -> Option<String> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })
}

/// The errno of a kernel refusal (positive), if that is what `err` is.
fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(message) => message.code.map(|code| -code.get()),
        _ => None,
    }
}

/// A [`NetError::Netlink`] whose source is the errno as an `io::Error`, or the rtnetlink error
/// itself when it is not a kernel refusal.
fn netlink_error(op: &'static str, target: impl fmt::Display, err: rtnetlink::Error) -> NetError {
    let source = match errno(&err) {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::other(err),
    };
    NetError::Netlink {
        op,
        target: target.to_string(),
        source,
    }
}
