//! The L4 balancer's loader: the `drop_lb` XDP program and its maps (layout and packet rules in
//! `drop_common::lb`).
//!
//! [`Balancer::set_vip`] programs one VIP: its backends get slots of the backend map, a new
//! Maglev ring is filled in user space (`drop_common::maglev`, backends repeated by weight,
//! weight 0 left out so that they drain) and written into the VIP's spare ring, and only then
//! does the VIP's entry switch to that ring — one map update, so no packet sees half a table.
//! Established flows keep their backend through the connection table while that backend is
//! present. Dropping the balancer detaches and unloads the program (the kernel frees the maps).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use aya::TestRun as _;
use aya::maps::{Array, HashMap, MapData, MapType, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{Xdp, xdp::XdpLink, xdp::XdpLinkId};
use aya::{Ebpf, EbpfLoader, TestRunOptions};
use drop_common::lb::{
    BACKEND_PRESENT, BACKEND_STATS_MAP, BACKENDS_MAP, Backend, CONF_MAP, CONF_SLOTS, Conf,
    DECAP_MAP, FLOWS_MAP, FLOWS6_MAP, FlowKey, FlowKey6, LB_PROGRAM, LB_STAT_SLOTS, LB_STATS_MAP,
    LbStat, MAX_BACKENDS, MAX_DECAP_SOURCES, MAX_FLOWS, MAX_RINGS, MAX_VIPS, NO_BACKEND, RING_SIZE,
    RINGS_MAP, Traffic, VIP_IPIP, VIP_STANDBY, VIP_STATS_MAP, VIPS_MAP, VIPS6_MAP, VipKey, VipKey6,
    VipMeta, VipStats,
};
use drop_common::maglev;
use tracing::{info, warn};

use crate::counter::{OBJECT, XdpError, XdpMode, XdpVerdict};

/// A VIP:port:proto the balancer serves (IPv4 or IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LbVip {
    pub addr: IpAddr,
    pub port: u16,
    /// 6 (TCP) or 17 (UDP).
    pub proto: u8,
}

/// A VIP's key in the map of its family.
enum Key {
    V4(VipKey),
    V6(VipKey6),
}

impl LbVip {
    fn key(&self) -> Key {
        match self.addr {
            IpAddr::V4(a) => Key::V4(VipKey {
                addr: a.octets(),
                port: self.port,
                proto: self.proto,
                _pad: 0,
            }),
            IpAddr::V6(a) => Key::V6(VipKey6 {
                addr: a.octets(),
                port: self.port,
                proto: self.proto,
                _pad: 0,
            }),
        }
    }
}

/// How a VIP's frames reach its backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Forwarding {
    /// Same segment: the destination MAC becomes the backend's (backends hold the VIP on `lo`).
    #[default]
    MacRewrite,
    /// Routed backends: IPIP from this source address; the backend's MAC is the next hop's.
    Ipip { source: Ipv4Addr },
}

/// One backend of a VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbBackend {
    /// A stable id (the same on every node for the same backend: it seeds its Maglev
    /// permutation, so every node computes the same ring).
    pub id: u64,
    pub addr: Ipv4Addr,
    pub mac: [u8; 6],
    /// Share of new flows; 0 drains (established flows stay).
    pub weight: u32,
}

/// Result of [`Balancer::test_run`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LbRun {
    pub verdict: XdpVerdict,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
    pub duration_ns: u64,
}

/// Counters of one VIP or the whole balancer, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbCounters {
    pub packets: u64,
    pub bytes: u64,
    pub conn_hits: u64,
    pub new_flows: u64,
    pub no_backend: u64,
}

#[derive(Debug)]
struct VipState {
    index: u32,
    ring: u32,
    forwarding: Forwarding,
    backends: Vec<LbBackend>,
}

