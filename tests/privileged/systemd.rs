//! systemd integration: transient units with limits through D-Bus, the shipped unit, sysusers and
//! tmpfiles files checked by systemd's own tools, and the daemon run as that unit.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use drop_tests::netns::check;
use drop_tests::systemd::{self, SandboxOptions, SystemdSandbox, UnitHandle, wait_job};
use drop_tests::{Outcome, Test, paths, unique_name};
use zbus::Variant;

pub const TESTS: &[Test] = &[
    Test {
        name: "systemd_transient_unit_with_memory_limit",
        run: transient_unit_with_memory_limit,
    },
    Test {
        name: "systemd_unit_verify_is_clean",
        run: unit_verify_is_clean,
    },
    Test {
        name: "systemd_daemon_unit_ready_status_and_sigkill_restart_without_orphans",
        run: daemon_as_unit_ready_and_status,
    },
];

/// How long a start or stop job may take before the test gives up.
const JOB_TIMEOUT: Duration = Duration::from_secs(30);
const UNIT: &str = "drop-supervisor.service";

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn shipped(file: &str) -> PathBuf {
    paths::workspace_root().join("systemd").join(file)
}

/// A transient `sleep` with MemoryMax=64M: the property reads back and the host's v1 cgroup
/// really carries the limit; after a stop the unit and its cgroup are gone.
fn transient_unit_with_memory_limit() -> anyhow::Result<Outcome> {
    const LIMIT: u64 = 64 * 1024 * 1024;
    if let Some(skip) = SystemdSandbox::unavailable() {
        return Ok(skip);
    }
    let sandbox = SystemdSandbox::start()?;
    println!(
        "  sandbox systemd {} after {:?}",
        sandbox.system_state(),
        sandbox.startup_time()
    );

    runtime()?.block_on(async {
        let conn = sandbox
            .connect()
            .await
            .context("cannot connect to the sandbox's bus")?;
        let manager = systemd::manager(&conn).await?;
        let mut jobs = manager.receive_job_removed().await?;
        let unit = format!("{}.service", unique_name("drop-mem"));

        // systemd-run -p MemoryMax=64M /bin/sleep 300
        let exec_start = vec![("/bin/sleep", vec!["/bin/sleep", "300"], false)];
        let properties = [
            (
                "Description",
                Variant::new("DROP test sleeper with MemoryMax=64M"),
            ),
            ("ExecStart", Variant::new(exec_start)),
            ("MemoryMax", Variant::new(LIMIT)),
        ];
        let asked = Instant::now();
        let job = manager
            .start_transient_unit(&unit, "fail", &properties, &[])
            .await?;
        let result = wait_job(&mut jobs, &job, JOB_TIMEOUT).await?;
        ensure!(
            result == "done",
            "start job: {result}\n{}",
            sandbox.unit_report(&unit)
        );
        println!("  StartTransientUnit job done after {:?}", asked.elapsed());

        let handle = UnitHandle::new(&conn, manager.get_unit(&unit).await?).await?;
        let state = handle.unit.active_state().await?;
        ensure!(
            state == "active",
            "ActiveState={state}\n{}",
            sandbox.unit_report(&unit)
        );
        let memory_max = handle.service.memory_max().await?;
        ensure!(
            memory_max == LIMIT,
            "MemoryMax property is {memory_max}, expected {LIMIT}"
        );

        let cgroup = handle.service.control_group().await?;
        let dir = sandbox.host_cgroup_dir("memory", &cgroup)?;
        let limit_file = dir.join("memory.limit_in_bytes");
        let on_host = fs::read_to_string(&limit_file)
            .with_context(|| format!("cannot read {}", limit_file.display()))?;
        ensure!(
            on_host.trim() == LIMIT.to_string(),
            "{} is {}, expected {LIMIT}",
            limit_file.display(),
            on_host.trim()
        );
        println!("  {} = {}", limit_file.display(), on_host.trim());

        let job = manager.stop_unit(&unit, "replace").await?;
        let result = wait_job(&mut jobs, &job, JOB_TIMEOUT).await?;
        ensure!(result == "done", "stop job: {result}");
        // A stopped transient unit is garbage-collected; if it is still loaded it must be inactive.
        match manager.get_unit(&unit).await {
            Err(err) if systemd::is_no_such_unit(&err) => {
                println!("  after stop: GetUnit -> NoSuchUnit (garbage-collected)");
            }
            Err(err) => return Err(err).context("GetUnit after stop"),
            Ok(path) => {
                let state = UnitHandle::new(&conn, path)
                    .await?
                    .unit
                    .active_state()
                    .await?;
                ensure!(state == "inactive", "after stop, ActiveState={state}");
                println!("  after stop: ActiveState=inactive");
            }
        }
        ensure!(!dir.exists(), "{} still exists after stop", dir.display());
        Ok(Outcome::Pass)
    })
}

