//! A namespace's health check: what decides whether this node may hold the floating address.
//!
//! The check is part of the namespace (replicated: every member runs the same one) and is one
//! of: a pool of this node is running (and, with a `payload`, answers a call with it); a command
//! exits 0 within the timeout; a systemd unit of this node is active (over D-Bus). A node
//! turns unhealthy after `fall` failures in a row and healthy again after `rise` successes in a
//! row; the first result after start decides at once, so a node never holds the address before
//! its first check passed.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::runtime::Runtime;

/// The check as stored with the namespace (`ns/<name>` → `"health"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// With `pool`: call it with this body; any answer that is not an error passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// A program and its arguments (no shell), started like a worker (the node's worker user,
    /// no capabilities), with `DROP_NODE`, `DROP_NAMESPACE` and `DROP_VIP` in its environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default = "default_rise")]
    pub rise: u32,
    #[serde(default = "default_fall")]
    pub fall: u32,
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
}

fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    2
}
fn default_interval() -> u64 {
    500
}
fn default_timeout() -> u64 {
    1000
}

impl HealthSpec {
    /// Exactly one kind of check, sane counts and times; the message says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let kinds = [
            self.pool.is_some(),
            self.command.is_some(),
            self.unit.is_some(),
        ]
        .iter()
        .filter(|k| **k)
        .count();
        if kinds != 1 {
            return Err("give exactly one of `pool`, `command` or `unit`".into());
        }
        if self.payload.is_some() && self.pool.is_none() {
            return Err("`payload` goes with `pool`".into());
        }
        if self.command.as_ref().is_some_and(Vec::is_empty) {
            return Err("`command` needs a program".into());
        }
        if let Some(u) = &self.unit {
            let kinds = [
                ".service", ".socket", ".target", ".mount", ".timer", ".path", ".scope",
            ];
            if u.contains('/') || !kinds.iter().any(|k| u.len() > k.len() && u.ends_with(k)) {
                return Err(format!(
                    "`unit` {u:?} is not a unit name (like haproxy.service)"
                ));
            }
        }
        if !(1..=100).contains(&self.rise) || !(1..=100).contains(&self.fall) {
            return Err("`rise` and `fall` are between 1 and 100".into());
        }
        if !(10..=600_000).contains(&self.interval_ms) {
            return Err("`interval_ms` is between 10 and 600000".into());
        }
        if !(10..=600_000).contains(&self.timeout_ms) {
            return Err("`timeout_ms` is between 10 and 600000".into());
        }
        Ok(())
    }

    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// One line for logs and `vip show`.
    pub fn describe(&self) -> String {
        let what = if let Some(p) = &self.pool {
            match &self.payload {
                Some(_) => format!("pool {p} answers"),
                None => format!("pool {p} running"),
            }
        } else if let Some(c) = &self.command {
            format!("command `{}`", c.join(" "))
        } else if let Some(u) = &self.unit {
            format!("unit {u} active")
        } else {
            "nothing".into()
        };
        format!(
            "{what} (every {} ms, rise {}, fall {})",
            self.interval_ms, self.rise, self.fall
        )
    }
}

/// Rise/fall counting over check results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    rise: u32,
    fall: u32,
    healthy: Option<bool>,
    streak: u32,
}

impl Verdict {
    pub fn new(rise: u32, fall: u32) -> Verdict {
        Verdict {
            rise: rise.max(1),
            fall: fall.max(1),
            healthy: None,
            streak: 0,
        }
    }

    /// `None` before the first result.
    pub fn healthy(&self) -> Option<bool> {
        self.healthy
    }

    /// Counts one result; returns the verdict when it changed.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        match self.healthy {
            None => {
                self.healthy = Some(ok);
                self.streak = 0;
                Some(ok)
            }
            Some(h) if h == ok => {
                self.streak = 0;
                None
            }
            Some(_) => {
                self.streak += 1;
                let need = if ok { self.rise } else { self.fall };
                if self.streak >= need {
                    self.healthy = Some(ok);
                    self.streak = 0;
                    Some(ok)
                } else {
                    None
                }
            }
        }
    }
}

