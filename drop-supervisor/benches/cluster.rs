//! `cargo xtask bench cluster` drives this binary (harness = false): many cluster members in one
//! process (one tokio multi-thread runtime), on 127.0.0.1, each with its own port, encrypted with
//! a cluster key as in production.
//!
//! For each cluster size and timing profile, on a fresh cluster per run:
//!
//! 1. converge: start N members, join each to the seeds (members 0 and 1), time until every
//!    member's `members()` lists N alive members;
//! 2. update spread right after convergence: one member writes a small `StateMap` entry and
//!    gossips it through the product's `BroadcastQueue` (`Application::broadcasts`); every member
//!    that learns it queues it again (epidemic, as the product does); time until every member
//!    holds it. memberlist is still gossiping the joins at that point;
//! 3. crash detection, process exit: `stop()` one non-seed member (no leave) and time until every
//!    survivor's `members()` shows it down (dead, left) or gone. Its ports now refuse
//!    connections, so memberlist's TCP fallback probe fails at once;
//! 4. update spread in the settled cluster, as in 2;
//! 5. crash detection, silent host: as in 3, but the victim's ports are then taken by sockets
//!    that never answer, so the TCP fallback probe waits for its `timeout` as it would for a
//!    crashed machine.
//!
//! `members()` of every member still waiting is read every `--poll-ms`; the spread is timed by
//! the replicas themselves (when each first held the entry).
//!
//! Arguments (all optional):
//!
//! - `--nodes 50,100,200`: cluster sizes with the `lan` profile
//! - `--fast-nodes 5,10`: cluster sizes with the `fast` profile
//! - `--runs 3`: runs per size (a fresh cluster each); the median is reported
//! - `--lan KNOB=VALUE,...`, `--fast KNOB=VALUE,...`: override knobs of a profile, named as the
//!   fields of `Timing` (`suspicion_mult=2`, `probe_interval=300ms`, ...)
//! - `--poll-ms 20`: how often each member's `members()` is read
//!
//! Progress goes to stderr; the markdown report to stdout.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use drop_supervisor::cluster::broadcast::BroadcastQueue;
use drop_supervisor::cluster::membership::{
    Application, MemberState, Membership, MembershipOptions, Timing, generate_key, parse_key,
};
use drop_supervisor::cluster::state::{Clock, Entry, NodeId, StateMap, physical_now_ms};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use uuid::Uuid;

/// The seeds every member joins.
const SEEDS: usize = 2;
/// The wait between convergence and the first update.
const AFTER_CONVERGE: Duration = Duration::from_secs(1);
/// The wait between the other steps of a run.
const PAUSE: Duration = Duration::from_millis(500);

/// Reference figures: HashiCorp memberlist with its LAN defaults (`DefaultLANConfig`), not
/// measured here.
const REF_DETECTION: &str = "≈ 10 s";
const REF_SPREAD: &str = "< 1 s";

/// A gossiped batch of entries, in the product's wire format (cluster/node.rs).
#[derive(Serialize, Deserialize)]
struct Message {
    e: Vec<(String, Entry)>,
}

struct Replica {
    map: StateMap,
    clock: Clock,
    queue: BroadcastQueue,
    /// When each key was first held here.
    seen: HashMap<String, Instant>,
}

#[derive(Default)]
struct Watch {
    armed: bool,
    events: u32,
}

