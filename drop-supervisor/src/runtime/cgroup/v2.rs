//! cgroup v2 (the single unified hierarchy of modern distributions).
//!
//! cgroup2 forbids "internal processes": a group that hands controllers to its children (through
//! `cgroup.subtree_control`) must not hold processes itself. Under systemd the daemon's unit
//! needs `Delegate=yes` (so it may manage its own subtree), and before the first pool the daemon
//! calls [`prepare_v2`], which does what this shell does:
//!
//! ```text
//! own=/sys/fs/cgroup/system.slice/drop-supervisor.service
//! mkdir $own/supervisor && for p in $(cat $own/cgroup.procs); do echo $p > $own/supervisor/cgroup.procs; done
//! echo '+memory +cpu +pids' > $own/cgroup.subtree_control
//! mkdir $own/drop-pools && echo '+memory +cpu +pids' > $own/drop-pools/cgroup.subtree_control
//! ```
//!
//! Pools then live in `$own/drop-pools/<pool>`. After that move `/proc/self/cgroup` names
//! `$own/supervisor`; that leaf is recognised and its parent is taken as the own cgroup.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{
    CPU_PERIOD_US, CgroupError, CgroupVersion, Cgroups, KILL_TIMEOUT, Limits, ProcCgroupEntry,
    Usage, check_weight, child_groups, cpu_quota_us, events_flag, kill_pids, make_dir, own_dir,
    parse_proc_self_cgroup, procs_in, read_trimmed, read_u64, remove_tree, validate_name,
    wait_until, write_value,
};

/// The leaf the daemon moves itself into, next to its subtree of pools.
pub const SUPERVISOR_LEAF: &str = "supervisor";
/// Controllers enabled for the pools.
pub const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// The own cgroup's path from the `0::` line, with the supervisor leaf taken off.
fn own_path(entries: &[ProcCgroupEntry]) -> Result<&str, CgroupError> {
    let entry = entries
        .iter()
        .find(|e| e.id == 0 && e.controllers.is_empty())
        .ok_or_else(|| CgroupError::ProcSelfCgroup {
            line: String::new(),
            reason: "no cgroup2 (`0::`) line",
        })?;
    let path = entry.path.as_str();
    Ok(match path.strip_suffix(SUPERVISOR_LEAF) {
        Some(parent) if parent.ends_with('/') => match parent.trim_end_matches('/') {
            "" => "/",
            p => p,
        },
        _ => path,
    })
}

/// Names from a `cgroup.controllers`/`cgroup.subtree_control` file (a written `+x` counts as `x`).
fn controller_set(path: &Path) -> Result<Vec<String>, CgroupError> {
    let text = match read_trimmed(path) {
        Ok(text) => text,
        Err(CgroupError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            String::new()
        }
        Err(e) => return Err(e),
    };
    Ok(text
        .split_whitespace()
        .map(|c| c.trim_start_matches('+').to_string())
        .collect())
}

fn require_controllers(path: &Path) -> Result<(), CgroupError> {
    let have = controller_set(path)?;
    match CONTROLLERS.iter().find(|c| !have.iter().any(|h| h == *c)) {
        Some(controller) => Err(CgroupError::ControllerNotEnabled {
            controller,
            path: path.to_path_buf(),
        }),
        None => Ok(()),
    }
}

/// Makes the own cgroup ready for pools (see the module comment): checks that `memory cpu pids`
/// were delegated to it, moves every process of the own cgroup into `<own>/supervisor`, and
/// enables the controllers in `<own>` and `<own>/<subtree>`. Idempotent: a second call (or a
/// restarted daemon) finds itself in the leaf already. In the root cgroup (no systemd) nothing
/// is moved: the root is exempt from the no-internal-processes rule.
pub fn prepare_v2(
    cgroup_root: &Path,
    proc_self_cgroup: &str,
    subtree: &str,
) -> Result<(), CgroupError> {
    validate_name(subtree)?;
    let entries = parse_proc_self_cgroup(proc_self_cgroup)?;
    let own_rel = own_path(&entries)?;
    let own = own_dir(cgroup_root, own_rel);
    require_controllers(&own.join("cgroup.controllers"))?;
    if own_rel != "/" {
        let leaf = own.join(SUPERVISOR_LEAF);
        make_dir(&leaf)?;
        let procs = own.join("cgroup.procs");
        for pid in read_trimmed(&procs)?.split_whitespace() {
            // One pid per write(2): that is how cgroup.procs takes them.
            write_value(&leaf.join("cgroup.procs"), pid)?;
        }
    }
    let enable = "+memory +cpu +pids";
    write_value(&own.join("cgroup.subtree_control"), enable)?;
    let pools = own.join(subtree);
    make_dir(&pools)?;
    write_value(&pools.join("cgroup.subtree_control"), enable)?;
    tracing::info!(own = %own.display(), subtree, "cgroup v2 delegation prepared");
    Ok(())
}

