//! The daemon's configuration file (TOML), in two phases: [`RawConfig`] mirrors the file and
//! rejects unknown keys; [`Config::from_raw`] validates it into the type the daemon uses. Every
//! error names the file and the key (serde's errors also carry line and column).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::cluster::ClusterConfig;
use crate::cluster::membership::Timing;
use crate::gateway::limits::Limits as GatewayLimits;
use crate::vip::protocol::Params;
use crate::vip::{Garp, VipSettings};

/// Where the packaged daemon looks when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/drop/drop.toml";
/// Default state directory: node identity and, later, persisted desired state.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/drop";
/// Default control socket; `dropctl` uses the same default.
pub const DEFAULT_SOCKET: &str = "/run/drop/drop.sock";
/// Group given access to the control socket when it exists on the host.
pub const DEFAULT_SOCKET_GROUP: &str = "drop";
/// Where sysctls live; tests point this at a temporary folder.
pub const DEFAULT_SYSCTL_ROOT: &str = "/proc/sys";
/// Where plugin packages drop their folders (`NAME/flow.yaml` and its executables).
pub const DEFAULT_PLUGINS_DIR: &str = "/usr/lib/drop/plugins";
/// Where the balancer pins its maps and link unless `[balancer] pin_dir` says otherwise.
pub const DEFAULT_BALANCER_PIN_DIR: &str = "/sys/fs/bpf/drop";
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Syntax errors, unknown keys and wrong types; the message carries key, line and column.
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config {origin}: key `{key}`: {reason}")]
    Invalid {
        origin: String,
        key: &'static str,
        reason: String,
    },
}

/// Mirror of the file. Every section and key is optional; unknown ones are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub node: RawNode,
    #[serde(default)]
    pub control: RawControl,
    #[serde(default)]
    pub tuning: RawTuning,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub runtime: RawRuntime,
    #[serde(default)]
    pub gateway: RawGateway,
    #[serde(default)]
    pub plugins: RawPlugins,
    /// Present: the node joins a cluster. Absent: a single node, flows applied locally.
    pub cluster: Option<RawCluster>,
    /// The floating IP of this node's namespace (cluster only).
    pub vip: Option<RawVip>,
    /// systemd services of this node's namespace (cluster only).
    pub services: Option<RawServices>,
    /// The XDP L4 balancer on the namespace's VIP (cluster only).
    pub balancer: Option<RawBalancer>,
}

/// `[plugins]`: flows that packages install, one folder each.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlugins {
    /// The folder holding one folder per plugin (default `/usr/lib/drop/plugins`).
    pub dir: Option<PathBuf>,
    /// `false`: no plugin's flow is applied on this node (default `true`).
    pub enabled: Option<bool>,
}

/// The validated `[plugins]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginsConfig {
    pub dir: PathBuf,
    pub enabled: bool,
}

/// `[balancer]`: the XDP balancer of services with a port.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBalancer {
    /// `true`: this node loads the balancer (default `false`).
    pub enabled: Option<bool>,
    /// Interface to attach to (default: the one whose route reaches the other members).
    pub interface: Option<String>,
    /// `auto` (native, else generic), `native` or `generic` (default `auto`).
    pub mode: Option<String>,
    /// Where maps and link are pinned (a bpffs; default `/sys/fs/bpf/drop`).
    pub pin_dir: Option<PathBuf>,
}

/// `[services]`: how this node reaches its systemd for services.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServices {
    /// `false`: this node runs no service instances (default `true`).
    pub enabled: Option<bool>,
    /// D-Bus address of systemd's bus (default: the system bus).
    pub bus: Option<String>,
    /// Where installed units' templates are written (default `/run/systemd/system`).
    pub unit_dir: Option<PathBuf>,
    /// The journal `service logs` reads (default: the system journal).
    pub journal_dir: Option<PathBuf>,
    /// Failures of one service on a node before its instances go elsewhere (default 3).
    pub max_failures: Option<u32>,
}

/// The validated `[services]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicesConfig {
    /// `None`: the system bus.
    pub bus: Option<String>,
    pub unit_dir: PathBuf,
    pub journal_dir: Option<PathBuf>,
    pub max_failures: u32,
}

