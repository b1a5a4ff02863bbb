//! The node's part in the cluster: it owns the replicated desired state, plugs it into
//! memberlist ([`Application`]), and runs the reconcile loop that turns state plus membership
//! into this node's actions — who leads each namespace, which flows run here, and which pools
//! other nodes may forward calls to.
//!
//! Keys of the replicated map (values are JSON):
//! - `ns/<name>` → `{"vip": "10.0.0.100"}`: a namespace
//! - `nsm/<node-id>` → `"<name>"`: the namespace a node belongs to (at most one; deleted: free)
//! - `flow/<ns>/<flow>` → `{"source": "<yaml>", "file": "<path it was applied from>"}`
//! - `reg/<node-id>` → `{"name", "peer", "pools": [...], "failed": {flow: error}}`: what a node
//!   runs, written only by that node
//!
//! Locks: one `std::sync::Mutex` around the map and its companions, never held across an await
//! or a call into the runtime.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use super::broadcast::BroadcastQueue;
use super::leader::{self, View};
use super::membership::{Application, Member, MemberState, Membership, MembershipOptions};
use super::peer::Registry;
use super::placement::{self, Candidate, FlowSpec};
use super::state::{Clock, Entry, Hlc, NodeId, StateMap, physical_now_ms};
use crate::error::ApiError;
use crate::runtime::flow::Delivery;
use crate::runtime::{RemoteRoute, Runtime};

/// File under the state directory holding the replicated map.
pub const STATE_FILE: &str = "cluster-state.json";
/// Seeds file under the state directory (one `ip:port` or `ip` a line, `#` comments).
pub const HOSTS_FILE: &str = "drop-hosts";
/// Gossip messages larger than this go to every member over TCP instead.
const GOSSIP_MAX: usize = 1024;
/// How often the reconcile loop runs when nothing wakes it.
const TICK: Duration = Duration::from_secs(1);
/// A node that cannot join says so at most this often per address.
const JOIN_WARN_EVERY: Duration = Duration::from_secs(30);
/// Leadership changes remembered for `ns show`.
const HISTORY: usize = 20;

/// Metadata every node gossips about itself (memberlist's node meta, ≤ 512 bytes as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMeta {
    #[serde(rename = "n")]
    pub name: String,
    /// Namespace it is in.
    #[serde(rename = "s", default, skip_serializing_if = "Option::is_none")]
    pub ns: Option<String>,
    /// Namespace it leads.
    #[serde(rename = "l", default, skip_serializing_if = "Option::is_none")]
    pub lead: Option<String>,
    /// Since when it leads (its clock, ms): the older claim wins when two meet.
    #[serde(rename = "t", default, skip_serializing_if = "Option::is_none")]
    pub lead_since: Option<u64>,
    /// Peer transport address.
    #[serde(rename = "p")]
    pub peer: SocketAddr,
    /// Gateway address, if on.
    #[serde(rename = "g", default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<SocketAddr>,
    #[serde(rename = "m", default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(rename = "v")]
    pub version: String,
    #[serde(rename = "c")]
    pub capacity: u32,
    /// Draining (`dropctl node drain`): it takes no leadership, floating IP or new service
    /// instance, and the balancers and forwarders send it no new work.
    #[serde(rename = "d", default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

/// How to start the node's cluster part.
pub struct ClusterOptions {
    pub node_id: NodeId,
    pub name: String,
    pub state_dir: PathBuf,
    pub config: super::ClusterConfig,
    pub key: memberlist::proto::SecretKey,
    pub gateway: Option<SocketAddr>,
}

/// A node as `dropctl node ls` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: String,
    pub name: String,
    pub addr: SocketAddr,
    pub state: MemberState,
    pub namespace: Option<String>,
    pub leader: bool,
    pub version: String,
    pub capacity: u32,
    pub peer: Option<SocketAddr>,
    pub mac: Option<String>,
    pub pools: Vec<String>,
    /// Whether its systemd answers its services agent (`None`: it runs no agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub systemd: Option<bool>,
    /// Its gateway's listening address, if on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<SocketAddr>,
    /// It is draining (`dropctl node drain`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

/// A namespace as this node sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NsView {
    pub name: String,
    pub vip: Option<String>,
    /// The floating IP's health check, as stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Value>,
    pub members: Vec<NsMember>,
    pub leader: Option<String>,
    pub leader_id: Option<String>,
    pub quorum: bool,
    pub flows: Vec<FlowPlacement>,
    /// Services stored for the namespace, with their instances.
    #[serde(default)]
    pub services: Vec<super::services::ServiceView>,
    /// Leadership changes this node saw (newest last).
    pub history: Vec<LeaderChange>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NsMember {
    pub id: String,
    pub name: String,
    pub state: MemberState,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowPlacement {
    pub name: String,
    pub priority: u8,
    pub replicas: Option<u32>,
    pub nodes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaderChange {
    pub at_unix_ms: u64,
    pub from: Option<String>,
    pub to: Option<String>,
}

/// What the reconcile loop last computed; API answers read it.
#[derive(Debug, Clone, Default)]
struct Snapshot {
    nodes: Vec<NodeView>,
    namespaces: Vec<NsView>,
}

struct Shared {
    map: StateMap,
    clock: Clock,
    queue: BroadcastQueue,
    meta: NodeMeta,
    /// Leader this node last computed, per namespace.
    leaders: BTreeMap<String, Option<NodeId>>,
    history: BTreeMap<String, Vec<LeaderChange>>,
    /// Flows that failed to start here: name → (source, error).
    failed: BTreeMap<String, (String, String)>,
    /// Set while this node's own view elects it leader of its namespace.
    lease: Option<Lease>,
    /// Flows decoded once per stored version: `flow/...` key → (version, what placement needs).
    decoded: HashMap<String, (Hlc, Option<DecodedFlow>)>,
}

/// The leader's lease: it acts as leader only while a majority of its namespace acked its
/// pings within [`lease_window`] (or, right after it starts, for one window), so a leader cut
/// off from the majority stops leader-only work within about one window. A node that takes
/// over from a leader that vanished waits one window first: by then the old leader, if it is
/// only cut off rather than dead, has stopped acting, so two leaders never act at once.
#[derive(Debug, Clone, Copy)]
struct Lease {
    /// When this node may start acting as leader (its election, or one window later when it
    /// replaces a leader that vanished).
    start: Instant,
    /// The lease lapsed once in this term: no more grace, only acks count.
    lapsed: bool,
}

/// What the lease allows now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaseState {
    /// Taking over from a vanished leader: not yet.
    Waiting,
    Holds,
    Lapsed,
}

impl Lease {
    /// With `acked` of `members` (this node included) answering within the window: a
    /// majority, or the grace of a fresh term that never lapsed.
    fn state(&self, acked: usize, members: usize, now: Instant, window: Duration) -> LeaseState {
        if now < self.start {
            return LeaseState::Waiting;
        }
        let grace = !self.lapsed && now.duration_since(self.start) < window;
        if acked * 2 > members || grace {
            LeaseState::Holds
        } else {
            LeaseState::Lapsed
        }
    }
}

/// How long a ping ack keeps counting for the lease: two probe intervals and a probe timeout,
/// so one lost round of pings is tolerated.
fn lease_window(t: &super::membership::Timing) -> Duration {
    t.probe_interval * 2 + t.probe_timeout
}

struct Inner {
    me: NodeId,
    path: PathBuf,
    shared: Mutex<Shared>,
    changed: Arc<Notify>,
    /// Members found by multicast discovery.
    discovered: Arc<Mutex<BTreeSet<SocketAddr>>>,
    /// When each peer last acked a lease ping.
    acks: Mutex<HashMap<NodeId, Instant>>,
    lease_window: Duration,
    members: AtomicUsize,
    snapshot: RwLock<Arc<Snapshot>>,
    /// This node's services agent and how many failures move an instance elsewhere.
    services: RwLock<Option<(Arc<crate::services::agent::Agent>, u32)>>,
    /// Called after every pass, once the views are published (the balancer reads them).
    observer: RwLock<Option<PassObserver>>,
    registry: Arc<RwLock<Registry>>,
    /// The floating IP, once the daemon attached it.
    vip: RwLock<Option<Arc<dyn super::VipHook>>>,
    /// This node is draining: announced in its metadata on the next pass.
    draining: AtomicBool,
    /// Reconcile passes completed (views published, this node's share of flows started).
    passes: watch::Sender<u64>,
}

/// Gossip and reliable messages: a batch of entries.
#[derive(Serialize, Deserialize)]
struct Message {
    e: Vec<(String, Entry)>,
}

impl Shared {
    /// Queues `key`'s current entry for gossip; entries too large for a packet travel only by
    /// the direct TCP send and push/pull.
    fn gossip(&mut self, key: &str) {
        if let Some(entry) = self.map.entry(key).cloned() {
            let msg = encode(&[(key.to_string(), entry)]);
            if msg.len() <= GOSSIP_MAX {
                self.queue.queue(key, msg.to_vec());
            }
        }
    }
}

impl Inner {
    /// Membership addresses of every node the state has heard of (from their registry entries).
    fn known_addrs(&self) -> Vec<SocketAddr> {
        let mut addrs: Vec<SocketAddr> = self
            .lock()
            .map
            .iter_prefix("reg/")
            .filter_map(|(_, v)| v.get("addr")?.as_str()?.parse().ok())
            .collect();
        addrs.extend(
            self.discovered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .copied(),
        );
        addrs
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, map: &StateMap) {
        if let Err(e) = map.save(&self.path) {
            warn!(error = %e, "cannot persist the cluster state");
        }
    }

    /// Merges entries from a peer; newly learned ones are gossiped on (epidemic spread).
    fn ingest(&self, entries: Vec<(String, Entry)>) {
        let mut changed = false;
        {
            let mut sh = self.lock();
            let now = physical_now_ms();
            for (key, entry) in entries {
                sh.clock.observe(entry.version, now);
                if sh.map.merge_entry(key.clone(), entry) {
                    changed = true;
                    sh.gossip(&key);
                }
            }
            if changed {
                self.save(&sh.map);
            }
        }
        if changed {
            self.changed.notify_one();
        }
    }
}

fn encode(entries: &[(String, Entry)]) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&Message {
            e: entries.to_vec(),
        })
        .expect("entries serialise"),
    )
}