#[derive(Debug)]
pub struct V2Cgroups {
    /// `<root>/<own cgroup>/<subtree>`.
    subtree_dir: PathBuf,
}

impl V2Cgroups {
    pub fn new(
        root: &Path,
        entries: &[ProcCgroupEntry],
        subtree: &str,
    ) -> Result<V2Cgroups, CgroupError> {
        validate_name(subtree)?;
        let own = own_dir(root, own_path(entries)?);
        if !own.is_dir() {
            return Err(CgroupError::NoHierarchy {
                root: root.to_path_buf(),
                reason: format!("own cgroup {} is missing", own.display()),
            });
        }
        Ok(V2Cgroups {
            subtree_dir: own.join(subtree),
        })
    }

    fn dir(&self, name: &str) -> Result<PathBuf, CgroupError> {
        validate_name(name)?;
        Ok(self.subtree_dir.join(name))
    }

    fn existing(&self, name: &str) -> Result<PathBuf, CgroupError> {
        let dir = self.dir(name)?;
        if dir.is_dir() {
            Ok(dir)
        } else {
            Err(CgroupError::NotFound {
                name: name.to_string(),
                path: dir,
            })
        }
    }

    /// For kernels before 5.14 (no `cgroup.kill`): freeze, SIGKILL every pid, thaw.
    /// Returns whether the group became empty in time.
    fn freeze_and_kill(&self, dir: &Path) -> Result<bool, CgroupError> {
        let freeze = dir.join("cgroup.freeze");
        write_value(&freeze, "1")?;
        let frozen = wait_until(Duration::from_millis(500), || events_flag(dir, "frozen"))?;
        if !frozen {
            tracing::warn!(group = %dir.display(), "group did not report frozen; killing anyway");
        }
        let killed = procs_in(&[dir.to_path_buf()]).map(|pids| kill_pids(&pids));
        write_value(&freeze, "0")?;
        killed?;
        let dirs = [dir.to_path_buf()];
        wait_until(KILL_TIMEOUT, || {
            if events_flag(dir, "populated")? {
                kill_pids(&procs_in(&dirs)?);
                Ok(false)
            } else {
                Ok(true)
            }
        })
    }
}