/// `[vip]`: how this node holds its namespace's floating IP.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVip {
    /// `false`: this node never adds the address (default `true`).
    pub enabled: Option<bool>,
    /// Interface for the address (default: the one whose route reaches the other members).
    pub interface: Option<String>,
    /// UDP port of the floating-IP protocol, the same on every node (default: cluster port + 2).
    pub port: Option<u16>,
    /// Heartbeat interval (default: `20ms` with the `fast` profile, `100ms` with `lan`).
    pub heartbeat: Option<String>,
    /// Heartbeats a holder may miss before another member takes over (default: 6 / 10).
    pub missed_heartbeats: Option<u32>,
    /// Gratuitous announcements sent at once on takeover, on a conflict, after a partition
    /// heals (default 5).
    pub garp_burst: Option<u32>,
    /// A second burst after takeover, or `off` (default `2s`).
    pub garp_repeat_after: Option<String>,
    /// One announcement this often while holding, or `off` (default `30s`).
    pub garp_refresh: Option<String>,
    /// At most one conflict burst this often (default `1s`).
    pub garp_conflict_gap: Option<String>,
}

/// `[cluster]`: membership address, seeds, key, timing (memberlist's knob names).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    /// `ip:port` for memberlist, TCP and UDP.
    pub bind: Option<String>,
    /// `ip:port` peers use to reach this node (default: `bind`).
    pub advertise: Option<String>,
    /// `ip:port` of the peer transport (default: the advertised IP, port + 1).
    pub peer: Option<String>,
    /// Members to contact at start; `<state_dir>/drop-hosts` adds more, one a line.
    #[serde(default)]
    pub seeds: Vec<String>,
    /// File holding the cluster key: base64 of 16, 24 or 32 bytes.
    pub key_file: Option<PathBuf>,
    /// `lan` (default) or `fast`.
    pub profile: Option<String>,
    /// Relative size of this node for placement (default: 100 per CPU).
    pub capacity: Option<u32>,
    /// `group:port` (an IPv4 multicast group) to find peers on the LAN; off when absent.
    pub multicast: Option<String>,
    pub probe_interval: Option<String>,
    pub probe_timeout: Option<String>,
    pub suspicion_mult: Option<usize>,
    pub suspicion_max_timeout_mult: Option<usize>,
    pub gossip_interval: Option<String>,
    pub gossip_nodes: Option<usize>,
    pub gossip_to_the_dead_time: Option<String>,
    pub push_pull_interval: Option<String>,
    pub retransmit_mult: Option<usize>,
    pub indirect_checks: Option<usize>,
    pub timeout: Option<String>,
    pub awareness_max_multiplier: Option<usize>,
    pub disable_reliable_pings: Option<bool>,
}

/// Parses `500ms`, `2s` or `1m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, unit) = t
        .find(|c: char| !c.is_ascii_digit())
        .map_or((t, ""), |i| t.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as `500ms`, `2s` or `1m`"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!(
            "`{text}` needs a unit: `ms`, `s` or `m` (as in `500ms`)"
        )),
    }
}

/// Validates the `[vip]` section over the defaults of the cluster's profile.
fn vip_from_raw(
    raw: RawVip,
    cluster: &ClusterConfig,
    origin: &str,
) -> Result<VipSettings, ConfigError> {
    let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
        origin: origin.to_string(),
        key,
        reason,
    };
    let mut params = if cluster.profile == "fast" {
        Params::fast()
    } else {
        Params::lan()
    };
    let heartbeat = match &raw.heartbeat {
        Some(t) => parse_duration(t).map_err(|r| invalid("vip.heartbeat", r))?,
        None => params.heartbeat,
    };
    if !(Duration::from_millis(5)..=Duration::from_secs(10)).contains(&heartbeat) {
        return Err(invalid(
            "vip.heartbeat",
            "must be between 5ms and 10s".into(),
        ));
    }
    let missed = match raw.missed_heartbeats {
        Some(n) if !(3..=100).contains(&n) => {
            return Err(invalid(
                "vip.missed_heartbeats",
                "must be between 3 and 100 (the lease is two heartbeats shorter)".into(),
            ));
        }
        Some(n) => n,
        None => u32::try_from(params.dead_after.as_millis() / params.heartbeat.as_millis().max(1))
            .unwrap_or(10),
    };
    params = Params::new(heartbeat, missed);
    let off_or =
        |key: &'static str, v: &Option<String>, default: Option<Duration>| match v.as_deref() {
            None => Ok(default),
            Some("off") => Ok(None),
            Some(t) => {
                let d = parse_duration(t).map_err(|r| invalid(key, format!("{r}, or `off`")))?;
                if d.is_zero() {
                    return Err(invalid(key, "must be greater than zero, or `off`".into()));
                }
                Ok(Some(d))
            }
        };
    let defaults = Garp::default();
    let burst = raw.garp_burst.unwrap_or(defaults.burst);
    if !(1..=50).contains(&burst) {
        return Err(invalid("vip.garp_burst", "must be between 1 and 50".into()));
    }
    let garp = Garp {
        burst,
        repeat_after: off_or(
            "vip.garp_repeat_after",
            &raw.garp_repeat_after,
            defaults.repeat_after,
        )?,
        refresh: off_or("vip.garp_refresh", &raw.garp_refresh, defaults.refresh)?,
        conflict_gap: match &raw.garp_conflict_gap {
            Some(t) => parse_duration(t).map_err(|r| invalid("vip.garp_conflict_gap", r))?,
            None => defaults.conflict_gap,
        },
    };
    if let Some(i) = &raw.interface
        && (i.is_empty() || i.len() > 15 || i.contains(['/', ' ']))
    {
        return Err(invalid(
            "vip.interface",
            format!("`{i}` is not an interface name (1 to 15 characters, no `/` or space)"),
        ));
    }
    let port = match raw.port {
        Some(0) => return Err(invalid("vip.port", "must not be 0".into())),
        Some(p) => p,
        None => cluster.bind.port().checked_add(2).ok_or_else(|| {
            invalid(
                "vip.port",
                "the cluster port leaves no room for port + 2; set it".into(),
            )
        })?,
    };
    Ok(VipSettings {
        enabled: raw.enabled.unwrap_or(true),
        interface: raw.interface,
        bind_ip: cluster.bind.ip(),
        port,
        params,
        garp,
    })
}

