//! Optional LAN discovery (`cluster.multicast`): every node announces its membership address
//! on an IPv4 multicast group every few seconds, and adds the addresses it hears to the ones the
//! join loop contacts. Announcements are signed with the peer key (see `peer`), so a node
//! without the cluster key is ignored and cannot steer others to an address of its choosing;
//! joining itself is still memberlist's, encrypted with the cluster key.
//!
//! Datagram: `DROP1 <membership ip:port> <X-Drop-Peer style signature>`.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrIn, sockopt};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use super::peer::PeerKey;
use super::state::physical_now_ms;

/// How often a node announces itself.
pub const INTERVAL: Duration = Duration::from_secs(2);
const MAGIC: &str = "DROP1";
const SIGNED_METHOD: &str = "ANNOUNCE";

/// The datagram announcing `addr`, signed at `ts_ms`.
pub fn announcement(key: &PeerKey, addr: SocketAddr, ts_ms: u64) -> String {
    let a = addr.to_string();
    format!("{MAGIC} {a} {}", key.sign(ts_ms, SIGNED_METHOD, &a, b""))
}

/// The address a datagram announces, if it is well formed, fresh and signed with `key`.
pub fn parse_announcement(key: &PeerKey, datagram: &[u8], now_ms: u64) -> Option<SocketAddr> {
    let text = std::str::from_utf8(datagram).ok()?;
    let mut parts = text.split(' ');
    if parts.next()? != MAGIC {
        return None;
    }
    let addr = parts.next()?;
    let sig = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    key.verify(Some(sig), SIGNED_METHOD, addr, b"", now_ms)
        .ok()?;
    addr.parse().ok()
}

/// A socket on `group`'s port that receives the group on the interface holding `iface`, and
/// sends from `iface` (so the kernel sends on that interface). Several nodes of one host may
/// share the port.
fn open(group: SocketAddrV4, iface: Ipv4Addr) -> std::io::Result<(UdpSocket, UdpSocket)> {
    let fd: OwnedFd = socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    socket::setsockopt(&fd, sockopt::ReusePort, &true)?;
    socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, group.port())),
    )?;
    let rx = UdpSocket::from(fd);
    rx.join_multicast_v4(group.ip(), &iface)?;
    let tx = UdpSocket::bind(SocketAddrV4::new(iface, 0))?;
    tx.set_nonblocking(true)?;
    tx.set_multicast_ttl_v4(1)?;
    Ok((rx, tx))
}

/// Announces `me` and collects others' announcements into `found` until `stop` turns true.
pub async fn run(
    group: SocketAddrV4,
    me: SocketAddr,
    key: PeerKey,
    found: Arc<Mutex<BTreeSet<SocketAddr>>>,
    changed: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let SocketAddr::V4(me4) = me else {
        warn!("multicast discovery needs an IPv4 cluster address; off");
        return;
    };
    let sockets = open(group, *me4.ip()).and_then(|(rx, tx)| {
        Ok((
            tokio::net::UdpSocket::from_std(rx)?,
            tokio::net::UdpSocket::from_std(tx)?,
        ))
    });
    let (rx, tx) = match sockets {
        Ok(s) => s,
        Err(e) => {
            warn!(%group, error = %e, "cannot open the multicast discovery socket; discovery off");
            return;
        }
    };
    info!(%group, "multicast discovery on");
    let mut tick = tokio::time::interval(INTERVAL);
    let mut buf = [0u8; 512];
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {
                let msg = announcement(&key, me, physical_now_ms());
                if let Err(e) = tx.send_to(msg.as_bytes(), SocketAddr::V4(group)).await {
                    debug!(error = %e, "multicast announcement not sent");
                }
            }
            got = rx.recv_from(&mut buf) => {
                let Ok((n, from)) = got else { continue };
                match parse_announcement(&key, &buf[..n], physical_now_ms()) {
                    Some(addr) if addr != me => {
                        let new = found.lock().unwrap_or_else(|e| e.into_inner()).insert(addr);
                        if new {
                            info!(%addr, "found a member by multicast");
                            changed.notify_one();
                        }
                    }
                    Some(_) => {}
                    None => debug!(%from, "ignored a multicast datagram (not a signed announcement)"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    const K2: &str = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=";

    #[test]
    fn announcements_round_trip_with_the_cluster_key_only() {
        let (k1, k2) = (PeerKey::derive(K1).unwrap(), PeerKey::derive(K2).unwrap());
        let addr: SocketAddr = "10.0.0.7:7946".parse().unwrap();
        let msg = announcement(&k1, addr, 5_000_000);
        assert_eq!(
            parse_announcement(&k1, msg.as_bytes(), 5_000_100),
            Some(addr)
        );
        assert_eq!(parse_announcement(&k2, msg.as_bytes(), 5_000_100), None);
        // Stale, tampered, or not ours at all.
        assert_eq!(parse_announcement(&k1, msg.as_bytes(), 5_100_000), None);
        let other = msg.replace("10.0.0.7", "10.0.0.8");
        assert_eq!(parse_announcement(&k1, other.as_bytes(), 5_000_100), None);
        assert_eq!(parse_announcement(&k1, b"hello", 0), None);
        assert_eq!(parse_announcement(&k1, &[0xff, 0xfe], 0), None);
    }
}
