//! Plugins: flows that OS packages install (DESIGN §1: "a flow plus an executable shipped as an
//! OS package that adds a system function").
//!
//! A plugin is a folder `<plugins.dir>/NAME/` (default `/usr/lib/drop/plugins/NAME/`) holding a
//! `flow.yaml` and the executables it runs; the plugin is named after its folder, and folders
//! without a `flow.yaml` (or whose name starts with `.`) are not plugins. The daemon applies
//! every plugin's flow at start — after the operator's persisted flows came back — and on
//! `dropctl plugin reload` (`POST /v1/plugins/reload`), which a plugin package's scriptlets run
//! after it is installed, upgraded or erased.
//!
//! - **Paths.** In a plugin's flow a program named by a relative path (`cmd: ./node-stats`,
//!   `cmd: [bin/stats, -v]`) is the plugin's own: it is resolved against the plugin's folder,
//!   and a pool without `cwd` starts in that folder (so relative arguments and `shell: true`
//!   commands find its files too). A bare name (`python3`) is looked up in `PATH` as in every
//!   flow; a relative path that leaves the folder (`../x`) is an error. A pool with an `image`
//!   keeps its bundle's view and is taken as written.
//! - **Not persisted.** A plugin's flow is never written under `<state>/flows`: the package's
//!   folder is its only source, so removing the package and reloading (or restarting) removes
//!   the flow, and `flow ls` names the plugin of each such flow.
//! - **No silent shadowing.** A flow name belongs to whoever applied it first. A plugin whose
//!   flow has the name of a flow that already runs — an operator's, the cluster's or another
//!   plugin's — is not applied: `plugin ls` shows `conflict`, a warning is logged and a
//!   `failure` event recorded. The operator's `flow apply` or `flow rm` of a plugin's flow is
//!   refused (409 `plugin_flow`), on this node also in cluster mode; a cluster flow of that name
//!   placed here is not run (a `failure` event, and the node reports it failed), the plugin's
//!   keeps running. Operator flows come back before plugins at start, so an operator's flow
//!   keeps its name across restarts.
//! - **Broken plugins** (a `flow.yaml` that does not load: its `file:line:column` error) are
//!   reported and skipped; the other plugins and the daemon go on. A flow the plugin ran before
//!   keeps running until the plugin is fixed or removed.
//! - **Unchanged** plugins (the same `flow.yaml` and the same files) are left alone. When only
//!   the other files changed (an upgraded executable), the flow's pools are restarted.
//!
//! [`discover`] reads the folder; [`prepare`] and [`plan`] are pure; [`Plugins`] runs a pass
//! against the runtime and keeps what `plugin ls` shows.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Component, Path, PathBuf};
use std::sync::{Mutex, RwLock};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::events::{self, Kind};
use crate::runtime::flow::{self, Flow};
use crate::runtime::{Runtime, RuntimeError};

/// The file in a plugin's folder that declares its flow.
pub const FLOW_FILE: &str = "flow.yaml";

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot read the plugins folder {dir} (`[plugins] dir` in the config)")]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What identifies a plugin's files: a change in either part makes the next pass apply it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Fingerprint {
    /// `flow.yaml`'s text.
    pub flow: u64,
    /// Name, size, mode and modification time of every other file directly in the folder.
    pub files: u64,
}

/// A plugin folder as found on disk.
#[derive(Debug, Clone)]
pub struct Found {
    pub name: String,
    pub dir: PathBuf,
    /// `flow.yaml`'s text, or why it cannot be used.
    pub text: Result<String, String>,
    pub fingerprint: Fingerprint,
}

impl Found {
    pub fn flow_file(&self) -> PathBuf {
        self.dir.join(FLOW_FILE)
    }
}

/// Plugin names are folder names: letters, digits, `.`, `_` and `-`, starting with a letter or
/// digit, at most 128 bytes.
fn check_name(name: &str) -> Result<(), String> {
    let ok = (1..=128).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a plugin name: a plugin's folder is named with letters, digits, `.`, \
             `_` and `-`, starting with a letter or digit"
        ))
    }
}

fn hash_of(v: &impl Hash) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// Name, size, mode and mtime of the regular files directly in `dir`, `flow.yaml` left out.
fn files_fingerprint(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let mut files: Vec<(String, u64, u32, i64, i64)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let m = e.path().metadata().ok()?;
            (m.is_file() && name != FLOW_FILE)
                .then(|| (name, m.len(), m.mode(), m.mtime(), m.mtime_nsec()))
        })
        .collect();
    files.sort();
    hash_of(&files)
}

