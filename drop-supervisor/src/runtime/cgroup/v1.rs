//! cgroup v1 (legacy and hybrid hosts): one directory per pool in each of the `memory`, `cpu`
//! (and `cpuacct` when mounted apart), `pids` and `freezer` hierarchies, plus a mirror in the
//! controller-less cgroup2 `unified` hierarchy when it is mounted.
//!
//! The mirror is what systemd's hybrid mode does: it has no limits, but it gives `cgroup.kill`
//! (kernel ≥ 5.14: the whole group is gone in milliseconds, forks included) and `cgroup.events`
//! (`populated`). Without it, `kill_all` freezes the group (`freezer.state`), SIGKILLs every pid
//! in `cgroup.procs`, thaws and waits — the same as `echo FROZEN > freezer.state; kill -9 …`.
//! `cpuset` is never used: a v1 cpuset child needs `cpuset.cpus`/`cpuset.mems` copied into it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{
    CPU_PERIOD_US, CgroupError, CgroupVersion, Cgroups, KILL_TIMEOUT, Limits, ProcCgroupEntry,
    Usage, check_weight, child_groups, cpu_quota_us, events_flag, kill_pids, make_dir, own_dir,
    procs_in, read_trimmed, read_u64, remove_tree, validate_name, wait_until, write_value,
};

/// One mounted v1 hierarchy we use, e.g. `cpu,cpuacct`.
#[derive(Debug, Clone)]
struct Hierarchy {
    id: u32,
    /// `<root>/<mount>/<own cgroup>/<subtree>`.
    subtree_dir: PathBuf,
}

/// Indices into `V1Cgroups::hierarchies`: co-mounted controllers share one.
#[derive(Debug, Clone, Copy)]
struct Controllers {
    memory: usize,
    cpu: usize,
    cpuacct: Option<usize>,
    pids: usize,
    freezer: Option<usize>,
}

#[derive(Debug)]
pub struct V1Cgroups {
    hierarchies: Vec<Hierarchy>,
    controllers: Controllers,
    /// `<root>/unified/<own cgroup>/<subtree>` when a cgroup2 is mounted there.
    unified: Option<PathBuf>,
}

impl V1Cgroups {
    /// Finds each controller's mount (`<root>/<controller>`, else `<root>/<co-mounted list>`) and
    /// the supervisor's own cgroup in it. `memory`, `cpu` and `pids` are required; `cpuacct`
    /// (usage only), `freezer` and the `unified` mirror (kill) are used when present.
    pub fn new(
        root: &Path,
        entries: &[ProcCgroupEntry],
        subtree: &str,
    ) -> Result<V1Cgroups, CgroupError> {
        validate_name(subtree)?;
        let mut hierarchies: Vec<Hierarchy> = Vec::new();
        let mut find = |controller: &'static str| -> Result<Option<usize>, CgroupError> {
            let Some(entry) = entries
                .iter()
                .find(|e| e.id != 0 && e.controllers.iter().any(|c| c == controller))
            else {
                return Ok(None);
            };
            if let Some(i) = hierarchies.iter().position(|h| h.id == entry.id) {
                return Ok(Some(i));
            }
            let candidates = [
                root.join(controller),
                root.join(entry.controllers.join(",")),
            ];
            let Some(mount) = candidates.into_iter().find(|p| p.is_dir()) else {
                return Ok(None);
            };
            let own = own_dir(&mount, &entry.path);
            if !own.is_dir() {
                return Err(CgroupError::NoHierarchy {
                    root: root.to_path_buf(),
                    reason: format!("own {controller} cgroup {} is missing", own.display()),
                });
            }
            hierarchies.push(Hierarchy {
                id: entry.id,
                subtree_dir: own.join(subtree),
            });
            Ok(Some(hierarchies.len() - 1))
        };
        let missing = |controller| CgroupError::MissingController {
            controller,
            root: root.to_path_buf(),
        };
        let controllers = Controllers {
            memory: find("memory")?.ok_or_else(|| missing("memory"))?,
            cpu: find("cpu")?.ok_or_else(|| missing("cpu"))?,
            cpuacct: find("cpuacct")?,
            pids: find("pids")?.ok_or_else(|| missing("pids"))?,
            freezer: find("freezer")?,
        };
        let unified_mount = root.join("unified");
        let unified = entries
            .iter()
            .find(|e| e.id == 0 && e.controllers.is_empty())
            .filter(|_| unified_mount.join("cgroup.procs").is_file())
            .map(|e| own_dir(&unified_mount, &e.path))
            .filter(|own| own.is_dir())
            .map(|own| own.join(subtree));
        Ok(V1Cgroups {
            hierarchies,
            controllers,
            unified,
        })
    }

    /// Leaves out the `unified` mirror, so `kill_all` takes the freezer path (used to compare
    /// the two in tests; also what a host without a cgroup2 mount gets).
    #[must_use]
    pub fn without_unified_mirror(mut self) -> V1Cgroups {
        self.unified = None;
        self
    }

    /// The group's directory in every hierarchy, the unified mirror last.
    fn dirs(&self, name: &str) -> Result<Vec<PathBuf>, CgroupError> {
        validate_name(name)?;
        let mut dirs: Vec<PathBuf> = self
            .hierarchies
            .iter()
            .map(|h| h.subtree_dir.join(name))
            .collect();
        dirs.extend(self.unified.as_ref().map(|u| u.join(name)));
        Ok(dirs)
    }

    fn dir(&self, index: usize, name: &str) -> PathBuf {
        self.hierarchies[index].subtree_dir.join(name)
    }

    /// Freezer path: freeze, SIGKILL everything, thaw, wait until empty (re-killing stragglers,
    /// e.g. when there is no freezer and a process forked meanwhile).
    fn freeze_and_kill(&self, name: &str, dirs: &[PathBuf]) -> Result<(), CgroupError> {
        let freezer = self.controllers.freezer.map(|i| self.dir(i, name));
        let freezer = freezer.filter(|d| d.is_dir());
        if let Some(dir) = &freezer {
            let state = dir.join("freezer.state");
            write_value(&state, "FROZEN")?;
            // FREEZING until every task stopped; go on anyway after a while, SIGKILL still works.
            let frozen = wait_until(Duration::from_millis(500), || {
                Ok(read_trimmed(&state)? == "FROZEN")
            })?;
            if !frozen {
                tracing::warn!(group = name, "freezer did not reach FROZEN; killing anyway");
            }
        }
        // Thaw even when reading the pids failed, so nothing stays frozen.
        let killed = procs_in(dirs).map(|pids| {
            kill_pids(&pids);
            pids.len()
        });
        if let Some(dir) = &freezer {
            write_value(&dir.join("freezer.state"), "THAWED")?;
        }
        let killed = killed?;
        let empty = wait_until(KILL_TIMEOUT, || {
            let left = procs_in(dirs)?;
            kill_pids(&left);
            Ok(left.is_empty())
        })?;
        if !empty {
            return Err(CgroupError::KillTimeout {
                path: dirs[0].clone(),
                waited: KILL_TIMEOUT,
            });
        }
        tracing::debug!(group = name, killed, "cgroup emptied through the freezer");
        Ok(())
    }
}

