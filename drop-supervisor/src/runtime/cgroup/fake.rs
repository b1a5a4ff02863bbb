//! A recording [`Cgroups`] for unit tests of the pool engine: no filesystem, no root. It keeps
//! the groups and their limits, records every call, returns the pids and usage a test set, and
//! behaves like the real ones where policy depends on it (unknown group → `NotFound`, `remove`
//! of a group with pids → `Populated`, `kill_all` empties it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use super::{CgroupError, CgroupVersion, Cgroups, Limits, Usage, validate_name};

/// One recorded call.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    Create(String, Limits),
    AttachPaths(String),
    Pids(String),
    KillAll(String),
    Remove(String),
    List,
    Usage(String),
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<Call>,
    groups: BTreeMap<String, Limits>,
    pids: BTreeMap<String, Vec<i32>>,
    usage: BTreeMap<String, Usage>,
    failing: BTreeSet<String>,
}

#[derive(Debug)]
pub struct FakeCgroups {
    version: CgroupVersion,
    /// When set, `create` makes `<dir>/<name>.procs` and `attach_paths` returns it, so a test
    /// can spawn a real child that writes into it.
    attach_dir: Option<PathBuf>,
    state: Mutex<State>,
}

impl Default for FakeCgroups {
    fn default() -> Self {
        FakeCgroups::new()
    }
}

impl FakeCgroups {
    /// A v2 fake whose `attach_paths` are empty (a spawned child stays where it is).
    pub fn new() -> FakeCgroups {
        FakeCgroups {
            version: CgroupVersion::V2,
            attach_dir: None,
            state: Mutex::default(),
        }
    }

    #[must_use]
    pub fn with_version(mut self, version: CgroupVersion) -> FakeCgroups {
        self.version = version;
        self
    }

    #[must_use]
    pub fn with_attach_dir(mut self, dir: impl Into<PathBuf>) -> FakeCgroups {
        self.attach_dir = Some(dir.into());
        self
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the calls from the others.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    /// Returns the calls so far and forgets them.
    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut self.state().calls)
    }

    /// The limits of an existing group.
    pub fn limits(&self, name: &str) -> Option<Limits> {
        self.state().groups.get(name).cloned()
    }

    /// A group as a crashed previous instance would have left it (not recorded as a call).
    pub fn add_leftover(&self, name: &str, pids: Vec<i32>) {
        let mut state = self.state();
        state.groups.insert(name.to_string(), Limits::default());
        state.pids.insert(name.to_string(), pids);
    }

    pub fn set_pids(&self, name: &str, pids: Vec<i32>) {
        self.state().pids.insert(name.to_string(), pids);
    }

    pub fn set_usage(&self, name: &str, usage: Usage) {
        self.state().usage.insert(name.to_string(), usage);
    }

    /// From now on every call for `name` fails with an I/O error.
    pub fn fail(&self, name: &str) {
        self.state().failing.insert(name.to_string());
    }

    /// Records the call, then checks the name, injected failures and (if `must_exist`) existence.
    fn begin(
        &self,
        call: Call,
        name: &str,
        must_exist: bool,
    ) -> Result<MutexGuard<'_, State>, CgroupError> {
        let mut state = self.state();
        state.calls.push(call);
        validate_name(name)?;
        if state.failing.contains(name) {
            return Err(CgroupError::Io {
                op: "fake failure on",
                path: PathBuf::from(name),
                source: std::io::Error::other("injected by FakeCgroups::fail"),
            });
        }
        if must_exist && !state.groups.contains_key(name) {
            return Err(CgroupError::NotFound {
                name: name.to_string(),
                path: PathBuf::from(name),
            });
        }
        Ok(state)
    }
}

impl Cgroups for FakeCgroups {
    fn create(&self, name: &str, limits: &Limits) -> Result<(), CgroupError> {
        let mut state = self.begin(Call::Create(name.to_string(), limits.clone()), name, false)?;
        if let Some(dir) = &self.attach_dir {
            let path = dir.join(format!("{name}.procs"));
            std::fs::write(&path, "").map_err(|source| CgroupError::Io {
                op: "create",
                path,
                source,
            })?;
        }
        state.groups.insert(name.to_string(), limits.clone());
        Ok(())
    }