/// `systemd-analyze verify` prints nothing for the shipped unit (unknown keys and most mistakes
/// are warnings with exit 0, so any output fails); sysusers and tmpfiles files applied to an empty
/// root create what they promise.
fn unit_verify_is_clean() -> anyhow::Result<Outcome> {
    if let Some(skip) = drop_tests::require_root() {
        return Ok(skip);
    }
    for cmd in [
        "systemd-analyze",
        "systemd-sysusers",
        "systemd-tmpfiles",
        "unshare",
    ] {
        if let Some(skip) = drop_tests::require_command(cmd) {
            return Ok(skip);
        }
    }
    let daemon = paths::bin("drop-supervisor");
    if !daemon.is_file() {
        return Ok(Outcome::Skip(format!(
            "{} not built (cargo build -p drop-supervisor); verify needs an existing ExecStart",
            daemon.display()
        )));
    }
    let tmp = tempfile::Builder::new().prefix("drop-verify").tempdir()?;

    // The unit, with ExecStart pointing at the built binary (verify checks that it exists).
    let text = fs::read_to_string(shipped(UNIT))?;
    const SHIPPED_EXEC: &str = "ExecStart=/usr/bin/drop-supervisor ";
    ensure!(
        text.matches(SHIPPED_EXEC).count() == 1,
        "{UNIT} has no single `{SHIPPED_EXEC}`"
    );
    let unit_file = tmp.path().join(UNIT);
    // ExecStart= and ExecStopPost= (the floating-IP release) name the same binary.
    let exec = format!("{} ", daemon.display());
    fs::write(&unit_file, text.replace("/usr/bin/drop-supervisor ", &exec))?;
    // verify writes /run/systemd/systemd-units-load: give it a private, empty /run.
    let in_private_run = |args: &[&str]| -> anyhow::Result<std::process::Output> {
        let script = "mount -t tmpfs -o mode=755 drop-verify /run && exec \"$@\"";
        Ok(Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                script,
                "sh",
            ])
            .args(args)
            .output()?)
    };
    let unit_path = unit_file.to_str().context("temp path is not UTF-8")?;
    let out = in_private_run(&["systemd-analyze", "verify", unit_path])?;
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success() && printed.trim().is_empty(),
        "systemd-analyze verify {UNIT}: {} with output:\n{printed}",
        out.status
    );
    println!("  systemd-analyze verify {UNIT}: exit 0, no output");
    let out = in_private_run(&["systemd-analyze", "security", "--offline=yes", unit_path])?;
    let report = String::from_utf8_lossy(&out.stdout);
    if let Some(line) = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
    {
        println!(
            "  systemd-analyze security: {}",
            line.trim_start_matches(['→', ' '])
        );
    }

    // sysusers then tmpfiles into an empty root, as a package installation does.
    let root = tmp.path().join("root");
    fs::create_dir_all(root.join("etc"))?;
    let root_arg = format!("--root={}", root.display());
    let run_tool = |tool: &str, args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new(tool).args(args).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        ensure!(
            out.status.success(),
            "{tool} {args:?}: {}: {stderr}",
            out.status
        );
        Ok(stderr)
    };
    let sysusers = shipped("drop.sysusers");
    let said = run_tool("systemd-sysusers", &[&root_arg, path_str(&sysusers)?])?;
    // It reports what it creates; anything else is a complaint about the file.
    let complaints: Vec<&str> = said
        .lines()
        .filter(|l| !l.starts_with("Creating "))
        .collect();
    ensure!(
        complaints.is_empty(),
        "systemd-sysusers printed: {complaints:?}"
    );
    let group = fs::read_to_string(root.join("etc/group"))?;
    let gid = entry_id(&group, "drop", 2).context("sysusers created no group `drop`")?;
    let passwd = fs::read_to_string(root.join("etc/passwd"))?;
    let user = passwd
        .lines()
        .find(|l| l.starts_with("drop:"))
        .context("no user `drop`")?;
    let fields: Vec<&str> = user.split(':').collect();
    ensure!(fields.len() == 7, "malformed passwd line: {user}");
    ensure!(
        fields[3] == gid.to_string(),
        "user drop has gid {}, group drop is {gid}",
        fields[3]
    );
    ensure!(
        fields[6].ends_with("nologin"),
        "user drop has shell {}",
        fields[6]
    );
    println!(
        "  systemd-sysusers: user drop ({}), group drop ({gid})",
        fields[2]
    );

    let tmpfiles = shipped("drop.tmpfiles");
    let complaints = run_tool(
        "systemd-tmpfiles",
        &[&root_arg, "--create", path_str(&tmpfiles)?],
    )?;
    ensure!(
        complaints.is_empty(),
        "systemd-tmpfiles printed: {complaints}"
    );
    for dir in ["var/lib/drop", "run/drop"] {
        let meta =
            fs::metadata(root.join(dir)).with_context(|| format!("tmpfiles made no /{dir}"))?;
        ensure!(meta.is_dir(), "/{dir} is not a directory");
        let mode = meta.permissions().mode() & 0o7777;
        ensure!(
            mode == 0o750 && meta.uid() == 0 && meta.gid() == gid,
            "/{dir} is {mode:o} {}:{}, expected 750 0:{gid}",
            meta.uid(),
            meta.gid()
        );
    }
    println!("  systemd-tmpfiles: /var/lib/drop and /run/drop 0750 root:drop");
    Ok(Outcome::Pass)
}

