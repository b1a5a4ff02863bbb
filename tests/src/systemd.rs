//! A throw-away systemd for tests: the distribution's systemd (252 on Debian 12) as PID 1 of
//! private pid/mount/uts/ipc/cgroup namespaces, with its own D-Bus system bus, started by
//! `tests/systemd-sandbox/sd-up.sh` (which documents the layout). Inside it, /tmp, /var and /dev
//! are private, /proc/sys, /sys and the host's filesystems are read-only, /etc is a private
//! overlay, and /run is `STATE/run` on the host. Units and limits set there are really enforced,
//! under the sandbox's own cgroup subtree.
//!
//! Reach it through its bus ([`SystemdSandbox::connect`]), never through systemd's private socket:
//! that one rejects peers outside its pid namespace, and zbus cannot parse systemd's direct-
//! connection `Sender` header. Dropping the sandbox powers it off (SIGKILL if that takes more
//! than 10 s), removes its cgroups and its state dir, also when a test panics.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures_util::StreamExt;
use zbus::fdo::{PropertiesChangedStream, PropertiesProxy};
use zbus::proxy::CacheProperties;
use zbus::{OwnedObjectPath, OwnedVariant};

use crate::Outcome;

/// How long [`SystemdSandbox::start`] waits for `running`.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the teardown waits for a graceful poweroff before SIGKILL.
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(10);

/// A running sandboxed systemd. See the module docs.
#[derive(Debug)]
pub struct SystemdSandbox {
    state: PathBuf,
    /// `sd-up.sh`, which has become `unshare`; its child is the sandbox's PID 1.
    unshare: Child,
    systemd_pid: i32,
    startup: Duration,
    system_state: String,
}

/// Options for [`SystemdSandbox::start_with`].
#[derive(Debug, Default, Clone)]
pub struct SandboxOptions {
    /// Host folders under /tmp that must stay visible inside, at the same path (the sandbox's /tmp
    /// is private). Paths outside /tmp are visible anyway, read-only.
    pub keep_tmp: Vec<PathBuf>,
    /// The state dir to use (it must not exist yet; default: a new `/tmp/drop<pid>x<n>`), so
    /// that its bus address can be known before the sandbox starts.
    pub state_dir: Option<PathBuf>,
    /// A network namespace (`/run/netns/NAME`) to start the sandbox in: its units then run in
    /// it too. Default: the caller's.
    pub netns: Option<PathBuf>,
}

/// A new state dir name for [`SandboxOptions::state_dir`].
pub fn new_state_dir() -> PathBuf {
    Path::new("/tmp").join(crate::unique_name("drop"))
}

/// The bus address of a sandbox with that state dir.
pub fn bus_address_of(state: &Path) -> String {
    format!(
        "unix:path={}",
        state.join("run/dbus/system_bus_socket").display()
    )
}

impl SystemdSandbox {
    /// `Some(skip)` when this machine cannot run the sandbox: not root, a tool missing, or no
    /// cgroup v1 layout (the sandbox scripts mount the v1 hierarchies of the hybrid hosts).
    pub fn unavailable() -> Option<Outcome> {
        if let Some(skip) = crate::require_root() {
            return Some(skip);
        }
        for cmd in [
            "unshare",
            "nsenter",
            "setpriv",
            "setsid",
            "systemctl",
            "dbus-daemon",
            "mount",
        ] {
            if let Some(skip) = crate::require_command(cmd) {
                return Some(skip);
            }
        }
        if !Path::new("/lib/systemd/systemd").is_file() {
            return Some(Outcome::Skip("/lib/systemd/systemd not installed".into()));
        }
        if !Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() {
            return Some(Outcome::Skip(
                "no cgroup v1 memory hierarchy at /sys/fs/cgroup/memory: the sandbox is written \
                 for the hybrid (v1) hosts"
                    .into(),
            ));
        }
        None
    }

    /// Starts a sandbox with default options and waits until its systemd reports `running` (or
    /// `degraded`) and its bus socket exists.
    pub fn start() -> anyhow::Result<SystemdSandbox> {
        Self::start_with(SandboxOptions::default())
    }

