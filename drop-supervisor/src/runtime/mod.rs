//! The function runtime of a node: the applied flows and their pools.
//!
//! Flows are persisted as their source text under `<state>/flows/<name>.yaml` before anything
//! runs, and reconciled: applying a flow starts the pools it declares, stops the ones it no
//! longer declares and restarts only those whose definition changed. On start the persisted
//! flows come back by themselves, after every pool cgroup left by a previous (crashed) instance
//! has been killed and removed.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use serde::Serialize;
use tracing::{info, warn};

pub mod cgroup;
pub mod flow;
pub mod images;
pub mod logs;
pub mod metrics;
pub mod worker;

use cgroup::{Cgroups, Limits};
use flow::{Delivery, Filter, Flow, FlowError, PoolSpec};
use logs::PoolLog;
use worker::dispatch::{Dispatcher, Job};
use worker::image::ImageMount;
use worker::pool::{Pool, PoolConfig, PoolStatus, RestartPolicy, WorkerCgroups};
use worker::process::{self, Credentials, Launch};

use crate::error::ApiError;
use crate::host::state;

/// A runtime for unit tests elsewhere in the crate: folders under `dir`, no cgroups, workers
/// as the test process, on a tokio runtime of its own (returned first; keep it alive).
#[cfg(test)]
pub(crate) fn test_runtime(dir: &Path) -> (tokio::runtime::Runtime, Runtime) {
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let rt = {
        let _g = tokio.enter();
        Runtime::new(RuntimeOptions {
            state_dir: dir.join("state"),
            images_dir: dir.join("images"),
            logs_dir: dir.join("logs"),
            cgroups: None,
            worker_credentials: None,
            allow_root_workers: false,
            node_name: None,
        })
    };
    (tokio, rt)
}

/// Finds pools by name: what the gateway asks of the runtime.
pub trait PoolLookup: Send + Sync {
    fn pool(&self, name: &str) -> Option<Pool>;
    /// Prometheus text for `GET /metrics`; `None` when this server has none.
    fn metrics(&self) -> Option<String> {
        None
    }
    /// The node is draining: the gateway hands new calls to other nodes where it can and
    /// closes each connection after its answer.
    fn draining(&self) -> bool {
        false
    }
    /// What the status page (`GET /ui/state`) shows; `None` when this server has none.
    fn ui_state(&self) -> Option<serde_json::Value> {
        None
    }
    /// A sealed `/peer/…` request other than a pool call; `None`: nothing answers it here.
    fn peer_request(
        &self,
        path: &str,
        query: Option<&str>,
    ) -> Option<Result<serde_json::Value, ApiError>> {
        let _ = (path, query);
        None
    }
    /// Queues `payload` for one worker of the pool (`all`: every worker) without waiting;
    /// `None` when the pool is not here.
    fn cast(&self, name: &str, payload: &[u8], all: bool) -> Option<Result<(), ApiError>> {
        let _ = (name, payload, all);
        None
    }
}

/// Pools on other nodes: what the runtime (cluster-wide subscriptions) and the edges ask of the
/// cluster for pools this node does not run. The cluster's peer transport implements it.
pub trait Forward: Send + Sync + std::fmt::Debug {
    /// Calls `pool` on one other node that runs it; `None` when no node does.
    fn call_any(&self, pool: &str, body: &[u8]) -> Option<Result<Vec<u8>, ApiError>>;
    /// Calls `pool` on every other node that runs it: (node name, answer) each.
    fn call_every(&self, pool: &str, body: &[u8]) -> Vec<(String, Result<Vec<u8>, ApiError>)>;
    /// Queues `body` for `pool` on one other node that runs it (`every`: on each), for one
    /// worker there (`all`: every worker), without waiting. False when no other node runs it
    /// or the outgoing queue is full.
    fn cast(&self, pool: &str, body: &[u8], all: bool, every: bool) -> bool;
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Flow(#[from] FlowError),
    #[error("pool {pool} of flow {flow} is already defined by flow {other}")]
    PoolConflict {
        pool: String,
        flow: String,
        other: String,
    },
    #[error("pool {pool}: {reason}")]
    Unsupported { pool: String, reason: String },
    #[error("pool {pool}: {reason}")]
    Invalid { pool: String, reason: String },
    #[error("no flow named {0}")]
    UnknownFlow(String),
    /// An operator (or the cluster) asked to apply or remove a flow that a plugin provides.
    #[error(
        "flow {flow} comes from plugin {plugin} (a package installed it): it is not applied or \
         removed with `dropctl flow`; remove the plugin's package and run `dropctl plugin reload`, \
         or give your flow another name"
    )]
    PluginFlow { flow: String, plugin: String },
    /// A plugin's flow has the name of a flow that runs already: it is not applied.
    #[error("flow {flow} is already {}: plugin {plugin}'s flow of that name is not applied", owner_text(.owner))]
    FlowTaken {
        flow: String,
        plugin: String,
        /// The plugin that provides the running flow; `None`: an operator's (or the cluster's).
        owner: Option<String>,
    },
    #[error("no pool named {0}")]
    UnknownPool(String),
    #[error("the delivery queue is full; {0} not reached")]
    Overloaded(String),
    #[error("cannot persist flow {name}")]
    Persist {
        name: String,
        #[source]
        source: state::StateError,
    },
    #[error("cgroup for pool {pool}")]
    Cgroup {
        pool: String,
        #[source]
        source: cgroup::CgroupError,
    },
}