/// The loaded balancer. See the module docs.
pub struct Balancer {
    ebpf: Ebpf,
    attached: Option<(String, XdpMode, XdpLinkId)>,
    /// Where maps and the link are pinned ([`Balancer::open`]); `None`: nothing outlives us.
    pin_dir: Option<PathBuf>,
    vips: BTreeMap<LbVip, VipState>,
    /// (VIP index, backend address) → its slot: slots are per VIP.
    slots: BTreeMap<(u32, Ipv4Addr), u32>,
    /// VIP addresses this node does not hold now ([`Balancer::set_standby`]).
    standby: BTreeSet<IpAddr>,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("vips", &self.vips.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> XdpError {
    move |source| XdpError::Map { name, source }
}

fn missing_map(name: &'static str) -> XdpError {
    XdpError::Missing { what: "map", name }
}

impl Balancer {
    /// Loads the embedded object and verifies `drop_lb`. Needs root.
    pub fn load() -> Result<Balancer, XdpError> {
        Ok(Balancer::new(load_with(&mut EbpfLoader::new())?, None))
    }

    fn new(ebpf: Ebpf, pin_dir: Option<PathBuf>) -> Balancer {
        Balancer {
            ebpf,
            attached: None,
            pin_dir,
            vips: BTreeMap::new(),
            slots: BTreeMap::new(),
            standby: BTreeSet::new(),
        }
    }

    /// Puts every VIP pinned in `dir` in standby ([`Balancer::set_standby`]), leaving the rest
    /// as it is: for a supervisor that died holding the floating IP, so that its still-attached
    /// program passes (instead of balancing again) what the new holder sends this node. The
    /// addresses put in standby; nothing pinned there is fine.
    pub fn standby_pinned(dir: &Path) -> Result<Vec<IpAddr>, XdpError> {
        if !dir.join(VIPS_MAP).exists() {
            return Ok(Vec::new());
        }
        let mut lb = Balancer::open(dir)?;
        let addrs: BTreeSet<IpAddr> = lb.vips().iter().map(|v| v.addr).collect();
        for a in &addrs {
            lb.set_standby(*a, true)?;
        }
        Ok(addrs.into_iter().collect())
    }

    /// [`Balancer::open`], and when what is pinned in `dir` cannot be taken over (another
    /// build's map layout), removes it and opens afresh: a node keeps balancing across such an
    /// upgrade and loses only its connection table, once. `true` when it started afresh.
    pub fn open_or_replace(dir: &Path) -> Result<(Balancer, bool), XdpError> {
        match Balancer::open(dir) {
            Ok(lb) => Ok((lb, false)),
            Err(e) if dir.exists() => {
                warn!(dir = %dir.display(), error = %e, "cannot take over the pinned balancer; removing it and starting afresh");
                Balancer::remove_pinned(dir)?;
                Ok((Balancer::open(dir)?, true))
            }
            Err(e) => Err(e),
        }
    }

    /// Loads `drop_lb` with its maps pinned in `dir` (on a bpffs): maps already pinned there
    /// are reused with their contents — VIPs, rings, backends, the connection table — and the
    /// balancer's own bookkeeping is read back from them, so a restarted supervisor carries on
    /// where the last one stopped. [`Balancer::attach`] then takes over a pinned link in one
    /// step. [`Balancer::remove_pinned`] undoes all of it.
    pub fn open(dir: &Path) -> Result<Balancer, XdpError> {
        std::fs::create_dir_all(dir).map_err(|source| XdpError::PinDir {
            dir: dir.to_path_buf(),
            source,
        })?;
        check_pinned_layout(dir)?;
        let paths: Vec<(&'static str, PathBuf)> =
            PINNED_MAPS.iter().map(|m| (*m, dir.join(m))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut lb = Balancer::new(load_with(&mut loader)?, Some(dir.to_path_buf()));
        lb.restore()?;
        Ok(lb)
    }

    /// Rebuilds the bookkeeping from the (pinned) maps.
    fn restore(&mut self) -> Result<(), XdpError> {
        let mut found: Vec<(LbVip, VipMeta)> = Vec::new();
        {
            let map = self.ebpf.map(VIPS_MAP).ok_or(missing_map(VIPS_MAP))?;
            let vips =
                HashMap::<&MapData, VipKey, VipMeta>::try_from(map).map_err(map_err(VIPS_MAP))?;
            for entry in vips.iter() {
                let (k, meta) = entry.map_err(map_err(VIPS_MAP))?;
                let addr = IpAddr::from(k.addr);
                found.push((
                    LbVip {
                        addr,
                        port: k.port,
                        proto: k.proto,
                    },
                    meta,
                ));
            }
            let map = self.ebpf.map(VIPS6_MAP).ok_or(missing_map(VIPS6_MAP))?;
            let vips =
                HashMap::<&MapData, VipKey6, VipMeta>::try_from(map).map_err(map_err(VIPS6_MAP))?;
            for entry in vips.iter() {
                let (k, meta) = entry.map_err(map_err(VIPS6_MAP))?;
                found.push((
                    LbVip {
                        addr: IpAddr::from(k.addr),
                        port: k.port,
                        proto: k.proto,
                    },
                    meta,
                ));
            }
        }
        for (vip, meta) in found {
            if meta.flags & VIP_STANDBY != 0 {
                self.standby.insert(vip.addr);
            }
            self.vips.insert(
                vip,
                VipState {
                    index: meta.index,
                    ring: meta.ring,
                    forwarding: if meta.flags & VIP_IPIP != 0 {
                        Forwarding::Ipip {
                            source: Ipv4Addr::from(meta.ipip_src),
                        }
                    } else {
                        Forwarding::MacRewrite
                    },
                    backends: Vec::new(),
                },
            );
        }
        let map = self
            .ebpf
            .map(BACKENDS_MAP)
            .ok_or(missing_map(BACKENDS_MAP))?;
        let backs = Array::<&MapData, Backend>::try_from(map).map_err(map_err(BACKENDS_MAP))?;
        for slot in 0..MAX_BACKENDS {
            let b = backs.get(&slot, 0).map_err(map_err(BACKENDS_MAP))?;
            if !b.present() {
                continue;
            }
            let addr = Ipv4Addr::from(b.addr);
            self.slots.insert((b.vip, addr), slot);
            if let Some(v) = self.vips.values_mut().find(|v| v.index == b.vip) {
                v.backends.push(LbBackend {
                    id: 0,
                    addr,
                    mac: b.mac,
                    weight: 1,
                });
            }
        }
        if !self.vips.is_empty() {
            info!(
                vips = self.vips.len(),
                backends = self.slots.len(),
                "xdp balancer state read back from its pinned maps"
            );
        }
        Ok(())
    }

    /// The VIPs served now.
    pub fn vips(&self) -> Vec<LbVip> {
        self.vips.keys().copied().collect()
    }

    /// Removes what [`Balancer::open`] and a pinned attachment left in `dir`: the link (which
    /// detaches the program once nothing else holds it) and the maps. Nothing there is fine.
    pub fn remove_pinned(dir: &Path) -> Result<bool, XdpError> {
        if !dir.exists() {
            return Ok(false);
        }
        let link = dir.join(LINK_PIN);
        if link.exists()
            && let Ok(pinned) = PinnedLink::from_pin(&link)
        {
            // Unpinned and dropped: the last reference to the link goes, the program detaches.
            let _ = pinned.unpin();
        }
        std::fs::remove_dir_all(dir).map_err(|source| XdpError::PinDir {
            dir: dir.to_path_buf(),
            source,
        })?;
        info!(dir = %dir.display(), "xdp balancer pins removed");
        Ok(true)
    }

    /// Attaches to `ifname` of the calling thread's network namespace. `Auto` tries the
    /// driver (native) first and falls back to generic, saying so in the log.
    pub fn attach(&mut self, ifname: &str, mode: XdpMode) -> Result<XdpMode, XdpError> {
        if let Some((current, ..)) = &self.attached {
            return Err(XdpError::AlreadyAttached {
                ifname: current.clone(),
            });
        }
        let tries: &[XdpMode] = match mode {
            XdpMode::Auto => &[XdpMode::Native, XdpMode::Generic],
            XdpMode::Native => &[XdpMode::Native],
            XdpMode::Generic => &[XdpMode::Generic],
        };
        // A link a previous supervisor pinned: this program replaces its program in one step,
        // so forwarding never stops.
        if let Some(dir) = &self.pin_dir
            && dir.join(LINK_PIN).exists()
        {
            let pinned = PinnedLink::from_pin(dir.join(LINK_PIN))
                .map_err(|e| XdpError::Pin(e.to_string()))?;
            let link = XdpLink::try_from(FdLink::from(pinned))
                .map_err(|e| XdpError::Pin(e.to_string()))?;
            let id = program_mut(&mut self.ebpf)?
                .attach_to_link(link)
                .map_err(|source| XdpError::Program {
                    action: "taking over the pinned link of",
                    source,
                })?;
            let m = std::fs::read_to_string(dir.join(MODE_PIN))
                .ok()
                .and_then(|t| match t.trim() {
                    "native" => Some(XdpMode::Native),
                    "generic" => Some(XdpMode::Generic),
                    _ => None,
                })
                .unwrap_or(mode);
            info!(ifname, mode = %m, "xdp balancer took over its pinned link");
            self.attached = Some((ifname.to_string(), m, id));
            return Ok(m);
        }
        let mut last = None;
        for &m in tries {
            match program_mut(&mut self.ebpf)?.attach(ifname, m.to_aya()) {
                Ok(link) => {
                    info!(ifname, mode = %m, "xdp balancer attached");
                    let link = self.pin_link(link, m)?;
                    self.attached = Some((ifname.to_string(), m, link));
                    return Ok(m);
                }
                Err(source) => {
                    if m == XdpMode::Native && mode == XdpMode::Auto {
                        warn!(ifname, error = %source, "native XDP refused; falling back to generic");
                    }
                    last = Some(XdpError::Attach {
                        ifname: ifname.to_string(),
                        mode: m,
                        source,
                    });
                }
            }
        }
        Err(last.expect("at least one mode tried"))
    }

    /// With a pin folder: pins the new link there (it outlives this process) and hands it back
    /// to the program.
    fn pin_link(&mut self, link: XdpLinkId, mode: XdpMode) -> Result<XdpLinkId, XdpError> {
        let Some(dir) = self.pin_dir.clone() else {
            return Ok(link);
        };
        let prog = program_mut(&mut self.ebpf)?;
        let owned = prog.take_link(link).map_err(|source| XdpError::Program {
            action: "taking the link of",
            source,
        })?;
        let fd = FdLink::try_from(owned).map_err(|e| XdpError::Pin(e.to_string()))?;
        let pinned = fd
            .pin(dir.join(LINK_PIN))
            .map_err(|e| XdpError::Pin(e.to_string()))?;
        let _ = std::fs::write(dir.join(MODE_PIN), mode.to_string());
        let link =
            XdpLink::try_from(FdLink::from(pinned)).map_err(|e| XdpError::Pin(e.to_string()))?;
        program_mut(&mut self.ebpf)?
            .attach_to_link(link)
            .map_err(|source| XdpError::Program {
                action: "re-adopting the pinned link of",
                source,
            })
    }

    /// Detaches (and removes the link's pin); nothing when not attached.
    pub fn detach(&mut self) -> Result<(), XdpError> {
        let Some((ifname, _, link)) = self.attached.take() else {
            return Ok(());
        };
        if let Some(dir) = &self.pin_dir {
            let _ = std::fs::remove_file(dir.join(LINK_PIN));
            let _ = std::fs::remove_file(dir.join(MODE_PIN));
        }
        program_mut(&mut self.ebpf)?
            .detach(link)
            .map_err(|source| XdpError::Program {
                action: "detaching",
                source,
            })?;
        info!(ifname, "xdp balancer detached");
        Ok(())
    }

    /// Serves `vip` with `backends` (replacing what it had). An empty list, or only weight-0
    /// backends, leaves new flows nowhere to go: they are dropped and counted.
    pub fn set_vip(
        &mut self,
        vip: LbVip,
        forwarding: Forwarding,
        backends: &[LbBackend],
    ) -> Result<(), XdpError> {
        if vip.addr.is_ipv6() && matches!(forwarding, Forwarding::Ipip { .. }) {
            return Err(XdpError::Unsupported(format!(
                "IPIP for the IPv6 VIP {}:{} (IPv6 VIPs are forwarded by MAC rewrite)",
                vip.addr, vip.port
            )));
        }
        let (index, ring) = match self.vips.get(&vip) {
            Some(s) => (s.index, s.ring),
            None => {
                let used: BTreeSet<u32> = self.vips.values().map(|s| s.index).collect();
                let index = (0..MAX_VIPS)
                    .find(|i| !used.contains(i))
                    .ok_or(XdpError::Full { what: "VIP" })?;
                (index, index * 2 + 1)
            }
        };
        // Backend slots: every backend of this VIP present, with its address and MAC.
        for b in backends {
            let slot = match self.slots.get(&(index, b.addr)) {
                Some(s) => *s,
                None => {
                    let used: BTreeSet<u32> = self.slots.values().copied().collect();
                    let s = (0..MAX_BACKENDS)
                        .find(|i| !used.contains(i))
                        .ok_or(XdpError::Full { what: "backend" })?;
                    self.slots.insert((index, b.addr), s);
                    s
                }
            };
            self.write_backend(
                slot,
                Backend {
                    addr: b.addr.octets(),
                    mac: b.mac,
                    _pad: [0; 2],
                    flags: BACKEND_PRESENT,
                    vip: index,
                },
            )?;
        }
        // The new ring, into the spare ring of this VIP.
        let spare = if ring == index * 2 {
            index * 2 + 1
        } else {
            index * 2
        };
        let table = self.ring_for(index, backends)?;
        {
            let map = self.ebpf.map_mut(RINGS_MAP).ok_or(missing_map(RINGS_MAP))?;
            let mut rings =
                Array::<&mut MapData, u32>::try_from(map).map_err(map_err(RINGS_MAP))?;
            let base = spare * RING_SIZE;
            for (i, v) in table.iter().enumerate() {
                rings
                    .set(base + i as u32, v, 0)
                    .map_err(map_err(RINGS_MAP))?;
            }
        }
        // One update switches the VIP to it.
        self.write_vip(vip, spare, index, forwarding)?;
        self.vips.insert(
            vip,
            VipState {
                index,
                ring: spare,
                forwarding,
                backends: backends.to_vec(),
            },
        );
        self.release_unused_backends()?;
        Ok(())
    }

    /// The VIP's map entry: its ring, slot, forwarding and standby flag.
    fn write_vip(
        &mut self,
        vip: LbVip,
        ring: u32,
        index: u32,
        forwarding: Forwarding,
    ) -> Result<(), XdpError> {
        let (mut flags, ipip_src) = match forwarding {
            Forwarding::MacRewrite => (0, [0; 4]),
            Forwarding::Ipip { source } => (VIP_IPIP, source.octets()),
        };
        if self.standby.contains(&vip.addr) {
            flags |= VIP_STANDBY;
        }
        let meta = VipMeta {
            ring,
            index,
            flags,
            ipip_src,
        };
        match vip.key() {
            Key::V4(k) => {
                let map = self.ebpf.map_mut(VIPS_MAP).ok_or(missing_map(VIPS_MAP))?;
                HashMap::<&mut MapData, VipKey, VipMeta>::try_from(map)
                    .and_then(|mut m| m.insert(k, meta, 0))
                    .map_err(map_err(VIPS_MAP))
            }
            Key::V6(k) => {
                let map = self.ebpf.map_mut(VIPS6_MAP).ok_or(missing_map(VIPS6_MAP))?;
                HashMap::<&mut MapData, VipKey6, VipMeta>::try_from(map)
                    .and_then(|mut m| m.insert(k, meta, 0))
                    .map_err(map_err(VIPS6_MAP))
            }
        }
    }

    /// Whether this node holds VIP address `addr` now. Not holding it (`standby`), its VIP:ports
    /// stay programmed (ring, backends, connection table) but their frames go to the kernel: on
    /// a node that is also a backend, the frames the holder sent. Taking the address over flips
    /// one map entry per VIP:port. A new balancer holds every address until told otherwise.
    pub fn set_standby(&mut self, addr: IpAddr, standby: bool) -> Result<(), XdpError> {
        let changed = if standby {
            self.standby.insert(addr)
        } else {
            self.standby.remove(&addr)
        };
        if !changed {
            return Ok(());
        }
        let entries: Vec<(LbVip, u32, u32, Forwarding)> = self
            .vips
            .iter()
            .filter(|(v, _)| v.addr == addr)
            .map(|(v, s)| (*v, s.ring, s.index, s.forwarding))
            .collect();
        for (vip, ring, index, forwarding) in entries {
            self.write_vip(vip, ring, index, forwarding)?;
        }
        Ok(())
    }

    /// The MTU of the interface the balancer sends on: an IPIP VIP's packet that does not fit
    /// it with the outer header is answered with ICMP "fragmentation needed" (DF) or dropped.
    /// 0: not checked. Below 68 (IPv4's minimum) is refused.
    pub fn set_ipip_mtu(&mut self, mtu: u32) -> Result<(), XdpError> {
        if mtu != 0 && mtu < 68 {
            return Err(XdpError::Mtu(mtu));
        }
        let map = self.ebpf.map_mut(CONF_MAP).ok_or(missing_map(CONF_MAP))?;
        let mut conf = Array::<&mut MapData, u32>::try_from(map).map_err(map_err(CONF_MAP))?;
        conf.set(Conf::IpipMtu.index(), mtu, 0)
            .map_err(map_err(CONF_MAP))
    }

    /// What [`Balancer::set_ipip_mtu`] set.
    pub fn ipip_mtu(&self) -> Result<u32, XdpError> {
        let map = self.ebpf.map(CONF_MAP).ok_or(missing_map(CONF_MAP))?;
        let conf = Array::<&MapData, u32>::try_from(map).map_err(map_err(CONF_MAP))?;
        conf.get(&Conf::IpipMtu.index(), 0)
            .map_err(map_err(CONF_MAP))
    }

    /// The VIP addresses in standby.
    pub fn standby(&self) -> &BTreeSet<IpAddr> {
        &self.standby
    }

    /// The balancer addresses whose IPIP frames to a VIP with [`Forwarding::Ipip`] this node
    /// takes the encapsulation off (it is a routed backend): exactly `sources` from now on.
    pub fn set_decap_sources(&mut self, sources: &BTreeSet<Ipv4Addr>) -> Result<(), XdpError> {
        if sources.len() > MAX_DECAP_SOURCES as usize {
            return Err(XdpError::Full {
                what: "decapsulation source",
            });
        }
        let map = self.ebpf.map_mut(DECAP_MAP).ok_or(missing_map(DECAP_MAP))?;
        let mut decap =
            HashMap::<&mut MapData, [u8; 4], u32>::try_from(map).map_err(map_err(DECAP_MAP))?;
        let old: Vec<[u8; 4]> = decap.keys().filter_map(Result::ok).collect();
        for a in sources {
            decap.insert(a.octets(), 1, 0).map_err(map_err(DECAP_MAP))?;
        }
        for a in old {
            if !sources.contains(&Ipv4Addr::from(a)) {
                match decap.remove(&a) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => return Err(map_err(DECAP_MAP)(e)),
                }
            }
        }
        Ok(())
    }

    /// The addresses [`Balancer::set_decap_sources`] set (read from the map).
    pub fn decap_sources(&self) -> Result<BTreeSet<Ipv4Addr>, XdpError> {
        let map = self.ebpf.map(DECAP_MAP).ok_or(missing_map(DECAP_MAP))?;
        let decap = HashMap::<&MapData, [u8; 4], u32>::try_from(map).map_err(map_err(DECAP_MAP))?;
        Ok(decap
            .keys()
            .filter_map(Result::ok)
            .map(Ipv4Addr::from)
            .collect())
    }

    /// How `vip` is forwarded, if it is served.
    pub fn forwarding(&self, vip: LbVip) -> Option<Forwarding> {
        self.vips.get(&vip).map(|s| s.forwarding)
    }

    /// Stops serving `vip` (its frames pass to the kernel again).
    pub fn remove_vip(&mut self, vip: LbVip) -> Result<(), XdpError> {
        if self.vips.remove(&vip).is_none() {
            return Ok(());
        }
        let removed = match vip.key() {
            Key::V4(k) => {
                let map = self.ebpf.map_mut(VIPS_MAP).ok_or(missing_map(VIPS_MAP))?;
                HashMap::<&mut MapData, VipKey, VipMeta>::try_from(map)
                    .and_then(|mut m| m.remove(&k))
                    .map_err(|e| (VIPS_MAP, e))
            }
            Key::V6(k) => {
                let map = self.ebpf.map_mut(VIPS6_MAP).ok_or(missing_map(VIPS6_MAP))?;
                HashMap::<&mut MapData, VipKey6, VipMeta>::try_from(map)
                    .and_then(|mut m| m.remove(&k))
                    .map_err(|e| (VIPS6_MAP, e))
            }
        };
        match removed {
            Ok(()) | Err((_, aya::maps::MapError::KeyNotFound)) => {}
            Err((name, e)) => return Err(map_err(name)(e)),
        }
        self.release_unused_backends()
    }

    fn ring_for(&self, index: u32, backends: &[LbBackend]) -> Result<Vec<u32>, XdpError> {
        let entries: Vec<(u64, u32, u32)> = backends
            .iter()
            .map(|b| (b.id, b.weight, self.slots[&(index, b.addr)]))
            .collect();
        maglev_ring(&entries).map_err(|e| XdpError::Maglev(format!("{e:?}")))
    }

    /// Slots no VIP uses any more are marked absent (their flows re-hash) and freed.
    fn release_unused_backends(&mut self) -> Result<(), XdpError> {
        let used: BTreeSet<(u32, Ipv4Addr)> = self
            .vips
            .values()
            .flat_map(|v| v.backends.iter().map(|b| (v.index, b.addr)))
            .collect();
        let gone: Vec<((u32, Ipv4Addr), u32)> = self
            .slots
            .iter()
            .filter(|(k, _)| !used.contains(k))
            .map(|(k, s)| (*k, *s))
            .collect();
        for (key, slot) in gone {
            self.write_backend(slot, Backend::default())?;
            self.slots.remove(&key);
        }
        Ok(())
    }

    fn write_backend(&mut self, slot: u32, b: Backend) -> Result<(), XdpError> {
        let map = self
            .ebpf
            .map_mut(BACKENDS_MAP)
            .ok_or(missing_map(BACKENDS_MAP))?;
        let mut backs =
            Array::<&mut MapData, Backend>::try_from(map).map_err(map_err(BACKENDS_MAP))?;
        backs.set(slot, b, 0).map_err(map_err(BACKENDS_MAP))
    }

    /// The backend slot the connection table holds for a flow, if any.
    pub fn flow(&self, flow: &FlowKey) -> Result<Option<Ipv4Addr>, XdpError> {
        let map = self.ebpf.map(FLOWS_MAP).ok_or(missing_map(FLOWS_MAP))?;
        let flows = HashMap::<&MapData, FlowKey, u32>::try_from(map).map_err(map_err(FLOWS_MAP))?;
        match flows.get(flow, 0) {
            Ok(slot) => Ok(self
                .slots
                .iter()
                .find(|(_, s)| **s == slot)
                .map(|((_, a), _)| *a)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(FLOWS_MAP)(e)),
        }
    }

    /// Entries in the connection tables (IPv4 and IPv6).
    pub fn flow_count(&self) -> Result<usize, XdpError> {
        let map = self.ebpf.map(FLOWS_MAP).ok_or(missing_map(FLOWS_MAP))?;
        let flows = HashMap::<&MapData, FlowKey, u32>::try_from(map).map_err(map_err(FLOWS_MAP))?;
        let map = self.ebpf.map(FLOWS6_MAP).ok_or(missing_map(FLOWS6_MAP))?;
        let flows6 =
            HashMap::<&MapData, FlowKey6, u32>::try_from(map).map_err(map_err(FLOWS6_MAP))?;
        Ok(
            flows.keys().filter(Result::is_ok).count()
                + flows6.keys().filter(Result::is_ok).count(),
        )
    }

    /// One global counter, summed over CPUs.
    pub fn stat(&self, stat: LbStat) -> Result<u64, XdpError> {
        let map = self
            .ebpf
            .map(LB_STATS_MAP)
            .ok_or(missing_map(LB_STATS_MAP))?;
        let arr = PerCpuArray::<&MapData, u64>::try_from(map).map_err(map_err(LB_STATS_MAP))?;
        Ok(arr
            .get(&stat.index(), 0)
            .map_err(map_err(LB_STATS_MAP))?
            .iter()
            .sum())
    }

    /// `vip`'s counters, summed over CPUs.
    pub fn vip_counters(&self, vip: LbVip) -> Result<LbCounters, XdpError> {
        let Some(state) = self.vips.get(&vip) else {
            return Ok(LbCounters::default());
        };
        let map = self
            .ebpf
            .map(VIP_STATS_MAP)
            .ok_or(missing_map(VIP_STATS_MAP))?;
        let arr =
            PerCpuArray::<&MapData, VipStats>::try_from(map).map_err(map_err(VIP_STATS_MAP))?;
        let mut c = LbCounters::default();
        for v in arr
            .get(&state.index, 0)
            .map_err(map_err(VIP_STATS_MAP))?
            .iter()
        {
            c.packets += v.packets;
            c.bytes += v.bytes;
            c.conn_hits += v.conn_hits;
            c.new_flows += v.new_flows;
            c.no_backend += v.no_backend;
        }
        Ok(c)
    }

    /// Packets and bytes `vip` sent to its backend at `addr`, summed over CPUs.
    pub fn backend_traffic(&self, vip: LbVip, addr: Ipv4Addr) -> Result<(u64, u64), XdpError> {
        let Some(slot) = self
            .vips
            .get(&vip)
            .and_then(|v| self.slots.get(&(v.index, addr)))
        else {
            return Ok((0, 0));
        };
        let map = self
            .ebpf
            .map(BACKEND_STATS_MAP)
            .ok_or(missing_map(BACKEND_STATS_MAP))?;
        let arr =
            PerCpuArray::<&MapData, Traffic>::try_from(map).map_err(map_err(BACKEND_STATS_MAP))?;
        let per_cpu = arr.get(slot, 0).map_err(map_err(BACKEND_STATS_MAP))?;
        Ok(per_cpu
            .iter()
            .fold((0, 0), |(p, b), t| (p + t.packets, b + t.bytes)))
    }

    /// Runs `drop_lb` on `frame` (`repeat` times) with `BPF_PROG_TEST_RUN`: the verdict and the
    /// frame as the program left it.
    pub fn test_run(&self, frame: &[u8], repeat: u32) -> Result<LbRun, XdpError> {
        if frame.len() < drop_common::ETH_HLEN {
            return Err(XdpError::FrameTooShort { len: frame.len() });
        }
        let program: &Xdp = self
            .ebpf
            .program(LB_PROGRAM)
            .ok_or(MISSING)?
            .try_into()
            .map_err(|source| XdpError::Program {
                action: "looking up",
                source,
            })?;
        // Room for an encapsulation header.
        let mut out = vec![0u8; frame.len() + 64];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: repeat.max(1),
            ..Default::default()
        };
        let result = program.test_run(opts).map_err(|source| XdpError::Program {
            action: "test-running",
            source,
        })?;
        out.truncate(result.data_size_out as usize);
        Ok(LbRun {
            verdict: XdpVerdict::from(result.return_value),
            frame: out,
            duration_ns: u64::try_from(result.duration.as_nanos()).unwrap_or(u64::MAX),
        })
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        // Pinned: the link stays (a restarted supervisor takes it over); else detach.
        if self.pin_dir.is_some() {
            return;
        }
        if let Err(err) = self.detach() {
            warn!(error = %err, "detaching the xdp balancer on drop");
        }
    }
}

/// The maps pinned by [`Balancer::open`].
const PINNED_MAPS: [&str; 11] = [
    VIPS_MAP,
    VIPS6_MAP,
    FLOWS6_MAP,
    DECAP_MAP,
    CONF_MAP,
    RINGS_MAP,
    BACKENDS_MAP,
    FLOWS_MAP,
    VIP_STATS_MAP,
    BACKEND_STATS_MAP,
    LB_STATS_MAP,
];
/// Each pinned map's type, key size, value size and entries, as this build defines them
/// (`drop_common::lb`). aya reuses a pinned map by name without comparing them, and the verifier
/// only refuses a value too small for the program's reads; a map another build pinned with
/// another layout must not be read as ours.
fn expected_layout(name: &str) -> Option<(MapType, usize, usize, u32)> {
    use std::mem::size_of;
    Some(match name {
        VIPS_MAP => (
            MapType::Hash,
            size_of::<VipKey>(),
            size_of::<VipMeta>(),
            MAX_VIPS,
        ),
        DECAP_MAP => (MapType::Hash, 4, 4, MAX_DECAP_SOURCES),
        CONF_MAP => (MapType::Array, 4, 4, CONF_SLOTS),
        RINGS_MAP => (MapType::Array, 4, 4, MAX_RINGS * RING_SIZE),
        BACKENDS_MAP => (MapType::Array, 4, size_of::<Backend>(), MAX_BACKENDS),
        FLOWS_MAP => (MapType::LruHash, size_of::<FlowKey>(), 4, MAX_FLOWS),
        VIPS6_MAP => (
            MapType::Hash,
            size_of::<VipKey6>(),
            size_of::<VipMeta>(),
            MAX_VIPS,
        ),
        FLOWS6_MAP => (MapType::LruHash, size_of::<FlowKey6>(), 4, MAX_FLOWS),
        VIP_STATS_MAP => (MapType::PerCpuArray, 4, size_of::<VipStats>(), MAX_VIPS),
        BACKEND_STATS_MAP => (MapType::PerCpuArray, 4, size_of::<Traffic>(), MAX_BACKENDS),
        LB_STATS_MAP => (MapType::PerCpuArray, 4, 8, LB_STAT_SLOTS),
        _ => return None,
    })
}

/// Every map pinned in `dir` has this build's layout ([`expected_layout`]); maps not pinned
/// yet are fine.
fn check_pinned_layout(dir: &Path) -> Result<(), XdpError> {
    for name in PINNED_MAPS {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapData::from_pin(&path)
            .and_then(|m| m.info())
            .map_err(map_err(name))?;
        let Some((kind, key, value, entries)) = expected_layout(name) else {
            continue;
        };
        let found = (
            info.map_type().ok(),
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        if found != (Some(kind), key, value, entries) {
            return Err(XdpError::PinnedLayout(format!(
                "{} has another layout (type {:?}, key {} B, value {} B, {} entries; this build: {kind:?}, {key} B, {value} B, {entries})",
                path.display(),
                found.0,
                found.1,
                found.2,
                found.3
            )));
        }
    }
    Ok(())
}

/// File of the pinned XDP link in the pin folder.
const LINK_PIN: &str = "link";
/// The mode it was attached in (plain text).
const MODE_PIN: &str = "mode";

/// Most turns one backend takes in the ring (weights above count as this).
pub const MAX_WEIGHT: u32 = 100;

/// A VIP's ring: `(id, weight, slot)` per backend → the slot of every ring entry. Maglev over
/// the backends with weight > 0, each taking `weight` turns (distinct permutations derived from
/// its id), so its share of new flows follows its weight; weight-0 backends are left out (they
/// drain). Every node computes the same ring from the same ids and weights. No backend with
/// weight: every entry is [`NO_BACKEND`].
pub fn maglev_ring(entries: &[(u64, u32, u32)]) -> Result<Vec<u32>, maglev::MaglevError> {
    let mut ids = Vec::new();
    let mut owner = Vec::new();
    for &(id, weight, slot) in entries {
        for k in 0..weight.min(MAX_WEIGHT) {
            ids.push(maglev::mix64(id ^ (u64::from(k) << 48)));
            owner.push(slot);
        }
    }
    if ids.is_empty() {
        return Ok(vec![NO_BACKEND; RING_SIZE as usize]);
    }
    let mut table = vec![0u16; RING_SIZE as usize];
    let mut next = vec![0u32; ids.len()];
    maglev::fill(&ids, &mut table, &mut next)?;
    Ok(table.iter().map(|i| owner[usize::from(*i)]).collect())
}

const MISSING: XdpError = XdpError::Missing {
    what: "program",
    name: LB_PROGRAM,
};

/// The embedded object through `loader`, with `drop_lb` verified and loaded.
fn load_with(loader: &mut EbpfLoader<'_>) -> Result<Ebpf, XdpError> {
    if OBJECT.is_empty() {
        return Err(XdpError::NotBuilt);
    }
    let mut ebpf = loader.load(OBJECT).map_err(XdpError::Load)?;
    program_mut(&mut ebpf)?
        .load()
        .map_err(|source| XdpError::Program {
            action: "verifying and loading",
            source,
        })?;
    Ok(ebpf)
}

fn program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, XdpError> {
    ebpf.program_mut(LB_PROGRAM)
        .ok_or(MISSING)?
        .try_into()
        .map_err(|source| XdpError::Program {
            action: "looking up",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(ring: &[u32]) -> BTreeMap<u32, usize> {
        let mut m = BTreeMap::new();
        for s in ring {
            *m.entry(*s).or_default() += 1;
        }
        m
    }

    #[test]
    fn weights_set_the_shares_and_weight_zero_drains() {
        let ring = maglev_ring(&[(1, 1, 10), (2, 3, 20), (3, 0, 30)]).unwrap();
        let s = shares(&ring);
        assert!(!s.contains_key(&30), "a weight-0 backend got slots: {s:?}");
        let (a, b) = (s[&10] as f64, s[&20] as f64);
        assert!((b / a - 3.0).abs() < 0.1, "weights 1:3 gave {a}:{b}");
    }

    #[test]
    fn no_weighted_backend_means_no_backend_and_rings_are_deterministic() {
        let none = maglev_ring(&[(1, 0, 10)]).unwrap();
        assert!(none.iter().all(|s| *s == NO_BACKEND));
        let e = [(7, 1, 1), (8, 1, 2), (9, 2, 3)];
        assert_eq!(maglev_ring(&e).unwrap(), maglev_ring(&e).unwrap());
    }

    #[test]
    fn draining_one_backend_moves_only_its_slots() {
        let before = maglev_ring(&[(1, 1, 1), (2, 1, 2), (3, 1, 3), (4, 1, 4)]).unwrap();
        let after = maglev_ring(&[(1, 1, 1), (2, 1, 2), (3, 0, 3), (4, 1, 4)]).unwrap();
        let moved_others = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != 3 && b != a)
            .count();
        // Maglev's minimal disruption: a few percent of the others' slots at most.
        assert!(
            moved_others < RING_SIZE as usize / 20,
            "{moved_others} other slots moved"
        );
    }
}
