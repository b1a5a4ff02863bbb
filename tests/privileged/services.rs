//! Services on real systemds.
//!
//! - The systemd seam (`host::systemd::SystemdBus`) against a real systemd: the throw-away one
//!   of `tests/systemd-sandbox`, over its own D-Bus bus. Jobs end through `JobRemoved`, state
//!   changes arrive through `PropertiesChanged`; nothing polls.
//! - Services across five nodes, each a supervisor in its network namespace with its own
//!   sandboxed systemd: counts and spread, node loss and heal (make-before-break, sampled),
//!   supervisor crash and adoption, failures moving an instance, logs, removal.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use drop_supervisor::host::systemd::{Systemd, SystemdBus, SystemdError, TransientSpec};
use drop_tests::cluster::wait_for;
use drop_tests::services::ServiceCluster;
use drop_tests::systemd::{SystemdSandbox, UnitHandle};
use drop_tests::{Outcome, Test, paths, require_command, unique_name};
use futures_util::StreamExt as _;

pub const TESTS: &[Test] = &[
    Test {
        name: "services_count_spread_node_loss_and_heal_never_below_count",
        run: loss_and_heal,
    },
    Test {
        name: "services_supervisor_crash_adopts_failures_move_logs_and_rm_cleans",
        run: adopt_fail_rm,
    },
    Test {
        name: "services_vip_unit_health_check_follows_the_unit",
        run: vip_unit_check,
    },
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

// ---- services across five nodes ----------------------------------------------------------

const NS: &str = "t";
/// Installed-unit service and its count.
const WEB: &str = "web";
const WEB_COUNT: usize = 3;
/// Inline (transient) service and its count.
const WORK: &str = "work";
const WORK_COUNT: usize = 7;
const CONVERGE: Duration = Duration::from_secs(30);

fn services_preconditions() -> anyhow::Result<Option<Outcome>> {
    if let Some(skip) = SystemdSandbox::unavailable()
        .or_else(|| require_command("ip"))
        .or_else(|| require_command("nsenter"))
    {
        return Ok(Some(skip));
    }
    for bin in ["drop-supervisor", "dropctl"] {
        let path = paths::bin(bin);
        ensure!(
            path.is_file(),
            "{} not found: build it first (cargo build -p drop-supervisor --bins)",
            path.display()
        );
    }
    Ok(None)
}

/// Runs `body`; on failure prints every daemon's log tail first.
fn logged(
    sc: &ServiceCluster,
    body: impl FnOnce(&ServiceCluster) -> anyhow::Result<()>,
) -> anyhow::Result<Outcome> {
    match body(sc) {
        Ok(()) => Ok(Outcome::Pass),
        Err(e) => {
            println!(
                "  daemon logs (last 30 lines each):\n{}",
                sc.fx.log_tails(30)
            );
            Err(e)
        }
    }
}

/// `web` (installed unit, 3) and `work` (inline, 7), set through node 0.
fn set_services(sc: &ServiceCluster) -> anyhow::Result<()> {
    let unit = sc.fx.node(0).dir().join("web.service");
    std::fs::write(
        &unit,
        "[Unit]\nDescription=a web server stand-in\n\n[Service]\nExecStart=/bin/sleep 100000\n",
    )?;
    let unit = unit.to_str().context("utf-8")?;
    let set = sc.dropctl(0, &["service", "set", WEB, "--count", "3", "--unit", unit])?;
    ensure!(set["count"] == 3, "{set}");
    sc.dropctl(
        0,
        &[
            "service",
            "set",
            WORK,
            "--count",
            "7",
            "--memory",
            "64M",
            "--env",
            "MODE=test",
            "--exec",
            "/bin/sh",
            "-c",
            "echo work MODE=$MODE instance $DROP_INSTANCE; exec sleep 100000",
        ],
    )?;
    Ok(())
}

/// Waits until `nodes` run exactly the counts, spread (no node above ceil(count/nodes)).
fn wait_counts(sc: &ServiceCluster, nodes: &[usize], what: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    wait_for(CONVERGE, what, || {
        for (svc, count) in [(WEB, WEB_COUNT), (WORK, WORK_COUNT)] {
            let spread = sc.spread(nodes, svc)?;
            let total: usize = spread.iter().sum();
            ensure!(
                total == count,
                "{svc}: {total} active ({spread:?}), want {count}"
            );
            let bound = count.div_ceil(nodes.len());
            ensure!(
                spread.iter().all(|n| *n <= bound),
                "{svc} not spread: {spread:?} (at most {bound} per node)"
            );
        }
        Ok(())
    })?;
    Ok(started.elapsed())
}

fn loss_and_heal() -> anyhow::Result<Outcome> {
    if let Some(skip) = services_preconditions()? {
        return Ok(skip);
    }
    let sc = ServiceCluster::start(5, "fast", "")?;
    logged(&sc, |sc| {
        sc.create_namespace(NS, CONVERGE)?;
        set_services(sc)?;
        let all: Vec<usize> = (0..5).collect();
        let t = wait_counts(sc, &all, "web 3 and work 7 active, spread over 5 systemds")?;
        // `service ls` counts what the nodes report (gossiped), a moment after systemd.
        wait_for(
            CONVERGE,
            "service ls reporting web 3 and work 7 active",
            || {
                let ls = sc.dropctl(0, &["service", "ls"])?;
                let active: Vec<(String, u64)> = ls
                    .as_array()
                    .context("service ls")?
                    .iter()
                    .map(|s| {
                        (
                            s["name"].as_str().unwrap_or("").to_string(),
                            s["active"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect();
                ensure!(
                    active == [(WEB.to_string(), 3), (WORK.to_string(), 7)],
                    "service ls: {active:?}"
                );
                Ok(())
            },
        )?;
        println!(
            "  web 3 (installed unit) and work 7 (transient) active after {:.2} s: web {:?}, work {:?}",
            t.as_secs_f64(),
            sc.spread(&all, WEB)?,
            sc.spread(&all, WORK)?
        );
        // The node that goes: one (not n0, through which we ask) running a web instance.
        let victim = (1..5)
            .find(|&i| sc.active(i).is_ok_and(|a| a.contains_key(WEB)))
            .context("no node besides n0 runs web")?;
        let vname = sc.fx.node(victim).name().to_string();
        let had = sc.active(victim)?;
        let rest: Vec<usize> = all.iter().copied().filter(|&i| i != victim).collect();

        let sampler = sc.sampler(Duration::from_millis(25));
        let killed_at = sampler.now();
        sc.fx.node(victim).sigkill()?;
        sc.fx.partition(&[victim])?;
        let moved = wait_counts(sc, &rest, "the lost node's share active on the other 4")?;
        let replaced_at = sampler.now();
        // Cut off, the lost node's instances keep running in its systemd.
        let still = sc.active(victim)?;
        ensure!(still == had, "{vname}'s systemd ran {had:?}, now {still:?}");
        println!(
            "  {vname} (supervisor SIGKILLed, link cut) ran {:?}: active again on the other 4 after {:.2} s; its own kept running",
            had.iter()
                .map(|(k, v)| (k.as_str(), v.len()))
                .collect::<Vec<_>>(),
            moved.as_secs_f64()
        );

        sc.fx.heal()?;
        sc.fx.node(victim).restart()?;
        let healed_at = sampler.now();
        wait_for(CONVERGE, "the surplus on the returned node stopped", || {
            let a = sc.active(victim)?;
            ensure!(
                a.values().all(BTreeSet::is_empty),
                "{vname} still runs {a:?}"
            );
            for (svc, count) in [(WEB, WEB_COUNT), (WORK, WORK_COUNT)] {
                let total: usize = sc.spread(&all, svc)?.iter().sum();
                ensure!(total == count, "{svc}: {total} active in all");
            }
            Ok(())
        })?;
        let settled_at = sampler.now();
        std::thread::sleep(Duration::from_millis(200));
        let samples = sampler.finish()?;
        let after: Vec<_> = samples.iter().filter(|s| s.at >= replaced_at).collect();
        ensure!(
            after.len() > 5,
            "only {} samples after the re-placement",
            after.len()
        );
        let min_web = after.iter().map(|s| s.total(WEB)).min().unwrap_or(0);
        let min_work = after.iter().map(|s| s.total(WORK)).min().unwrap_or(0);
        let max_web = after.iter().map(|s| s.total(WEB)).max().unwrap_or(0);
        let max_work = after.iter().map(|s| s.total(WORK)).max().unwrap_or(0);
        println!(
            "  heal: {} samples from re-placement to settled ({:.2} s after the heal); active web min {min_web}/{WEB_COUNT} max {max_web}, work min {min_work}/{WORK_COUNT} max {max_work}",
            after.len(),
            (settled_at - healed_at).as_secs_f64()
        );
        ensure!(
            min_web >= WEB_COUNT && min_work >= WORK_COUNT,
            "the total of active instances dropped below the count during the heal: web {min_web}, work {min_work}"
        );
        // Before the loss the counts held too (the sampler started then).
        let before: Vec<_> = samples.iter().filter(|s| s.at < killed_at).collect();
        for s in before {
            ensure!(
                s.total(WEB) == WEB_COUNT && s.total(WORK) == WORK_COUNT,
                "before the loss: {s:?}"
            );
        }
        // Sticky: the instances stayed where they were re-placed.
        wait_counts(sc, &all, "the final placement")?;
        Ok(())
    })
}

fn adopt_fail_rm() -> anyhow::Result<Outcome> {
    if let Some(skip) = services_preconditions()? {
        return Ok(skip);
    }
    let sc = ServiceCluster::start(5, "fast", "")?;
    logged(&sc, |sc| {
        sc.create_namespace(NS, CONVERGE)?;
        set_services(sc)?;
        let all: Vec<usize> = (0..5).collect();
        wait_counts(sc, &all, "web 3 and work 7 active")?;

        // Supervisor crash: its units are systemd's and stay; the restarted daemon adopts them.
        let node = (1..5)
            .find(|&i| sc.active(i).is_ok_and(|a| a.contains_key(WORK)))
            .context("no node besides n0 runs work")?;
        let name = sc.fx.node(node).name().to_string();
        let units: Vec<String> = sc
            .active(node)?
            .iter()
            .flat_map(|(svc, idx)| {
                idx.iter()
                    .map(move |i| drop_supervisor::services::spec::unit_name(NS, svc, *i))
            })
            .collect();
        let pids: Vec<u32> = units
            .iter()
            .map(|u| sc.main_pid(node, u))
            .collect::<anyhow::Result<_>>()?;
        sc.fx.node(node).sigkill()?;
        std::thread::sleep(Duration::from_millis(300));
        let during: Vec<u32> = units
            .iter()
            .map(|u| sc.main_pid(node, u))
            .collect::<anyhow::Result<_>>()?;
        ensure!(
            during == pids,
            "units changed while the supervisor was down: {pids:?} → {during:?}"
        );
        sc.fx.node(node).restart()?;
        // Give it time to act on everything it knows, then check nothing was started twice.
        wait_for(
            CONVERGE,
            "the restarted node's report back in service ls",
            || {
                let v = sc.dropctl(node, &["service", "show", WORK])?;
                ensure!(v["active"] == WORK_COUNT, "{v}");
                Ok(())
            },
        )?;
        std::thread::sleep(Duration::from_secs(2));
        let after: Vec<u32> = units
            .iter()
            .map(|u| sc.main_pid(node, u))
            .collect::<anyhow::Result<_>>()?;
        ensure!(
            after == pids,
            "{name}'s units were restarted: {pids:?} → {after:?}"
        );
        for (svc, count) in [(WEB, WEB_COUNT), (WORK, WORK_COUNT)] {
            let total: usize = sc.spread(&all, svc)?.iter().sum();
            ensure!(
                total == count,
                "{svc}: {total} active after the restart (duplicates?)"
            );
        }
        println!(
            "  {name}'s supervisor SIGKILLed and restarted: its {} units kept their processes, no duplicate anywhere",
            units.len()
        );

        // Logs: every instance's first line, from the five journals, asked through n0.
        let logs = wait_for(
            CONVERGE,
            "every work instance's line in the merged logs",
            || {
                let logs = sc.dropctl(0, &["service", "logs", WORK, "--lines", "200"])?;
                let instances: BTreeSet<String> = logs["lines"]
                    .as_array()
                    .context("lines")?
                    .iter()
                    .filter_map(|l| l.as_str())
                    .filter_map(|l| l.split("work MODE=test instance ").nth(1))
                    .map(str::to_string)
                    .collect();
                ensure!(
                    instances.len() == WORK_COUNT,
                    "instances seen {instances:?}: {logs}"
                );
                ensure!(
                    logs["unreachable"]
                        .as_object()
                        .is_some_and(|u| u.is_empty()),
                    "{logs}"
                );
                Ok(logs)
            },
        )?;
        println!(
            "  service logs through n0: {} lines naming all {WORK_COUNT} instances, per node {}",
            logs["lines"].as_array().map_or(0, Vec::len),
            logs["nodes"]
        );

        // A unit that keeps failing goes elsewhere after max_failures (3).
        sc.dropctl(
            0,
            &[
                "service",
                "set",
                "flaky",
                "--count",
                "1",
                "--restart",
                "always",
                "--exec",
                "/bin/false",
            ],
        )?;
        let moved = wait_for(CONVERGE, "flaky failed on two nodes", || {
            let v = sc.dropctl(0, &["service", "show", "flaky"])?;
            let f = v["failures"].as_object().cloned().unwrap_or_default();
            let over: Vec<&String> = f
                .iter()
                .filter(|(_, n)| n.as_u64().unwrap_or(0) >= 3)
                .map(|(k, _)| k)
                .collect();
            ensure!(over.len() >= 2, "failures {f:?}");
            Ok(f)
        })?;
        println!("  flaky (always exits 1) moved on after 3 failures: failures per node {moved:?}");

        // rm: nothing left in any systemd, no template left in any unit folder.
        for svc in [WEB, WORK, "flaky"] {
            sc.dropctl(0, &["service", "rm", svc])?;
        }
        wait_for(CONVERGE, "no unit of ours left in any systemd", || {
            for i in 0..5 {
                let left = sc.loaded(i)?;
                ensure!(
                    left.is_empty(),
                    "{} still has {left:?}",
                    sc.fx.node(i).name()
                );
                let templates: Vec<_> = std::fs::read_dir(sc.sds[i].unit_dir())?
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("drop-svc."))
                    .map(|e| e.file_name())
                    .collect();
                ensure!(templates.is_empty(), "templates left: {templates:?}");
            }
            Ok(())
        })?;
        let ls = sc.dropctl(0, &["service", "ls"])?;
        ensure!(
            ls.as_array().is_some_and(Vec::is_empty),
            "service ls after rm: {ls}"
        );
        println!("  service rm: no unit and no template left in the 5 systemds");
        Ok(())
    })
}

/// The floating IP's `unit` health check: the address stays on a node whose unit is active and
/// leaves it when the unit stops there.
fn vip_unit_check() -> anyhow::Result<Outcome> {
    if let Some(skip) = services_preconditions()? {
        return Ok(skip);
    }
    const VIP: &str = "10.201.0.100";
    const GUARD: &str = "drop-guard.service";
    let sc = ServiceCluster::start(3, "fast", "[vip]\n")?;
    logged(&sc, |sc| {
        for sd in &sc.sds {
            std::fs::write(
                sd.unit_dir().join(GUARD),
                "[Service]\nExecStart=/bin/sleep 100000\n",
            )?;
            sd.daemon_reload()?;
            sd.run("systemctl", ["start", GUARD])?;
        }
        sc.create_namespace_with(NS, Some(VIP), CONVERGE)?;
        let refused = sc
            .fx
            .node(0)
            .dropctl_output(&["vip", "check", NS, "--unit", "guard"])?;
        ensure!(
            !refused.status.success()
                && String::from_utf8_lossy(&refused.stderr).contains("not a unit name"),
            "a bad unit name was not refused: {}",
            String::from_utf8_lossy(&refused.stderr)
        );
        sc.dropctl(
            0,
            &[
                "vip",
                "check",
                NS,
                "--unit",
                GUARD,
                "--rise",
                "1",
                "--fall",
                "1",
                "--interval-ms",
                "100",
            ],
        )?;
        let vip: std::net::Ipv4Addr = VIP.parse()?;
        let holder = |sc: &ServiceCluster| -> anyhow::Result<usize> {
            let v = sc.dropctl(0, &["vip", "show", NS])?;
            let name = v["holder"].as_str().context("no holder")?.to_string();
            let i = (0..3)
                .find(|&i| sc.fx.node(i).name() == name)
                .context("holder is not a node")?;
            ensure!(
                drop_tests::vip::holds(sc.fx.node(i).host().netns(), vip)?,
                "{name} is named holder but has no address"
            );
            ensure!(
                v["health_check"].is_object() || v["health_check"].is_string(),
                "{v}"
            );
            Ok(i)
        };
        let first = wait_for(CONVERGE, "a holder with the address", || holder(sc))?;
        let stopped = Instant::now();
        sc.sds[first].run("systemctl", ["stop", GUARD])?;
        let next = wait_for(CONVERGE, "the address on a node whose unit runs", || {
            let i = holder(sc)?;
            ensure!(i != first, "still on n{first}");
            ensure!(
                !drop_tests::vip::holds(sc.fx.node(first).host().netns(), vip)?,
                "n{first} still has the address"
            );
            Ok(i)
        })?;
        println!(
            "  {GUARD} stopped on n{first}: the address moved to n{next} after {:.2} s",
            stopped.elapsed().as_secs_f64()
        );
        Ok(())
    })
}