fn owner_text(owner: &Option<String>) -> String {
    match owner {
        Some(p) => format!("plugin {p}'s"),
        None => "an operator's flow (dropctl flow apply, or placed here by the cluster)".into(),
    }
}

/// A runtime error as the edges answer it.
impl From<&RuntimeError> for ApiError {
    fn from(e: &RuntimeError) -> ApiError {
        let msg = format!("{e:#}");
        match e {
            RuntimeError::Flow(_) => ApiError::new(422, "invalid_flow", msg),
            RuntimeError::PoolConflict { .. } => ApiError::new(409, "conflict", msg),
            RuntimeError::Unsupported { .. } => ApiError::new(422, "unsupported", msg),
            RuntimeError::Invalid { .. } => ApiError::new(422, "invalid_flow", msg),
            RuntimeError::UnknownFlow(_) => ApiError::new(404, "unknown_flow", msg),
            RuntimeError::PluginFlow { .. } => ApiError::new(409, "plugin_flow", msg),
            RuntimeError::FlowTaken { .. } => ApiError::new(409, "conflict", msg),
            RuntimeError::UnknownPool(_) => ApiError::new(404, "unknown_pool", msg),
            RuntimeError::Overloaded(_) => ApiError::new(429, "overloaded", msg),
            RuntimeError::Persist { .. } | RuntimeError::Cgroup { .. } => ApiError::internal(msg),
        }
    }
}

/// What applying a flow did.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ApplyReport {
    pub flow: String,
    pub started: Vec<String>,
    pub restarted: Vec<String>,
    pub unchanged: Vec<String>,
    /// Unchanged pools that had failed (too many restarts) and were started again.
    #[serde(default)]
    pub retried: Vec<String>,
    pub stopped: Vec<String>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct FlowSummary {
    pub name: String,
    pub priority: u8,
    pub pools: Vec<String>,
    pub file: Option<PathBuf>,
    /// The plugin that provides this flow; `None`: an operator's (or the cluster's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
}

#[derive(Debug)]
struct Applied {
    flow: Flow,
    source: String,
    /// The plugin whose package provides the flow (never persisted under `<state>/flows`).
    plugin: Option<String>,
}

#[derive(Debug, Clone)]
struct Entry {
    pool: Pool,
    flow: String,
    spec: PoolSpec,
    log: Arc<PoolLog>,
}

/// Where the runtime keeps things and what it may use.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    pub state_dir: PathBuf,
    pub images_dir: PathBuf,
    pub logs_dir: PathBuf,
    /// Pool cgroups; `None` runs workers without (development without root).
    pub cgroups: Option<Arc<dyn Cgroups>>,
    /// Who workers of a pool without `user:` run as; `None`: as the daemon (which then is not
    /// root and cannot switch).
    pub worker_credentials: Option<Credentials>,
    /// Whether a pool may run as root (uid 0, still without any capability).
    pub allow_root_workers: bool,
    /// This node's name, given to every worker as `DROP_NODE` (`None`: not set).
    pub node_name: Option<String>,
}

pub struct Runtime {
    opts: RuntimeOptions,
    handle: tokio::runtime::Handle,
    flows: Mutex<BTreeMap<String, Applied>>,
    pools: Arc<RwLock<HashMap<String, Entry>>>,
    dispatcher: Dispatcher,
    /// Other nodes' pools, for `done`/`dall` subscriptions (cluster mode).
    remote: Arc<OnceLock<Arc<dyn Forward>>>,
    /// `done`/`dall` subscriptions of pools that run on other nodes: (source pool, route).
    remote_routes: Mutex<Vec<RemoteRoute>>,
    /// Further Prometheus text for `/metrics` (the floating IP's series).
    extra_metrics: RwLock<Vec<ExtraMetrics>>,
    /// The node and cluster part of the status page (set by the daemon).
    ui_source: RwLock<Option<UiSource>>,
    peer_source: RwLock<Option<PeerSource>>,
    /// `dropctl node drain`: see [`PoolLookup::draining`].
    draining: std::sync::atomic::AtomicBool,
}