    /// Like [`SystemdSandbox::start`], with options.
    pub fn start_with(options: SandboxOptions) -> anyhow::Result<SystemdSandbox> {
        // Under /tmp on purpose (not $TMPDIR): sd-inner.sh keeps its top folder visible inside.
        let state = options.state_dir.clone().unwrap_or_else(new_state_dir);
        let script = crate::paths::workspace_root().join("tests/systemd-sandbox/sd-up.sh");
        let mut keep = Vec::new();
        for path in &options.keep_tmp {
            let path = path.to_str().context("keep_tmp path is not UTF-8")?;
            ensure!(
                path.starts_with("/tmp/"),
                "keep_tmp path {path} is not under /tmp"
            );
            ensure!(!path.contains(':'), "keep_tmp path {path} contains ':'");
            keep.push(path);
        }
        fs::create_dir(&state).with_context(|| format!("cannot create {}", state.display()))?;

        let started = Instant::now();
        // Not a process-group leader, so `setsid` in the script does not fork: the child stays
        // `unshare` until the sandbox ends and we can wait for it.
        let mut cmd = match &options.netns {
            // nsenter execs bash without forking (no pid namespace asked), so the child is
            // still the one that becomes `unshare`.
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display()))
                    .arg("--")
                    .arg("/bin/bash");
                c
            }
            None => Command::new("/bin/bash"),
        };
        let spawned = cmd
            .arg(&script)
            .arg(&state)
            .env("DROP_SD_KEEP_TMP", keep.join(":"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let unshare = match spawned {
            Ok(child) => child,
            Err(err) => {
                let _ = fs::remove_dir_all(&state);
                return Err(err).with_context(|| format!("cannot run {}", script.display()));
            }
        };
        // From here on, Drop cleans up whatever happens.
        let mut sandbox = SystemdSandbox {
            state,
            unshare,
            systemd_pid: 0,
            startup: Duration::ZERO,
            system_state: String::new(),
        };
        sandbox.wait_running(started)?;
        sandbox.startup = started.elapsed();
        Ok(sandbox)
    }

    fn wait_running(&mut self, started: Instant) -> anyhow::Result<()> {
        let pid_file = self.state.join("systemd.pid");
        let bus = self.bus_socket();
        let mut last = String::from("(not started)");
        while started.elapsed() < START_TIMEOUT {
            if let Some(status) = self.unshare.try_wait()? {
                let mut stderr = String::new();
                if let Some(mut pipe) = self.unshare.stderr.take() {
                    let _ = pipe.read_to_string(&mut stderr);
                }
                bail!(
                    "sandbox ended during startup ({status}){}\n{}",
                    if stderr.is_empty() {
                        String::new()
                    } else {
                        format!("\nsd-up.sh: {stderr}")
                    },
                    self.logs_tail(40)
                );
            }
            if self.systemd_pid == 0
                && let Ok(text) = fs::read_to_string(&pid_file)
            {
                self.systemd_pid = text.trim().parse().unwrap_or(0);
            }
            let bus_ready = fs::metadata(&bus).is_ok_and(|m| m.file_type().is_socket());
            if self.systemd_pid != 0 && bus_ready {
                // `systemctl` in the sandbox's pid namespace uses systemd's private socket.
                let out = self.command("systemctl", ["is-system-running"]).output()?;
                last = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if last == "running" || last == "degraded" {
                    self.system_state = last;
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        bail!(
            "sandbox systemd not running after {}s (state: {last})\n{}",
            START_TIMEOUT.as_secs(),
            self.logs_tail(40)
        )
    }

    /// The state dir on the host (`/tmp/drop<pid>x<n>`), visible inside at the same path.
    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    /// Host pid of the sandbox's systemd (PID 1 inside).
    pub fn systemd_pid(&self) -> i32 {
        self.systemd_pid
    }

    /// From spawning the sandbox to `running` with the bus socket present.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// What `systemctl is-system-running` said when the sandbox was up: `running` or `degraded`.
    pub fn system_state(&self) -> &str {
        &self.system_state
    }

    /// The D-Bus address of the sandbox's system bus.
    pub fn bus_address(&self) -> String {
        format!("unix:path={}", self.bus_socket().display())
    }

    fn bus_socket(&self) -> PathBuf {
        self.state.join("run/dbus/system_bus_socket")
    }

    /// A connection builder for the sandbox's system bus (the process environment is untouched).
    pub fn connection_builder(&self) -> zbus::connection::Builder<'static> {
        zbus::connection::Builder::address(self.bus_address().as_str())
    }

    /// Connects to the sandbox's system bus.
    pub async fn connect(&self) -> zbus::Result<zbus::Connection> {
        self.connection_builder().build().await
    }

    /// Where unit files go: the sandbox's /run/systemd/system, which outranks /etc and /usr/lib.
    /// Call [`SystemdSandbox::daemon_reload`] after changing it.
    pub fn unit_dir(&self) -> PathBuf {
        self.state.join("run/systemd/system")
    }

    /// The host path of `inside` (an absolute path as the sandbox sees it): /run/... lives in the
    /// state dir; anything else is reached through the sandbox's root, `/proc/PID/root`.
    pub fn host_path(&self, inside: impl AsRef<Path>) -> PathBuf {
        let inside = inside.as_ref();
        match inside.strip_prefix("/run") {
            Ok(rest) => self.state.join("run").join(rest),
            Err(_) => PathBuf::from(format!("/proc/{}/root", self.systemd_pid))
                .join(inside.strip_prefix("/").unwrap_or(inside)),
        }
    }

    /// A command run inside the sandbox's mount, pid and cgroup namespaces, like
    /// `nsenter -t PID -m -p -C -- PROGRAM ARGS...`. It is not part of any unit.
    pub fn command<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.systemd_pid.to_string())
            .args(["-m", "-p", "-C", "--"]);
        cmd.arg(program).args(args);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs a command inside (see [`SystemdSandbox::command`]) and returns its output; an error
    /// when it fails, with its stderr.
    pub fn run<I, S>(&self, program: &str, args: I) -> anyhow::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self
            .command(program, args)
            .output()
            .with_context(|| format!("cannot run nsenter for `{program}`"))?;
        ensure!(
            out.status.success(),
            "`{program}` in the sandbox failed ({}): {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
        Ok(out)
    }

    /// `systemctl daemon-reload` inside; returns once systemd has reloaded.
    pub fn daemon_reload(&self) -> anyhow::Result<()> {
        self.run("systemctl", ["daemon-reload"]).map(drop)
    }

    /// The host directory of the sandbox cgroup `inside` (as systemd names it, e.g. the unit's
    /// `ControlGroup` `/system.slice/x.service`) in one hierarchy (`memory`, `pids`, `systemd`,
    /// `unified`, ...).
    pub fn host_cgroup_dir(&self, hierarchy: &str, inside: &str) -> anyhow::Result<PathBuf> {
        let root = self
            .cgroup_roots()?
            .into_iter()
            .find(|dir| {
                let first = dir
                    .strip_prefix("/sys/fs/cgroup")
                    .ok()
                    .and_then(|p| p.iter().next());
                first == Some(OsStr::new(hierarchy))
            })
            .with_context(|| format!("the sandbox has no cgroup in hierarchy {hierarchy}"))?;
        Ok(root.join(inside.trim_start_matches('/')))
    }

    /// The host pid of a process that has `ns_pid` in the sandbox's pid namespace (systemd's
    /// `MainPID` is such a pid).
    pub fn host_pid(&self, ns_pid: u32) -> anyhow::Result<i32> {
        let ns = fs::read_link(format!("/proc/{}/ns/pid", self.systemd_pid))
            .context("cannot read the sandbox's pid namespace")?;
        for entry in fs::read_dir("/proc")? {
            let Ok(entry) = entry else { continue };
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            if fs::read_link(entry.path().join("ns/pid")).ok().as_ref() != Some(&ns) {
                continue;
            }
            let Ok(status) = fs::read_to_string(entry.path().join("status")) else {
                continue;
            };
            let innermost = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|l| l.split_whitespace().last())
                .and_then(|p| p.parse::<u32>().ok());
            if innermost == Some(ns_pid) {
                return Ok(pid);
            }
        }
        bail!("no process with pid {ns_pid} in the sandbox")
    }

    /// The last `lines` lines of systemd's console and of the namespace setup's log.
    pub fn logs_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for name in ["console.log", "unshare.log"] {
            let text = tail(&self.state.join(name), lines);
            if !text.trim().is_empty() {
                out.push_str(&format!("--- {name} (last {lines} lines) ---\n{text}"));
            }
        }
        out
    }

    /// `systemctl status` and the last journal lines of a unit, for error messages.
    pub fn unit_report(&self, unit: &str) -> String {
        let mut out = String::new();
        let runs: [&[&str]; 2] = [
            &[
                "systemctl",
                "status",
                "--no-pager",
                "--full",
                "--lines=0",
                unit,
            ],
            &["journalctl", "--no-pager", "--lines=30", "-u", unit],
        ];
        for argv in runs {
            match self.command(argv[0], &argv[1..]).output() {
                Ok(o) => {
                    out.push_str(&format!("--- {} ---\n", argv.join(" ")));
                    out.push_str(&String::from_utf8_lossy(&o.stdout));
                    out.push_str(&String::from_utf8_lossy(&o.stderr));
                }
                Err(err) => out.push_str(&format!("--- {}: {err}\n", argv.join(" "))),
            }
        }
        out
    }

    /// The cgroup directories sd-up.sh created on the host, one per hierarchy.
    fn cgroup_roots(&self) -> io::Result<Vec<PathBuf>> {
        Ok(fs::read_to_string(self.state.join("cgroups"))?
            .lines()
            .filter(|l| !l.is_empty())
            .map(PathBuf::from)
            .collect())
    }

    /// Poweroff, SIGKILL fallback, cgroups, state dir. Returns what could not be cleaned.
    fn teardown(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        // Only while our child (unshare) is alive is the sandbox's PID 1 surely not a reused pid.
        if self.systemd_pid > 0 && matches!(self.unshare.try_wait(), Ok(None)) {
            // SIGRTMIN+4 asks systemd for poweroff.target; in a container it then exits. (A pid
            // namespace's init only gets signals it handles: before the exec of systemd, this one
            // is ignored and the SIGKILL below does the work.)
            // SAFETY: kill(2) takes plain integers and touches no memory of ours.
            unsafe { libc::kill(self.systemd_pid, libc::SIGRTMIN() + 4) };
            let deadline = Instant::now() + POWEROFF_TIMEOUT;
            while Instant::now() < deadline && matches!(self.unshare.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(self.unshare.try_wait(), Ok(None)) {
                problems.push(format!(
                    "systemd did not power off within {}s, SIGKILL",
                    POWEROFF_TIMEOUT.as_secs()
                ));
            }
        }
        // unshare ignores SIGTERM; on SIGKILL its --kill-child SIGKILLs the namespace's PID 1,
        // which ends the whole pid namespace. (Harmless when it has exited already.)
        if matches!(self.unshare.try_wait(), Ok(None)) {
            let _ = self.unshare.kill();
        }
        let _ = self.unshare.wait();

        // Processes of a killed pid namespace can take a moment to leave their cgroups.
        match self.cgroup_roots() {
            Ok(roots) => {
                for root in roots {
                    let deadline = Instant::now() + Duration::from_secs(5);
                    loop {
                        match remove_cgroup_tree(&root) {
                            Ok(()) => break,
                            Err(_) if !root.exists() => break,
                            Err(err) if Instant::now() >= deadline => {
                                problems.push(format!("cannot remove {}: {err}", root.display()));
                                break;
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(50)),
                        }
                    }
                }
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => problems.push(format!("cannot read the sandbox's cgroup list: {err}")),
        }
        if let Err(err) = fs::remove_dir_all(&self.state) {
            problems.push(format!("cannot remove {}: {err}", self.state.display()));
        }
        problems
    }
}

impl Drop for SystemdSandbox {
    fn drop(&mut self) {
        for problem in self.teardown() {
            eprintln!("systemd sandbox {}: {problem}", self.state.display());
        }
    }
}

/// `rmdir` a cgroup and every cgroup below it, deepest first (a cgroup with children or tasks
/// cannot be removed; its control files go with it).
fn remove_cgroup_tree(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    fs::remove_dir(dir)
}

/// The last `lines` lines of a file (reads at most its last 64 KiB).
fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    let mut out = all[all.len().saturating_sub(lines)..].join("\n");
    out.push('\n');
    out
}

