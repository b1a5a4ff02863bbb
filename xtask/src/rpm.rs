//! `cargo xtask rpm`: one RPM for a node (cargo-generate-rpm, no rpmbuild; the contents are in
//! drop-supervisor's `[package.metadata.generate-rpm]`). Builds the XDP object and the release
//! binaries, strips them, writes dropctl's man page and shell completions into
//! target/rpm/staging, checks the glibc floor (RHEL 9-class hosts have 2.34), and writes
//! target/rpm/drop-<version>-1.x86_64.rpm. Then each plugin's own package ([`plugin`]:
//! target/rpm/drop-plugin-NAME-<version>-1.noarch.rpm); `--plugin NAME` builds only that one.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{cargo, output, root, run_cmd, setup, step};

pub mod plugin;

/// The cargo-generate-rpm release this builds with, installed once into the cache.
const GENERATE_RPM: &str = "0.21.1";
/// The oldest glibc the package promises (RHEL 9).
const GLIBC_FLOOR: (u32, u32) = (2, 34);

#[derive(Debug, clap::Args)]
pub struct RpmArgs {
    /// The package version (default: the crate's).
    #[arg(long)]
    pub version: Option<String>,
    /// Only this plugin's package (packaging/plugins/NAME), no node package.
    #[arg(long, value_name = "NAME")]
    pub plugin: Option<String>,
}

fn generate_rpm() -> anyhow::Result<PathBuf> {
    let dir = setup::cache_dir().join(format!("cargo-generate-rpm-{GENERATE_RPM}"));
    let bin = dir.join("bin/cargo-generate-rpm");
    if bin.is_file() {
        return Ok(bin);
    }
    step("setup: cargo-generate-rpm", || {
        run_cmd(
            cargo()
                .args([
                    "install",
                    "--locked",
                    "cargo-generate-rpm",
                    "--version",
                    GENERATE_RPM,
                    "--root",
                ])
                .arg(&dir),
        )
    })?;
    Ok(bin)
}

/// The highest `GLIBC_x.y` symbol version `bin` needs.
fn glibc_needed(bin: &Path) -> anyhow::Result<(u32, u32)> {
    let text = output(Command::new("objdump").arg("-T").arg(bin))?;
    let mut max = (0, 0);
    for word in text.split_whitespace() {
        let word = word.trim_matches(|c| c == '(' || c == ')');
        let Some(v) = word.strip_prefix("GLIBC_") else {
            continue;
        };
        let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let ver = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        max = max.max(ver);
    }
    if max == (0, 0) {
        bail!("no GLIBC_ symbol version in {} (objdump -T)", bin.display());
    }
    Ok(max)
}

/// The version of the second package the upgrade test installs: this one with `.1` appended
/// (newer to rpm; tests/privileged/package.rs expects the same).
pub fn upgrade_version() -> String {
    format!("{}.1", workspace_version().unwrap_or_else(|_| "0".into()))
}

/// Prints a package's file list (`rpm -qlvp`), size and entry count.
pub fn print_package(pkg: &Path) -> anyhow::Result<()> {
    let list = output(Command::new("rpm").args(["-qlvp"]).arg(pkg))?;
    println!("{list}");
    println!(
        "    {} ({} bytes, {} entries)",
        pkg.display(),
        std::fs::metadata(pkg)?.len(),
        list.lines().count()
    );
    Ok(())
}

/// `version` of the workspace's `[workspace.package]`.
fn workspace_version() -> anyhow::Result<String> {
    let text = std::fs::read_to_string(root().join("Cargo.toml"))?;
    text.lines()
        .skip_while(|l| l.trim() != "[workspace.package]")
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with('['))
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "version").then(|| v.trim().trim_matches('"').to_string())
        })
        .context("no version in Cargo.toml's [workspace.package]")
}

pub fn rpm(args: &RpmArgs) -> anyhow::Result<PathBuf> {
    if let Some(name) = &args.plugin {
        return plugin::build(name, args.version.as_deref());
    }
    let version = match &args.version {
        Some(v) => v.clone(),
        None => workspace_version()?,
    };
    let tools = setup::setup()?;
    setup::apt_install(&["binutils", "rpm"])?;
    crate::ebpf::build(&tools)?;
    let tool = generate_rpm()?;
    // The binaries name the package's version (`dropctl status`, `node ls`), so a rollout can
    // tell which build each node runs.
    crate::build_release_binaries_as(args.version.as_deref())?;
    let staging = root().join("target/rpm/staging");
    std::fs::create_dir_all(&staging)?;
    step(
        "rpm: stage stripped binaries, man page, completions",
        || {
            for bin in ["drop-supervisor", "dropctl"] {
                run_cmd(
                    Command::new("strip")
                        .args(["-s", "-o"])
                        .arg(staging.join(bin))
                        .arg(root().join("target/release").join(bin)),
                )?;
            }
            let dropctl = root().join("target/release/dropctl");
            std::fs::write(
                staging.join("dropctl.1"),
                output(Command::new(&dropctl).arg("man"))?,
            )?;
            // The default config names the version that shipped it: a newer package's default
            // then differs, so an edited /etc/drop/drop.toml stays and the new one lands beside
            // it as .rpmnew (rpm writes none when the packaged file did not change).
            std::fs::write(
                staging.join("drop.toml"),
                format!(
                    "# Shipped with drop {version}.\n{}",
                    std::fs::read_to_string(root().join("packaging/drop.toml"))?
                ),
            )?;
            for (shell, file) in [
                ("bash", "dropctl.bash"),
                ("zsh", "_dropctl"),
                ("fish", "dropctl.fish"),
            ] {
                std::fs::write(
                    staging.join(file),
                    output(Command::new(&dropctl).args(["completions", shell]))?,
                )?;
            }
            Ok(())
        },
    )?;
    step("rpm: glibc floor", || {
        for bin in ["drop-supervisor", "dropctl"] {
            let (major, minor) = glibc_needed(&staging.join(bin))?;
            println!("    {bin} needs GLIBC_{major}.{minor}");
            if (major, minor) > GLIBC_FLOOR {
                bail!(
                    "{bin} needs GLIBC_{major}.{minor}, newer than the {}.{} of RHEL 9-class hosts",
                    GLIBC_FLOOR.0,
                    GLIBC_FLOOR.1
                );
            }
        }
        Ok(())
    })?;
    let out = root().join("target/rpm");
    step("rpm: generate", || {
        let mut cmd = Command::new(&tool);
        cmd.current_dir(root())
            .args(["generate-rpm", "-p", "drop-supervisor", "-o"])
            .arg(&out);
        if let Some(v) = &args.version {
            cmd.args(["-s", &format!("version = \"{v}\"")]);
        }
        run_cmd(&mut cmd)
    })?;
    let pkg = out.join(format!("drop-{version}-1.x86_64.rpm"));
    if !pkg.is_file() {
        bail!("cargo-generate-rpm wrote no {}", pkg.display());
    }
    print_package(&pkg)?;
    for name in plugin::PLUGINS {
        plugin::build(name, args.version.as_deref())?;
    }
    Ok(pkg)
}