/// Runs one check; `Err` says why it failed. `env` goes to a command's environment.
pub async fn run_once(
    spec: &HealthSpec,
    runtime: &Runtime,
    env: &[(&str, String)],
    units: Option<&crate::services::probe::UnitProbe>,
) -> Result<(), String> {
    let timeout = spec.timeout();
    if let Some(pool) = &spec.pool {
        let status = runtime.pool_status(pool).map_err(|e| e.to_string())?;
        match status.phase {
            crate::runtime::worker::pool::Phase::Running => {}
            other => return Err(format!("pool {pool} is {other:?}")),
        }
        if status.workers == 0 {
            return Err(format!("pool {pool} has no worker"));
        }
        if let Some(payload) = &spec.payload {
            let handle = crate::runtime::PoolLookup::pool(runtime, pool)
                .ok_or_else(|| format!("pool {pool} is not on this node"))?;
            let body = payload.clone().into_bytes();
            let call = tokio::task::spawn_blocking(move || handle.call(&body));
            match tokio::time::timeout(timeout, call).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err(e))) => return Err(format!("pool {pool}: {e}")),
                Ok(Err(e)) => return Err(format!("pool {pool}: {e}")),
                Err(_) => return Err(format!("pool {pool} did not answer within {timeout:?}")),
            }
        }
        return Ok(());
    }
    if let Some(argv) = &spec.command {
        return run_command(argv, timeout, runtime, env).await;
    }
    if let Some(unit) = &spec.unit {
        let probe =
            units.ok_or("this node does not talk to systemd (`[services] enabled = false`)")?;
        return match tokio::time::timeout(timeout, probe.check(unit)).await {
            Ok(r) => r,
            Err(_) => Err(format!("systemd did not answer within {timeout:?}")),
        };
    }
    Err("no check configured".into())
}

/// Starts a check command exactly like a worker without an image: as the node's worker user,
/// in a session of its own, every capability dropped, `no_new_privs`, a clean environment
/// (PATH, LANG and `env`); its output goes nowhere. A command that outlives `timeout` is killed
/// with its whole process group.
async fn run_command(
    argv: &[String],
    timeout: Duration,
    runtime: &Runtime,
    env: &[(&str, String)],
) -> Result<(), String> {
    use crate::runtime::worker::process;
    let mut vars = process::environment("-", 0, &std::collections::BTreeMap::new());
    vars.remove("DROP_POOL");
    vars.remove("DROP_WORKER");
    vars.extend(env.iter().map(|(k, v)| ((*k).to_string(), v.clone())));
    let launch = process::Launch {
        argv: argv.to_vec(),
        env: vars,
        cwd: Some("/".into()),
        credentials: runtime.worker_credentials(),
        cgroup_procs: Vec::new(),
        image: None,
    };
    let devnull = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .map_err(|e| format!("opening /dev/null: {e}"))?;
    let started = process::spawn(&launch, devnull.into()).map_err(|e| e.to_string())?;
    let pid = started.pid;
    let mut child = started.child;
    // Nothing to say to it, nothing to read from it.
    drop(started.stdin);
    drop(started.stdout);
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("`{}` {status}", argv.join(" "))),
        Ok(Err(e)) => Err(format!("waiting for `{}`: {e}", argv[0])),
        Err(_) => {
            process::kill_group(pid);
            let _ = child.wait().await;
            Err(format!("`{}` did not finish within {timeout:?}", argv[0]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Result<HealthSpec, String> {
        let s: HealthSpec = serde_json::from_str(json).map_err(|e| e.to_string())?;
        s.validate()?;
        Ok(s)
    }

    #[test]
    fn specs_are_checked() {
        let s = spec(r#"{"pool":"web"}"#).unwrap();
        assert_eq!(
            (s.rise, s.fall, s.interval_ms, s.timeout_ms),
            (2, 2, 500, 1000)
        );
        assert!(spec(r#"{"command":["true"],"rise":3}"#).is_ok());
        assert!(spec(r#"{}"#).unwrap_err().contains("exactly one"));
        assert!(
            spec(r#"{"pool":"a","command":["true"]}"#)
                .unwrap_err()
                .contains("exactly one")
        );
        assert!(spec(r#"{"command":[]}"#).unwrap_err().contains("program"));
        assert!(spec(r#"{"unit":"haproxy.service"}"#).is_ok());
        assert!(
            spec(r#"{"unit":"haproxy"}"#)
                .unwrap_err()
                .contains("not a unit name")
        );
        assert!(spec(r#"{"unit":"a/b.service"}"#).is_err());
        assert!(
            spec(r#"{"pool":"a","rise":0}"#)
                .unwrap_err()
                .contains("rise")
        );
        assert!(spec(r#"{"pool":"a","interval_ms":1}"#).is_err());
        assert!(
            spec(r#"{"pool":"a","colour":1}"#)
                .unwrap_err()
                .contains("colour")
        );
        assert!(spec(r#"{"command":["x"],"payload":"p"}"#).is_err());
    }

    #[test]
    fn first_result_decides_then_rise_and_fall_count() {
        let mut v = Verdict::new(2, 3);
        assert_eq!(v.healthy(), None);
        assert_eq!(v.record(false), Some(false));
        assert_eq!(v.record(true), None);
        assert_eq!(v.record(true), Some(true));
        assert_eq!(v.record(false), None);
        assert_eq!(v.record(false), None);
        assert_eq!(v.record(true), None, "a success breaks the streak");
        assert_eq!(v.record(false), None);
        assert_eq!(v.record(false), None);
        assert_eq!(v.record(false), Some(false));
        assert_eq!(v.healthy(), Some(false));
    }
}