// The systemd proxies are the daemon's own (`host::systemd`), so tests and product speak the
// same D-Bus API.
pub use drop_supervisor::host::systemd::{JobRemovedStream, ManagerProxy, ServiceProxy, UnitProxy};

/// Proxies for one loaded unit; properties are read fresh every time (no cache).
#[derive(Debug)]
pub struct UnitHandle<'a> {
    pub unit: UnitProxy<'a>,
    pub service: ServiceProxy<'a>,
}

impl<'a> UnitHandle<'a> {
    pub async fn new(conn: &zbus::Connection, path: OwnedObjectPath) -> zbus::Result<Self> {
        let unit = UnitProxy::builder(conn)
            .path(path.clone())
            .cache_properties(CacheProperties::No)
            .build()
            .await?;
        let service = ServiceProxy::builder(conn)
            .path(path)
            .cache_properties(CacheProperties::No)
            .build()
            .await?;
        Ok(UnitHandle { unit, service })
    }
}

/// A manager proxy without property cache, subscribed to systemd's signals.
pub async fn manager(conn: &zbus::Connection) -> zbus::Result<ManagerProxy<'static>> {
    let manager = ManagerProxy::builder(conn)
        .cache_properties(CacheProperties::No)
        .build()
        .await?;
    manager.subscribe().await?;
    Ok(manager)
}