impl Application for Inner {
    fn node_meta(&self) -> Vec<u8> {
        serde_json::to_vec(&self.lock().meta).expect("meta serialises")
    }

    fn on_message(&self, msg: &[u8]) {
        match serde_json::from_slice::<Message>(msg) {
            Ok(m) => self.ingest(m.e),
            Err(e) => warn!(error = %e, "undecodable cluster message"),
        }
    }

    fn broadcasts(&self, _num_nodes: usize, limit: usize, overhead: usize) -> Vec<Bytes> {
        let n = self.members.load(Ordering::Relaxed).max(1);
        self.lock()
            .queue
            .take(n, limit, overhead)
            .into_iter()
            .map(Bytes::from)
            .collect()
    }

    fn local_state(&self, _join: bool) -> Vec<u8> {
        let sh = self.lock();
        let entries: Vec<(String, Entry)> = sh
            .map
            .entries()
            .map(|(k, e)| (k.to_string(), e.clone()))
            .collect();
        encode(&entries).to_vec()
    }

    fn merge_remote_state(&self, buf: &[u8], _join: bool) {
        self.on_message(buf);
    }

    fn on_membership_change(&self) {
        self.changed.notify_one();
    }
}

/// The running cluster part of a node.
pub struct Cluster {
    inner: Arc<Inner>,
    membership: Arc<Membership>,
    name: String,
    seeds: Vec<SocketAddr>,
    multicast: Option<std::net::SocketAddrV4>,
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.inner.me)
            .field("name", &self.name)
            .field("seeds", &self.seeds)
            .finish_non_exhaustive()
    }
}

/// Reads `<state_dir>/drop-hosts`: one address a line (`ip:port`, or `ip` meaning
/// `default_port`); blank lines and `#` comments are skipped, bad lines logged.
pub fn read_hosts_file(path: &Path, default_port: u16) -> Vec<SocketAddr> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if let Ok(a) = line.parse::<SocketAddr>() {
            out.push(a);
        } else if let Ok(ip) = line.parse::<IpAddr>() {
            out.push(SocketAddr::new(ip, default_port));
        } else {
            warn!(file = %path.display(), line = i + 1, text = line, "not an address; skipped");
        }
    }
    out
}

/// The MAC address of the interface that holds `ip`, if one does.
fn mac_of(ip: IpAddr) -> Option<String> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    let ifname = addrs
        .filter(|a| {
            a.address
                .as_ref()
                .and_then(|s| {
                    s.as_sockaddr_in()
                        .map(|v4| IpAddr::V4(v4.ip()))
                        .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                })
                .is_some_and(|a| a == ip)
        })
        .map(|a| a.interface_name)
        .next()?;
    // The link-layer entry of the same interface (not /sys/class/net: that sysfs may belong to
    // another network namespace than the daemon's).
    let mac = nix::ifaddrs::getifaddrs()
        .ok()?
        .filter(|a| a.interface_name == ifname)
        .find_map(|a| a.address.as_ref()?.as_link_addr()?.addr())?;
    Some(
        mac.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
    )
}