/// The shipped unit in a real systemd, as a package installs it (sysusers, tmpfiles, unit), with
/// a drop-in for the built binary and a test config: it becomes active (READY=1), dropctl gets its
/// status over the socket, it logs to the journal, and on stop it exits 0 and removes its socket.
fn daemon_as_unit_ready_and_status() -> anyhow::Result<Outcome> {
    if let Some(skip) = SystemdSandbox::unavailable() {
        return Ok(skip);
    }
    let daemon = paths::bin("drop-supervisor");
    let dropctl = paths::bin("dropctl");
    for binary in [&daemon, &dropctl] {
        if !binary.is_file() {
            return Ok(Outcome::Skip(format!(
                "{} not built (cargo build -p drop-supervisor)",
                binary.display()
            )));
        }
    }
    // Paths the sandbox needs under /tmp (it has a private /tmp) must be kept visible.
    let mut options = SandboxOptions::default();
    for path in [paths::workspace_root(), daemon.clone(), dropctl.clone()] {
        if let Ok(rest) = path.strip_prefix("/tmp") {
            let top = rest.iter().next().context("a binary directly in /tmp")?;
            options.keep_tmp.push(Path::new("/tmp").join(top));
        }
    }
    // The unit's PrivateTmp=yes hides them from the service too: bind them in, read-only.
    let bind_tmp: String = options
        .keep_tmp
        .iter()
        .map(|p| format!("BindReadOnlyPaths={}\n", p.display()))
        .collect();
    let sandbox = SystemdSandbox::start_with(options)?;
    println!(
        "  sandbox systemd {} after {:?}",
        sandbox.system_state(),
        sandbox.startup_time()
    );

    // As a package would: users, directories, the unit; then a drop-in for this test.
    sandbox.run("systemd-sysusers", [shipped("drop.sysusers")])?;
    sandbox.run(
        "systemd-tmpfiles",
        ["--create".as_ref(), shipped("drop.tmpfiles").as_os_str()],
    )?;
    let unit_dir = sandbox.unit_dir();
    fs::copy(shipped(UNIT), unit_dir.join(UNIT))?;
    let test_dir = sandbox.host_path("/run/drop-test");
    fs::create_dir_all(test_dir.join("sysctl"))?;
    fs::write(
        test_dir.join("drop.toml"),
        "[node]\n\
         name = \"sd-test\"\n\
         state_dir = \"/var/lib/drop\"\n\
         [control]\n\
         socket = \"/run/drop/drop.sock\"\n\
         [tuning]\n\
         sysctl_root = \"/run/drop-test/sysctl\"\n\
         [gateway]\n\
         listen = \"127.0.0.1:0\"\n",
    )?;
    let dropin_dir = unit_dir.join(format!("{UNIT}.d"));
    fs::create_dir_all(&dropin_dir)?;
    fs::write(
        dropin_dir.join("test.conf"),
        format!(
            "# written by tests/privileged/systemd.rs\n\
             [Service]\n\
             ExecStart=\n\
             ExecStart={daemon} --config /run/drop-test/drop.toml\n\
             ExecStopPost=\n\
             ExecStopPost=-{daemon} --release-vip\n\
             # addresses the test adds (as a daemon holding a floating IP would) stay in a\n\
             # network namespace of the unit's own\n\
             PrivateNetwork=yes\n\
             # the test config's stand-in for /proc/sys (ProtectSystem=strict: /run is read-only)\n\
             ReadWritePaths=/run/drop-test\n\
             # keep /run/drop on stop: a socket gone after stop is then the daemon's own doing\n\
             RuntimeDirectoryPreserve=yes\n\
             # a checkout under /tmp stays visible despite PrivateTmp=yes\n\
             {bind_tmp}",
            daemon = daemon.display()
        ),
    )?;
    sandbox.daemon_reload()?;

    let socket_inside = "/run/drop/drop.sock";
    let socket_on_host = sandbox.host_path(socket_inside);
    runtime()?.block_on(async {
        let conn = sandbox
            .connect()
            .await
            .context("cannot connect to the sandbox's bus")?;
        let manager = systemd::manager(&conn).await?;
        let mut jobs = manager.receive_job_removed().await?;

        // For Type=notify the start job is done when systemd has received READY=1.
        let asked = Instant::now();
        let job = manager.start_unit(UNIT, "replace").await?;
        let result = wait_job(&mut jobs, &job, JOB_TIMEOUT).await?;
        let ready_after = asked.elapsed();
        ensure!(
            result == "done",
            "start job: {result}\n{}",
            sandbox.unit_report(UNIT)
        );
        let unit_path = manager.get_unit(UNIT).await?;
        let handle = UnitHandle::new(&conn, unit_path.clone()).await?;
        let state = handle.unit.active_state().await?;
        ensure!(
            state == "active",
            "ActiveState={state}\n{}",
            sandbox.unit_report(UNIT)
        );
        println!(
            "  daemon start-to-READY time: {:.1} ms",
            ready_after.as_secs_f64() * 1e3
        );
        let watchdog = handle.service.watchdog_usec().await?;
        ensure!(
            watchdog == 30_000_000,
            "WatchdogUSec={watchdog}: not the shipped unit?"
        );

        let main_pid = handle.service.main_pid().await?;
        ensure!(main_pid != 0, "active, but no MainPID");
        let out = sandbox
            .run(
                path_str(&dropctl)?,
                ["--socket", socket_inside, "--json", "status"],
            )
            .context("dropctl status")?;
        let status: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("dropctl printed {}", String::from_utf8_lossy(&out.stdout)))?;
        ensure!(
            status["pid"].as_u64() == Some(u64::from(main_pid)),
            "dropctl says pid {}, systemd says MainPID {main_pid}",
            status["pid"]
        );
        ensure!(
            status["name"] == "sd-test",
            "dropctl says name {}",
            status["name"]
        );
        println!(
            "  dropctl status: pid {main_pid} = MainPID, node_id {}",
            status["node_id"]
        );

        let host_pid = sandbox.host_pid(main_pid)?;
        let proc_status = fs::read_to_string(format!("/proc/{host_pid}/status"))?;
        let rss = proc_status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .map(str::trim)
            .context("no VmRSS in /proc/PID/status")?;
        println!("  idle RSS: {rss} (host pid {host_pid})");

        // Group `drop` (made by sysusers above) owns the socket and its directory.
        let group = fs::read_to_string(sandbox.host_path("/etc/group"))?;
        let gid = entry_id(&group, "drop", 2).context("no group drop in the sandbox")?;
        let dir = fs::metadata(socket_on_host.parent().context("socket has no parent")?)?;
        let dir_mode = dir.permissions().mode() & 0o7777;
        ensure!(
            dir_mode == 0o750 && dir.uid() == 0 && dir.gid() == gid,
            "/run/drop is {dir_mode:o} {}:{}, expected 750 0:{gid}",
            dir.uid(),
            dir.gid()
        );
        let sock = fs::symlink_metadata(&socket_on_host)?;
        let sock_mode = sock.permissions().mode() & 0o7777;
        ensure!(
            sock_mode == 0o660 && sock.gid() == gid,
            "{socket_inside} is {sock_mode:o} group {}, expected 660 group drop ({gid})",
            sock.gid()
        );

        // Workers of the unit: unprivileged, without capabilities even under the unit's
        // bounding set. Then SIGKILL of the daemon: the unit's cgroup takes every worker with
        // it, systemd restarts the daemon, and the persisted flow comes back.
        fs::write(
            test_dir.join("cat.yaml"),
            "name: cat\nfunc:\n  - name: cat\n    cmd: /bin/cat\n    num: 3\n",
        )?;
        let ctl = |args: &[&str]| -> anyhow::Result<serde_json::Value> {
            let mut all = vec!["--socket", socket_inside, "--json"];
            all.extend(args);
            let out = sandbox.run(path_str(&dropctl)?, all)?;
            Ok(serde_json::from_slice(&out.stdout)?)
        };
        ctl(&["flow", "apply", "/run/drop-test/cat.yaml"])?;
        let worker_pids = |v: &serde_json::Value| -> Vec<u32> {
            v["pids"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| p.as_u64())
                        .map(|p| p as u32)
                        .collect()
                })
                .unwrap_or_default()
        };
        let started = Instant::now();
        let pids = loop {
            let pids = worker_pids(&ctl(&["pool", "show", "cat"])?);
            if pids.len() == 3 || started.elapsed() > Duration::from_secs(10) {
                break pids;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        ensure!(pids.len() == 3, "pool cat has workers {pids:?}");
        let host_workers = pids
            .iter()
            .map(|p| sandbox.host_pid(*p))
            .collect::<anyhow::Result<Vec<i32>>>()?;
        let worker_status = fs::read_to_string(format!("/proc/{}/status", host_workers[0]))?;
        let field = |name: &str| {
            worker_status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or("?")
                .to_string()
        };
        ensure!(
            field("CapBnd:") == "0000000000000000" && field("CapEff:") == "0000000000000000",
            "a worker of the unit keeps capabilities: CapBnd {} CapEff {}",
            field("CapBnd:"),
            field("CapEff:")
        );
        let passwd = fs::read_to_string(sandbox.host_path("/etc/passwd"))?;
        let drop_fn = entry_id(&passwd, "drop-fn", 2).context("no user drop-fn in the sandbox")?;
        ensure!(
            field("Uid:")
                .split_whitespace()
                .all(|u| u == drop_fn.to_string()),
            "a worker of the unit runs as uid {}, not drop-fn ({drop_fn})",
            field("Uid:")
        );
        // A floating IP as a daemon holding one leaves it (marked as DROP's) and one that is not
        // DROP's, in the unit's network namespace; the namespace stays open here so it can be
        // read after the kill.
        let unit_netns = fs::File::open(format!("/proc/{host_pid}/ns/net"))?;
        let marked = drop_net::Vip {
            ifname: "lo".into(),
            addr: "10.201.0.250".parse()?,
            prefix: 32,
        };
        let foreign = drop_net::Vip {
            ifname: "lo".into(),
            addr: "10.201.0.251".parse()?,
            prefix: 32,
        };
        let in_unit_netns =
            |f: &(dyn Fn(&mut drop_net::Netlink) -> anyhow::Result<bool> + Sync)| {
                std::thread::scope(|scope| {
                    scope
                        .spawn(|| -> anyhow::Result<bool> {
                            nix::sched::setns(&unit_netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
                            let mut net = drop_net::Netlink::new()?;
                            f(&mut net)
                        })
                        .join()
                        .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
                })
            };
        in_unit_netns(&|net| Ok(drop_net::VipNet::add(net, &marked)?))?;
        check(Command::new("nsenter").args([
            &format!("--net=/proc/{host_pid}/ns/net"),
            "ip",
            "addr",
            "add",
            "10.201.0.251/32",
            "dev",
            "lo",
        ]))?;
        let killed = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(host_pid),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let alive = |pids: &[i32]| {
            pids.iter()
                .any(|p| Path::new(&format!("/proc/{p}")).exists())
        };
        while alive(&host_workers) {
            ensure!(
                killed.elapsed() < Duration::from_secs(10),
                "workers {host_workers:?} outlived the SIGKILLed daemon by 10 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let workers_gone = killed.elapsed();
        let mut restarted_pid = 0;
        let mut back = Vec::new();
        while killed.elapsed() < Duration::from_secs(20) {
            let pid = handle.service.main_pid().await.unwrap_or(0);
            if pid != 0 && pid != main_pid {
                restarted_pid = pid;
                if let Ok(v) = ctl(&["pool", "show", "cat"]) {
                    back = worker_pids(&v);
                    if back.len() == 3 {
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ensure!(
            restarted_pid != 0 && back.len() == 3,
            "after SIGKILL: MainPID {restarted_pid}, pool cat workers {back:?}\n{}",
            sandbox.unit_report(UNIT)
        );
        println!(
            "  SIGKILL of the daemon: its 3 workers gone after {:.0} ms; restarted (MainPID \
             {restarted_pid}) with the flow back ({:.1} s after the kill)",
            workers_gone.as_secs_f64() * 1e3,
            killed.elapsed().as_secs_f64()
        );
        ensure!(
            workers_gone < Duration::from_secs(2),
            "workers took {workers_gone:?} to go"
        );
        // ExecStopPost= ran `drop-supervisor --release-vip` in the unit's namespace before the
        // restart: DROP's address is gone, the other one is untouched.
        let marked_left = in_unit_netns(&|net| Ok(drop_net::VipNet::present(net, &marked)?))?;
        let foreign_left = in_unit_netns(&|net| Ok(drop_net::VipNet::present(net, &foreign)?))?;
        ensure!(
            !marked_left && foreign_left,
            "after SIGKILL: DROP's address present {marked_left} (want false), the other \
             present {foreign_left} (want true)\n{}",
            sandbox.unit_report(UNIT)
        );
        println!("  ExecStopPost= removed the floating IP the SIGKILLed daemon left, and only it");
        let main_pid = restarted_pid;

        // systemd may unload the unit as soon as it is inactive: its exit status is only seen
        // in the PropertiesChanged signals on the way.
        let mut changes = systemd::property_changes(&conn, &unit_path).await?;
        let job = manager.stop_unit(UNIT, "replace").await?;
        let result = wait_job(&mut jobs, &job, JOB_TIMEOUT).await?;
        ensure!(
            result == "done",
            "stop job: {result}\n{}",
            sandbox.unit_report(UNIT)
        );
        let service = "org.freedesktop.systemd1.Service";
        let seen =
            systemd::drain_changes(&mut changes, service, Duration::from_millis(300)).await?;
        let int = |name: &str| seen.get(name).and_then(|v| i32::try_from(v).ok());
        let state = UnitHandle::new(&conn, unit_path.clone())
            .await?
            .unit
            .active_state()
            .await?;
        // CLD_EXITED (1) with status 0: it handled SIGTERM and exited by itself.
        ensure!(
            state == "inactive"
                && int("ExecMainCode") == Some(1)
                && int("ExecMainStatus") == Some(0),
            "after stop: ActiveState={state}, ExecMainCode={:?} ExecMainStatus={:?}\n{}",
            int("ExecMainCode"),
            int("ExecMainStatus"),
            sandbox.unit_report(UNIT)
        );
        ensure!(
            !socket_on_host.exists(),
            "{socket_inside} still exists after stop"
        );

        // Lines the daemon itself wrote to journald (not systemd's lines about the unit).
        let pid_match = format!("_PID={main_pid}");
        let out = sandbox.run("journalctl", ["--no-pager", "-o", "cat", &pid_match])?;
        let logged = String::from_utf8_lossy(&out.stdout);
        let lines = logged.lines().filter(|l| !l.trim().is_empty()).count();
        ensure!(
            lines > 0,
            "the daemon wrote nothing to the journal\n{}",
            sandbox.unit_report(UNIT)
        );
        println!(
            "  journal: {lines} line(s) from the daemon, first: {}",
            logged.lines().next().unwrap_or("")
        );
        Ok(Outcome::Pass)
    })
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// The numeric field `index` of the `name` entry of a passwd or group file.
fn entry_id(file: &str, name: &str, index: usize) -> Option<u32> {
    file.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&name))
        .and_then(|f| f.get(index)?.parse().ok())
}
