//! A plugin's own RPM: `packaging/plugins/NAME/` (its `flow.yaml` and executables) installed as
//! `/usr/lib/drop/plugins/NAME/`, root-owned, in the package `drop-plugin-NAME` (noarch,
//! requires `drop`). The contents are drop-supervisor's
//! `[package.metadata.generate-rpm.variants.plugin-NAME]` (cargo-generate-rpm's `--variant`:
//! its top-level keys replace the node package's — assets, requires and every scriptlet); its
//! scriptlets only ask a running daemon to `dropctl plugin reload`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail, ensure};

use crate::{root, run_cmd, setup, step};

/// The plugins `cargo xtask rpm` packages, one RPM each.
pub const PLUGINS: &[&str] = &["node-stats"];

/// Builds `drop-plugin-NAME-VERSION-1.noarch.rpm` in target/rpm (no compilation: a plugin is a
/// flow and scripts).
pub fn build(name: &str, version: Option<&str>) -> anyhow::Result<PathBuf> {
    if !PLUGINS.contains(&name) {
        bail!("no plugin {name}: the packaged plugins are {PLUGINS:?} (packaging/plugins/)");
    }
    setup::apt_install(&["rpm"])?;
    let tool = super::generate_rpm()?;
    let dir = root().join("packaging/plugins").join(name);
    let version = match version {
        Some(v) => v.to_string(),
        None => super::workspace_version()?,
    };
    let out = root().join("target/rpm");
    std::fs::create_dir_all(&out)?;
    let pkg = out.join(format!("drop-plugin-{name}-{version}-1.noarch.rpm"));
    step(&format!("rpm: plugin {name}"), || {
        // The executables are POSIX sh: a syntax error fails the build, not a node.
        for entry in std::fs::read_dir(&dir).with_context(|| dir.display().to_string())? {
            let path = entry?.path();
            let head = std::fs::read(&path).unwrap_or_default();
            if head.starts_with(b"#!/bin/sh") {
                run_cmd(Command::new("sh").arg("-n").arg(&path))?;
            }
        }
        let _ = std::fs::remove_file(&pkg);
        let mut cmd = Command::new(&tool);
        cmd.current_dir(root())
            .args(["generate-rpm", "-p", "drop-supervisor", "-a", "noarch"])
            .args(["--variant", &format!("plugin-{name}")])
            .args(["-s", &format!("version = \"{version}\"")])
            .arg("-o")
            .arg(&out);
        run_cmd(&mut cmd)?;
        ensure!(
            pkg.is_file(),
            "cargo-generate-rpm wrote no {}",
            pkg.display()
        );
        Ok(())
    })?;
    super::print_package(&pkg)?;
    Ok(pkg)
}
