//! The floating-IP agent: one OS thread per daemon that runs the [`protocol`](super::protocol)
//! over UDP for this node's namespace and carries out its decisions through the network seam
//! ([`drop_net::VipNet`]): add the address, announce it, remove it.
//!
//! Its own thread (not a tokio task) because it works on a deadline of tens of milliseconds and
//! must not wait behind a busy runtime, and because the seam is synchronous. The cluster feeds
//! it a [`Plan`] after every reconcile pass; the health task feeds it verdicts; the API reads
//! its [`VipStatus`].

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use drop_net::{Mac, Vip, VipNet};
use serde::Serialize;
use tracing::{debug, error, info, warn};

use super::protocol::{Id, Machine, Output, ReleaseReason, Role};
use super::wire::{self, Envelope, Replay, VipKey};
use super::{Plan, VipSettings};
use crate::cluster::state::physical_now_ms;

/// The longest the thread sleeps before looking at its inputs again.
const POLL_MAX: Duration = Duration::from_millis(20);
/// After a failed add, this node stays out of elections for this long.
const NET_FAULT_BACKOFF: Duration = Duration::from_secs(5);

/// What `dropctl vip show` prints for this node's namespace.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct VipStatus {
    pub namespace: String,
    pub address: String,
    pub interface: Option<String>,
    /// `holder`, `follower` or `candidate` (this node's part).
    pub role: String,
    pub holder: Option<String>,
    pub holder_id: Option<String>,
    pub holder_mac: Option<String>,
    /// Since when the current holder holds it, as this node saw it (Unix ms).
    pub since_unix_ms: Option<u64>,
    pub term: u64,
    pub garps_sent: u64,
    pub conflicts_seen: u64,
    pub last_conflict_mac: Option<String>,
    /// Holder changes this node saw.
    pub moves: u64,
    pub last_release: Option<String>,
    pub health: HealthStatus,
    /// Members this node hears on the fast path (names).
    pub heard: Vec<String>,
    /// The last error of the network seam, if any.
    pub error: Option<String>,
    /// Holder changes and releases this node saw, newest last (at most [`EVENTS`]).
    #[serde(default)]
    pub events: Vec<VipEvent>,
}

/// One thing that happened to the floating IP, for the status page.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct VipEvent {
    pub at_unix_ms: u64,
    pub text: String,
}

/// Events kept per node.
pub const EVENTS: usize = 20;

fn push_event(status: &mut VipStatus, text: String) {
    crate::events::record(crate::events::Kind::Vip, &status.namespace, text.clone());
    status.events.push(VipEvent {
        at_unix_ms: physical_now_ms(),
        text,
    });
    if status.events.len() > EVENTS {
        status.events.remove(0);
    }
}

#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct HealthStatus {
    /// The check, described; `None`: no check, always healthy.
    pub check: Option<String>,
    pub healthy: bool,
    /// Why the last check failed.
    pub detail: Option<String>,
}

/// Inputs the thread reads on every turn.
#[derive(Debug, Default)]
struct Inputs {
    plan: Option<Plan>,
    /// `None`: no check configured or no result yet (see `health_pending`).
    healthy: Option<bool>,
    health_check: Option<String>,
    health_detail: Option<String>,
    /// The node is draining: it stands aside like an unhealthy one.
    draining: bool,
    stop: bool,
}

/// Told which address this node holds (`None`: none), on every change.
pub type HoldingWatcher = Box<dyn Fn(Option<IpAddr>) + Send>;

/// The address this node holds and who wants to know.
#[derive(Default)]
struct Holding {
    now: Option<IpAddr>,
    watchers: Vec<HoldingWatcher>,
}

