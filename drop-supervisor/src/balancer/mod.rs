//! The L4 balancer's control side (DESIGN §7): which VIP:ports this node's XDP program serves
//! and with which backends, computed from the replicated state alone, so that every node
//! computes the same Maglev ring and a VIP failover keeps established flows on their backends.
//!
//! - A service with `port` gets `VIP:port` on its namespace's floating IP; its backends are the
//!   nodes where an instance is active (weight 1), or active but surplus — leaving, its
//!   replacement already up — (weight 0: established flows stay, new ones go elsewhere). Such
//!   a service runs at most one instance per node (they would share the port).
//! - The namespace's gateway port is balanced too, by default, over the members whose gateway
//!   listens on all addresses (`[gateway] listen = "0.0.0.0:PORT"`).
//! - A port is forwarded by MAC rewrite (default) or, with `forward: ipip`, encapsulated in IPIP
//!   to the backend's address through the holder's next hop: the loop resolves each backend's
//!   next-hop MAC (`Netlink::next_hop`; a backend not resolved yet is left out and asked again
//!   every 250 ms; resolved ones every 5 s, to follow a changed router). A backend of an IPIP
//!   port takes the header off in its own XDP program, from the namespace's members only.
//! - Every node with `[balancer] enabled` programs its maps; traffic only reaches the one that
//!   holds the VIP. A backend node holds the VIP on `lo` (marked `BACKEND_PROTO`, so that the
//!   floating-address cleanup leaves it to the instances that outlive a daemon; answered for by no
//!   ARP with the tuning profile's `arp_ignore`/`arp_announce`) so that it accepts the frames
//!   and answers the client directly (direct server return).
//!
//! [`desired`] is pure; [`LbService`] runs `drop_net::Balancer` on a thread of its own
//! (`drop-lb`) and applies what changed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use drop_net::{Balancer, Forwarding, LbBackend, LbVip, Vip, VipNet, XdpMode};
use serde::Serialize;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::cluster::node::{NodeView, NsView};
use crate::services::spec::Forward;

/// The validated `[balancer]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbSettings {
    /// `None`: the interface whose route reaches the other members.
    pub interface: Option<String>,
    pub mode: XdpMode,
    pub pin_dir: PathBuf,
}

/// What this node's balancer should serve, and whether this node is a backend.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Desired {
    pub vips: BTreeMap<LbVip, Served>,
    /// The VIP this node must hold on `lo` (it runs an instance of a balanced service).
    pub local_vip: Option<IpAddr>,
    /// Another member's address: the balancer attaches to the interface that reaches it.
    pub towards: Option<Ipv4Addr>,
    /// This node's own address: the outer source of its IPIP frames.
    pub me: Option<Ipv4Addr>,
    /// Where this node is a backend of an IPIP port: the members' addresses, whose IPIP frames
    /// its XDP program takes apart (any of them may hold the VIP).
    pub decap_from: BTreeSet<Ipv4Addr>,
}

/// One VIP:port: how its frames are forwarded and to which backends.
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    pub forward: Forward,
    pub backends: Vec<Backend>,
}

/// A backend with the node it is.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Backend {
    pub node: String,
    #[serde(skip)]
    pub lb: LbBackend,
}

/// A stable backend id from a node id: the same on every node.
fn backend_id(node_id: &str) -> u64 {
    let hex: String = node_id
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(16)
        .collect();
    u64::from_str_radix(&hex, 16).unwrap_or_else(|_| {
        node_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    })
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    text.parse::<drop_net::Mac>().ok().map(|m| m.0)
}