/// The node and cluster part of the status page: a JSON object merged into `/ui/state`.
pub type UiSource = Box<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What the daemon answers to a sealed `/peer/…` request from another node (path, query):
/// requests about this node that are not pool calls (another node's `service logs`).
pub type PeerSource =
    Box<dyn Fn(&str, Option<&str>) -> Result<serde_json::Value, ApiError> + Send + Sync>;

/// A source of Prometheus text appended to the pools' series.
pub type ExtraMetrics = Box<dyn Fn() -> String + Send + Sync>;

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("opts", &self.opts)
            .field("flows", &self.flows)
            .finish_non_exhaustive()
    }
}

/// A cluster-wide subscription (`done` / `dall`) declared by a pool of the namespace, wherever
/// that pool runs.
#[derive(Debug, Clone)]
pub struct RemoteRoute {
    pub from: String,
    pub to: String,
    pub filter: Filter,
    pub delivery: Delivery,
}

/// Delivery threads and queue size for casts and subscription events.
const DISPATCH_THREADS: usize = 4;
const DISPATCH_QUEUE: usize = 4096;

/// One subscription edge: output lines of a pool that match `filter` go to `to`.
#[derive(Debug, Clone)]
struct Route {
    to: String,
    filter: Filter,
    delivery: Delivery,
}

impl PoolLookup for Runtime {
    fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn pool(&self, name: &str) -> Option<Pool> {
        self.pools
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .map(|e| e.pool.clone())
    }

    fn metrics(&self) -> Option<String> {
        let mut text = metrics::render(&self.pool_statuses());
        for source in self
            .extra_metrics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            text.push_str(&source());
        }
        Some(text)
    }

    fn peer_request(
        &self,
        path: &str,
        query: Option<&str>,
    ) -> Option<Result<serde_json::Value, ApiError>> {
        let source = self.peer_source.read().unwrap_or_else(|e| e.into_inner());
        source.as_ref().map(|f| f(path, query))
    }

    fn ui_state(&self) -> Option<serde_json::Value> {
        let pools: Vec<serde_json::Value> = self
            .pool_statuses()
            .into_iter()
            .map(|p| {
                let phase = match &p.phase {
                    worker::pool::Phase::Running => "running".to_string(),
                    worker::pool::Phase::Failed(why) => format!("failed: {why}"),
                    worker::pool::Phase::Stopped => "stopped".to_string(),
                };
                serde_json::json!({
                    "name": p.name,
                    "phase": phase,
                    "workers": p.workers,
                    "idle": p.idle,
                    "busy": p.busy,
                    "starting": p.starting,
                    "queue": p.queue_depth,
                    "min": p.min,
                    "max": p.max,
                    "ok": p.stats.ok,
                    "error": p.stats.error,
                    "timeout": p.stats.timeout,
                    "rejected": p.stats.rejected,
                    "restarts": p.stats.restarts,
                    "p50_us": p.stats.quantile_us(0.5),
                    "p99_us": p.stats.quantile_us(0.99),
                })
            })
            .collect();
        let mut state = self
            .ui_source
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|f| f())
            .unwrap_or_else(|| serde_json::json!({}));
        if let Some(obj) = state.as_object_mut() {
            obj.insert("pools".into(), serde_json::Value::Array(pools));
        }
        Some(state)
    }

    fn cast(&self, name: &str, payload: &[u8], all: bool) -> Option<Result<(), ApiError>> {
        self.pool(name)?;
        Some(Runtime::cast(self, name, payload, all).map_err(|e| ApiError::from(&e)))
    }
}

/// `error: cause: cause` — an error with its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn flows_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("flows")
}

