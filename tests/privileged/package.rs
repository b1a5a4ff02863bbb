//! The node's RPM as an operator meets it. Built by `cargo xtask rpm` (which `cargo xtask test`
//! runs first, for this version and for [`upgrade_version`]).
//!
//! - Installed into an empty root with Debian's `rpm` (`--root`, its own database): its files,
//!   modes, owners and config files; a config edit survives the erase as `.rpmsave`.
//! - Installed for real into a throw-away systemd (in a network namespace of its own): the
//!   sandbox's `/usr` and `/etc` become writable overlays inside its mount namespace only, `rpm`
//!   runs in there with its scriptlets (users, folders, daemon-reload), the installed unit starts
//!   and answers `dropctl status` and a gateway call; an upgrade to the next build keeps an
//!   edited config (`.rpmnew` beside it), the node id and the flows, and restarts the daemon
//!   once; the erase stops and disables the unit and keeps the state.

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::Command;

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use drop_tests::netns::Netns;
use drop_tests::package::{
    PackagedHost, UNIT, package_of, rpm_in_root, upgrade_version, wait_until,
};
use drop_tests::systemd::SystemdSandbox;
use drop_tests::{Outcome, Test, require_command, require_root};

pub const TESTS: &[Test] = &[
    Test {
        name: "package_rpm_installs_files_modes_config_and_erases",
        run: install_and_erase,
    },
    Test {
        name: "package_rpm_in_systemd_installs_starts_upgrades_and_erases",
        run: in_systemd,
    },
];

/// This version's package.
fn package() -> anyhow::Result<PathBuf> {
    package_of(env!("CARGO_PKG_VERSION"))
}

