//! The systemd seam: everything DROP asks of systemd, over D-Bus (zbus), behind one small trait
//! ([`Systemd`]) so that service policy can be tested against a fake and the real thing
//! ([`SystemdBus`]) against a real systemd.
//!
//! Jobs are awaited through `JobRemoved` signals, and unit state changes arrive as a stream
//! built from `PropertiesChanged` signals: the stream is opened before a job is queued, so no
//! change is missed, and nothing here polls.

use std::collections::HashMap;

use futures_util::{Stream, StreamExt as _};
use serde::Serialize;
use zbus::proxy;
use zbus::proxy::CacheProperties;
use zbus::{OwnedObjectPath, Variant as Value};

/// What went wrong talking to systemd.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("cannot reach systemd over D-Bus: {0}")]
    Bus(#[source] zbus::Error),
    #[error("systemd refused {op} of {unit}: {message}")]
    Refused {
        op: &'static str,
        unit: String,
        message: String,
    },
    #[error("job {op} of {unit} ended with `{result}`")]
    Job {
        op: &'static str,
        unit: String,
        result: String,
    },
    #[error("the signal stream ended while waiting for {0}")]
    StreamEnded(String),
    #[error("invalid transient unit {unit}: {reason}")]
    Invalid { unit: String, reason: String },
}

/// A unit's state as systemd reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnitState {
    pub unit: String,
    /// `loaded`, `not-found`, ...
    pub load: String,
    /// `active`, `inactive`, `failed`, `activating`, `deactivating`, ...
    pub active: String,
    /// `running`, `dead`, `exited`, `auto-restart`, ...
    pub sub: String,
}

impl UnitState {
    fn unknown(unit: &str) -> UnitState {
        UnitState {
            unit: unit.to_string(),
            load: "not-found".into(),
            active: "inactive".into(),
            sub: "dead".into(),
        }
    }
}

/// A listed unit: its state and what a node reports of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnitInfo {
    #[serde(flatten)]
    pub state: UnitState,
    pub description: String,
    /// When the unit last changed its active state (ms since the epoch; 0 unknown).
    pub since_ms: u64,
    /// How often systemd restarted it (`NRestarts`).
    pub restarts: u32,
}

/// A command run as a transient service unit (`systemd-run` style).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TransientSpec {
    /// `NAME.service`.
    pub unit: String,
    pub argv: Vec<String>,
    pub memory_max: Option<u64>,
    /// Cores (0.5 = half a CPU).
    pub cpu: Option<f64>,
    pub tasks_max: Option<u64>,
    pub user: Option<String>,
    pub env: Vec<(String, String)>,
    /// `no`, `on-failure`, `always`, ...
    pub restart: Option<String>,
    pub description: Option<String>,
}