impl Runtime {
    /// Must be called inside a tokio runtime (pools run their managers on it).
    pub fn new(opts: RuntimeOptions) -> Runtime {
        Runtime {
            opts,
            handle: tokio::runtime::Handle::current(),
            flows: Mutex::new(BTreeMap::new()),
            pools: Arc::new(RwLock::new(HashMap::new())),
            dispatcher: Dispatcher::new(DISPATCH_THREADS, DISPATCH_QUEUE),
            remote: Arc::default(),
            remote_routes: Mutex::new(Vec::new()),
            extra_metrics: RwLock::new(Vec::new()),
            ui_source: RwLock::new(None),
            peer_source: RwLock::new(None),
            draining: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Sets what the status page shows besides the pools (node, cluster, floating IP).
    pub fn set_ui_source(&self, source: UiSource) {
        *self.ui_source.write().unwrap_or_else(|e| e.into_inner()) = Some(source);
    }

    /// Sets what answers `/peer/…` requests on the peer listener.
    pub fn set_peer_source(&self, source: PeerSource) {
        *self.peer_source.write().unwrap_or_else(|e| e.into_inner()) = Some(source);
    }

    /// Who workers of a pool without `user:` run as (`None`: as the daemon); health-check
    /// commands run as them too.
    pub fn worker_credentials(&self) -> Option<Credentials> {
        self.opts.worker_credentials
    }

    /// Appends `source`'s text to every `/metrics` answer.
    pub fn add_metrics(&self, source: ExtraMetrics) {
        self.extra_metrics
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(source);
    }

    /// Kills and removes pool cgroups left by an earlier instance, then applies every persisted
    /// flow. Returns the flows that could not be restored, with why (they stay on disk).
    pub fn restore(&self) -> Vec<(PathBuf, String)> {
        if let Some(cg) = &self.opts.cgroups {
            match cg.list() {
                Ok(orphans) => {
                    for name in orphans {
                        let killed = cg.kill_all(&name).and_then(|()| cg.remove(&name));
                        match killed {
                            Ok(()) => {
                                info!(pool = %name, "removed a pool cgroup left by an earlier instance")
                            }
                            Err(e) => {
                                warn!(pool = %name, error = %e, "cannot clean up a leftover pool cgroup")
                            }
                        }
                    }
                }
                Err(e) => warn!(error = %e, "cannot list leftover pool cgroups"),
            }
        }
        let dir = flows_dir(&self.opts.state_dir);
        let mut failed = Vec::new();
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
                .collect(),
            Err(_) => return failed,
        };
        files.sort();
        for file in files {
            let result = std::fs::read_to_string(&file)
                .map_err(|e| e.to_string())
                .and_then(|text| {
                    self.apply_text(&text, &file, false)
                        .map_err(|e| format!("{e:#}"))
                });
            match result {
                Ok(report) => {
                    info!(flow = %report.flow, pools = report.started.len(), "flow restored")
                }
                Err(e) => {
                    warn!(file = %file.display(), error = %e, "cannot restore flow");
                    failed.push((file, e));
                }
            }
        }
        failed
    }

    /// Parses, checks, persists and reconciles a flow. `file` names the source in errors.
    pub fn apply(&self, text: &str, file: &Path) -> Result<ApplyReport, RuntimeError> {
        self.apply_text(text, file, true)
    }

    /// Who the workers of `spec` run as: its `user`/`group`, else the node's worker user (with
    /// the flow's `group`, if any). Root only where the node allows it.
    fn credentials(&self, spec: &PoolSpec) -> Result<Option<Credentials>, RuntimeError> {
        let invalid = |reason: String| RuntimeError::Invalid {
            pool: spec.name.clone(),
            reason,
        };
        let credentials = match (&spec.user, &self.opts.worker_credentials) {
            (None, Some(default)) => match &spec.group {
                Some(_) => process::resolve_credentials(None, spec.group.as_deref())
                    .map_err(invalid)?
                    .map(|c| Credentials {
                        uid: default.uid,
                        gid: c.gid,
                    }),
                None => Some(*default),
            },
            _ => process::resolve_credentials(spec.user.as_deref(), spec.group.as_deref())
                .map_err(invalid)?,
        };
        if credentials.is_some_and(|c| c.uid == 0) && !self.opts.allow_root_workers {
            return Err(invalid(format!(
                "user: {} would run the workers as root, which this node does not allow \
                 (runtime.allow_root_workers in its config)",
                spec.user.as_deref().unwrap_or("root")
            )));
        }
        Ok(credentials)
    }

    fn apply_text(
        &self,
        text: &str,
        file: &Path,
        persist: bool,
    ) -> Result<ApplyReport, RuntimeError> {
        let flow = flow::parse_flow(text, file)?;
        self.apply_flow(flow, text, persist, None)
    }

    /// Applies a plugin's flow, already parsed (and its paths resolved against the plugin's
    /// folder), as that plugin's: never persisted (the package's folder is its only source),
    /// and refused with [`RuntimeError::FlowTaken`] when a flow of that name runs that is not
    /// this plugin's. `text` is the plugin's `flow.yaml`, for `flow show`.
    pub fn apply_plugin(
        &self,
        flow: Flow,
        text: &str,
        plugin: &str,
    ) -> Result<ApplyReport, RuntimeError> {
        self.apply_flow(flow, text, false, Some(plugin))
    }

    /// Checks, persists (`persist`) and reconciles a parsed flow. A flow's name belongs to
    /// whoever applied it first: an operator cannot replace a plugin's flow, nor a plugin an
    /// operator's or another plugin's (checked under the flows' lock, so a plugin pass and an
    /// operator's apply never both win).
    fn apply_flow(
        &self,
        flow: Flow,
        text: &str,
        persist: bool,
        plugin: Option<&str>,
    ) -> Result<ApplyReport, RuntimeError> {
        let images = self.opts.images_dir.clone();
        flow::check_images(&flow, &|name: &str| images.join(name).is_dir())?;
        for spec in &flow.pools {
            self.credentials(spec)?;
        }
        let mut flows = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(running) = flows.get(&flow.name)
            && running.plugin.as_deref() != plugin
        {
            return Err(match (plugin, &running.plugin) {
                (None, Some(owner)) => RuntimeError::PluginFlow {
                    flow: flow.name.clone(),
                    plugin: owner.clone(),
                },
                (Some(p), owner) => RuntimeError::FlowTaken {
                    flow: flow.name.clone(),
                    plugin: p.to_string(),
                    owner: owner.clone(),
                },
                (None, None) => unreachable!("equal origins pass"),
            });
        }
        {
            let pools = self.pools.read().unwrap_or_else(|e| e.into_inner());
            for spec in &flow.pools {
                if let Some(other) = pools.get(&spec.name).filter(|e| e.flow != flow.name) {
                    return Err(RuntimeError::PoolConflict {
                        pool: spec.name.clone(),
                        flow: flow.name.clone(),
                        other: other.flow.clone(),
                    });
                }
            }
        }
        if persist {
            let dir = flows_dir(&self.opts.state_dir);
            state::ensure_dir(&dir).map_err(|source| RuntimeError::Persist {
                name: flow.name.clone(),
                source,
            })?;
            state::write_atomic(&dir.join(format!("{}.yaml", flow.name)), text.as_bytes())
                .map_err(|source| RuntimeError::Persist {
                    name: flow.name.clone(),
                    source,
                })?;
        }
        let report = self.reconcile(&flow);
        flows.insert(
            flow.name.clone(),
            Applied {
                flow,
                source: text.to_string(),
                plugin: plugin.map(str::to_string),
            },
        );
        Ok(report)
    }

    fn reconcile(&self, flow: &Flow) -> ApplyReport {
        let mut report = ApplyReport {
            flow: flow.name.clone(),
            ..Default::default()
        };
        let mut pools = self.pools.write().unwrap_or_else(|e| e.into_inner());
        let old: Vec<String> = pools
            .iter()
            .filter(|(_, e)| e.flow == flow.name)
            .map(|(n, _)| n.clone())
            .collect();
        for name in old {
            if !flow.pools.iter().any(|p| p.name == name) {
                if let Some(entry) = pools.remove(&name) {
                    self.stop_entry(entry);
                }
                report.stopped.push(name);
            }
        }
        for spec in &flow.pools {
            match pools.get(&spec.name) {
                // Applying the same flow again is how an operator asks a failed pool (one that
                // hit its restart intensity) to try again, e.g. after installing what it lacked.
                Some(e)
                    if e.spec == *spec
                        && matches!(e.pool.status().phase, worker::pool::Phase::Failed(_)) =>
                {
                    if let Some(entry) = pools.remove(&spec.name) {
                        self.stop_entry(entry);
                    }
                    report.retried.push(spec.name.clone());
                }
                Some(e) if e.spec == *spec => {
                    report.unchanged.push(spec.name.clone());
                    continue;
                }
                Some(_) => {
                    if let Some(entry) = pools.remove(&spec.name) {
                        self.stop_entry(entry);
                    }
                    report.restarted.push(spec.name.clone());
                }
                None => report.started.push(spec.name.clone()),
            }
            match self.start_pool(&flow.name, spec) {
                Ok(entry) => {
                    pools.insert(spec.name.clone(), entry);
                }
                Err(e) => warn!(pool = %spec.name, error = %error_chain(&e), "cannot start pool"),
            }
        }
        self.rewire(&pools);
        report
    }

    /// Points every pool's output at its subscribers: the `sub` entries of local pools, and the
    /// cluster-wide ones (`done`/`dall`) of pools on other nodes.
    fn rewire(&self, pools: &HashMap<String, Entry>) {
        let mut routes: HashMap<String, Vec<Route>> = HashMap::new();
        for entry in pools.values() {
            for sub in &entry.spec.subs {
                routes.entry(sub.from.clone()).or_default().push(Route {
                    to: entry.spec.name.clone(),
                    filter: sub.filter.clone(),
                    delivery: sub.delivery,
                });
            }
        }
        for r in self
            .remote_routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let list = routes.entry(r.from.clone()).or_default();
            if !list
                .iter()
                .any(|l| l.to == r.to && l.delivery == r.delivery)
            {
                list.push(Route {
                    to: r.to.clone(),
                    filter: r.filter.clone(),
                    delivery: r.delivery,
                });
            }
        }
        for (name, entry) in pools {
            let hook = routes.remove(name).map(|routes| {
                let registry = self.pools.clone();
                let dispatcher = self.dispatcher.clone();
                let remote = self.remote.clone();
                let hook: worker::pool::OutputHook = Arc::new(move |line: &[u8]| {
                    let text = String::from_utf8_lossy(line);
                    for route in routes.iter().filter(|r| r.filter.matches(&text)) {
                        let target = registry
                            .read()
                            .unwrap_or_else(|e| e.into_inner())
                            .get(&route.to)
                            .map(|e| e.pool.clone());
                        let fwd = remote.get();
                        match (route.delivery, target) {
                            (Delivery::One, Some(pool)) | (Delivery::Any, Some(pool)) => {
                                let payload = line.to_vec();
                                let _ = dispatcher.submit(Job::One { pool, payload });
                            }
                            (Delivery::All, Some(pool)) => {
                                let payload = line.to_vec();
                                let _ = dispatcher.submit(Job::All { pool, payload });
                            }
                            // done: one instance, local first; elsewhere when not here.
                            (Delivery::Any, None) => {
                                if let Some(f) = fwd {
                                    f.cast(&route.to, line, false, false);
                                }
                            }
                            // dall: every instance, here and on every other node.
                            (Delivery::Every, local) => {
                                if let Some(pool) = local {
                                    let payload = line.to_vec();
                                    let _ = dispatcher.submit(Job::All { pool, payload });
                                }
                                if let Some(f) = fwd {
                                    f.cast(&route.to, line, true, true);
                                }
                            }
                            (Delivery::One | Delivery::All, None) => {}
                        }
                    }
                });
                hook
            });
            entry.pool.set_output(hook);
        }
    }