fn install_and_erase() -> anyhow::Result<Outcome> {
    if let Some(skip) = require_root().or_else(|| require_command("rpm")) {
        return Ok(skip);
    }
    let pkg = package()?;
    let root = tempfile::Builder::new().prefix("droprpm").tempdir()?;
    std::fs::create_dir_all(root.path().join("var/lib/rpm"))?;
    rpm_in_root(root.path(), &["--initdb"])?;
    let pkg_s = pkg.to_str().context("utf-8")?;
    // --nodeps: the empty root has no glibc package; --noscripts: no systemd in it.
    rpm_in_root(root.path(), &["-i", "--nodeps", "--noscripts", pkg_s])?;
    let r = |p: &str| root.path().join(p.trim_start_matches('/'));
    let expect: &[(&str, u32)] = &[
        ("/usr/bin/drop-supervisor", 0o755),
        ("/usr/bin/dropctl", 0o755),
        ("/usr/lib/systemd/system/drop-supervisor.service", 0o644),
        ("/usr/lib/sysusers.d/drop.conf", 0o644),
        ("/usr/lib/tmpfiles.d/drop.conf", 0o644),
        ("/usr/share/drop/sysctl/90-drop.conf", 0o644),
        ("/etc/drop/drop.toml", 0o644),
        ("/usr/share/man/man1/dropctl.1", 0o644),
        ("/usr/share/bash-completion/completions/dropctl", 0o644),
        ("/usr/share/zsh/site-functions/_dropctl", 0o644),
        ("/usr/share/fish/vendor_completions.d/dropctl.fish", 0o644),
        ("/usr/lib/drop/plugins/README", 0o644),
        ("/usr/share/doc/drop/grafana-dashboard.json", 0o644),
    ];
    for (path, mode) in expect {
        drop_tests::package::ensure_installed(root.path(), path, *mode)?;
    }
    // Nothing applies the tuning profile behind the operator's back.
    ensure!(
        !r("/usr/lib/sysctl.d/90-drop.conf").exists() && !r("/etc/sysctl.d/90-drop.conf").exists(),
        "the sysctl profile is installed where it would be applied"
    );
    let config = rpm_in_root(root.path(), &["-qc", "drop"])?;
    ensure!(
        config.lines().any(|l| l == "/etc/drop/drop.toml"),
        "config files: {config}"
    );
    let files = rpm_in_root(root.path(), &["-ql", "drop"])?;
    // The installed binary runs and reads the installed default config.
    let check = Command::new(r("/usr/bin/drop-supervisor"))
        .args(["--check-config", "-c"])
        .arg(r("/etc/drop/drop.toml"))
        .output()?;
    ensure!(
        check.status.success(),
        "the default config does not check: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    // Erase: an edited config is kept aside, everything else goes.
    std::fs::write(r("/etc/drop/drop.toml"), "[node]\nname = \"edited\"\n")?;
    rpm_in_root(root.path(), &["-e", "--nodeps", "--noscripts", "drop"])?;
    ensure!(
        !r("/usr/bin/drop-supervisor").exists(),
        "the binary survived the erase"
    );
    ensure!(
        r("/etc/drop/drop.toml.rpmsave").exists(),
        "the edited config was not kept as .rpmsave"
    );
    println!(
        "  {}: {} bytes, {} files installed with their modes and owners; /etc/drop/drop.toml is %config(noreplace); erase kept the edited config as .rpmsave",
        pkg.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
        std::fs::metadata(&pkg)?.len(),
        files.lines().count()
    );
    Ok(Outcome::Pass)
}

/// `POST /api/v1/<pool>` to the default gateway (127.0.0.1:8081) inside `netns`.
fn gateway_call(netns: &Netns, pool: &str, body: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
    let path = format!("/api/v1/{pool}");
    netns.run(|| -> anyhow::Result<(u16, Vec<u8>)> {
        let mut s = std::net::TcpStream::connect_timeout(
            &"127.0.0.1:8081".parse()?,
            Duration::from_secs(2),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let r = drop_supervisor::http::roundtrip(&mut s, "POST", &path, Some(body))?;
        Ok((r.status, r.body))
    })?
}

fn in_systemd() -> anyhow::Result<Outcome> {
    if let Some(skip) = SystemdSandbox::unavailable()
        .or_else(|| require_command("rpm"))
        .or_else(|| require_command("ip"))
    {
        return Ok(skip);
    }
    let (v1, v2) = (env!("CARGO_PKG_VERSION").to_string(), upgrade_version());
    let (pkg1, pkg2) = (package_of(&v1)?, package_of(&v2)?);
    let netns = Netns::new()?;
    let host = PackagedHost::start(netns.path(), &[])?;
    let sandbox = host.sandbox();

    // Install: the scriptlets create the users and folders and reload systemd.
    let pkg1_s = pkg1.to_str().context("utf-8")?;
    host.rpm(&["-i", "--nodeps", pkg1_s])?;
    let passwd = std::fs::read_to_string(sandbox.host_path("/etc/passwd"))?;
    ensure!(
        passwd.lines().any(|l| l.starts_with("drop-fn:")),
        "the %post scriptlet did not create the worker user"
    );
    let (_, _, file_state) = host.unit_state()?;
    ensure!(
        file_state == "disabled",
        "systemd does not know the installed unit (UnitFileState={file_state:?})"
    );
    let started = Instant::now();
    sandbox.run("systemctl", ["enable", "--now", UNIT])?;
    let (pid1, active, _) = host.unit_state()?;
    ensure!(
        active == "active",
        "the installed unit is {active}\n{}",
        sandbox.unit_report(UNIT)
    );
    let status = host.dropctl(&["status"])?;
    let node_id = status["node_id"].as_str().unwrap_or_default().to_string();
    ensure!(!node_id.is_empty(), "status: {status}");
    ensure!(
        status["version"] == v1.as_str(),
        "the installed daemon: {status}"
    );
    println!(
        "  installed {} and started its unit in {:.0} ms: dropctl status answers (node {node_id})",
        pkg1.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
        started.elapsed().as_secs_f64() * 1e3
    );

    // A flow, answered through the gateway (the default config's 127.0.0.1:8081).
    let flow = sandbox.state_dir().join("pkgecho.yaml");
    std::fs::write(
        &flow,
        "name: pkgecho\nfunc:\n  - name: pkgecho\n    cmd: [/bin/cat]\n    num: 1\n",
    )?;
    std::fs::set_permissions(&flow, std::fs::Permissions::from_mode(0o644))?;
    host.dropctl(&["flow", "apply", flow.to_str().context("utf-8")?])?;
    wait_until(Duration::from_secs(10), "a gateway answer", || {
        Ok(gateway_call(&netns, "pkgecho", b"through the package")?
            == (200, b"through the package".to_vec()))
    })?;

    // Upgrade to the next build, with an edited config.
    let config = sandbox.host_path("/etc/drop/drop.toml");
    let edited = format!(
        "{}\n# edited by the operator\n",
        std::fs::read_to_string(&config)?
    );
    std::fs::write(&config, &edited)?;
    let ready_before = host.ready_count();
    let pkg2_s = pkg2.to_str().context("utf-8")?;
    let out = host.rpm(&["-U", "--nodeps", pkg2_s])?;
    let q = host.rpm(&["-q", "drop"])?;
    ensure!(
        q.trim().starts_with(&format!("drop-{v2}-1")),
        "after the upgrade: {q}"
    );
    ensure!(
        std::fs::read_to_string(&config)? == edited,
        "the upgrade changed the edited config ({out})"
    );
    let rpmnew = std::fs::read_to_string(sandbox.host_path("/etc/drop/drop.toml.rpmnew"))
        .context("no drop.toml.rpmnew beside the edited config")?;
    ensure!(
        rpmnew.starts_with(&format!("# Shipped with drop {v2}.")),
        "{rpmnew}"
    );
    wait_until(
        Duration::from_secs(10),
        "the upgraded daemon answering",
        || Ok(host.dropctl(&["status"]).is_ok()),
    )?;
    let (pid2, active, _) = host.unit_state()?;
    ensure!(
        active == "active" && pid2 != pid1,
        "after the upgrade: {active}, pid {pid1} → {pid2}"
    );
    let ready_after = host.ready_count();
    ensure!(
        ready_after == ready_before + 1,
        "the upgrade restarted the daemon {} times",
        ready_after.saturating_sub(ready_before)
    );
    let status = host.dropctl(&["status"])?;
    ensure!(
        status["node_id"] == node_id.as_str(),
        "node id changed: {status}"
    );
    ensure!(
        status["version"] == v2.as_str(),
        "the upgraded daemon: {status}"
    );
    let flows = host.dropctl(&["flow", "ls"])?;
    ensure!(
        flows.to_string().contains("pkgecho"),
        "flows after the upgrade: {flows}"
    );
    wait_until(
        Duration::from_secs(10),
        "a gateway answer after the upgrade",
        || Ok(gateway_call(&netns, "pkgecho", b"after")? == (200, b"after".to_vec())),
    )?;
    println!(
        "  upgraded to {v2}: edited config kept, drop.toml.rpmnew beside it, node id and flow kept, daemon restarted once (pid {pid1} → {pid2}; ready in the journal {ready_before} → {ready_after})"
    );

    // Erase: the unit stops and is disabled, the state stays.
    host.rpm(&["-e", "--nodeps", "drop"])?;
    let (_, active, file_state) = host.unit_state()?;
    ensure!(
        active == "inactive" && file_state != "enabled",
        "after the erase: {active}, {file_state}"
    );
    ensure!(
        sandbox.host_path("/var/lib/drop/node-id").exists(),
        "the erase removed the node's state"
    );
    ensure!(
        sandbox.host_path("/etc/drop/drop.toml.rpmsave").exists(),
        "the edited config was not kept as .rpmsave"
    );
    ensure!(
        !sandbox.host_path("/usr/bin/drop-supervisor").exists(),
        "the binary survived the erase"
    );
    println!(
        "  erased: unit stopped and disabled, /var/lib/drop kept, edited config kept as .rpmsave"
    );
    Ok(Outcome::Pass)
}
