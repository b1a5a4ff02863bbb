//! One cgroup per worker pool, below the supervisor's own cgroup: limits (memory, CPU, pids),
//! placement of workers before they run user code, and killing a whole pool with no orphans —
//! also after the supervisor was SIGKILLed and restarted (`list` finds what is left).
//!
//! Two implementations behind [`Cgroups`]: [`v1::V1Cgroups`] for legacy and hybrid hosts
//! (controllers under `<root>/<controller>`, plus a mirror in the controller-less `unified`
//! cgroup2 for `cgroup.kill` and `cgroup.events`, as systemd's hybrid mode does) and
//! [`v2::V2Cgroups`] for the pure cgroup2 hierarchy of modern distributions. [`fake::FakeCgroups`]
//! records calls for policy tests.
//!
//! Layout: `<hierarchy>/<own cgroup>/<subtree>/<pool>`, where the own cgroup is read per hierarchy
//! from `/proc/self/cgroup` and `subtree` is chosen by the caller (`drop-pools` in the daemon, a
//! unique name in tests). This module must never touch a cgroup outside that subtree, except that
//! [`v2::prepare_v2`] moves the daemon into its `supervisor` leaf and enables controllers. Under
//! systemd the unit needs `Delegate=yes` (v1 and v2), or systemd may move or prune the groups.

// We do not use cgroups-rs: it cannot take a root path (so v2 cannot be tested against a
// fixture), ignores the hybrid `unified` mount, has a v2-only kill(), and pulls in a second zbus.

pub mod fake;
pub mod v1;
pub mod v2;

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub use v2::prepare_v2;

/// Where cgroupfs is mounted in production.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// CFS period used for CPU quotas, in microseconds (the kernel default).
pub const CPU_PERIOD_US: u64 = 100_000;
/// How long `kill_all` waits for a group to become empty.
pub const KILL_TIMEOUT: Duration = Duration::from_secs(2);

/// Resource limits of one pool. `None` means unlimited (or the kernel default for the weight);
/// `create` on an existing group resets an absent limit to that.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    /// CPU time in cores, e.g. 0.5 = half of one CPU per period.
    pub cpu_quota: Option<f64>,
    /// Relative weight as in cgroup2 `cpu.weight`: 1..=10000, default 100.
    pub cpu_weight: Option<u64>,
    pub pids_max: Option<u64>,
}