    /// Sends `done`/`dall` events for pools on other nodes through `forward` (set once).
    pub fn set_forwarder(&self, forward: Arc<dyn Forward>) {
        let _ = self.remote.set(forward);
    }

    /// Replaces the cluster-wide subscriptions; rewires only when they changed.
    pub fn set_remote_routes(&self, routes: Vec<RemoteRoute>) {
        let key = |v: &[RemoteRoute]| -> Vec<String> {
            v.iter()
                .map(|r| format!("{}>{}>{:?}>{:?}", r.from, r.to, r.delivery, r.filter))
                .collect()
        };
        {
            let mut current = self.remote_routes.lock().unwrap_or_else(|e| e.into_inner());
            if key(&current) == key(&routes) {
                return;
            }
            *current = routes;
        }
        let pools = self.pools.write().unwrap_or_else(|e| e.into_inner());
        self.rewire(&pools);
    }

    /// Queues `payload` for one worker of `pool` (`all`: every worker) without waiting.
    pub fn cast(&self, pool: &str, payload: &[u8], all: bool) -> Result<(), RuntimeError> {
        let p = self
            .pool(pool)
            .ok_or_else(|| RuntimeError::UnknownPool(pool.to_string()))?;
        let payload = payload.to_vec();
        let job = if all {
            Job::All { pool: p, payload }
        } else {
            Job::One { pool: p, payload }
        };
        self.dispatcher
            .submit(job)
            .map_err(|_| RuntimeError::Overloaded(pool.to_string()))
    }