/// Validates the `[cluster]` section.
fn cluster_from_raw(raw: RawCluster, origin: &str) -> Result<ClusterConfig, ConfigError> {
    let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
        origin: origin.to_string(),
        key,
        reason,
    };
    let addr = |key: &'static str, text: &str| -> Result<SocketAddr, ConfigError> {
        text.parse().map_err(|_| {
            invalid(
                key,
                format!("`{text}` is not `ip:port` (an IP address and a port)"),
            )
        })
    };
    let bind_text = raw
        .bind
        .ok_or_else(|| invalid("cluster.bind", "is required in `[cluster]`".into()))?;
    let bind = addr("cluster.bind", &bind_text)?;
    let advertise = match &raw.advertise {
        Some(a) => addr("cluster.advertise", a)?,
        None if bind.ip().is_unspecified() => {
            return Err(invalid(
                "cluster.advertise",
                format!("is required when `cluster.bind` is `{bind}`: peers need a real address"),
            ));
        }
        None => bind,
    };
    let peer = match &raw.peer {
        Some(p) => addr("cluster.peer", p)?,
        None => SocketAddr::new(
            advertise.ip(),
            advertise.port().checked_add(1).ok_or_else(|| {
                invalid(
                    "cluster.peer",
                    "bind port 65535 leaves no room for port + 1; set it".into(),
                )
            })?,
        ),
    };
    let seeds = raw
        .seeds
        .iter()
        .map(|s| addr("cluster.seeds", s))
        .collect::<Result<Vec<_>, _>>()?;
    let key_file = raw.key_file.ok_or_else(|| {
        invalid(
            "cluster.key_file",
            "is required: gossip is always encrypted (`dropctl cluster keygen` makes a key)".into(),
        )
    })?;
    require_absolute(&key_file).map_err(|r| invalid("cluster.key_file", r))?;
    let profile = raw.profile.unwrap_or_else(|| "lan".into());
    let mut timing = Timing::profile(&profile).ok_or_else(|| {
        invalid(
            "cluster.profile",
            format!("`{profile}` is not `lan` or `fast`"),
        )
    })?;
    let dur = |key: &'static str, v: &Option<String>, slot: &mut Duration| {
        if let Some(text) = v {
            *slot = parse_duration(text).map_err(|r| invalid(key, r))?;
            if slot.is_zero() {
                return Err(invalid(key, "must be greater than zero".into()));
            }
        }
        Ok(())
    };
    dur(
        "cluster.probe_interval",
        &raw.probe_interval,
        &mut timing.probe_interval,
    )?;
    dur(
        "cluster.probe_timeout",
        &raw.probe_timeout,
        &mut timing.probe_timeout,
    )?;
    dur(
        "cluster.gossip_interval",
        &raw.gossip_interval,
        &mut timing.gossip_interval,
    )?;
    dur(
        "cluster.gossip_to_the_dead_time",
        &raw.gossip_to_the_dead_time,
        &mut timing.gossip_to_the_dead_time,
    )?;
    dur(
        "cluster.push_pull_interval",
        &raw.push_pull_interval,
        &mut timing.push_pull_interval,
    )?;
    dur("cluster.timeout", &raw.timeout, &mut timing.timeout)?;
    let count = |key: &'static str, v: Option<usize>, slot: &mut usize| {
        if let Some(n) = v {
            if n == 0 {
                return Err(invalid(key, "must be at least 1".into()));
            }
            *slot = n;
        }
        Ok(())
    };
    count(
        "cluster.suspicion_mult",
        raw.suspicion_mult,
        &mut timing.suspicion_mult,
    )?;
    count(
        "cluster.suspicion_max_timeout_mult",
        raw.suspicion_max_timeout_mult,
        &mut timing.suspicion_max_timeout_mult,
    )?;
    count(
        "cluster.gossip_nodes",
        raw.gossip_nodes,
        &mut timing.gossip_nodes,
    )?;
    count(
        "cluster.retransmit_mult",
        raw.retransmit_mult,
        &mut timing.retransmit_mult,
    )?;
    count(
        "cluster.indirect_checks",
        raw.indirect_checks,
        &mut timing.indirect_checks,
    )?;
    count(
        "cluster.awareness_max_multiplier",
        raw.awareness_max_multiplier,
        &mut timing.awareness_max_multiplier,
    )?;
    if let Some(b) = raw.disable_reliable_pings {
        timing.disable_reliable_pings = b;
    }
    let capacity = match raw.capacity {
        Some(0) => return Err(invalid("cluster.capacity", "must be at least 1".into())),
        Some(c) => c,
        None => std::thread::available_parallelism()
            .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .saturating_mul(100),
    };
    let multicast = match &raw.multicast {
        None => None,
        Some(text) => {
            let a: std::net::SocketAddrV4 = text.parse().map_err(|_| {
                invalid(
                    "cluster.multicast",
                    format!("`{text}` is not `group:port` with an IPv4 group"),
                )
            })?;
            if !a.ip().is_multicast() || !advertise.is_ipv4() {
                return Err(invalid(
                    "cluster.multicast",
                    format!(
                        "`{text}` must be an IPv4 multicast group (224.0.0.0/4), on an IPv4 cluster address"
                    ),
                ));
            }
            Some(a)
        }
    };
    Ok(ClusterConfig {
        multicast,
        bind,
        advertise,
        peer,
        seeds,
        key_file,
        profile,
        timing,
        capacity,
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuntime {
    /// Function bundles (`image:`), one folder each. Default: `<state_dir>/images`.
    pub images_dir: Option<PathBuf>,
    /// Worker logs, one file per pool. Default: `<state_dir>/logs`.
    pub logs_dir: Option<PathBuf>,
    /// Put every pool in its own cgroup (default true; needs root).
    pub cgroups: Option<bool>,
    /// Name of the cgroup subtree (below the daemon's own cgroup) that holds the pools.
    pub cgroup_subtree: Option<String>,
    /// Who workers of a pool without `user:` run as (default `drop-fn`, from sysusers.d).
    pub worker_user: Option<String>,
    /// Their group (default: the user's primary group).
    pub worker_group: Option<String>,
    /// Whether a flow may ask for `user: root` (default false: such a flow is refused).
    pub allow_root_workers: Option<bool>,
    /// Largest bundle one import may send, in MiB (default 512).
    pub image_max_mb: Option<u64>,
    /// All installed images together, in MiB (default 8192).
    pub images_quota_mb: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    /// `host:port` of the HTTP gateway, or `off`. Default: 127.0.0.1:8081.
    pub listen: Option<String>,
    /// When set, gateway requests (and `/metrics`) need `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Connections at once (default 1024).
    pub max_connections: Option<usize>,
    /// Connections at once from one client address (default 256).
    pub max_connections_per_client: Option<usize>,
    /// The whole request head within this, e.g. `10s` (default).
    pub head_timeout: Option<String>,
    /// The whole body within this after the head, e.g. `30s` (default).
    pub body_timeout: Option<String>,
    /// Idle keep-alive connections closed after this (default `60s`).
    pub idle_timeout: Option<String>,
    /// MiB of request bodies received at once over all connections (default 64).
    pub body_budget_mb: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNode {
    pub name: Option<String>,
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawControl {
    pub socket: Option<PathBuf>,
    pub socket_group: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTuning {
    pub sysctl_root: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    /// A `tracing` filter such as `info` or `drop_supervisor=debug,info`.
    pub level: Option<String>,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file it came from; `None` when the daemon runs on defaults alone.
    pub path: Option<PathBuf>,
    pub node_name: String,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub socket_group: String,
    pub sysctl_root: PathBuf,
    pub log_level: String,
    pub images_dir: PathBuf,
    pub logs_dir: PathBuf,
    pub cgroups: bool,
    pub cgroup_subtree: String,
    /// `runtime.worker_user` as written; `None`: the default ([`DEFAULT_WORKER_USER`]).
    pub worker_user: Option<String>,
    pub worker_group: Option<String>,
    pub allow_root_workers: bool,
    /// Largest bundle one `image import` may send; more is refused (413) before it is stored.
    pub image_max_bytes: u64,
    /// Installed images together may not grow past this (413).
    pub images_quota_bytes: u64,
    /// `None`: the gateway is off.
    pub gateway_listen: Option<SocketAddr>,
    pub gateway_token: Option<String>,
    pub gateway_limits: GatewayLimits,
    /// Plugins: where their folders are, and whether they are applied.
    pub plugins: PluginsConfig,
    /// `None`: a single node.
    pub cluster: Option<ClusterConfig>,
    /// `None`: a single node (the floating IP needs a cluster).
    pub vip: Option<VipSettings>,
    /// `None`: a single node, or `[services] enabled = false`.
    pub services: Option<ServicesConfig>,
    /// `None`: no balancer here (the default).
    pub balancer: Option<crate::balancer::LbSettings>,
    /// Where a balancer would pin its state (also without `[balancer]`: a node that stopped
    /// balancing removes what it left there).
    pub balancer_pin_dir: PathBuf,
}

const MIB: u64 = 1024 * 1024;

/// Who workers run as when neither the flow nor `runtime.worker_user` says (the package's
/// sysusers.d creates it).
pub const DEFAULT_WORKER_USER: &str = "drop-fn";

/// Default address of the HTTP gateway.
pub const DEFAULT_GATEWAY: &str = "127.0.0.1:8081";

impl Config {
    /// Loads `path`, or the defaults when `path` is `None` and the default file does not exist.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let path = match path {
            // Absolute, so that status and logs name the file unambiguously.
            Some(p) => std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => PathBuf::from(DEFAULT_CONFIG_PATH),
            None => return Config::from_raw(RawConfig::default(), None),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Config::parse(&text, &path)
    }

    /// Parses and validates `text`, naming `path` in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        Config::from_raw(raw, Some(path.to_path_buf()))
    }

    pub fn from_raw(raw: RawConfig, path: Option<PathBuf>) -> Result<Config, ConfigError> {
        let origin = match &path {
            Some(p) => p.display().to_string(),
            None => "(defaults)".to_string(),
        };
        let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
            origin: origin.clone(),
            key,
            reason,
        };

        let node_name = match raw.node.name {
            Some(name) => name,
            None => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "drop-node".to_string()),
        };
        validate_name(&node_name).map_err(|r| invalid("node.name", r))?;

        let state_dir = raw
            .node
            .state_dir
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        require_absolute(&state_dir).map_err(|r| invalid("node.state_dir", r))?;

        let socket = raw.control.socket.unwrap_or_else(|| DEFAULT_SOCKET.into());
        require_absolute(&socket).map_err(|r| invalid("control.socket", r))?;
        let len = socket.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(invalid(
                "control.socket",
                format!("path is {len} bytes; a Unix socket path holds at most {MAX_SOCKET_PATH}"),
            ));
        }

        let socket_group = raw
            .control
            .socket_group
            .unwrap_or_else(|| DEFAULT_SOCKET_GROUP.into());
        validate_name(&socket_group).map_err(|r| invalid("control.socket_group", r))?;

        let sysctl_root = raw
            .tuning
            .sysctl_root
            .unwrap_or_else(|| DEFAULT_SYSCTL_ROOT.into());
        require_absolute(&sysctl_root).map_err(|r| invalid("tuning.sysctl_root", r))?;

        let log_level = raw.log.level.unwrap_or_else(|| "info".into());
        tracing_subscriber::EnvFilter::try_new(&log_level)
            .map_err(|e| invalid("log.level", format!("not a tracing filter: {e}")))?;

        let images_dir = raw
            .runtime
            .images_dir
            .unwrap_or_else(|| state_dir.join("images"));
        require_absolute(&images_dir).map_err(|r| invalid("runtime.images_dir", r))?;
        let logs_dir = raw
            .runtime
            .logs_dir
            .unwrap_or_else(|| state_dir.join("logs"));
        require_absolute(&logs_dir).map_err(|r| invalid("runtime.logs_dir", r))?;
        let cgroups = raw.runtime.cgroups.unwrap_or(true);
        let cgroup_subtree = raw
            .runtime
            .cgroup_subtree
            .unwrap_or_else(|| "drop-pools".into());
        validate_name(&cgroup_subtree).map_err(|r| invalid("runtime.cgroup_subtree", r))?;
        let worker_user = raw.runtime.worker_user;
        let worker_group = raw.runtime.worker_group;
        let allow_root_workers = raw.runtime.allow_root_workers.unwrap_or(false);
        let image_max_bytes = raw.runtime.image_max_mb.unwrap_or(512).saturating_mul(MIB);
        let images_quota_bytes = raw
            .runtime
            .images_quota_mb
            .unwrap_or(8192)
            .saturating_mul(MIB);

        let gateway_limits = gateway_limits(&raw.gateway, &invalid)?;
        let listen = raw.gateway.listen.unwrap_or_else(|| DEFAULT_GATEWAY.into());
        let gateway_listen = if listen == "off" {
            None
        } else {
            Some(listen.parse().map_err(|_| {
                invalid(
                    "gateway.listen",
                    format!("`{listen}` is not `host:port` (an IP address and a port) or `off`"),
                )
            })?)
        };
        let gateway_token = raw.gateway.token;
        if gateway_token
            .as_deref()
            .is_some_and(|t| t.len() < 16 || t.contains(char::is_whitespace))
        {
            return Err(invalid(
                "gateway.token",
                "must be at least 16 characters without spaces".into(),
            ));
        }

        let plugins_dir = raw
            .plugins
            .dir
            .unwrap_or_else(|| DEFAULT_PLUGINS_DIR.into());
        require_absolute(&plugins_dir).map_err(|r| invalid("plugins.dir", r))?;
        let plugins = PluginsConfig {
            dir: plugins_dir,
            enabled: raw.plugins.enabled.unwrap_or(true),
        };

        let cluster = raw
            .cluster
            .map(|c| cluster_from_raw(c, &origin))
            .transpose()?;
        let vip = match (&cluster, raw.vip) {
            (Some(c), v) => Some(vip_from_raw(v.unwrap_or_default(), c, &origin)?),
            (None, Some(_)) => {
                return Err(invalid(
                    "vip",
                    "the floating IP needs a `[cluster]` section".into(),
                ));
            }
            (None, None) => None,
        };
        let services = match (&cluster, raw.services) {
            (Some(_), s) => {
                let s = s.unwrap_or_default();
                if s.enabled == Some(false) {
                    None
                } else {
                    let unit_dir = s
                        .unit_dir
                        .unwrap_or_else(|| PathBuf::from("/run/systemd/system"));
                    require_absolute(&unit_dir).map_err(|r| invalid("services.unit_dir", r))?;
                    if let Some(j) = &s.journal_dir {
                        require_absolute(j).map_err(|r| invalid("services.journal_dir", r))?;
                    }
                    if let Some(b) = &s.bus
                        && !b.contains(':')
                    {
                        return Err(invalid(
                            "services.bus",
                            format!(
                                "{b:?} is not a D-Bus address (like unix:path=/run/dbus/system_bus_socket)"
                            ),
                        ));
                    }
                    let max_failures = s.max_failures.unwrap_or(3);
                    if max_failures == 0 {
                        return Err(invalid(
                            "services.max_failures",
                            "must be at least 1".into(),
                        ));
                    }
                    Some(ServicesConfig {
                        bus: s.bus,
                        unit_dir,
                        journal_dir: s.journal_dir,
                        max_failures,
                    })
                }
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "services",
                    "services need a `[cluster]` section".into(),
                ));
            }
            (None, None) => None,
        };

        let raw_lb = raw.balancer.unwrap_or_default();
        let balancer_pin_dir = raw_lb
            .pin_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_BALANCER_PIN_DIR));
        require_absolute(&balancer_pin_dir).map_err(|r| invalid("balancer.pin_dir", r))?;
        let balancer = if raw_lb.enabled == Some(true) {
            if cluster.is_none() {
                return Err(invalid(
                    "balancer",
                    "the balancer serves a namespace's VIP: it needs a `[cluster]` section".into(),
                ));
            }
            let mode = match raw_lb.mode.as_deref().unwrap_or("auto") {
                "auto" => drop_net::XdpMode::Auto,
                "native" => drop_net::XdpMode::Native,
                "generic" => drop_net::XdpMode::Generic,
                other => {
                    return Err(invalid(
                        "balancer.mode",
                        format!("{other:?}: auto, native or generic"),
                    ));
                }
            };
            Some(crate::balancer::LbSettings {
                interface: raw_lb.interface,
                mode,
                pin_dir: balancer_pin_dir.clone(),
            })
        } else {
            None
        };

        Ok(Config {
            path,
            node_name,
            state_dir,
            socket,
            socket_group,
            sysctl_root,
            log_level,
            images_dir,
            logs_dir,
            cgroups,
            cgroup_subtree,
            worker_user,
            worker_group,
            allow_root_workers,
            image_max_bytes,
            images_quota_bytes,
            gateway_listen,
            gateway_token,
            gateway_limits,
            plugins,
            cluster,
            vip,
            services,
            balancer,
            balancer_pin_dir,
        })
    }
}