/// This node's balancer, from its namespace's view and the nodes (pure).
pub fn desired(ns: &NsView, nodes: &[NodeView], me: &str) -> Desired {
    let mut out = Desired::default();
    let Some(vip) = ns.vip.as_deref().and_then(|v| v.parse::<IpAddr>().ok()) else {
        return out;
    };
    out.towards = nodes
        .iter()
        .filter(|n| n.name != me && n.state.is_up())
        .find_map(|n| match n.addr.ip() {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        });
    out.me = nodes
        .iter()
        .find(|n| n.name == me)
        .and_then(|n| match n.addr.ip() {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        });
    let members: BTreeSet<&str> = ns.members.iter().map(|m| m.name.as_str()).collect();
    for svc in &ns.services {
        let Some(b) = svc.spec.balance else {
            continue;
        };
        // Node → weight: 1 if it runs an active instance where assigned, else 0 if it still
        // runs a surplus one.
        let mut weights: BTreeMap<&str, u32> = BTreeMap::new();
        for i in &svc.instances {
            let Some(node) = i.node.as_deref() else {
                continue;
            };
            if i.active != "active" {
                continue;
            }
            let w = weights.entry(node).or_insert(0);
            if !i.surplus {
                *w = 1;
            }
        }
        if weights.contains_key(me) {
            out.local_vip = Some(vip);
            if b.forward == Forward::Ipip {
                out.decap_from.extend(
                    nodes
                        .iter()
                        .filter(|n| n.state.is_up() && members.contains(n.name.as_str()))
                        .filter_map(|n| match n.addr.ip() {
                            IpAddr::V4(a) => Some(a),
                            IpAddr::V6(_) => None,
                        }),
                );
            }
        }
        let mut backends = Vec::new();
        for (name, weight) in weights {
            let Some(n) = nodes.iter().find(|n| n.name == name && n.state.is_up()) else {
                continue;
            };
            let (IpAddr::V4(addr), Some(mac)) = (n.addr.ip(), n.mac.as_deref().and_then(parse_mac))
            else {
                continue;
            };
            // A draining node keeps its established flows and takes no new one.
            let weight = if n.draining { 0 } else { weight };
            backends.push(Backend {
                node: name.to_string(),
                lb: LbBackend {
                    id: backend_id(&n.id),
                    addr,
                    mac,
                    weight,
                },
            });
        }
        out.vips.insert(
            LbVip {
                addr: vip,
                port: b.port,
                proto: b.proto,
            },
            Served {
                forward: b.forward,
                backends,
            },
        );
    }
    // The namespace's gateway port, by default: every alive member whose gateway listens on
    // all addresses (so also on the VIP it holds on `lo`). A gateway bound to one address
    // cannot take the VIP's frames and is left out; a service on the same port wins.
    let mut gateways: BTreeMap<u16, Vec<Backend>> = BTreeMap::new();
    for n in nodes
        .iter()
        .filter(|n| n.state.is_up() && members.contains(n.name.as_str()))
    {
        // (An IPv6 VIP needs a gateway on `[::]`: one on `0.0.0.0` takes no IPv6.)
        let Some(gw) = n
            .gateway
            .filter(|g| g.ip().is_unspecified() && (vip.is_ipv4() || g.is_ipv6()))
        else {
            continue;
        };
        let (IpAddr::V4(addr), Some(mac)) = (n.addr.ip(), n.mac.as_deref().and_then(parse_mac))
        else {
            continue;
        };
        if n.name == me {
            out.local_vip = Some(vip);
        }
        gateways.entry(gw.port()).or_default().push(Backend {
            node: n.name.clone(),
            lb: LbBackend {
                id: backend_id(&n.id),
                addr,
                mac,
                weight: u32::from(!n.draining),
            },
        });
    }
    for (port, backends) in gateways {
        out.vips
            .entry(LbVip {
                addr: vip,
                port,
                proto: 6,
            })
            .or_insert(Served {
                forward: Forward::Mac,
                backends,
            });
    }
    out
}

/// One VIP:port as `lb ls` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct VipStatus {
    pub vip: String,
    pub port: u16,
    pub proto: &'static str,
    /// `mac` or `ipip`.
    pub forward: &'static str,
    pub backends: Vec<Value>,
    /// IPIP backends left out for now, with the reason.
    pub waiting: Vec<Value>,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub conn_hits: u64,
    pub no_backend: u64,
}

enum Msg {
    Desired(Box<Desired>),
    Holding(Option<IpAddr>),
    Status(mpsc::Sender<Value>),
    Metrics(mpsc::Sender<String>),
}

/// The `drop-lb` thread's handle.
#[derive(Debug)]
pub struct LbService {
    tx: mpsc::Sender<Msg>,
}