    fn start_pool(&self, flow: &str, spec: &PoolSpec) -> Result<Entry, RuntimeError> {
        let mut worker_cgroups = None;
        if let Some(cg) = &self.opts.cgroups {
            let limits = Limits {
                memory_bytes: Some(spec.memory_bytes),
                cpu_quota: spec.cpu,
                cpu_weight: None,
                pids_max: spec.pids,
            };
            let err = |source| RuntimeError::Cgroup {
                pool: spec.name.clone(),
                source,
            };
            cg.create(&spec.name, &limits).map_err(err)?;
            worker_cgroups = Some(WorkerCgroups {
                cgroups: cg.clone(),
                group: spec.name.clone(),
            });
        }
        let credentials = self.credentials(spec)?;
        let image = match &spec.image {
            Some(name) => {
                let invalid = |e: &dyn std::error::Error| RuntimeError::Invalid {
                    pool: spec.name.clone(),
                    reason: format!("image {name}: {}", error_chain(e)),
                };
                let dir = images::resolve(&self.opts.images_dir, name).map_err(|e| invalid(&e))?;
                let mut mount = ImageMount::new(&dir).map_err(|e| invalid(&e))?;
                if let Some(cwd) = &spec.cwd {
                    mount = mount.with_workdir(cwd).map_err(|e| invalid(&e))?;
                }
                Some(mount)
            }
            None => None,
        };
        let config = PoolConfig {
            name: spec.name.clone(),
            mode: spec.mode,
            concurrency: spec.concurrency,
            launch: Launch {
                argv: spec.argv.clone(),
                env: {
                    let mut env = spec.env.clone();
                    if let Some(node) = &self.opts.node_name {
                        env.insert("DROP_NODE".to_string(), node.clone());
                    }
                    env
                },
                cwd: spec.cwd.clone(),
                credentials,
                // Each worker is placed in its own group inside the pool's (see WorkerCgroups).
                cgroup_procs: Vec::new(),
                image,
            },
            min: spec.min,
            max: spec.max,
            queue: spec.queue,
            timeout: spec.timeout,
            line_max: spec.line_max,
            envelope: spec.envelope,
            restart: RestartPolicy {
                backoff_initial: spec.restart.backoff_initial,
                backoff_max: spec.restart.backoff_max,
                reset_after: spec.restart.reset_after,
                intensity: spec.restart.intensity,
                period: spec.restart.period,
            },
            grow_threshold: 1,
            idle_shrink_after: Duration::from_secs(60),
            cache: spec.cache.as_ref().map(|c| (c.ttl, c.size)),
            cgroups: worker_cgroups,
        };
        let log = PoolLog::open(
            self.opts.logs_dir.join(format!("{}.log", spec.name)),
            logs::DEFAULT_MAX_BYTES,
            logs::DEFAULT_KEEP,
        )
        .map_err(|e| RuntimeError::Invalid {
            pool: spec.name.clone(),
            reason: format!("cannot open its log: {e}"),
        })?;
        let sink = log.clone();
        let stderr = Arc::new(move || -> std::io::Result<OwnedFd> { sink.pipe(String::new()) });
        let _guard = self.handle.enter();
        let pool = Pool::start(config, stderr);
        info!(pool = %spec.name, flow, min = spec.min, max = spec.max, "pool started");
        Ok(Entry {
            pool,
            flow: flow.to_string(),
            spec: spec.clone(),
            log,
        })
    }