impl Cgroups for V2Cgroups {
    fn create(&self, name: &str, limits: &Limits) -> Result<(), CgroupError> {
        let dir = self.dir(name)?;
        // A worker's group inside its pool's carries no limits: the pool's cover it (cgroup v2
        // limits are hierarchical), so no controller is enabled below the pool.
        if super::is_nested(name) {
            return super::make_child_dir(&dir);
        }
        let memory = limits
            .memory_bytes
            .map_or_else(|| "max".to_string(), |b| b.to_string());
        let quota = match limits.cpu_quota {
            Some(cores) => cpu_quota_us(cores)?.to_string(),
            None => "max".to_string(),
        };
        let weight = check_weight(limits.cpu_weight.unwrap_or(100))?;
        let pids = limits
            .pids_max
            .map_or_else(|| "max".to_string(), |n| n.to_string());
        // Without this the limit files would not exist in the new group.
        require_controllers(&self.subtree_dir.join("cgroup.subtree_control"))?;
        make_dir(&dir)?;
        write_value(&dir.join("memory.max"), &memory)?;
        write_value(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
        write_value(&dir.join("cpu.weight"), &weight.to_string())?;
        write_value(&dir.join("pids.max"), &pids)?;
        tracing::info!(group = name, ?limits, "cgroup v2 group ready");
        Ok(())
    }

    fn attach_paths(&self, name: &str) -> Result<Vec<PathBuf>, CgroupError> {
        Ok(vec![self.existing(name)?.join("cgroup.procs")])
    }

    fn pids(&self, name: &str) -> Result<Vec<i32>, CgroupError> {
        procs_in(&[self.existing(name)?])
    }

    fn kill_all(&self, name: &str) -> Result<(), CgroupError> {
        let dir = self.dir(name)?;
        if !dir.is_dir() {
            return Ok(());
        }
        let started = Instant::now();
        let kill = dir.join("cgroup.kill");
        let empty = if kill.is_file() {
            write_value(&kill, "1")?;
            wait_until(KILL_TIMEOUT, || Ok(!events_flag(&dir, "populated")?))?
        } else {
            self.freeze_and_kill(&dir)?
        };
        if !empty {
            return Err(CgroupError::KillTimeout {
                path: dir,
                waited: KILL_TIMEOUT,
            });
        }
        tracing::info!(group = name, took = ?started.elapsed(), "cgroup killed");
        Ok(())
    }

    fn remove(&self, name: &str) -> Result<(), CgroupError> {
        let dir = self.dir(name)?;
        if !dir.is_dir() {
            return Ok(());
        }
        let count = procs_in(std::slice::from_ref(&dir))?.len();
        let populated = dir.join("cgroup.events").is_file() && events_flag(&dir, "populated")?;
        if count > 0 || populated {
            return Err(CgroupError::Populated { path: dir, count });
        }
        remove_tree(&dir)?;
        tracing::info!(group = name, "cgroup v2 group removed");
        Ok(())
    }

    fn list(&self) -> Result<Vec<String>, CgroupError> {
        Ok(child_groups(&self.subtree_dir)?
            .into_iter()
            .filter(|n| validate_name(n).is_ok())
            .collect())
    }

    fn usage(&self, name: &str) -> Result<Usage, CgroupError> {
        let dir = self.existing(name)?;
        let stat_path = dir.join("cpu.stat");
        let stat = read_trimmed(&stat_path)?;
        let usage_usec = stat
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| CgroupError::Parse {
                path: stat_path.clone(),
                text: stat.clone(),
            })?;
        Ok(Usage {
            memory_bytes: read_u64(&dir.join("memory.current"))?,
            cpu_usage_ns: usage_usec.saturating_mul(1000),
            pids: read_u64(&dir.join("pids.current"))?,
        })
    }

    fn version(&self) -> CgroupVersion {
        CgroupVersion::V2
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::process::Command;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::super::detect;
    use super::*;

    const OWN: &str = "system.slice/drop-supervisor.service";
    const PROC: &str = "0::/system.slice/drop-supervisor.service\n";

    /// What the kernel shows a delegated service on a pure cgroup2 host.
    fn fixture() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let own = root.join(OWN);
        fs::create_dir_all(&own).unwrap();
        fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory hugetlb pids rdma misc\n",
        )
        .unwrap();
        fs::write(own.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        fs::write(own.join("cgroup.subtree_control"), "\n").unwrap();
        fs::write(own.join("cgroup.procs"), "4242\n").unwrap();
        dir
    }

    fn prepared() -> (tempfile::TempDir, Box<dyn Cgroups>) {
        let dir = fixture();
        prepare_v2(dir.path(), PROC, "pools").unwrap();
        let cg = detect(dir.path(), PROC, "pools").unwrap();
        (dir, cg)
    }

    /// The files the kernel would create in a new group with memory, cpu, pids enabled.
    fn kernel_files(group: &Path, procs: &str, populated: bool) {
        fs::write(group.join("cgroup.procs"), procs).unwrap();
        let events = format!("populated {}\nfrozen 0\n", u8::from(populated));
        fs::write(group.join("cgroup.events"), events).unwrap();
        fs::write(group.join("cgroup.freeze"), "0\n").unwrap();
    }

