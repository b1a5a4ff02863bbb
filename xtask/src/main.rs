//! `cargo xtask`: the project's automation. Every verb prints one line per step and fails with
//! a message that says what to do.
//!
//! - `setup`      install what the build and the tests need (idempotent; seconds when done)
//! - `build-ebpf` build the XDP object with the pinned nightly and bpf-linker
//! - `run`        set up, build, and run a single-node DROP in the foreground (state in target/drop-dev)
//! - `test`       set up, then fmt, clippy, unit tests and the privileged integration tests
//! - `ci`         what CI runs: `test` with skips counted as failures
//! - `layers`     fail on a module cycle inside any crate (also one of `test`'s lint steps)
//! - `fuzz`       run the libFuzzer targets of `fuzz/` (`--secs N` each); `test` runs them briefly
//! - `bench`      benchmarks (`bench runtime`, `bench cluster`); figures go to BENCHMARKS.md
//! - `ansible-lint` ansible-lint and syntax check of packaging/ansible (pinned Ansible in a venv)

mod ansible;
mod bench;
mod ebpf;
mod fuzz;
mod layers;
mod rpm;
mod run;
mod setup;
mod test;
mod vm;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "DROP project automation")]
struct Cli {
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Debug, Subcommand)]
enum Verb {
    /// Install everything the build and tests need (apt packages, nightly rust-src, bpf-linker).
    Setup,
    /// Build the XDP object (drop-ebpf) with the pinned nightly and bpf-linker.
    BuildEbpf,
    /// Build everything and run a single-node DROP in the foreground (state in target/drop-dev).
    Run,
    /// fmt check, clippy -D warnings, unit tests, privileged integration tests; summary line.
    Test(test::TestArgs),
    /// What CI runs: `test` where a skipped privileged test counts as a failure.
    Ci,
    /// Fail on a cycle among sibling modules inside any crate of the workspace.
    Layers,
    /// Fuzz the parsers (flow YAML, control API, gateway framing, worker protocol, peer
    /// messages, state merge, tar members) for `--secs` each; a crash fails.
    Fuzz(fuzz::FuzzArgs),
    /// Benchmarks: `runtime` (function runtime: pipes, pool, gateway, bare HTTP), `cluster`
    /// (membership convergence, crash detection, update spread).
    Bench(bench::BenchArgs),
    /// The node's RPM (target/rpm/drop-VERSION-1.x86_64.rpm).
    Rpm(rpm::RpmArgs),
    /// ansible-lint (production profile) and `ansible-playbook --syntax-check` of the role and
    /// playbooks in packaging/ansible, with the pinned Ansible in a cached venv.
    AnsibleLint,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.verb {
        Verb::Setup => setup::setup().map(|_| ()),
        Verb::BuildEbpf => setup::setup().and_then(|tools| ebpf::build(&tools).map(|_| ())),
        Verb::Run => run::run(),
        Verb::Rpm(args) => rpm::rpm(&args).map(|_| ()),
        Verb::Test(args) => test::test(args),
        Verb::Ci => test::test(test::TestArgs {
            strict: true,
            ..Default::default()
        }),
        Verb::Bench(args) => bench::bench(args),
        Verb::Layers => layers::check(&workspace_crates()),
        Verb::Fuzz(args) => fuzz::fuzz(args),
        Verb::AnsibleLint => ansible::lint(),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// The directories of the workspace's crates (drop-ebpf is its own workspace, checked too).
pub fn workspace_crates() -> Vec<PathBuf> {
    [
        "drop-common",
        "drop-ebpf",
        "drop-net",
        "drop-supervisor",
        "xtask",
        "tests",
        "fuzz",
    ]
    .iter()
    .map(|c| root().join(c))
    .collect()
}

/// Runs `f` as a named step: prints `name ...`, then `ok (Ns)` or the failure.
pub fn step<T>(name: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let started = Instant::now();
    println!("==> {name}");
    let result = f();
    let secs = started.elapsed().as_secs_f64();
    match &result {
        Ok(_) => println!("==> {name}: ok ({secs:.1}s)"),
        Err(e) => println!("==> {name}: FAILED ({secs:.1}s): {e:#}"),
    }
    result.with_context(|| format!("step `{name}` failed"))
}

/// Runs a command to completion, failing with the command line when it does not succeed.
/// The release `drop-supervisor` and `dropctl` (benchmarks and the package use them).
pub fn build_release_binaries() -> anyhow::Result<()> {
    build_release_binaries_as(None)
}

/// The release binaries, reporting `version` (`DROP_VERSION`; default: the crate's). Switching
/// versions rebuilds only drop-supervisor itself.
pub fn build_release_binaries_as(version: Option<&str>) -> anyhow::Result<()> {
    step("build: release binaries", || {
        let mut cmd = cargo();
        cmd.args([
            "build",
            "--locked",
            "--release",
            "-p",
            "drop-supervisor",
            "--bins",
        ]);
        match version {
            Some(v) => cmd.env("DROP_VERSION", v),
            None => cmd.env_remove("DROP_VERSION"),
        };
        run_cmd(&mut cmd)
    })
}

pub fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} exited with {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout, failing with stderr when it does not succeed.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cargo` of the running (stable, pinned) toolchain.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}