/// The plugin folders under `dir`, in name order. A missing `dir` holds none (a node without
/// plugin packages); one that cannot be listed is an error (nothing is decided then).
pub fn discover(dir: &Path) -> Result<Vec<Found>, PluginError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(PluginError::ReadDir {
                dir: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        // Hidden folders are not plugins (editors' and package managers' leftovers).
        if name.starts_with('.') || !path.is_dir() {
            continue;
        }
        let flow_file = path.join(FLOW_FILE);
        if !flow_file.exists() {
            continue;
        }
        let text = check_name(&name).and_then(|()| {
            std::fs::read_to_string(&flow_file)
                .map_err(|e| format!("cannot read {}: {e}", flow_file.display()))
        });
        let fingerprint = Fingerprint {
            flow: text.as_ref().map(hash_of).unwrap_or_default(),
            files: files_fingerprint(&path),
        };
        found.push(Found {
            name,
            dir: path,
            text,
            fingerprint,
        });
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

/// The plugin's flow, parsed and with its paths resolved against its folder (see the module's
/// documentation), or why it does not load (`file:line:column: key: what`, one line).
pub fn prepare(found: &Found) -> Result<Flow, String> {
    let text = found.text.as_ref().map_err(Clone::clone)?;
    let file = found.flow_file();
    let mut flow = flow::parse_flow(text, &file).map_err(|e| one_line(&e.to_string()))?;
    resolve(&mut flow, &found.dir, &file)?;
    Ok(flow)
}

fn one_line(text: &str) -> String {
    text.lines().collect::<Vec<_>>().join("; ")
}

/// Relative program paths → the plugin's folder; the folder as the working directory of pools
/// without `cwd`. Pools with an `image` are left as written.
pub fn resolve(flow: &mut Flow, dir: &Path, file: &Path) -> Result<(), String> {
    for (i, pool) in flow.pools.iter_mut().enumerate() {
        if pool.image.is_some() {
            continue;
        }
        if let Some(program) = pool.argv.first_mut()
            && !program.starts_with('/')
            && program.contains('/')
        {
            let relative = Path::new(program.as_str());
            if relative
                .components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
            {
                return Err(format!(
                    "{}:{}: func[{i}].cmd: `{program}` leaves the plugin's folder; name a file \
                     inside it (`./{}`), or an absolute path",
                    file.display(),
                    pool.line,
                    pool.name
                ));
            }
            let inside: PathBuf = relative
                .components()
                .filter(|c| matches!(c, Component::Normal(_)))
                .collect();
            *program = dir.join(inside).to_string_lossy().into_owned();
        }
        if pool.cwd.is_none() {
            pool.cwd = Some(dir.to_path_buf());
        }
    }
    Ok(())
}

/// One plugin as [`plan`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    /// Its flow's name, or why its flow does not load.
    pub flow: Result<String, String>,
    pub fingerprint: Fingerprint,
}

/// What a pass does with one plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Apply its flow: new, changed, or not running.
    Apply,
    /// Its flow runs from these very files: leave it alone.
    Keep,
    /// Another flow has its flow's name: not applied (why).
    Conflict(String),
    /// Its flow does not load (why); a flow it ran before keeps running.
    Broken(String),
}

/// A pass, decided.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Per plugin, in the candidates' order.
    pub decisions: Vec<(String, Decision)>,
    /// Plugins' flows to stop: (flow, plugin, why).
    pub remove: Vec<(String, String, String)>,
}

