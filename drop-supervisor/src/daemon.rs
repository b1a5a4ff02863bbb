//! The daemon's life: state directory and identity, control socket, readiness, watchdog, and a
//! clean stop on SIGTERM/SIGINT that removes the socket.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{Config, DEFAULT_WORKER_USER};
use crate::control::{self, Supervisor};
use crate::gateway::{Gateway, GatewayOptions, Limits as GatewayLimits};
use crate::host::notify::Notifier;
use crate::host::state;
use crate::runtime::worker::process::{Credentials, resolve_credentials};
use crate::runtime::{Runtime, RuntimeOptions};

/// Mode of the control socket: owner and group may connect.
pub const SOCKET_MODE: u32 = 0o660;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error("another drop-supervisor is already listening on {0}")]
    AlreadyRunning(PathBuf),
    #[error("starting the balancer: {0}")]
    Balancer(String),
    #[error("cannot set up control socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("cannot start the gateway on {addr}")]
    Gateway {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the cluster key file {path}")]
    ClusterKeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cluster key file {path}: {reason}")]
    ClusterKey { path: PathBuf, reason: String },
    #[error(transparent)]
    Cluster(#[from] crate::cluster::membership::MembershipError),
    #[error("cannot start the floating-IP protocol on port {port}")]
    Vip {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the peer transport on {addr}")]
    Peer {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read /proc/self/cgroup")]
    ProcSelfCgroup(#[source] std::io::Error),
    #[error("cannot set up pool cgroups (set `runtime.cgroups = false` to run without them)")]
    Cgroups(#[source] crate::runtime::cgroup::CgroupError),
    #[error("runtime.worker_user / worker_group: {0} (the package's sysusers.d creates `drop-fn`)")]
    WorkerUser(String),
}

/// Who workers run as when their flow does not say: `runtime.worker_user`, else `drop-fn`, else
/// — on a machine without the package's sysusers.d (a development checkout) — `nobody`, said in
/// the log. A daemon that is not root cannot switch users: its workers run as itself.
fn worker_credentials(config: &Config) -> Result<Option<Credentials>, DaemonError> {
    if !nix::unistd::geteuid().is_root() {
        info!("not running as root: workers run as this daemon's own user");
        return Ok(None);
    }
    let group = config.worker_group.as_deref();
    let (user, resolved) = match &config.worker_user {
        Some(user) => (
            user.as_str(),
            resolve_credentials(Some(user), group).map_err(DaemonError::WorkerUser)?,
        ),
        None => match resolve_credentials(Some(DEFAULT_WORKER_USER), group) {
            Ok(c) => (DEFAULT_WORKER_USER, c),
            Err(why) => {
                warn!(
                    %why,
                    "no user {DEFAULT_WORKER_USER}: workers run as nobody (install the package's sysusers.d or set runtime.worker_user)"
                );
                (
                    "nobody",
                    resolve_credentials(Some("nobody"), group).map_err(DaemonError::WorkerUser)?,
                )
            }
        },
    };
    if resolved.is_some_and(|c| c.uid == 0) && !config.allow_root_workers {
        return Err(DaemonError::WorkerUser(format!(
            "{user} is root; set runtime.allow_root_workers = true to run workers as root"
        )));
    }
    if let Some(c) = resolved {
        info!(user, uid = c.uid, gid = c.gid, "workers run as");
    }
    Ok(resolved)
}

fn start_runtime(config: &Config) -> Result<Runtime, DaemonError> {
    let cgroups = if config.cgroups {
        let own =
            std::fs::read_to_string("/proc/self/cgroup").map_err(DaemonError::ProcSelfCgroup)?;
        // On v2 this also enables the controllers for the pools' subtree (and moves the daemon
        // into its own leaf when it is not in the root): without it no pool group could be
        // made (found by the v2 guest of `cargo xtask test --vm`).
        let cg = crate::runtime::cgroup::setup(
            Path::new("/sys/fs/cgroup"),
            &own,
            &config.cgroup_subtree,
        )
        .map_err(DaemonError::Cgroups)?;
        info!(version = ?cg.version(), subtree = %config.cgroup_subtree, "pool cgroups ready");
        Some(Arc::from(cg))
    } else {
        warn!("runtime.cgroups = false: workers run without cgroup limits");
        None
    };
    Ok(Runtime::new(RuntimeOptions {
        state_dir: config.state_dir.clone(),
        images_dir: config.images_dir.clone(),
        logs_dir: config.logs_dir.clone(),
        cgroups,
        worker_credentials: worker_credentials(config)?,
        allow_root_workers: config.allow_root_workers,
        node_name: Some(config.node_name.clone()),
    }))
}

/// The cluster key from `cluster.key_file`.
fn cluster_key(
    cc: &crate::cluster::ClusterConfig,
) -> Result<memberlist::proto::SecretKey, DaemonError> {
    let text =
        std::fs::read_to_string(&cc.key_file).map_err(|source| DaemonError::ClusterKeyFile {
            path: cc.key_file.clone(),
            source,
        })?;
    crate::cluster::membership::parse_key(&text).map_err(|reason| DaemonError::ClusterKey {
        path: cc.key_file.clone(),
        reason,
    })
}

async fn start_cluster(
    config: &Config,
    cc: &crate::cluster::ClusterConfig,
    node_id: uuid::Uuid,
    gateway: Option<std::net::SocketAddr>,
) -> Result<crate::cluster::node::Cluster, DaemonError> {
    let key = cluster_key(cc)?;
    let cluster = crate::cluster::node::Cluster::start(crate::cluster::node::ClusterOptions {
        node_id: node_id.into(),
        name: config.node_name.clone(),
        state_dir: config.state_dir.clone(),
        config: cc.clone(),
        key,
        gateway,
    })
    .await?;
    Ok(cluster)
}

/// Starts the floating-IP agent. A seam that does not work (no netlink) is logged and leaves the
/// node without a floating IP rather than down.
/// The services agent on this node's systemd (the system bus, or the configured one).
fn start_services(
    sc: &crate::config::ServicesConfig,
    changed: Arc<tokio::sync::Notify>,
) -> Arc<crate::services::agent::Agent> {
    use crate::host::systemd::{SystemdBus, SystemdError};
    let bus = sc.bus.clone();
    let connect = move || {
        let bus = bus.clone();
        async move {
            match bus {
                None => SystemdBus::system().await,
                Some(addr) => {
                    let conn = zbus::connection::Builder::address(addr.as_str())
                        .build()
                        .await
                        .map_err(SystemdError::Bus)?;
                    Ok(SystemdBus::with_connection(conn))
                }
            }
        }
    };
    info!(bus = sc.bus.as_deref().unwrap_or("system"), unit_dir = %sc.unit_dir.display(), "services agent started");
    Arc::new(crate::services::agent::Agent::start(
        connect,
        crate::services::agent::AgentConfig {
            unit_dir: sc.unit_dir.clone(),
            max_failures: sc.max_failures,
        },
        changed,
    ))
}

fn start_vip(
    runtime: &Arc<Runtime>,
    cc: &crate::cluster::ClusterConfig,
    settings: &crate::vip::VipSettings,
    node_id: uuid::Uuid,
    node_name: &str,
    services: Option<&crate::config::ServicesConfig>,
) -> Result<Option<Arc<crate::vip::VipService>>, DaemonError> {
    let key = cluster_key(cc)?;
    let key = crate::vip::wire::VipKey::derive(key.as_ref());
    // The seam runs its own small runtime: create it on a plain thread.
    let net = std::thread::spawn(drop_net::Netlink::new).join();
    let net = match net {
        Ok(Ok(net)) => net,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "no netlink: this node will not hold a floating IP");
            return Ok(None);
        }
        Err(_) => {
            tracing::error!("the netlink set-up panicked: this node will not hold a floating IP");
            return Ok(None);
        }
    };
    let agent = crate::vip::agent::Agent::start(node_id, settings.clone(), key, Box::new(net))
        .map_err(|source| DaemonError::Vip {
            port: settings.port,
            source,
        })?;
    info!(
        port = settings.port,
        heartbeat_ms = settings.params.heartbeat.as_millis() as u64,
        dead_after_ms = settings.params.dead_after.as_millis() as u64,
        "floating-IP protocol listening"
    );
    Ok(Some(Arc::new(crate::vip::VipService::new(
        agent,
        runtime.clone(),
        settings.clone(),
        node_name.to_string(),
        services.map(|sc| Arc::new(crate::services::probe::UnitProbe::new(sc.bus.clone()))),
    ))))
}

/// At a stop, how long the gateway keeps serving open connections after it stopped accepting
/// (requests still on the wire), and the most it waits for the ones at work.
const GATEWAY_SETTLE: std::time::Duration = std::time::Duration::from_millis(50);
const GATEWAY_STOP_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a starting cluster node waits for its first pass before it serves its gateway.
const FIRST_PASS_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Events the status page shows, newest first.
const UI_EVENTS: usize = 30;

/// The node, cluster and floating-IP part of the status page (`/ui/state`; the runtime adds
/// the pools), and the newest events of the node's event log.
fn ui_state(
    name: &str,
    node_id: uuid::Uuid,
    started: Instant,
    state_dir: &Path,
    cluster: Option<&crate::cluster::node::Cluster>,
    vip: Option<&crate::vip::VipService>,
    lb: Option<&crate::balancer::LbService>,
) -> serde_json::Value {
    let vip_status = vip.and_then(crate::vip::VipService::status);
    let cluster_json =
        cluster.map(|c| serde_json::json!({ "nodes": c.nodes(), "namespaces": c.namespaces() }));
    let mut events = crate::events::log().recent(UI_EVENTS);
    events.reverse();
    serde_json::json!({
        "node": {
            "name": name,
            "id": node_id.to_string(),
            "version": crate::VERSION,
            "uptime_secs": started.elapsed().as_secs(),
            "draining": state::draining_since(state_dir).is_some(),
        },
        "cluster": cluster_json,
        "vip": vip_status,
        "lb": lb.map(crate::balancer::LbService::status),
        "events": events,
    })
}

/// Removes every address carrying DROP's mark from this network namespace (`drop-supervisor
/// --release-vip`, the unit's `ExecStopPost=`): what a daemon that died holding the floating IP
/// left behind. Returns the addresses removed.
pub fn release_vip() -> Result<Vec<drop_net::Vip>, drop_net::NetError> {
    let mut net = drop_net::Netlink::new()?;
    crate::vip::agent::release_leftovers(&mut net)
}

/// Binds the control socket at `path`: creates the parent directory, replaces a stale socket
/// left by a crash (but refuses when a live daemon answers on it), sets mode 0660 and, when the
/// group exists, group `group`.
pub fn bind_control_socket(path: &Path, group: &str) -> Result<UnixListener, DaemonError> {
    let err = |source| DaemonError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::AlreadyRunning(path.to_path_buf()));
        }
        warn!(socket = %path.display(), "removing stale control socket");
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(err)?;
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => {
            nix::unistd::chown(path, None, Some(g.gid)).map_err(|e| err(e.into()))?;
        }
        Ok(None) => info!(
            group,
            "group does not exist; control socket keeps the daemon's group"
        ),
        Err(e) => warn!(group, error = %e, "cannot look up socket group"),
    }
    Ok(listener)
}

