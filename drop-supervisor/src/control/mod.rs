//! The control API, the node's edge for operators: its types ([`api`]), the Unix-socket server
//! ([`server`]), the client `dropctl` uses ([`client`]), and the [`Supervisor`] — the single
//! owner of node state that answers every request by asking the node's capabilities (runtime,
//! cluster, host tuning).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Mutex;

pub mod api;
pub mod client;
pub mod server;

use api::{ApiError, ApiRequest, ApiResponse, StatusInfo};

use crate::cluster::node::Cluster;
use crate::config::Config;
use crate::host::tune::{self, Profile};
use crate::runtime::{Forward, PoolLookup, Runtime, RuntimeError};

/// Owner of the node's state, answering API requests.
#[derive(Debug)]
pub struct Supervisor {
    config: Config,
    node_id: uuid::Uuid,
    started: Instant,
    profile: Profile,
    /// Tuning writes are serialised: two applies never interleave key by key.
    tune_lock: Mutex<()>,
    runtime: Arc<Runtime>,
    gateway: Option<std::net::SocketAddr>,
    /// `None`: a single node (no `[cluster]` in the config).
    cluster: Option<Arc<Cluster>>,
    /// Calls for pools that run on other nodes.
    forward: Option<Arc<dyn Forward>>,
    /// Sealed requests to other nodes (their service logs).
    peers: Option<Arc<crate::cluster::peer::Forwarder>>,
    /// The floating IP of this node's namespace, when the cluster has one.
    vip: Option<Arc<crate::vip::VipService>>,
    /// The XDP balancer, with `[balancer] enabled`.
    lb: Option<Arc<crate::balancer::LbService>>,
    /// Flows that packages install (`plugin ls | reload`).
    plugins: Arc<crate::plugins::Plugins>,
}

fn not_clustered() -> ApiError {
    ApiError::new(
        409,
        "not_clustered",
        "this node runs alone: add a `[cluster]` section to its config to use nodes and namespaces",
    )
}

fn to_json<T: serde::Serialize>(v: &T) -> ApiResponse {
    ApiResponse::Json(serde_json::to_value(v).expect("runtime answers serialise"))
}

/// Lines of a pool's stderr that `pool show` includes.
const STDERR_TAIL_LINES: usize = 5;

/// Largest log chunk one `logs` request returns.
const LOG_CHUNK: usize = 64 * 1024;

impl Supervisor {
    pub fn new(
        config: Config,
        node_id: uuid::Uuid,
        runtime: Arc<Runtime>,
        gateway: Option<std::net::SocketAddr>,
    ) -> Supervisor {
        let plugins = Arc::new(crate::plugins::Plugins::new(
            config.plugins.dir.clone(),
            config.plugins.enabled,
        ));
        Supervisor {
            plugins,
            config,
            node_id,
            started: Instant::now(),
            profile: Profile::builtin(),
            tune_lock: Mutex::new(()),
            runtime,
            gateway,
            cluster: None,
            forward: None,
            peers: None,
            vip: None,
            lb: None,
        }
    }

    /// Puts the node in cluster mode: flows go to the replicated state.
    pub fn with_cluster(
        mut self,
        cluster: Arc<Cluster>,
        forward: Arc<crate::cluster::peer::Forwarder>,
    ) -> Supervisor {
        self.cluster = Some(cluster);
        self.forward = Some(forward.clone());
        self.peers = Some(forward);
        self
    }

    /// Uses the daemon's plugins (the ones it applied at start) for `plugin ls | reload`.
    pub fn with_plugins(mut self, plugins: Arc<crate::plugins::Plugins>) -> Supervisor {
        self.plugins = plugins;
        self
    }

    /// The plugin that provides this node's flow `name`, if one does.
    fn plugin_of(&self, name: &str) -> Option<String> {
        self.runtime.flow_origins().remove(name).flatten()
    }

    /// Attaches the balancer (for `lb ls`).
    pub fn with_lb(mut self, lb: Arc<crate::balancer::LbService>) -> Supervisor {
        self.lb = Some(lb);
        self
    }

    /// Attaches the floating IP (for `vip ls|show` and `ns show`).
    pub fn with_vip(mut self, vip: Arc<crate::vip::VipService>) -> Supervisor {
        self.vip = Some(vip);
        self
    }