/// Decides a pass. `candidates` are the plugins found, in name order; `running` every flow the
/// runtime runs with the plugin that provides it (`None`: an operator's or the cluster's);
/// `applied` the fingerprint each plugin's running flow was applied from.
///
/// A flow name belongs to whoever runs it: an operator's flow is never shadowed, a plugin's
/// flow stays with its plugin while that plugin still declares it (also while it is broken), and
/// between two new plugins of one flow name the first by name wins.
pub fn plan(
    candidates: &[Candidate],
    running: &BTreeMap<String, Option<String>>,
    applied: &BTreeMap<String, Fingerprint>,
) -> Plan {
    let by_name: BTreeMap<&str, &Candidate> =
        candidates.iter().map(|c| (c.name.as_str(), c)).collect();
    let mut out = Plan::default();
    // Which plugin keeps each name it runs now.
    let mut claims: BTreeMap<&str, &str> = BTreeMap::new();
    for (flow, owner) in running {
        let Some(plugin) = owner.as_deref() else {
            continue;
        };
        match by_name.get(plugin).map(|c| &c.flow) {
            None => out.remove.push((
                flow.clone(),
                plugin.to_string(),
                "the plugin is gone".to_string(),
            )),
            Some(Ok(now)) if now != flow => out.remove.push((
                flow.clone(),
                plugin.to_string(),
                format!("the plugin now declares flow {now}"),
            )),
            Some(_) => {
                claims.insert(flow.as_str(), plugin);
            }
        }
    }
    for c in candidates {
        let decision = match &c.flow {
            Err(why) => Decision::Broken(why.clone()),
            Ok(flow) => match (running.get(flow), claims.get(flow.as_str())) {
                (Some(None), _) => Decision::Conflict(format!(
                    "flow {flow} is an operator's flow (dropctl flow apply, or placed here by the \
                     cluster), so this plugin's flow of that name is not applied: remove one of \
                     them, then run `dropctl plugin reload`"
                )),
                (_, Some(owner)) if *owner != c.name => Decision::Conflict(format!(
                    "plugin {owner} already provides flow {flow}, so this plugin's is not \
                     applied: remove one of the two packages"
                )),
                _ => {
                    claims.insert(flow.as_str(), c.name.as_str());
                    let runs_it = running.get(flow) == Some(&Some(c.name.clone()));
                    if runs_it && applied.get(&c.name) == Some(&c.fingerprint) {
                        Decision::Keep
                    } else {
                        Decision::Apply
                    }
                }
            },
        };
        out.decisions.push((c.name.clone(), decision));
    }
    out
}

/// Whether a plugin's flow runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginState {
    /// Its flow runs.
    Applied,
    /// Its flow does not load, or the runtime refused it.
    Error,
    /// Its flow's name is another flow's: not applied.
    Conflict,
}

/// One plugin, as `plugin ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginStatus {
    pub name: String,
    pub dir: PathBuf,
    /// Its flow's name, when the flow loads.
    pub flow: Option<String>,
    pub state: PluginState,
    /// What is wrong (`error`, `conflict`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The pools its flow declares.
    pub pools: Vec<String>,
}

/// `GET /v1/plugins`: the plugins as of the last pass (at start, or the last reload).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginList {
    pub dir: PathBuf,
    pub enabled: bool,
    /// Why the folder could not be read in the last pass (nothing changed then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub plugins: Vec<PluginStatus>,
}

/// A plugin's flow that a pass stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    pub plugin: String,
    pub flow: String,
    pub reason: String,
}

/// `POST /v1/plugins/reload`: the plugins after the pass, and what it changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    #[serde(flatten)]
    pub list: PluginList,
    /// Plugins whose flow was applied (new or changed).
    pub applied: Vec<String>,
    /// Plugins whose flow runs from the same files as before: left alone.
    pub unchanged: Vec<String>,
    pub removed: Vec<Removed>,
}

/// This node's plugins: the passes and what the last one found.
#[derive(Debug)]
pub struct Plugins {
    dir: PathBuf,
    enabled: bool,
    /// Held for a whole pass, so two never interleave: the fingerprint each plugin's running
    /// flow was applied from.
    pass: Mutex<BTreeMap<String, Fingerprint>>,
    view: RwLock<PluginList>,
}

