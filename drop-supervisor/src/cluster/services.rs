//! Services in the replicated state (DESIGN §6): the leader's placement pass and each node's
//! share, computed from the state map alone (pure; `node::plan` calls it under the state lock).
//!
//! Keys:
//! - `svc/<ns>/<name>`: the [`ServiceSpec`] as stored by `dropctl service set`;
//! - `svca/<ns>/<name>`: `{"slots": [node id or null, …]}`, the instance → node assignment,
//!   written only by the namespace's acting leader;
//! - `reg/<node id>` → `"services"`: that node's agent report (instance states, failures,
//!   whether its systemd answers).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::state::{NodeId, StateMap};
use crate::services::agent::{Desired, ServicesInput};
use crate::services::placement::{self, Eligible};
use crate::services::spec::{Run, ServiceSpec};

/// What a pass over one namespace's services yields.
#[derive(Debug, Default)]
pub struct ServicesPass {
    /// Assignment writes (leader only): key → new value, `None` deletes.
    pub writes: Vec<(String, Option<Value>)>,
    /// This node's share (if it is a member).
    pub input: ServicesInput,
    pub views: Vec<ServiceView>,
}

/// One instance as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceView {
    pub index: u32,
    /// The node it is assigned to (or, for a surplus instance, runs on).
    pub node: Option<String>,
    pub active: String,
    pub sub: String,
    pub since_ms: u64,
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub surplus: bool,
}

/// A service as `service ls | show` print it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: String,
    pub namespace: String,
    pub count: u32,
    /// `unit` or `exec`.
    pub kind: String,
    /// Instances active where they are assigned.
    pub active: u32,
    pub instances: Vec<InstanceView>,
    /// Node name → failures there (of the current version).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failures: BTreeMap<String, u32>,
    pub spec: ServiceSpec,
}

/// The stored assignment.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Assignment {
    pub slots: Vec<Option<NodeId>>,
}

/// What one pass needs to know besides the map.
pub struct PassInput<'a> {
    pub ns: &'a str,
    pub me: NodeId,
    /// Declared members of `ns`.
    pub members: &'a BTreeSet<NodeId>,
    /// Members up in this node's membership view.
    pub up: &'a BTreeSet<NodeId>,
    /// Advertised capacity per node.
    pub capacity: &'a BTreeMap<NodeId, u32>,
    /// Draining nodes: no instance is placed there (theirs move, make-before-break).
    pub draining: &'a BTreeSet<NodeId>,
    /// This node acts as the namespace's leader (elected, with its lease).
    pub leading: bool,
    /// This node is a member of `ns`.
    pub mine: bool,
    pub max_failures: u32,
    pub name_of: &'a dyn Fn(NodeId) -> String,
}

pub fn spec_key(ns: &str, name: &str) -> String {
    format!("svc/{ns}/{name}")
}

pub fn assignment_key(ns: &str, name: &str) -> String {
    format!("svca/{ns}/{name}")
}

/// The services stored for `ns`, by name (unreadable entries skipped).
pub fn specs(map: &StateMap, ns: &str) -> BTreeMap<String, ServiceSpec> {
    map.iter_prefix(&format!("svc/{ns}/"))
        .filter_map(|(_, v)| serde_json::from_value::<ServiceSpec>(v.clone()).ok())
        .map(|s| (s.name.clone(), s))
        .collect()
}

fn assignment(map: &StateMap, ns: &str, name: &str) -> Assignment {
    map.get(&assignment_key(ns, name))
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default()
}

/// A node's agent report, as its registry entry carries it.
fn report(map: &StateMap, id: NodeId) -> Option<&Value> {
    map.get(&format!("reg/{id}"))?.get("services")
}