/// Waits for the JobRemoved of `job` and returns its result (`done`, `failed`, `timeout`, ...).
/// Open `jobs` (`receive_job_removed`) before queueing the job, or the signal can be missed.
pub async fn wait_job(
    jobs: &mut JobRemovedStream,
    job: &OwnedObjectPath,
    timeout: Duration,
) -> anyhow::Result<String> {
    let wait = async {
        while let Some(signal) = jobs.next().await {
            let args = signal.args()?;
            if args.job.as_str() == job.as_str() {
                return Ok(args.result);
            }
        }
        bail!("the JobRemoved stream ended")
    };
    tokio::time::timeout(timeout, wait)
        .await
        .with_context(|| format!("no JobRemoved for {} within {timeout:?}", job.as_str()))?
}

/// PropertiesChanged signals of one unit object (all its interfaces). Open it before the change.
pub async fn property_changes(
    conn: &zbus::Connection,
    path: &OwnedObjectPath,
) -> zbus::Result<PropertiesChangedStream> {
    PropertiesProxy::builder(conn)
        .destination("org.freedesktop.systemd1")
        .path(path.clone())
        .build()
        .await?
        .receive_properties_changed()
        .await
}

/// Reads `changes` until none arrives for `quiet`, and returns the last value seen of each
/// property of `interface` (e.g. `org.freedesktop.systemd1.Service`). This is how to learn a
/// stopped unit's final `ExecMainCode`/`ExecMainStatus`: systemd may unload an inactive unit right
/// away, and a later read then sees a freshly loaded unit with no exit status.
pub async fn drain_changes(
    changes: &mut PropertiesChangedStream,
    interface: &str,
    quiet: Duration,
) -> anyhow::Result<HashMap<String, OwnedVariant>> {
    let mut seen = HashMap::new();
    while let Ok(Some(signal)) = tokio::time::timeout(quiet, changes.next()).await {
        let args = signal.args()?;
        if args.interface_name.as_str() != interface {
            continue;
        }
        for (name, value) in args.changed_properties() {
            seen.insert((*name).to_string(), value.try_to_owned()?);
        }
    }
    Ok(seen)
}

/// Whether `err` is systemd's "unit not loaded" answer (a stopped transient unit is gone).
pub fn is_no_such_unit(err: &zbus::Error) -> bool {
    matches!(err, zbus::Error::MethodError(name, _, _)
        if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit")
}