/// The `[gateway]` limits over their defaults.
fn gateway_limits(
    raw: &RawGateway,
    invalid: &dyn Fn(&'static str, String) -> ConfigError,
) -> Result<GatewayLimits, ConfigError> {
    let mut limits = GatewayLimits::default();
    if let Some(n) = raw.max_connections {
        limits.max_connections = n;
    }
    if let Some(n) = raw.max_connections_per_client {
        limits.max_connections_per_client = n;
    }
    for (key, text, slot) in [
        (
            "gateway.head_timeout",
            &raw.head_timeout,
            &mut limits.head_timeout,
        ),
        (
            "gateway.body_timeout",
            &raw.body_timeout,
            &mut limits.body_timeout,
        ),
        (
            "gateway.idle_timeout",
            &raw.idle_timeout,
            &mut limits.idle_timeout,
        ),
    ] {
        if let Some(text) = text {
            *slot = parse_duration(text).map_err(|r| invalid(key, r))?;
        }
    }
    if let Some(mb) = raw.body_budget_mb {
        limits.body_budget = mb.saturating_mul(1024 * 1024);
    }
    limits.validate().map_err(|r| invalid("gateway", r))?;
    Ok(limits)
}

fn require_absolute(p: &Path) -> Result<(), String> {
    if p.is_absolute() {
        Ok(())
    } else {
        Err(format!("`{}` must be an absolute path", p.display()))
    }
}

/// Node and group names: 1–63 bytes of `[A-Za-z0-9._-]`, not starting with `-` or `.`.
fn validate_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > 63 {
        return Err(format!("`{name}` must be 1 to 63 bytes long"));
    }
    if name.starts_with(['-', '.']) || !name.chars().all(ok_char) {
        return Err(format!(
            "`{name}` may hold only letters, digits, `.`, `_` and `-`, and must not start with `-` or `.`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/drop/test.toml"))
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("[node]\nname = \"n1\"\n").unwrap();
        assert_eq!(c.node_name, "n1");
        assert_eq!(c.state_dir, Path::new(DEFAULT_STATE_DIR));
        assert_eq!(c.socket, Path::new(DEFAULT_SOCKET));
        assert_eq!(c.socket_group, "drop");
        assert_eq!(c.sysctl_root, Path::new("/proc/sys"));
        assert_eq!(c.log_level, "info");
        assert_eq!(c.path.as_deref(), Some(Path::new("/etc/drop/test.toml")));
    }

    #[test]
    fn every_key_is_read() {
        let c = parse(
            "[node]\nname = \"a\"\nstate_dir = \"/s\"\n[control]\nsocket = \"/r/x.sock\"\n\
             socket_group = \"ops\"\n[tuning]\nsysctl_root = \"/t\"\n[log]\nlevel = \"debug\"\n",
        )
        .unwrap();
        assert_eq!(
            (
                c.state_dir.to_str(),
                c.socket.to_str(),
                c.socket_group.as_str()
            ),
            (Some("/s"), Some("/r/x.sock"), "ops")
        );
        assert_eq!(
            (c.sysctl_root.to_str(), c.log_level.as_str()),
            (Some("/t"), "debug")
        );
    }

    #[test]
    fn plugins_section_defaults_and_errors_name_the_key() {
        let c = parse("[node]\nname = \"n1\"\n").unwrap();
        assert_eq!(
            c.plugins,
            PluginsConfig {
                dir: PathBuf::from("/usr/lib/drop/plugins"),
                enabled: true
            }
        );
        let c = parse("[plugins]\ndir = \"/opt/drop/plugins\"\nenabled = false\n").unwrap();
        assert_eq!(
            (c.plugins.dir.to_str(), c.plugins.enabled),
            (Some("/opt/drop/plugins"), false)
        );
        let err = parse("[plugins]\ndir = \"plugins\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("plugins.dir") && err.contains("absolute"),
            "{err}"
        );
        let err = parse("[plugins]\nenabled = true\ndri = \"/x\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("test.toml") && err.contains("dri") && err.contains("line 3, column 1"),
            "{err}"
        );
        let err = parse("[plugins]\nenabled = \"yes\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("enabled") && err.contains("line 2"), "{err}");
    }

    #[test]
    fn unknown_key_names_file_key_line_and_column() {
        let err = parse("[node]\nname = \"a\"\nstate_dri = \"/x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/etc/drop/test.toml"), "{err}");
        assert!(err.contains("state_dri"), "{err}");
        assert!(err.contains("line 3, column 1"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err = parse("[control]\nsocket = 5\n").unwrap_err().to_string();
        assert!(err.contains("socket") && err.contains("line 2"), "{err}");
    }

    #[test]
    fn relative_paths_are_refused_with_the_key() {
        let err = parse("[node]\nname = \"a\"\nstate_dir = \"var/lib\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("node.state_dir") && err.contains("absolute"),
            "{err}"
        );
        let err = parse("[tuning]\nsysctl_root = \"proc\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tuning.sysctl_root"), "{err}");
    }

    #[test]
    fn overlong_socket_path_is_refused() {
        let long = format!("/{}", "s".repeat(120));
        let err = parse(&format!("[control]\nsocket = \"{long}\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("control.socket") && err.contains("at most 107"),
            "{err}"
        );
    }

    #[test]
    fn bad_names_and_log_filters_are_refused() {
        let err = parse("[node]\nname = \"a b\"\n").unwrap_err().to_string();
        assert!(err.contains("node.name"), "{err}");
        let err = parse("[log]\nlevel = \"info,=[\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("log.level"), "{err}");
    }

    #[test]
    fn gateway_limits_override_the_defaults_and_nonsense_names_the_key() {
        assert_eq!(parse("").unwrap().gateway_limits, GatewayLimits::default());
        let c = parse(
            "[gateway]\nmax_connections = 100\nmax_connections_per_client = 10\n\
             head_timeout = \"2s\"\nbody_timeout = \"500ms\"\nbody_budget_mb = 8\n",
        )
        .unwrap();
        let l = c.gateway_limits;
        assert_eq!((l.max_connections, l.max_connections_per_client), (100, 10));
        assert_eq!(
            (l.head_timeout, l.body_timeout, l.body_budget),
            (Duration::from_secs(2), Duration::from_millis(500), 8 << 20)
        );
        let err = parse("[gateway]\nhead_timeout = \"2\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("gateway.head_timeout"), "{err}");
        let err = parse("[gateway]\nmax_connections = 10\nmax_connections_per_client = 20\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_connections_per_client"), "{err}");
    }

    #[test]
    fn missing_file_is_a_read_error_naming_it() {
        let err = Config::load(Some(Path::new("/nonexistent/drop.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/drop.toml"), "{err}");
    }

    const CLUSTER: &str =
        "[cluster]\nbind = \"10.0.0.1:7946\"\nkey_file = \"/etc/drop/cluster.key\"\n";

    #[test]
    fn cluster_section_defaults() {
        let c = parse(CLUSTER).unwrap().cluster.unwrap();
        assert_eq!(c.bind, "10.0.0.1:7946".parse().unwrap());
        assert_eq!(c.advertise, c.bind);
        assert_eq!(c.peer, "10.0.0.1:7947".parse().unwrap());
        assert_eq!(c.profile, "lan");
        assert_eq!(c.timing, Timing::lan());
        assert!(c.capacity >= 100);
        assert!(parse("").unwrap().cluster.is_none());
    }

    #[test]
    fn cluster_knobs_override_the_profile() {
        let text = format!(
            "{CLUSTER}profile = \"fast\"\nprobe_interval = \"300ms\"\nsuspicion_mult = 5\nseeds = [\"10.0.0.2:7946\"]\n"
        );
        let c = parse(&text).unwrap().cluster.unwrap();
        assert_eq!(c.timing.probe_interval, Duration::from_millis(300));
        assert_eq!(c.timing.suspicion_mult, 5);
        assert_eq!(c.timing.gossip_interval, Timing::fast().gossip_interval);
        assert_eq!(c.seeds, vec!["10.0.0.2:7946".parse().unwrap()]);
    }

    #[test]
    fn cluster_errors_name_the_key() {
        let cases = [
            ("[cluster]\nkey_file = \"/k\"\n", "cluster.bind"),
            ("[cluster]\nbind = \"10.0.0.1:7946\"\n", "cluster.key_file"),
            (&format!("{CLUSTER}profile = \"wan\"\n"), "cluster.profile"),
            (
                &format!("{CLUSTER}probe_interval = \"5\"\n"),
                "cluster.probe_interval",
            ),
            (
                &format!("{CLUSTER}gossip_nodes = 0\n"),
                "cluster.gossip_nodes",
            ),
            (&format!("{CLUSTER}seeds = [\"nohost\"]\n"), "cluster.seeds"),
            (
                "[cluster]\nbind = \"0.0.0.0:7946\"\nkey_file = \"/k\"\n",
                "cluster.advertise",
            ),
        ];
        for (text, key) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?}: {err}");
        }
        let err = parse(&format!("{CLUSTER}probe_intervall = \"1s\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("probe_intervall"), "{err}");
    }

    #[test]
    fn durations_parse_with_units_only() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("1h").is_err());
    }
}