/// The bench's `Application`: a replicated `StateMap` spread by gossip and push/pull, and a
/// record of membership changes.
struct App {
    meta: Vec<u8>,
    /// Cluster size, for the retransmit limit (see `broadcasts`).
    size: usize,
    replica: Mutex<Replica>,
    watch: Mutex<Watch>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl App {
    fn new(id: Uuid, addr: SocketAddr, size: usize, retransmit_mult: usize) -> App {
        App {
            meta: format!(r#"{{"version":"0.1.0","api":"{addr}","zone":"bench"}}"#).into_bytes(),
            size,
            replica: Mutex::new(Replica {
                map: StateMap::new(),
                clock: Clock::new(NodeId(id)),
                queue: BroadcastQueue::new(u32::try_from(retransmit_mult).unwrap_or(u32::MAX)),
                seen: HashMap::new(),
            }),
            watch: Mutex::new(Watch::default()),
        }
    }

    /// A local write, gossiped from here.
    fn write(&self, key: &str, value: serde_json::Value) {
        let now = Instant::now();
        let mut r = lock(&self.replica);
        let version = r.clock.now(physical_now_ms());
        let entry = Entry {
            version,
            value: Some(value),
        };
        let msg = encode(vec![(key.to_string(), entry.clone())]);
        r.map.merge_entry(key, entry);
        r.seen.insert(key.to_string(), now);
        r.queue.queue(key, msg);
    }

    fn seen(&self, key: &str) -> Option<Instant> {
        lock(&self.replica).seen.get(key).copied()
    }

    /// Starts counting membership changes.
    fn arm(&self) {
        *lock(&self.watch) = Watch {
            armed: true,
            events: 0,
        };
    }

    /// Membership changes since `arm`.
    fn events(&self) -> u32 {
        lock(&self.watch).events
    }

    /// Merges received entries; newly learned ones are queued again (epidemic spread).
    fn ingest(&self, entries: Vec<(String, Entry)>, requeue: bool) {
        let now = Instant::now();
        let mut r = lock(&self.replica);
        for (key, entry) in entries {
            r.clock.observe(entry.version, physical_now_ms());
            if r.map.merge_entry(key.clone(), entry.clone()) {
                r.seen.entry(key.clone()).or_insert(now);
                if requeue {
                    let msg = encode(vec![(key.clone(), entry)]);
                    r.queue.queue(key, msg);
                }
            }
        }
    }
}

fn encode(e: Vec<(String, Entry)>) -> Vec<u8> {
    serde_json::to_vec(&Message { e }).expect("entries serialize")
}

impl Application for App {
    fn node_meta(&self) -> Vec<u8> {
        self.meta.clone()
    }

    fn on_message(&self, msg: &[u8]) {
        if let Ok(m) = serde_json::from_slice::<Message>(msg) {
            self.ingest(m.e, true);
        }
    }

    fn broadcasts(&self, _num_nodes: usize, limit: usize, overhead: usize) -> Vec<Bytes> {
        // memberlist's delegate API does not say how many members there are (the glue passes
        // usize::MAX); like the product, size the retransmit limit by the member count.
        lock(&self.replica)
            .queue
            .take(self.size, limit, overhead)
            .into_iter()
            .map(Bytes::from)
            .collect()
    }

    fn local_state(&self, _join: bool) -> Vec<u8> {
        let r = lock(&self.replica);
        encode(
            r.map
                .entries()
                .map(|(k, e)| (k.to_string(), e.clone()))
                .collect(),
        )
    }

    fn merge_remote_state(&self, buf: &[u8], _join: bool) {
        if let Ok(m) = serde_json::from_slice::<Message>(buf) {
            self.ingest(m.e, true);
        }
    }

    fn on_membership_change(&self) {
        let mut w = lock(&self.watch);
        if w.armed {
            w.events += 1;
        }
    }
}

/// Hands out ports below the kernel's ephemeral range (so outgoing connections never take
/// them), never the same one twice in a run.
struct Ports {
    next: u16,
    end: u16,
}

impl Ports {
    fn new(needed: usize) -> Ports {
        let ephemeral_lo = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
            .unwrap_or(32768);
        let needed = u16::try_from(needed * 2 + 500).unwrap_or(u16::MAX);
        let (lo, hi) = if ephemeral_lo > 20000 + needed {
            (20000, ephemeral_lo - needed)
        } else {
            (20000, 50000)
        };
        let seed = std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            std::process::id(),
        );
        let next = lo + u16::try_from(seed % u64::from(hi - lo)).unwrap_or(0);
        Ports {
            next,
            end: next.saturating_add(needed),
        }
    }

    /// A port free for both TCP and UDP on 127.0.0.1 right now.
    fn take(&mut self) -> anyhow::Result<SocketAddr> {
        while self.next < self.end {
            let addr = SocketAddr::from(([127, 0, 0, 1], self.next));
            self.next += 1;
            if TcpListener::bind(addr).is_ok() && UdpSocket::bind(addr).is_ok() {
                return Ok(addr);
            }
        }
        bail!("no free port left in the range")
    }
}

struct Node {
    id: String,
    app: Arc<App>,
    m: Arc<Membership>,
    up: bool,
}

struct Cluster {
    nodes: Vec<Node>,
    /// Sockets squatting the ports of silenced members (see `Crash::Silent`).
    black_holes: Vec<(TcpListener, UdpSocket)>,
}

/// How the victim of a crash looks to its peers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Crash {
    /// The process is gone: its ports answer a TCP connect with a reset at once.
    Exit,
    /// The machine is gone (or frozen): nothing answers. The victim is stopped and its port is
    /// taken by a TCP listener that never accepts and a UDP socket that never reads, so a
    /// probe's TCP fallback waits for its timeout as it would for a dead host.
    Silent,
}

