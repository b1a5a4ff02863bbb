//! The rolling upgrade as an operator runs it: three nodes, each a throw-away systemd in its own
//! network namespace on one bridge with DROP installed from its RPM by the Ansible role
//! (`packaging/ansible/site.yml`), a namespace over the three and a pool on each; then
//! `rollout.yml` upgrades them one at a time from build N to build N+1 while a client in a fourth
//! namespace calls the pool through the three gateways without pause.
//!
//! The client does what a client of several gateways does: it takes the gateways in turn and,
//! when a connection cannot be opened (nothing was sent), opens one to the next. Every call that
//! was sent and not answered 200 counts as failed; the target is none.
//!
//! Ansible reaches each sandbox with `ansible_connection: local` and a per-node interpreter that
//! runs Python inside it (`nsenter -t SYSTEMD_PID -m -p -C -n`), so modules, `systemctl`, `rpm`
//! and `dropctl` act on that node only. No ssh, nothing outside the namespaces.

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use drop_tests::netns::{Bridge, check, run_bounded};
use drop_tests::package::{PackagedHost, package_of, upgrade_version, wait_until};
use drop_tests::systemd::SystemdSandbox;
use drop_tests::{Outcome, Test, paths, require_command, unique_name};

pub const TESTS: &[Test] = &[Test {
    name: "rollout_ansible_three_nodes_under_load_no_failed_call",
    run: rollout_under_load,
}];

const NODES: usize = 3;
const GATEWAY_PORT: u16 = 8081;
const CLUSTER_PORT: u16 = 7946;
const NS: &str = "roll";
/// A playbook run may take this long.
const PLAYBOOK_TIMEOUT: Duration = Duration::from_secs(600);

/// The venv with the pinned Ansible (`cargo xtask test` passes it).
fn ansible_venv() -> Option<PathBuf> {
    std::env::var_os("DROP_ANSIBLE_VENV")
        .map(PathBuf::from)
        .filter(|p| p.join("bin/ansible-playbook").is_file())
}

/// The client's tally.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    /// Connections that could not be opened and were opened to the next gateway instead.
    reconnects: AtomicU64,
    failures: std::sync::Mutex<Vec<String>>,
}

/// One call: POST to `gw`; `Err(None)` when the connection could not be opened (nothing sent).
fn call(gw: SocketAddr, body: &[u8]) -> Result<(u16, Vec<u8>), Option<String>> {
    let mut s =
        TcpStream::connect_timeout(&gw, Duration::from_millis(300)).map_err(|_| None::<String>)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| Some(e.to_string()))?;
    let r = drop_supervisor::http::roundtrip(&mut s, "POST", "/api/v1/roll", Some(body))
        .map_err(|e| Some(format!("{e:#}")))?;
    Ok((r.status, r.body))
}

/// Calls until `stop`, taking the gateways in turn.
fn client(gateways: Vec<SocketAddr>, stop: Arc<AtomicBool>, tally: Arc<Tally>, id: usize) {
    let mut next = id;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let body = format!("c{id}-{n}");
        let mut outcome = Err(Some("no gateway could be reached".to_string()));
        for attempt in 0..gateways.len() {
            let gw = gateways[(next + attempt) % gateways.len()];
            match call(gw, body.as_bytes()) {
                Err(None) => {
                    tally.reconnects.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Ok((200, reply)) if reply == body.as_bytes() => {
                    outcome = Ok(());
                    break;
                }
                Ok((status, reply)) => {
                    outcome = Err(Some(format!(
                        "{gw}: {status} {}",
                        String::from_utf8_lossy(&reply)
                    )));
                    break;
                }
                Err(Some(e)) => {
                    outcome = Err(Some(format!("{gw}: {e}")));
                    break;
                }
            }
        }
        next = next.wrapping_add(1);
        match outcome {
            Ok(()) => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tally.failed.fetch_add(1, Ordering::Relaxed);
                let mut f = tally.failures.lock().unwrap_or_else(|e| e.into_inner());
                if f.len() < 20 {
                    f.push(e.unwrap_or_default());
                }
            }
        }
    }
}