impl Cluster {
    /// Loads the persisted state, starts membership and joins the seeds in the background.
    pub async fn start(
        opts: ClusterOptions,
    ) -> Result<Cluster, super::membership::MembershipError> {
        let path = opts.state_dir.join(STATE_FILE);
        let map = match StateMap::load(&path) {
            Ok(m) => m,
            Err(e) => {
                // A damaged file is kept aside, never silently replaced: peers resend the state.
                warn!(error = %e, "cannot load the cluster state; starting empty and keeping the file as .bad");
                let _ = std::fs::rename(&path, path.with_extension("json.bad"));
                StateMap::new()
            }
        };
        let mut clock = Clock::new(opts.node_id);
        if let Some(v) = map.max_version() {
            clock.observe(v, physical_now_ms());
        }
        let me_key = format!("nsm/{}", opts.node_id);
        let ns = map.get(&me_key).and_then(Value::as_str).map(str::to_string);
        let meta = NodeMeta {
            name: opts.name.clone(),
            ns,
            lead: None,
            lead_since: None,
            peer: opts.config.peer,
            gateway: opts.gateway,
            mac: mac_of(opts.config.advertise.ip()),
            version: crate::VERSION.to_string(),
            capacity: opts.config.capacity,
            draining: false,
        };
        let inner = Arc::new(Inner {
            me: opts.node_id,
            path,
            shared: Mutex::new(Shared {
                map,
                clock,
                queue: BroadcastQueue::new(
                    u32::try_from(opts.config.timing.retransmit_mult).unwrap_or(4),
                ),
                meta,
                leaders: BTreeMap::new(),
                history: BTreeMap::new(),
                failed: BTreeMap::new(),
                lease: None,
                decoded: HashMap::new(),
            }),
            changed: Arc::new(Notify::new()),
            discovered: Arc::default(),
            acks: Mutex::new(HashMap::new()),
            lease_window: lease_window(&opts.config.timing),
            members: AtomicUsize::new(1),
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            services: RwLock::new(None),
            observer: RwLock::new(None),
            registry: Arc::new(RwLock::new(Registry::default())),
            vip: RwLock::new(None),
            draining: AtomicBool::new(false),
            passes: watch::Sender::new(0),
        });
        // The API answers from the persisted state at once: a restarted node lists its
        // namespaces and flows before its first pass (which waits on starting pools) ends.
        {
            let mut sh = inner.lock();
            let namespaces = plan(&inner, &mut sh, &[]).namespaces;
            *inner.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Snapshot {
                nodes: Vec::new(),
                namespaces,
            });
        }
        let membership = Membership::start(
            MembershipOptions {
                id: opts.node_id.to_string(),
                bind: opts.config.bind,
                advertise: Some(opts.config.advertise),
                key: Some(opts.key),
                timing: opts.config.timing,
            },
            inner.clone(),
        )
        .await?;
        let mut seeds = opts.config.seeds.clone();
        seeds.extend(read_hosts_file(
            &opts.state_dir.join(HOSTS_FILE),
            opts.config.bind.port(),
        ));
        seeds.sort();
        seeds.dedup();
        let (stop, _) = watch::channel(false);
        info!(
            bind = %opts.config.bind,
            profile = %opts.config.profile,
            seeds = seeds.len(),
            "cluster membership started"
        );
        Ok(Cluster {
            inner,
            membership: Arc::new(membership),
            name: opts.name,
            seeds,
            multicast: opts.config.multicast,
            stop,
        })
    }

    /// Attaches the floating IP: from the next pass on it follows this node's namespace, and
    /// the holder of the namespace's address is its leader.
    pub fn set_vip(&self, hook: Arc<dyn super::VipHook>) {
        *self.inner.vip.write().unwrap_or_else(|e| e.into_inner()) = Some(hook);
        self.inner.changed.notify_one();
    }

    /// Attaches the services agent: from the next pass on it runs this node's share of the
    /// namespace's services, and the leader places instances (elsewhere after `max_failures`).
    pub fn set_services(&self, agent: Arc<crate::services::agent::Agent>, max_failures: u32) {
        *self
            .inner
            .services
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some((agent, max_failures));
        self.inner.changed.notify_one();
    }

    /// Drains this node (or ends that): it gives up leadership and takes none, no new service
    /// instance is placed here, and the others stop sending it new work. Announced to the
    /// cluster in this node's metadata by the pass this wakes.
    pub fn set_draining(&self, draining: bool) {
        self.inner.draining.store(draining, Ordering::SeqCst);
        self.inner.changed.notify_one();
    }

    /// Waits until the first reconcile pass has completed — this node's share of the flows is
    /// running and the forwarding table is built — or `limit` passed. True when it has.
    pub async fn wait_first_pass(&self, limit: Duration) -> bool {
        let mut rx = self.inner.passes.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|n| *n > 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Sets what runs after every pass (with the namespace and node views published).
    pub fn set_observer(&self, observer: PassObserver) {
        *self
            .inner
            .observer
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(observer);
        self.inner.changed.notify_one();
    }

    /// What wakes the reconcile loop (for agents whose reports feed the registry entry).
    pub fn notifier(&self) -> Arc<Notify> {
        self.inner.changed.clone()
    }

    /// The floating IP's status on this node (its namespace), if attached.
    pub fn vip_status(&self) -> Option<Value> {
        self.inner
            .vip
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|h| h.status())
    }

    /// Wakes the reconcile loop (the floating IP's holder changed).
    pub fn nudge(&self) {
        self.inner.changed.notify_one();
    }

    /// The forwarding table the gateway reads.
    pub fn registry(&self) -> Arc<RwLock<Registry>> {
        self.inner.registry.clone()
    }

    /// Runs the join loop and the reconcile loop until [`Cluster::stop`].
    pub fn spawn(&self, runtime: Arc<Runtime>, peer_key: super::peer::PeerKey) {
        if let Some(group) = self.multicast {
            tokio::spawn(super::discovery::run(
                group,
                self.membership.advertise(),
                peer_key,
                self.inner.discovered.clone(),
                self.inner.changed.clone(),
                self.stop.subscribe(),
            ));
        }
        let membership = self.membership.clone();
        let seeds = self.seeds.clone();
        let inner = self.inner.clone();
        let mut stop = self.stop.subscribe();
        // Contacts the seeds until another member is known, and from then on every node the
        // state knows of that is not up: a restarted node finds the cluster through its
        // persisted state, and the two sides of a healed partition find each other again
        // (memberlist by itself never retries a node it declared dead).
        let reconnect = (membership.timing().probe_interval * 10)
            .clamp(Duration::from_secs(1), Duration::from_secs(10));
        tokio::spawn(async move {
            let pending: Arc<Mutex<BTreeSet<SocketAddr>>> = Arc::default();
            let warned: Arc<Mutex<HashMap<SocketAddr, Instant>>> = Arc::default();
            let mut delay = Duration::from_millis(200);
            let me = membership.advertise();
            loop {
                let up: BTreeSet<SocketAddr> = membership
                    .members()
                    .await
                    .iter()
                    .filter(|m| m.state.is_up())
                    .map(|m| m.addr)
                    .collect();
                let alone = up.iter().all(|a| *a == me);
                let mut targets: BTreeSet<SocketAddr> = inner
                    .known_addrs()
                    .into_iter()
                    .filter(|a| !up.contains(a))
                    .collect();
                if alone {
                    targets.extend(seeds.iter().copied());
                }
                targets.remove(&me);
                for addr in targets {
                    if !pending
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(addr)
                    {
                        continue;
                    }
                    let (membership, inner, pending, warned) = (
                        membership.clone(),
                        inner.clone(),
                        pending.clone(),
                        warned.clone(),
                    );
                    tokio::spawn(async move {
                        match membership.join_one(addr).await {
                            Ok(()) => {
                                info!(%addr, "joined the cluster through this member");
                                inner.changed.notify_one();
                            }
                            // Alone and refused: say so now and then, with the likely cause.
                            Err(e) if alone => {
                                let now = Instant::now();
                                let mut w = warned.lock().unwrap_or_else(|e| e.into_inner());
                                if w.get(&addr).is_none_or(|t| now - *t > JOIN_WARN_EVERY) {
                                    w.insert(addr, now);
                                    warn!(%addr, error = %e, "cannot join the cluster through this member (is it up, and does it have the same cluster key?)");
                                }
                            }
                            Err(e) => debug!(%addr, error = %e, "known member did not answer"),
                        }
                        pending
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&addr);
                    });
                }
                let wait = if alone {
                    delay = (delay * 2).min(reconnect);
                    delay
                } else {
                    reconnect
                };
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return,
                }
            }
        });
        // The leader's lease pings: while this node's view elects it, every probe interval.
        let membership = self.membership.clone();
        let inner = self.inner.clone();
        let mut stop = self.stop.subscribe();
        tokio::spawn(async move {
            let every = membership.timing().probe_interval;
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    _ = stop.changed() => return,
                }
                let peers: Vec<NodeId> = {
                    let sh = inner.lock();
                    if sh.lease.is_none() {
                        continue;
                    }
                    let Some(ns) = sh.meta.ns.clone().or_else(|| {
                        sh.map
                            .get(&format!("nsm/{}", inner.me))
                            .and_then(Value::as_str)
                            .map(str::to_string)
                    }) else {
                        continue;
                    };
                    sh.map
                        .iter_prefix("nsm/")
                        .filter(|(_, v)| v.as_str() == Some(ns.as_str()))
                        .filter_map(|(k, _)| k.trim_start_matches("nsm/").parse().ok().map(NodeId))
                        .filter(|id| *id != inner.me)
                        .collect()
                };
                let addrs: HashMap<String, SocketAddr> = membership
                    .members()
                    .await
                    .into_iter()
                    .map(|m| (m.id, m.addr))
                    .collect();
                for id in peers {
                    let Some(addr) = addrs.get(&id.to_string()).copied() else {
                        continue;
                    };
                    let (membership, inner) = (membership.clone(), inner.clone());
                    tokio::spawn(async move {
                        if membership.ping(&id.to_string(), addr).await {
                            inner
                                .acks
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(id, Instant::now());
                        }
                    });
                }
            }
        });
        let membership = self.membership.clone();
        let inner = self.inner.clone();
        let mut stop = self.stop.subscribe();
        tokio::spawn(async move {
            loop {
                reconcile(&inner, &membership, &runtime).await;
                // A leader checks its lease often enough to stop within about one window.
                let tick = if inner.lock().lease.is_some() {
                    (inner.lease_window / 4).min(TICK)
                } else {
                    TICK
                };
                tokio::select! {
                    () = inner.changed.notified() => {
                        // Let a burst of events settle into one pass.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    () = tokio::time::sleep(tick) => {}
                    _ = stop.changed() => return,
                }
            }
        });
    }

    /// Leaves the cluster gracefully (peers see `left` at once) and stops the loops.
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        self.membership.leave_and_stop(Duration::from_secs(2)).await;
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.me
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Writes one key (or deletes it with `None`) with a fresh version, persists, and spreads it.
    async fn write(&self, key: String, value: Option<Value>) {
        self.write_many(vec![(key, value)]).await;
    }

    async fn write_many(&self, writes: Vec<(String, Option<Value>)>) {
        write_and_push(&self.inner, &self.membership, writes).await;
    }

    fn get(&self, key: &str) -> Option<Value> {
        self.inner.lock().map.get(key).cloned()
    }
}

/// Writes keys to the state (gossiped and saved) and sends them straight to every member.
async fn write_and_push(
    inner: &Arc<Inner>,
    membership: &Arc<Membership>,
    writes: Vec<(String, Option<Value>)>,
) {
    let mut batch = Vec::new();
    {
        let mut sh = inner.lock();
        for (key, value) in writes {
            let version = sh.clock.now(physical_now_ms());
            match value {
                Some(v) => sh.map.set(key.clone(), v, version),
                None => sh.map.delete(key.clone(), version),
            };
            sh.gossip(&key);
            if let Some(entry) = sh.map.entry(&key).cloned() {
                batch.push((key, entry));
            }
        }
        inner.save(&sh.map);
    }
    inner.changed.notify_one();
    // Also straight to every member over TCP: a write reaches everyone at once, whatever
    // its size; gossip and push/pull repair whatever this misses.
    let msg = encode(&batch);
    let me = membership.advertise();
    for m in membership.members().await {
        if m.state.is_up() && m.addr != me {
            let (ms, msg) = (membership.clone(), msg.clone());
            tokio::spawn(async move {
                if let Err(e) = ms.send_reliable(m.addr, msg).await {
                    tracing::debug!(to = %m.addr, error = %e, "direct state send failed; gossip will repair");
                }
            });
        }
    }
}

impl Cluster {
    fn namespace_of(&self, id: NodeId) -> Option<String> {
        self.get(&format!("nsm/{id}"))
            .and_then(|v| v.as_str().map(str::to_string))
    }

