//! A real multi-host DROP cluster for the privileged tests: one `drop-supervisor` per network
//! namespace of a [`Bridge`], driven with `dropctl --json` over each node's Unix socket (from the
//! root namespace: a socket is a filesystem object) and through each node's HTTP gateway (from
//! inside its namespace).
//!
//! A [`ClusterFixture`] owns everything it creates (namespaces, a temporary folder with one
//! sub-folder per node, a cgroup subtree per node, the daemons) and removes it when dropped,
//! also while a panic unwinds: daemons are SIGKILLed and reaped, whatever is still running inside
//! the fixture's namespaces is killed, the cgroup subtrees are emptied and removed, then the
//! namespaces and the folder go. Names are unique per run ([`crate::unique_name`]); traffic stays
//! on 10.201.0.0/24 inside the fixture's own namespaces. Never used in production code.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::netns::{Bridge, Host, check, run_bounded};
use crate::{CgroupSubtreeGuard, paths, unique_name};

/// memberlist's port (TCP and UDP) on every node; the peer transport listens on the next one.
pub const CLUSTER_PORT: u16 = 7946;
/// The HTTP gateway's port on every node.
pub const GATEWAY_PORT: u16 = 8081;
/// How often [`wait_until`] and [`wait_for`] look again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long a daemon may take from spawn to accepting on its control socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a SIGTERMed daemon may take to exit before it is SIGKILLed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Time limit of one `dropctl` call.
pub const DROPCTL_TIMEOUT: Duration = Duration::from_secs(10);
/// Time limit of one gateway request (it may be forwarded to another node).
pub const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// The second bridge of the hub namespace, holding the ports of a partitioned group.
pub const PARTITION_BRIDGE: &str = "br1";
/// Profile given to `[cluster] profile`: quick failure detection for tests.
pub const PROFILE: &str = "fast";

/// What a fixture builds.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Daemons started at once, on hosts `0..nodes`, named `n0`, `n1`, ...
    pub nodes: usize,
    /// Further hosts on the bridge without a daemon, for [`ClusterFixture::start_extra`].
    pub spare_hosts: usize,
    /// Nodes that find their seeds in `<state_dir>/drop-hosts` instead of `[cluster] seeds`.
    pub seeds_from_hosts_file: Vec<usize>,
    /// Write the `[cluster]` section. `false` gives independent single-node daemons on the same
    /// hosts, which checks the fixture itself (namespaces, sockets, gateways, partitions).
    pub cluster: bool,
    /// Find peers by multicast discovery only: no seeds at all.
    pub multicast: bool,
    /// TOML appended to every node's config (e.g. a `[vip]` section).
    pub extra_config: String,
    /// `[cluster] profile` (default [`PROFILE`]).
    pub profile: String,
    /// TOML appended to one node's config, by host index (e.g. its own `[services] bus`).
    pub node_config: Vec<String>,
    /// Gateways listen on all addresses (`0.0.0.0:8081`) instead of the host's own.
    pub gateway_any: bool,
}

/// The multicast group and port the fixture's nodes announce themselves on.
pub const MULTICAST_GROUP: &str = "239.192.0.77:7950";

impl ClusterSpec {
    /// `nodes` clustered daemons seeded through their config files, no spare host.
    pub fn new(nodes: usize) -> ClusterSpec {
        ClusterSpec {
            nodes,
            spare_hosts: 0,
            seeds_from_hosts_file: Vec::new(),
            cluster: true,
            multicast: false,
            extra_config: String::new(),
            profile: PROFILE.to_string(),
            node_config: Vec::new(),
            gateway_any: false,
        }
    }
}

/// Which cluster key a node gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyChoice {
    /// The fixture's shared key.
    Shared,
    /// A fresh key of its own: the node must not be able to talk to the others.
    Own,
}

/// Where a node reads its seeds from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedSource {
    /// `[cluster] seeds = [...]`.
    Config,
    /// `<state_dir>/drop-hosts`, one `ip:port` a line.
    HostsFile,
}