impl LbService {
    /// Starts the thread; it loads (or takes over) the pinned balancer at once.
    pub fn start(settings: LbSettings) -> std::io::Result<LbService> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("drop-lb".into())
            .spawn(move || run(settings, rx))?;
        Ok(LbService { tx })
    }

    pub fn update(&self, d: Desired) {
        let _ = self.tx.send(Msg::Desired(Box::new(d)));
    }

    /// The floating address this node holds now (`None`: none). From the first call on, only
    /// the VIP:ports of that address balance here; the others stay programmed in standby and
    /// their frames (sent here by the holder: this node is their backend) go to the kernel.
    /// Never called (no floating-IP agent here): every VIP:port balances.
    pub fn set_holding(&self, addr: Option<IpAddr>) {
        let _ = self.tx.send(Msg::Holding(addr));
    }

    /// `GET /v1/lb`.
    pub fn status(&self) -> Value {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Msg::Status(tx)).is_err() {
            return json!({ "error": "the balancer thread is gone" });
        }
        rx.recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| json!({ "error": "the balancer did not answer" }))
    }

    /// Prometheus text.
    pub fn metrics(&self) -> String {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Msg::Metrics(tx)).is_err() {
            return String::new();
        }
        rx.recv_timeout(Duration::from_secs(2)).unwrap_or_default()
    }
}

struct State {
    lb: Option<Balancer>,
    error: Option<String>,
    applied: BTreeMap<LbVip, Programmed>,
    interface: Option<String>,
    mode: Option<XdpMode>,
    local: Option<IpAddr>,
    decap: BTreeSet<Ipv4Addr>,
    net: Option<drop_net::Netlink>,
    /// The last desired state: applied again on the timer (next hops).
    last: Option<Desired>,
    /// The floating address this node holds, once the agent has said (`Some(None)`: none).
    holding: Option<Option<IpAddr>>,
}

/// What a VIP:port is programmed with: the backends as the XDP program has them (for IPIP with
/// their next hop's MAC) and, for `lb ls`, the next hops and the backends still waiting.
#[derive(Debug, Clone, PartialEq)]
struct Programmed {
    forwarding: Forwarding,
    backends: Vec<Backend>,
    /// Node → "ADDR MAC" of its next hop (IPIP).
    via: BTreeMap<String, String>,
    /// Node → why it is left out for now (its next hop is not resolved).
    waiting: BTreeMap<String, String>,
}

/// How often next hops are looked at again: soon while one is unresolved, else now and then to
/// follow a router whose MAC changed.
const RESOLVE_RETRY: Duration = Duration::from_millis(250);
const RESOLVE_REFRESH: Duration = Duration::from_secs(5);