    /// This node's namespace, if any.
    pub fn my_namespace(&self) -> Option<String> {
        self.namespace_of(self.inner.me)
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.inner
            .snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn nodes(&self) -> Vec<NodeView> {
        self.snapshot().nodes.clone()
    }

    pub fn namespaces(&self) -> Vec<NsView> {
        self.snapshot().namespaces.clone()
    }

    pub fn namespace(&self, name: &str) -> Result<NsView, ApiError> {
        self.snapshot()
            .namespaces
            .iter()
            .find(|n| n.name == name)
            .cloned()
            .ok_or_else(|| unknown_ns(name))
    }

    /// Resolves node names or ids to ids, from what membership and the registry know.
    fn resolve_nodes(&self, names: &[String]) -> Result<Vec<NodeId>, ApiError> {
        let snap = self.snapshot();
        names
            .iter()
            .map(|n| {
                snap.nodes
                    .iter()
                    .find(|v| v.name == *n || v.id == *n)
                    .and_then(|v| v.id.parse::<uuid::Uuid>().ok().map(NodeId))
                    .ok_or_else(|| {
                        ApiError::new(
                            404,
                            "unknown_node",
                            format!(
                                "no node named {n:?} is known to this node (see `dropctl node ls`)"
                            ),
                        )
                    })
            })
            .collect()
    }

    pub async fn ns_create(
        &self,
        name: &str,
        vip: Option<String>,
        nodes: &[String],
    ) -> Result<NsView, ApiError> {
        validate_ns_name(name)?;
        if let Some(v) = &vip {
            v.parse::<IpAddr>().map_err(|_| {
                ApiError::new(400, "invalid_vip", format!("`{v}` is not an IP address"))
            })?;
        }
        if self.get(&format!("ns/{name}")).is_some() {
            return Err(ApiError::new(
                409,
                "conflict",
                format!("namespace {name} exists; `dropctl ns rm {name}` first"),
            ));
        }
        let ids = self.resolve_nodes(nodes)?;
        for (id, n) in ids.iter().zip(nodes) {
            if let Some(other) = self.namespace_of(*id) {
                return Err(ApiError::new(
                    409,
                    "conflict",
                    format!(
                        "node {n} is in namespace {other}; run `dropctl ns leave` on it or `ns join {name}` to move it"
                    ),
                ));
            }
        }
        let mut writes = vec![(format!("ns/{name}"), Some(json!({ "vip": vip })))];
        for id in &ids {
            writes.push((format!("nsm/{id}"), Some(json!(name))));
        }
        self.write_many(writes).await;
        info!(namespace = name, members = ids.len(), "namespace created");
        crate::events::record(
            crate::events::Kind::Membership,
            name,
            format!("namespace {name} created with {} members", ids.len()),
        );
        Ok(self.provisional_ns(name).await)
    }

    /// The namespace once the reconcile loop has seen the write (up to half a second), else
    /// from the state alone.
    async fn provisional_ns(&self, name: &str) -> NsView {
        for _ in 0..25 {
            if let Ok(v) = self.namespace(name)
                && !v.members.is_empty()
            {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let sh = self.inner.lock();
        let vip = sh
            .map
            .get(&format!("ns/{name}"))
            .and_then(|v| v.get("vip"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let members = sh
            .map
            .iter_prefix("nsm/")
            .filter(|(_, v)| v.as_str() == Some(name))
            .map(|(k, _)| NsMember {
                id: k.trim_start_matches("nsm/").to_string(),
                name: String::new(),
                state: MemberState::Alive,
            })
            .collect();
        NsView {
            name: name.to_string(),
            vip,
            health: None,
            members,
            leader: None,
            leader_id: None,
            quorum: false,
            flows: Vec::new(),
            services: Vec::new(),
            history: Vec::new(),
        }
    }

    /// Sets (or with `None` removes) the namespace's floating-IP health check. The caller has
    /// validated `health`.
    pub async fn ns_set_health(
        &self,
        name: &str,
        health: Option<Value>,
    ) -> Result<NsView, ApiError> {
        let Some(mut entry) = self.get(&format!("ns/{name}")) else {
            return Err(unknown_ns(name));
        };
        if entry.get("vip").and_then(Value::as_str).is_none() {
            return Err(ApiError::new(
                409,
                "no_vip",
                format!(
                    "namespace {name} has no floating IP; a health check decides only who holds it"
                ),
            ));
        }
        if let Some(obj) = entry.as_object_mut() {
            match health {
                Some(h) => {
                    obj.insert("health".into(), h);
                }
                None => {
                    obj.remove("health");
                }
            }
        }
        self.write(format!("ns/{name}"), Some(entry)).await;
        info!(namespace = name, "namespace health check set");
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.namespace(name)
    }

    /// Moves this node into `name` (out of any other); pools of flows in both stay up.
    pub async fn ns_join(&self, name: &str) -> Result<NsView, ApiError> {
        if self.get(&format!("ns/{name}")).is_none() {
            return Err(unknown_ns(name));
        }
        let from = self.my_namespace();
        self.write(format!("nsm/{}", self.inner.me), Some(json!(name)))
            .await;
        info!(namespace = name, from = ?from, "joined namespace");
        crate::events::record(
            crate::events::Kind::Membership,
            name,
            format!("this node joined namespace {name}"),
        );
        Ok(self.provisional_ns(name).await)
    }

    pub async fn ns_leave(&self) -> Result<Value, ApiError> {
        let Some(from) = self.my_namespace() else {
            return Err(ApiError::new(
                409,
                "not_in_namespace",
                "this node is not in a namespace",
            ));
        };
        self.write(format!("nsm/{}", self.inner.me), None).await;
        info!(namespace = %from, "left namespace");
        crate::events::record(
            crate::events::Kind::Membership,
            &from,
            format!("this node left namespace {from}"),
        );
        Ok(json!({ "left": from }))
    }

    pub async fn ns_remove(&self, name: &str) -> Result<Value, ApiError> {
        if self.get(&format!("ns/{name}")).is_none() {
            return Err(unknown_ns(name));
        }
        let mut writes = vec![(format!("ns/{name}"), None)];
        {
            let sh = self.inner.lock();
            for (k, v) in sh.map.iter_prefix("nsm/") {
                if v.as_str() == Some(name) {
                    writes.push((k.to_string(), None));
                }
            }
            for prefix in ["flow", "svc", "svca"] {
                for (k, _) in sh.map.iter_prefix(&format!("{prefix}/{name}/")) {
                    writes.push((k.to_string(), None));
                }
            }
        }
        let n = writes.len();
        self.write_many(writes).await;
        info!(namespace = name, keys = n, "namespace removed");
        crate::events::record(
            crate::events::Kind::Membership,
            name,
            format!("namespace {name} removed"),
        );
        Ok(json!({ "removed": name }))
    }

    /// Stores a flow for a namespace (default: this node's); every member runs its share.
    pub async fn flow_apply(
        &self,
        source: &str,
        file: &str,
        ns: Option<String>,
    ) -> Result<Value, ApiError> {
        let flow = crate::runtime::flow::parse_flow(source, Path::new(file))
            .map_err(|e| ApiError::from(&crate::runtime::RuntimeError::from(e)))?;
        let ns = self.target_ns(ns)?;
        let key = format!("flow/{ns}/{}", flow.name);
        let unchanged = self
            .get(&key)
            .is_some_and(|v| v.get("source").and_then(Value::as_str) == Some(source));
        if !unchanged {
            self.write(key, Some(json!({ "source": source, "file": file })))
                .await;
            info!(flow = %flow.name, namespace = %ns, "flow stored in the cluster state");
            crate::events::record(
                crate::events::Kind::Placement,
                &flow.name,
                format!("flow {} stored in {ns}", flow.name),
            );
        }
        Ok(json!({
            "flow": flow.name,
            "namespace": ns,
            "priority": flow.priority,
            "replicas": flow.replicas,
            "pools": flow.pools.iter().map(|p| p.name.clone()).collect::<Vec<_>>(),
            "changed": !unchanged,
        }))
    }

    pub async fn flow_remove(&self, name: &str, ns: Option<String>) -> Result<Value, ApiError> {
        let ns = self.target_ns(ns)?;
        let key = format!("flow/{ns}/{name}");
        if self.get(&key).is_none() {
            return Err(ApiError::new(
                404,
                "unknown_flow",
                format!("no flow named {name:?} in namespace {ns}"),
            ));
        }
        self.write(key, None).await;
        Ok(json!({ "removed": name, "namespace": ns }))
    }

    /// Flows of a namespace in the replicated state, with where they run.
    pub fn flow_list(&self, ns: Option<String>) -> Result<Vec<FlowPlacement>, ApiError> {
        let ns = self.target_ns(ns)?;
        Ok(self.namespace(&ns).map(|v| v.flows).unwrap_or_default())
    }

    /// Stores a service for a namespace (default: this node's); the leader places it.
    pub async fn service_set(
        &self,
        name: &str,
        request: crate::services::spec::ServiceRequest,
    ) -> Result<Value, ApiError> {
        let ns = self.target_ns(request.ns.clone())?;
        let spec = request
            .into_spec(name)
            .map_err(|e| ApiError::new(400, "invalid_service", e.to_string()))?;
        if let Some(text) = spec.template_text(&ns) {
            let name = spec.name.clone();
            tokio::task::spawn_blocking(move || super::services::verify_unit(&name, &text))
                .await
                .map_err(|e| ApiError::internal(format!("unit check task: {e}")))?
                .map_err(|e| ApiError::new(400, "invalid_service", e))?;
        }
        let key = super::services::spec_key(&ns, name);
        let value = serde_json::to_value(&spec)
            .map_err(|e| ApiError::internal(format!("service spec: {e}")))?;
        let changed = self.get(&key).as_ref() != Some(&value);
        if changed {
            self.write(key, Some(value)).await;
            info!(service = name, namespace = %ns, count = spec.count, "service stored in the cluster state");
            crate::events::record(
                crate::events::Kind::Placement,
                name,
                format!("service {name} stored in {ns} with count {}", spec.count),
            );
        }
        Ok(json!({
            "service": name,
            "namespace": ns,
            "count": spec.count,
            "digest": spec.digest(),
            "changed": changed,
        }))
    }

    pub async fn service_remove(&self, name: &str, ns: Option<String>) -> Result<Value, ApiError> {
        let ns = self.target_ns(ns)?;
        let key = super::services::spec_key(&ns, name);
        if self.get(&key).is_none() {
            return Err(unknown_service(name, &ns));
        }
        self.write(key, None).await;
        info!(service = name, namespace = %ns, "service removed; its instances stop");
        crate::events::record(
            crate::events::Kind::Placement,
            name,
            format!("service {name} removed from {ns}"),
        );
        Ok(json!({ "removed": name, "namespace": ns }))
    }

    pub fn service_list(
        &self,
        ns: Option<String>,
    ) -> Result<Vec<super::services::ServiceView>, ApiError> {
        let ns = self.target_ns(ns)?;
        Ok(self.namespace(&ns).map(|v| v.services).unwrap_or_default())
    }

    pub fn service_show(
        &self,
        name: &str,
        ns: Option<String>,
    ) -> Result<super::services::ServiceView, ApiError> {
        let ns = self.target_ns(ns.clone())?;
        self.service_list(Some(ns.clone()))?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| unknown_service(name, &ns))
    }

    fn target_ns(&self, ns: Option<String>) -> Result<String, ApiError> {
        let ns = match ns.or_else(|| self.my_namespace()) {
            Some(ns) => ns,
            None => {
                return Err(ApiError::new(
                    409,
                    "not_in_namespace",
                    "this node is in no namespace: name one with `--ns NAME`",
                ));
            }
        };
        if self.get(&format!("ns/{ns}")).is_none() {
            return Err(unknown_ns(&ns));
        }
        Ok(ns)
    }
}

fn unknown_service(name: &str, ns: &str) -> ApiError {
    ApiError::new(
        404,
        "unknown_service",
        format!("no service named {name:?} in namespace {ns}"),
    )
}

fn unknown_ns(name: &str) -> ApiError {
    ApiError::new(
        404,
        "unknown_namespace",
        format!("no namespace named {name:?}"),
    )
}

fn validate_ns_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            400,
            "invalid_name",
            format!("`{name}`: a namespace name is 1–63 letters, digits, `.`, `_` or `-`"),
        ))
    }
}