impl Cluster {
    async fn start(
        n: usize,
        timing: Timing,
        key: &str,
        ports: &mut Ports,
    ) -> anyhow::Result<Cluster> {
        let mut cluster = Cluster {
            nodes: Vec::new(),
            black_holes: Vec::new(),
        };
        for _ in 0..n {
            match cluster.start_one(n, timing, key, ports).await {
                Ok(node) => cluster.nodes.push(node),
                Err(e) => {
                    cluster.stop_all().await;
                    return Err(e);
                }
            }
        }
        Ok(cluster)
    }

    async fn start_one(
        &self,
        n: usize,
        timing: Timing,
        key: &str,
        ports: &mut Ports,
    ) -> anyhow::Result<Node> {
        let mut last = None;
        for _ in 0..20 {
            let bind = ports.take()?;
            let id = Uuid::new_v4();
            let app = Arc::new(App::new(id, bind, n, timing.retransmit_mult));
            let opts = MembershipOptions {
                id: id.to_string(),
                bind,
                advertise: None,
                key: Some(parse_key(key).map_err(anyhow::Error::msg)?),
                timing,
            };
            match Membership::start(opts, app.clone()).await {
                Ok(m) => {
                    return Ok(Node {
                        id: id.to_string(),
                        app,
                        m: Arc::new(m),
                        up: true,
                    });
                }
                // Taken between the check and the bind: try the next port.
                Err(e) => last = Some(e),
            }
        }
        Err(last.map_or_else(|| anyhow::anyhow!("cannot start a member"), Into::into))
    }

    /// Stops every member still running (concurrently); returns how many.
    async fn stop_all(&mut self) -> usize {
        let mut set = JoinSet::new();
        for node in self.nodes.iter_mut().filter(|n| n.up) {
            node.up = false;
            let m = node.m.clone();
            set.spawn(async move { m.stop().await });
        }
        let stopped = set.len();
        while set.join_next().await.is_some() {}
        self.black_holes.clear();
        stopped
    }

    fn seeds(&self) -> Vec<SocketAddr> {
        self.nodes
            .iter()
            .take(SEEDS)
            .map(|n| n.m.advertise())
            .collect()
    }
}

/// Polls `members()` of `m` every `poll` until `done` holds of it; the time from `t0`.
async fn poll_until(
    m: Arc<Membership>,
    t0: Instant,
    poll: Duration,
    deadline: Instant,
    done: impl Fn(&[drop_supervisor::cluster::membership::Member]) -> bool,
) -> Option<Duration> {
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        if done(&m.members().await) {
            return Some(now - t0);
        }
        if now >= deadline {
            return None;
        }
    }
}

/// Time until every member lists `n` alive members; `None` if some did not by `timeout`.
async fn converge(c: &Cluster, poll: Duration, timeout: Duration) -> Fig {
    let n = c.nodes.len();
    let seeds = c.seeds();
    let t0 = Instant::now();
    let deadline = t0 + timeout;
    let mut joins = JoinSet::new();
    for node in &c.nodes {
        let (m, seeds) = (node.m.clone(), seeds.clone());
        joins.spawn(async move { m.join(&seeds).await });
    }
    let mut polls = JoinSet::new();
    for node in &c.nodes {
        polls.spawn(poll_until(node.m.clone(), t0, poll, deadline, move |ms| {
            ms.iter().filter(|m| m.state == MemberState::Alive).count() >= n
        }));
    }
    let mut lonely = 0;
    while let Some(r) = joins.join_next().await {
        if matches!(r, Ok(0)) {
            lonely += 1;
        }
    }
    if lonely > 0 {
        eprintln!("    {lonely} members reached no seed");
    }
    fig(&collect(polls).await, n)
}

async fn collect(mut set: JoinSet<Option<Duration>>) -> Vec<Duration> {
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(Some(d)) = r {
            out.push(d);
        }
    }
    out.sort();
    out
}

