//! A host that has DROP installed from its RPM, for real: a throw-away systemd (see
//! [`crate::systemd`]) in a network namespace, whose `/usr` and `/etc` are writable overlays in
//! its own mount namespace only (their upper layers live in its state folder and go with it),
//! and an rpm database in its private `/var`. `rpm` runs in there with its scriptlets, so users,
//! folders, `daemon-reload`, `try-restart` and `disable --now` all happen as on a real host.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

use crate::systemd::{SandboxOptions, SystemdSandbox};

/// The unit the package installs.
pub const UNIT: &str = "drop-supervisor.service";

/// `target/rpm/drop-VERSION-1.*.rpm`.
pub fn package_of(version: &str) -> anyhow::Result<PathBuf> {
    let dir = crate::paths::workspace_root().join("target/rpm");
    let prefix = format!("drop-{version}-1.");
    std::fs::read_dir(&dir)
        .with_context(|| format!("{}: build it with `cargo xtask rpm`", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|e| e == "rpm")
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix))
        })
        .with_context(|| {
            format!(
                "no {prefix}*.rpm in target/rpm: build it with `cargo xtask rpm --version {version}`"
            )
        })
}

/// The version of the second package upgrades install (`cargo xtask rpm --version V`; xtask
/// computes the same).
pub fn upgrade_version() -> String {
    format!("{}.1", env!("CARGO_PKG_VERSION"))
}

/// `path` of a package, installed under `root`, is there with `mode` and owned by root:root.
pub fn ensure_installed(root: &Path, path: &str, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let m = std::fs::metadata(root.join(path.trim_start_matches('/')))
        .with_context(|| format!("{path} not installed"))?;
    ensure!(
        m.permissions().mode() & 0o7777 == mode,
        "{path}: mode {:o}, want {mode:o}",
        m.permissions().mode() & 0o7777
    );
    ensure!(
        m.uid() == 0 && m.gid() == 0,
        "{path}: owner {}:{}",
        m.uid(),
        m.gid()
    );
    Ok(())
}

/// `rpm --root ROOT --dbpath /var/lib/rpm ARGS` on the host (a package installed into a
/// folder, scriptlets only with their own flags): its stdout, or an error with its stderr.
pub fn rpm_in_root(root: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("rpm")
        .arg("--root")
        .arg(root)
        .args(["--dbpath", "/var/lib/rpm"])
        .args(args)
        .output()
        .context("running rpm")?;
    anyhow::ensure!(
        out.status.success(),
        "rpm {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A sandboxed host ready for `rpm -i`.
#[derive(Debug)]
pub struct PackagedHost {
    sandbox: SystemdSandbox,
}

impl PackagedHost {
    /// Starts the sandbox in the network namespace `netns` (`/run/netns/NAME`), mounts the
    /// overlays and creates the rpm database. `keep_tmp`: host folders under /tmp it must see.
    pub fn start(netns: &Path, keep_tmp: &[PathBuf]) -> anyhow::Result<PackagedHost> {
        let sandbox = SystemdSandbox::start_with(SandboxOptions {
            netns: Some(netns.to_path_buf()),
            keep_tmp: keep_tmp.to_vec(),
            ..SandboxOptions::default()
        })?;
        for dir in ["usr", "etc"] {
            let base = sandbox.state_dir().join(format!("overlay-{dir}"));
            std::fs::create_dir_all(base.join("upper"))?;
            std::fs::create_dir_all(base.join("work"))?;
            let opts = format!(
                "lowerdir=/{dir},upperdir={},workdir={}",
                base.join("upper").display(),
                base.join("work").display()
            );
            sandbox.run(
                "mount",
                ["-t", "overlay", "overlay", "-o", &opts, &format!("/{dir}")],
            )?;
        }
        std::fs::create_dir_all(sandbox.host_path("/var/lib/rpm"))?;
        let host = PackagedHost { sandbox };
        host.rpm(&["--initdb"])?;
        Ok(host)
    }

    pub fn sandbox(&self) -> &SystemdSandbox {
        &self.sandbox
    }

    /// `rpm --dbpath /var/lib/rpm ARGS` inside, scriptlets included: stdout and stderr.
    pub fn rpm(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["--dbpath", "/var/lib/rpm"];
        all.extend_from_slice(args);
        let out = self.sandbox.run("rpm", &all)?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// The installed `dropctl --json ARGS` inside (its default socket).
    pub fn dropctl(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.sandbox.run("/usr/bin/dropctl", &all)?;
        serde_json::from_slice(&out.stdout).context("dropctl printed no JSON")
    }

    /// The unit's `MainPID`, `ActiveState` and `UnitFileState`.
    pub fn unit_state(&self) -> anyhow::Result<(u32, String, String)> {
        let out = self.sandbox.run(
            "systemctl",
            [
                "show",
                "-p",
                "MainPID",
                "-p",
                "ActiveState",
                "-p",
                "UnitFileState",
                UNIT,
            ],
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_default()
                .to_string()
        };
        Ok((
            get("MainPID").parse().unwrap_or(0),
            get("ActiveState"),
            get("UnitFileState"),
        ))
    }

    /// How many times the daemon reported ready in the unit's journal.
    pub fn ready_count(&self) -> usize {
        let out = self.sandbox.run(
            "journalctl",
            [
                "--no-pager",
                "-o",
                "cat",
                "-u",
                UNIT,
                "--grep",
                "drop-supervisor ready",
            ],
        );
        match out {
            Ok(out) => String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains("drop-supervisor ready"))
                .count(),
            // journalctl --grep exits 1 when nothing matches
            Err(_) => 0,
        }
    }
}

/// Polls `f` every 100 ms until it says true, up to `limit`; the last error in the message.
pub fn wait_until(
    limit: Duration,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    while Instant::now() < deadline {
        match f() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{what}: not within {limit:?} ({last})")
}
