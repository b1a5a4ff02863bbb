//! Pool cgroups on a real cgroup v2 kernel, as root. This host is hybrid v1, so these run in
//! the qemu guest of `cargo xtask test --vm` (Debian's stock 6.1 kernel, cgroup2 only); on a v1
//! host they skip, and the host run leaves them out. Each test owns a unique subtree, removed
//! on every exit path.

use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use drop_supervisor::runtime::cgroup::{self, CGROUP_ROOT, CgroupVersion, Cgroups, Limits};
use drop_tests::{Outcome, Test, require_root, unique_name};

use crate::cgroups::{is_dead, read, spawn_attached, wait_child};

pub const TESTS: &[Test] = &[
    Test {
        name: "cgroup_v2_create_writes_limits_to_the_real_files",
        run: create_writes_limits,
    },
    Test {
        name: "cgroup_v2_worker_is_in_its_group_before_exec",
        run: attached_before_exec,
    },
    Test {
        name: "cgroup_v2_pids_max_stops_a_fork_loop",
        run: pids_limit,
    },
    Test {
        name: "cgroup_v2_memory_limit_oom_kills",
        run: memory_limit,
    },
    Test {
        name: "cgroup_v2_kill_all_kills_double_forked_grandchildren",
        run: kill_all_grandchildren,
    },
    Test {
        name: "cgroup_v2_restart_lists_and_cleans_groups_of_a_crashed_instance",
        run: restart_cleans,
    },
];

/// A unique subtree on a v2 host, set up as the daemon does (`cgroup::setup`), and the children
/// started in it; dropping it kills, reaps and removes everything.
struct Scope {
    subtree: String,
    /// `<root>/<own cgroup>/<subtree>`.
    dir: PathBuf,
    own_rel: String,
    cg: Box<dyn Cgroups>,
    children: Vec<Child>,
}

impl Scope {
    fn new() -> anyhow::Result<Result<Scope, Outcome>> {
        if let Some(skip) = require_root() {
            return Ok(Err(skip));
        }
        if !Path::new(CGROUP_ROOT).join("cgroup.controllers").is_file() {
            return Ok(Err(Outcome::Skip(
                "not a cgroup v2 host (these run in the guest of `cargo xtask test --vm`)".into(),
            )));
        }
        let text = std::fs::read_to_string("/proc/self/cgroup")?;
        let subtree = unique_name("dropv2");
        let cg = cgroup::setup(Path::new(CGROUP_ROOT), &text, &subtree)?;
        ensure!(
            cg.version() == CgroupVersion::V2,
            "detected {:?}",
            cg.version()
        );
        // After setup: a test process outside the root was moved into a leaf, so read again.
        let text = std::fs::read_to_string("/proc/self/cgroup")?;
        let own = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no cgroup2 line")?
            .trim_end_matches('/')
            .to_string();
        let own_rel = own.strip_suffix("/supervisor").unwrap_or(&own).to_string();
        let dir = Path::new(CGROUP_ROOT)
            .join(own_rel.trim_start_matches('/'))
            .join(&subtree);
        Ok(Ok(Scope {
            subtree,
            dir,
            own_rel,
            cg,
            children: Vec::new(),
        }))
    }