/// Runs the daemon until SIGTERM or SIGINT. `started` is when the process began, for the
/// start-to-ready time in the log.
pub async fn run(config: Config, started: Instant) -> Result<(), DaemonError> {
    let notifier = Notifier::from_env();
    crate::events::log().set_node(&config.node_name);
    let (node_id, created) = state::load_or_create_node_id(&config.state_dir)?;
    if created {
        info!(%node_id, state_dir = %config.state_dir.display(), "created node identity");
    }
    if config.vip.as_ref().is_some_and(|v| v.enabled) {
        // Before anything else: a floating IP an earlier run left (it was SIGKILLed or crashed
        // while holding it, outside systemd's ExecStopPost=) must not answer while another node
        // holds it. This node takes it again only through the protocol.
        match std::thread::spawn(release_vip).join() {
            Ok(Ok(gone)) => {
                for v in gone {
                    warn!(address = %v.addr, interface = %v.ifname, "removed a floating IP left by an earlier run");
                }
            }
            Ok(Err(e)) => warn!(error = %e, "cannot look for floating IPs left by an earlier run"),
            Err(_) => warn!("looking for floating IPs left by an earlier run panicked"),
        }
    }
    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;

    let listener = bind_control_socket(&config.socket, &config.socket_group)?;
    let socket = config.socket.clone();
    let runtime = Arc::new(start_runtime(&config)?);
    let failed = {
        let rt = runtime.clone();
        tokio::task::spawn_blocking(move || rt.restore())
            .await
            .unwrap_or_default()
    };
    for (file, error) in &failed {
        warn!(file = %file.display(), %error, "persisted flow not restored");
    }
    // Plugins after the operator's flows (they keep their names) and before the cluster
    // reconciles (it leaves plugins' flows alone).
    let plugins = Arc::new(crate::plugins::Plugins::new(
        config.plugins.dir.clone(),
        config.plugins.enabled,
    ));
    if config.plugins.enabled {
        let (p, rt) = (plugins.clone(), runtime.clone());
        if let Ok(report) = tokio::task::spawn_blocking(move || p.reload(&rt)).await {
            let not_applied = report
                .list
                .plugins
                .iter()
                .filter(|p| p.state != crate::plugins::PluginState::Applied)
                .count();
            info!(
                dir = %config.plugins.dir.display(),
                applied = report.applied.len(),
                not_applied,
                "plugins applied"
            );
        }
    } else {
        info!("plugins are off ([plugins] enabled = false)");
    }
    // The gateway's socket is bound (and listening) now, so its address is known and callers
    // queue in its backlog; it is served once the node knows where its pools are (below).
    let gateway_listener = match config.gateway_listen {
        Some(addr) => {
            let listener = std::net::TcpListener::bind(addr)
                .map_err(|source| DaemonError::Gateway { addr, source })?;
            let local = listener
                .local_addr()
                .map_err(|source| DaemonError::Gateway { addr, source })?;
            Some((local, listener))
        }
        None => None,
    };
    let gateway_addr = gateway_listener.as_ref().map(|(a, _)| *a);
    let cluster = match &config.cluster {
        Some(cc) => Some(Arc::new(
            start_cluster(&config, cc, node_id, gateway_addr).await?,
        )),
        None => None,
    };
    let mut peer_server = None;
    let mut forward: Option<Arc<crate::cluster::peer::Forwarder>> = None;
    if let (Some(cluster), Some(cc)) = (&cluster, &config.cluster) {
        let key = crate::cluster::peer::PeerKey::from_file(&cc.key_file).map_err(|reason| {
            DaemonError::ClusterKey {
                path: cc.key_file.clone(),
                reason,
            }
        })?;
        let forwarder = Arc::new(crate::cluster::peer::Forwarder::new(
            cluster.registry(),
            key.clone(),
        ));
        runtime.set_forwarder(forwarder.clone());
        forward = Some(forwarder.clone());
        let listener =
            std::net::TcpListener::bind(cc.peer).map_err(|source| DaemonError::Peer {
                addr: cc.peer,
                source,
            })?;
        // Every peer is a node that forwards many callers' calls: no per-address cap here
        // beyond the global one (signed requests only).
        let limits = GatewayLimits::default();
        let options = GatewayOptions {
            token: None,
            peer_key: Some(key.clone()),
            peer_self: Some(cc.peer.to_string()),
            node_name: Some(config.node_name.clone()),
            limits: GatewayLimits {
                max_connections_per_client: limits.max_connections,
                ..limits
            },
        };
        let server = Gateway::start(listener, runtime.clone(), options).map_err(|source| {
            DaemonError::Peer {
                addr: cc.peer,
                source,
            }
        })?;
        info!(addr = %server.local_addr(), "peer transport listening");
        peer_server = Some(server);
        if let Some(sc) = &config.services {
            cluster.set_services(start_services(sc, cluster.notifier()), sc.max_failures);
        }
        // Other nodes' questions about this one: its events, pools, drain, service logs.
        let journal = config.services.as_ref().and_then(|s| s.journal_dir.clone());
        let (c, rt) = (cluster.clone(), Arc::downgrade(&runtime));
        let state_dir = config.state_dir.clone();
        runtime.set_peer_source(Box::new(move |path, query| {
            if path == "/peer/node" {
                let rt = rt
                    .upgrade()
                    .ok_or_else(|| crate::error::ApiError::internal("stopping"))?;
                return Ok(control::node_summary(&rt, &state_dir));
            }
            control::peer_request(&c, journal.as_deref(), path, query)
        }));
        cluster.spawn(runtime.clone(), key.clone());
        // A restarted node answers calls only once its first pass has started its share of
        // the flows and built its forwarding table: before that a call would find no pool
        // (404) although the cluster runs it. Callers wait in the backlog meanwhile.
        if !cluster.wait_first_pass(FIRST_PASS_WAIT).await {
            warn!(
                waited_s = FIRST_PASS_WAIT.as_secs(),
                "the first cluster pass has not completed; serving the gateway anyway"
            );
        }
    }
    let vip = match (&cluster, &config.cluster, &config.vip) {
        (Some(cluster), Some(cc), Some(settings)) if settings.enabled => {
            let service = start_vip(
                &runtime,
                cc,
                settings,
                node_id,
                &config.node_name,
                config.services.as_ref(),
            )?;
            if let Some(service) = &service {
                cluster.set_vip(service.clone());
                let s = service.clone();
                runtime.add_metrics(Box::new(move || s.metrics()));
            }
            service
        }
        _ => None,
    };
    let lb = match (&cluster, &config.balancer) {
        (Some(cluster), Some(settings)) => {
            let service = Arc::new(
                crate::balancer::LbService::start(settings.clone())
                    .map_err(|e| DaemonError::Balancer(e.to_string()))?,
            );
            let (weak, svc, me) = (
                Arc::downgrade(cluster),
                service.clone(),
                config.node_name.clone(),
            );
            cluster.set_observer(Box::new(move || {
                let Some(c) = weak.upgrade() else { return };
                let desired = c
                    .my_namespace()
                    .and_then(|ns| c.namespace(&ns).ok())
                    .map(|view| crate::balancer::desired(&view, &c.nodes(), &me))
                    .unwrap_or_default();
                svc.update(desired);
            }));
            if let Some(v) = &vip {
                // Only the holder balances; the other nodes pass what it sends them.
                let lb = service.clone();
                v.on_holding(Box::new(move |addr| lb.set_holding(addr)));
            }
            let m = service.clone();
            runtime.add_metrics(Box::new(move || m.metrics()));
            Some(service)
        }
        _ => {
            // Not balancing (any more): nothing of an earlier balancer stays attached.
            let dir = config.balancer_pin_dir.clone();
            if dir.exists() {
                match drop_net::Balancer::remove_pinned(&dir) {
                    Ok(_) => {
                        info!(dir = %dir.display(), "removed a balancer left by an earlier configuration")
                    }
                    Err(e) => {
                        warn!(dir = %dir.display(), error = %e, "cannot remove a leftover balancer")
                    }
                }
            }
            None
        }
    };
    {
        // The node's own series: events by kind and whether it drains.
        let state_dir = config.state_dir.clone();
        runtime.add_metrics(Box::new(move || {
            format!(
                "{}# HELP drop_node_draining 1 while the node drains (dropctl node drain).\n# TYPE drop_node_draining gauge\ndrop_node_draining {}\n",
                crate::events::log().metrics(),
                u8::from(state::draining_since(&state_dir).is_some())
            )
        }));
    }
    {
        let name = config.node_name.clone();
        let state_dir = config.state_dir.clone();
        let (cluster, vip, lb) = (cluster.clone(), vip.clone(), lb.clone());
        runtime.set_ui_source(Box::new(move || {
            ui_state(
                &name,
                node_id,
                started,
                &state_dir,
                cluster.as_deref(),
                vip.as_deref(),
                lb.as_deref(),
            )
        }));
    }
    let mut gateway = match gateway_listener {
        Some((addr, listener)) => {
            let options = GatewayOptions {
                token: config.gateway_token.clone(),
                peer_key: None,
                peer_self: None,
                node_name: Some(config.node_name.clone()),
                limits: config.gateway_limits.clone(),
            };
            let gw = Gateway::start(listener, runtime.clone(), options)
                .map_err(|source| DaemonError::Gateway { addr, source })?;
            if let Some(f) = &forward {
                gw.set_forwarder(f.clone());
            }
            info!(addr = %gw.local_addr(), "gateway listening");
            Some(gw)
        }
        None => None,
    };
    let mut supervisor =
        Supervisor::new(config, node_id, runtime.clone(), gateway_addr).with_plugins(plugins);
    if let (Some(c), Some(f)) = (&cluster, forward) {
        supervisor = supervisor.with_cluster(c.clone(), f);
    }
    if let Some(v) = &vip {
        supervisor = supervisor.with_vip(v.clone());
    }
    if let Some(l) = &lb {
        supervisor = supervisor.with_lb(l.clone());
    }
    if let Some(since) = state::draining_since(&supervisor.config().state_dir) {
        // Drained before a restart (a rollout upgrades the package in between): still drained.
        info!(
            since_unix_ms = since,
            "still draining (dropctl node undrain ends it)"
        );
        supervisor.apply_drain(true);
        crate::events::record(
            crate::events::Kind::Drain,
            &supervisor.config().node_name,
            "still draining after a restart",
        );
    }
    let supervisor = Arc::new(supervisor);
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = tokio::spawn(control::server::serve(
        listener,
        supervisor.clone(),
        stop_rx.clone(),
    ));

    let ready_ms = started.elapsed().as_secs_f64() * 1000.0;
    if let Err(e) = notifier.notify(&format!("READY=1\nSTATUS=serving on {}", socket.display())) {
        warn!(error = %e, "sd_notify READY failed");
    }
    info!(
        %node_id,
        name = %supervisor.config().node_name,
        socket = %socket.display(),
        ready_ms = format_args!("{ready_ms:.1}"),
        "drop-supervisor ready"
    );
    crate::events::record(
        crate::events::Kind::Daemon,
        &supervisor.config().node_name,
        format!(
            "drop-supervisor {} ready in {ready_ms:.0} ms (a new event log)",
            crate::VERSION
        ),
    );

    if let Some(every) = notifier.watchdog_interval() {
        let mut stop = stop_rx.clone();
        let notifier = Notifier::from_env();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    () = control::server::stopped(&mut stop) => return,
                    _ = tick.tick() => {
                        if let Err(e) = notifier.notify("WATCHDOG=1") {
                            warn!(error = %e, "sd_notify WATCHDOG failed");
                        }
                    }
                }
            }
        });
    }

    let signal_name = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    info!(signal = signal_name, "stopping");
    crate::events::record(
        crate::events::Kind::Daemon,
        &supervisor.config().node_name,
        format!("stopping on {signal_name}"),
    );
    let _ = notifier.notify("STOPPING=1\nSTATUS=stopping");
    let _ = stop_tx.send(true);
    let _ = server.await;
    // The address goes first, with a resignation, so the next holder need not wait.
    if let Some(v) = vip {
        let _ = tokio::task::spawn_blocking(move || v.stop()).await;
    }
    // Then the gateway: new callers are refused (and go to another gateway), those already
    // connected get their answers.
    if let Some(gw) = gateway.as_mut() {
        gw.stop_gracefully(GATEWAY_SETTLE, GATEWAY_STOP_LIMIT).await;
    }
    if let Some(c) = &cluster {
        c.stop().await;
    }
    if let Some(p) = peer_server.as_mut() {
        p.stop();
    }
    runtime.shutdown(std::time::Duration::from_secs(10)).await;
    if let Err(e) = std::fs::remove_file(&socket) {
        warn!(socket = %socket.display(), error = %e, "cannot remove control socket");
    }
    info!("stopped");
    Ok(())
}
