//! The node side of services: make this node's systemd run exactly its share.
//!
//! The cluster hands the agent, after every pass, the instances assigned here and how many of
//! each service are active where they are assigned elsewhere ([`ServicesInput`]). The agent lists
//! its own units (`drop-svc.*`) — which is also how a restarted daemon adopts the units it
//! started before (they are systemd's, not its children) — decides with [`decide`], acts, and
//! reports every instance's state for the node's registry entry. It wakes on a new input and on
//! systemd's `PropertiesChanged` signals of its units, never on a polling timer (one slow
//! resync is the safety net for a lost bus message).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use super::spec::{self, Run, ServiceSpec, UNIT_PREFIX};
use crate::host::systemd::{Systemd, SystemdError, UnitInfo};

/// One instance assigned to this node.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub ns: String,
    pub spec: ServiceSpec,
    pub index: u32,
}

impl Desired {
    pub fn unit(&self) -> String {
        self.spec.unit(&self.ns, self.index)
    }
}

/// What the cluster asks of this node after a pass.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServicesInput {
    /// Whether the input comes from a real pass (before the first one, the agent only lists
    /// and reports: a restarted daemon must not stop what it has not yet been told about).
    pub ready: bool,
    /// The instances assigned here.
    pub desired: Vec<Desired>,
    /// Every stored service of this node's namespace(s): `ns/name` → spec.
    pub specs: BTreeMap<String, ServiceSpec>,
    /// `ns/name` → active instances on the other nodes they are assigned to.
    pub active_elsewhere: BTreeMap<String, u32>,
}

/// What the agent does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Start(Desired),
    /// Runs another version: stop, then start.
    Replace(Desired),
    /// Surplus or unwanted, and allowed to go.
    Stop(String),
    /// Failed or dead leftovers: forget them.
    Clean(String),
}

/// How an instance is reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceReport {
    pub active: String,
    pub sub: String,
    pub since_ms: u64,
    pub restarts: u32,
    /// Not assigned here any more; waiting for its replacement to be active.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub surplus: bool,
}

/// The agent's report, part of the node's registry entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Report {
    /// Whether this node's systemd answers.
    pub systemd: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `ns/name` → instance index → state.
    pub instances: BTreeMap<String, BTreeMap<u32, InstanceReport>>,
    /// `ns/name` → failures seen here for the current version (the leader places elsewhere
    /// after `max_failures`).
    pub failures: BTreeMap<String, u32>,
}

fn is_up(active: &str) -> bool {
    matches!(
        active,
        "active" | "activating" | "reloading" | "deactivating"
    )
}

/// The pure decision: desired share, the units found, and what is active elsewhere → actions.
///
/// - A desired instance that is not running is started; one that runs another version is
///   replaced. One that failed `max_failures` times here is left for the leader to move.
/// - A unit here that is not desired is stopped at once if it is not running, if its service is
///   gone, or if its index is beyond the count. Otherwise it is surplus and is stopped only once
///   the count of its service is active where it is assigned (make-before-break).
pub fn decide(
    input: &ServicesInput,
    local: &[UnitInfo],
    failures: &BTreeMap<String, u32>,
    max_failures: u32,
) -> Vec<Action> {
    let mut actions = Vec::new();
    if !input.ready {
        return actions;
    }
    let by_unit: BTreeMap<&str, &UnitInfo> =
        local.iter().map(|u| (u.state.unit.as_str(), u)).collect();
    let mut wanted = BTreeSet::new();
    for d in &input.desired {
        let unit = d.unit();
        let key = format!("{}/{}", d.ns, d.spec.name);
        wanted.insert(unit.clone());
        match by_unit.get(unit.as_str()) {
            Some(u) if is_up(&u.state.active) => {
                if spec::digest_of(&u.description) != Some(d.spec.digest().as_str()) {
                    actions.push(Action::Replace(d.clone()));
                }
            }
            Some(u) if u.state.active == "failed" => {
                if failures.get(&key).copied().unwrap_or(0) < max_failures {
                    actions.push(Action::Start(d.clone()));
                }
            }
            _ => actions.push(Action::Start(d.clone())),
        }
    }
    for u in local {
        let unit = u.state.unit.as_str();
        if wanted.contains(unit) {
            continue;
        }
        let Some((ns, name, index)) = spec::parse_unit(unit) else {
            continue;
        };
        if !is_up(&u.state.active) {
            if u.state.active == "failed" || u.state.load != "loaded" {
                actions.push(Action::Clean(unit.to_string()));
            }
            continue;
        }
        let key = format!("{ns}/{name}");
        let keep = match input.specs.get(&key) {
            None => false,
            Some(s) if index >= s.count => false,
            Some(s) => input.active_elsewhere.get(&key).copied().unwrap_or(0) < s.count,
        };
        if !keep {
            actions.push(Action::Stop(unit.to_string()));
        }
    }
    actions
}