fn has_systemd(map: &StateMap, id: NodeId) -> bool {
    report(map, id)
        .and_then(|r| r.get("systemd"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn failures(map: &StateMap, id: NodeId, key: &str) -> u32 {
    report(map, id)
        .and_then(|r| r.get("failures"))
        .and_then(|f| f.get(key))
        .and_then(Value::as_u64)
        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// `(active, sub, since, restarts, surplus)` of instance `index` of `key` on node `id`.
fn instance<'a>(map: &'a StateMap, id: NodeId, key: &str, index: u32) -> Option<&'a Value> {
    report(map, id)?
        .get("instances")?
        .get(key)?
        .get(index.to_string())
}

fn instance_view(v: Option<&Value>, index: u32, node: Option<String>) -> InstanceView {
    let s = |k: &str, d: &str| {
        v.and_then(|v| v.get(k))
            .and_then(Value::as_str)
            .unwrap_or(d)
            .to_string()
    };
    let n = |k: &str| {
        v.and_then(|v| v.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    InstanceView {
        index,
        node,
        active: s("active", "pending"),
        sub: s("sub", "-"),
        since_ms: n("since_ms"),
        restarts: u32::try_from(n("restarts")).unwrap_or(u32::MAX),
        surplus: v
            .and_then(|v| v.get("surplus"))
            .and_then(Value::as_bool)
            .unwrap_or(false),
    }
}

/// One namespace's services: the leader's assignment writes, this node's share, the views.
pub fn pass(map: &StateMap, p: &PassInput<'_>) -> ServicesPass {
    let specs = specs(map, p.ns);
    let mut out = ServicesPass::default();
    let live: Vec<NodeId> = p.members.intersection(p.up).copied().collect();
    // Instances of every service per node, for the capacity tie-break.
    let mut assigned: BTreeMap<String, Assignment> = specs
        .keys()
        .map(|name| (name.clone(), assignment(map, p.ns, name)))
        .collect();
    if p.leading {
        for (name, spec) in &specs {
            let key = format!("{}/{name}", p.ns);
            let mut load: BTreeMap<NodeId, u32> = BTreeMap::new();
            for (other, a) in &assigned {
                if other != name {
                    for id in a.slots.iter().flatten() {
                        *load.entry(*id).or_default() += 1;
                    }
                }
            }
            let eligible: Vec<Eligible<NodeId>> = live
                .iter()
                .filter(|id| has_systemd(map, **id))
                .filter(|id| !p.draining.contains(id))
                .filter(|id| failures(map, **id, &key) < p.max_failures)
                .map(|id| Eligible {
                    id: *id,
                    capacity: p.capacity.get(id).copied().unwrap_or(100),
                    load: load.get(id).copied().unwrap_or(0),
                })
                .collect();
            let prev = assigned.get(name).cloned().unwrap_or_default();
            // A port is the node's: one instance per node.
            let per_node = spec.balance.map(|_| 1);
            let slots = placement::place(spec.count, &prev.slots, &eligible, per_node);
            if slots != prev.slots || map.get(&assignment_key(p.ns, name)).is_none() {
                let a = Assignment { slots };
                out.writes.push((
                    assignment_key(p.ns, name),
                    Some(serde_json::to_value(&a).unwrap_or(Value::Null)),
                ));
                assigned.insert(name.clone(), a);
            }
        }
        // Assignments of removed services go too.
        for (k, _) in map.iter_prefix(&format!("svca/{}/", p.ns)) {
            let name = k.rsplit('/').next().unwrap_or("");
            if !specs.contains_key(name) {
                out.writes.push((k.to_string(), None));
            }
        }
    }

    for (name, spec) in &specs {
        let key = format!("{}/{name}", p.ns);
        let a = assigned.get(name).cloned().unwrap_or_default();
        let mut active_elsewhere = 0;
        let mut views = Vec::new();
        let mut active = 0;
        let mut covered = BTreeSet::new();
        for (index, slot) in a.slots.iter().enumerate() {
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            let Some(id) = slot else {
                views.push(instance_view(None, index, None));
                continue;
            };
            let inst = instance(map, *id, &key, index).filter(|_| p.up.contains(id));
            let is_active =
                inst.and_then(|v| v.get("active")).and_then(Value::as_str) == Some("active");
            if is_active {
                active += 1;
                if *id != p.me {
                    active_elsewhere += 1;
                }
            }
            covered.insert((*id, index));
            if *id == p.me && p.mine {
                out.input.desired.push(Desired {
                    ns: p.ns.to_string(),
                    spec: spec.clone(),
                    index,
                });
            }
            views.push(instance_view(inst, index, Some((p.name_of)(*id))));
        }
        // Surplus instances still running where they are no longer assigned.
        let mut fails = BTreeMap::new();
        for id in p.members.iter().filter(|id| p.up.contains(id)) {
            if let Some(per) = report(map, *id)
                .and_then(|r| r.get("instances"))
                .and_then(|i| i.get(&key))
                .and_then(Value::as_object)
            {
                for (idx, v) in per {
                    let Ok(index) = idx.parse::<u32>() else {
                        continue;
                    };
                    if !covered.contains(&(*id, index)) {
                        let mut view = instance_view(Some(v), index, Some((p.name_of)(*id)));
                        view.surplus = true;
                        views.push(view);
                    }
                }
            }
            let f = failures(map, *id, &key);
            if f > 0 {
                fails.insert((p.name_of)(*id), f);
            }
        }
        if p.mine {
            out.input
                .active_elsewhere
                .insert(key.clone(), active_elsewhere);
            out.input.specs.insert(key, spec.clone());
        }
        out.views.push(ServiceView {
            name: name.clone(),
            namespace: p.ns.to_string(),
            count: spec.count,
            kind: match spec.run {
                Run::Unit { .. } => "unit",
                Run::Exec { .. } => "exec",
            }
            .to_string(),
            active,
            instances: views,
            failures: fails,
            spec: spec.clone(),
        });
    }
    out
}

/// `systemd-analyze verify` of an installed unit's text, where the node has it (any output
/// is a failure: unknown keys are only warnings there). Without the tool, the structural checks
/// of [`crate::services::spec::check_unit_text`] stand alone.
pub fn verify_unit(name: &str, text: &str) -> Result<(), String> {
    let Some(tool) = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
    else {
        return Ok(());
    };
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "drop-verify-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot check the unit: {e}"))?;
    let file = dir.join(format!("{name}.service"));
    let out = std::fs::write(&file, text).and_then(|()| {
        std::process::Command::new(tool)
            .arg("verify")
            .arg(&file)
            .env("SYSTEMD_LOG_COLOR", "0")
            .output()
    });
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.map_err(|e| format!("cannot run {tool}: {e}"))?;
    let mut said = String::from_utf8_lossy(&out.stderr).to_string();
    said.push_str(&String::from_utf8_lossy(&out.stdout));
    let said = said.replace(&format!("{}/", dir.display()), "");
    if !out.status.success() || !said.trim().is_empty() {
        return Err(format!("`unit`: systemd-analyze verify: {}", said.trim()));
    }
    Ok(())
}

/// The registry entry's `services` value for a report.
pub fn report_value(r: &crate::services::agent::Report) -> Value {
    serde_json::to_value(r).unwrap_or_else(|_| json!({ "systemd": false }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::state::Hlc;

    fn id(n: u128) -> NodeId {
        NodeId::from_u128(n)
    }

    struct World {
        map: StateMap,
        t: u64,
    }

    impl World {
        fn new() -> World {
            World {
                map: StateMap::new(),
                t: 1,
            }
        }
        fn set(&mut self, k: &str, v: Value) {
            self.t += 1;
            self.map.set(
                k.to_string(),
                v,
                Hlc {
                    wall_ms: self.t,
                    logical: 0,
                    node: id(0),
                },
            );
        }
        fn node(&mut self, n: u128, report: Value) {
            self.set(&format!("reg/{}", id(n)), json!({ "services": report }));
        }
        fn service(&mut self, name: &str, count: u32) {
            let spec = ServiceSpec {
                name: name.into(),
                count,
                balance: None,
                run: Run::Exec {
                    argv: vec!["/bin/sleep".into(), "9".into()],
                    memory_bytes: None,
                    cpu: None,
                    tasks: None,
                    user: None,
                    env: BTreeMap::new(),
                    restart: "on-failure".into(),
                },
            };
            self.set(&spec_key("t", name), serde_json::to_value(spec).unwrap());
        }
        fn run(&self, me: u128, up: &[u128], leading: bool) -> ServicesPass {
            self.run_draining(me, up, leading, &[])
        }
        fn run_draining(
            &self,
            me: u128,
            up: &[u128],
            leading: bool,
            draining: &[u128],
        ) -> ServicesPass {
            let draining: BTreeSet<NodeId> = draining.iter().copied().map(id).collect();
            let members: BTreeSet<NodeId> = (1..=5).map(id).collect();
            let up: BTreeSet<NodeId> = up.iter().copied().map(id).collect();
            let name_of = |i: NodeId| format!("n{}", i.0.as_u128());
            pass(
                &self.map,
                &PassInput {
                    ns: "t",
                    me: id(me),
                    members: &members,
                    up: &up,
                    capacity: &BTreeMap::new(),
                    draining: &draining,
                    leading,
                    mine: true,
                    max_failures: 3,
                    name_of: &name_of,
                },
            )
        }
        fn apply(&mut self, writes: &[(String, Option<Value>)]) {
            for (k, v) in writes {
                self.t += 1;
                match v {
                    Some(v) => self.map.set(
                        k.clone(),
                        v.clone(),
                        Hlc {
                            wall_ms: self.t,
                            logical: 0,
                            node: id(0),
                        },
                    ),
                    None => self.map.delete(
                        k.clone(),
                        Hlc {
                            wall_ms: self.t,
                            logical: 0,
                            node: id(0),
                        },
                    ),
                };
            }
        }
    }

    fn systemd() -> Value {
        json!({ "systemd": true })
    }

    #[test]
    fn only_the_leader_assigns_and_only_nodes_with_systemd_get_instances() {
        let mut w = World::new();
        for n in 1..=4 {
            w.node(n, systemd());
        }
        w.node(5, json!({ "systemd": false }));
        w.service("web", 4);
        assert!(w.run(1, &[1, 2, 3, 4, 5], false).writes.is_empty());
        let p = w.run(1, &[1, 2, 3, 4, 5], true);
        assert_eq!(p.writes.len(), 1);
        w.apply(&p.writes);
        let a = assignment(&w.map, "t", "web");
        assert_eq!(a.slots.len(), 4);
        assert!(!a.slots.contains(&Some(id(5))));
        // Stable: the next pass writes nothing.
        assert!(w.run(1, &[1, 2, 3, 4, 5], true).writes.is_empty());
        // Each node's share is its slots.
        let mine = w.run(2, &[1, 2, 3, 4, 5], false).input.desired;
        assert_eq!(mine.len(), 1);
    }

    #[test]
    fn a_draining_node_gets_no_instance_and_its_own_move_elsewhere() {
        let mut w = World::new();
        for n in 1..=5 {
            w.node(n, systemd());
        }
        w.service("web", 5);
        let p = w.run(1, &[1, 2, 3, 4, 5], true);
        w.apply(&p.writes);
        assert!(assignment(&w.map, "t", "web").slots.contains(&Some(id(3))));
        // Node 3 drains: its slot goes to another node.
        let p = w.run_draining(1, &[1, 2, 3, 4, 5], true, &[3]);
        assert_eq!(p.writes.len(), 1, "the leader reassigns");
        w.apply(&p.writes);
        let a = assignment(&w.map, "t", "web");
        assert_eq!(a.slots.len(), 5);
        assert!(!a.slots.contains(&Some(id(3))), "{:?}", a.slots);
        assert!(a.slots.iter().all(Option::is_some), "{:?}", a.slots);
        // Undrained, spread wins again: one instance per node.
        let p = w.run(1, &[1, 2, 3, 4, 5], true);
        w.apply(&p.writes);
        let a = assignment(&w.map, "t", "web");
        let nodes: BTreeSet<_> = a.slots.iter().flatten().collect();
        assert_eq!(nodes.len(), 5, "{:?}", a.slots);
    }

    #[test]
    fn a_lost_node_is_replaced_and_surplus_sees_the_replacement_active() {
        let mut w = World::new();
        for n in 1..=5 {
            w.node(n, systemd());
        }
        w.service("web", 3);
        let p = w.run(1, &[1, 2, 3, 4, 5], true);
        w.apply(&p.writes);
        let before = assignment(&w.map, "t", "web").slots;
        let lost = before[0].unwrap();
        let up: Vec<u128> = (1..=5).filter(|n| id(*n) != lost).collect();
        let p = w.run(up[0], &up, true);
        w.apply(&p.writes);
        let after = assignment(&w.map, "t", "web").slots;
        assert_ne!(after[0], Some(lost));
        assert_eq!(after[1..], before[1..]);
        // The replacement reports active; the returning node's surplus sees 3 active elsewhere.
        let repl = after[0].unwrap();
        for (i, slot) in after.iter().enumerate() {
            let n = slot.unwrap().0.as_u128();
            let key = format!("reg/{}", id(n));
            let mut inst = w
                .map
                .get(&key)
                .and_then(|r| r.get("services"))
                .and_then(|s| s.get("instances"))
                .cloned()
                .unwrap_or(json!({}));
            inst["t/web"][i.to_string()] = json!({ "active": "active", "sub": "running" });
            w.node(n, json!({ "systemd": true, "instances": inst }));
        }
        let _ = repl;
        let back = w.run(lost.0.as_u128(), &[1, 2, 3, 4, 5], false);
        assert!(back.input.desired.is_empty());
        assert_eq!(back.input.active_elsewhere["t/web"], 3);
    }

    #[test]
    fn repeated_failures_move_the_instance_and_removal_drops_the_assignment() {
        let mut w = World::new();
        for n in 1..=2 {
            w.node(n, systemd());
        }
        w.service("web", 1);
        let p = w.run(1, &[1, 2], true);
        w.apply(&p.writes);
        let on = assignment(&w.map, "t", "web").slots[0].unwrap();
        w.node(
            on.0.as_u128(),
            json!({ "systemd": true, "failures": { "t/web": 3 } }),
        );
        let p = w.run(1, &[1, 2], true);
        w.apply(&p.writes);
        assert_ne!(assignment(&w.map, "t", "web").slots[0], Some(on));
        let view = &w.run(1, &[1, 2], false).views[0];
        assert_eq!(view.failures.values().copied().collect::<Vec<_>>(), vec![3]);

        w.t += 1;
        w.map.delete(
            spec_key("t", "web"),
            Hlc {
                wall_ms: w.t,
                logical: 0,
                node: id(0),
            },
        );
        let p = w.run(1, &[1, 2], true);
        assert_eq!(p.writes, vec![(assignment_key("t", "web"), None)]);
    }
}