/// One member writes `key`; the time until every running member holds it.
async fn spread(c: &Cluster, origin: usize, key: &str, poll: Duration, timeout: Duration) -> Fig {
    let t0 = Instant::now();
    c.nodes[origin]
        .app
        .write(key, serde_json::json!({"image": "bench", "replicas": 3}));
    let others: Vec<&Node> = c
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, n)| *i != origin && n.up)
        .map(|(_, n)| n)
        .collect();
    loop {
        tokio::time::sleep(poll).await;
        let held = others.iter().filter(|n| n.app.seen(key).is_some()).count();
        if held == others.len() || t0.elapsed() > timeout {
            break;
        }
    }
    let mut times: Vec<Duration> = others
        .iter()
        .filter_map(|n| n.app.seen(key))
        .map(|t| t.saturating_duration_since(t0))
        .collect();
    times.sort();
    fig(&times, others.len())
}

struct Detection {
    /// Until each survivor's `members()` shows the victim down (dead, left) or gone.
    fig: Fig,
    /// Membership changes beyond the victim's death, one per survivor (flapping: false
    /// suspicions declared dead, then refuted).
    extra_events: u32,
}

/// Stops `victim` (crash-like) and times how long until every survivor sees it down.
async fn detect(
    c: &mut Cluster,
    victim: usize,
    crash: Crash,
    poll: Duration,
    timeout: Duration,
) -> Detection {
    let survivors: Vec<usize> = (0..c.nodes.len())
        .filter(|i| *i != victim && c.nodes[*i].up)
        .collect();
    for &i in &survivors {
        c.nodes[i].app.arm();
    }
    let victim_id = c.nodes[victim].id.clone();
    let t0 = Instant::now();
    c.nodes[victim].m.stop().await;
    c.nodes[victim].up = false;
    if crash == Crash::Silent {
        let addr = c.nodes[victim].m.advertise();
        let mut hole = None;
        for _ in 0..50 {
            if let (Ok(t), Ok(u)) = (TcpListener::bind(addr), UdpSocket::bind(addr)) {
                hole = Some((t, u));
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        match hole {
            Some(h) => c.black_holes.push(h),
            None => eprintln!("    cannot take {addr} over: this crash answers like an exit"),
        }
    }

    let mut views = JoinSet::new();
    for &i in &survivors {
        let vid = victim_id.clone();
        views.spawn(poll_until(
            c.nodes[i].m.clone(),
            t0,
            poll,
            t0 + timeout,
            move |ms| ms.iter().all(|m| m.id != vid || !m.state.is_up()),
        ));
    }
    let times = collect(views).await;
    let extra_events = survivors
        .iter()
        .map(|&i| c.nodes[i].app.events().saturating_sub(1))
        .sum();
    Detection {
        fig: fig(&times, survivors.len()),
        extra_events,
    }
}

/// A figure of one run: how many members got there (of how many), the time for all of them
/// (`None` if some did not within the cap) and for the median member.
#[derive(Clone, Copy, Default)]
struct Fig {
    all: Option<Duration>,
    median: Option<Duration>,
    got: usize,
    of: usize,
}

fn median_of(sorted: &[Duration]) -> Option<Duration> {
    sorted.get(sorted.len().checked_sub(1)? / 2).copied()
}

/// The figure of `times` (sorted), one per member that got there, out of `of`.
fn fig(times: &[Duration], of: usize) -> Fig {
    Fig {
        all: (times.len() == of).then(|| times.last().copied()).flatten(),
        median: median_of(times),
        got: times.len(),
        of,
    }
}

impl std::fmt::Display for Fig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.all {
            Some(d) => write!(f, "{}", secs(d)),
            None => write!(f, "miss {}/{}", self.got, self.of),
        }
    }
}

#[derive(Default)]
struct Results {
    converge: Vec<Fig>,
    detect: Vec<Fig>,
    detect_silent: Vec<Fig>,
    spread: Vec<Fig>,
    spread_early: Vec<Fig>,
    extra_events: u32,
}