/// A daemon of the fixture: its files and its process.
#[derive(Debug)]
struct Daemon {
    name: String,
    host: usize,
    dir: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    netns_path: PathBuf,
    child: Mutex<Option<Child>>,
    // Dropped after `Drop::drop` below has killed the daemon: empties and removes the subtree.
    _cgroups: CgroupSubtreeGuard,
    cgroup_subtree: String,
}

impl Daemon {
    fn child(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Spawns `nsenter --net=/run/netns/HOST -- drop-supervisor --config FILE` (nsenter execs the
    /// daemon, so the child's pid is the daemon's), output appended to `daemon.log`.
    fn spawn(&self) -> anyhow::Result<()> {
        let mut slot = self.child();
        if let Some(child) = slot.as_mut()
            && child.try_wait()?.is_none()
        {
            bail!("{} is still running (pid {})", self.name, child.id());
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path.display()))
            .arg("--")
            .arg(paths::bin("drop-supervisor"))
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Logs go to the file above, never to a journal or a service manager of the caller.
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            // Plain text in the log file.
            .env("NO_COLOR", "1");
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning drop-supervisor for {}", self.name))?;
        *slot = Some(child);
        Ok(())
    }

    /// Waits until the control socket accepts, failing early (with the log's tail) if the
    /// daemon exits.
    fn wait_ready(&self, until: Instant) -> anyhow::Result<()> {
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child().as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "{} exited during start-up ({status}); log tail:\n{}",
                    self.name,
                    tail(&self.log, 20)
                );
            }
            ensure!(
                Instant::now() < until,
                "{} did not accept on {} within {START_TIMEOUT:?}; log tail:\n{}",
                self.name,
                self.socket.display(),
                tail(&self.log, 20)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap; `Ok(false)` if it was not running.
    fn sigkill(&self) -> anyhow::Result<bool> {
        let Some(mut child) = self.child().take() else {
            return Ok(false);
        };
        if child.try_wait()?.is_some() {
            return Ok(false);
        }
        child.kill().context("SIGKILL")?;
        child.wait().context("reaping the daemon")?;
        Ok(true)
    }

    /// SIGTERM, wait up to [`STOP_TIMEOUT`], then SIGKILL; the exit status of a clean stop.
    fn stop(&self) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self
            .child()
            .take()
            .with_context(|| format!("{} is not running", self.name))?;
        let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
        if let Some(status) = child.try_wait()? {
            bail!("{} had already exited ({status})", self.name);
        }
        kill(pid, Signal::SIGTERM).context("SIGTERM")?;
        let until = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{} did not exit within {STOP_TIMEOUT:?} of SIGTERM; SIGKILLed",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> Option<u32> {
        let mut slot = self.child();
        let child = slot.as_mut()?;
        match child.try_wait() {
            Ok(None) => Some(child.id()),
            _ => None,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.sigkill();
    }
}

/// A cluster of `drop-supervisor`s on a [`Bridge`]. Dropping it tears everything down.
#[derive(Debug)]
pub struct ClusterFixture {
    // Field order is drop order: daemons (then their cgroup subtrees), the namespaces, the folder.
    daemons: Vec<Daemon>,
    bridge: Bridge,
    dir: tempfile::TempDir,
    key_file: PathBuf,
    spec: ClusterSpec,
    partition_bridge: Mutex<bool>,
}

impl ClusterFixture {
    /// Builds the bridge (`spec.nodes + spec.spare_hosts` hosts), writes the shared key and one
    /// config per node, starts the daemons in parallel and waits until each accepts on its
    /// control socket. Everything built so far is torn down again if a step fails.
    pub fn start(spec: ClusterSpec) -> anyhow::Result<ClusterFixture> {
        ensure!(spec.nodes > 0, "a cluster needs at least one node");
        let bridge = Bridge::new(spec.nodes + spec.spare_hosts)?;
        let dir = tempfile::Builder::new()
            .prefix("dcl")
            .tempdir()
            .context("creating the fixture's folder")?;
        let key_file = dir.path().join("cluster.key");
        write_key(&key_file)?;
        let mut fx = ClusterFixture {
            daemons: Vec::with_capacity(spec.nodes + spec.spare_hosts),
            bridge,
            dir,
            key_file,
            spec: spec.clone(),
            partition_bridge: Mutex::new(false),
        };
        let seeds: Vec<usize> = (0..spec.nodes.min(3)).collect();
        for i in 0..spec.nodes {
            let source = if spec.seeds_from_hosts_file.contains(&i) {
                SeedSource::HostsFile
            } else {
                SeedSource::Config
            };
            let daemon = fx.prepare(i, KeyChoice::Shared, &seeds, source)?;
            fx.daemons.push(daemon);
        }
        for d in &fx.daemons {
            d.spawn()?;
        }
        let until = Instant::now() + START_TIMEOUT;
        for d in &fx.daemons {
            d.wait_ready(until)?;
        }
        Ok(fx)
    }