/// A member with its metadata decoded.
struct Known {
    member: Member,
    id: Option<NodeId>,
    meta: Option<NodeMeta>,
}

/// What one pass decided under the lock.
struct Plan {
    /// This node's namespace for the floating IP.
    vip: Option<super::VipInput>,
    /// This node's share: flow name → (source, file).
    my_flows: BTreeMap<String, (String, String)>,
    /// `done`/`dall` subscriptions declared in this node's namespace.
    routes: Vec<RemoteRoute>,
    meta_changed: bool,
    namespaces: Vec<NsView>,
    /// Assignment writes of the services this node leads.
    svc_writes: Vec<(String, Option<Value>)>,
    /// This node's share of services (`None`: no agent attached).
    svc_input: Option<crate::services::agent::ServicesInput>,
}

/// One pass: membership + state → leaders, this node's claim, its flows, the registry.
async fn reconcile(inner: &Arc<Inner>, membership: &Arc<Membership>, runtime: &Arc<Runtime>) {
    let members = membership.members().await;
    inner.members.store(members.len(), Ordering::Relaxed);
    let known: Vec<Known> = members
        .into_iter()
        .map(|m| Known {
            id: m.id.parse::<uuid::Uuid>().ok().map(NodeId),
            meta: serde_json::from_slice(&m.meta).ok(),
            member: m,
        })
        .collect();

    let mut plan = plan(inner, &mut inner.lock(), &known);
    // Namespaces and placement are known now; the pools of this node's share may take a while.
    {
        let mut snap = inner.snapshot.write().unwrap_or_else(|e| e.into_inner());
        *snap = Arc::new(Snapshot {
            nodes: snap.nodes.clone(),
            namespaces: plan.namespaces.clone(),
        });
    }
    let hook = inner.vip.read().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some(hook) = hook {
        hook.update(plan.vip.take());
    }
    if !plan.svc_writes.is_empty() {
        let writes = std::mem::take(&mut plan.svc_writes);
        info!(keys = writes.len(), "services placed");
        write_and_push(inner, membership, writes).await;
    }
    let agent = inner
        .services
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|(a, _)| a.clone());
    if let (Some(agent), Some(input)) = (agent, plan.svc_input.take()) {
        agent.update(input);
    }
    if plan.meta_changed
        && let Err(e) = membership.update_meta().await
    {
        warn!(error = %e, "cannot gossip this node's metadata");
    }

    // This node's share of flows → the local runtime (blocking work off the async threads).
    let rt = runtime.clone();
    let failed_before: BTreeMap<String, (String, String)> = inner.lock().failed.clone();
    let (my_flows, routes) = (plan.my_flows, plan.routes);
    let result = tokio::task::spawn_blocking(move || {
        rt.set_remote_routes(routes);
        apply_share(&rt, &my_flows, &failed_before)
    })
    .await;
    let (pools, failed) = match result {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "reconcile task failed");
            return;
        }
    };
    write_registry_entry(inner, membership.advertise(), pools, failed);

    // Snapshot for the API and the forwarding table for the gateway.
    let (registry, nodes) = views(inner, &inner.lock(), &known);
    *inner.registry.write().unwrap_or_else(|e| e.into_inner()) = registry;
    let mut snap = inner.snapshot.write().unwrap_or_else(|e| e.into_inner());
    for (node, text) in membership_changes(&snap.nodes, &nodes) {
        crate::events::record(crate::events::Kind::Membership, &node, text);
    }
    *snap = Arc::new(Snapshot {
        nodes,
        namespaces: plan.namespaces,
    });
    drop(snap);
    inner.passes.send_modify(|n| *n += 1);
    if let Some(observe) = inner
        .observer
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
    {
        observe();
    }
}

/// Members that appeared or changed state between two views, as event texts.
fn membership_changes(before: &[NodeView], after: &[NodeView]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for n in after {
        let state = format!("{:?}", n.state).to_lowercase();
        match before.iter().find(|b| b.id == n.id) {
            Some(b) if b.state == n.state => {}
            Some(b) => {
                let was = format!("{:?}", b.state).to_lowercase();
                out.push((
                    n.name.clone(),
                    format!("node {} is {state} (was {was})", n.name),
                ));
            }
            None => out.push((n.name.clone(), format!("node {} seen, {state}", n.name))),
        }
    }
    out
}

/// See [`Cluster::set_observer`].
pub type PassObserver = Box<dyn Fn() + Send + Sync>;