/// A random index in `lo..hi` other than those in `not` (no rand dependency); `lo` if none.
fn pick(lo: usize, hi: usize, not: &[usize]) -> usize {
    let free: Vec<usize> = (lo..hi).filter(|i| !not.contains(i)).collect();
    let h = std::hash::BuildHasher::hash_one(
        &std::collections::hash_map::RandomState::new(),
        Instant::now(),
    );
    let len = u64::try_from(free.len().max(1)).unwrap_or(1);
    free.get(usize::try_from(h % len).unwrap_or(0))
        .copied()
        .unwrap_or(lo)
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

struct Scenario {
    profile: &'static str,
    n: usize,
    timing: Timing,
}

/// One fresh cluster per run: converge; an update right after convergence (membership gossip
/// still in flight); a crash; once that has been detected, an update in the settled cluster.
async fn run_scenario(
    s: &Scenario,
    runs: usize,
    key: &str,
    ports: &mut Ports,
    poll: Duration,
) -> anyhow::Result<Results> {
    let mut res = Results::default();
    // Caps: a miss shows in the table rather than hanging the run.
    let converge_cap = Duration::from_secs(60);
    let spread_cap = Duration::from_secs(3);
    let detect_cap = Duration::from_secs(30);
    for run in 0..runs {
        let started = Instant::now();
        let mut c = Cluster::start(s.n, s.timing, key, ports).await?;
        let converged = converge(&c, poll, converge_cap).await;
        res.converge.push(converged);
        tokio::time::sleep(AFTER_CONVERGE).await;

        let origin = pick(SEEDS, s.n, &[]);
        let early = spread(&c, origin, &format!("flow/early-{run}"), poll, spread_cap).await;
        res.spread_early.push(early);
        tokio::time::sleep(PAUSE).await;

        let victim = pick(SEEDS, s.n, &[origin]);
        let d = detect(&mut c, victim, Crash::Exit, poll, detect_cap).await;
        res.detect.push(d.fig);
        tokio::time::sleep(PAUSE).await;

        let origin = pick(SEEDS, s.n, &[victim]);
        let settled = spread(&c, origin, &format!("flow/settled-{run}"), poll, spread_cap).await;
        res.spread.push(settled);
        tokio::time::sleep(PAUSE).await;

        let second = pick(SEEDS, s.n, &[victim]);
        let ds = detect(&mut c, second, Crash::Silent, poll, detect_cap).await;
        res.detect_silent.push(ds.fig);
        res.extra_events += d.extra_events + ds.extra_events;

        let stopped = c.stop_all().await;
        eprintln!(
            "  {} N={} run {} (s): converge {converged}, spread right after {early}, \
             detection (exit) {}, spread settled {settled}, detection (silent) {}, \
             {} extra membership events; stopped {stopped} + 2 members (run {:.1})",
            s.profile,
            s.n,
            run + 1,
            d.fig,
            ds.fig,
            d.extra_events + ds.extra_events,
            started.elapsed().as_secs_f64()
        );
        // Let the closed sockets drain before the next cluster.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(res)
}

/// Median over runs of `all` (a run where not everyone got there counts as +∞) and of `median`.
fn summarize(figs: &[Fig]) -> (Option<Duration>, Option<Duration>) {
    let mut all: Vec<Duration> = figs
        .iter()
        .map(|f| f.all.unwrap_or(Duration::MAX))
        .collect();
    all.sort();
    let mut med: Vec<Duration> = figs.iter().filter_map(|f| f.median).collect();
    med.sort();
    let all = median_of(&all).filter(|d| *d != Duration::MAX);
    (all, median_of(&med))
}

/// `median of all (median of median member) [per run]`, and ✓/✗ against `target` if any.
fn cell(figs: &[Fig], target: Option<Duration>) -> String {
    let (all, med) = summarize(figs);
    let runs: Vec<String> = figs.iter().map(Fig::to_string).collect();
    let mark = match (target, all) {
        (None, _) => "",
        (Some(t), Some(d)) if d <= t => " ✓",
        (Some(_), _) => " ✗",
    };
    format!(
        "{} ({}) [{}]{mark}",
        all.map_or_else(|| "miss".to_string(), |d| format!("{} s", secs(d))),
        med.map_or_else(|| "-".to_string(), |d| format!("{} s", secs(d))),
        runs.join(", ")
    )
}

fn set_knob(t: &mut Timing, knob: &str, value: &str) -> anyhow::Result<()> {
    let dur = || -> anyhow::Result<Duration> {
        if let Some(ms) = value.strip_suffix("ms") {
            Ok(Duration::from_millis(ms.parse()?))
        } else if let Some(s) = value.strip_suffix('s') {
            Ok(Duration::from_secs_f64(s.parse()?))
        } else {
            bail!("{knob}: a duration needs a unit (ms or s): {value:?}")
        }
    };
    let num = || -> anyhow::Result<usize> { Ok(value.parse()?) };
    match knob {
        "probe_interval" => t.probe_interval = dur()?,
        "probe_timeout" => t.probe_timeout = dur()?,
        "suspicion_mult" => t.suspicion_mult = num()?,
        "suspicion_max_timeout_mult" => t.suspicion_max_timeout_mult = num()?,
        "gossip_interval" => t.gossip_interval = dur()?,
        "gossip_nodes" => t.gossip_nodes = num()?,
        "gossip_to_the_dead_time" => t.gossip_to_the_dead_time = dur()?,
        "awareness_max_multiplier" => t.awareness_max_multiplier = num()?,
        "push_pull_interval" => t.push_pull_interval = dur()?,
        "retransmit_mult" => t.retransmit_mult = num()?,
        "indirect_checks" => t.indirect_checks = num()?,
        "timeout" => t.timeout = dur()?,
        "disable_reliable_pings" => t.disable_reliable_pings = value.parse()?,
        _ => bail!("unknown timing knob {knob:?}"),
    }
    Ok(())
}

fn with_overrides(mut t: Timing, spec: Option<&str>) -> anyhow::Result<Timing> {
    for kv in spec
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
    {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("expected KNOB=VALUE, got {kv:?}"))?;
        set_knob(&mut t, k.trim(), v.trim())?;
    }
    Ok(t)
}

fn describe(t: &Timing) -> String {
    format!(
        "probe_interval {:?}, probe_timeout {:?}, suspicion_mult {}, suspicion_max_timeout_mult {}, \
         gossip_interval {:?}, gossip_nodes {}, retransmit_mult {}, indirect_checks {}, \
         push_pull_interval {:?}, timeout {:?}, awareness_max_multiplier {}",
        t.probe_interval,
        t.probe_timeout,
        t.suspicion_mult,
        t.suspicion_max_timeout_mult,
        t.gossip_interval,
        t.gossip_nodes,
        t.retransmit_mult,
        t.indirect_checks,
        t.push_pull_interval,
        t.timeout,
        t.awareness_max_multiplier
    )
}

/// Raises the soft open-file limit to the hard one: every member holds a few sockets.
fn raise_nofile() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    (lim.rlim_cur, lim.rlim_max)
}

