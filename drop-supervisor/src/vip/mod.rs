//! The floating IP (DESIGN §7): a namespace's address follows a healthy holder, which is also
//! the namespace's leader.
//!
//! - [`protocol`]: the pure lease protocol that decides who may hold the address (fast
//!   heartbeats among the namespace's members, a lease renewed by a majority, a cut-off holder
//!   releasing before anyone else may add it).
//! - [`wire`]: its signed, replay-proof UDP datagrams.
//! - [`agent`]: the thread that runs it and adds, announces and removes the address through the
//!   network seam ([`drop_net::VipNet`]).
//! - [`health`]: the namespace's optional health check, with rise/fall counts.
//!
//! The cluster tells the [`VipService`] after every reconcile pass which namespace this node is
//! in, its address and members, and asks it back who holds the address: that holder is the
//! namespace's leader (see `cluster::VipHook`).

pub mod agent;
pub mod health;
pub mod protocol;
pub mod wire;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::{info, warn};

use self::agent::{Agent, VipStatus};
use self::health::{HealthSpec, Verdict};
use self::protocol::{Id, Params};
use crate::cluster::state::NodeId;
use crate::cluster::{VipHook, VipInput};
use crate::runtime::Runtime;

/// Announcement counts and intervals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Garp {
    /// Announcements sent at once on takeover, on a conflict, and when a member is heard again.
    pub burst: u32,
    /// A second burst this long after takeover (`None`: off).
    pub repeat_after: Option<Duration>,
    /// One announcement this often while holding (`None`: off).
    pub refresh: Option<Duration>,
    /// At most one conflict burst this often.
    pub conflict_gap: Duration,
}

impl Default for Garp {
    fn default() -> Garp {
        Garp {
            burst: 5,
            repeat_after: Some(Duration::from_secs(2)),
            refresh: Some(Duration::from_secs(30)),
            conflict_gap: Duration::from_secs(1),
        }
    }
}

/// The validated `[vip]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipSettings {
    /// Off: this node never adds an address (it still answers nobody on the fast path).
    pub enabled: bool,
    /// The interface for the address; `None`: the one whose route reaches the other members.
    pub interface: Option<String>,
    /// Local address of the protocol's UDP socket (the cluster's bind IP).
    pub bind_ip: IpAddr,
    /// UDP port of the protocol, the same on every node (default: the cluster port + 2).
    pub port: u16,
    pub params: Params,
    pub garp: Garp,
}

/// One member of this node's namespace, for the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanMember {
    pub id: Id,
    pub name: String,
    pub ip: IpAddr,
}

/// This node's namespace as the agent needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub ns: String,
    pub addr: IpAddr,
    pub prefix: u8,
    pub members: Vec<PlanMember>,
    /// The cluster's leader of the namespace (preferred when nobody holds the address).
    pub leader: Option<Id>,
}

impl Plan {
    pub fn name_of(&self, id: Id) -> String {
        self.members
            .iter()
            .find(|m| m.id == id)
            .map_or_else(|| id.to_string(), |m| m.name.clone())
    }
}

/// The health check task of the namespace, if one runs.
struct HealthTask {
    spec: HealthSpec,
    handle: JoinHandle<()>,
}

/// The agent and its health check, as the cluster's [`VipHook`].
pub struct VipService {
    agent: Agent,
    runtime: Arc<Runtime>,
    health: Mutex<Option<HealthTask>>,
    settings: VipSettings,
    node_name: String,
    /// This node's systemd for `unit` health checks (`None`: services are off here).
    units: Option<Arc<crate::services::probe::UnitProbe>>,
}

impl std::fmt::Debug for VipService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VipService").finish_non_exhaustive()
    }
}

impl VipService {
    pub fn new(
        agent: Agent,
        runtime: Arc<Runtime>,
        settings: VipSettings,
        node_name: String,
        units: Option<Arc<crate::services::probe::UnitProbe>>,
    ) -> VipService {
        VipService {
            agent,
            runtime,
            health: Mutex::new(None),
            settings,
            node_name,
            units,
        }
    }

    /// Draining: release the address to a healthy member and do not take it back.
    pub fn set_draining(&self, draining: bool) {
        self.agent.set_draining(draining);
    }

    pub fn status(&self) -> Option<VipStatus> {
        self.agent.status()
    }

    /// See [`Agent::on_holding`](agent::Agent::on_holding).
    pub fn on_holding(&self, watcher: agent::HoldingWatcher) {
        self.agent.on_holding(watcher);
    }