    /// Starts one more daemon on spare host `host`, named `n<host>`, with `key`, seeded with the
    /// nodes `seeds` through its config file; returns its node index (for [`Self::node`]).
    pub fn start_extra(
        &mut self,
        host: usize,
        key: KeyChoice,
        seeds: &[usize],
    ) -> anyhow::Result<usize> {
        ensure!(
            host < self.bridge.hosts().len(),
            "no host {host}: the bridge has {}",
            self.bridge.hosts().len()
        );
        ensure!(
            !self.daemons.iter().any(|d| d.host == host),
            "host {host} already runs a daemon"
        );
        let daemon = self.prepare(host, key, seeds, SeedSource::Config)?;
        self.daemons.push(daemon);
        let d = self.daemons.last().context("just pushed")?;
        d.spawn()?;
        d.wait_ready(Instant::now() + START_TIMEOUT)?;
        Ok(self.daemons.len() - 1)
    }

    /// Writes host `host`'s folder, config and (for [`SeedSource::HostsFile`]) `drop-hosts`.
    fn prepare(
        &self,
        host: usize,
        key: KeyChoice,
        seeds: &[usize],
        source: SeedSource,
    ) -> anyhow::Result<Daemon> {
        let name = format!("n{host}");
        let h = self.bridge.host(host);
        let dir = self.dir.path().join(&name);
        let state_dir = dir.join("state");
        std::fs::create_dir_all(&state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let socket = dir.join("drop.sock");
        let config = dir.join("drop.toml");
        let subtree = unique_name("dcl");
        // From here on the subtree is removed whatever happens.
        let guard = CgroupSubtreeGuard(subtree.clone());
        let key_file = match key {
            KeyChoice::Shared => self.key_file.clone(),
            KeyChoice::Own => {
                let own = dir.join("own.key");
                write_key(&own)?;
                own
            }
        };
        let seed_addrs: Vec<String> = seeds
            .iter()
            .map(|&s| cluster_addr(self.bridge.host(s)).to_string())
            .collect();
        let mut text = String::new();
        let q = toml_str;
        writeln!(text, "[node]\nname = {}", q(&name))?;
        writeln!(text, "state_dir = {}", q(&state_dir.display().to_string()))?;
        writeln!(
            text,
            "[control]\nsocket = {}",
            q(&socket.display().to_string())
        )?;
        // Never the host's /proc/sys.
        writeln!(
            text,
            "[tuning]\nsysctl_root = {}",
            q(&dir.join("sys").display().to_string())
        )?;
        writeln!(
            text,
            "[runtime]\nimages_dir = {}\nlogs_dir = {}\ncgroup_subtree = {}",
            q(&dir.join("images").display().to_string()),
            q(&dir.join("logs").display().to_string()),
            q(&subtree)
        )?;
        writeln!(
            text,
            "[gateway]\nlisten = {}",
            q(&if self.spec.gateway_any {
                format!("0.0.0.0:{}", gateway_addr(h).port())
            } else {
                gateway_addr(h).to_string()
            })
        )?;
        if self.spec.cluster {
            writeln!(
                text,
                "[cluster]\nbind = {}\nkey_file = {}\nprofile = {}",
                q(&cluster_addr(h).to_string()),
                q(&key_file.display().to_string()),
                q(&self.spec.profile)
            )?;
            if self.spec.multicast {
                writeln!(text, "multicast = {}", q(MULTICAST_GROUP))?;
            }
            match source {
                SeedSource::Config if self.spec.multicast => {}
                SeedSource::Config => {
                    let list: Vec<String> = seed_addrs.iter().map(|s| q(s)).collect();
                    writeln!(text, "seeds = [{}]", list.join(", "))?;
                }
                SeedSource::HostsFile => {
                    let hosts = state_dir.join("drop-hosts");
                    let mut lines = seed_addrs.join("\n");
                    lines.push('\n');
                    std::fs::write(&hosts, lines)
                        .with_context(|| format!("writing {}", hosts.display()))?;
                }
            }
        }
        text.push_str(&self.spec.extra_config);
        if let Some(own) = self.spec.node_config.get(host) {
            text.push('\n');
            text.push_str(own);
        }
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        Ok(Daemon {
            log: dir.join("daemon.log"),
            netns_path: h.netns().path().to_path_buf(),
            name,
            host,
            dir,
            config,
            socket,
            child: Mutex::new(None),
            _cgroups: guard,
            cgroup_subtree: subtree,
        })
    }

    /// Node `i` (the order of start-up; the first `spec.nodes` are on hosts `0..nodes`). Panics
    /// if out of range, like indexing.
    pub fn node(&self, i: usize) -> Node<'_> {
        Node {
            daemon: &self.daemons[i],
            host: self.bridge.host(self.daemons[i].host),
        }
    }