    /// Stops a pool: every process in its cgroup is killed (grandchildren included) and the
    /// cgroup removed before this returns, so a pool of the same name can start right after.
    fn stop_entry(&self, entry: Entry) {
        entry.pool.stop();
        let name = &entry.spec.name;
        if let Some(cg) = &self.opts.cgroups {
            if let Err(e) = cg.kill_all(name) {
                warn!(pool = %name, error = %e, "cannot kill the pool's cgroup");
            }
            if let Err(e) = cg.remove(name) {
                warn!(pool = %name, error = %e, "cannot remove the pool's cgroup");
            }
        }
        info!(pool = %name, "pool stopped");
    }

    /// Removes a flow: its pools stop everywhere on this node and its file is deleted. A
    /// plugin's flow is refused ([`RuntimeError::PluginFlow`]): its package owns it.
    pub fn remove(&self, name: &str) -> Result<ApplyReport, RuntimeError> {
        self.remove_as(name, None)
    }

    /// Removes `plugin`'s flow `name` (the plugin is gone, or now declares another flow).
    pub fn remove_plugin_flow(
        &self,
        name: &str,
        plugin: &str,
    ) -> Result<ApplyReport, RuntimeError> {
        self.remove_as(name, Some(plugin))
    }

    fn remove_as(&self, name: &str, plugin: Option<&str>) -> Result<ApplyReport, RuntimeError> {
        let mut flows = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        match flows.get(name).map(|a| a.plugin.as_deref()) {
            None => return Err(RuntimeError::UnknownFlow(name.to_string())),
            Some(Some(owner)) if plugin != Some(owner) => {
                return Err(RuntimeError::PluginFlow {
                    flow: name.to_string(),
                    plugin: owner.to_string(),
                });
            }
            Some(None) if plugin.is_some() => {
                return Err(RuntimeError::UnknownFlow(name.to_string()));
            }
            Some(_) => {}
        }
        flows.remove(name);
        if plugin.is_none() {
            let _ =
                std::fs::remove_file(flows_dir(&self.opts.state_dir).join(format!("{name}.yaml")));
        }
        let mut report = ApplyReport {
            flow: name.to_string(),
            ..Default::default()
        };
        let mut pools = self.pools.write().unwrap_or_else(|e| e.into_inner());
        let names: Vec<String> = pools
            .iter()
            .filter(|(_, e)| e.flow == name)
            .map(|(n, _)| n.clone())
            .collect();
        for n in names {
            if let Some(entry) = pools.remove(&n) {
                self.stop_entry(entry);
            }
            report.stopped.push(n);
        }
        self.rewire(&pools);
        Ok(report)
    }