/// What a pool's group uses now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub memory_bytes: u64,
    pub cpu_usage_ns: u64,
    /// Tasks (threads included), as counted by the pids controller.
    pub pids: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("invalid cgroup name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid limit {what} = {value}: {reason}")]
    InvalidLimit {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("/proc/self/cgroup: {reason} in line {line:?}")]
    ProcSelfCgroup { line: String, reason: &'static str },
    #[error("no usable cgroup hierarchy under {}: {reason}", root.display())]
    NoHierarchy { root: PathBuf, reason: String },
    #[error("cgroup v1 controller `{controller}` is not mounted under {}", root.display())]
    MissingController {
        controller: &'static str,
        root: PathBuf,
    },
    #[error("controller `{controller}` is not enabled in {}", path.display())]
    ControllerNotEnabled {
        controller: &'static str,
        path: PathBuf,
    },
    #[error("cgroup {name:?} does not exist ({})", path.display())]
    NotFound { name: String, path: PathBuf },
    #[error("cgroup {} still holds {count} process(es)", path.display())]
    Populated { path: PathBuf, count: usize },
    #[error("cgroup {} still holds processes {waited:?} after it was killed", path.display())]
    KillTimeout { path: PathBuf, waited: Duration },
    #[error("unexpected content in {}: {text:?}", path.display())]
    Parse { path: PathBuf, text: String },
    #[error("cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One small interface per privileged subsystem: the pool engine is written against this, the
/// daemon gets a real implementation from [`detect`], unit tests get [`fake::FakeCgroups`].
pub trait Cgroups: Send + Sync + std::fmt::Debug {
    /// Creates (or updates) the group `name` (a pool name: [A-Za-z0-9._-], validated) below the
    /// supervisor's own cgroup, with limits.
    fn create(&self, name: &str, limits: &Limits) -> Result<(), CgroupError>;
    /// The files a child process writes "0\n" into (from pre_exec, i.e. after fork, before exec)
    /// to move itself into the group in every hierarchy. Precomputed paths; the child only does
    /// open/write/close. Fails if the group does not exist, so nothing is started outside it.
    fn attach_paths(&self, name: &str) -> Result<Vec<PathBuf>, CgroupError>;
    /// Processes in the group and its descendants, in every hierarchy (sorted, no duplicates).
    fn pids(&self, name: &str) -> Result<Vec<i32>, CgroupError>;
    /// Kills every process in the group (including forked grandchildren) and waits (bounded,
    /// [`KILL_TIMEOUT`]) until it is empty. A group that does not exist is already empty.
    fn kill_all(&self, name: &str) -> Result<(), CgroupError>;
    /// Removes the group (depth-first, in every hierarchy); fails with a clear error if it is
    /// still populated. A group that does not exist is already removed.
    fn remove(&self, name: &str) -> Result<(), CgroupError>;
    /// Names of the pool groups that exist now (for cleaning up orphans after a supervisor crash).
    fn list(&self) -> Result<Vec<String>, CgroupError>;
    fn usage(&self, name: &str) -> Result<Usage, CgroupError>;
    fn version(&self) -> CgroupVersion;
}

/// Picks the implementation for this host. `proc_self_cgroup` is the text of `/proc/self/cgroup`.
///
/// v1 (legacy or hybrid) when any line names a real controller; v2 when the only line is
/// `0::<path>` and `cgroup_root` is a cgroup2 mount (it has `cgroup.controllers`). On v2 the
/// daemon calls [`prepare_v2`] first.
pub fn detect(
    cgroup_root: &Path,
    proc_self_cgroup: &str,
    subtree: &str,
) -> Result<Box<dyn Cgroups>, CgroupError> {
    let entries = parse_proc_self_cgroup(proc_self_cgroup)?;
    let has_v1_controller = entries
        .iter()
        .any(|e| e.id != 0 && e.controllers.iter().any(|c| !c.starts_with("name=")));
    if has_v1_controller {
        return Ok(Box::new(v1::V1Cgroups::new(
            cgroup_root,
            &entries,
            subtree,
        )?));
    }
    if cgroup_root.join("cgroup.controllers").is_file() {
        return Ok(Box::new(v2::V2Cgroups::new(
            cgroup_root,
            &entries,
            subtree,
        )?));
    }
    Err(CgroupError::NoHierarchy {
        root: cgroup_root.to_path_buf(),
        reason: "no v1 controller in /proc/self/cgroup and no cgroup2 mount at the root".into(),
    })
}

/// [`detect`], and on v2 [`prepare_v2`] (controllers enabled for the subtree, the caller moved
/// into a leaf of its own when it is not in the root): what a daemon and a test that starts
/// pools call, so pool groups can take their limits on either version.
pub fn setup(
    cgroup_root: &Path,
    proc_self_cgroup: &str,
    subtree: &str,
) -> Result<Box<dyn Cgroups>, CgroupError> {
    let cg = detect(cgroup_root, proc_self_cgroup, subtree)?;
    if cg.version() == CgroupVersion::V2 {
        prepare_v2(cgroup_root, proc_self_cgroup, subtree)?;
    }
    Ok(cg)
}

/// One line of `/proc/<pid>/cgroup`: `hierarchy-id:controller,list:/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcCgroupEntry {
    pub id: u32,
    /// Empty for the cgroup2 line (`0::/path`); may hold `name=systemd`.
    pub controllers: Vec<String>,
    /// Absolute within the hierarchy (and the cgroup namespace), e.g. `/process_api/2a76…`.
    pub path: String,
}

/// Parses `/proc/self/cgroup` (both layouts: v1 lines with controllers, the v2 `0::` line).
pub fn parse_proc_self_cgroup(text: &str) -> Result<Vec<ProcCgroupEntry>, CgroupError> {
    let mut entries = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let bad = |reason| CgroupError::ProcSelfCgroup {
            line: line.to_string(),
            reason,
        };
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("expected `id:controllers:path`"));
        };
        let id = id
            .parse()
            .map_err(|_| bad("hierarchy id is not a number"))?;
        // A cgroup removed while we are in it reads "/path (deleted)".
        let path = path.strip_suffix(" (deleted)").unwrap_or(path);
        if !path.starts_with('/') {
            return Err(bad("path is not absolute"));
        }
        let controllers = controllers
            .split(',')
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect();
        entries.push(ProcCgroupEntry {
            id,
            controllers,
            path: path.to_string(),
        });
    }
    if entries.is_empty() {
        return Err(CgroupError::ProcSelfCgroup {
            line: String::new(),
            reason: "no entries",
        });
    }
    Ok(entries)
}

