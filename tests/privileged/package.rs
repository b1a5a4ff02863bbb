//! The node's RPM as an operator meets it: installed into an empty root with Debian's `rpm`
//! (`--root`, its own database), its files, modes, owners and config files checked; a config
//! edit survives the erase as `.rpmsave`. Built by `cargo xtask rpm` (which `cargo xtask test`
//! runs first); scriptlets are not run here (they need systemd, see the unit's own test).

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, ensure};
use drop_tests::{Outcome, Test, paths, require_command, require_root};

pub const TESTS: &[Test] = &[Test {
    name: "package_rpm_installs_files_modes_config_and_erases",
    run: install_and_erase,
}];

/// The newest `target/rpm/*.rpm`.
fn package() -> anyhow::Result<PathBuf> {
    let dir = paths::workspace_root().join("target/rpm");
    std::fs::read_dir(&dir)
        .with_context(|| format!("{}: build it with `cargo xtask rpm`", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "rpm"))
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .context("no RPM in target/rpm: build it with `cargo xtask rpm`")
}

fn rpm(root: &std::path::Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("rpm")
        .arg("--root")
        .arg(root)
        .args(["--dbpath", "/var/lib/rpm"])
        .args(args)
        .output()
        .context("running rpm")?;
    ensure!(
        out.status.success(),
        "rpm {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn install_and_erase() -> anyhow::Result<Outcome> {
    if let Some(skip) = require_root().or_else(|| require_command("rpm")) {
        return Ok(skip);
    }
    let pkg = package()?;
    let root = tempfile::Builder::new().prefix("droprpm").tempdir()?;
    std::fs::create_dir_all(root.path().join("var/lib/rpm"))?;
    rpm(root.path(), &["--initdb"])?;
    let pkg_s = pkg.to_str().context("utf-8")?;
    // --nodeps: the empty root has no glibc package; --noscripts: no systemd in it.
    rpm(root.path(), &["-i", "--nodeps", "--noscripts", pkg_s])?;
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
    ];
    for (path, mode) in expect {
        let m = std::fs::metadata(r(path)).with_context(|| format!("{path} not installed"))?;
        ensure!(
            m.permissions().mode() & 0o7777 == *mode,
            "{path}: mode {:o}, want {mode:o}",
            m.permissions().mode() & 0o7777
        );
        ensure!(
            m.uid() == 0 && m.gid() == 0,
            "{path}: owner {}:{}",
            m.uid(),
            m.gid()
        );
    }
    // Nothing applies the tuning profile behind the operator's back.
    ensure!(
        !r("/usr/lib/sysctl.d/90-drop.conf").exists() && !r("/etc/sysctl.d/90-drop.conf").exists(),
        "the sysctl profile is installed where it would be applied"
    );
    let config = rpm(root.path(), &["-qc", "drop"])?;
    ensure!(
        config.lines().any(|l| l == "/etc/drop/drop.toml"),
        "config files: {config}"
    );
    let files = rpm(root.path(), &["-ql", "drop"])?;
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
    rpm(root.path(), &["-e", "--nodeps", "--noscripts", "drop"])?;
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