    /// Every node, started or not.
    pub fn nodes(&self) -> impl Iterator<Item = Node<'_>> {
        (0..self.daemons.len()).map(|i| self.node(i))
    }

    /// Number of nodes (including extras).
    pub fn len(&self) -> usize {
        self.daemons.len()
    }

    pub fn is_empty(&self) -> bool {
        self.daemons.is_empty()
    }

    /// The index of the node named `name`.
    pub fn index_of(&self, name: &str) -> anyhow::Result<usize> {
        self.daemons
            .iter()
            .position(|d| d.name == name)
            .with_context(|| format!("no node named {name:?}"))
    }

    pub fn bridge(&self) -> &Bridge {
        &self.bridge
    }

    /// The shared key file (base64 of 32 random bytes).
    pub fn key_file(&self) -> &Path {
        &self.key_file
    }

    /// Cuts hosts `hosts` off the others: their hub ports move from `br0` to a second bridge
    /// (`br1`, made on first use, no STP) in the hub namespace. The moved hosts still reach each
    /// other, the rest still reach each other, nothing crosses. `ip link set PORT master br1`.
    pub fn partition(&self, hosts: &[usize]) -> anyhow::Result<()> {
        let hub = self.bridge.hub();
        {
            let mut made = self
                .partition_bridge
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !*made {
                hub.ip(&[
                    "link",
                    "add",
                    PARTITION_BRIDGE,
                    "type",
                    "bridge",
                    "stp_state",
                    "0",
                ])?;
                *made = true;
                hub.ip(&["link", "set", PARTITION_BRIDGE, "up"])?;
            }
        }
        for &h in hosts {
            let port = self
                .bridge
                .hosts()
                .get(h)
                .context("no such host")?
                .hub_port();
            hub.ip(&["link", "set", port, "master", PARTITION_BRIDGE])?;
        }
        Ok(())
    }