struct Args {
    lan_nodes: Vec<usize>,
    fast_nodes: Vec<usize>,
    runs: usize,
    lan: Timing,
    fast: Timing,
    lan_spec: Option<String>,
    fast_spec: Option<String>,
    poll: Duration,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut raw = std::env::args().skip(1).filter(|a| a != "--bench");
    let sizes = |s: &str| -> anyhow::Result<Vec<usize>> {
        s.split(',')
            .filter(|x| !x.trim().is_empty())
            .map(|x| {
                let n: usize = x.trim().parse().with_context(|| format!("size {x:?}"))?;
                if n < SEEDS + 2 {
                    bail!("a cluster needs at least 4 members (2 seeds, 2 victims), got {n}");
                }
                Ok(n)
            })
            .collect()
    };
    let mut a = Args {
        lan_nodes: vec![50, 100, 200],
        fast_nodes: vec![5, 10],
        runs: 3,
        lan: Timing::lan(),
        fast: Timing::fast(),
        lan_spec: None,
        fast_spec: None,
        poll: Duration::from_millis(20),
    };
    while let Some(flag) = raw.next() {
        let mut value = || raw.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--nodes" => a.lan_nodes = sizes(&value()?)?,
            "--fast-nodes" => a.fast_nodes = sizes(&value()?)?,
            "--runs" => a.runs = value()?.parse::<usize>()?.max(1),
            "--lan" => a.lan_spec = Some(value()?),
            "--fast" => a.fast_spec = Some(value()?),
            "--poll-ms" => a.poll = Duration::from_millis(value()?.parse()?),
            _ => bail!(
                "usage: cluster [--nodes 50,100,200] [--fast-nodes 5,10] [--runs 3] \
                 [--lan KNOB=VALUE,...] [--fast KNOB=VALUE,...] [--poll-ms 20]"
            ),
        }
    }
    a.lan = with_overrides(Timing::lan(), a.lan_spec.as_deref())?;
    a.fast = with_overrides(Timing::fast(), a.fast_spec.as_deref())?;
    Ok(a)
}