/// `ansible-playbook -i INVENTORY PLAYBOOK ARGS` with Ansible's files under `work`.
fn playbook(
    venv: &Path,
    work: &Path,
    inventory: &Path,
    playbook: &str,
    extra: &[&str],
) -> anyhow::Result<(Duration, String)> {
    let dir = paths::workspace_root().join("packaging/ansible");
    let mut cmd = Command::new(venv.join("bin/ansible-playbook"));
    cmd.current_dir(&dir)
        .arg("-i")
        .arg(inventory)
        .arg(playbook)
        .args(extra)
        .env("ANSIBLE_HOME", work.join("home"))
        .env("ANSIBLE_LOCAL_TEMP", work.join("local"))
        .env("ANSIBLE_REMOTE_TEMP", work.join("remote"))
        .env("ANSIBLE_PIPELINING", "true")
        .env("ANSIBLE_HOST_KEY_CHECKING", "false")
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_FORCE_COLOR", "0")
        .env("VIRTUAL_ENV", venv)
        .env_remove("ANSIBLE_CONFIG")
        .env_remove("PYTHONPATH");
    let started = Instant::now();
    let out = run_bounded(&mut cmd, PLAYBOOK_TIMEOUT)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "ansible-playbook {playbook} failed ({}):\n{}",
        out.status,
        tail_lines(&text, 60)
    );
    Ok((started.elapsed(), text))
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The inventory: three nodes reached through their sandboxes.
fn inventory(
    hosts: &[PackagedHost],
    addrs: &[Ipv4Addr],
    shared: &Path,
    key: &str,
    rpm: &Path,
) -> anyhow::Result<String> {
    let mut out = String::from("drop_nodes:\n  hosts:\n");
    for (i, host) in hosts.iter().enumerate() {
        let python = shared.join(format!("python-n{i}"));
        std::fs::write(
            &python,
            format!(
                "#!/bin/sh\n# Python inside node n{i}'s sandbox (its mount, pid, cgroup and network namespaces).\nexec nsenter -t {} -m -p -C -n -- /usr/bin/python3 \"$@\"\n",
                host.sandbox().systemd_pid()
            ),
        )?;
        std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755))?;
        let seeds: Vec<String> = addrs
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, a)| format!("\"{a}:{CLUSTER_PORT}\""))
            .collect();
        out.push_str(&format!(
            "    n{i}:\n      ansible_connection: local\n      ansible_python_interpreter: {}\n      drop_cluster_bind: \"{}:{CLUSTER_PORT}\"\n      drop_cluster_seeds: [{}]\n",
            python.display(),
            addrs[i],
            seeds.join(", ")
        ));
    }
    out.push_str(&format!(
        "  vars:\n    drop_rpm: {}\n    drop_rpm_remote_src: true\n    drop_rpm_query_command: [rpm, --dbpath, /var/lib/rpm]\n    \
         drop_rpm_install_command: [rpm, --dbpath, /var/lib/rpm, -U, --replacepkgs, --oldpackage, --nodeps]\n    \
         drop_cluster_key: \"{key}\"\n    drop_profile: fast\n    drop_gateway_listen: \"0.0.0.0:{GATEWAY_PORT}\"\n    \
         drop_wait_retries: 120\n    drop_wait_delay: 1\n    drop_drain_wait: 60\n",
        rpm.display()
    ));
    Ok(out)
}