    /// Waits until node 0 sees every node of the fixture alive (`dropctl node ls`).
    pub fn wait_all_alive(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let n = self.daemons.len();
        wait_until(
            timeout,
            &format!("node 0 seeing all {n} nodes alive"),
            || {
                let v = self.node(0).dropctl(&["node", "ls"])?;
                let alive = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|m| m["state"] == "alive")
                    .count();
                Ok(alive == n)
            },
        )
    }

    /// Undoes every [`Self::partition`]: all hub ports back on `br0`.
    pub fn heal(&self) -> anyhow::Result<()> {
        let hub = self.bridge.hub();
        for host in self.bridge.hosts() {
            hub.ip(&["link", "set", host.hub_port(), "master", Bridge::BRIDGE])?;
        }
        Ok(())
    }

    /// The last `lines` lines of every node's daemon log, for a failure report.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for d in &self.daemons {
            let _ = writeln!(
                out,
                "--- {} ({}) ---\n{}",
                d.name,
                d.log.display(),
                tail(&d.log, lines)
            );
        }
        out
    }

    /// What this fixture created that must be gone after it is dropped.
    pub fn footprint(&self) -> Footprint {
        let mut netns: Vec<PathBuf> = self
            .bridge
            .hosts()
            .iter()
            .map(|h| h.netns().path().to_path_buf())
            .collect();
        netns.push(self.bridge.hub().path().to_path_buf());
        Footprint {
            netns,
            cgroup_subtrees: self
                .daemons
                .iter()
                .map(|d| d.cgroup_subtree.clone())
                .collect(),
            pids: self.daemons.iter().filter_map(Daemon::pid).collect(),
            dir: self.dir.path().to_path_buf(),
        }
    }

    /// SIGKILLs every process whose network namespace is one of the fixture's (workers a killed
    /// daemon left behind, anything else started inside): `ip netns del` only unmounts a
    /// namespace, it lives on while a process is in it.
    fn kill_namespace_residents(&self) {
        let mut inodes: BTreeSet<u64> = self
            .bridge
            .hosts()
            .iter()
            .filter_map(|h| std::fs::metadata(h.netns().path()).ok())
            .map(|m| m.ino())
            .collect();
        if let Ok(m) = std::fs::metadata(self.bridge.hub().path()) {
            inodes.insert(m.ino());
        }
        for pid in pids_in_netns(&inodes) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

impl Drop for ClusterFixture {
    fn drop(&mut self) {
        for d in &self.daemons {
            let _ = d.sigkill();
        }
        self.kill_namespace_residents();
        // The fields drop next: cgroup guards, namespaces, the folder.
    }
}

/// A node of a [`ClusterFixture`].
#[derive(Debug, Clone, Copy)]
pub struct Node<'a> {
    daemon: &'a Daemon,
    host: &'a Host,
}