    /// Releases the address and stops (SIGTERM).
    pub fn stop(&self) {
        if let Some(t) = self.health.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.handle.abort();
        }
        self.agent.stop();
    }

    /// Starts, replaces or stops the health task for `spec`.
    fn follow_health(&self, ns: &str, vip: &str, spec: Option<HealthSpec>) {
        let mut slot = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().map(|t| &t.spec) == spec.as_ref() {
            return;
        }
        if let Some(old) = slot.take() {
            old.handle.abort();
        }
        let Some(spec) = spec else {
            self.agent.set_health(None, None, None);
            return;
        };
        info!(namespace = %ns, check = %spec.describe(), "floating IP health check");
        // No result yet: nobody stands on it, a holder keeps the address until the first one.
        self.agent
            .set_health(Some(spec.describe()), None, Some("not checked yet".into()));
        let agent_inputs = self.agent.health_sink();
        let runtime = self.runtime.clone();
        let units = self.units.clone();
        let s = spec.clone();
        let ns = ns.to_string();
        let env = [
            ("DROP_NODE", self.node_name.clone()),
            ("DROP_NAMESPACE", ns.clone()),
            ("DROP_VIP", vip.to_string()),
        ];
        let handle = tokio::spawn(async move {
            let mut verdict = Verdict::new(s.rise, s.fall);
            let mut tick = tokio::time::interval(s.interval());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let result = health::run_once(&s, &runtime, &env, units.as_deref()).await;
                let ok = result.is_ok();
                if let Some(now) = verdict.record(ok) {
                    match &result {
                        Ok(()) => {
                            info!(namespace = %ns, healthy = now, "floating IP health check passes")
                        }
                        Err(e) => {
                            warn!(namespace = %ns, healthy = now, error = %e, "floating IP health check fails")
                        }
                    }
                }
                agent_inputs(Some(s.describe()), verdict.healthy(), result.err());
            }
        });
        *slot = Some(HealthTask { spec, handle });
    }

    /// Prometheus text for this node's floating IP.
    pub fn metrics(&self) -> String {
        self.status()
            .map(|s| render_metrics(&s))
            .unwrap_or_default()
    }
}

impl VipHook for VipService {
    fn update(&self, input: Option<VipInput>) {
        let Some(input) = input.filter(|_| self.settings.enabled) else {
            self.agent.set_plan(None);
            self.follow_health("", "", None);
            return;
        };
        let addr: IpAddr = match input.vip.parse() {
            Ok(a) => a,
            Err(_) => {
                warn!(namespace = %input.ns, vip = %input.vip, "the namespace's VIP is not an IP address");
                self.agent.set_plan(None);
                return;
            }
        };
        let health = match input.health.map(serde_json::from_value::<HealthSpec>) {
            None => None,
            Some(Ok(spec)) => match spec.validate() {
                Ok(()) => Some(spec),
                Err(e) => {
                    warn!(namespace = %input.ns, error = %e, "the namespace's health check is invalid; ignored");
                    None
                }
            },
            Some(Err(e)) => {
                warn!(namespace = %input.ns, error = %e, "the namespace's health check is invalid; ignored");
                None
            }
        };
        self.follow_health(&input.ns, &input.vip, health);
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        self.agent.set_plan(Some(Plan {
            ns: input.ns,
            addr,
            prefix,
            members: input
                .members
                .into_iter()
                .map(|(id, name, ip)| PlanMember { id: id.0, name, ip })
                .collect(),
            leader: input.leader.map(|l| l.0),
        }));
    }

    fn holder(&self, ns: &str) -> Option<NodeId> {
        self.agent.holder(ns).map(NodeId)
    }

    fn status(&self) -> Option<serde_json::Value> {
        self.agent
            .status()
            .and_then(|s| serde_json::to_value(s).ok())
    }
}

/// `drop_vip_*` series for one status.
pub fn render_metrics(s: &VipStatus) -> String {
    use std::fmt::Write as _;
    let labels = format!("namespace=\"{}\",address=\"{}\"", s.namespace, s.address);
    let mut out = String::new();
    let series: BTreeMap<&str, (&str, &str, u64)> = BTreeMap::from([
        (
            "drop_vip_holder",
            (
                "gauge",
                "1 while this node holds the floating IP",
                u64::from(s.role == "holder"),
            ),
        ),
        (
            "drop_vip_healthy",
            (
                "gauge",
                "1 while this node's health check lets it hold the floating IP",
                u64::from(s.health.healthy),
            ),
        ),
        (
            "drop_vip_garps_sent_total",
            (
                "counter",
                "Gratuitous announcements sent by this node",
                s.garps_sent,
            ),
        ),
        (
            "drop_vip_conflicts_total",
            (
                "counter",
                "Announcements of the floating IP from another MAC seen while holding it",
                s.conflicts_seen,
            ),
        ),
        (
            "drop_vip_moves_total",
            ("counter", "Holder changes this node saw", s.moves),
        ),
        (
            "drop_vip_term",
            ("gauge", "Highest protocol term this node saw", s.term),
        ),
    ]);
    for (name, (kind, help, value)) in series {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}}} {value}"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_have_one_series_each_with_labels() {
        let s = VipStatus {
            namespace: "web".into(),
            address: "10.0.0.1/32".into(),
            role: "holder".into(),
            garps_sent: 7,
            ..VipStatus::default()
        };
        let text = render_metrics(&s);
        assert!(
            text.contains("drop_vip_holder{namespace=\"web\",address=\"10.0.0.1/32\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "drop_vip_garps_sent_total{namespace=\"web\",address=\"10.0.0.1/32\"} 7\n"
            )
        );
        assert!(text.contains("# TYPE drop_vip_conflicts_total counter"));
        assert_eq!(text.matches("# TYPE").count(), 6);
    }
}