    /// Every namespace with a floating IP, or one: address, holder and its MAC (from the
    /// holder's node metadata), and this node's own counters when it is a member.
    fn vips(&self, only: Option<&str>) -> Result<Vec<serde_json::Value>, ApiError> {
        let cluster = self.cluster()?;
        let local = self.vip.as_ref().and_then(|v| v.status());
        let nodes = cluster.nodes();
        let mut out = Vec::new();
        let namespaces = match only {
            Some(n) => vec![cluster.namespace(n)?],
            None => cluster.namespaces(),
        };
        for ns in namespaces {
            let Some(address) = ns.vip.clone() else {
                if only.is_some() {
                    return Err(ApiError::new(
                        404,
                        "unknown_vip",
                        format!("namespace {} has no floating IP", ns.name),
                    ));
                }
                continue;
            };
            let mine = local.as_ref().filter(|s| s.namespace == ns.name);
            let holder = mine.map_or(ns.leader.clone(), |s| s.holder.clone());
            let holder_mac = mine.and_then(|s| s.holder_mac.clone()).or_else(|| {
                let h = holder.as_ref()?;
                nodes.iter().find(|n| &n.name == h)?.mac.clone()
            });
            out.push(serde_json::json!({
                "namespace": ns.name,
                "address": address,
                "holder": holder,
                "holder_mac": holder_mac,
                "quorum": ns.quorum,
                "health_check": ns.health,
                "this_node": mine,
            }));
        }
        Ok(out)
    }