impl Cgroups for V1Cgroups {
    fn create(&self, name: &str, limits: &Limits) -> Result<(), CgroupError> {
        let dirs = self.dirs(name)?;
        // A worker's group inside its pool's carries no limits: the pool's cover it (v1 memory
        // has use_hierarchy=1 on every kernel we support; cpu and pids are hierarchical).
        if super::is_nested(name) {
            for dir in &dirs {
                super::make_child_dir(dir)?;
            }
            return Ok(());
        }
        // Check every value before touching the filesystem.
        let memory = limits
            .memory_bytes
            .map_or_else(|| "-1".to_string(), |b| b.to_string());
        let quota = match limits.cpu_quota {
            Some(cores) => cpu_quota_us(cores)?.to_string(),
            None => "-1".to_string(),
        };
        // cgroup2 weight 100 (default) = v1 shares 1024, the conversion systemd uses.
        let shares = match limits.cpu_weight {
            Some(w) => (check_weight(w)? * 1024 / 100).clamp(2, 262_144),
            None => 1024,
        };
        let pids = limits
            .pids_max
            .map_or_else(|| "max".to_string(), |n| n.to_string());
        for dir in &dirs {
            make_dir(dir)?;
        }
        let c = self.controllers;
        write_value(
            &self.dir(c.memory, name).join("memory.limit_in_bytes"),
            &memory,
        )?;
        let cpu = self.dir(c.cpu, name);
        write_value(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
        write_value(&cpu.join("cpu.cfs_quota_us"), &quota)?;
        write_value(&cpu.join("cpu.shares"), &shares.to_string())?;
        write_value(&self.dir(c.pids, name).join("pids.max"), &pids)?;
        if let Some(freezer) = c.freezer {
            // A kill interrupted by a crash may have left it frozen.
            write_value(&self.dir(freezer, name).join("freezer.state"), "THAWED")?;
        }
        tracing::info!(group = name, ?limits, "cgroup v1 group ready");
        Ok(())
    }

    fn attach_paths(&self, name: &str) -> Result<Vec<PathBuf>, CgroupError> {
        let dirs = self.dirs(name)?;
        if let Some(missing) = dirs.iter().find(|d| !d.is_dir()) {
            return Err(CgroupError::NotFound {
                name: name.to_string(),
                path: missing.clone(),
            });
        }
        Ok(dirs.into_iter().map(|d| d.join("cgroup.procs")).collect())
    }

    fn pids(&self, name: &str) -> Result<Vec<i32>, CgroupError> {
        let dirs = self.dirs(name)?;
        if !dirs.iter().any(|d| d.is_dir()) {
            return Err(CgroupError::NotFound {
                name: name.to_string(),
                path: dirs[0].clone(),
            });
        }
        procs_in(&dirs)
    }

    fn kill_all(&self, name: &str) -> Result<(), CgroupError> {
        let dirs = self.dirs(name)?;
        let started = Instant::now();
        if let Some(unified) = self.unified.as_ref().map(|u| u.join(name))
            && unified.join("cgroup.kill").is_file()
        {
            write_value(&unified.join("cgroup.kill"), "1")?;
            let empty = wait_until(KILL_TIMEOUT, || Ok(!events_flag(&unified, "populated")?))?;
            // A process that is in the v1 groups but not in the mirror (attached by someone
            // else) is not covered by cgroup.kill: the freezer path below catches it.
            if empty && procs_in(&dirs)?.is_empty() {
                tracing::info!(group = name, took = ?started.elapsed(), "cgroup killed (cgroup.kill)");
                return Ok(());
            }
            tracing::warn!(
                group = name,
                "cgroup.kill left processes in v1 groups; using freezer"
            );
        }
        self.freeze_and_kill(name, &dirs)?;
        tracing::info!(group = name, took = ?started.elapsed(), "cgroup killed (freezer)");
        Ok(())
    }

    fn remove(&self, name: &str) -> Result<(), CgroupError> {
        let dirs = self.dirs(name)?;
        for dir in &dirs {
            let count = procs_in(std::slice::from_ref(dir))?.len();
            if count > 0 {
                return Err(CgroupError::Populated {
                    path: dir.clone(),
                    count,
                });
            }
        }
        for dir in &dirs {
            remove_tree(dir)?;
        }
        tracing::info!(group = name, "cgroup v1 group removed");
        Ok(())
    }

    fn list(&self) -> Result<Vec<String>, CgroupError> {
        let mut names = std::collections::BTreeSet::new();
        let subtrees = self.hierarchies.iter().map(|h| &h.subtree_dir);
        for subtree in subtrees.chain(self.unified.as_ref()) {
            names.extend(child_groups(subtree)?);
        }
        Ok(names
            .into_iter()
            .filter(|n| validate_name(n).is_ok())
            .collect())
    }

    fn usage(&self, name: &str) -> Result<Usage, CgroupError> {
        validate_name(name)?;
        let c = self.controllers;
        let memory = self.dir(c.memory, name);
        if !memory.is_dir() {
            return Err(CgroupError::NotFound {
                name: name.to_string(),
                path: memory,
            });
        }
        let cpu_usage_ns = match c.cpuacct {
            Some(i) => read_u64(&self.dir(i, name).join("cpuacct.usage"))?,
            None => 0,
        };
        Ok(Usage {
            memory_bytes: read_u64(&memory.join("memory.usage_in_bytes"))?,
            cpu_usage_ns,
            pids: read_u64(&self.dir(c.pids, name).join("pids.current"))?,
        })
    }

    fn version(&self) -> CgroupVersion {
        CgroupVersion::V1
    }
}

#[cfg(test)]
mod tests {
    use super::super::{detect, parse_proc_self_cgroup};
    use super::*;