impl<'a> Node<'a> {
    /// `n<host>`.
    pub fn name(&self) -> &'a str {
        &self.daemon.name
    }

    /// The host (namespace, address, hub port) it runs on.
    pub fn host(&self) -> &'a Host {
        self.host
    }

    /// 10.201.0.(10+host).
    pub fn addr(&self) -> Ipv4Addr {
        self.host.addr()
    }

    /// Its gateway, `addr:8081` (reachable only from inside the fixture's namespaces).
    pub fn gateway(&self) -> SocketAddr {
        gateway_addr(self.host)
    }

    /// Its memberlist address, `addr:7946`.
    pub fn cluster_addr(&self) -> SocketAddr {
        cluster_addr(self.host)
    }

    pub fn socket(&self) -> &'a Path {
        &self.daemon.socket
    }

    pub fn config(&self) -> &'a Path {
        &self.daemon.config
    }

    /// `<fixture>/<name>/state`.
    pub fn state_dir(&self) -> PathBuf {
        self.daemon.dir.join("state")
    }

    /// A folder of its own for test files (flows and the like).
    pub fn dir(&self) -> &'a Path {
        &self.daemon.dir
    }

    /// The daemon's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.pid()
    }

    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// `dropctl --socket S --json ARGS...` (from the root namespace), parsed; a non-zero exit
    /// is an error carrying stderr.
    pub fn dropctl(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let out = self.dropctl_output(args)?;
        ensure!(
            out.status.success(),
            "{}: dropctl {} failed ({}): {}",
            self.name(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "{}: dropctl {} printed no JSON: {}",
                self.name(),
                args.join(" "),
                String::from_utf8_lossy(&out.stdout).trim()
            )
        })
    }

    /// `dropctl --socket S --json ARGS...`, whatever its exit status.
    pub fn dropctl_output(&self, args: &[&str]) -> anyhow::Result<Output> {
        run_bounded(
            Command::new(paths::bin("dropctl"))
                .arg("--socket")
                .arg(&self.daemon.socket)
                .arg("--json")
                .args(args),
            DROPCTL_TIMEOUT,
        )
    }

    /// `dropctl status`.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        self.dropctl(&["status"])
    }

    /// SIGKILLs the daemon and reaps it (its workers may live on until a restart or teardown).
    pub fn sigkill(&self) -> anyhow::Result<()> {
        ensure!(self.daemon.sigkill()?, "{} was not running", self.name());
        Ok(())
    }

    /// SIGTERM and wait for the exit (SIGKILL after [`STOP_TIMEOUT`], which is an error).
    pub fn stop(&self) -> anyhow::Result<()> {
        let status = self.daemon.stop()?;
        ensure!(
            status.success(),
            "{} exited with {status} after SIGTERM; log tail:\n{}",
            self.name(),
            tail(&self.daemon.log, 20)
        );
        Ok(())
    }

    /// Starts the daemon again with the same config and state folder and waits until it accepts
    /// on its control socket.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.daemon.spawn()?;
        self.daemon.wait_ready(Instant::now() + START_TIMEOUT)
    }

    /// `POST /api/v1/<pool>` with `body` to this node's gateway, from inside its namespace.
    pub fn post(&self, pool: &str, body: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
        self.post_to(self.gateway(), pool, body)
    }

    /// `POST /api/v1/<pool>` with `body` to `gateway`, from inside this node's namespace.
    pub fn post_to(
        &self,
        gateway: SocketAddr,
        pool: &str,
        body: &[u8],
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        self.post_within(gateway, pool, body, POST_TIMEOUT)
    }

    /// [`Self::post_to`] waiting up to `timeout` for the answer instead of [`POST_TIMEOUT`].
    /// `pool` may carry a query (`"echo?every"`).
    pub fn post_within(
        &self,
        gateway: SocketAddr,
        pool: &str,
        body: &[u8],
        timeout: Duration,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let path = format!("/api/v1/{pool}");
        self.host
            .netns()
            .run(|| -> anyhow::Result<(u16, Vec<u8>)> {
                let mut s = TcpStream::connect_timeout(&gateway, Duration::from_secs(2))
                    .with_context(|| format!("connecting to {gateway}"))?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                let r = drop_supervisor::http::roundtrip(&mut s, "POST", &path, Some(body))
                    .with_context(|| format!("POST {path} to {gateway}"))?;
                Ok((r.status, r.body))
            })?
            .with_context(|| format!("{} → {gateway}", self.name()))
    }

    /// The last `lines` lines of its daemon log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.daemon.log, lines)
    }
}

/// What a [`ClusterFixture`] made, to check after the drop that nothing is left.
#[derive(Debug, Clone)]
pub struct Footprint {
    pub netns: Vec<PathBuf>,
    pub cgroup_subtrees: Vec<String>,
    pub pids: Vec<u32>,
    pub dir: PathBuf,
}

impl Footprint {
    /// Everything of it that still exists, described; empty when all is gone.
    pub fn leftovers(&self) -> anyhow::Result<Vec<String>> {
        let mut left = Vec::new();
        for ns in &self.netns {
            if ns.exists() {
                left.push(format!("namespace {}", ns.display()));
            }
        }
        for name in &self.cgroup_subtrees {
            for dir in find_cgroup_dirs(name)? {
                left.push(format!("cgroup {}", dir.display()));
            }
        }
        for &pid in &self.pids {
            if pid_alive(pid) {
                left.push(format!("process {pid}"));
            }
        }
        if self.dir.exists() {
            left.push(format!("folder {}", self.dir.display()));
        }
        Ok(left)
    }
}