    pub fn flows(&self) -> Vec<FlowSummary> {
        let flows = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        flows
            .values()
            .map(|a| FlowSummary {
                name: a.flow.name.clone(),
                priority: a.flow.priority,
                pools: a.flow.pools.iter().map(|p| p.name.clone()).collect(),
                file: a.flow.source.clone(),
                plugin: a.plugin.clone(),
            })
            .collect()
    }

    /// Every applied flow's name and source text, plugins' flows left out (the cluster diffs
    /// its share against it: plugins' flows are node-local, and it neither replaces nor stops
    /// them).
    pub fn flow_sources(&self) -> BTreeMap<String, String> {
        let flows = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        flows
            .iter()
            .filter(|(_, a)| a.plugin.is_none())
            .map(|(name, a)| (name.clone(), a.source.clone()))
            .collect()
    }

    /// Every applied flow's name and the plugin that provides it (`None`: an operator's).
    pub fn flow_origins(&self) -> BTreeMap<String, Option<String>> {
        let flows = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        flows
            .iter()
            .map(|(name, a)| (name.clone(), a.plugin.clone()))
            .collect()
    }

    /// The flow's summary and its source text.
    pub fn flow(&self, name: &str) -> Result<serde_json::Value, RuntimeError> {
        let flows = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        let a = flows
            .get(name)
            .ok_or_else(|| RuntimeError::UnknownFlow(name.to_string()))?;
        let mut v = a.flow.to_summary_json();
        v["source"] = serde_json::Value::String(a.source.clone());
        if let Some(p) = &a.plugin {
            v["plugin"] = serde_json::Value::String(p.clone());
        }
        Ok(v)
    }

    pub fn pool_statuses(&self) -> Vec<PoolStatus> {
        let pools = self.pools.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<PoolStatus> = pools.values().map(|e| e.pool.status()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn pool_status(&self, name: &str) -> Result<PoolStatus, RuntimeError> {
        self.pool(name)
            .map(|p| p.status())
            .ok_or_else(|| RuntimeError::UnknownPool(name.to_string()))
    }

    /// Stops a pool and starts it again from its flow's definition — also a `failed` one, so an
    /// operator can retry after fixing what made it fail.
    /// Sets whether the node is draining (what the gateway asks through [`PoolLookup`]).
    pub fn set_draining(&self, draining: bool) {
        self.draining
            .store(draining, std::sync::atomic::Ordering::SeqCst);
    }

    /// Calls in flight and queued on this node's pools.
    pub fn in_flight(&self) -> u64 {
        self.pool_statuses()
            .iter()
            .map(|p| u64::from(p.busy) + u64::from(p.queue_depth))
            .sum()
    }

    pub fn restart_pool(&self, name: &str) -> Result<PoolStatus, RuntimeError> {
        let mut pools = self.pools.write().unwrap_or_else(|e| e.into_inner());
        let entry = pools
            .remove(name)
            .ok_or_else(|| RuntimeError::UnknownPool(name.to_string()))?;
        let (flow, spec) = (entry.flow.clone(), entry.spec.clone());
        self.stop_entry(entry);
        let started = self.start_pool(&flow, &spec);
        let result = started.map(|entry| {
            let status = entry.pool.status();
            pools.insert(name.to_string(), entry);
            status
        });
        self.rewire(&pools);
        info!(pool = %name, ok = result.is_ok(), "pool restarted on request");
        result
    }

    pub fn pool_log(&self, name: &str) -> Result<Arc<PoolLog>, RuntimeError> {
        let pools = self.pools.read().unwrap_or_else(|e| e.into_inner());
        pools
            .get(name)
            .map(|e| e.log.clone())
            .ok_or_else(|| RuntimeError::UnknownPool(name.to_string()))
    }

    /// Changes a pool's size limits at run time (until its flow is applied again).
    pub fn scale(&self, pool: &str, min: u32, max: u32) -> Result<(), RuntimeError> {
        let p = self
            .pool(pool)
            .ok_or_else(|| RuntimeError::UnknownPool(pool.to_string()))?;
        p.scale(min, max).map_err(|reason| RuntimeError::Invalid {
            pool: pool.to_string(),
            reason,
        })
    }

    /// Stops every pool (daemon shutdown) and waits for their workers, at most `limit`.
    pub async fn shutdown(&self, limit: Duration) {
        let entries: Vec<Entry> = {
            let mut pools = self.pools.write().unwrap_or_else(|e| e.into_inner());
            pools.drain().map(|(_, e)| e).collect()
        };
        for e in &entries {
            e.pool.stop();
        }
        for e in entries {
            e.pool.stopped(limit).await;
            let runtime_cg = self.opts.cgroups.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(cg) = runtime_cg {
                    let _ = cg.kill_all(&e.spec.name);
                    let _ = cg.remove(&e.spec.name);
                }
            })
            .await;
        }
    }
}