fn run(settings: LbSettings, rx: mpsc::Receiver<Msg>) {
    let mut st = State {
        lb: None,
        error: None,
        applied: BTreeMap::new(),
        interface: settings.interface.clone(),
        mode: None,
        local: None,
        decap: BTreeSet::new(),
        net: drop_net::Netlink::new()
            .map_err(|e| warn!(error = %e, "balancer: no netlink"))
            .ok(),
        last: None,
        holding: None,
    };
    // Pins another build left (its map layout differed) cannot be taken over: start afresh
    // rather than not balancing.
    let opened = Balancer::open_or_replace(&settings.pin_dir).map(|(lb, _)| lb);
    match opened {
        Ok(lb) => {
            for v in lb.vips() {
                info!(vip = %v.addr, port = v.port, "balancer: serving from its pinned state");
            }
            st.decap = lb.decap_sources().unwrap_or_default();
            st.lb = Some(lb);
        }
        Err(e) => {
            warn!(error = %e, "balancer: cannot load the XDP program; this node does not balance");
            st.error = Some(format!("{e}"));
        }
    }
    loop {
        let waiting = st.applied.values().any(|p| !p.waiting.is_empty());
        let ipip = st
            .applied
            .values()
            .any(|p| matches!(p.forwarding, Forwarding::Ipip { .. }));
        let msg = if waiting || ipip {
            match rx.recv_timeout(if waiting {
                RESOLVE_RETRY
            } else {
                RESOLVE_REFRESH
            }) {
                Ok(m) => Some(m),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        } else {
            match rx.recv() {
                Ok(m) => Some(m),
                Err(_) => return,
            }
        };
        match msg {
            Some(Msg::Desired(d)) => apply(&mut st, &settings, *d),
            Some(Msg::Holding(addr)) => {
                st.holding = Some(addr);
                set_standby(&mut st);
            }
            None => {
                if let Some(d) = st.last.clone() {
                    apply(&mut st, &settings, d);
                }
            }
            Some(Msg::Status(reply)) => {
                let _ = reply.send(status(&st));
            }
            Some(Msg::Metrics(reply)) => {
                let _ = reply.send(metrics(&st));
            }
        }
    }
}

fn apply(st: &mut State, settings: &LbSettings, d: Desired) {
    // The VIP on lo where this node is a backend.
    if st.local != d.local_vip {
        if let Some(net) = st.net.as_mut() {
            if let Some(old) = st.local {
                let _ = net.remove(&lo_vip(old));
            }
            if let Some(new) = d.local_vip {
                match net.add_with_mark(&lo_vip(new), drop_net::BACKEND_PROTO) {
                    Ok(_) => info!(vip = %new, "balancer: this node is a backend; VIP held on lo"),
                    Err(e) => warn!(vip = %new, error = %e, "balancer: cannot add the VIP on lo"),
                }
            }
        }
        st.local = d.local_vip;
    }
    st.last = Some(d.clone());
    let Some(lb) = st.lb.as_mut() else {
        return;
    };
    if st.decap != d.decap_from {
        match lb.set_decap_sources(&d.decap_from) {
            Ok(()) => {
                info!(from = ?d.decap_from, "balancer: IPIP frames from these members are taken apart here");
                st.decap = d.decap_from.clone();
            }
            Err(e) => warn!(error = %e, "balancer: cannot set the IPIP sources"),
        }
    }
    if st.mode.is_none() && !d.vips.is_empty() {
        let ifname = match (&st.interface, d.towards, st.net.as_mut()) {
            (Some(i), ..) => Some(i.clone()),
            (None, Some(peer), Some(net)) => net.interface_towards(IpAddr::V4(peer)).ok(),
            _ => None,
        };
        if let Some(ifname) = ifname {
            match lb.attach(&ifname, settings.mode) {
                Ok(m) => {
                    st.mode = Some(m);
                    st.interface = Some(ifname);
                }
                Err(e) => {
                    warn!(ifname, error = %e, "balancer: cannot attach");
                    st.error = Some(format!("attach to {ifname}: {e}"));
                }
            }
        }
    }
    // IPIP's limit: the MTU of the interface the balancer sends on, followed when it changes.
    if let (Some(ifname), Some(net), Some(lb)) =
        (st.interface.as_deref(), st.net.as_mut(), st.lb.as_mut())
        && let Ok(mtu) = net.mtu(ifname)
        && lb.ipip_mtu().ok() != Some(mtu)
    {
        match lb.set_ipip_mtu(mtu) {
            Ok(()) => info!(
                ifname,
                mtu, "balancer: IPIP packets must fit this MTU with their outer header"
            ),
            Err(e) => warn!(ifname, mtu, error = %e, "balancer: cannot set the IPIP MTU"),
        }
    }
    for (vip, served) in &d.vips {
        let program = if vip.addr.is_ipv6() && served.forward == Forward::Ipip {
            None
        } else {
            program(st.net.as_mut(), st.interface.as_deref(), d.me, served)
        };
        let Some(p) = program else {
            warn!(vip = %vip.addr, port = vip.port, "balancer: IPIP needs an IPv4 VIP, this node's IPv4 address and the balancer's interface; not programmed");
            continue;
        };
        let Some(lb) = st.lb.as_mut() else {
            return;
        };
        let same = st
            .applied
            .get(vip)
            .is_some_and(|a| a.forwarding == p.forwarding && a.backends == p.backends);
        if same {
            // Only what `lb ls` shows may have changed.
            st.applied.insert(*vip, p);
            continue;
        }
        let lbs: Vec<LbBackend> = p.backends.iter().map(|b| b.lb).collect();
        match lb.set_vip(*vip, p.forwarding, &lbs) {
            Ok(()) => {
                info!(vip = %vip.addr, port = vip.port, forward = served.forward.name(), backends = ?p.backends.iter().map(|b| (&b.node, b.lb.weight)).collect::<Vec<_>>(), waiting = ?p.waiting, "balancer: VIP programmed");
                st.applied.insert(*vip, p);
            }
            Err(e) => {
                warn!(vip = %vip.addr, port = vip.port, error = %e, "balancer: cannot program the VIP")
            }
        }
    }
    set_standby(st);
    let Some(lb) = st.lb.as_mut() else {
        return;
    };
    for vip in lb.vips() {
        if !d.vips.contains_key(&vip) {
            match lb.remove_vip(vip) {
                Ok(()) => {
                    info!(vip = %vip.addr, port = vip.port, "balancer: VIP no longer served");
                    st.applied.remove(&vip);
                }
                Err(e) => warn!(error = %e, "balancer: cannot remove a VIP"),
            }
        }
    }
}

/// Every programmed VIP address not held here goes to standby, the held one (if any) out of it.
fn set_standby(st: &mut State) {
    let (Some(holding), Some(lb)) = (st.holding, st.lb.as_mut()) else {
        return;
    };
    let addrs: BTreeSet<IpAddr> = lb
        .vips()
        .iter()
        .map(|v| v.addr)
        .chain(lb.standby().iter().copied())
        .collect();
    for addr in addrs {
        let standby = Some(addr) != holding;
        if lb.standby().contains(&addr) == standby {
            continue;
        }
        match lb.set_standby(addr, standby) {
            Ok(()) if standby => {
                info!(vip = %addr, "balancer: not holding the VIP; its frames go to this node's kernel")
            }
            Ok(()) => info!(vip = %addr, "balancer: holding the VIP; balancing its frames"),
            Err(e) => warn!(vip = %addr, error = %e, "balancer: cannot switch the VIP's standby"),
        }
    }
}

/// What to program for `served`. MAC rewrite: the backends as they are. IPIP: each backend's
/// MAC becomes its next hop's as this node routes it (this node's own interface MAC for
/// itself, so that the program passes its frames to the kernel); a backend whose next hop is
/// not resolved yet, or is out of another interface than the balancer's, is left out for now.
/// `None`: IPIP without this node's IPv4 address or the balancer's interface.
fn program(
    net: Option<&mut drop_net::Netlink>,
    interface: Option<&str>,
    me: Option<Ipv4Addr>,
    served: &Served,
) -> Option<Programmed> {
    let mut p = Programmed {
        forwarding: Forwarding::MacRewrite,
        backends: served.backends.clone(),
        via: BTreeMap::new(),
        waiting: BTreeMap::new(),
    };
    if served.forward == Forward::Mac {
        return Some(p);
    }
    let (Some(net), Some(ifname), Some(source)) = (net, interface, me) else {
        return None;
    };
    p.forwarding = Forwarding::Ipip { source };
    p.backends.clear();
    let own_mac = net.mac(ifname).ok()?;
    for b in &served.backends {
        let mut b = b.clone();
        if Some(b.lb.addr) == me {
            b.lb.mac = own_mac.0;
            p.backends.push(b);
            continue;
        }
        // A first resolution is waited for a little, so that a new VIP starts with its
        // backends.
        let mut hop = net.next_hop(b.lb.addr);
        for _ in 0..4 {
            if !matches!(&hop, Ok(h) if h.mac.is_none() && !h.local) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
            hop = net.next_hop(b.lb.addr);
        }
        match hop {
            Ok(h) if h.local => {
                b.lb.mac = own_mac.0;
                p.backends.push(b);
            }
            Ok(h) if h.ifname != ifname => {
                p.waiting.insert(
                    b.node.clone(),
                    format!(
                        "routed out of {} (not {ifname}, where the balancer is)",
                        h.ifname
                    ),
                );
            }
            Ok(drop_net::NextHop {
                via,
                mac: Some(mac),
                ..
            }) => {
                b.lb.mac = mac.0;
                p.via.insert(b.node.clone(), format!("{via} {mac}"));
                p.backends.push(b);
            }
            Ok(h) => {
                p.waiting.insert(
                    b.node.clone(),
                    format!("next hop {} not resolved yet", h.via),
                );
            }
            Err(e) => {
                p.waiting.insert(b.node.clone(), e.to_string());
            }
        }
    }
    for (node, why) in &p.waiting {
        warn!(node, why, "balancer: an IPIP backend is left out for now");
    }
    Some(p)
}

fn lo_vip(addr: IpAddr) -> Vip {
    Vip {
        ifname: "lo".into(),
        addr,
        prefix: if addr.is_ipv4() { 32 } else { 128 },
    }
}

fn proto_name(p: u8) -> &'static str {
    if p == 17 { "udp" } else { "tcp" }
}