/// Settings of the agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where installed units' templates are written (systemd's runtime unit folder).
    pub unit_dir: PathBuf,
    pub max_failures: u32,
}

/// A handle on the running agent.
#[derive(Debug)]
pub struct Agent {
    input: watch::Sender<ServicesInput>,
    /// `None` until the first answer from systemd (or the first failure to reach it): a
    /// restarted daemon keeps its previous report meanwhile, so the leader does not move its
    /// instances away for a moment of not knowing.
    report: Arc<Mutex<Option<Report>>>,
}

impl Agent {
    /// Starts the agent on `connect`'s systemd; `changed` is poked whenever the report changes
    /// (the cluster then writes the registry entry).
    pub fn start<S, F, Fut>(connect: F, config: AgentConfig, changed: Arc<Notify>) -> Agent
    where
        S: Systemd + 'static,
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Result<S, SystemdError>> + Send + 'static,
    {
        let (tx, rx) = watch::channel(ServicesInput::default());
        let report = Arc::new(Mutex::new(None));
        tokio::spawn(run(connect, config, rx, report.clone(), changed));
        Agent { input: tx, report }
    }

    pub fn update(&self, input: ServicesInput) {
        self.input.send_if_modified(|old| {
            if *old == input {
                false
            } else {
                *old = input;
                true
            }
        });
    }

