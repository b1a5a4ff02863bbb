//! A plugin's RPM as an operator meets it: `drop-plugin-node-stats` (built by `cargo xtask rpm`,
//! which `cargo xtask test` runs first) installed into an empty root with Debian's `rpm`
//! (`--root`, its own database): its files, modes and owners, what it requires, its
//! scriptlets (a reload, never the node package's stop), the installed folder read as a plugin
//! by the daemon's own discovery, the installed executable printing a line, and the erase.
//! Scriptlets are not run here (`--noscripts`): they talk to a running daemon.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use drop_tests::package::rpm_in_root;
use drop_tests::{Outcome, Test, paths, require_command, require_root};

pub const TESTS: &[Test] = &[Test {
    name: "plugin_rpm_node_stats_installs_files_modes_owners_and_erases",
    run: node_stats_package,
}];

/// `target/rpm/drop-plugin-NAME-VERSION-1.noarch.rpm` of this version.
fn plugin_package(name: &str) -> anyhow::Result<PathBuf> {
    let file = format!(
        "drop-plugin-{name}-{}-1.noarch.rpm",
        env!("CARGO_PKG_VERSION")
    );
    let path = paths::workspace_root().join("target/rpm").join(&file);
    ensure!(
        path.is_file(),
        "no target/rpm/{file}: build it with `cargo xtask rpm --plugin {name}`"
    );
    Ok(path)
}

/// The package's scriptlet of that name (`postinstall`, `preuninstall`, `postuninstall`), from
/// `rpm -qp --scripts`.
fn scriptlet(scripts: &str, name: &str) -> String {
    let head = format!("{name} scriptlet");
    scripts
        .lines()
        .skip_while(|l| !l.starts_with(&head))
        .skip(1)
        .take_while(|l| !l.ends_with("scriptlet:") && !l.contains(" scriptlet (using "))
        .collect::<Vec<_>>()
        .join("\n")
}

fn node_stats_package() -> anyhow::Result<Outcome> {
    if let Some(skip) = require_root().or_else(|| require_command("rpm")) {
        return Ok(skip);
    }
    let pkg = plugin_package("node-stats")?;
    let pkg_s = pkg.to_str().context("utf-8")?;
    let root = tempfile::Builder::new().prefix("dropplugin").tempdir()?;
    std::fs::create_dir_all(root.path().join("var/lib/rpm"))?;
    rpm_in_root(root.path(), &["--initdb"])?;

    // What the package is: noarch, needs the node package, and its scriptlets only reload.
    let info = rpm_in_root(root.path(), &["-qp", "--qf", "%{NAME} %{ARCH}\\n", pkg_s])?;
    ensure!(
        info.trim() == "drop-plugin-node-stats noarch",
        "name and arch: {info}"
    );
    let requires = rpm_in_root(root.path(), &["-qp", "--requires", pkg_s])?;
    ensure!(
        requires.lines().any(|l| l.trim() == "drop"),
        "it must require drop: {requires}"
    );
    ensure!(
        !requires.contains("glibc"),
        "a shell script needs no glibc of its own: {requires}"
    );
    let scripts = rpm_in_root(root.path(), &["-qp", "--scripts", pkg_s])?;
    let (post, preun, postun) = (
        scriptlet(&scripts, "postinstall"),
        scriptlet(&scripts, "preuninstall"),
        scriptlet(&scripts, "postuninstall"),
    );
    ensure!(
        post.contains("dropctl plugin reload") && postun.contains("dropctl plugin reload"),
        "install and erase reload the plugins:\n{scripts}"
    );
    ensure!(
        !scripts.contains("systemctl"),
        "a plugin's scriptlets never stop, disable or restart the daemon:\n{scripts}"
    );
    ensure!(preun.trim() == ":", "%preun: {preun:?}");

    // --nodeps: the empty root has no drop package.
    rpm_in_root(root.path(), &["-i", "--nodeps", "--noscripts", pkg_s])?;
    let r = |p: &str| root.path().join(p.trim_start_matches('/'));
    let folder = "/usr/lib/drop/plugins/node-stats";
    let files = rpm_in_root(root.path(), &["-ql", "drop-plugin-node-stats"])?;
    let mut listed: Vec<&str> = files.lines().collect();
    listed.sort_unstable();
    let want = [
        "/usr/lib/drop/plugins/node-stats/flow.yaml",
        "/usr/lib/drop/plugins/node-stats/node-stats",
    ];
    ensure!(listed == want, "file list: {listed:?}");
    for (path, mode) in [(want[0], 0o644), (want[1], 0o755), (folder, 0o755)] {
        drop_tests::package::ensure_installed(root.path(), path, mode)?;
    }
    let installed = std::fs::read_dir(r(folder))?.count();
    ensure!(installed == 2, "{folder} holds {installed} entries");

    // The daemon's own discovery reads the installed folder as one plugin, its program the
    // installed file.
    let found = drop_supervisor::plugins::discover(&r("/usr/lib/drop/plugins"))?;
    ensure!(
        found.len() == 1 && found[0].name == "node-stats",
        "discovered: {:?}",
        found.iter().map(|f| &f.name).collect::<Vec<_>>()
    );
    let flow = drop_supervisor::plugins::prepare(&found[0]).map_err(anyhow::Error::msg)?;
    let pool = &flow.pools[0];
    ensure!(
        pool.name == "node_stats_stream"
            && pool.mode == drop_supervisor::runtime::flow::Mode::Stream
            && Path::new(&pool.argv[0]) == r(want[1]),
        "flow: {} {:?} {:?}",
        pool.name,
        pool.mode,
        pool.argv
    );

    // The installed executable prints its line (a 1 s interval).
    let started = Instant::now();
    let mut child = Command::new(r(want[1]))
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("NODE_STATS_INTERVAL", "1")
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    let read = std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line);
    let _ = child.kill();
    let _ = child.wait();
    read?;
    let took = started.elapsed();
    let v: serde_json::Value =
        serde_json::from_str(&line).with_context(|| format!("not JSON: {line:?}"))?;
    ensure!(
        v["mem_total_kb"].as_u64().unwrap_or(0) > 0
            && v["cpu_busy_pct"].is_number()
            && v["load1"].is_number()
            && took < Duration::from_secs(5),
        "{line} after {took:?}"
    );

    // Erase: its files go (the folder, once empty, goes with the %postun not run here).
    rpm_in_root(
        root.path(),
        &["-e", "--nodeps", "--noscripts", "drop-plugin-node-stats"],
    )?;
    ensure!(
        !r(want[0]).exists() && !r(want[1]).exists(),
        "files survived the erase"
    );
    ensure!(
        drop_supervisor::plugins::discover(&r("/usr/lib/drop/plugins"))?.is_empty(),
        "an erased plugin is no plugin any more"
    );
    println!(
        "  {}: {} bytes, noarch, requires drop; {} files root-owned (flow.yaml 0644, node-stats 0755); discovered as plugin node-stats; first line in {:.2} s: {}",
        pkg.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
        std::fs::metadata(&pkg)?.len(),
        listed.len(),
        took.as_secs_f64(),
        line.trim()
    );
    Ok(Outcome::Pass)
}
