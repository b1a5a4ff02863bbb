//! The systemd seam (`host::systemd::SystemdBus`) against a real systemd: the throw-away one of
//! `tests/systemd-sandbox`, over its own D-Bus bus. Jobs end through `JobRemoved`, state changes
//! arrive through `PropertiesChanged`; nothing polls.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use drop_supervisor::host::systemd::{Systemd, SystemdBus, SystemdError, TransientSpec};
use drop_tests::systemd::{SystemdSandbox, UnitHandle};
use drop_tests::{Outcome, Test, unique_name};
use futures_util::StreamExt as _;

pub const TESTS: &[Test] = &[
    Test {
        name: "systemd_seam_starts_stops_and_watches_an_installed_unit",
        run: installed_unit,
    },
    Test {
        name: "systemd_seam_runs_a_transient_unit_with_its_limits",
        run: transient_unit,
    },
];

const WAIT: Duration = Duration::from_secs(10);

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn installed_unit() -> anyhow::Result<Outcome> {
    if let Some(skip) = SystemdSandbox::unavailable() {
        return Ok(skip);
    }
    let sandbox = SystemdSandbox::start()?;
    let unit = format!("{}.service", unique_name("seam"));
    std::fs::write(
        sandbox.unit_dir().join(&unit),
        "[Service]\nExecStart=/bin/sleep 300\n",
    )?;
    let failing = format!("{}.service", unique_name("fail"));
    std::fs::write(
        sandbox.unit_dir().join(&failing),
        "[Service]\nType=oneshot\nExecStart=/bin/false\n",
    )?;
    sandbox.daemon_reload()?;
    runtime()?.block_on(async {
        let sd = SystemdBus::with_connection(sandbox.connect().await?);
        let before = sd.state(&unit).await?;
        ensure!(before.active == "inactive", "before start: {before:?}");
        // Opened before the job: the change to active cannot be missed.
        let mut changes = sd.watch(&unit).await?;
        sd.start(&unit).await?;
        let now = sd.state(&unit).await?;
        ensure!(
            now.active == "active" && now.sub == "running",
            "after start: {now:?}"
        );
        let seen = tokio::time::timeout(WAIT, async {
            while let Some(s) = changes.next().await {
                if s.active == "active" {
                    return Some(s);
                }
            }
            None
        })
        .await
        .context("no active state signalled")?
        .context("the change stream ended")?;
        println!("  signalled: {} {}/{}", seen.unit, seen.active, seen.sub);
        sd.stop(&unit).await?;
        let seen = tokio::time::timeout(WAIT, async {
            while let Some(s) = changes.next().await {
                if s.active == "inactive" || s.active == "failed" {
                    return Some(s);
                }
            }
            None
        })
        .await
        .context("no inactive state signalled")?
        .context("the change stream ended")?;
        println!("  signalled after stop: {}/{}", seen.active, seen.sub);
        // A job that fails says so; stopping or reading an unknown unit is not an error.
        match sd.start(&failing).await {
            Err(SystemdError::Job { result, .. }) => {
                println!("  a failing unit's start job: {result}");
                ensure!(result == "failed", "job result {result}");
            }
            other => anyhow::bail!("a failing unit started: {other:?}"),
        }
        sd.stop("drop-no-such-unit.service").await?;
        let unknown = sd.state("drop-no-such-unit.service").await?;
        ensure!(unknown.load == "not-found", "{unknown:?}");
        Ok(Outcome::Pass)
    })
}

fn transient_unit() -> anyhow::Result<Outcome> {
    if let Some(skip) = SystemdSandbox::unavailable() {
        return Ok(skip);
    }
    let sandbox = SystemdSandbox::start()?;
    runtime()?.block_on(async {
        let conn = sandbox.connect().await?;
        let sd = SystemdBus::with_connection(conn.clone());
        let spec = TransientSpec {
            unit: format!("{}.service", unique_name("tr")),
            argv: vec!["/bin/sleep".into(), "300".into()],
            memory_max: Some(64 << 20),
            cpu: Some(0.5),
            tasks_max: Some(16),
            env: vec![("DROP_SERVICE".into(), "demo".into())],
            restart: Some("on-failure".into()),
            ..TransientSpec::default()
        };
        sd.start_transient(&spec).await?;
        let state = sd.state(&spec.unit).await?;
        ensure!(
            state.active == "active" && state.sub == "running",
            "{state:?}"
        );
        // The harness's own connection for reading back what systemd made of the unit.
        let check = sandbox.connect().await?;
        let manager = drop_tests::systemd::manager(&check).await?;
        let handle = UnitHandle::new(&check, manager.get_unit(&spec.unit).await?).await?;
        let memory = handle.service.memory_max().await?;
        let pid = handle.service.main_pid().await?;
        ensure!(memory == 64 << 20, "MemoryMax {memory}");
        let env = std::fs::read(
            sandbox.host_path(format!("/proc/{pid}/environ")),
        )
        .unwrap_or_default();
        ensure!(
            env.split(|b| *b == 0).any(|v| v == b"DROP_SERVICE=demo"),
            "the unit's process lacks DROP_SERVICE=demo"
        );
        println!(
            "  transient {}: active/running, MemoryMax {memory}, MainPID {pid} with DROP_SERVICE=demo",
            spec.unit
        );
        sd.stop(&spec.unit).await?;
        let after = sd.state(&spec.unit).await?;
        ensure!(after.active == "inactive", "after stop: {after:?}");
        Ok(Outcome::Pass)
    })
}
