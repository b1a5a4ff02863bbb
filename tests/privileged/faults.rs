//! The daemon killed with SIGKILL in the middle of load, then restarted: no request hangs, no
//! worker process (grandchildren included) or pool cgroup survives the restart, and the flows
//! come back by themselves.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use drop_tests::{Outcome, Test, paths, require_root, unique_name};

pub const TESTS: &[Test] = &[
    Test {
        name: "faults_sigkill_mid_load_restart_leaves_no_orphans",
        run: sigkill_mid_load,
    },
    Test {
        name: "faults_timeout_kills_the_workers_cgroup_with_escaped_grandchildren",
        run: timeout_kills_the_workers_cgroup,
    },
];

struct Daemon {
    child: Option<Child>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start(config: &Path, socket: &Path) -> anyhow::Result<Daemon> {
    let child = Command::new(paths::bin("drop-supervisor"))
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting drop-supervisor")?;
    let until = Instant::now() + Duration::from_secs(15);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        ensure!(
            Instant::now() < until,
            "daemon did not listen on {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Daemon { child: Some(child) })
}

fn dropctl(socket: &Path, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = Command::new(paths::bin("dropctl"))
        .arg("--socket")
        .arg(socket)
        .arg("--json")
        .args(args)
        .output()?;
    ensure!(
        out.status.success(),
        "dropctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn post(addr: &str, pool: &str, body: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let r =
        drop_supervisor::http::roundtrip(&mut s, "POST", &format!("/api/v1/{pool}"), Some(body))?;
    Ok((r.status, r.body))
}

/// Every pid in the cgroups below `dir` (pools and their workers' groups), recursively.
fn pids_in(dir: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten().filter(|e| e.path().is_dir()) {
        if let Ok(text) = std::fs::read_to_string(e.path().join("cgroup.procs")) {
            out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        out.extend(pids_in(&e.path()));
    }
    out
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

/// Where the pools of subtree `name` are: under the v1 pids hierarchy, or on a v2 host under
/// this process's own cgroup (the daemon it starts inherits it).
fn pids_subtree(name: &str) -> anyhow::Result<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup")?;
    if Path::new("/sys/fs/cgroup/cgroup.controllers").is_file() {
        let path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no cgroup2 line in /proc/self/cgroup")?;
        return Ok(PathBuf::from(format!(
            "/sys/fs/cgroup{}/{name}",
            path.trim_end_matches('/')
        )));
    }
    let path = own
        .lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
            ctrl.split(',')
                .any(|c| c == "pids")
                .then(|| path.to_string())
        })
        .context("no pids hierarchy in /proc/self/cgroup")?;
    Ok(PathBuf::from(format!(
        "/sys/fs/cgroup/pids{}/{name}",
        path.trim_end_matches('/')
    )))
}

fn sigkill_mid_load() -> anyhow::Result<Outcome> {
    if let Some(skip) = require_root() {
        return Ok(skip);
    }
    if !Path::new("/sys/fs/cgroup/pids").is_dir()
        && !Path::new("/sys/fs/cgroup/cgroup.controllers").is_file()
    {
        return Ok(Outcome::Skip(
            "neither a cgroup v1 pids hierarchy nor cgroup v2 (this test reads the pool groups)"
                .into(),
        ));
    }
    let dir = tempfile::tempdir()?;
    let subtree = unique_name("dropft");
    let _cleanup = drop_tests::CgroupSubtreeGuard(subtree.clone());
    let socket = dir.path().join("drop.sock");
    let config = dir.path().join("drop.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nname = \"faults\"\nstate_dir = \"{0}/state\"\n[control]\nsocket = \"{1}\"\n\
             [tuning]\nsysctl_root = \"{0}/sys\"\n[runtime]\ncgroup_subtree = \"{subtree}\"\n\
             [gateway]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().display(),
            socket.display()
        ),
    )?;
    let flow = dir.path().join("faults.yaml");
    std::fs::write(
        &flow,
        format!(
            "name: faults\nfunc:\n  - name: fecho\n    cmd: {}\n    num: 2\n  - name: forker\n    cmd: [/bin/sh, -c, 'sleep 1000 & while read l; do echo \"$l\"; done']\n",
            paths::bin("drop-echo-worker").display()
        ),
    )?;
    let cg = pids_subtree(&subtree)?;

    let mut daemon = start(&config, &socket)?;
    dropctl(&socket, &["flow", "apply", flow.to_str().context("utf-8")?])?;
    let gw = dropctl(&socket, &["status"])?["gateway"]
        .as_str()
        .context("gateway address")?
        .to_string();
    ensure!(
        post(&gw, "fecho", b"warm")?.0 == 200,
        "fecho answers before the crash"
    );
    let until = Instant::now() + Duration::from_secs(10);
    while pids_in(&cg).len() < 4 {
        ensure!(
            Instant::now() < until,
            "expected 2 echo workers + sh + sleep in {}",
            cg.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = pids_in(&cg);

    // Load from 4 threads; every request must end (answered or failed), none may hang.
    let stop = Arc::new(AtomicBool::new(false));
    let (answered, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let clients: Vec<_> = (0..4)
        .map(|t| {
            let (stop, answered, failed, gw) =
                (stop.clone(), answered.clone(), failed.clone(), gw.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    match post(
                        &gw,
                        if t % 2 == 0 { "fecho" } else { "forker" },
                        format!("{t}:{i}").as_bytes(),
                    ) {
                        Ok((200, _)) => answered.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    if started.elapsed() > Duration::from_secs(6) {
                        bail!("a request took {:?}", started.elapsed());
                    }
                    i += 1;
                }
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut child = daemon.child.take().context("daemon")?;
    child.kill()?; // SIGKILL
    child.wait()?;
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    }
    let (ok, err) = (
        answered.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    println!(
        "  under load across the SIGKILL: {ok} answered, {err} failed fast (daemon gone), none hung"
    );
    ensure!(ok > 0, "load was answered before the crash");
    let orphans: Vec<i32> = before.iter().copied().filter(|p| alive(*p)).collect();
    println!(
        "  left running by the crash: {} of {} pool processes",
        orphans.len(),
        before.len()
    );

    // Restart: leftovers are killed, the flow comes back and serves.
    let daemon = start(&config, &socket)?;
    let until = Instant::now() + Duration::from_secs(10);
    while before.iter().any(|p| alive(*p)) {
        ensure!(
            Instant::now() < until,
            "processes of the crashed instance survived the restart: {:?}",
            before.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let gw = dropctl(&socket, &["status"])?["gateway"]
        .as_str()
        .context("gateway address")?
        .to_string();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match post(&gw, "fecho", b"after") {
            Ok((200, body)) if body == b"after" => break,
            other if Instant::now() > until => {
                bail!("fecho does not answer after the restart: {other:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    ensure!(
        post(&gw, "forker", b"f")?.0 == 200,
        "forker answers after the restart"
    );

    // A clean stop removes every pool cgroup and process.
    let after = pids_in(&cg);
    let mut daemon = daemon;
    let mut child = daemon.child.take().context("daemon")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    child.wait()?;
    ensure!(
        after.iter().all(|p| !alive(*p)),
        "processes left after a clean stop"
    );
    let groups: Vec<_> = std::fs::read_dir(&cg)
        .map(|rd| rd.flatten().filter(|e| e.path().is_dir()).collect())
        .unwrap_or_default();
    ensure!(
        groups.is_empty(),
        "pool cgroups left after a clean stop: {groups:?}"
    );
    Ok(Outcome::Pass)
}

/// A worker that escapes its process group (`setsid`) and then times out: its own cgroup goes
/// with it, grandchild included, while the pool goes on serving.
fn timeout_kills_the_workers_cgroup() -> anyhow::Result<Outcome> {
    use drop_supervisor::runtime::PoolLookup;
    if let Some(skip) = require_root() {
        return Ok(skip);
    }
    let own = std::fs::read_to_string("/proc/self/cgroup")?;
    let subtree = unique_name("dropwk");
    let _cleanup = drop_tests::CgroupSubtreeGuard(subtree.clone());
    let cg: Arc<dyn drop_supervisor::runtime::cgroup::Cgroups> = Arc::from(
        drop_supervisor::runtime::cgroup::setup(Path::new("/sys/fs/cgroup"), &own, &subtree)?,
    );
    let dir = tempfile::tempdir()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let runtime = {
        let _g = rt.enter();
        drop_supervisor::runtime::Runtime::new(drop_supervisor::runtime::RuntimeOptions {
            state_dir: dir.path().join("state"),
            images_dir: dir.path().join("images"),
            logs_dir: dir.path().join("logs"),
            cgroups: Some(cg.clone()),
            worker_credentials: None,
            allow_root_workers: false,
            node_name: None,
        })
    };
    let flow = "name: esc\nfunc:\n  - name: esc\n    timeout: 500\n    cmd: [/bin/sh, -c, 'while read l; do case \"$l\" in spawn) setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo spawned;; hang) sleep 1000;; *) echo \"$l\";; esac; done']\n";
    let result = (|| -> anyhow::Result<()> {
        runtime.apply(flow, Path::new("esc.yaml"))?;
        let pool = runtime.pool("esc").context("pool esc")?;
        ensure!(pool.call(b"spawn")? == b"spawned", "spawn");
        // The grandchild execs `sleep` soon after the answer (slower in the TCG guest).
        let until = Instant::now() + Duration::from_secs(5);
        let escaped: Vec<i32> = loop {
            let found: Vec<i32> = cg
                .pids("esc")?
                .into_iter()
                .filter(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                        .is_ok_and(|c| c.starts_with("sleep"))
                })
                .collect();
            if !found.is_empty() || Instant::now() > until {
                break found;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        ensure!(
            escaped.len() == 1,
            "expected one escaped sleep in the pool's cgroup, found {escaped:?}"
        );
        let sid_differs = std::fs::read_to_string(format!("/proc/{}/stat", escaped[0]))?
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().nth(3))
            .map(str::to_string);
        println!(
            "  grandchild {} left the worker's session (sid {:?})",
            escaped[0], sid_differs
        );
        let t = Instant::now();
        ensure!(
            matches!(
                pool.call(b"hang"),
                Err(drop_supervisor::runtime::worker::pool::CallError::Timeout(
                    _
                ))
            ),
            "hang must time out"
        );
        let until = Instant::now() + Duration::from_secs(5);
        while alive(escaped[0]) {
            ensure!(
                Instant::now() < until,
                "the escaped grandchild {} survived the timeout",
                escaped[0]
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        println!(
            "  timeout after {:?}; the worker's cgroup, grandchild included, gone {:?} later",
            Duration::from_millis(500),
            t.elapsed().saturating_sub(Duration::from_millis(500))
        );
        ensure!(pool.call(b"next")? == b"next", "the pool serves again");
        Ok(())
    })();
    let _ = runtime.remove("esc");
    drop(runtime);
    drop(rt);
    result.map(|()| Outcome::Pass)
}