/// Everything DROP asks of systemd.
pub trait Systemd: Send + Sync {
    /// Starts an installed unit; returns when its job has finished (`done`), else an error.
    fn start(&self, unit: &str) -> impl Future<Output = Result<(), SystemdError>> + Send;
    /// Stops a unit; returns when its job has finished. Stopping a unit that is not loaded is
    /// not an error.
    fn stop(&self, unit: &str) -> impl Future<Output = Result<(), SystemdError>> + Send;
    /// Starts `spec` as a transient service; returns when its start job has finished.
    fn start_transient(
        &self,
        spec: &TransientSpec,
    ) -> impl Future<Output = Result<(), SystemdError>> + Send;
    /// The unit's state; a unit systemd does not know is `not-found`/`inactive`.
    fn state(&self, unit: &str) -> impl Future<Output = Result<UnitState, SystemdError>> + Send;
    /// Loaded units whose names start with `prefix`, with what a node reports of them.
    fn list(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<Vec<UnitInfo>, SystemdError>> + Send;
    /// Forgets a failed unit's failure (a failed transient unit is unloaded by it).
    fn reset_failed(&self, unit: &str) -> impl Future<Output = Result<(), SystemdError>> + Send;
    /// `daemon-reload`: returns once systemd has read the unit files again.
    fn reload(&self) -> impl Future<Output = Result<(), SystemdError>> + Send;
    /// One item each time a unit whose name starts with `prefix` changes a property (the
    /// caller reads the new state with [`Systemd::list`]).
    fn changes(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<impl Stream<Item = ()> + Send + Unpin + 'static, SystemdError>> + Send;
    /// Every later change of `unit`'s state, as systemd signals it.
    fn watch(
        &self,
        unit: &str,
    ) -> impl Future<Output = Result<impl Stream<Item = UnitState> + Send + Unpin, SystemdError>> + Send;
}

/// `org.freedesktop.systemd1.Manager`: the calls DROP (and its test harness) make.
#[proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
pub trait Manager {
    /// Asks systemd to emit JobRemoved and PropertiesChanged to this client.
    fn subscribe(&self) -> zbus::Result<()>;
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, Value<'_>)],
        aux: &[(&str, &[(&str, Value<'_>)])],
    ) -> zbus::Result<OwnedObjectPath>;
    fn get_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;
    fn reload(&self) -> zbus::Result<()>;
    #[allow(clippy::type_complexity)]
    fn list_units_by_patterns(
        &self,
        states: &[&str],
        patterns: &[&str],
    ) -> zbus::Result<
        Vec<(
            String,
            String,
            String,
            String,
            String,
            String,
            OwnedObjectPath,
            u32,
            String,
            OwnedObjectPath,
        )>,
    >;
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: OwnedObjectPath,
        unit: String,
        result: String,
    ) -> zbus::Result<()>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
}

/// `org.freedesktop.systemd1.Unit`: a unit's states.
#[proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
pub trait Unit {
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn sub_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn load_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn state_change_timestamp(&self) -> zbus::Result<u64>;
}

/// `org.freedesktop.systemd1.Service`: what a service unit runs and its limits.
#[proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1"
)]
pub trait Service {
    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn control_group(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn memory_max(&self) -> zbus::Result<u64>;
    #[zbus(property, name = "NRestarts")]
    fn n_restarts(&self) -> zbus::Result<u32>;
    #[zbus(property, name = "WatchdogUSec")]
    fn watchdog_usec(&self) -> zbus::Result<u64>;
}

/// systemd over a D-Bus connection (the system bus in production).
#[derive(Debug, Clone)]
pub struct SystemdBus {
    conn: zbus::Connection,
}

fn refused(op: &'static str, unit: &str, e: zbus::Error) -> SystemdError {
    match e {
        zbus::Error::MethodError(name, message, _) => SystemdError::Refused {
            op,
            unit: unit.to_string(),
            message: format!("{}: {}", name.as_str(), message.unwrap_or_default()),
        },
        other => SystemdError::Bus(other),
    }
}

impl SystemdBus {
    /// Over the system bus.
    pub async fn system() -> Result<SystemdBus, SystemdError> {
        Ok(SystemdBus {
            conn: zbus::Connection::system()
                .await
                .map_err(SystemdError::Bus)?,
        })
    }

    /// Over `conn` (tests: a throw-away systemd's own bus).
    pub fn with_connection(conn: zbus::Connection) -> SystemdBus {
        SystemdBus { conn }
    }

    async fn manager(&self) -> Result<ManagerProxy<'static>, SystemdError> {
        let m = ManagerProxy::builder(&self.conn)
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(SystemdError::Bus)?;
        // Signals go only to subscribed clients; one subscription per connection is enough.
        match m.subscribe().await {
            Ok(()) => {}
            Err(zbus::Error::MethodError(name, _, _))
                if name.as_str() == "org.freedesktop.systemd1.AlreadySubscribed" => {}
            Err(e) => return Err(SystemdError::Bus(e)),
        }
        Ok(m)
    }

    async fn unit(&self, path: OwnedObjectPath) -> Result<UnitProxy<'static>, SystemdError> {
        UnitProxy::builder(&self.conn)
            .path(path)
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(SystemdError::Bus)
    }

    /// Queues a job with `queue` (after opening the JobRemoved stream) and waits for its end.
    async fn job<F, Fut>(&self, op: &'static str, unit: &str, queue: F) -> Result<(), SystemdError>
    where
        F: FnOnce(ManagerProxy<'static>) -> Fut,
        Fut: Future<Output = zbus::Result<OwnedObjectPath>>,
    {
        let manager = self.manager().await?;
        let mut removed = manager
            .receive_job_removed()
            .await
            .map_err(SystemdError::Bus)?;
        let job = queue(manager).await.map_err(|e| refused(op, unit, e))?;
        while let Some(signal) = removed.next().await {
            let args = signal.args().map_err(SystemdError::Bus)?;
            if args.job.as_str() == job.as_str() {
                return if args.result == "done" {
                    Ok(())
                } else {
                    Err(SystemdError::Job {
                        op,
                        unit: unit.to_string(),
                        result: args.result,
                    })
                };
            }
        }
        Err(SystemdError::StreamEnded(format!("{op} of {unit}")))
    }

    async fn read_state(unit: &str, proxy: &UnitProxy<'_>) -> Result<UnitState, SystemdError> {
        Ok(UnitState {
            unit: unit.to_string(),
            load: proxy.load_state().await.map_err(SystemdError::Bus)?,
            active: proxy.active_state().await.map_err(SystemdError::Bus)?,
            sub: proxy.sub_state().await.map_err(SystemdError::Bus)?,
        })
    }
}

/// The transient unit's properties as systemd's D-Bus API takes them.
pub fn transient_properties(
    spec: &TransientSpec,
) -> Result<Vec<(&'static str, Value<'static>)>, SystemdError> {
    let invalid = |reason: &str| SystemdError::Invalid {
        unit: spec.unit.clone(),
        reason: reason.to_string(),
    };
    if !spec.unit.ends_with(".service") || spec.unit.contains('/') {
        return Err(invalid("the name must end in `.service` and hold no `/`"));
    }
    let Some(program) = spec.argv.first() else {
        return Err(invalid("no command"));
    };
    if !program.starts_with('/') {
        return Err(invalid("the program must be an absolute path"));
    }
    let mut props: Vec<(&'static str, Value<'static>)> = vec![
        (
            "Description",
            Value::from(
                spec.description
                    .clone()
                    .unwrap_or_else(|| format!("DROP service {}", spec.unit)),
            ),
        ),
        (
            "ExecStart",
            Value::from(vec![(program.clone(), spec.argv.clone(), false)]),
        ),
    ];
    if let Some(m) = spec.memory_max {
        props.push(("MemoryMax", Value::from(m)));
    }
    if let Some(cpu) = spec.cpu {
        if !(cpu > 0.0 && cpu <= 4096.0) {
            return Err(invalid("cpu must be between 0 and 4096 cores"));
        }
        props.push((
            "CPUQuotaPerSecUSec",
            Value::from((cpu * 1_000_000.0) as u64),
        ));
    }
    if let Some(t) = spec.tasks_max {
        props.push(("TasksMax", Value::from(t)));
    }
    if let Some(u) = &spec.user {
        props.push(("User", Value::from(u.clone())));
    }
    if !spec.env.is_empty() {
        let env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        props.push(("Environment", Value::from(env)));
    }
    if let Some(r) = &spec.restart {
        props.push(("Restart", Value::from(r.clone())));
    }
    Ok(props)
}

impl Systemd for SystemdBus {
    async fn start(&self, unit: &str) -> Result<(), SystemdError> {
        let name = unit.to_string();
        self.job("start", unit, |m| async move {
            m.start_unit(&name, "replace").await
        })
        .await
    }

    async fn stop(&self, unit: &str) -> Result<(), SystemdError> {
        let name = unit.to_string();
        match self
            .job("stop", unit, |m| async move {
                m.stop_unit(&name, "replace").await
            })
            .await
        {
            Err(SystemdError::Refused { message, .. }) if message.contains("NoSuchUnit") => Ok(()),
            other => other,
        }
    }

    async fn start_transient(&self, spec: &TransientSpec) -> Result<(), SystemdError> {
        let props = transient_properties(spec)?;
        let name = spec.unit.clone();
        self.job("start", &spec.unit, |m| async move {
            let no_aux: &[(&str, &[(&str, Value<'_>)])] = &[];
            m.start_transient_unit(&name, "fail", &props, no_aux).await
        })
        .await
    }

    async fn state(&self, unit: &str) -> Result<UnitState, SystemdError> {
        let manager = self.manager().await?;
        let path = match manager.load_unit(unit).await {
            Ok(p) => p,
            Err(zbus::Error::MethodError(name, _, _))
                if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit" =>
            {
                return Ok(UnitState::unknown(unit));
            }
            Err(e) => return Err(refused("load", unit, e)),
        };
        let proxy = self.unit(path).await?;
        Self::read_state(unit, &proxy).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<UnitInfo>, SystemdError> {
        let manager = self.manager().await?;
        let pattern = format!("{prefix}*");
        let units = manager
            .list_units_by_patterns(&[], &[pattern.as_str()])
            .await
            .map_err(|e| refused("list", prefix, e))?;
        let mut out = Vec::with_capacity(units.len());
        for (name, description, load, active, sub, _, path, ..) in units {
            // Read one by one: a unit may vanish between the list and the read.
            let unit = self.unit(path.clone()).await?;
            let since_us = unit.state_change_timestamp().await.unwrap_or(0);
            let restarts = match ServiceProxy::builder(&self.conn)
                .path(path)
                .cache_properties(CacheProperties::No)
                .build()
                .await
            {
                Ok(p) => p.n_restarts().await.unwrap_or(0),
                Err(_) => 0,
            };
            out.push(UnitInfo {
                state: UnitState {
                    unit: name,
                    load,
                    active,
                    sub,
                },
                description,
                since_ms: since_us / 1000,
                restarts,
            });
        }
        Ok(out)
    }

    async fn reset_failed(&self, unit: &str) -> Result<(), SystemdError> {
        let manager = self.manager().await?;
        match manager.reset_failed_unit(unit).await {
            Ok(()) => Ok(()),
            Err(zbus::Error::MethodError(name, _, _))
                if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit" =>
            {
                Ok(())
            }
            Err(e) => Err(refused("reset-failed", unit, e)),
        }
    }

    async fn reload(&self) -> Result<(), SystemdError> {
        let manager = self.manager().await?;
        manager
            .reload()
            .await
            .map_err(|e| refused("daemon-reload", "the manager", e))
    }

    async fn changes(
        &self,
        prefix: &str,
    ) -> Result<impl Stream<Item = ()> + Send + Unpin + 'static, SystemdError> {
        // Subscribed first, so that systemd sends PropertiesChanged to this client at all.
        self.manager().await?;
        let rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .interface("org.freedesktop.DBus.Properties")
            .member("PropertiesChanged")
            .path_namespace("/org/freedesktop/systemd1/unit")
            .build()
            .map_err(SystemdError::Bus)?;
        let stream = zbus::MessageStream::for_match_rule(rule, &self.conn, None)
            .await
            .map_err(SystemdError::Bus)?;
        let wanted = format!("/org/freedesktop/systemd1/unit/{}", escape_path(prefix));
        Ok(Box::pin(stream.filter_map(move |msg| {
            let hit = msg.ok().is_some_and(|m| {
                m.header()
                    .path()
                    .is_some_and(|p| p.as_str().starts_with(&wanted))
            });
            std::future::ready(hit.then_some(()))
        })))
    }

    async fn watch(
        &self,
        unit: &str,
    ) -> Result<impl Stream<Item = UnitState> + Send + Unpin, SystemdError> {
        let manager = self.manager().await?;
        let path = manager
            .load_unit(unit)
            .await
            .map_err(|e| refused("load", unit, e))?;
        let props = zbus::fdo::PropertiesProxy::builder(&self.conn)
            .destination("org.freedesktop.systemd1")
            .path(path)
            .build()
            .await
            .map_err(SystemdError::Bus)?;
        let changes = props
            .receive_properties_changed()
            .await
            .map_err(SystemdError::Bus)?;
        let name = unit.to_string();
        // The last known values, so that a signal carrying only some properties still yields a
        // whole state.
        let mut last = UnitState::unknown(unit);
        last.load = "loaded".into();
        let stream = changes.filter_map(move |signal| {
            let mut state = None;
            if let Ok(args) = signal.args()
                && args.interface_name.as_str() == "org.freedesktop.systemd1.Unit"
            {
                let changed: HashMap<&str, &Value<'_>> = args
                    .changed_properties()
                    .iter()
                    .map(|(k, v)| (*k, v))
                    .collect();
                let text = |key: &str| {
                    changed
                        .get(key)
                        .and_then(|v| <&str>::try_from(*v).ok())
                        .map(str::to_string)
                };
                let mut touched = false;
                if let Some(v) = text("ActiveState") {
                    last.active = v;
                    touched = true;
                }
                if let Some(v) = text("SubState") {
                    last.sub = v;
                    touched = true;
                }
                if let Some(v) = text("LoadState") {
                    last.load = v;
                    touched = true;
                }
                if touched {
                    state = Some(UnitState {
                        unit: name.clone(),
                        ..last.clone()
                    });
                }
            }
            std::future::ready(state)
        });
        Ok(Box::pin(stream))
    }
}

/// A unit name as systemd spells it in object paths: every byte outside `[A-Za-z0-9]` is
/// `_xx` (hex), a leading digit too.
pub fn escape_path(name: &str) -> String {
    let mut out = String::with_capacity(name.len() * 2);
    for (i, b) in name.bytes().enumerate() {
        if b.is_ascii_alphabetic() || (b.is_ascii_digit() && i > 0) {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_paths_escape_like_systemd() {
        assert_eq!(escape_path("drop-svc.t"), "drop_2dsvc_2et");
        assert_eq!(escape_path("a@1.service"), "a_401_2eservice");
        assert_eq!(escape_path("1a"), "_31a");
    }

    fn spec() -> TransientSpec {
        TransientSpec {
            unit: "web.service".into(),
            argv: vec!["/bin/sleep".into(), "300".into()],
            memory_max: Some(64 << 20),
            cpu: Some(0.5),
            tasks_max: Some(32),
            user: Some("drop-fn".into()),
            env: vec![("A".into(), "1".into())],
            restart: Some("on-failure".into()),
            description: None,
        }
    }

    #[test]
    fn transient_properties_carry_every_setting() {
        let props = transient_properties(&spec()).unwrap();
        let names: Vec<&str> = props.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "Description",
                "ExecStart",
                "MemoryMax",
                "CPUQuotaPerSecUSec",
                "TasksMax",
                "User",
                "Environment",
                "Restart"
            ]
        );
        let cpu = props
            .iter()
            .find(|(n, _)| *n == "CPUQuotaPerSecUSec")
            .unwrap();
        assert_eq!(cpu.1, Value::from(500_000u64));
        // ExecStart is a(sasb): (path, argv, ignore-failure).
        let exec = &props.iter().find(|(n, _)| *n == "ExecStart").unwrap().1;
        assert_eq!(exec.value_signature().to_string(), "a(sasb)");
    }

    #[test]
    fn transient_specs_are_checked() {
        let bad = |f: &dyn Fn(&mut TransientSpec)| {
            let mut s = spec();
            f(&mut s);
            transient_properties(&s).unwrap_err().to_string()
        };
        assert!(bad(&|s| s.unit = "web".into()).contains(".service"));
        assert!(bad(&|s| s.unit = "a/b.service".into()).contains(".service"));
        assert!(bad(&|s| s.argv.clear()).contains("no command"));
        assert!(bad(&|s| s.argv[0] = "sleep".into()).contains("absolute"));
        assert!(bad(&|s| s.cpu = Some(0.0)).contains("cpu"));
    }
}