    fn attach_paths(&self, name: &str) -> Result<Vec<PathBuf>, CgroupError> {
        let _state = self.begin(Call::AttachPaths(name.to_string()), name, true)?;
        Ok(self
            .attach_dir
            .iter()
            .map(|dir| dir.join(format!("{name}.procs")))
            .collect())
    }

    fn pids(&self, name: &str) -> Result<Vec<i32>, CgroupError> {
        let state = self.begin(Call::Pids(name.to_string()), name, true)?;
        Ok(state.pids.get(name).cloned().unwrap_or_default())
    }

    fn kill_all(&self, name: &str) -> Result<(), CgroupError> {
        let mut state = self.begin(Call::KillAll(name.to_string()), name, false)?;
        state.pids.remove(name);
        Ok(())
    }

    fn remove(&self, name: &str) -> Result<(), CgroupError> {
        let mut state = self.begin(Call::Remove(name.to_string()), name, false)?;
        let count = state.pids.get(name).map_or(0, Vec::len);
        if count > 0 {
            return Err(CgroupError::Populated {
                path: PathBuf::from(name),
                count,
            });
        }
        state.groups.remove(name);
        state.usage.remove(name);
        Ok(())
    }

    fn list(&self) -> Result<Vec<String>, CgroupError> {
        let mut state = self.state();
        state.calls.push(Call::List);
        Ok(state.groups.keys().cloned().collect())
    }

    fn usage(&self, name: &str) -> Result<Usage, CgroupError> {
        let state = self.begin(Call::Usage(name.to_string()), name, true)?;
        Ok(state.usage.get(name).copied().unwrap_or_default())
    }

    fn version(&self) -> CgroupVersion {
        self.version
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_calls_and_mirrors_the_real_rules() {
        let fake = FakeCgroups::new();
        let limits = Limits {
            pids_max: Some(8),
            ..Limits::default()
        };
        fake.create("a", &limits).unwrap();
        assert_eq!(fake.limits("a"), Some(limits.clone()));
        assert!(fake.attach_paths("a").unwrap().is_empty());
        fake.set_pids("a", vec![5, 6]);
        assert_eq!(fake.pids("a").unwrap(), [5, 6]);
        assert!(matches!(
            fake.remove("a"),
            Err(CgroupError::Populated { count: 2, .. })
        ));
        fake.kill_all("a").unwrap();
        fake.remove("a").unwrap();
        assert!(matches!(fake.pids("a"), Err(CgroupError::NotFound { .. })));
        assert!(matches!(
            fake.create("../x", &limits),
            Err(CgroupError::InvalidName { .. })
        ));
        assert_eq!(
            fake.take_calls(),
            [
                Call::Create("a".into(), limits.clone()),
                Call::AttachPaths("a".into()),
                Call::Pids("a".into()),
                Call::Remove("a".into()),
                Call::KillAll("a".into()),
                Call::Remove("a".into()),
                Call::Pids("a".into()),
                Call::Create("../x".into(), limits),
            ]
        );
        assert!(fake.calls().is_empty());
    }

    #[test]
    fn leftovers_failures_and_attach_files() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeCgroups::new()
            .with_version(CgroupVersion::V1)
            .with_attach_dir(dir.path());
        assert_eq!(fake.version(), CgroupVersion::V1);
        fake.add_leftover("old", vec![9]);
        assert_eq!(fake.list().unwrap(), ["old"]);
        fake.create("p", &Limits::default()).unwrap();
        let paths = fake.attach_paths("p").unwrap();
        assert_eq!(paths, [dir.path().join("p.procs")]);
        assert!(paths[0].is_file());
        fake.fail("p");
        assert!(matches!(fake.kill_all("p"), Err(CgroupError::Io { .. })));
        fake.set_usage(
            "old",
            Usage {
                memory_bytes: 1,
                cpu_usage_ns: 2,
                pids: 1,
            },
        );
        assert_eq!(fake.usage("old").unwrap().cpu_usage_ns, 2);
    }
}