/// A pool or subtree name becomes one path component: [A-Za-z0-9._-], not `.`/`..`, no leading
/// dot (cgroupfs files like `cgroup.procs` live next to child groups), at most 200 bytes.
pub fn validate_name(name: &str) -> Result<(), CgroupError> {
    // One level of nesting: `pool/worker` (a worker's own group inside its pool's).
    if let Some((pool, worker)) = name.split_once('/') {
        return validate_segment(pool)
            .and_then(|()| validate_segment(worker))
            .map_err(|e| match e {
                CgroupError::InvalidName { reason, .. } => CgroupError::InvalidName {
                    name: name.to_string(),
                    reason,
                },
                other => other,
            });
    }
    validate_segment(name)
}

/// Whether `name` is a worker's group inside a pool's (`pool/worker`).
pub fn is_nested(name: &str) -> bool {
    name.contains('/')
}

fn validate_segment(name: &str) -> Result<(), CgroupError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > 200 {
        Some("longer than 200 bytes")
    } else if name.starts_with('.') {
        Some("starts with a dot")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("only A-Z a-z 0-9 . _ - are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(CgroupError::InvalidName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// CFS quota in microseconds per [`CPU_PERIOD_US`] for `cores`; the kernel minimum is 1 ms.
fn cpu_quota_us(cores: f64) -> Result<u64, CgroupError> {
    if !cores.is_finite() || cores <= 0.0 {
        return Err(CgroupError::InvalidLimit {
            what: "cpu_quota",
            value: cores.to_string(),
            reason: "must be a positive number of cores",
        });
    }
    // Saturating float-to-int cast; clamped to the kernel's minimum quota.
    Ok(((cores * CPU_PERIOD_US as f64).round() as u64).max(1000))
}

fn check_weight(weight: u64) -> Result<u64, CgroupError> {
    if (1..=10_000).contains(&weight) {
        Ok(weight)
    } else {
        Err(CgroupError::InvalidLimit {
            what: "cpu_weight",
            value: weight.to_string(),
            reason: "must be within 1..=10000",
        })
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { op, path, source }
}

/// `<mount>/<own path>`: the absolute in-hierarchy path from `/proc/self/cgroup`, made relative.
fn own_dir(mount: &Path, own: &str) -> PathBuf {
    let own = own.trim_matches('/');
    if own.is_empty() {
        mount.to_path_buf()
    } else {
        mount.join(own)
    }
}

fn read_trimmed(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(io_err("read", path))
}

fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    let text = read_trimmed(path)?;
    text.parse().map_err(|_| CgroupError::Parse {
        path: path.to_path_buf(),
        text,
    })
}

/// One `write(2)` of `value` (cgroupfs takes one value per write). `create` is only for fixture
/// trees; on cgroupfs the kernel made the file already, and a missing one still fails.
fn write_value(path: &Path, value: &str) -> Result<(), CgroupError> {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io_err("open for writing", path))?;
    file.write_all(value.as_bytes())
        .map_err(io_err("write", path))
}

/// `mkdir -p`, mapping the error to the directory involved.
fn make_dir(path: &Path) -> Result<(), CgroupError> {
    std::fs::create_dir_all(path).map_err(io_err("create cgroup", path))
}

/// A worker's group, only inside an existing pool group: a late start must not re-create a
/// pool group that was just removed.
fn make_child_dir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err("create cgroup", path)(e)),
    }
}

/// Names of the child groups of `dir` (empty when `dir` does not exist).
fn child_groups(dir: &Path) -> Result<Vec<String>, CgroupError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("list", dir))?;
        let is_dir = entry
            .file_type()
            .map_err(io_err("stat", &entry.path()))?
            .is_dir();
        if let (true, Some(name)) = (is_dir, entry.file_name().to_str()) {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Adds the pids in `dir/cgroup.procs` and in every descendant group to `out`.
fn collect_procs(dir: &Path, out: &mut BTreeSet<i32>) -> Result<(), CgroupError> {
    let path = dir.join("cgroup.procs");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        // The group went away while we looked: it holds nothing.
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("read", &path)(e)),
    };
    for word in text.split_whitespace() {
        let pid = word.parse().map_err(|_| CgroupError::Parse {
            path: path.clone(),
            text: word.to_string(),
        })?;
        out.insert(pid);
    }
    for child in child_groups(dir)? {
        collect_procs(&dir.join(child), out)?;
    }
    Ok(())
}

fn procs_in(dirs: &[PathBuf]) -> Result<Vec<i32>, CgroupError> {
    let mut pids = BTreeSet::new();
    for dir in dirs {
        collect_procs(dir, &mut pids)?;
    }
    Ok(pids.into_iter().collect())
}

/// SIGKILL each pid; one that is already gone is fine.
fn kill_pids(pids: &[i32]) {
    for &pid in pids {
        match kill(Pid::from_raw(pid), Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(errno) => tracing::warn!(pid, %errno, "cannot SIGKILL a process of a cgroup"),
        }
    }
}