async fn bench(a: Args) -> anyhow::Result<String> {
    let started = Instant::now();
    let (soft, hard) = raise_nofile();
    let key = generate_key();
    let mut scenarios: Vec<Scenario> = Vec::new();
    for &n in &a.lan_nodes {
        scenarios.push(Scenario {
            profile: "lan",
            n,
            timing: a.lan,
        });
    }
    for &n in &a.fast_nodes {
        scenarios.push(Scenario {
            profile: "fast",
            n,
            timing: a.fast,
        });
    }
    let members: usize = scenarios.iter().map(|s| s.n).sum::<usize>() * a.runs;
    let mut ports = Ports::new(members);
    eprintln!(
        "cluster bench: {} scenarios, {} runs each, {members} members in all; RLIMIT_NOFILE {soft}/{hard}",
        scenarios.len(),
        a.runs
    );

    let mut rows = String::new();
    let mut notes = Vec::new();
    for s in &scenarios {
        let r = run_scenario(s, a.runs, &key, &mut ports, a.poll).await?;
        let det_target = match (s.profile, s.n) {
            ("lan", n) if n <= 100 => Some(Duration::from_secs(5)),
            ("fast", n) if n <= 10 => Some(Duration::from_secs(1)),
            _ => None,
        };
        let spread_target = (s.profile == "lan").then_some(Duration::from_secs(1));
        let _ = writeln!(
            rows,
            "| {} | {} | {} | {} | {} | {} | {} |",
            s.profile,
            s.n,
            cell(&r.converge, None),
            cell(&r.detect, det_target),
            cell(&r.detect_silent, det_target),
            cell(&r.spread, spread_target),
            cell(&r.spread_early, None),
        );
        if r.extra_events > 0 {
            notes.push(format!(
                "{} N={}: {} membership changes beyond the crash during detection (false suspicions \
                 declared dead and refuted).",
                s.profile, s.n, r.extra_events
            ));
        }
    }

    let mut md = String::new();
    let _ = writeln!(
        md,
        "{} runs per row, a fresh cluster each (median reported; per-run figures in brackets), all \
         members in one process on 127.0.0.1, encrypted (AES-256 cluster key), seeds: members 0 and 1, \
         `members()` polled every {} ms.\n",
        a.runs,
        a.poll.as_millis()
    );
    let _ = writeln!(
        md,
        "- `lan`{}: {}",
        a.lan_spec
            .as_deref()
            .map(|s| format!(" with {s}"))
            .unwrap_or_default(),
        describe(&a.lan)
    );
    let _ = writeln!(
        md,
        "- `fast`{}: {}\n",
        a.fast_spec
            .as_deref()
            .map(|s| format!(" with {s}"))
            .unwrap_or_default(),
        describe(&a.fast)
    );
    md += "| profile | N | converge: all see N alive (median member) | crash detection, process exit: all survivors see it down (median survivor) | crash detection, silent host | update spread, settled cluster: all hold it (median member) | update spread right after convergence |\n";
    md += "|---|---|---|---|---|---|---|\n";
    md += &rows;
    let _ = writeln!(
        md,
        "| reference: HashiCorp memberlist, LAN defaults (not measured here) | 100 | - | {REF_DETECTION} | {REF_DETECTION} | {REF_SPREAD} | - |"
    );
    md += "\nEach cell: the median over runs of the time until all members got there (of the median \
           member), then each run's figure; `miss k/n`: only k of n members got there within the cap \
           (converge 60 s, detection 30 s, spread 3 s). Process exit: the victim is stopped, its \
           ports refuse connections. Silent host: its ports are then taken by sockets that never \
           answer, as a crashed or frozen machine. Settled cluster: the update is written after the \
           first crash was detected; right after convergence: 1 s after every member saw N alive, \
           while memberlist still gossips the joins.\n\n\
           Targets: crash detection ≤ 5 s at N ≤ 100 with `lan`, ≤ 1 s at N ≤ 10 with `fast`; \
           update spread ≤ 1 s with `lan`. ✓ met, ✗ missed.\n";
    for n in notes {
        let _ = writeln!(md, "\n{n}");
    }
    let _ = writeln!(
        md,
        "\nTotal bench time: {:.0} s.",
        started.elapsed().as_secs_f64()
    );
    Ok(md)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cluster: {e:#}");
            std::process::exit(2);
        }
    };
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(bench(args)) {
        Ok(md) => print!("{md}"),
        Err(e) => {
            eprintln!("cluster: {e:#}");
            std::process::exit(1);
        }
    }
}
