//! `cargo xtask setup`: installs, idempotently, what a fresh Debian 12 machine lacks for the build
//! and the tests. Each check is cheap, so every other verb runs it first.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{output, run_cmd, step};

/// Debian packages: LLVM 22 for bpf-linker; iproute2/ethtool/ping for network namespaces;
/// systemd + dbus for the throw-away systemd of the tests; util-linux for unshare/nsenter;
/// python3 for example functions; procps for pgrep; wrk for `bench runtime`.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "iproute2",
    "ethtool",
    "iputils-ping",
    "python3",
    "systemd",
    "dbus",
    "util-linux",
    "procps",
    "wrk",
    // The status page is tested in a real headless browser (tests/privileged/ui.rs).
    "chromium",
    "chromium-driver",
];

/// The nightly that builds drop-ebpf: its commit date and LLVM major. bpf-linker must be built
/// against the same LLVM major, and Debian ships LLVM 22 but not 23 — so the nightly stays pinned.
pub const NIGHTLY_COMMIT_DATE: &str = "2026-05-19";
/// rustup names a nightly by its publication date, the day after its commit date.
const NIGHTLY_CHANNEL: &str = "nightly-2026-05-20";
pub const LLVM_MAJOR: &str = "22";
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// What later steps need to know about the installed tools.
#[derive(Debug, Clone)]
pub struct Tools {
    /// rustup toolchain name of the pinned nightly.
    pub nightly: String,
    /// Directory holding the `bpf-linker` binary.
    pub bpf_linker_dir: PathBuf,
}

pub fn setup() -> anyhow::Result<Tools> {
    step("setup: apt packages", apt)?;
    let nightly = step("setup: pinned nightly with rust-src", nightly)?;
    let bpf_linker_dir = step("setup: bpf-linker", bpf_linker)?;
    step("setup: bpffs at /sys/fs/bpf", bpffs)?;
    Ok(Tools {
        nightly,
        bpf_linker_dir,
    })
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn apt() -> anyhow::Result<()> {
    apt_install(APT_PACKAGES)
}

/// Installs whichever of `packages` is missing (apt-get, as root); idempotent.
pub fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            let status = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !matches!(status, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        println!("    all {} packages present", packages.len());
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {missing:?}; run `cargo xtask setup` as root (it uses apt-get)"
        );
    }
    println!("    installing {missing:?}");
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.args(["-o", "DPkg::Lock::Timeout=600", "-q"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive");
        run_cmd(&mut cmd)
    };
    apt(&["update"])?;
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend(&missing);
    apt(&args)
}

fn commit_date(toolchain: &str) -> Option<String> {
    let out = Command::new("rustup")
        .args(["run", toolchain, "rustc", "-vV"])
        .env("RUSTUP_AUTO_INSTALL", "0")
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("commit-date: "))
        .map(str::to_string)
}

fn nightly() -> anyhow::Result<String> {
    // Prefer the dated channel; accept a plain `nightly` that happens to be the pinned build.
    let found = [NIGHTLY_CHANNEL, "nightly"]
        .into_iter()
        .find(|t| commit_date(t).as_deref() == Some(NIGHTLY_COMMIT_DATE))
        .map(str::to_string);
    let toolchain = match found {
        Some(t) => t,
        None => {
            println!("    installing {NIGHTLY_CHANNEL}");
            run_cmd(Command::new("rustup").args([
                "toolchain",
                "install",
                NIGHTLY_CHANNEL,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))
            .with_context(|| {
                format!("cannot install the pinned nightly {NIGHTLY_CHANNEL} (commit date {NIGHTLY_COMMIT_DATE}) with rustup")
            })?;
            NIGHTLY_CHANNEL.to_string()
        }
    };
    let vv = output(Command::new("rustup").args(["run", &toolchain, "rustc", "-vV"]))?;
    if !vv.contains(&format!("LLVM version: {LLVM_MAJOR}.")) {
        bail!(
            "{toolchain} is not built on LLVM {LLVM_MAJOR} (bpf-linker needs the same major):\n{vv}"
        );
    }
    let sysroot =
        output(Command::new("rustup").args(["run", &toolchain, "rustc", "--print", "sysroot"]))?;
    let src = PathBuf::from(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    if !src.is_dir() {
        println!("    adding rust-src to {toolchain}");
        run_cmd(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            &toolchain,
        ]))
        .context(
            "rust-src comes from rustup's own server; without it the XDP program cannot be built",
        )?;
    }
    println!("    {toolchain} (commit {NIGHTLY_COMMIT_DATE}, LLVM {LLVM_MAJOR}, rust-src)");
    Ok(toolchain)
}

/// Where tools built once per machine are kept: `$CARGO_HOME/drop-cache` (or `~/.cargo/...`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("drop-cache")
}

/// bpf-linker is built once per machine into the cache.
fn bpf_linker() -> anyhow::Result<PathBuf> {
    let root = cache_dir().join(format!("bpf-linker-{BPF_LINKER_VERSION}-llvm{LLVM_MAJOR}"));
    let bin = root.join("bin");
    let installed = Command::new(bin.join("bpf-linker"))
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        });
    if installed {
        println!("    cached at {}", bin.display());
        return Ok(bin);
    }
    println!(
        "    building bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR} (about 1–2 minutes, once)"
    );
    // LLVM_PREFIX: otherwise bpf-linker's build follows /usr/bin/llvm-config to /usr and does not
    // find Debian's libLLVM under /usr/lib/llvm-22/lib.
    run_cmd(
        crate::cargo()
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--no-default-features",
            ])
            .args(["--features", &format!("llvm-{LLVM_MAJOR}")])
            .arg("--root")
            .arg(&root)
            .env("LLVM_PREFIX", format!("/usr/lib/llvm-{LLVM_MAJOR}")),
    )?;
    Ok(bin)
}

fn bpffs() -> anyhow::Result<()> {
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
                && l.split_whitespace().nth(2) == Some("bpf")
        });
    if mounted {
        return Ok(());
    }
    if !is_root() {
        println!("    not mounted, and not root: pinning tests will be skipped");
        return Ok(());
    }
    run_cmd(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}