/// Leaders, this node's lease and claim, placement and its share, and the namespace views:
/// computation only, under the state lock.
fn plan(inner: &Inner, sh: &mut Shared, known: &[Known]) -> Plan {
    let up: BTreeSet<NodeId> = known
        .iter()
        .filter(|k| k.member.state.is_up())
        .filter_map(|k| k.id)
        .collect();
    let ns_names: Vec<String> = sh
        .map
        .iter_prefix("ns/")
        .map(|(k, _)| k.trim_start_matches("ns/").to_string())
        .collect();
    let my_ns = sh
        .map
        .get(&format!("nsm/{}", inner.me))
        .and_then(Value::as_str)
        .map(str::to_string);
    let mut plan = Plan {
        vip: None,
        my_flows: BTreeMap::new(),
        routes: Vec::new(),
        meta_changed: false,
        namespaces: Vec::new(),
        svc_writes: Vec::new(),
        svc_input: None,
    };
    let services = inner
        .services
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|(_, max)| *max);
    if services.is_some() {
        plan.svc_input = Some(crate::services::agent::ServicesInput {
            ready: true,
            ..Default::default()
        });
    }
    let capacity: BTreeMap<NodeId, u32> = known
        .iter()
        .filter_map(|k| Some((k.id?, k.meta.as_ref().map_or(100, |m| m.capacity))))
        .collect();
    // Draining nodes, this one included from the moment it was asked (its metadata follows).
    let draining_here = inner.draining.load(Ordering::SeqCst);
    let mut draining: BTreeSet<NodeId> = known
        .iter()
        .filter(|k| k.meta.as_ref().is_some_and(|m| m.draining))
        .filter_map(|k| k.id)
        .collect();
    if draining_here {
        draining.insert(inner.me);
    } else {
        draining.remove(&inner.me);
    }
    let mut my_lead = None;
    for ns in &ns_names {
        let mine = my_ns.as_deref() == Some(ns.as_str());
        let members: BTreeSet<NodeId> = sh
            .map
            .iter_prefix("nsm/")
            .filter(|(_, v)| v.as_str() == Some(ns.as_str()))
            .filter_map(|(k, _)| k.trim_start_matches("nsm/").parse::<uuid::Uuid>().ok())
            .map(NodeId)
            .collect();
        let claims: BTreeMap<NodeId, u64> = known
            .iter()
            .filter(|k| k.member.state.is_up())
            .filter_map(|k| {
                let m = k.meta.as_ref()?;
                (m.lead.as_deref() == Some(ns.as_str()))
                    .then_some((k.id?, m.lead_since.unwrap_or(0)))
            })
            .collect();
        let previous = sh.leaders.get(ns).copied().flatten();
        let quorum = leader::has_quorum(&members, &up);
        let mut elected = leader::elect(&View {
            members: &members,
            alive: &up,
            claims: &claims,
            previous,
            draining: &draining,
        });
        let ns_entry = sh.map.get(&format!("ns/{ns}")).cloned();
        let vip = ns_entry
            .as_ref()
            .and_then(|v| v.get("vip"))
            .and_then(Value::as_str)
            .map(str::to_string);
        // In this node's namespace, the holder of the floating IP leads: the address and the
        // leader-only work stay together, and the VIP's fast path moves both.
        if mine && vip.is_some() && quorum {
            let hook = inner.vip.read().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(holder) = hook.and_then(|h| h.holder(ns))
                && members.contains(&holder)
            {
                elected = Some(holder);
            }
        }
        if previous != elected || !sh.leaders.contains_key(ns) {
            record_leader_change(sh, known, ns, previous, elected, quorum);
        }
        if mine && let Some(vip) = &vip {
            plan.vip = Some(super::VipInput {
                ns: ns.clone(),
                vip: vip.clone(),
                members: members
                    .iter()
                    .filter_map(|id| {
                        let ip = known
                            .iter()
                            .find(|k| k.id == Some(*id))
                            .map(|k| k.member.addr.ip())
                            .or_else(|| {
                                sh.map
                                    .get(&format!("reg/{id}"))
                                    .and_then(|r| r.get("addr"))
                                    .and_then(Value::as_str)
                                    .and_then(|a| a.parse::<SocketAddr>().ok())
                                    .map(|a| a.ip())
                            })?;
                        Some((*id, node_name(&sh.map, known, *id), ip))
                    })
                    .collect(),
                leader: elected,
                health: ns_entry.as_ref().and_then(|v| v.get("health")).cloned(),
            });
        }
        // This node's own election is subject to its lease.
        let mut acting = elected;
        if mine {
            if elected == Some(inner.me) {
                if check_lease(inner, sh, ns, &members, previous) {
                    my_lead = Some(ns.clone());
                } else {
                    acting = None;
                }
            } else {
                sh.lease = None;
            }
        }

        // Placement over the up members, with their advertised capacity.
        let candidates: Vec<Candidate> = known
            .iter()
            .filter(|k| k.member.state.is_up())
            .filter_map(|k| {
                let id = k.id?;
                members.contains(&id).then(|| Candidate {
                    id,
                    capacity: k.meta.as_ref().map_or(100, |m| m.capacity),
                })
            })
            .collect();
        let flows = namespace_flows(&sh.map, &mut sh.decoded, ns);
        if mine {
            plan.routes.extend(flows.routes);
        }
        let placed = placement::place(&flows.specs, &candidates, acting);
        if mine {
            for name in placement::local_share(&placed, inner.me) {
                if let Some(s) = flows.sources.get(&name) {
                    plan.my_flows.insert(name, s.clone());
                }
            }
        }
        let name_of = |id: &NodeId| node_name(&sh.map, known, *id);
        let name_of_id = |id: NodeId| node_name(&sh.map, known, id);
        let svc = super::services::pass(
            &sh.map,
            &super::services::PassInput {
                ns,
                me: inner.me,
                members: &members,
                up: &up,
                capacity: &capacity,
                draining: &draining,
                leading: mine && acting == Some(inner.me) && services.is_some(),
                mine,
                max_failures: services.unwrap_or(3),
                name_of: &name_of_id,
            },
        );
        plan.svc_writes.extend(svc.writes);
        if mine && let Some(input) = plan.svc_input.as_mut() {
            input.desired.extend(svc.input.desired);
            input.specs.extend(svc.input.specs);
            input.active_elsewhere.extend(svc.input.active_elsewhere);
        }
        let state_of = |id: &NodeId| {
            known
                .iter()
                .find(|k| k.id == Some(*id))
                .map_or(MemberState::Dead, |k| k.member.state)
        };
        plan.namespaces.push(NsView {
            name: ns.clone(),
            vip: vip.clone(),
            health: ns_entry.as_ref().and_then(|v| v.get("health")).cloned(),
            members: members
                .iter()
                .map(|id| NsMember {
                    id: id.to_string(),
                    name: name_of(id),
                    state: state_of(id),
                })
                .collect(),
            leader: acting.as_ref().map(name_of),
            leader_id: acting.map(|id| id.to_string()),
            quorum,
            flows: flows
                .specs
                .iter()
                .map(|s| FlowPlacement {
                    name: s.name.clone(),
                    priority: s.priority,
                    replicas: s.replicas,
                    nodes: placed
                        .get(&s.name)
                        .map(|ids| ids.iter().map(name_of).collect())
                        .unwrap_or_default(),
                })
                .collect(),
            services: svc.views,
            history: sh.history.get(ns).cloned().unwrap_or_default(),
        });
    }
    sh.leaders.retain(|ns, _| ns_names.contains(ns));
    let Shared { decoded, map, .. } = &mut *sh;
    decoded.retain(|k, _| map.get(k).is_some());
    // No namespace (or it is gone): no election of this node, no lease.
    let elected_here = my_ns
        .as_ref()
        .is_some_and(|ns| sh.leaders.get(ns) == Some(&Some(inner.me)));
    if !elected_here {
        sh.lease = None;
    }
    plan.meta_changed =
        sh.meta.lead != my_lead || sh.meta.ns != my_ns || sh.meta.draining != draining_here;
    sh.meta.draining = draining_here;
    if my_lead.is_none() {
        sh.meta.lead_since = None;
    } else if sh.meta.lead != my_lead {
        sh.meta.lead_since = Some(physical_now_ms());
    }
    sh.meta.lead = my_lead;
    sh.meta.ns = my_ns;
    plan
}