/// Polls `done` (1 ms, growing to 10 ms) until it returns true or `timeout` passed; returns
/// whether it became true.
fn wait_until(
    timeout: Duration,
    mut done: impl FnMut() -> Result<bool, CgroupError>,
) -> Result<bool, CgroupError> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        if done()? {
            return Ok(true);
        }
        if start.elapsed() >= timeout {
            return Ok(false);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// cgroup2 `cgroup.events`: whether the key (`populated`, `frozen`) is 1.
fn events_flag(group: &Path, key: &str) -> Result<bool, CgroupError> {
    let path = group.join("cgroup.events");
    let text = read_trimmed(&path)?;
    for line in text.lines() {
        if let Some((k, v)) = line.split_once(' ')
            && k == key
        {
            return Ok(v.trim() == "1");
        }
    }
    Err(CgroupError::Parse { path, text })
}

/// `rmdir` a group and its descendants, children first. A group that is gone already is fine.
fn remove_tree(dir: &Path) -> Result<(), CgroupError> {
    for child in child_groups(dir)? {
        remove_tree(&dir.join(child))?;
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove cgroup", dir)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "9:name=systemd:/\n8:pids:/\n7:blkio:/\n6:freezer:/\n5:devices:/\n\
        4:memory:/process_api/2a768b4370ca7a9c297bd031be5fcc53\n3:cpuset:/\n2:cpuacct:/\n1:cpu:/\n0::/\n";
    const PURE_V2: &str = "0::/system.slice/drop-supervisor.service\n";

    #[test]
    fn parses_hybrid_v1() {
        let e = parse_proc_self_cgroup(HYBRID).unwrap();
        assert_eq!(e.len(), 10);
        assert_eq!(e[0].controllers, ["name=systemd"]);
        let memory = e.iter().find(|e| e.controllers == ["memory"]).unwrap();
        assert_eq!(memory.id, 4);
        assert_eq!(memory.path, "/process_api/2a768b4370ca7a9c297bd031be5fcc53");
        let unified = e.iter().find(|e| e.id == 0).unwrap();
        assert!(unified.controllers.is_empty());
        assert_eq!(unified.path, "/");
    }

    #[test]
    fn parses_comounted_and_pure_v2() {
        let e = parse_proc_self_cgroup("4:cpu,cpuacct:/a:b\n0::/x (deleted)\n").unwrap();
        assert_eq!(e[0].controllers, ["cpu", "cpuacct"]);
        assert_eq!(e[0].path, "/a:b", "a colon in the path is kept");
        assert_eq!(e[1].path, "/x");
        let e = parse_proc_self_cgroup(PURE_V2).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].id, 0);
        assert_eq!(e[0].path, "/system.slice/drop-supervisor.service");
    }

    #[test]
    fn rejects_malformed_proc_self_cgroup() {
        for bad in ["", "garbage", "x:cpu:/", "1:cpu:relative"] {
            let err = parse_proc_self_cgroup(bad).unwrap_err();
            assert!(
                matches!(err, CgroupError::ProcSelfCgroup { .. }),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn validates_names() {
        // `pool/worker`: one level of nesting for a worker's own group.
        for good in ["pyex", "a.b_c-9", "A", "x..y", "pool/w12"] {
            validate_name(good).unwrap();
        }
        for bad in [
            "", ".", "..", "a/b/c", "a/", "/b", "../x", "a/..", ".hidden", "a b", "é", "x\0",
        ] {
            let err = validate_name(bad).unwrap_err();
            assert!(matches!(err, CgroupError::InvalidName { .. }), "{bad:?}");
        }
        assert!(validate_name(&"a".repeat(201)).is_err());
    }

    #[test]
    fn converts_cpu_limits() {
        assert_eq!(cpu_quota_us(0.5).unwrap(), 50_000);
        assert_eq!(cpu_quota_us(2.0).unwrap(), 200_000);
        assert_eq!(
            cpu_quota_us(0.001).unwrap(),
            1000,
            "clamped to the kernel minimum"
        );
        assert!(cpu_quota_us(0.0).is_err());
        assert!(cpu_quota_us(f64::NAN).is_err());
        assert!(check_weight(0).is_err());
        assert!(check_weight(10_001).is_err());
    }

    #[test]
    fn detect_refuses_a_plain_directory() {
        let dir = tempfile::tempdir().unwrap();
        let err = detect(dir.path(), PURE_V2, "drop-pools").unwrap_err();
        assert!(matches!(err, CgroupError::NoHierarchy { .. }), "{err}");
    }
}