fn status(st: &State) -> Value {
    let Some(lb) = st.lb.as_ref() else {
        return json!({ "error": st.error, "vips": [] });
    };
    let mut vips = Vec::new();
    for (vip, p) in &st.applied {
        let c = lb.vip_counters(*vip).unwrap_or_default();
        vips.push(VipStatus {
            vip: vip.addr.to_string(),
            port: vip.port,
            proto: proto_name(vip.proto),
            forward: match p.forwarding {
                Forwarding::MacRewrite => Forward::Mac.name(),
                Forwarding::Ipip { .. } => Forward::Ipip.name(),
            },
            backends: p
                .backends
                .iter()
                .map(|b| {
                    let (packets, bytes) = lb.backend_traffic(*vip, b.lb.addr).unwrap_or_default();
                    json!({
                        "node": b.node, "addr": b.lb.addr.to_string(), "weight": b.lb.weight,
                        "packets": packets, "bytes": bytes, "via": p.via.get(&b.node),
                    })
                })
                .collect(),
            waiting: p
                .waiting
                .iter()
                .map(|(node, why)| json!({ "node": node, "why": why }))
                .collect(),
            packets: c.packets,
            bytes: c.bytes,
            new_flows: c.new_flows,
            conn_hits: c.conn_hits,
            no_backend: c.no_backend,
        });
    }
    json!({
        "interface": st.interface,
        "mode": st.mode.map(|m| m.to_string()),
        "error": st.error,
        "flows": lb.flow_count().unwrap_or(0),
        "local_vip": st.local.map(|v| v.to_string()),
        "decapsulated": lb.stat(drop_net::LbStat::Decapsulated).unwrap_or(0),
        "ipip_mtu": lb.ipip_mtu().unwrap_or(0),
        "too_big": {
            "icmp": lb.stat(drop_net::LbStat::TooBigIcmp).unwrap_or(0),
            "dropped": lb.stat(drop_net::LbStat::TooBigDropped).unwrap_or(0),
        },
        "standby": lb.standby().iter().map(ToString::to_string).collect::<Vec<_>>(),
        "decap_from": st.decap.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "vips": vips,
    })
}