impl Plugins {
    pub fn new(dir: PathBuf, enabled: bool) -> Plugins {
        let view = PluginList {
            dir: dir.clone(),
            enabled,
            error: None,
            plugins: Vec::new(),
        };
        Plugins {
            dir,
            enabled,
            pass: Mutex::new(BTreeMap::new()),
            view: RwLock::new(view),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// What the last pass found.
    pub fn list(&self) -> PluginList {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// One pass over the plugins folder: applies new and changed plugins' flows, stops those of
    /// plugins that are gone, leaves unchanged ones alone, reports conflicts and broken plugins.
    /// Blocking (pools start and stop).
    pub fn reload(&self, rt: &Runtime) -> ReloadReport {
        let mut applied = self.pass.lock().unwrap_or_else(|e| e.into_inner());
        let before = self.list();
        let mut report = ReloadReport {
            list: PluginList {
                dir: self.dir.clone(),
                enabled: self.enabled,
                ..PluginList::default()
            },
            ..ReloadReport::default()
        };
        let found = if self.enabled {
            match discover(&self.dir) {
                Ok(found) => found,
                Err(e) => {
                    let msg = crate::runtime::error_chain(&e);
                    warn!(error = %msg, "plugins not reloaded");
                    if before.error.as_deref() != Some(msg.as_str()) {
                        events::record(
                            Kind::Failure,
                            "plugins",
                            format!("plugins not reloaded: {msg}"),
                        );
                    }
                    report.list = PluginList {
                        error: Some(msg),
                        ..before
                    };
                    *self.view.write().unwrap_or_else(|e| e.into_inner()) = report.list.clone();
                    return report;
                }
            }
        } else {
            Vec::new()
        };
        let prepared: Vec<Result<Flow, String>> = found.iter().map(prepare).collect();
        let candidates: Vec<Candidate> = found
            .iter()
            .zip(&prepared)
            .map(|(f, p)| Candidate {
                name: f.name.clone(),
                flow: p
                    .as_ref()
                    .map(|flow| flow.name.clone())
                    .map_err(Clone::clone),
                fingerprint: f.fingerprint,
            })
            .collect();
        let running = rt.flow_origins();
        let plan = plan(&candidates, &running, &applied);

        for (flow, plugin, reason) in plan.remove {
            match rt.remove_plugin_flow(&flow, &plugin) {
                Ok(r) => {
                    info!(%plugin, %flow, %reason, stopped = ?r.stopped, "plugin flow stopped");
                    events::record(
                        Kind::Placement,
                        &plugin,
                        format!("plugin {plugin}: flow {flow} stopped ({reason})"),
                    );
                    applied.remove(&plugin);
                    report.removed.push(Removed {
                        plugin,
                        flow,
                        reason,
                    });
                }
                Err(e) => warn!(%plugin, %flow, error = %e, "cannot stop a plugin's flow"),
            }
        }

        for ((found, prepared), (_, decision)) in found.iter().zip(prepared).zip(plan.decisions) {
            let name = found.name.clone();
            let declared = |flow: &Flow| -> Vec<String> {
                flow.pools.iter().map(|p| p.name.clone()).collect()
            };
            let mut status = PluginStatus {
                name: name.clone(),
                dir: found.dir.clone(),
                flow: prepared.as_ref().ok().map(|f| f.name.clone()),
                state: PluginState::Applied,
                message: None,
                pools: prepared.as_ref().map(declared).unwrap_or_default(),
            };
            match (decision, prepared) {
                (Decision::Keep, _) => report.unchanged.push(name.clone()),
                (Decision::Apply, Ok(flow)) => {
                    let flow_name = flow.name.clone();
                    let text = found.text.as_deref().unwrap_or_default();
                    // Files other than flow.yaml changed under a running flow: an upgraded
                    // executable, which the pools' definitions cannot show.
                    let files_changed = running.get(&flow_name) == Some(&Some(name.clone()))
                        && applied
                            .get(&name)
                            .is_some_and(|fp| fp.files != found.fingerprint.files);
                    match rt.apply_plugin(flow, text, &name) {
                        Ok(r) => {
                            let mut restarted = r.restarted.clone();
                            if files_changed {
                                for pool in r.unchanged.iter().chain(&r.retried) {
                                    match rt.restart_pool(pool) {
                                        Ok(_) => restarted.push(pool.clone()),
                                        Err(e) => {
                                            warn!(%pool, error = %e, "cannot restart a plugin's pool")
                                        }
                                    }
                                }
                            }
                            info!(plugin = %name, flow = %flow_name, started = ?r.started, restarted = ?restarted, stopped = ?r.stopped, "plugin flow applied");
                            events::record(
                                Kind::Placement,
                                &name,
                                format!(
                                    "plugin {name}: flow {flow_name} applied ({} pools started, {} restarted, {} stopped)",
                                    r.started.len(),
                                    restarted.len(),
                                    r.stopped.len()
                                ),
                            );
                            applied.insert(name.clone(), found.fingerprint);
                            report.applied.push(name.clone());
                        }
                        Err(e) => {
                            status.state = match e {
                                RuntimeError::FlowTaken { .. }
                                | RuntimeError::PoolConflict { .. } => PluginState::Conflict,
                                _ => PluginState::Error,
                            };
                            status.message = Some(one_line(&crate::runtime::error_chain(&e)));
                        }
                    }
                }
                (Decision::Apply, Err(why)) | (Decision::Broken(why), _) => {
                    status.state = PluginState::Error;
                    let still = rt
                        .flows()
                        .into_iter()
                        .find(|f| f.plugin.as_deref() == Some(name.as_str()));
                    status.message = Some(match still {
                        Some(f) => {
                            let msg = format!(
                                "{why} (the flow it ran before, {}, keeps running)",
                                f.name
                            );
                            status.flow = Some(f.name);
                            status.pools = f.pools;
                            msg
                        }
                        None => why,
                    });
                }
                (Decision::Conflict(why), _) => {
                    status.state = PluginState::Conflict;
                    status.message = Some(why);
                }
            }
            if let Some(message) = &status.message {
                let word = match status.state {
                    PluginState::Conflict => "conflict",
                    _ => "error",
                };
                warn!(plugin = %name, state = word, reason = %message, "plugin not applied");
                let seen = before.plugins.iter().any(|p| {
                    p.name == name && p.state == status.state && p.message == status.message
                });
                if !seen {
                    events::record(
                        Kind::Failure,
                        &name,
                        format!("plugin {name} not applied ({word}): {message}"),
                    );
                }
            }
            report.list.plugins.push(status);
        }
        let origins = rt.flow_origins();
        applied.retain(|plugin, _| origins.values().any(|o| o.as_deref() == Some(plugin)));
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = report.list.clone();
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::PoolLookup as _;

    fn fp(n: u64) -> Fingerprint {
        Fingerprint { flow: n, files: n }
    }

    fn cand(name: &str, flow: Result<&str, &str>, n: u64) -> Candidate {
        Candidate {
            name: name.into(),
            flow: flow.map(str::to_string).map_err(str::to_string),
            fingerprint: fp(n),
        }
    }

    fn running(pairs: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<String>> {
        pairs
            .iter()
            .map(|(f, p)| (f.to_string(), p.map(str::to_string)))
            .collect()
    }

    fn decisions(plan: &Plan) -> Vec<(&str, &Decision)> {
        plan.decisions
            .iter()
            .map(|(n, d)| (n.as_str(), d))
            .collect()
    }

    #[test]
    fn new_plugins_apply_and_unchanged_ones_are_kept() {
        let c = [cand("a", Ok("fa"), 1), cand("b", Ok("fb"), 2)];
        let p = plan(&c, &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(
            decisions(&p),
            [("a", &Decision::Apply), ("b", &Decision::Apply)]
        );
        assert!(p.remove.is_empty());

        let run = running(&[("fa", Some("a")), ("fb", Some("b"))]);
        let applied: BTreeMap<String, Fingerprint> =
            [("a".to_string(), fp(1)), ("b".to_string(), fp(9))].into();
        let p = plan(&c, &run, &applied);
        assert_eq!(
            decisions(&p),
            [("a", &Decision::Keep), ("b", &Decision::Apply)],
            "b's files changed"
        );
    }

    #[test]
    fn an_operators_flow_is_never_shadowed() {
        let c = [cand("stats", Ok("echo"), 1)];
        let p = plan(&c, &running(&[("echo", None)]), &BTreeMap::new());
        match &p.decisions[0].1 {
            Decision::Conflict(why) => {
                assert!(
                    why.contains("operator's flow") && why.contains("echo"),
                    "{why}"
                )
            }
            d => panic!("{d:?}"),
        }
        assert!(p.remove.is_empty(), "the operator's flow stays");
    }

    #[test]
    fn gone_and_renamed_plugins_lose_their_flows_and_broken_ones_keep_theirs() {
        let run = running(&[
            ("old", Some("gone")),
            ("f1", Some("renamed")),
            ("fb", Some("broken")),
            ("op", None),
        ]);
        let c = [
            cand("broken", Err("flow.yaml:3:5: func[0].nmu: unknown key"), 3),
            cand("renamed", Ok("f2"), 2),
        ];
        let p = plan(&c, &run, &BTreeMap::new());
        assert_eq!(
            p.remove,
            [
                (
                    "f1".to_string(),
                    "renamed".to_string(),
                    "the plugin now declares flow f2".to_string()
                ),
                (
                    "old".to_string(),
                    "gone".to_string(),
                    "the plugin is gone".to_string()
                ),
            ]
        );
        assert_eq!(
            decisions(&p),
            [
                (
                    "broken",
                    &Decision::Broken("flow.yaml:3:5: func[0].nmu: unknown key".into())
                ),
                ("renamed", &Decision::Apply),
            ]
        );
    }

    #[test]
    fn two_plugins_of_one_flow_name_the_running_one_keeps_it_else_the_first_by_name() {
        let c = [cand("a", Ok("same"), 1), cand("b", Ok("same"), 2)];
        let p = plan(&c, &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(p.decisions[0].1, Decision::Apply);
        assert!(
            matches!(&p.decisions[1].1, Decision::Conflict(w) if w.contains("plugin a already provides flow same")),
            "{p:?}"
        );
        // b ran it first: it keeps it, a conflicts.
        let applied = [("b".to_string(), fp(2))].into();
        let p = plan(&c, &running(&[("same", Some("b"))]), &applied);
        assert!(
            matches!(&p.decisions[0].1, Decision::Conflict(w) if w.contains("plugin b")),
            "{p:?}"
        );
        assert_eq!(p.decisions[1].1, Decision::Keep);
        // A broken plugin keeps the name of the flow it still runs.
        let c = [cand("a", Ok("same"), 1), cand("b", Err("bad"), 2)];
        let p = plan(&c, &running(&[("same", Some("b"))]), &applied);
        assert!(matches!(&p.decisions[0].1, Decision::Conflict(_)), "{p:?}");
        assert!(p.remove.is_empty());
    }

    fn pids(rt: &Runtime, pool: &str) -> Vec<u32> {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let p = rt.pool_status(pool).unwrap().pids;
            if !p.is_empty() || std::time::Instant::now() > until {
                return p;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn a_pass_applies_keeps_restarts_refuses_and_removes_through_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let plugins_dir = dir.path().join("plugins");
        let (_tokio, rt) = crate::runtime::test_runtime(dir.path());
        write(
            &plugins_dir.join("cat/flow.yaml"),
            "name: catflow\nfunc:\n  - name: catpool\n    cmd: [/bin/cat]\n",
        );
        write(&plugins_dir.join("cat/helper"), "v1");
        let plugins = Plugins::new(plugins_dir.clone(), true);
        let r = plugins.reload(&rt);
        assert_eq!(r.applied, ["cat"]);
        assert_eq!(r.list.plugins[0].state, PluginState::Applied);
        assert_eq!(r.list.plugins[0].pools, ["catpool"]);
        assert!(
            !dir.path().join("state/flows/catflow.yaml").exists(),
            "a plugin's flow is not persisted"
        );
        assert_eq!(rt.flows()[0].plugin.as_deref(), Some("cat"));
        assert!(rt.flow_sources().is_empty(), "the cluster never sees it");
        let first = pids(&rt, "catpool");

        // Unchanged: left alone (same worker).
        let r = plugins.reload(&rt);
        assert_eq!(r.unchanged, ["cat"]);
        assert_eq!(pids(&rt, "catpool"), first);

        // The operator cannot replace or remove it.
        let e = rt
            .apply(
                "name: catflow\nfunc:\n  - name: other\n    cmd: [/bin/cat]\n",
                Path::new("mine.yaml"),
            )
            .unwrap_err();
        assert!(matches!(e, RuntimeError::PluginFlow { .. }), "{e}");
        assert_eq!(crate::error::ApiError::from(&e).code, "plugin_flow");
        assert!(matches!(
            rt.remove("catflow"),
            Err(RuntimeError::PluginFlow { .. })
        ));

        // A new executable under the same flow: its pools restart.
        std::thread::sleep(std::time::Duration::from_millis(20));
        write(&plugins_dir.join("cat/helper"), "v2, longer");
        let r = plugins.reload(&rt);
        assert_eq!(r.applied, ["cat"]);
        assert_ne!(pids(&rt, "catpool"), first, "restarted for its new files");

        // An operator's flow keeps its name: the plugin that wants it conflicts.
        rt.apply(
            "name: mine\nfunc:\n  - name: minepool\n    cmd: [/bin/cat]\n",
            Path::new("mine.yaml"),
        )
        .unwrap();
        write(
            &plugins_dir.join("shadow/flow.yaml"),
            "name: mine\nfunc:\n  - name: shadowpool\n    cmd: [/bin/cat]\n",
        );
        let r = plugins.reload(&rt);
        let shadow = r.list.plugins.iter().find(|p| p.name == "shadow").unwrap();
        assert_eq!(shadow.state, PluginState::Conflict, "{shadow:?}");
        assert!(rt.pool("minepool").is_some() && rt.pool("shadowpool").is_none());
        let events = events::log().recent(events::CAPACITY);
        assert!(
            events
                .iter()
                .any(|e| e.subject == "shadow" && e.text.contains("not applied (conflict)")),
            "{events:?}"
        );

        // Gone: its flow stops; the operator's stays.
        std::fs::remove_dir_all(plugins_dir.join("cat")).unwrap();
        let r = plugins.reload(&rt);
        assert_eq!(r.removed.len(), 1, "{r:?}");
        assert_eq!(
            (r.removed[0].plugin.as_str(), r.removed[0].flow.as_str()),
            ("cat", "catflow")
        );
        assert!(rt.pool("catpool").is_none() && rt.pool("minepool").is_some());
        assert_eq!(plugins.list().plugins.len(), 1);
    }

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn discovery_finds_folders_with_a_flow_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(
            &d.join("zeta/flow.yaml"),
            "name: z\nfunc:\n  - name: z\n    cmd: ./z\n",
        );
        write(
            &d.join("alpha/flow.yaml"),
            "name: a\nfunc:\n  - name: a\n    cmd: cat\n",
        );
        write(&d.join("empty/README"), "no flow here");
        write(&d.join(".hidden/flow.yaml"), "name: h\n");
        write(&d.join("bad name/flow.yaml"), "name: b\n");
        write(&d.join("README"), "a file, not a plugin");
        let found = discover(d).unwrap();
        let names: Vec<&str> = found.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["alpha", "bad name", "zeta"]);
        assert!(found[0].text.is_ok() && found[2].text.is_ok());
        assert!(
            found[1]
                .text
                .as_ref()
                .is_err_and(|e| e.contains("not a plugin name")),
            "{:?}",
            found[1].text
        );
        assert!(discover(&d.join("missing")).unwrap().is_empty());
        // The fingerprint follows flow.yaml and the other files.
        let before = found[2].fingerprint;
        write(&d.join("zeta/z"), "#!/bin/sh\n");
        let after = discover(d).unwrap()[2].fingerprint;
        assert_eq!(before.flow, after.flow);
        assert_ne!(before.files, after.files);
    }

    #[test]
    fn relative_programs_are_the_plugins_own_and_broken_flows_name_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(
            &d.join("stats/flow.yaml"),
            "name: stats\nfunc:\n  - name: s_stream\n    cmd: ./bin/stats -v ./x\n  \
             - name: t\n    cmd: cat\n    cwd: /tmp\n  - name: u\n    cmd: ./u\n    shell: true\n",
        );
        write(
            &d.join("broken/flow.yaml"),
            "name: broken\nfunc:\n  - name: b\n    cmd: cat\n    nmu: 2\n",
        );
        write(
            &d.join("escape/flow.yaml"),
            "name: escape\nfunc:\n  - name: e\n    cmd: ../other/x\n",
        );
        let found = discover(d).unwrap();
        let get = |n: &str| found.iter().find(|f| f.name == n).unwrap();
        let stats_dir = d.join("stats");
        let flow = prepare(get("stats")).unwrap();
        assert_eq!(
            flow.pools[0].argv,
            [stats_dir.join("bin/stats").to_str().unwrap(), "-v", "./x"]
        );
        assert_eq!(flow.pools[0].cwd.as_deref(), Some(stats_dir.as_path()));
        assert_eq!(flow.pools[1].argv, ["cat"], "a bare name is PATH's");
        assert_eq!(flow.pools[1].cwd.as_deref(), Some(Path::new("/tmp")));
        assert_eq!(flow.pools[2].argv, ["/bin/sh", "-c", "./u"]);
        assert_eq!(
            flow.pools[2].cwd.as_deref(),
            Some(stats_dir.as_path()),
            "the shell starts in the folder"
        );
        let err = prepare(get("broken")).unwrap_err();
        assert!(
            err.contains("broken/flow.yaml:5:5") && err.contains("func[0].nmu"),
            "{err}"
        );
        let err = prepare(get("escape")).unwrap_err();
        assert!(
            err.contains("escape/flow.yaml:3: func[0].cmd") && err.contains("leaves"),
            "{err}"
        );
    }
}