    pub fn report(&self) -> Option<Report> {
        self.report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// How often the agent re-reads everything even without a signal.
const RESYNC: Duration = Duration::from_secs(10);
/// How long one systemd job may take before the agent moves on.
const JOB_TIMEOUT: Duration = Duration::from_secs(30);

async fn run<S, F, Fut>(
    connect: F,
    config: AgentConfig,
    mut input: watch::Receiver<ServicesInput>,
    report: Arc<Mutex<Option<Report>>>,
    changed: Arc<Notify>,
) where
    S: Systemd + 'static,
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = Result<S, SystemdError>> + Send + 'static,
{
    let mut backoff = Duration::from_millis(500);
    let mut warned = false;
    let set_report = |r: Report| {
        let mut cur = report.lock().unwrap_or_else(|e| e.into_inner());
        if cur.as_ref() != Some(&r) {
            *cur = Some(r);
            changed.notify_one();
        }
    };
    loop {
        let sd = match connect().await {
            Ok(sd) => sd,
            Err(e) => {
                // Once per outage: a node without systemd says so, then stays quiet.
                if !warned {
                    warn!(error = %e, "services: systemd does not answer; this node runs no service instances until it does");
                    warned = true;
                }
                set_report(Report {
                    systemd: false,
                    error: Some(e.to_string()),
                    ..Report::default()
                });
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        backoff = Duration::from_millis(500);
        warned = false;
        let mut changes = match sd.changes(UNIT_PREFIX).await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "services: cannot subscribe to unit changes; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // Drained on a task of its own, always: a full signal queue would hold up the bus
        // connection (and so the replies to the agent's own jobs). A burst is one wake-up.
        let touched = Arc::new(Notify::new());
        let t = touched.clone();
        let (ended, mut closed) = tokio::sync::oneshot::channel::<()>();
        let drain = tokio::spawn(async move {
            while changes.next().await.is_some() {
                t.notify_one();
            }
            drop(ended);
        });
        let mut node = NodeState::default();
        info!("services: connected to systemd");
        loop {
            let current = input.borrow_and_update().clone();
            match node.pass(&sd, &config, &current).await {
                Ok(r) => set_report(r),
                Err(e) => {
                    warn!(error = %e, "services: pass failed; reconnecting");
                    break;
                }
            }
            tokio::select! {
                r = input.changed() => if r.is_err() { drain.abort(); return },
                () = touched.notified() => {}
                _ = &mut closed => break,
                () = tokio::time::sleep(RESYNC) => {}
            }
            // Let a burst of signals (a job touches several properties) settle into one pass.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drain.abort();
    }
}

/// What the agent remembers between passes.
#[derive(Debug, Default)]
struct NodeState {
    /// `ns/name` → (digest, failures counted, restarts last seen per unit, units seen failed).
    failures: BTreeMap<String, Failures>,
    /// Template files written: file name → text.
    templates: BTreeMap<String, String>,
}

#[derive(Debug, Default)]
struct Failures {
    digest: String,
    count: u32,
    restarts: BTreeMap<String, u32>,
    failed: BTreeSet<String>,
}

impl NodeState {
    async fn pass<S: Systemd>(
        &mut self,
        sd: &S,
        config: &AgentConfig,
        input: &ServicesInput,
    ) -> Result<Report, SystemdError> {
        let local = sd.list(UNIT_PREFIX).await?;
        self.count_failures(&local, input);
        let failures: BTreeMap<String, u32> = self
            .failures
            .iter()
            .map(|(k, f)| (k.clone(), f.count))
            .collect();
        let actions = decide(input, &local, &failures, config.max_failures);
        if !actions.is_empty() {
            self.write_templates(sd, config, input).await;
            let jobs = actions.into_iter().map(|a| act(sd, a));
            // Bounded concurrency: systemd runs jobs in parallel, the bus stays responsive.
            futures_util::stream::iter(jobs)
                .buffer_unordered(32)
                .collect::<Vec<()>>()
                .await;
        } else if input.ready {
            self.write_templates(sd, config, input).await;
        }
        let local = sd.list(UNIT_PREFIX).await?;
        Ok(self.report(&local, input))
    }

    /// Counts a failure per unit that entered `failed` and per restart systemd made.
    fn count_failures(&mut self, local: &[UnitInfo], input: &ServicesInput) {
        for u in local {
            let Some((ns, name, _)) = spec::parse_unit(&u.state.unit) else {
                continue;
            };
            let key = format!("{ns}/{name}");
            let digest = spec::digest_of(&u.description).unwrap_or("").to_string();
            if input.specs.get(&key).is_some_and(|s| s.digest() != digest) {
                continue;
            }
            let f = self.failures.entry(key.clone()).or_default();
            if f.digest != digest {
                *f = Failures {
                    digest,
                    ..Failures::default()
                };
            }
            let before = f.restarts.insert(u.state.unit.clone(), u.restarts);
            if let Some(b) = before
                && u.restarts > b
            {
                f.count += u.restarts - b;
                crate::events::record(
                    crate::events::Kind::Restart,
                    &key,
                    format!(
                        "{} restarted by systemd ({} restarts)",
                        u.state.unit, u.restarts
                    ),
                );
            }
            if u.state.active == "failed" {
                if f.failed.insert(u.state.unit.clone()) {
                    f.count += 1;
                    warn!(unit = %u.state.unit, failures = f.count, "service instance failed");
                    crate::events::record(
                        crate::events::Kind::Failure,
                        &key,
                        format!("{} failed (failure {} here)", u.state.unit, f.count),
                    );
                }
            } else if is_up(&u.state.active) {
                f.failed.remove(&u.state.unit);
            }
        }
        self.failures
            .retain(|k, _| input.specs.contains_key(k) || !input.ready);
    }

    /// Writes (or removes) the templates of installed-unit services this node runs; reloads
    /// systemd when a file changed.
    async fn write_templates<S: Systemd>(
        &mut self,
        sd: &S,
        config: &AgentConfig,
        input: &ServicesInput,
    ) {
        let mut want: BTreeMap<String, String> = BTreeMap::new();
        for d in &input.desired {
            if let Some(text) = d.spec.template_text(&d.ns) {
                want.insert(spec::template_name(&d.ns, &d.spec.name), text);
            }
        }
        // Keep templates of services that still exist (surplus instances still use them).
        let keep: BTreeSet<String> = input
            .specs
            .iter()
            .filter(|(_, s)| matches!(s.run, Run::Unit { .. }))
            .filter_map(|(k, s)| {
                let (ns, _) = k.split_once('/')?;
                Some(spec::template_name(ns, &s.name))
            })
            .collect();
        let mut dirty = false;
        for (file, text) in &want {
            let path = config.unit_dir.join(file);
            let on_disk = std::fs::read_to_string(&path).ok();
            if on_disk.as_deref() != Some(text.as_str()) {
                if let Err(e) = crate::host::state::write_atomic(&path, text.as_bytes()) {
                    warn!(path = %path.display(), error = %e, "services: cannot write a unit template");
                    continue;
                }
                dirty = true;
            }
            self.templates.insert(file.clone(), text.clone());
        }
        if let Ok(dir) = std::fs::read_dir(&config.unit_dir) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if name.starts_with(UNIT_PREFIX)
                    && name.ends_with("@.service")
                    && !want.contains_key(&name)
                    && !keep.contains(&name)
                {
                    let _ = std::fs::remove_file(entry.path());
                    self.templates.remove(&name);
                    dirty = true;
                }
            }
        }
        if dirty && let Err(e) = sd.reload().await {
            warn!(error = %e, "services: daemon-reload failed");
        }
    }

    fn report(&self, local: &[UnitInfo], input: &ServicesInput) -> Report {
        let wanted: BTreeSet<String> = input.desired.iter().map(Desired::unit).collect();
        let mut instances: BTreeMap<String, BTreeMap<u32, InstanceReport>> = BTreeMap::new();
        for u in local {
            let Some((ns, name, index)) = spec::parse_unit(&u.state.unit) else {
                continue;
            };
            let key = format!("{ns}/{name}");
            // Another version still running (being replaced) is not this version's instance.
            let current = input
                .specs
                .get(&key)
                .is_none_or(|s| spec::digest_of(&u.description) == Some(s.digest().as_str()));
            if !current {
                continue;
            }
            instances.entry(key).or_default().insert(
                index,
                InstanceReport {
                    active: u.state.active.clone(),
                    sub: u.state.sub.clone(),
                    since_ms: u.since_ms,
                    restarts: u.restarts,
                    surplus: input.ready && !wanted.contains(&u.state.unit),
                },
            );
        }
        Report {
            systemd: true,
            error: None,
            instances,
            failures: self
                .failures
                .iter()
                .filter(|(_, f)| f.count > 0)
                .map(|(k, f)| (k.clone(), f.count))
                .collect(),
        }
    }
}

async fn act<S: Systemd>(sd: &S, action: Action) {
    let result = match &action {
        Action::Start(d) => with_timeout(start(sd, d)).await,
        Action::Replace(d) => {
            info!(unit = %d.unit(), "services: replacing an instance that runs another version");
            match with_timeout(sd.stop(&d.unit())).await {
                Ok(()) => with_timeout(start(sd, d)).await,
                Err(e) => Err(e),
            }
        }
        Action::Stop(unit) => {
            info!(%unit, "services: stopping an instance not placed here");
            with_timeout(sd.stop(unit)).await
        }
        Action::Clean(unit) => sd.reset_failed(unit).await,
    };
    if let Err(e) = result {
        warn!(?action, error = %e, "services: action failed");
    }
}

async fn start<S: Systemd>(sd: &S, d: &Desired) -> Result<(), SystemdError> {
    let unit = d.unit();
    // A failed unit of the same name is forgotten first (a transient one could not be
    // created again otherwise).
    sd.reset_failed(&unit).await?;
    let result = match d.spec.transient(&d.ns, d.index) {
        Some(t) => sd.start_transient(&t).await,
        None => sd.start(&unit).await,
    };
    if result.is_ok() {
        info!(%unit, "services: instance started");
    }
    result
}

async fn with_timeout(
    f: impl Future<Output = Result<(), SystemdError>>,
) -> Result<(), SystemdError> {
    tokio::time::timeout(JOB_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| Err(SystemdError::StreamEnded("a job (timed out)".into())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::systemd::{TransientSpec, UnitState};

    fn svc(name: &str, count: u32) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            count,
            balance: None,
            run: Run::Exec {
                argv: vec!["/bin/sleep".into(), "1000".into()],
                memory_bytes: None,
                cpu: None,
                tasks: None,
                user: None,
                env: BTreeMap::new(),
                restart: "on-failure".into(),
            },
        }
    }

    fn unit(s: &ServiceSpec, index: u32, active: &str) -> UnitInfo {
        UnitInfo {
            state: UnitState {
                unit: s.unit("t", index),
                load: "loaded".into(),
                active: active.into(),
                sub: if active == "active" {
                    "running"
                } else {
                    "dead"
                }
                .into(),
            },
            description: s.description("t"),
            since_ms: 1,
            restarts: 0,
        }
    }

    fn input(desired: &[(&ServiceSpec, u32)], specs: &[&ServiceSpec]) -> ServicesInput {
        ServicesInput {
            ready: true,
            desired: desired
                .iter()
                .map(|(s, i)| Desired {
                    ns: "t".into(),
                    spec: (*s).clone(),
                    index: *i,
                })
                .collect(),
            specs: specs
                .iter()
                .map(|s| (format!("t/{}", s.name), (*s).clone()))
                .collect(),
            active_elsewhere: BTreeMap::new(),
        }
    }

    #[test]
    fn starts_what_is_missing_and_adopts_what_runs() {
        let web = svc("web", 3);
        let inp = input(&[(&web, 0), (&web, 2)], &[&web]);
        // After a daemon restart, instance 0 is still active: adopted, not started again.
        let local = vec![unit(&web, 0, "active")];
        let acts = decide(&inp, &local, &BTreeMap::new(), 3);
        assert_eq!(acts.len(), 1);
        assert!(matches!(&acts[0], Action::Start(d) if d.index == 2));
    }

    #[test]
    fn nothing_happens_before_the_first_pass() {
        let web = svc("web", 3);
        let local = vec![unit(&web, 0, "active")];
        assert!(decide(&ServicesInput::default(), &local, &BTreeMap::new(), 3).is_empty());
    }

    #[test]
    fn surplus_waits_until_the_count_is_active_elsewhere() {
        let web = svc("web", 3);
        let mut inp = input(&[], &[&web]);
        let local = vec![unit(&web, 1, "active")];
        for (elsewhere, stops) in [(0, false), (2, false), (3, true)] {
            inp.active_elsewhere.insert("t/web".into(), elsewhere);
            let acts = decide(&inp, &local, &BTreeMap::new(), 3);
            assert_eq!(
                acts == vec![Action::Stop(web.unit("t", 1))],
                stops,
                "{elsewhere} active elsewhere: {acts:?}"
            );
        }
    }

    #[test]
    fn gone_services_beyond_count_and_dead_units_go_at_once() {
        let web = svc("web", 2);
        let old = svc("old", 1);
        let inp = input(&[], &[&web]);
        let local = vec![
            unit(&web, 5, "active"),
            unit(&old, 0, "active"),
            unit(&web, 0, "failed"),
            unit(&web, 1, "inactive"),
        ];
        let acts = decide(&inp, &local, &BTreeMap::new(), 3);
        assert_eq!(
            acts,
            vec![
                Action::Stop(web.unit("t", 5)),
                Action::Stop(old.unit("t", 0)),
                Action::Clean(web.unit("t", 0)),
            ]
        );
    }

    #[test]
    fn another_version_is_replaced_and_repeated_failures_are_left_to_the_leader() {
        let web = svc("web", 1);
        let mut new = web.clone();
        if let Run::Exec { argv, .. } = &mut new.run {
            argv[1] = "2000".into();
        }
        let inp = input(&[(&new, 0)], &[&new]);
        let acts = decide(&inp, &[unit(&web, 0, "active")], &BTreeMap::new(), 3);
        assert!(matches!(&acts[..], [Action::Replace(d)] if d.index == 0));

        let inp = input(&[(&web, 0)], &[&web]);
        let failed = [unit(&web, 0, "failed")];
        let few = BTreeMap::from([("t/web".to_string(), 2)]);
        assert!(matches!(
            &decide(&inp, &failed, &few, 3)[..],
            [Action::Start(_)]
        ));
        let many = BTreeMap::from([("t/web".to_string(), 3)]);
        assert!(decide(&inp, &failed, &many, 3).is_empty());
    }

    /// systemd in memory: units, the jobs asked of it, reloads.
    #[derive(Default)]
    struct FakeSystemd {
        units: Mutex<BTreeMap<String, UnitInfo>>,
        jobs: Mutex<Vec<String>>,
        reloads: Mutex<u32>,
        unit_dir: PathBuf,
    }

    impl FakeSystemd {
        fn run(&self, unit: &str, description: String) {
            self.units.lock().unwrap().insert(
                unit.to_string(),
                UnitInfo {
                    state: UnitState {
                        unit: unit.to_string(),
                        load: "loaded".into(),
                        active: "active".into(),
                        sub: "running".into(),
                    },
                    description,
                    since_ms: 1,
                    restarts: 0,
                },
            );
        }
        fn jobs(&self) -> Vec<String> {
            std::mem::take(&mut *self.jobs.lock().unwrap())
        }
    }

    impl Systemd for FakeSystemd {
        async fn start(&self, unit: &str) -> Result<(), SystemdError> {
            self.jobs.lock().unwrap().push(format!("start {unit}"));
            // An installed instance needs its template on disk, as systemd would.
            let (head, _) = unit.rsplit_once('@').unwrap();
            let template = self.unit_dir.join(format!("{head}@.service"));
            let text = std::fs::read_to_string(&template).map_err(|_| SystemdError::Refused {
                op: "start",
                unit: unit.into(),
                message: "no template".into(),
            })?;
            let description = text
                .lines()
                .filter_map(|l| l.strip_prefix("Description="))
                .next_back()
                .unwrap_or("")
                .to_string();
            self.run(unit, description);
            Ok(())
        }
        async fn stop(&self, unit: &str) -> Result<(), SystemdError> {
            self.jobs.lock().unwrap().push(format!("stop {unit}"));
            self.units.lock().unwrap().remove(unit);
            Ok(())
        }
        async fn start_transient(&self, spec: &TransientSpec) -> Result<(), SystemdError> {
            self.jobs
                .lock()
                .unwrap()
                .push(format!("transient {}", spec.unit));
            self.run(&spec.unit, spec.description.clone().unwrap_or_default());
            Ok(())
        }
        async fn state(&self, unit: &str) -> Result<UnitState, SystemdError> {
            Ok(self.units.lock().unwrap()[unit].state.clone())
        }
        async fn list(&self, prefix: &str) -> Result<Vec<UnitInfo>, SystemdError> {
            Ok(self
                .units
                .lock()
                .unwrap()
                .values()
                .filter(|u| u.state.unit.starts_with(prefix))
                .cloned()
                .collect())
        }
        async fn reset_failed(&self, _unit: &str) -> Result<(), SystemdError> {
            Ok(())
        }
        async fn reload(&self) -> Result<(), SystemdError> {
            *self.reloads.lock().unwrap() += 1;
            Ok(())
        }
        async fn changes(
            &self,
            _prefix: &str,
        ) -> Result<impl futures_util::Stream<Item = ()> + Send + Unpin + 'static, SystemdError>
        {
            Ok(futures_util::stream::pending())
        }
        async fn watch(
            &self,
            _unit: &str,
        ) -> Result<impl futures_util::Stream<Item = UnitState> + Send + Unpin, SystemdError>
        {
            Ok(futures_util::stream::pending())
        }
    }

    #[tokio::test]
    async fn a_pass_adopts_starts_writes_templates_and_stops_surplus_only_when_covered() {
        let dir = tempfile::tempdir().unwrap();
        let sd = FakeSystemd {
            unit_dir: dir.path().to_path_buf(),
            ..FakeSystemd::default()
        };
        let config = AgentConfig {
            unit_dir: dir.path().to_path_buf(),
            max_failures: 3,
        };
        let web = ServiceSpec {
            name: "web".into(),
            count: 1,
            balance: None,
            run: Run::Unit {
                text: "[Service]\nExecStart=/bin/sleep 9\n".into(),
            },
        };
        let work = svc("work", 3);
        // Left running by a daemon that crashed: work@1.
        sd.run(&work.unit("t", 1), work.description("t"));
        let mut node = NodeState::default();
        let inp = input(&[(&web, 0), (&work, 1), (&work, 2)], &[&web, &work]);
        let report = node.pass(&sd, &config, &inp).await.unwrap();
        let mut jobs = sd.jobs();
        jobs.sort();
        assert_eq!(
            jobs,
            vec![
                format!("start {}", web.unit("t", 0)),
                format!("transient {}", work.unit("t", 2)),
            ],
            "work@1 is adopted, not started again"
        );
        assert_eq!(*sd.reloads.lock().unwrap(), 1);
        assert!(dir.path().join("drop-svc.t.web@.service").is_file());
        assert_eq!(report.instances["t/work"].len(), 2);
        assert!(report.instances["t/web"][&0].active == "active");

        // A second pass with nothing new does nothing.
        node.pass(&sd, &config, &inp).await.unwrap();
        assert!(sd.jobs().is_empty());
        assert_eq!(*sd.reloads.lock().unwrap(), 1);

        // work@1 placed elsewhere: kept while its replacement is not active, then stopped.
        let mut moved = input(&[(&web, 0), (&work, 2)], &[&web, &work]);
        moved.active_elsewhere.insert("t/work".into(), 2);
        let report = node.pass(&sd, &config, &moved).await.unwrap();
        assert!(sd.jobs().is_empty());
        assert!(report.instances["t/work"][&1].surplus);
        moved.active_elsewhere.insert("t/work".into(), 3);
        node.pass(&sd, &config, &moved).await.unwrap();
        assert_eq!(sd.jobs(), vec![format!("stop {}", work.unit("t", 1))]);

        // web removed: its instance stops and its template goes, with a reload.
        let gone = input(&[(&work, 2)], &[&work]);
        node.pass(&sd, &config, &gone).await.unwrap();
        assert_eq!(sd.jobs(), vec![format!("stop {}", web.unit("t", 0))]);
        assert!(!dir.path().join("drop-svc.t.web@.service").exists());
        assert_eq!(*sd.reloads.lock().unwrap(), 2);
    }

    #[test]
    fn foreign_units_are_never_touched() {
        let inp = input(&[], &[]);
        let mut other = unit(&svc("x", 1), 0, "active");
        other.state.unit = "drop-svc.not-ours.service".into();
        assert!(decide(&inp, &[other], &BTreeMap::new(), 3).is_empty());
    }
}