fn rollout_under_load() -> anyhow::Result<Outcome> {
    if let Some(skip) = SystemdSandbox::unavailable()
        .or_else(|| require_command("rpm"))
        .or_else(|| require_command("ip"))
    {
        return Ok(skip);
    }
    let Some(venv) = ansible_venv() else {
        return Ok(Outcome::Skip(
            "DROP_ANSIBLE_VENV does not name a venv with ansible-playbook: run it through \
             `cargo xtask test`, which builds the pinned Ansible"
                .into(),
        ));
    };
    let (v1, v2) = (env!("CARGO_PKG_VERSION").to_string(), upgrade_version());
    let (pkg1, pkg2) = (package_of(&v1)?, package_of(&v2)?);

    // A folder every sandbox and the controller see at the same path: interpreters, Ansible's
    // remote temp, the flow file.
    let shared = tempfile::Builder::new()
        .prefix(&unique_name("roll"))
        .tempdir_in("/tmp")?;
    let work = shared.path();
    for d in ["home", "local", "remote"] {
        std::fs::create_dir_all(work.join(d))?;
    }
    std::fs::set_permissions(work, std::fs::Permissions::from_mode(0o755))?;

    let bridge = Bridge::new(NODES + 1)?;
    let addrs: Vec<Ipv4Addr> = (0..NODES).map(|i| bridge.host(i).addr()).collect();
    let mut hosts = Vec::new();
    for i in 0..NODES {
        hosts.push(PackagedHost::start(
            bridge.host(i).netns().path(),
            &[work.to_path_buf()],
        )?);
    }
    let key = check(Command::new(paths::bin("dropctl")).args(["cluster", "keygen"]))?;
    let inv = work.join("inventory.yml");
    std::fs::write(&inv, inventory(&hosts, &addrs, work, key.trim(), &pkg1)?)?;

    // Install build N everywhere with the role.
    let (took, _) = playbook(&venv, work, &inv, "site.yml", &[])?;
    println!(
        "  site.yml installed and started build {v1} on {NODES} nodes in {:.1} s",
        took.as_secs_f64()
    );
    let names: Vec<String> = (0..NODES).map(|i| format!("n{i}")).collect();
    wait_until(Duration::from_secs(30), "three members alive", || {
        let nodes = hosts[0].dropctl(&["node", "ls"])?;
        Ok(nodes
            .as_array()
            .is_some_and(|n| n.iter().filter(|n| n["state"] == "alive").count() == NODES))
    })?;
    hosts[0].dropctl(&["ns", "create", NS, "--nodes", &names.join(",")])?;
    let flow = work.join("roll.yaml");
    std::fs::write(
        &flow,
        "name: roll\npriority: 0\nfunc:\n  - name: roll\n    cmd: [/bin/cat]\n    num: 2\n",
    )?;
    std::fs::set_permissions(&flow, std::fs::Permissions::from_mode(0o644))?;
    hosts[0].dropctl(&["flow", "apply", flow.to_str().context("utf-8")?, "--ns", NS])?;

    let gateways: Vec<SocketAddr> = addrs
        .iter()
        .map(|a| SocketAddr::from((*a, GATEWAY_PORT)))
        .collect();
    let client_ns = bridge.host(NODES).netns();
    // Every gateway answers before the load starts.
    for gw in &gateways {
        let gw = *gw;
        wait_until(Duration::from_secs(30), "each gateway answering", || {
            client_ns.run(move || matches!(call(gw, b"hello"), Ok((200, _))))
        })?;
    }

    // The load, then the rollout to build N+1.
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut clients = Vec::new();
    for id in 0..2 {
        let (g, s, t) = (gateways.clone(), stop.clone(), tally.clone());
        clients.push(client_ns.spawn(move || {
            client(g, s, t, id);
            Ok(())
        }));
    }
    std::thread::sleep(Duration::from_secs(2));
    let before_ok = tally.ok.load(Ordering::Relaxed);
    ensure!(before_ok > 0, "the client got no answer before the rollout");
    let pkg2_s = format!("drop_rpm={}", pkg2.display());
    let rollout = playbook(&venv, work, &inv, "rollout.yml", &["-e", &pkg2_s]);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
    }
    let (took, log) = rollout?;
    let (ok, failed, reconnects) = (
        tally.ok.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
        tally.reconnects.load(Ordering::Relaxed),
    );
    let failures = tally
        .failures
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .join("\n");
    println!(
        "  rollout.yml {v1} → {v2} on {NODES} nodes took {:.1} s under load: {ok} calls answered, {failed} failed, {reconnects} connections opened to the next gateway",
        took.as_secs_f64()
    );
    // The order: one node at a time, each drained before its upgrade.
    let turns: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("TASK [drop : Drain the node"))
        .collect();
    ensure!(
        turns.len() == NODES,
        "drain tasks in the log: {}",
        turns.len()
    );

    // Every node on N+1, undrained, in the namespace.
    for (i, host) in hosts.iter().enumerate() {
        let st = host.dropctl(&["status"])?;
        ensure!(st["version"] == v2.as_str(), "n{i} after the rollout: {st}");
        let q = host.rpm(&["-q", "drop"])?;
        ensure!(q.trim().starts_with(&format!("drop-{v2}-1")), "n{i}: {q}");
        let drain = host.dropctl(&["node", "drain-status"])?;
        ensure!(drain["draining"] == false, "n{i} still drains: {drain}");
    }
    let st = hosts[0].dropctl(&["status"])?;
    ensure!(
        st["overview"]["namespace"]["quorum"] == true,
        "after the rollout: {st}"
    );
    if failed > 0 {
        bail!("{failed} calls failed during the rollout (target 0); the first ones:\n{failures}");
    }
    let _ = std::io::stdout().flush();
    Ok(Outcome::Pass)
}