    /// Like the kernel, a reader never sees a half-written file.
    fn atomic_write(path: &Path, text: &str) {
        let name = path.file_name().unwrap().to_str().unwrap();
        let tmp = path.with_file_name(format!(".{name}.tmp"));
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, path).unwrap();
    }

    fn read(path: PathBuf) -> String {
        fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .to_string()
    }

    #[test]
    fn prepare_moves_into_leaf_and_enables_controllers() {
        let dir = fixture();
        let own = dir.path().join(OWN);
        prepare_v2(dir.path(), PROC, "pools").unwrap();
        assert_eq!(read(own.join("supervisor/cgroup.procs")), "4242");
        assert_eq!(
            read(own.join("cgroup.subtree_control")),
            "+memory +cpu +pids"
        );
        assert_eq!(
            read(own.join("pools/cgroup.subtree_control")),
            "+memory +cpu +pids"
        );
        // After the move /proc/self/cgroup names the leaf; again is harmless and uses the parent.
        let in_leaf = format!("0::/{OWN}/supervisor\n");
        prepare_v2(dir.path(), &in_leaf, "pools").unwrap();
        assert!(!own.join("supervisor/supervisor").exists());
        let cg = detect(dir.path(), &in_leaf, "pools").unwrap();
        cg.create("p", &Limits::default()).unwrap();
        assert!(own.join("pools/p").is_dir());
    }

    #[test]
    fn prepare_refuses_without_delegated_controllers() {
        let dir = fixture();
        fs::write(dir.path().join(OWN).join("cgroup.controllers"), "cpu\n").unwrap();
        let err = prepare_v2(dir.path(), PROC, "pools").unwrap_err();
        assert!(
            matches!(
                err,
                CgroupError::ControllerNotEnabled {
                    controller: "memory",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("cgroup.controllers"), "{err}");
    }

    #[test]
    fn create_refuses_before_prepare() {
        let dir = fixture();
        let cg = detect(dir.path(), PROC, "pools").unwrap();
        assert_eq!(cg.version(), CgroupVersion::V2);
        let err = cg.create("p", &Limits::default()).unwrap_err();
        assert!(
            matches!(err, CgroupError::ControllerNotEnabled { .. }),
            "{err}"
        );
    }

    #[test]
    fn create_writes_limits() {
        let (dir, cg) = prepared();
        let limits = Limits {
            memory_bytes: Some(100 << 20),
            cpu_quota: Some(0.5),
            cpu_weight: Some(50),
            pids_max: Some(64),
        };
        cg.create("pyex", &limits).unwrap();
        let g = dir.path().join(OWN).join("pools/pyex");
        assert_eq!(read(g.join("memory.max")), "104857600");
        assert_eq!(read(g.join("cpu.max")), "50000 100000");
        assert_eq!(read(g.join("cpu.weight")), "50");
        assert_eq!(read(g.join("pids.max")), "64");

        cg.create("pyex", &Limits::default()).unwrap();
        assert_eq!(read(g.join("memory.max")), "max");
        assert_eq!(read(g.join("cpu.max")), "max 100000");
        assert_eq!(read(g.join("cpu.weight")), "100");
        assert_eq!(read(g.join("pids.max")), "max");

        let bad = Limits {
            cpu_weight: Some(0),
            ..Limits::default()
        };
        assert!(matches!(
            cg.create("pyex", &bad),
            Err(CgroupError::InvalidLimit { .. })
        ));
        assert!(matches!(
            cg.create("..", &Limits::default()),
            Err(CgroupError::InvalidName { .. })
        ));
    }

    #[test]
    fn attach_paths_list_and_usage() {
        let (dir, cg) = prepared();
        assert!(matches!(
            cg.attach_paths("a"),
            Err(CgroupError::NotFound { .. })
        ));
        cg.create("a", &Limits::default()).unwrap();
        cg.create("b", &Limits::default()).unwrap();
        let pools = dir.path().join(OWN).join("pools");
        assert_eq!(
            cg.attach_paths("a").unwrap(),
            [pools.join("a/cgroup.procs")]
        );
        // Files and odd names in the subtree are not pools.
        fs::create_dir(pools.join(".odd")).unwrap();
        assert_eq!(cg.list().unwrap(), ["a", "b"]);

        kernel_files(&pools.join("a"), "10\n11\n", true);
        fs::create_dir(pools.join("a/nested")).unwrap();
        fs::write(pools.join("a/nested/cgroup.procs"), "12\n10\n").unwrap();
        assert_eq!(cg.pids("a").unwrap(), [10, 11, 12]);
        fs::write(pools.join("a/memory.current"), "4096\n").unwrap();
        fs::write(
            pools.join("a/cpu.stat"),
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n",
        )
        .unwrap();
        fs::write(pools.join("a/pids.current"), "3\n").unwrap();
        let usage = cg.usage("a").unwrap();
        assert_eq!(
            usage,
            Usage {
                memory_bytes: 4096,
                cpu_usage_ns: 1_500_000,
                pids: 3
            }
        );
    }

    #[test]
    fn remove_refuses_populated_then_removes_depth_first() {
        let (dir, cg) = prepared();
        cg.create("a", &Limits::default()).unwrap();
        let g = dir.path().join(OWN).join("pools/a");
        kernel_files(&g, "77\n", true);
        let err = cg.remove("a").unwrap_err();
        assert!(
            matches!(err, CgroupError::Populated { count: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("pools/a"), "{err}");
        assert!(g.is_dir());

        // The kernel empties a group's files on rmdir; in the fixture they must go first.
        fs::create_dir(g.join("child")).unwrap();
        for entry in fs::read_dir(&g).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                fs::remove_file(path).unwrap();
            }
        }
        cg.remove("a").unwrap();
        assert!(!g.exists());
        cg.remove("a").unwrap();
        assert!(cg.list().unwrap().is_empty());
    }

    #[test]
    fn kill_all_writes_cgroup_kill_and_waits_for_populated_0() {
        let (dir, cg) = prepared();
        cg.create("a", &Limits::default()).unwrap();
        let g = dir.path().join(OWN).join("pools/a");
        kernel_files(&g, "", true);
        fs::write(g.join("cgroup.kill"), "").unwrap();
        // Plays the kernel: once "1" lands in cgroup.kill, the group empties a little later.
        let kernel = {
            let g = g.clone();
            std::thread::spawn(move || {
                for _ in 0..2000 {
                    if read(g.join("cgroup.kill")) == "1" {
                        std::thread::sleep(Duration::from_millis(30));
                        atomic_write(&g.join("cgroup.events"), "populated 0\nfrozen 0\n");
                        return true;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                false
            })
        };
        let started = Instant::now();
        cg.kill_all("a").unwrap();
        assert!(kernel.join().unwrap(), "cgroup.kill was not written");
        assert!(
            started.elapsed() >= Duration::from_millis(30),
            "returned before populated 0"
        );
    }

    #[test]
    fn kill_all_times_out_when_the_group_stays_populated() {
        let (dir, cg) = prepared();
        cg.create("a", &Limits::default()).unwrap();
        let g = dir.path().join(OWN).join("pools/a");
        kernel_files(&g, "", true);
        fs::write(g.join("cgroup.kill"), "").unwrap();
        let err = cg.kill_all("a").unwrap_err();
        assert!(matches!(err, CgroupError::KillTimeout { .. }), "{err}");
    }

    #[test]
    fn kill_all_without_cgroup_kill_freezes_and_kills_the_pids() {
        let (dir, cg) = prepared();
        cg.create("a", &Limits::default()).unwrap();
        let g = dir.path().join(OWN).join("pools/a");
        // A real child of ours stands in for the pool's process: it must get SIGKILL.
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        kernel_files(&g, &format!("{}\n", child.id()), true);
        let stop = Arc::new(AtomicBool::new(false));
        let kernel = {
            let (g, stop) = (g.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut saw_frozen = false;
                while !stop.load(Ordering::Relaxed) {
                    let freeze = read(g.join("cgroup.freeze"));
                    if freeze == "1" {
                        saw_frozen = true;
                        atomic_write(&g.join("cgroup.events"), "populated 1\nfrozen 1\n");
                    }
                    if let Ok(Some(status)) = child.try_wait() {
                        atomic_write(&g.join("cgroup.procs"), "");
                        atomic_write(&g.join("cgroup.events"), "populated 0\nfrozen 0\n");
                        return (saw_frozen, status);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                let _ = child.kill();
                (saw_frozen, child.wait().unwrap())
            })
        };
        let result = cg.kill_all("a");
        stop.store(true, Ordering::Relaxed);
        let (saw_frozen, status) = kernel.join().unwrap();
        result.unwrap();
        assert!(saw_frozen, "cgroup.freeze was not set");
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert_eq!(read(g.join("cgroup.freeze")), "0", "thawed afterwards");
    }

    #[test]
    fn kill_all_and_remove_of_a_missing_group_succeed() {
        let (_dir, cg) = prepared();
        cg.kill_all("gone").unwrap();
        cg.remove("gone").unwrap();
        assert!(matches!(cg.pids("gone"), Err(CgroupError::NotFound { .. })));
    }

    #[test]
    fn own_path_strips_the_supervisor_leaf_only() {
        let own = |text: &str| {
            own_path(&parse_proc_self_cgroup(text).unwrap())
                .unwrap()
                .to_string()
        };
        assert_eq!(own("0::/a/b\n"), "/a/b");
        assert_eq!(own("0::/a/b/supervisor\n"), "/a/b");
        assert_eq!(own("0::/a/notsupervisor\n"), "/a/notsupervisor");
        assert_eq!(own("0::/supervisor\n"), "/");
        assert_eq!(own("0::/\n"), "/");
    }
}