    /// A hybrid host like this one: cpu,cpuacct co-mounted (with the usual symlinks), memory
    /// nested in a per-process group, a controller-less unified cgroup2.
    fn fixture(comounted: bool) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("memory/process_api/abc")).unwrap();
        std::fs::create_dir_all(root.join("pids")).unwrap();
        std::fs::create_dir_all(root.join("freezer")).unwrap();
        std::fs::create_dir_all(root.join("unified")).unwrap();
        std::fs::write(root.join("unified/cgroup.procs"), "").unwrap();
        let cpu_line = if comounted {
            std::fs::create_dir_all(root.join("cpu,cpuacct")).unwrap();
            std::os::unix::fs::symlink("cpu,cpuacct", root.join("cpu")).unwrap();
            std::os::unix::fs::symlink("cpu,cpuacct", root.join("cpuacct")).unwrap();
            "2:cpu,cpuacct:/\n"
        } else {
            std::fs::create_dir_all(root.join("cpu")).unwrap();
            std::fs::create_dir_all(root.join("cpuacct")).unwrap();
            "2:cpu:/\n6:cpuacct:/\n"
        };
        let proc = format!(
            "7:name=systemd:/\n5:pids:/\n4:freezer:/\n3:memory:/process_api/abc\n{cpu_line}1:cpuset:/\n0::/\n"
        );
        (dir, proc)
    }

    fn limits() -> Limits {
        Limits {
            memory_bytes: Some(64 << 20),
            cpu_quota: Some(0.5),
            cpu_weight: Some(200),
            pids_max: Some(32),
        }
    }

    #[test]
    fn creates_limits_in_each_hierarchy() {
        let (dir, proc) = fixture(true);
        let root = dir.path();
        let cg = detect(root, &proc, "sub").unwrap();
        assert_eq!(cg.version(), CgroupVersion::V1);
        cg.create("pool", &limits()).unwrap();
        let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
        assert_eq!(
            read("memory/process_api/abc/sub/pool/memory.limit_in_bytes"),
            "67108864"
        );
        assert_eq!(read("cpu,cpuacct/sub/pool/cpu.cfs_quota_us"), "50000");
        assert_eq!(read("cpu,cpuacct/sub/pool/cpu.cfs_period_us"), "100000");
        assert_eq!(read("cpu,cpuacct/sub/pool/cpu.shares"), "2048");
        assert_eq!(read("pids/sub/pool/pids.max"), "32");
        assert_eq!(read("freezer/sub/pool/freezer.state"), "THAWED");
        assert!(root.join("unified/sub/pool").is_dir(), "unified mirror");
        assert!(!root.join("cpuset/sub").exists());

        // Updating with no limits resets them.
        cg.create("pool", &Limits::default()).unwrap();
        assert_eq!(
            read("memory/process_api/abc/sub/pool/memory.limit_in_bytes"),
            "-1"
        );
        assert_eq!(read("cpu,cpuacct/sub/pool/cpu.cfs_quota_us"), "-1");
        assert_eq!(read("cpu,cpuacct/sub/pool/cpu.shares"), "1024");
        assert_eq!(read("pids/sub/pool/pids.max"), "max");
        assert_eq!(cg.list().unwrap(), ["pool"]);
    }

    #[test]
    fn attach_paths_cover_every_hierarchy_once() {
        let (dir, proc) = fixture(true);
        let root = dir.path();
        let cg = detect(root, &proc, "sub").unwrap();
        assert!(matches!(
            cg.attach_paths("pool"),
            Err(CgroupError::NotFound { .. })
        ));
        cg.create("pool", &Limits::default()).unwrap();
        let paths = cg.attach_paths("pool").unwrap();
        let want: Vec<PathBuf> = [
            "memory/process_api/abc",
            "cpu",
            "pids",
            "freezer",
            "unified",
        ]
        .iter()
        .map(|h| root.join(h).join("sub/pool/cgroup.procs"))
        .collect();
        assert_eq!(paths, want, "co-mounted cpu,cpuacct appears once");

        let (dir, proc) = fixture(false);
        let cg = detect(dir.path(), &proc, "sub").unwrap();
        cg.create("pool", &Limits::default()).unwrap();
        let paths = cg.attach_paths("pool").unwrap();
        assert_eq!(paths.len(), 6, "separate cpu and cpuacct: {paths:?}");
        assert!(paths.contains(&dir.path().join("cpuacct/sub/pool/cgroup.procs")));
    }

    #[test]
    fn kill_all_on_an_empty_group_takes_the_freezer_path_and_thaws() {
        let (dir, proc) = fixture(true);
        let entries = parse_proc_self_cgroup(&proc).unwrap();
        let cg = V1Cgroups::new(dir.path(), &entries, "sub")
            .unwrap()
            .without_unified_mirror();
        cg.create("pool", &Limits::default()).unwrap();
        assert_eq!(cg.attach_paths("pool").unwrap().len(), 4);
        cg.kill_all("pool").unwrap();
        let state = dir.path().join("freezer/sub/pool/freezer.state");
        assert_eq!(std::fs::read_to_string(state).unwrap(), "THAWED");
        cg.kill_all("never-created").unwrap();
    }

    #[test]
    fn missing_controller_is_named() {
        let (dir, proc) = fixture(true);
        std::fs::remove_dir(dir.path().join("pids")).unwrap();
        let err = detect(dir.path(), &proc, "sub").unwrap_err();
        assert!(
            matches!(
                err,
                CgroupError::MissingController {
                    controller: "pids",
                    ..
                }
            ),
            "{err}"
        );
        assert!(detect(dir.path(), &proc, "../escape").is_err());
    }

    #[test]
    fn rejects_bad_limits_before_creating_anything() {
        let (dir, proc) = fixture(true);
        let cg = detect(dir.path(), &proc, "sub").unwrap();
        let bad = Limits {
            cpu_quota: Some(-1.0),
            ..Limits::default()
        };
        assert!(matches!(
            cg.create("pool", &bad),
            Err(CgroupError::InvalidLimit { .. })
        ));
        assert!(cg.list().unwrap().is_empty());
        assert!(matches!(
            cg.create("a/b/c", &Limits::default()),
            Err(CgroupError::InvalidName { .. })
        ));
    }
}