/// A node's name from its metadata, else its registry entry, else its id.
fn node_name(map: &StateMap, known: &[Known], id: NodeId) -> String {
    known
        .iter()
        .find(|k| k.id == Some(id))
        .and_then(|k| k.meta.as_ref().map(|m| m.name.clone()))
        .or_else(|| {
            map.get(&format!("reg/{id}"))
                .and_then(|r| r.get("name"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| id.to_string())
}

/// Logs a change of `ns`'s leader in this node's view and keeps it for `ns show`.
fn record_leader_change(
    sh: &mut Shared,
    known: &[Known],
    ns: &str,
    previous: Option<NodeId>,
    elected: Option<NodeId>,
    quorum: bool,
) {
    let name_of = |id: Option<NodeId>| id.map(|id| node_name(&sh.map, known, id));
    let kind = leader::change(previous, elected);
    if kind != leader::Change::Unchanged {
        let change = LeaderChange {
            at_unix_ms: physical_now_ms(),
            from: name_of(previous),
            to: name_of(elected),
        };
        match (&change.from, &change.to) {
            (_, Some(to)) => {
                info!(namespace = %ns, leader = %to, previous = ?change.from, quorum, "namespace leader");
                let was = change
                    .from
                    .as_deref()
                    .map_or(String::new(), |f| format!(" (was {f})"));
                crate::events::record(
                    crate::events::Kind::Leader,
                    ns,
                    format!("leader of {ns}: {to}{was}"),
                );
            }
            (Some(from), None) => {
                warn!(namespace = %ns, previous = %from, quorum, "namespace has no leader (no quorum)");
                crate::events::record(
                    crate::events::Kind::Leader,
                    ns,
                    format!("{ns} has no leader (was {from}; no quorum)"),
                );
            }
            (None, None) => {}
        }
        let h = sh.history.entry(ns.to_string()).or_default();
        h.push(change);
        if h.len() > HISTORY {
            h.remove(0);
        }
    }
    sh.leaders.insert(ns.to_string(), elected);
}

/// This node is elected leader of `ns` in its own view: whether its lease lets it act.
fn check_lease(
    inner: &Inner,
    sh: &mut Shared,
    ns: &str,
    members: &BTreeSet<NodeId>,
    previous: Option<NodeId>,
) -> bool {
    let now = Instant::now();
    let window = inner.lease_window;
    let acked = {
        let acks = inner.acks.lock().unwrap_or_else(|e| e.into_inner());
        1 + members
            .iter()
            .filter(|m| **m != inner.me)
            .filter(|m| acks.get(m).is_some_and(|t| now - *t < window))
            .count()
    };
    // Replacing another leader (not a first election): wait one window.
    let takeover = previous.is_some_and(|p| p != inner.me);
    let lease = sh.lease.get_or_insert(Lease {
        start: if takeover { now + window } else { now },
        lapsed: false,
    });
    let state = lease.state(acked, members.len(), now, window);
    match state {
        LeaseState::Lapsed if !lease.lapsed => {
            warn!(namespace = %ns, acked, members = members.len(), "leader lease lapsed: a majority did not answer; leader-only work stops");
            crate::events::record(
                crate::events::Kind::Leader,
                ns,
                format!(
                    "lease lapsed: {acked} of {} members answered; leader-only work stops",
                    members.len()
                ),
            );
        }
        LeaseState::Holds if lease.lapsed => {
            info!(namespace = %ns, acked, "leader lease regained");
            crate::events::record(crate::events::Kind::Leader, ns, "lease regained");
        }
        _ => {}
    }
    lease.lapsed = state == LeaseState::Lapsed;
    state == LeaseState::Holds
}

/// The flows stored for one namespace, decoded.
struct NamespaceFlows {
    specs: Vec<FlowSpec>,
    /// Flow name → (source, file).
    sources: BTreeMap<String, (String, String)>,
    routes: Vec<RemoteRoute>,
}

/// What placement and subscriptions need from one stored flow.
#[derive(Debug, Clone)]
struct DecodedFlow {
    spec: FlowSpec,
    routes: Vec<RemoteRoute>,
}

fn decode_flow(name: &str, source: &str, file: &str) -> Option<DecodedFlow> {
    // Checked when it was applied; a flow this version cannot read is skipped.
    let flow = crate::runtime::flow::parse_flow(source, Path::new(file)).ok()?;
    let mut routes = Vec::new();
    for spec in &flow.pools {
        for sub in spec
            .subs
            .iter()
            .filter(|s| matches!(s.delivery, Delivery::Any | Delivery::Every))
        {
            routes.push(RemoteRoute {
                from: sub.from.clone(),
                to: spec.name.clone(),
                filter: sub.filter.clone(),
                delivery: sub.delivery,
            });
        }
    }
    Some(DecodedFlow {
        spec: FlowSpec {
            name: name.to_string(),
            priority: flow.priority,
            replicas: flow.replicas,
            cost: flow.pools.iter().map(|p| p.max.max(1)).sum::<u32>().max(1),
        },
        routes,
    })
}

/// The flows of `ns`, parsing only those whose stored version changed since the last pass
/// (the leader runs a pass several times a second).
fn namespace_flows(
    map: &StateMap,
    decoded: &mut HashMap<String, (Hlc, Option<DecodedFlow>)>,
    ns: &str,
) -> NamespaceFlows {
    let mut out = NamespaceFlows {
        specs: Vec::new(),
        sources: BTreeMap::new(),
        routes: Vec::new(),
    };
    for (k, v) in map.iter_prefix(&format!("flow/{ns}/")) {
        let Some(version) = map.entry(k).map(|e| e.version) else {
            continue;
        };
        let name = k.rsplit('/').next().unwrap_or_default().to_string();
        let source = v.get("source").and_then(Value::as_str).unwrap_or_default();
        let file = v.get("file").and_then(Value::as_str).unwrap_or(k);
        let cached = decoded.get(k).filter(|(v, _)| *v == version);
        let flow = match cached {
            Some((_, flow)) => flow.clone(),
            None => {
                let flow = decode_flow(&name, source, file);
                decoded.insert(k.to_string(), (version, flow.clone()));
                flow
            }
        };
        let Some(flow) = flow else { continue };
        out.routes.extend(flow.routes);
        out.specs.push(flow.spec);
        out.sources
            .insert(name, (source.to_string(), file.to_string()));
    }
    out
}

/// Rewrites this node's `reg/` entry when what it runs changed.
fn write_registry_entry(
    inner: &Inner,
    addr: SocketAddr,
    pools: Vec<String>,
    failed: BTreeMap<String, (String, String)>,
) {
    let mut sh = inner.lock();
    let key = format!("reg/{}", inner.me);
    let mut value = json!({
        "name": sh.meta.name,
        "peer": sh.meta.peer.to_string(),
        "addr": addr.to_string(),
        "pools": pools,
        "failed": failed.iter().map(|(k, (_, e))| (k.clone(), json!(e))).collect::<serde_json::Map<_, _>>(),
    });
    if let Some((agent, _)) = inner
        .services
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
    {
        // Until the agent has heard from systemd, the last report stands (see `Agent`).
        let report = match agent.report() {
            Some(r) => Some(super::services::report_value(&r)),
            None => sh.map.get(&key).and_then(|v| v.get("services")).cloned(),
        };
        if let Some(r) = report {
            value["services"] = r;
        }
    }
    sh.failed = failed;
    if sh.map.get(&key) == Some(&value) {
        return;
    }
    let version = sh.clock.now(physical_now_ms());
    sh.map.set(key.clone(), value, version);
    sh.gossip(&key);
    inner.save(&sh.map);
}

/// The forwarding table (pools on other up nodes) and the `node ls` view.
fn views(inner: &Inner, sh: &Shared, known: &[Known]) -> (Registry, Vec<NodeView>) {
    let mut registry = Registry::default();
    let mut nodes = Vec::new();
    let systemd_of = |id: &str| {
        sh.map
            .get(&format!("reg/{id}"))
            .and_then(|r| r.get("services"))
            .and_then(|s| s.get("systemd"))
            .and_then(Value::as_bool)
    };
    let namespace_of = |id: &str| {
        sh.map
            .get(&format!("nsm/{id}"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let mut draining_ids: BTreeSet<String> = BTreeSet::new();
    for k in known {
        let Some(id) = k.id else { continue };
        if k.meta.as_ref().is_some_and(|m| m.draining) {
            draining_ids.insert(id.to_string());
        }
        let pools: Vec<String> = sh
            .map
            .get(&format!("reg/{id}"))
            .and_then(|r| r.get("pools"))
            .and_then(|p| serde_json::from_value(p.clone()).ok())
            .unwrap_or_default();
        let meta = k.meta.as_ref();
        let name = meta.map_or_else(|| id.to_string(), |m| m.name.clone());
        let up = k.member.state.is_up();
        if up {
            registry.up.insert(id.to_string());
            if id != inner.me
                && let Some(m) = meta
            {
                for p in &pools {
                    registry.pools.entry(p.clone()).or_default().push((
                        id.to_string(),
                        name.clone(),
                        m.peer,
                    ));
                }
            }
        }
        let namespace = namespace_of(&id.to_string());
        nodes.push(NodeView {
            id: id.to_string(),
            name,
            addr: k.member.addr,
            state: k.member.state,
            leader: up && meta.is_some_and(|m| m.lead.is_some() && m.lead == namespace),
            namespace,
            version: meta.map(|m| m.version.clone()).unwrap_or_default(),
            capacity: meta.map_or(0, |m| m.capacity),
            peer: meta.map(|m| m.peer),
            mac: meta.and_then(|m| m.mac.clone()),
            pools,
            systemd: systemd_of(&id.to_string()),
            gateway: meta.and_then(|m| m.gateway),
            draining: meta.is_some_and(|m| m.draining),
        });
    }
    // Nodes memberlist has forgotten (dead longer than gossip_to_the_dead_time) but that still
    // have a registry entry: shown as dead rather than vanishing.
    for (k, reg) in sh.map.iter_prefix("reg/") {
        let id = k.trim_start_matches("reg/");
        if nodes.iter().any(|n| n.id == id) {
            continue;
        }
        nodes.push(NodeView {
            id: id.to_string(),
            name: reg
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or(id)
                .to_string(),
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            state: MemberState::Dead,
            namespace: namespace_of(id),
            leader: false,
            version: String::new(),
            capacity: 0,
            peer: reg
                .get("peer")
                .and_then(Value::as_str)
                .and_then(|p| p.parse().ok()),
            mac: None,
            pools: Vec::new(),
            systemd: systemd_of(id),
            gateway: None,
            draining: false,
        });
    }
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    // Calls go to a draining node only when no other node runs the pool.
    for entries in registry.pools.values_mut() {
        if entries.iter().any(|(id, _, _)| !draining_ids.contains(id)) {
            entries.retain(|(id, _, _)| !draining_ids.contains(id));
        }
    }
    (registry, nodes)
}

/// Brings the local runtime to `wanted` (flow name → (source, file)). Returns the pools now
/// running and the flows that failed (kept until their source changes, so a broken flow is not
/// retried every second).
fn apply_share(
    rt: &Runtime,
    wanted: &BTreeMap<String, (String, String)>,
    failed_before: &BTreeMap<String, (String, String)>,
) -> (Vec<String>, BTreeMap<String, (String, String)>) {
    let mut failed = BTreeMap::new();
    // Plugins' flows are this node's own (its packages'): not in `current`, so they are
    // neither replaced nor stopped here. A placed flow of a plugin's flow name is refused by
    // the runtime (`plugin_flow`) and reported like any flow that cannot run.
    let current = rt.flow_sources();
    for (name, (source, file)) in wanted {
        if current.get(name) == Some(source) {
            continue;
        }
        if let Some((src, err)) = failed_before.get(name)
            && src == source
        {
            failed.insert(name.clone(), (src.clone(), err.clone()));
            continue;
        }
        match rt.apply(source, Path::new(file)) {
            Ok(r) => {
                info!(flow = %name, started = r.started.len(), restarted = r.restarted.len(), "flow placed on this node");
                crate::events::record(
                    crate::events::Kind::Placement,
                    name,
                    format!(
                        "flow {name} placed on this node: {} pools started, {} restarted",
                        r.started.len(),
                        r.restarted.len()
                    ),
                );
            }
            Err(e) => {
                let msg = format!("{e:#}");
                warn!(flow = %name, error = %msg, "cannot run flow placed on this node");
                crate::events::record(
                    crate::events::Kind::Failure,
                    name,
                    format!("cannot run flow {name} placed on this node: {msg}"),
                );
                failed.insert(name.clone(), (source.clone(), msg));
            }
        }
    }
    // In cluster mode the replicated state is the only source of flows: outside any namespace
    // a node runs none, and flows applied before it joined are stopped.
    for name in current.keys() {
        if !wanted.contains_key(name) {
            match rt.remove(name) {
                Ok(_) => {
                    info!(flow = %name, "flow no longer placed on this node; stopped");
                    crate::events::record(
                        crate::events::Kind::Placement,
                        name,
                        format!("flow {name} no longer placed on this node; stopped"),
                    );
                }
                Err(e) => warn!(flow = %name, error = %e, "cannot stop flow"),
            }
        }
    }
    let mut pools: Vec<String> = rt.pool_statuses().into_iter().map(|p| p.name).collect();
    pools.sort();
    (pools, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(id: &str, state: MemberState) -> NodeView {
        NodeView {
            id: id.into(),
            name: format!("n-{id}"),
            addr: "10.0.0.1:7946".parse().unwrap(),
            state,
            namespace: None,
            leader: false,
            version: "0".into(),
            capacity: 1,
            peer: None,
            mac: None,
            pools: vec![],
            systemd: None,
            gateway: None,
            draining: false,
        }
    }

    #[test]
    fn membership_changes_name_new_members_and_state_changes_only() {
        let before = [view("a", MemberState::Alive), view("b", MemberState::Alive)];
        let after = [
            view("a", MemberState::Alive),
            view("b", MemberState::Dead),
            view("c", MemberState::Alive),
        ];
        let got = membership_changes(&before, &after);
        assert_eq!(
            got,
            [
                (
                    "n-b".to_string(),
                    "node n-b is dead (was alive)".to_string()
                ),
                ("n-c".to_string(), "node n-c seen, alive".to_string()),
            ]
        );
        assert!(membership_changes(&after, &after).is_empty());
    }

    #[test]
    fn hosts_file_takes_addresses_and_bare_ips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(HOSTS_FILE);
        std::fs::write(
            &path,
            "# seeds\n10.0.0.1:7000\n\n10.0.0.2   # default port\nnot-an-address\n[fd00::1]:7001\n",
        )
        .unwrap();
        let got = read_hosts_file(&path, 7946);
        let want: Vec<SocketAddr> = ["10.0.0.1:7000", "10.0.0.2:7946", "[fd00::1]:7001"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(got, want);
        assert!(read_hosts_file(&dir.path().join("missing"), 1).is_empty());
    }

    #[test]
    fn node_meta_fits_memberlist_and_round_trips() {
        let meta = NodeMeta {
            name: "n".repeat(63),
            ns: Some("s".repeat(63)),
            lead: Some("s".repeat(63)),
            lead_since: Some(u64::MAX),
            peer: "[fd00:1234:5678:9abc:def0:1234:5678:9abc]:65535"
                .parse()
                .unwrap(),
            gateway: Some(
                "[fd00:1234:5678:9abc:def0:1234:5678:9abc]:65535"
                    .parse()
                    .unwrap(),
            ),
            mac: Some("02:00:00:00:00:01".into()),
            version: "10.20.30".into(),
            capacity: u32::MAX,
            draining: true,
        };
        let bytes = serde_json::to_vec(&meta).unwrap();
        assert!(
            bytes.len() <= super::super::membership::META_LIMIT,
            "{}",
            bytes.len()
        );
        assert_eq!(serde_json::from_slice::<NodeMeta>(&bytes).unwrap(), meta);
    }

    #[test]
    fn the_lease_needs_a_majority_after_its_grace() {
        use LeaseState::*;
        let t0 = Instant::now();
        let w = Duration::from_millis(500);
        let ms = Duration::from_millis;
        let fresh = Lease {
            start: t0,
            lapsed: false,
        };
        // Just elected: grace, even alone.
        assert_eq!(fresh.state(1, 5, t0 + ms(100), w), Holds);
        // After the grace: a strict majority of the members must have acked.
        assert_eq!(fresh.state(2, 5, t0 + w, w), Lapsed);
        assert_eq!(fresh.state(3, 5, t0 + w, w), Holds);
        assert_eq!(fresh.state(1, 1, t0 + w * 10, w), Holds);
        assert_eq!(fresh.state(2, 4, t0 + w, w), Lapsed);
        // A lapsed lease gets no second grace.
        let lapsed = Lease {
            start: t0,
            lapsed: true,
        };
        assert_eq!(lapsed.state(1, 3, t0, w), Lapsed);
        assert_eq!(lapsed.state(2, 3, t0, w), Holds);
        // Taking over: nothing before the start, even with every ack; then as usual.
        let takeover = Lease {
            start: t0 + w,
            lapsed: false,
        };
        assert_eq!(takeover.state(5, 5, t0 + ms(499), w), Waiting);
        assert_eq!(takeover.state(1, 5, t0 + w, w), Holds);
        assert_eq!(takeover.state(1, 5, t0 + w * 2, w), Lapsed);
    }

    #[test]
    fn apply_share_leaves_plugin_flows_alone_and_reports_a_placed_flow_of_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let (_tokio, rt) = crate::runtime::test_runtime(dir.path());
        let text = "name: stats\nfunc:\n  - name: stats_pool\n    cmd: [/bin/cat]\n";
        let flow =
            crate::runtime::flow::parse_flow(text, Path::new("/plugins/stats/flow.yaml")).unwrap();
        rt.apply_plugin(flow, text, "stats").unwrap();
        // Nothing placed here: the plugin's flow stays.
        let (pools, failed) = apply_share(&rt, &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(pools, ["stats_pool"]);
        assert!(failed.is_empty());
        // A cluster flow of the plugin's flow name: not run here, reported; the plugin's runs.
        let placed = "name: stats\nfunc:\n  - name: other\n    cmd: [/bin/cat]\n";
        let wanted: BTreeMap<String, (String, String)> = [(
            "stats".to_string(),
            (placed.to_string(), "stats.yaml".to_string()),
        )]
        .into();
        let (pools, failed) = apply_share(&rt, &wanted, &BTreeMap::new());
        assert_eq!(pools, ["stats_pool"]);
        let why = &failed["stats"].1;
        assert!(why.contains("comes from plugin stats"), "{why}");
        // Reported once: the next pass remembers it failed for this source.
        let (_, again) = apply_share(&rt, &wanted, &failed);
        assert_eq!(again, failed);
    }

    #[test]
    fn namespace_names_are_checked() {
        assert!(validate_ns_name("web-1.prod_a").is_ok());
        for bad in ["", "-x", ".x", "a/b", "a b", &"x".repeat(64)] {
            assert_eq!(validate_ns_name(bad).unwrap_err().status, 400, "{bad:?}");
        }
    }
}