/// Polls `f` every [`POLL_INTERVAL`] until it returns `Ok(true)`; gives the time it took. An
/// `Err` from `f` counts as "not yet" and is kept as the last observation, so a closure that
/// `bail!`s with what it saw gives the best timeout message.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    wait_for(timeout, what, || {
        if f()? {
            Ok(())
        } else {
            bail!("condition still false")
        }
    })?;
    Ok(started.elapsed())
}

/// Polls `f` every [`POLL_INTERVAL`] until it returns `Ok`, and gives that value; on timeout
/// fails naming `what` and the last error `f` returned.
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    poll(timeout, POLL_INTERVAL, what, f).map(|p| p.value)
}

/// The result of [`poll`], with the timing a measurement needs.
#[derive(Debug)]
pub struct Polled<T> {
    pub value: T,
    /// When the successful attempt ended (an upper bound of when the condition became true).
    pub ok_at: Instant,
    /// When the last failed attempt began (a lower bound), if one failed.
    pub last_miss_at: Option<Instant>,
}

/// Like [`wait_for`] with a chosen interval between attempts, and the timing of the success.
pub fn poll<T>(
    timeout: Duration,
    interval: Duration,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<Polled<T>> {
    let started = Instant::now();
    let mut last_miss_at = None;
    loop {
        let attempt = Instant::now();
        match f() {
            Ok(value) => {
                return Ok(Polled {
                    value,
                    ok_at: Instant::now(),
                    last_miss_at,
                });
            }
            Err(err) => {
                last_miss_at = Some(attempt);
                if started.elapsed() >= timeout {
                    bail!(
                        "timed out after {timeout:?} waiting for {what}; last observation: {err:#}"
                    );
                }
            }
        }
        std::thread::sleep(interval);
    }
}

/// Runs `f` on every item at once (one thread each) and gives the results in order: a check of
/// five nodes costs one `dropctl` round trip instead of five.
pub fn on_each<I, T, F>(items: &[I], f: F) -> Vec<anyhow::Result<T>>
where
    I: Sync,
    T: Send,
    F: Fn(&I) -> anyhow::Result<T> + Sync,
{
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .iter()
            .map(|item| {
                let f = &f;
                scope.spawn(move || f(item))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

fn gateway_addr(host: &Host) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(host.addr(), GATEWAY_PORT))
}

fn cluster_addr(host: &Host) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(host.addr(), CLUSTER_PORT))
}

/// A TOML basic string: JSON's escaping is a subset TOML accepts.
fn toml_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// Writes a cluster key: base64 of 32 bytes from /dev/urandom (AES-256), mode 0600.
fn write_key(path: &Path) -> anyhow::Result<()> {
    let mut key = [0u8; 32];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .context("reading /dev/urandom")?;
    let mut text = base64(&key);
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", path.display()))?;
    Ok(())
}

/// Standard base64 (RFC 4648, with `=` padding).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (k, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if k <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The last `lines` lines of a file (for failure reports), or why it could not be read.
fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Pids (other than this process) whose network namespace has one of `inodes`.
fn pids_in_netns(inodes: &BTreeSet<u64>) -> Vec<i32> {
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| inodes.contains(&m.ino()))
        })
        .filter_map(|pid| i32::try_from(pid).ok())
        .collect()
}

fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Cgroup folders named `name` in any hierarchy (`find /sys/fs/cgroup -maxdepth 6 -name NAME`).
fn find_cgroup_dirs(name: &str) -> anyhow::Result<Vec<PathBuf>> {
    let out = check(Command::new("find").args([
        "/sys/fs/cgroup",
        "-maxdepth",
        "6",
        "-type",
        "d",
        "-name",
        name,
    ]))?;
    Ok(out.lines().map(PathBuf::from).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in cases {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain:?}");
        }
        assert_eq!(base64(&[0xff; 32]).len(), 44);
        assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
    }

    #[test]
    fn toml_strings_are_quoted_and_escaped() {
        assert_eq!(toml_str("/tmp/a b"), "\"/tmp/a b\"");
        assert_eq!(toml_str("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }
}