/// Handle to the agent thread.
pub struct Agent {
    holding: Arc<Mutex<Holding>>,
    inputs: Arc<Mutex<Inputs>>,
    status: Arc<Mutex<Option<VipStatus>>>,
    /// (namespace, holder) as the protocol sees it now.
    holder: Arc<Mutex<Option<(String, Id)>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Agent {
    /// Binds the protocol's UDP socket and starts the thread. `net` is used only by that thread.
    pub fn start(
        me: Id,
        settings: VipSettings,
        key: VipKey,
        net: Box<dyn VipNet>,
    ) -> std::io::Result<Agent> {
        let socket = UdpSocket::bind(SocketAddr::new(settings.bind_ip, settings.port))?;
        let inputs: Arc<Mutex<Inputs>> = Arc::default();
        let status: Arc<Mutex<Option<VipStatus>>> = Arc::default();
        let holder: Arc<Mutex<Option<(String, Id)>>> = Arc::default();
        let holding: Arc<Mutex<Holding>> = Arc::default();
        let mut worker = Worker {
            holding: holding.clone(),
            me,
            settings,
            key,
            net,
            socket,
            boot: rand_u64(),
            ctr: 0,
            replay: Replay::default(),
            inputs: inputs.clone(),
            status: status.clone(),
            holder_out: holder.clone(),
            current: None,
        };
        let thread = std::thread::Builder::new()
            .name("drop-vip".into())
            .spawn(move || worker.run())?;
        Ok(Agent {
            holding,
            inputs,
            status,
            holder,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The cluster's latest view of this node's namespace (`None`: no namespace, or no VIP).
    pub fn set_plan(&self, plan: Option<Plan>) {
        lock(&self.inputs).plan = plan;
    }

    /// The health check's verdict (`None`: no check configured).
    pub fn set_health(&self, check: Option<String>, healthy: Option<bool>, detail: Option<String>) {
        let mut i = lock(&self.inputs);
        i.health_check = check;
        i.healthy = healthy;
        i.health_detail = detail;
    }

    /// Draining: the node releases the address (to a healthy member) and does not take it.
    pub fn set_draining(&self, draining: bool) {
        lock(&self.inputs).draining = draining;
    }

    /// Calls `watcher` with the address this node holds now, and again on every change: just
    /// before the address is added (so the balancer is active when the first frame comes) and
    /// after it is removed.
    pub fn on_holding(&self, watcher: HoldingWatcher) {
        let mut h = lock(&self.holding);
        watcher(h.now);
        h.watchers.push(watcher);
    }

    /// A setter for [`Agent::set_health`] that a task can own.
    pub fn health_sink(
        &self,
    ) -> impl Fn(Option<String>, Option<bool>, Option<String>) + Send + Sync + 'static {
        let inputs = self.inputs.clone();
        move |check, healthy, detail| {
            let mut i = lock(&inputs);
            i.health_check = check;
            i.healthy = healthy;
            i.health_detail = detail;
        }
    }

    pub fn status(&self) -> Option<VipStatus> {
        lock(&self.status).clone()
    }

    /// The holder of `ns` as the protocol sees it on this node, if this node is in `ns`.
    pub fn holder(&self, ns: &str) -> Option<Id> {
        lock(&self.holder)
            .as_ref()
            .filter(|(n, _)| n == ns)
            .map(|(_, id)| *id)
    }

    /// Releases the address (if held), tells the others, and stops the thread.
    pub fn stop(&self) {
        lock(&self.inputs).stop = true;
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

fn rand_u64() -> u64 {
    let b = uuid::Uuid::new_v4().into_bytes();
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// What the thread works on for one namespace.
struct Current {
    plan: Plan,
    vip: Vip,
    machine: Machine,
    mac: Option<Mac>,
    held: bool,
    /// When the next announcements are due while holding: (time, how many).
    garp_due: Vec<(Instant, u32)>,
    last_conflict_burst: Option<Instant>,
    heard: BTreeSet<Id>,
    status: VipStatus,
    last_holder: Option<Id>,
    /// A failed add keeps this node out until then.
    net_fault_until: Option<Instant>,
}

struct Worker {
    holding: Arc<Mutex<Holding>>,
    me: Id,
    settings: VipSettings,
    key: VipKey,
    net: Box<dyn VipNet>,
    socket: UdpSocket,
    boot: u64,
    ctr: u64,
    replay: Replay,
    inputs: Arc<Mutex<Inputs>>,
    status: Arc<Mutex<Option<VipStatus>>>,
    holder_out: Arc<Mutex<Option<(String, Id)>>>,
    current: Option<Current>,
}

impl Worker {
    fn run(&mut self) {
        let mut buf = [0u8; wire::MAX_DATAGRAM + 1];
        loop {
            let now = Instant::now();
            let (plan, healthy, check, detail, draining, stop) = {
                let i = lock(&self.inputs);
                (
                    i.plan.clone(),
                    i.healthy,
                    i.health_check.clone(),
                    i.health_detail.clone(),
                    i.draining,
                    i.stop,
                )
            };
            if stop {
                self.leave(now, ReleaseReason::Resigned);
                return;
            }
            self.follow_plan(now, plan);
            let wait = if let Some(cur) = &mut self.current {
                let net_ok = cur.net_fault_until.is_none_or(|t| now >= t);
                // A check with no result yet: a holder keeps the address until the first
                // result (adding a check must not move it), the others do not stand.
                let ok = match healthy {
                    Some(h) => h,
                    None => check.is_none() || cur.machine.is_holder(),
                } && net_ok
                    && !draining;
                if ok != cur.machine.healthy() {
                    if !ok {
                        warn!(namespace = %cur.plan.ns, detail = ?detail, "this node is unhealthy for the floating IP");
                    } else {
                        info!(namespace = %cur.plan.ns, "this node is healthy for the floating IP");
                    }
                    let outs = cur.machine.set_healthy(now, ok);
                    self.apply(now, outs);
                }
                if let Some(cur) = &mut self.current {
                    cur.status.health = HealthStatus {
                        check,
                        healthy: ok,
                        detail: if draining {
                            Some("draining (dropctl node undrain ends it)".into())
                        } else if net_ok {
                            detail
                        } else {
                            Some("adding the address failed; staying out for a while".into())
                        },
                    };
                }
                let outs = self
                    .current
                    .as_mut()
                    .map(|c| c.machine.tick(now))
                    .unwrap_or_default();
                self.apply(now, outs);
                self.announce_due(now);
                self.watch_conflicts(now);
                self.publish(now);
                self.current
                    .as_ref()
                    .map_or(POLL_MAX, |c| {
                        c.machine.next_wake(now).saturating_duration_since(now)
                    })
                    .clamp(Duration::from_millis(1), POLL_MAX)
            } else {
                *lock(&self.status) = None;
                *lock(&self.holder_out) = None;
                POLL_MAX
            };
            let _ = self.socket.set_read_timeout(Some(wait));
            match self.socket.recv_from(&mut buf) {
                Ok((n, from)) => self.receive(&buf[..n], from),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => {
                    debug!(error = %e, "floating-IP socket");
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    /// Starts, changes or ends the work for this node's namespace.
    fn follow_plan(&mut self, now: Instant, plan: Option<Plan>) {
        let same_target = match (&self.current, &plan) {
            (Some(c), Some(p)) => {
                c.plan.ns == p.ns && c.plan.addr == p.addr && c.plan.prefix == p.prefix
            }
            (None, None) => true,
            _ => false,
        };
        if !same_target {
            if self.current.is_some() {
                self.leave(now, ReleaseReason::Resigned);
            }
            if let Some(p) = plan {
                self.enter(now, p);
            }
            return;
        }
        if let (Some(cur), Some(p)) = (&mut self.current, plan) {
            if cur.plan.members != p.members {
                cur.machine
                    .set_members(p.members.iter().map(|m| m.id).collect());
            }
            cur.machine.set_hint(p.leader);
            cur.plan = p;
        }
    }

    fn enter(&mut self, now: Instant, plan: Plan) {
        let ifname = match self.pick_interface(&plan) {
            Ok(i) => i,
            Err(e) => {
                // Without an interface this node cannot hold the address; it still follows
                // (and acks) so the others keep their majority. Retry on the next plan.
                warn!(namespace = %plan.ns, error = %e, "no interface for the floating IP");
                String::new()
            }
        };
        let vip = Vip {
            ifname: ifname.clone(),
            addr: plan.addr,
            prefix: plan.prefix,
        };
        let mac = if ifname.is_empty() {
            None
        } else {
            match self.net.mac(&ifname) {
                Ok(m) => Some(m),
                Err(e) => {
                    warn!(interface = %ifname, error = %e, "cannot read the interface's MAC");
                    None
                }
            }
        };
        let mut machine = Machine::new(self.me, self.settings.params, now);
        machine.set_members(plan.members.iter().map(|m| m.id).collect());
        machine.set_hint(plan.leader);
        info!(namespace = %plan.ns, address = %plan.addr, interface = %ifname, "floating IP: following the namespace");
        let status = VipStatus {
            namespace: plan.ns.clone(),
            address: format!("{}/{}", plan.addr, plan.prefix),
            interface: (!ifname.is_empty()).then(|| ifname.clone()),
            role: "follower".into(),
            ..VipStatus::default()
        };
        let net_fault_until =
            (ifname.is_empty() || mac.is_none()).then_some(now + NET_FAULT_BACKOFF);
        self.current = Some(Current {
            plan,
            vip,
            machine,
            mac,
            held: false,
            garp_due: Vec::new(),
            last_conflict_burst: None,
            heard: BTreeSet::new(),
            status,
            last_holder: None,
            net_fault_until,
        });
    }

    fn pick_interface(&mut self, plan: &Plan) -> Result<String, drop_net::NetError> {
        if let Some(i) = &self.settings.interface {
            return Ok(i.clone());
        }
        for m in plan.members.iter().filter(|m| m.id != self.me) {
            if let Ok(i) = self.net.interface_towards(m.ip) {
                return Ok(i);
            }
        }
        self.net.interface_towards(plan.addr)
    }

    /// Steps down (releasing the address) and forgets the namespace.
    fn leave(&mut self, now: Instant, why: ReleaseReason) {
        let outs = match &mut self.current {
            Some(cur) => cur.machine.step_down(now, why),
            None => return,
        };
        self.apply(now, outs);
        if let Some(cur) = &self.current
            && cur.held
        {
            // Not a holder in the protocol's eyes but the address is still here: remove it.
            let vip = cur.vip.clone();
            self.remove(&vip, why);
        }
        if let Some(cur) = self.current.take() {
            info!(namespace = %cur.plan.ns, "floating IP: no longer following the namespace");
        }
        *lock(&self.status) = None;
        *lock(&self.holder_out) = None;
    }

    fn receive(&mut self, buf: &[u8], from: SocketAddr) {
        let env = match wire::decode(&self.key, buf) {
            Ok(e) => e,
            Err(e) => {
                debug!(%from, error = %e, "floating-IP datagram refused");
                return;
            }
        };
        let Some(cur) = &mut self.current else {
            return;
        };
        if env.ns != cur.plan.ns {
            return;
        }
        if let Err(e) = self.replay.check(&env, physical_now_ms()) {
            debug!(%from, error = %e, "floating-IP datagram refused");
            return;
        }
        let now = Instant::now();
        if let (super::protocol::Msg::Beat { holder: true, .. }, Some(mac)) = (&env.m, &env.mac) {
            cur.status.holder_mac = Some(mac.clone());
        }
        let outs = cur.machine.on_message(now, env.from, env.m);
        self.apply(now, outs);
    }

    fn send(&mut self, to: Id, msg: super::protocol::Msg) {
        let Some(cur) = &self.current else { return };
        let Some(member) = cur.plan.members.iter().find(|m| m.id == to) else {
            return;
        };
        let addr = SocketAddr::new(member.ip, self.settings.port);
        self.ctr += 1;
        let env = Envelope {
            ns: cur.plan.ns.clone(),
            from: self.me,
            boot: self.boot,
            ctr: self.ctr,
            ts: physical_now_ms(),
            m: msg,
            mac: (cur.held && matches!(msg, super::protocol::Msg::Beat { holder: true, .. }))
                .then(|| cur.mac.map(|m| m.to_string()))
                .flatten(),
        };
        let buf = wire::encode(&self.key, &env);
        if let Err(e) = self.socket.send_to(&buf, addr) {
            debug!(%addr, error = %e, "floating-IP send failed");
        }
    }

    fn apply(&mut self, now: Instant, outs: Vec<Output>) {
        for o in outs {
            match o {
                Output::Send(to, msg) => self.send(to, msg),
                Output::Broadcast(msg) => {
                    let ids: Vec<Id> = self
                        .current
                        .as_ref()
                        .map(|c| {
                            c.plan
                                .members
                                .iter()
                                .map(|m| m.id)
                                .filter(|id| *id != self.me)
                                .collect()
                        })
                        .unwrap_or_default();
                    for id in ids {
                        self.send(id, msg);
                    }
                }
                Output::Acquire { term } => self.acquire(now, term),
                Output::Release { why } => {
                    if let Some(cur) = &self.current {
                        let vip = cur.vip.clone();
                        self.remove(&vip, why);
                    }
                }
            }
        }
    }

    /// Tells the watchers, if `addr` is news.
    fn set_holding(&self, addr: Option<IpAddr>) {
        let mut h = lock(&self.holding);
        if h.now != addr {
            h.now = addr;
            for w in &h.watchers {
                w(addr);
            }
        }
    }

    fn acquire(&mut self, now: Instant, term: u64) {
        let Some(addr) = self.current.as_ref().map(|c| c.vip.addr) else {
            return;
        };
        self.set_holding(Some(addr));
        let Some(cur) = &mut self.current else { return };
        let started = Instant::now();
        let result = if cur.vip.ifname.is_empty() {
            Err("no interface".to_string())
        } else {
            self.net.add(&cur.vip).map_err(|e| e.to_string())
        };
        match result {
            Ok(_) => {
                cur.held = true;
                cur.status.error = None;
                cur.status.since_unix_ms = Some(physical_now_ms());
                info!(
                    namespace = %cur.plan.ns,
                    address = %cur.vip.addr,
                    interface = %cur.vip.ifname,
                    term,
                    add_us = started.elapsed().as_micros() as u64,
                    "floating IP taken: this node holds it"
                );
                let g = self.settings.garp;
                cur.garp_due = vec![(now, g.burst)];
                if let Some(after) = g.repeat_after {
                    cur.garp_due.push((now + after, g.burst));
                }
                if let Some(mac) = cur.mac
                    && let Err(e) = self.net.watch(&cur.vip, mac)
                {
                    warn!(error = %e, "cannot watch for address conflicts");
                }
                self.announce_due(now);
            }
            Err(e) => {
                self.set_holding(None);
                let Some(cur) = &mut self.current else { return };
                error!(namespace = %cur.plan.ns, address = %cur.vip.addr, error = %e, "cannot add the floating IP; handing it on");
                cur.status.error = Some(e);
                cur.net_fault_until = Some(now + NET_FAULT_BACKOFF);
                let outs = cur.machine.step_down(now, ReleaseReason::Unhealthy);
                // Only the resignation: there is nothing to remove.
                let outs: Vec<Output> = outs
                    .into_iter()
                    .filter(|o| !matches!(o, Output::Release { .. }))
                    .collect();
                self.apply(now, outs);
            }
        }
    }

    fn remove(&mut self, vip: &Vip, why: ReleaseReason) {
        let started = Instant::now();
        match self.net.remove(vip) {
            Ok(_) => {
                info!(address = %vip.addr, interface = %vip.ifname, why = why.as_str(), remove_us = started.elapsed().as_micros() as u64, "floating IP released");
            }
            Err(e) => {
                error!(address = %vip.addr, interface = %vip.ifname, error = %e, "cannot remove the floating IP");
            }
        }
        self.set_holding(None);
        if let Some(cur) = &mut self.current {
            cur.held = false;
            cur.garp_due.clear();
            cur.status.last_release = Some(why.as_str().to_string());
            let text = format!("floating IP {} released here ({})", vip.addr, why.as_str());
            push_event(&mut cur.status, text);
        }
    }

    /// Sends the announcements that are due, and schedules the periodic refresh.
    fn announce_due(&mut self, now: Instant) {
        let Some(cur) = &mut self.current else { return };
        if !cur.held {
            return;
        }
        let Some(mac) = cur.mac else { return };
        let mut count = 0;
        cur.garp_due.retain(|(at, n)| {
            if *at <= now {
                count += n;
                false
            } else {
                true
            }
        });
        if count == 0 {
            return;
        }
        for _ in 0..count {
            match self.net.announce(&cur.vip, mac) {
                Ok(()) => cur.status.garps_sent += 1,
                Err(e) => {
                    warn!(error = %e, "gratuitous announcement failed");
                    cur.status.error = Some(e.to_string());
                    break;
                }
            }
        }
        if cur.garp_due.is_empty()
            && let Some(every) = self.settings.garp.refresh
        {
            cur.garp_due.push((now + every, 1));
        }
    }

    /// While holding: another MAC claiming the address, or a member heard again after a silence
    /// (a healed partition), gets a fresh burst (at most one per `conflict_gap`).
    fn watch_conflicts(&mut self, now: Instant) {
        let Some(cur) = &mut self.current else { return };
        let heard = cur.machine.heard(now);
        let returned = heard.difference(&cur.heard).count() > 0 && !cur.heard.is_empty();
        cur.heard = heard;
        if !cur.held {
            return;
        }
        let conflicts = match self.net.conflicts() {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "reading address conflicts");
                Vec::new()
            }
        };
        if !conflicts.is_empty() {
            cur.status.conflicts_seen += conflicts.len() as u64;
            cur.status.last_conflict_mac = conflicts.last().map(ToString::to_string);
            warn!(namespace = %cur.plan.ns, address = %cur.vip.addr, other = %conflicts[conflicts.len() - 1], "another MAC claims the floating IP; announcing again");
            crate::events::record(
                crate::events::Kind::Vip,
                &cur.plan.ns,
                format!(
                    "another MAC ({}) claims {}; announcing again",
                    conflicts[conflicts.len() - 1],
                    cur.vip.addr
                ),
            );
        }
        if (!conflicts.is_empty() || returned)
            && cur
                .last_conflict_burst
                .is_none_or(|t| now.saturating_duration_since(t) >= self.settings.garp.conflict_gap)
        {
            cur.last_conflict_burst = Some(now);
            cur.garp_due.push((now, self.settings.garp.burst));
            self.announce_due(now);
        }
    }

    fn publish(&mut self, now: Instant) {
        let Some(cur) = &mut self.current else { return };
        let holder = cur.machine.holder(now);
        if holder != cur.last_holder {
            if let Some(h) = holder {
                cur.status.moves += u64::from(cur.last_holder.is_some());
                if h != self.me {
                    cur.status.since_unix_ms = Some(physical_now_ms());
                }
                let name = cur.plan.name_of(h);
                info!(namespace = %cur.plan.ns, holder = %name, term = cur.machine.term(), "floating IP holder");
                let text = format!(
                    "floating IP {} of {} held by {name}",
                    cur.plan.addr, cur.plan.ns
                );
                push_event(&mut cur.status, text);
            } else if let Some(was) = cur.last_holder {
                let was = cur.plan.name_of(was);
                info!(namespace = %cur.plan.ns, previous = %was, "floating IP has no holder");
                let text = format!(
                    "floating IP {} of {} has no holder (was {was})",
                    cur.plan.addr, cur.plan.ns
                );
                push_event(&mut cur.status, text);
            }
            cur.last_holder = holder;
        }
        let s = &mut cur.status;
        s.role = match cur.machine.role() {
            Role::Holder { .. } => "holder",
            Role::Candidate { .. } => "candidate",
            Role::Follower => "follower",
        }
        .into();
        s.holder_id = holder.map(|h| h.to_string());
        s.holder = holder.map(|h| cur.plan.name_of(h));
        if holder == Some(self.me) {
            s.holder_mac = cur.mac.map(|m| m.to_string());
        } else if holder.is_none() {
            s.holder_mac = None;
            s.since_unix_ms = None;
        }
        s.term = cur.machine.term();
        s.heard = cur.heard.iter().map(|id| cur.plan.name_of(*id)).collect();
        s.interface = (!cur.vip.ifname.is_empty()).then(|| cur.vip.ifname.clone());
        *lock(&self.status) = Some(s.clone());
        *lock(&self.holder_out) = holder.map(|h| (cur.plan.ns.clone(), h));
    }
}

/// Removes every address carrying DROP's mark in this network namespace: at start-up before
/// anything else (a crashed or killed daemon may have left one) and from `ExecStopPost=`.
pub fn release_leftovers(net: &mut dyn VipNet) -> Result<Vec<Vip>, drop_net::NetError> {
    let found = net.marked()?;
    for vip in &found {
        net.remove(vip)?;
    }
    Ok(found)
}