fn metrics(st: &State) -> String {
    use std::fmt::Write as _;
    let Some(lb) = st.lb.as_ref() else {
        return String::new();
    };
    let mut out = String::new();
    let series = [
        (
            "drop_lb_packets_total",
            "Frames forwarded to a backend, per VIP:port.",
        ),
        (
            "drop_lb_bytes_total",
            "Bytes forwarded to a backend, per VIP:port.",
        ),
        (
            "drop_lb_new_flows_total",
            "Flows placed by the Maglev ring, per VIP:port.",
        ),
        (
            "drop_lb_conn_hits_total",
            "Frames that found their flow in the connection table.",
        ),
        (
            "drop_lb_no_backend_total",
            "Frames dropped for want of a backend.",
        ),
    ];
    for (i, (name, help)) in series.iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for vip in st.applied.keys() {
            let c = lb.vip_counters(*vip).unwrap_or_default();
            let v = [c.packets, c.bytes, c.new_flows, c.conn_hits, c.no_backend][i];
            let _ = writeln!(
                out,
                "{name}{{vip=\"{}\",port=\"{}\",proto=\"{}\"}} {v}",
                vip.addr,
                vip.port,
                proto_name(vip.proto)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP drop_lb_decapsulated_total IPIP frames this node took apart as a routed backend.\n# TYPE drop_lb_decapsulated_total counter\ndrop_lb_decapsulated_total {}",
        lb.stat(drop_net::LbStat::Decapsulated).unwrap_or(0)
    );
    let _ = writeln!(
        out,
        "# HELP drop_lb_standby VIP addresses this node does not hold: programmed, their frames passed to the kernel.\n# TYPE drop_lb_standby gauge\ndrop_lb_standby {}",
        lb.standby().len()
    );
    let _ = writeln!(
        out,
        "# HELP drop_lb_backend_packets_total Frames sent to one backend of a VIP:port.\n# TYPE drop_lb_backend_packets_total counter"
    );
    for (vip, p) in &st.applied {
        for b in &p.backends {
            let (p, _) = lb.backend_traffic(*vip, b.lb.addr).unwrap_or_default();
            let _ = writeln!(
                out,
                "drop_lb_backend_packets_total{{vip=\"{}\",port=\"{}\",backend=\"{}\"}} {p}",
                vip.addr, vip.port, b.node
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::membership::MemberState;
    use crate::cluster::services::{InstanceView, ServiceView};
    use crate::services::spec::{Balance, Forward, Run, ServiceSpec};

    fn node(i: u8, state: MemberState) -> NodeView {
        NodeView {
            id: format!("0000000{i}-0000-4000-8000-000000000000"),
            name: format!("n{i}"),
            addr: format!("10.201.0.{}:7946", 10 + i).parse().unwrap(),
            state,
            namespace: Some("t".into()),
            leader: false,
            version: "0".into(),
            capacity: 100,
            peer: None,
            mac: Some(format!("02:00:00:00:00:0{}", i + 1)),
            pools: Vec::new(),
            systemd: Some(true),
            gateway: None,
            draining: false,
        }
    }

    fn instance(index: u32, node: u8, active: &str, surplus: bool) -> InstanceView {
        InstanceView {
            index,
            node: Some(format!("n{node}")),
            active: active.into(),
            sub: "running".into(),
            since_ms: 0,
            restarts: 0,
            surplus,
        }
    }

    fn ns(vip: Option<&str>, instances: Vec<InstanceView>, balance: Option<Balance>) -> NsView {
        let spec = ServiceSpec {
            name: "web".into(),
            count: 3,
            run: Run::Exec {
                argv: vec!["/bin/true".into()],
                memory_bytes: None,
                cpu: None,
                tasks: None,
                user: None,
                env: Default::default(),
                restart: "on-failure".into(),
            },
            balance,
        };
        NsView {
            name: "t".into(),
            vip: vip.map(str::to_string),
            health: None,
            members: Vec::new(),
            leader: None,
            leader_id: None,
            quorum: true,
            flows: Vec::new(),
            services: vec![ServiceView {
                name: "web".into(),
                namespace: "t".into(),
                count: 3,
                kind: "exec".into(),
                active: 0,
                instances,
                failures: Default::default(),
                spec,
            }],
            history: Vec::new(),
        }
    }

    /// Every node a member of the namespace, in its own state.
    fn members(nodes: &[NodeView]) -> Vec<crate::cluster::node::NsMember> {
        nodes
            .iter()
            .map(|n| crate::cluster::node::NsMember {
                id: n.id.clone(),
                name: n.name.clone(),
                state: n.state,
            })
            .collect()
    }

    const PORT: Option<Balance> = Some(Balance {
        port: 80,
        proto: 6,
        forward: Forward::Mac,
    });

    #[test]
    fn active_instances_are_backends_surplus_ones_drain_and_the_rest_are_left_out() {
        let nodes: Vec<NodeView> = (0..4)
            .map(|i| {
                node(
                    i,
                    if i == 3 {
                        MemberState::Dead
                    } else {
                        MemberState::Alive
                    },
                )
            })
            .collect();
        let view = ns(
            Some("10.201.0.100"),
            vec![
                instance(0, 0, "active", false),
                instance(1, 1, "activating", false),
                instance(2, 2, "active", true),
                instance(3, 3, "active", false),
            ],
            PORT,
        );
        let d = desired(&view, &nodes, "n0");
        let vip = LbVip {
            addr: "10.201.0.100".parse().unwrap(),
            port: 80,
            proto: 6,
        };
        let b: Vec<(&str, u32)> = d.vips[&vip]
            .backends
            .iter()
            .map(|b| (b.node.as_str(), b.lb.weight))
            .collect();
        // n1 not active yet, n2 surplus (drains), n3 dead.
        assert_eq!(b, vec![("n0", 1), ("n2", 0)]);
        assert_eq!(d.local_vip, Some("10.201.0.100".parse().unwrap()));
        assert!(
            d.towards
                .is_some_and(|t| t != "10.201.0.10".parse::<Ipv4Addr>().unwrap())
        );
        // The same inputs give the same ids on every node.
        let again = desired(&view, &nodes, "n1");
        assert_eq!(
            again.vips[&vip].backends[0].lb.id,
            d.vips[&vip].backends[0].lb.id
        );
        assert_eq!(again.local_vip, None);
    }

    #[test]
    fn the_gateway_port_goes_to_members_whose_gateway_listens_on_all_addresses_of_its_family() {
        let mut nodes: Vec<NodeView> = (0..3).map(|i| node(i, MemberState::Alive)).collect();
        nodes[0].gateway = Some("0.0.0.0:8081".parse().unwrap());
        nodes[1].gateway = Some("0.0.0.0:8081".parse().unwrap());
        nodes[2].gateway = Some("10.201.0.12:8081".parse().unwrap());
        let mut view = ns(Some("10.201.0.100"), Vec::new(), None);
        view.members = members(&nodes);
        let d = desired(&view, &nodes, "n1");
        let gw = LbVip {
            addr: "10.201.0.100".parse().unwrap(),
            port: 8081,
            proto: 6,
        };
        let b: Vec<&str> = d.vips[&gw]
            .backends
            .iter()
            .map(|b| b.node.as_str())
            .collect();
        assert_eq!(b, vec!["n0", "n1"]);
        assert!(d.local_vip.is_some());
        assert!(desired(&view, &nodes, "n2").local_vip.is_none());

        // A draining node stays a backend with weight 0: its flows finish, new ones go
        // elsewhere.
        nodes[0].draining = true;
        let d = desired(&view, &nodes, "n1");
        let b: Vec<(&str, u32)> = d.vips[&gw]
            .backends
            .iter()
            .map(|b| (b.node.as_str(), b.lb.weight))
            .collect();
        assert_eq!(b, vec![("n0", 0), ("n1", 1)]);

        // An IPv6 VIP's gateway port: only gateways on `[::]` take IPv6.
        nodes[0].draining = false;
        nodes[1].gateway = Some("[::]:8081".parse().unwrap());
        let view6 = NsView {
            vip: Some("fd00::64".into()),
            ..view
        };
        let d = desired(&view6, &nodes, "n0");
        let gw6 = LbVip {
            addr: "fd00::64".parse().unwrap(),
            ..gw
        };
        let b: Vec<&str> = d.vips[&gw6]
            .backends
            .iter()
            .map(|b| b.node.as_str())
            .collect();
        assert_eq!(b, vec!["n1"]);
    }

    #[test]
    fn a_draining_nodes_service_backend_gets_weight_0() {
        let mut nodes: Vec<NodeView> = (0..2).map(|i| node(i, MemberState::Alive)).collect();
        nodes[1].draining = true;
        let view = ns(
            Some("10.201.0.100"),
            vec![
                instance(0, 0, "active", false),
                instance(1, 1, "active", false),
            ],
            PORT,
        );
        let d = desired(&view, &nodes, "n0");
        let vip = LbVip {
            addr: "10.201.0.100".parse().unwrap(),
            port: 80,
            proto: 6,
        };
        let b: Vec<(&str, u32)> = d.vips[&vip]
            .backends
            .iter()
            .map(|b| (b.node.as_str(), b.lb.weight))
            .collect();
        assert_eq!(b, vec![("n0", 1), ("n1", 0)]);
    }

    #[test]
    fn no_port_or_no_vip_means_nothing_to_balance_and_an_ipv6_vip_is_balanced() {
        let nodes = vec![node(0, MemberState::Alive)];
        let inst = vec![instance(0, 0, "active", false)];
        assert!(
            desired(&ns(Some("10.201.0.100"), inst.clone(), None), &nodes, "n0")
                .vips
                .is_empty()
        );
        assert!(
            desired(&ns(None, inst.clone(), PORT), &nodes, "n0")
                .vips
                .is_empty()
        );
        let d = desired(&ns(Some("fd00::1"), inst, PORT), &nodes, "n0");
        let vip = LbVip {
            addr: "fd00::1".parse().unwrap(),
            port: 80,
            proto: 6,
        };
        assert_eq!(d.vips[&vip].backends.len(), 1);
        assert_eq!(d.local_vip, Some("fd00::1".parse().unwrap()));
        assert_eq!(lo_vip(d.local_vip.unwrap()).prefix, 128);
    }

    #[test]
    fn an_ipip_port_is_marked_and_its_backends_take_frames_apart_from_the_members() {
        let mut nodes: Vec<NodeView> = (0..3).map(|i| node(i, MemberState::Alive)).collect();
        nodes[2].state = MemberState::Dead;
        let mut view = ns(
            Some("10.201.0.100"),
            vec![
                instance(0, 0, "active", false),
                instance(1, 1, "active", false),
            ],
            Some(Balance {
                port: 80,
                proto: 6,
                forward: Forward::Ipip,
            }),
        );
        view.members = members(&nodes);
        let vip = LbVip {
            addr: "10.201.0.100".parse().unwrap(),
            port: 80,
            proto: 6,
        };
        let d = desired(&view, &nodes, "n1");
        assert_eq!(d.vips[&vip].forward, Forward::Ipip);
        assert_eq!(d.me, Some("10.201.0.11".parse().unwrap()));
        // A backend takes IPIP frames apart from every member that is up (any may hold the
        // VIP), itself included; the dead one is left out.
        let from: Vec<String> = d.decap_from.iter().map(ToString::to_string).collect();
        assert_eq!(from, vec!["10.201.0.10", "10.201.0.11"]);
        // A node that runs no instance takes nothing apart.
        assert!(desired(&view, &nodes, "n2").decap_from.is_empty());
        // MAC rewrite takes nothing apart either.
        view.services[0].spec.balance = PORT;
        assert!(desired(&view, &nodes, "n1").decap_from.is_empty());
    }
}