    fn cluster(&self) -> Result<&Arc<Cluster>, ApiError> {
        self.cluster.as_ref().ok_or_else(not_clustered)
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Runs blocking runtime work off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Runtime) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let rt = self.runtime.clone();
        tokio::task::spawn_blocking(move || f(&rt))
            .await
            .map_err(|e| ApiError::internal(format!("runtime task: {e}")))?
    }

    /// `service logs`: this node's instances from its journal, the others' through the peer
    /// transport (each node reads its own journal), merged by time and cut to `lines`.
    async fn service_logs(
        &self,
        name: &str,
        ns: Option<String>,
        lines: u32,
    ) -> Result<serde_json::Value, ApiError> {
        let cluster = self.cluster()?.clone();
        let view = cluster.service_show(name, ns)?;
        let me = cluster.name().to_string();
        let journal = self
            .config
            .services
            .as_ref()
            .and_then(|s| s.journal_dir.clone());
        // (name, id, peer address) of the other nodes running an instance.
        let mut remote: Vec<(String, String, std::net::SocketAddr)> = Vec::new();
        let nodes = cluster.nodes();
        let mut unreachable = serde_json::Map::new();
        let mut seen = std::collections::BTreeSet::new();
        for node in view.instances.iter().filter_map(|i| i.node.clone()) {
            if node == me || !seen.insert(node.clone()) {
                continue;
            }
            match nodes
                .iter()
                .find(|n| n.name == node)
                .and_then(|n| Some((n.id.clone(), n.peer?)))
            {
                Some((id, addr)) => remote.push((node, id, addr)),
                None => {
                    unreachable.insert(node, "no peer address known".into());
                }
            }
        }
        let peers = self.peers.clone();
        let query = format!(
            "/peer/service-logs?ns={}&name={}&lines={lines}",
            view.namespace, view.name
        );
        tokio::task::spawn_blocking(move || {
            let mut all: Vec<(String, String)> = Vec::new();
            let mut counts = serde_json::Map::new();
            let local = local_service_logs(&cluster, journal.as_deref(), &view, lines)?;
            let mut take = |node: &str, v: &serde_json::Value| {
                let got: Vec<String> = v["lines"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|l| l.as_str().map(str::to_string))
                    .collect();
                counts.insert(node.to_string(), got.len().into());
                all.extend(got.into_iter().map(|l| (node.to_string(), l)));
            };
            take(&me, &local);
            for (node, id, addr) in remote {
                let answer = peers
                    .as_ref()
                    .ok_or_else(|| ApiError::internal("no peer transport"))
                    .and_then(|p| p.request(&id, &node, addr, &query))
                    .and_then(|body| {
                        serde_json::from_slice::<serde_json::Value>(&body).map_err(|e| {
                            ApiError::new(502, "peer_error", format!("{node} answered: {e}"))
                        })
                    });
                match answer {
                    Ok(v) => take(&node, &v),
                    Err(e) => {
                        unreachable.insert(node, e.message.clone().into());
                    }
                }
            }
            // short-iso lines start with their time: a stable sort merges the nodes in order.
            all.sort_by(|a, b| {
                let ta = a.1.split(' ').next().unwrap_or("");
                let tb = b.1.split(' ').next().unwrap_or("");
                ta.cmp(tb)
            });
            let skip = all.len().saturating_sub(lines as usize);
            let merged: Vec<String> = all[skip..]
                .iter()
                .map(|(node, l)| format!("{node}: {l}"))
                .collect();
            Ok(serde_json::json!({
                "service": view.name,
                "namespace": view.namespace,
                "lines": merged,
                "nodes": counts,
                "unreachable": unreachable,
            }))
        })
        .await
        .map_err(|e| ApiError::internal(format!("logs task: {e}")))?
    }

    /// `GET /v1/events`: this node's log after `since` (waiting for the next event when asked),
    /// or with `cluster`, the newest events of every reachable member merged by time.
    async fn events(&self, q: api::EventsQuery) -> Result<serde_json::Value, ApiError> {
        let log = crate::events::log();
        if !q.cluster {
            let page = log
                .wait_since(
                    q.since,
                    q.limit,
                    std::time::Duration::from_secs(q.wait_secs),
                )
                .await;
            return Ok(serde_json::to_value(page).expect("events serialise"));
        }
        let cluster = self.cluster()?.clone();
        let peers = self.peers.clone();
        let me = cluster.name().to_string();
        let limit = q.limit;
        tokio::task::spawn_blocking(move || {
            let mut all = log.recent(limit);
            let mut unreachable = serde_json::Map::new();
            for node in cluster.nodes() {
                if node.name == me || !node.state.is_up() {
                    continue;
                }
                let answer = match (node.peer, &peers) {
                    (Some(addr), Some(p)) => p
                        .request(
                            &node.id,
                            &node.name,
                            addr,
                            &format!("/peer/events?limit={limit}"),
                        )
                        .and_then(|body| {
                            serde_json::from_slice::<crate::events::Page>(&body).map_err(|e| {
                                ApiError::new(502, "peer_error", format!("{}: {e}", node.name))
                            })
                        }),
                    _ => Err(ApiError::new(502, "peer_error", "no peer address known")),
                };
                match answer {
                    Ok(page) => all.extend(page.events),
                    Err(e) => {
                        unreachable.insert(node.name.clone(), e.message.into());
                    }
                }
            }
            all.sort_by(|a, b| (a.at_unix_ms, &a.node, a.seq).cmp(&(b.at_unix_ms, &b.node, b.seq)));
            let skip = all.len().saturating_sub(limit);
            Ok(serde_json::json!({
                "events": all[skip..],
                "unreachable": unreachable,
            }))
        })
        .await
        .map_err(|e| ApiError::internal(format!("events task: {e}")))?
    }

    /// `dropctl status` in cluster mode: this node, and its namespace as a whole — leader,
    /// quorum, floating IP and holder, every member with its state, drain and pools (asked of
    /// each member over the peer transport), services with their active count.
    async fn overview(&self) -> Result<serde_json::Value, ApiError> {
        let cluster = self.cluster()?.clone();
        let me = self.config.node_name.clone();
        let here = node_summary(&self.runtime, &self.config.state_dir);
        let nodes = cluster.nodes();
        let my_ns = nodes
            .iter()
            .find(|n| n.name == me)
            .and_then(|n| n.namespace.clone());
        let Some(ns_name) = my_ns else {
            return Ok(serde_json::json!({ "node": here, "namespace": null }));
        };
        let ns = cluster.namespace(&ns_name)?;
        let vip = self.vips(Some(&ns_name)).ok().and_then(|mut v| v.pop());
        let peers = self.peers.clone();
        let member_names: Vec<String> = ns.members.iter().map(|m| m.name.clone()).collect();
        let nodes2 = nodes.clone();
        let members = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for name in member_names {
                let view = nodes2.iter().find(|n| n.name == name);
                let mut m = serde_json::json!({
                    "name": name,
                    "state": view.map(|v| v.state),
                    "draining": view.is_some_and(|v| v.draining),
                    "version": view.map(|v| v.version.clone()),
                    "leader": view.is_some_and(|v| v.leader),
                });
                let summary = if name == me {
                    Ok(here.clone())
                } else {
                    match (
                        view.filter(|v| v.state.is_up())
                            .and_then(|v| Some((v.id.as_str(), v.peer?))),
                        &peers,
                    ) {
                        (Some((id, addr)), Some(p)) => {
                            p.request(id, &name, addr, "/peer/node").and_then(|b| {
                                serde_json::from_slice(&b).map_err(|e| {
                                    ApiError::new(502, "peer_error", format!("{name}: {e}"))
                                })
                            })
                        }
                        _ => Err(ApiError::new(503, "peer_unreachable", "not up")),
                    }
                };
                match summary {
                    Ok(s) => m["pools"] = s["pools"].clone(),
                    Err(e) => m["unreachable"] = e.message.into(),
                }
                out.push(m);
            }
            out
        })
        .await
        .map_err(|e| ApiError::internal(format!("overview task: {e}")))?;
        let services: Vec<serde_json::Value> = ns
            .services
            .iter()
            .map(|s| serde_json::json!({ "name": s.name, "count": s.count, "active": s.active }))
            .collect();
        Ok(serde_json::json!({
            "node": node_summary(&self.runtime, &self.config.state_dir),
            "namespace": {
                "name": ns.name,
                "leader": ns.leader,
                "quorum": ns.quorum,
                "vip": ns.vip,
                "vip_holder": vip.as_ref().map(|v| v["holder"].clone()),
                "members": members,
                "flows": ns.flows,
                "services": services,
            },
        }))
    }

    /// `dropctl node drain | undrain` (`Some`), or only the drain's progress (`None`). The
    /// drain is kept in the state directory, so a restarted daemon stays drained until undrained.
    fn drain(&self, on: Option<bool>) -> Result<serde_json::Value, ApiError> {
        let dir = &self.config.state_dir;
        if let Some(on) = on {
            let before = crate::host::state::draining_since(dir);
            let since = on.then(|| before.unwrap_or_else(crate::cluster::state::physical_now_ms));
            crate::host::state::set_draining(dir, since)
                .map_err(|e| ApiError::internal(format!("{e:#}")))?;
            self.apply_drain(on);
            let name = &self.config.node_name;
            match (before.is_some(), on) {
                (false, true) => {
                    tracing::info!(
                        "draining: no new gateway calls, leadership, floating IP or service instances here"
                    );
                    crate::events::record(
                        crate::events::Kind::Drain,
                        name,
                        "draining: no new calls, leadership, floating IP or instances here",
                    );
                }
                (true, false) => {
                    tracing::info!("undrained: taking work again");
                    crate::events::record(crate::events::Kind::Drain, name, "undrained");
                }
                _ => {}
            }
        }
        Ok(self.drain_status())
    }

    /// Tells every part of the node whether it drains (also at start-up, from the state
    /// directory).
    pub fn apply_drain(&self, on: bool) {
        self.runtime.set_draining(on);
        if let Some(c) = &self.cluster {
            c.set_draining(on);
        }
        if let Some(v) = &self.vip {
            v.set_draining(on);
        }
    }

    /// What still keeps a draining node from being drained.
    fn drain_status(&self) -> serde_json::Value {
        let me = self.config.node_name.as_str();
        let since = crate::host::state::draining_since(&self.config.state_dir);
        let in_flight = self.runtime.in_flight();
        let (mut leads, mut instances, mut announced) = (Vec::new(), 0u64, true);
        if let Some(c) = &self.cluster {
            for ns in c.namespaces() {
                if ns.leader.as_deref() == Some(me) {
                    leads.push(ns.name.clone());
                }
                instances += ns
                    .services
                    .iter()
                    .flat_map(|s| &s.instances)
                    .filter(|i| i.node.as_deref() == Some(me))
                    .filter(|i| {
                        matches!(
                            i.active.as_str(),
                            "active" | "activating" | "deactivating" | "reloading"
                        )
                    })
                    .count() as u64;
            }
            // The cluster has heard it: this node's own metadata says so.
            announced = c
                .nodes()
                .iter()
                .find(|n| n.name == me)
                .is_some_and(|n| n.draining == since.is_some());
        }
        let holds_vip = self
            .vip
            .as_ref()
            .and_then(|v| v.status())
            .filter(|s| s.role == "holder")
            .map(|s| s.address);
        let drained = since.is_some()
            && announced
            && leads.is_empty()
            && holds_vip.is_none()
            && in_flight == 0
            && instances == 0;
        serde_json::json!({
            "node": me,
            "draining": since.is_some(),
            "since_unix_ms": since,
            "announced": announced,
            "leads": leads,
            "holds_vip": holds_vip,
            "in_flight": in_flight,
            "service_instances": instances,
            "drained": drained,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub async fn handle(&self, req: ApiRequest) -> Result<ApiResponse, ApiError> {
        match req {
            ApiRequest::Status => Ok(ApiResponse::Status(self.status())),
            ApiRequest::TuneCheck { only } => {
                let entries = self.select(&only)?;
                let root = self.config.sysctl_root.clone();
                let report = tokio::task::spawn_blocking(move || {
                    tune::check(&root, &entries.iter().collect::<Vec<_>>())
                })
                .await
                .map_err(|e| ApiError::internal(format!("tune check task: {e}")))?;
                Ok(ApiResponse::TuneCheck(report))
            }
            ApiRequest::TuneApply { only } => {
                let entries = self.select(&only)?;
                let root = self.config.sysctl_root.clone();
                let _guard = self.tune_lock.lock().await;
                let report = tokio::task::spawn_blocking(move || {
                    tune::apply(&root, &entries.iter().collect::<Vec<_>>())
                })
                .await
                .map_err(|e| ApiError::internal(format!("tune apply task: {e}")))?;
                for k in report
                    .keys
                    .iter()
                    .filter(|k| k.outcome != tune::ApplyOutcome::Unchanged)
                {
                    tracing::info!(key = %k.key, before = ?k.before, after = ?k.after, outcome = ?k.outcome, error = ?k.error, "sysctl applied");
                }
                Ok(ApiResponse::TuneApply(report))
            }
            ApiRequest::FlowList => Ok(to_json(&self.runtime.flows())),
            ApiRequest::FlowApply { file, source, ns } => {
                if let Some(c) = &self.cluster {
                    // A cluster flow would not run here either (the runtime refuses it): say so
                    // before it is stored for the namespace.
                    if let Ok(flow) = crate::runtime::flow::parse_flow(&source, Path::new(&file))
                        && let Some(plugin) = self.plugin_of(&flow.name)
                    {
                        return Err(ApiError::from(&RuntimeError::PluginFlow {
                            flow: flow.name,
                            plugin,
                        }));
                    }
                    return c
                        .flow_apply(&source, &file, ns)
                        .await
                        .map(ApiResponse::Json);
                }
                if ns.is_some() {
                    return Err(not_clustered());
                }
                self.blocking(move |rt| {
                    rt.apply(&source, Path::new(&file))
                        .map(|r| to_json(&r))
                        .map_err(|e| ApiError::from(&e))
                })
                .await
            }
            ApiRequest::FlowShow { name } => self
                .runtime
                .flow(&name)
                .map(ApiResponse::Json)
                .map_err(|e| ApiError::from(&e)),
            ApiRequest::FlowRemove { name, ns } => {
                if let Some(c) = &self.cluster {
                    return match c.flow_remove(&name, ns).await {
                        // Not the namespace's, but a plugin's here: say whose.
                        Err(e) if e.code == "unknown_flow" => match self.plugin_of(&name) {
                            Some(plugin) => Err(ApiError::from(&RuntimeError::PluginFlow {
                                flow: name,
                                plugin,
                            })),
                            None => Err(e),
                        },
                        other => other.map(ApiResponse::Json),
                    };
                }
                if ns.is_some() {
                    return Err(not_clustered());
                }
                self.blocking(move |rt| {
                    rt.remove(&name)
                        .map(|r| to_json(&r))
                        .map_err(|e| ApiError::from(&e))
                })
                .await
            }
            ApiRequest::PluginList => Ok(to_json(&self.plugins.list())),
            ApiRequest::PluginReload => {
                if !self.plugins.enabled() {
                    return Err(ApiError::new(
                        409,
                        "plugins_off",
                        format!(
                            "plugins are off on this node: set `[plugins] enabled = true` in {} \
                             and restart the daemon",
                            self.config
                                .path
                                .as_ref()
                                .map_or("its config".to_string(), |p| p.display().to_string())
                        ),
                    ));
                }
                let plugins = self.plugins.clone();
                self.blocking(move |rt| Ok(to_json(&plugins.reload(rt))))
                    .await
            }
            ApiRequest::NodeList => Ok(to_json(&self.cluster()?.nodes())),
            ApiRequest::NsList => Ok(to_json(&self.cluster()?.namespaces())),
            ApiRequest::NsShow { name } => {
                let view = self.cluster()?.namespace(&name)?;
                let mut v = serde_json::to_value(&view).expect("namespace views serialise");
                let local = self.vip.as_ref().and_then(|v| v.status());
                if let Some(s) = local.filter(|s| s.namespace == name) {
                    v["vip_status"] = serde_json::to_value(s).expect("vip status serialises");
                }
                Ok(ApiResponse::Json(v))
            }
            ApiRequest::NsHealth { name, health } => {
                if let Some(h) = &health {
                    let spec: crate::vip::health::HealthSpec = serde_json::from_value(h.clone())
                        .map_err(|e| ApiError::invalid_body(format!("health check: {e}")))?;
                    spec.validate()
                        .map_err(|e| ApiError::invalid_body(format!("health check: {e}")))?;
                }
                self.cluster()?
                    .ns_set_health(&name, health)
                    .await
                    .map(|v| to_json(&v))
            }
            ApiRequest::VipList => Ok(ApiResponse::Json(serde_json::Value::Array(
                self.vips(None)?,
            ))),
            ApiRequest::VipShow { ns } => {
                let mut list = self.vips(Some(&ns))?;
                Ok(ApiResponse::Json(list.pop().unwrap_or_default()))
            }
            ApiRequest::NsCreate { name, vip, nodes } => self
                .cluster()?
                .ns_create(&name, vip, &nodes)
                .await
                .map(|v| to_json(&v)),
            ApiRequest::NsRemove { name } => self
                .cluster()?
                .ns_remove(&name)
                .await
                .map(ApiResponse::Json),
            ApiRequest::NsJoin { name } => {
                self.cluster()?.ns_join(&name).await.map(|v| to_json(&v))
            }
            ApiRequest::NsLeave => self.cluster()?.ns_leave().await.map(ApiResponse::Json),
            ApiRequest::LbStatus => match &self.lb {
                Some(lb) => {
                    let lb = lb.clone();
                    let v = tokio::task::spawn_blocking(move || lb.status())
                        .await
                        .map_err(|e| ApiError::internal(format!("balancer task: {e}")))?;
                    Ok(ApiResponse::Json(v))
                }
                None => Err(ApiError::new(
                    409,
                    "no_balancer",
                    "this node runs no balancer (`[balancer] enabled = true`)",
                )),
            },
            ApiRequest::ServiceList { ns } => Ok(to_json(&self.cluster()?.service_list(ns)?)),
            ApiRequest::ServiceShow { name, ns } => {
                Ok(to_json(&self.cluster()?.service_show(&name, ns)?))
            }
            ApiRequest::ServiceSet { name, request } => self
                .cluster()?
                .service_set(&name, *request)
                .await
                .map(ApiResponse::Json),
            ApiRequest::ServiceRemove { name, ns } => self
                .cluster()?
                .service_remove(&name, ns)
                .await
                .map(ApiResponse::Json),
            ApiRequest::ServiceLogs { name, ns, lines } => self
                .service_logs(&name, ns, lines)
                .await
                .map(ApiResponse::Json),
            ApiRequest::Events(q) => self.events(q).await.map(ApiResponse::Json),
            ApiRequest::Drain(on) => self.drain(on).map(ApiResponse::Json),
            ApiRequest::Overview => self.overview().await.map(ApiResponse::Json),
            ApiRequest::PoolList => Ok(to_json(&self.runtime.pool_statuses())),
            ApiRequest::PoolShow { name } => {
                let status = self
                    .runtime
                    .pool_status(&name)
                    .map_err(|e| ApiError::from(&e))?;
                let mut v = serde_json::to_value(&status).expect("pool status serialises");
                // What its workers last printed on stderr: why a worker that dies before its
                // first reply died, right where the operator looks.
                if let Ok(log) = self.runtime.pool_log(&name)
                    && let Ok((bytes, _)) = log.tail(4096)
                {
                    let text = String::from_utf8_lossy(&bytes);
                    let lines: Vec<&str> = text.lines().collect();
                    let tail = &lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..];
                    v["stderr_tail"] = serde_json::json!(tail);
                }
                Ok(ApiResponse::Json(v))
            }
            ApiRequest::PoolRestart { name } => {
                self.blocking(move |rt| {
                    rt.restart_pool(&name)
                        .map(|s| to_json(&s))
                        .map_err(|e| ApiError::from(&e))
                })
                .await
            }
            ApiRequest::Call { pool, payload } => {
                let forward = self.forward.clone();
                self.blocking(move |rt| {
                    let reply = match (rt.pool(&pool), forward) {
                        (Some(p), _) => {
                            p.call(payload.as_bytes()).map_err(|e| ApiError::from(&e))?
                        }
                        (None, Some(f)) => {
                            f.call_any(&pool, payload.as_bytes()).unwrap_or_else(|| {
                                Err(ApiError::from(&RuntimeError::UnknownPool(pool.clone())))
                            })?
                        }
                        (None, None) => {
                            return Err(ApiError::from(&RuntimeError::UnknownPool(pool.clone())));
                        }
                    };
                    Ok(ApiResponse::Json(
                        serde_json::json!({ "reply": String::from_utf8_lossy(&reply) }),
                    ))
                })
                .await
            }
            ApiRequest::Scale { pool, min, max } => {
                self.runtime
                    .scale(&pool, min, max)
                    .map_err(|e| ApiError::from(&e))?;
                self.runtime
                    .pool_status(&pool)
                    .map(|s| to_json(&s))
                    .map_err(|e| ApiError::from(&e))
            }
            ApiRequest::ImageList => {
                let dir = self.config.images_dir.clone();
                let list = crate::runtime::images::list(&dir).map_err(|e| ApiError::from(&e))?;
                Ok(to_json(&list))
            }
            ApiRequest::ImageImport {
                name,
                upload,
                gzip,
                replace,
            } => {
                let dir = self.config.images_dir.clone();
                let report = tokio::task::spawn_blocking(move || {
                    crate::runtime::images::import_tarball(&dir, &name, &upload, gzip, replace)
                })
                .await
                .map_err(|e| ApiError::internal(format!("image import task: {e}")))?
                .map_err(|e| ApiError::from(&e))?;
                Ok(to_json(&report))
            }
            ApiRequest::ImageRemove { name } => {
                crate::runtime::images::remove(&self.config.images_dir, &name)
                    .map_err(|e| ApiError::from(&e))?;
                Ok(ApiResponse::Json(serde_json::json!({ "removed": name })))
            }
            ApiRequest::Cast { pool, payload, all } => {
                match self.runtime.cast(&pool, payload.as_bytes(), all) {
                    Ok(()) => {}
                    // Not here: one node that runs it takes it.
                    Err(RuntimeError::UnknownPool(_))
                        if self
                            .forward
                            .as_ref()
                            .is_some_and(|f| f.cast(&pool, payload.as_bytes(), all, false)) => {}
                    Err(e) => return Err(ApiError::from(&e)),
                }
                Ok(ApiResponse::Json(
                    serde_json::json!({ "queued": true, "pool": pool, "all": all }),
                ))
            }
            ApiRequest::Logs { pool, offset } => {
                self.blocking(move |rt| {
                    let log = rt.pool_log(&pool).map_err(|e| ApiError::from(&e))?;
                    let read = match offset {
                        Some(o) => log.read_from(o, LOG_CHUNK),
                        None => log.tail(LOG_CHUNK),
                    };
                    let (bytes, next) = read.map_err(|e| {
                        ApiError::internal(format!("reading the log of {pool}: {e}"))
                    })?;
                    Ok(ApiResponse::Json(serde_json::json!({
                        "pool": pool,
                        "path": log.path(),
                        "text": String::from_utf8_lossy(&bytes),
                        "next_offset": next,
                    })))
                })
                .await
            }
        }
    }

    fn status(&self) -> StatusInfo {
        StatusInfo {
            node_id: self.node_id.to_string(),
            name: self.config.node_name.clone(),
            version: crate::VERSION.to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            pid: std::process::id(),
            config_path: self.config.path.clone(),
            state_dir: self.config.state_dir.clone(),
            socket: self.config.socket.clone(),
            gateway: self.gateway.map(|a| a.to_string()),
            pools: self.runtime.pool_statuses().len(),
        }
    }

    fn select(&self, only: &[String]) -> Result<Vec<tune::Entry>, ApiError> {
        match self.profile.select(only) {
            Ok(entries) => Ok(entries.into_iter().cloned().collect()),
            Err(unknown) => Err(ApiError::new(
                400,
                "unknown_key",
                format!("not in the tuning profile: {}", unknown.join(", ")),
            )),
        }
    }
}

/// This node in a few words, for `dropctl status` (also asked by other nodes: `/peer/node`):
/// version, drain, and each pool's state, workers and counters.
pub fn node_summary(runtime: &Runtime, state_dir: &Path) -> serde_json::Value {
    use crate::runtime::worker::pool::Phase;
    let pools: Vec<serde_json::Value> = runtime
        .pool_statuses()
        .into_iter()
        .map(|p| {
            let state = match &p.phase {
                Phase::Running => "running".to_string(),
                Phase::Failed(why) => format!("failed: {why}"),
                Phase::Stopped => "stopped".to_string(),
            };
            serde_json::json!({
                "name": p.name,
                "state": state,
                "workers": p.workers,
                "busy": p.busy,
                "queue": p.queue_depth,
                "ok": p.stats.ok,
                "error": p.stats.error,
                "timeout": p.stats.timeout,
                "restarts": p.stats.restarts,
                "p99_us": p.stats.quantile_us(0.99),
            })
        })
        .collect();
    serde_json::json!({
        "version": crate::VERSION,
        "draining": crate::host::state::draining_since(state_dir).is_some(),
        "pools": pools,
    })
}

/// The journal lines of `view`'s instances that run on this node.
pub fn local_service_logs(
    cluster: &Cluster,
    journal: Option<&Path>,
    view: &crate::cluster::services::ServiceView,
    lines: u32,
) -> Result<serde_json::Value, ApiError> {
    let me = cluster.name();
    let here: Vec<u32> = view
        .instances
        .iter()
        .filter(|i| i.node.as_deref() == Some(me))
        .map(|i| i.index)
        .collect();
    crate::services::logs::read(&view.namespace, &view.name, &here, journal, lines)
}

/// The peer listener's `/peer/…` requests: `GET /peer/service-logs?ns=&name=&lines=` and
/// `GET /peer/events?limit=N` (this node's newest events).
pub fn peer_request(
    cluster: &Cluster,
    journal: Option<&Path>,
    path: &str,
    query: Option<&str>,
) -> Result<serde_json::Value, ApiError> {
    if path == "/peer/events" {
        let q = api::EventsQuery::from_query(query)?;
        let events = crate::events::log().recent(q.limit);
        let next = events.last().map_or(0, |e| e.seq);
        let page = crate::events::Page {
            events,
            next,
            missed: 0,
            newest: next,
        };
        return Ok(serde_json::to_value(page).expect("events serialise"));
    }
    if path != "/peer/service-logs" {
        return Err(ApiError::new(
            404,
            "not_found",
            format!("{path} is not served here"),
        ));
    }
    let mut ns = None;
    let mut name = None;
    let mut lines = 100;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("ns", v)) => ns = Some(v.to_string()),
            Some(("name", v)) => name = Some(v.to_string()),
            Some(("lines", v)) => {
                lines = v
                    .parse()
                    .map_err(|_| ApiError::invalid_body(format!("lines={v}")))?;
            }
            _ => {
                return Err(ApiError::new(
                    400,
                    "invalid_query",
                    format!("unknown query parameter {pair:?}"),
                ));
            }
        }
    }
    let name = name.ok_or_else(|| ApiError::invalid_body("name= is missing"))?;
    let view = cluster.service_show(&name, ns)?;
    local_service_logs(cluster, journal, &view, lines)
}
