//! What a worker may do, as root through the production path: the real daemon (pool cgroups
//! on) starts the pools of a flow, and the test reads each worker's `/proc/PID/status` from
//! outside. Without `user:` a worker runs as the node's worker user with exactly its group, no
//! capability in any set and `no_new_privs`; `user: root` is refused unless the node allows it,
//! and even then the worker is uid 0 without capabilities: it can neither write its image view
//! nor remount it.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use drop_tests::{Outcome, Test, paths, require_root, unique_name};

pub const TESTS: &[Test] = &[
    Test {
        name: "workers_run_unprivileged_without_capabilities_by_default",
        run: unprivileged_by_default,
    },
    Test {
        name: "workers_root_refused_unless_allowed_and_then_powerless",
        run: root_refused_then_powerless,
    },
];

/// A daemon on a temporary state folder with its own cgroup subtree; SIGTERM and wait on drop.
struct Daemon {
    child: Child,
    socket: std::path::PathBuf,
    dir: tempfile::TempDir,
    _cgroups: drop_tests::CgroupSubtreeGuard,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn start(runtime_extra: &str) -> anyhow::Result<Daemon> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("drop.sock");
        let subtree = unique_name("dropwk");
        let guard = drop_tests::CgroupSubtreeGuard(subtree.clone());
        let config = dir.path().join("drop.toml");
        std::fs::write(
            &config,
            format!(
                "[node]\nname = \"wk\"\nstate_dir = \"{0}/state\"\n[control]\nsocket = \"{1}\"\n\
                 [tuning]\nsysctl_root = \"{0}/sys\"\n[runtime]\ncgroup_subtree = \"{subtree}\"\n\
                 {runtime_extra}\n[gateway]\nlisten = \"off\"\n",
                dir.path().display(),
                socket.display(),
            ),
        )?;
        let child = Command::new(paths::bin("drop-supervisor"))
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let daemon = Daemon {
            child,
            socket,
            dir,
            _cgroups: guard,
        };
        let until = Instant::now() + Duration::from_secs(15);
        while std::os::unix::net::UnixStream::connect(&daemon.socket).is_err() {
            ensure!(Instant::now() < until, "daemon did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon)
    }

    fn ctl(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Ok(Command::new(paths::bin("dropctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()?)
    }

    fn apply(&self, flow: &str) -> anyhow::Result<std::process::Output> {
        let file = self.dir.path().join(format!("{}.yaml", unique_name("f")));
        std::fs::write(&file, flow)?;
        self.ctl(&["flow", "apply", file.to_str().context("utf-8")?])
    }

    fn call(&self, pool: &str, payload: &str) -> anyhow::Result<String> {
        let out = self.ctl(&["call", pool, payload])?;
        ensure!(out.status.success(), "call {pool}: {out:?}");
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    }

    /// `/proc/PID/status` of the pool's first worker, read by the test (not by the worker).
    fn worker_status(&self, pool: &str) -> anyhow::Result<BTreeMap<String, String>> {
        let out = self.ctl(&["--json", "pool", "show", pool])?;
        ensure!(out.status.success(), "pool show {pool}: {out:?}");
        let show: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let pid = show["pids"][0]
            .as_u64()
            .with_context(|| format!("no worker pid in {show}"))?;
        let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        Ok(text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect())
    }
}

const NO_CAPS: &str = "0000000000000000";
const CAP_SETS: [&str; 5] = ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"];

fn check_powerless(status: &BTreeMap<String, String>) -> anyhow::Result<()> {
    for set in CAP_SETS {
        ensure!(
            status.get(set).map(String::as_str) == Some(NO_CAPS),
            "{set} is {:?}, not empty",
            status.get(set)
        );
    }
    ensure!(
        status.get("NoNewPrivs").map(String::as_str) == Some("1"),
        "NoNewPrivs {:?}",
        status.get("NoNewPrivs")
    );
    Ok(())
}

fn status_line(status: &BTreeMap<String, String>) -> String {
    [
        "Uid",
        "Gid",
        "Groups",
        "CapInh",
        "CapPrm",
        "CapEff",
        "CapBnd",
        "CapAmb",
        "NoNewPrivs",
    ]
    .iter()
    .map(|k| format!("{k}: {}", status.get(*k).map_or("?", String::as_str)))
    .collect::<Vec<_>>()
    .join(" | ")
}

fn unprivileged_by_default() -> anyhow::Result<Outcome> {
    if let Some(skip) = require_root() {
        return Ok(skip);
    }
    let nobody = nix::unistd::User::from_name("nobody")?.context("no user nobody")?;
    // The daemon itself is root with every capability and supplementary groups of its own.
    let daemon = Daemon::start("worker_user = \"nobody\"")?;
    let out = daemon.apply("name: who\nfunc:\n  - name: who\n    cmd: /bin/cat\n    num: 1\n")?;
    ensure!(out.status.success(), "apply: {out:?}");
    ensure!(daemon.call("who", "hi")? == "hi", "the worker answers");
    let status = daemon.worker_status("who")?;
    println!("  worker: {}", status_line(&status));
    let (uid, gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());
    ensure!(
        status.get("Uid") == Some(&format!("{uid}\t{uid}\t{uid}\t{uid}")),
        "Uid {:?}",
        status.get("Uid")
    );
    ensure!(
        status.get("Gid") == Some(&format!("{gid}\t{gid}\t{gid}\t{gid}")),
        "Gid {:?}",
        status.get("Gid")
    );
    ensure!(
        status.get("Groups").map(String::as_str) == Some(gid.to_string().as_str()),
        "supplementary groups {:?}: exactly the worker's group",
        status.get("Groups")
    );
    check_powerless(&status)?;
    Ok(Outcome::Pass)
}

fn root_refused_then_powerless() -> anyhow::Result<Outcome> {
    if let Some(skip) = require_root() {
        return Ok(skip);
    }
    for tool in ["/usr/bin/mount", "/bin/sh"] {
        if !Path::new(tool).is_file() {
            return Ok(Outcome::Skip(format!("needs {tool}")));
        }
    }
    let root_flow = "name: r\nfunc:\n  - name: r\n    cmd: /bin/cat\n    user: root\n";
    {
        let daemon = Daemon::start("worker_user = \"nobody\"")?;
        let out = daemon.apply(root_flow)?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success()
                && err.contains("user: root")
                && err.contains("runtime.allow_root_workers"),
            "a root flow on a node that does not allow it: {out:?}"
        );
    }

    // Allowed: uid 0, but no capability — the image view stays read-only and cannot be
    // remounted, the host's file system neither.
    let daemon = Daemon::start("worker_user = \"nobody\"\nallow_root_workers = true")?;
    let bundle = tempfile::tempdir()?;
    std::fs::write(
        bundle.path().join("probe.sh"),
        "while read l; do\n\
         w=ok; echo x > /home/drop/written 2>/dev/null || w=refused\n\
         m=ok; mount -o remount,rw /home/drop 2>/dev/null || m=refused\n\
         h=ok; mount -o remount,rw / 2>/dev/null || h=refused\n\
         echo \"write=$w remount=$m host=$h\"\n\
         done\n",
    )?;
    let image = format!("{}:1", unique_name("probe"));
    let out = daemon.ctl(&[
        "image",
        "import",
        &image,
        bundle.path().to_str().context("utf-8")?,
    ])?;
    ensure!(out.status.success(), "image import: {out:?}");
    let out = daemon.apply(&format!(
        "name: r\nfunc:\n  - name: r\n    image: {image}\n    cmd: /bin/sh probe.sh\n    user: root\n"
    ))?;
    ensure!(out.status.success(), "apply with root allowed: {out:?}");
    let answer = daemon.call("r", "go")?;
    let status = daemon.worker_status("r")?;
    println!(
        "  root worker: {}; it reports {answer}",
        status_line(&status)
    );
    ensure!(
        status.get("Uid").is_some_and(|u| u.starts_with("0\t")),
        "Uid {:?}",
        status.get("Uid")
    );
    check_powerless(&status)?;
    if answer != "write=refused remount=refused host=refused" {
        bail!("a root worker without capabilities could change its view: {answer}");
    }
    let installed = daemon.dir.path().join("state/images").join(&image);
    ensure!(
        installed.is_dir(),
        "no installed image at {}",
        installed.display()
    );
    ensure!(
        !installed.join("written").exists(),
        "the installed bundle was written"
    );
    Ok(Outcome::Pass)
}