    fn spawn_in(&mut self, name: &str, cmd: &mut Command) -> anyhow::Result<u32> {
        let child = spawn_attached(&self.cg.attach_paths(name)?, cmd)?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    fn wait_child(
        &mut self,
        pid: u32,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        wait_child(&mut self.children, pid, timeout)
    }

    /// Cleanup with errors reported, then proof that nothing of the subtree is left.
    fn finish(mut self) -> anyhow::Result<()> {
        for name in self.cg.list()? {
            self.cg.kill_all(&name)?;
            self.cg.remove(&name)?;
        }
        std::fs::remove_dir(&self.dir).with_context(|| format!("rmdir {}", self.dir.display()))?;
        ensure!(!self.dir.exists(), "{} left behind", self.dir.display());
        self.reap();
        Ok(())
    }

    fn reap(&mut self) {
        for mut child in self.children.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Ok(names) = self.cg.list() {
            for name in names {
                let _ = self.cg.kill_all(&name);
                let _ = self.cg.remove(&name);
            }
        }
        self.reap();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn scope() -> anyhow::Result<Result<Scope, Outcome>> {
    Scope::new()
}

fn create_writes_limits() -> anyhow::Result<Outcome> {
    let scope = match scope()? {
        Ok(s) => s,
        Err(skip) => return Ok(skip),
    };
    let limits = Limits {
        memory_bytes: Some(64 << 20),
        cpu_quota: Some(0.5),
        cpu_weight: Some(200),
        pids_max: Some(32),
    };
    scope.cg.create("pool", &limits)?;
    let dir = scope.dir.join("pool");
    let got = [
        read(&dir.join("memory.max"))?,
        read(&dir.join("cpu.max"))?,
        read(&dir.join("cpu.weight"))?,
        read(&dir.join("pids.max"))?,
    ];
    println!(
        "  {}: memory.max={} cpu.max={} cpu.weight={} pids.max={}",
        dir.display(),
        got[0],
        got[1],
        got[2],
        got[3]
    );
    ensure!(
        got[0] == "67108864" && got[1] == "50000 100000" && got[3] == "32",
        "limits not applied: {got:?}"
    );
    let controllers = read(&scope.dir.join("cgroup.subtree_control"))?;
    ensure!(
        ["cpu", "memory", "pids"]
            .iter()
            .all(|c| controllers.split(' ').any(|x| x == *c)),
        "the subtree's controllers: {controllers}"
    );
    // Update in place: an absent limit goes back to unlimited.
    scope.cg.create(
        "pool",
        &Limits {
            pids_max: Some(16),
            ..Limits::default()
        },
    )?;
    ensure!(read(&dir.join("memory.max"))? == "max");
    ensure!(read(&dir.join("cpu.max"))? == "max 100000");
    ensure!(read(&dir.join("pids.max"))? == "16");
    ensure!(scope.cg.list()? == ["pool"], "list: {:?}", scope.cg.list()?);
    ensure!(scope.cg.usage("pool")?.pids == 0);
    ensure!(scope.cg.create("../escape", &Limits::default()).is_err());
    scope.finish()?;
    Ok(Outcome::Pass)
}

fn attached_before_exec() -> anyhow::Result<Outcome> {
    let mut scope = match scope()? {
        Ok(s) => s,
        Err(skip) => return Ok(skip),
    };
    scope.cg.create("pool", &Limits::default())?;
    let want = format!("0::{}/{}/pool", scope.own_rel, scope.subtree);
    // The exec'd program's first act is reading its own cgroup: user code never runs outside.
    let out = spawn_attached(
        &scope.cg.attach_paths("pool")?,
        Command::new("cat")
            .arg("/proc/self/cgroup")
            .stdout(Stdio::piped()),
    )?
    .wait_with_output()?;
    let text = String::from_utf8(out.stdout)?;
    ensure!(text.trim() == want, "cat saw {text:?}, want {want:?}");
    println!("  exec'd program saw {}", text.trim());
    let pid = scope.spawn_in("pool", Command::new("sleep").arg("30"))?;
    ensure!(scope.cg.pids("pool")? == [pid as i32]);
    scope.cg.kill_all("pool")?;
    let status = scope.wait_child(pid, Duration::from_secs(5))?;
    ensure!(
        status.signal() == Some(libc::SIGKILL),
        "sleep ended with {status:?}"
    );
    scope.finish()?;
    Ok(Outcome::Pass)
}

fn pids_limit() -> anyhow::Result<Outcome> {
    let mut scope = match scope()? {
        Ok(s) => s,
        Err(skip) => return Ok(skip),
    };
    scope.cg.create(
        "pool",
        &Limits {
            pids_max: Some(8),
            ..Limits::default()
        },
    )?;
    let dir = scope.dir.join("pool");
    let script =
        "for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do sleep 30 & done; wait";
    let sh = scope.spawn_in(
        "pool",
        Command::new("/bin/sh")
            .args(["-c", script])
            .stderr(Stdio::null()),
    )?;
    let mut peak = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        peak = peak.max(read(&dir.join("pids.current"))?.parse::<u64>()?);
        std::thread::sleep(Duration::from_millis(20));
    }
    let events = read(&dir.join("pids.events"))?;
    let refused: u64 = events
        .lines()
        .find_map(|l| l.strip_prefix("max "))
        .context("pids.events format")?
        .parse()?;
    println!(
        "  pids.max=8, 20 background sleeps tried: peak pids.current={peak}, pids.events max={refused}"
    );
    ensure!(peak <= 8 && refused > 0, "peak {peak}, refused {refused}");
    scope.cg.kill_all("pool")?;
    let _ = scope.wait_child(sh, Duration::from_secs(5))?;
    scope.finish()?;
    Ok(Outcome::Pass)
}

fn memory_limit() -> anyhow::Result<Outcome> {
    if !Path::new("/usr/bin/python3").is_file() {
        return Ok(Outcome::Skip("/usr/bin/python3 not installed".into()));
    }
    let mut scope = match scope()? {
        Ok(s) => s,
        Err(skip) => return Ok(skip),
    };
    scope.cg.create(
        "pool",
        &Limits {
            memory_bytes: Some(32 << 20),
            ..Limits::default()
        },
    )?;
    let pid = scope.spawn_in(
        "pool",
        Command::new("/usr/bin/python3")
            .args([
                "-c",
                "b = bytearray(256 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096])",
            ])
            .stderr(Stdio::null()),
    )?;
    let status = scope.wait_child(pid, Duration::from_secs(60))?;
    let events = read(&scope.dir.join("pool").join("memory.events"))?;
    let oom_kills: u64 = events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .context("memory.events format")?
        .parse()?;
    println!(
        "  memory.max=32 MiB, 256 MiB touched: {status:?}, memory.events oom_kill={oom_kills}"
    );
    ensure!(
        status.signal() == Some(libc::SIGKILL),
        "ended with {status:?}"
    );
    ensure!(oom_kills >= 1, "no OOM kill counted: {events}");
    scope.finish()?;
    Ok(Outcome::Pass)
}

fn kill_all_grandchildren() -> anyhow::Result<Outcome> {
    let mut scope = match scope()? {
        Ok(s) => s,
        Err(skip) => return Ok(skip),
    };
    scope.cg.create("pool", &Limits::default())?;
    // A grandchild that left its session and process group: only the cgroup still holds it.
    let sh = scope.spawn_in(
        "pool",
        Command::new("/bin/sh")
            .args(["-c", "setsid sh -c 'sleep 300 & sleep 300' & sleep 300"])
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    )?;
    let until = Instant::now() + Duration::from_secs(10);
    let pids = loop {
        let pids = scope.cg.pids("pool")?;
        if pids.len() >= 4 {
            break pids;
        }
        ensure!(
            Instant::now() < until,
            "expected 4 processes, have {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let started = Instant::now();
    scope.cg.kill_all("pool")?;
    let _ = scope.wait_child(sh, Duration::from_secs(5))?;
    let until = Instant::now() + Duration::from_secs(5);
    while !pids.iter().all(|p| is_dead(*p)) {
        ensure!(Instant::now() < until, "survivors among {pids:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    println!(
        "  {} processes (a setsid grandchild among them) gone {:.1} ms after cgroup.kill",
        pids.len(),
        started.elapsed().as_secs_f64() * 1e3
    );
    scope.finish()?;
    Ok(Outcome::Pass)
}

fn restart_cleans() -> anyhow::Result<Outcome> {
    let mut scope = match scope()? {
        Ok(s) => s,
        Err(skip) => return Ok(skip),
    };
    for name in ["a", "b"] {
        scope.cg.create(name, &Limits::default())?;
        scope.spawn_in(name, Command::new("sleep").arg("300"))?;
    }
    // A new instance over the same subtree (a restarted daemon) finds both and cleans them.
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    let again = cgroup::setup(Path::new(CGROUP_ROOT), &text, &scope.subtree)?;
    let mut found = again.list()?;
    found.sort();
    ensure!(found == ["a", "b"], "a restarted instance lists {found:?}");
    for name in &found {
        again.kill_all(name)?;
        again.remove(name)?;
    }
    ensure!(again.list()?.is_empty(), "groups left: {:?}", again.list()?);
    println!("  a restarted instance found groups {found:?} and removed them");
    scope.reap();
    scope.finish()?;
    Ok(Outcome::Pass)
}
