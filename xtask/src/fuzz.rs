//! `cargo xtask fuzz [--secs N] [TARGET...]`: builds the libFuzzer targets of `fuzz/` with the
//! pinned nightly and cargo-fuzz (installed once into the cache, like bpf-linker), runs each for
//! N seconds on its committed seeds (`fuzz/seeds/<target>`) plus what earlier runs found
//! (`target/fuzz-corpus/<target>`), and prints executions per target. A crash fails the verb and
//! names the input libFuzzer saved.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{root, run_cmd, setup, step};

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Every target of `fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &[
    "flow_yaml",
    "control_api",
    "gateway_framing",
    "worker_protocol",
    "peer_messages",
    "state_merge",
    "tar_members",
];

#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    pub secs: u64,
    /// Only these targets (default: all).
    pub targets: Vec<String>,
}

/// One target's run.
#[derive(Debug)]
pub struct FuzzRun {
    pub target: String,
    pub executions: u64,
    /// The input that crashed it, if one did.
    pub crash: Option<String>,
}

fn cargo_fuzz() -> anyhow::Result<PathBuf> {
    let dir = setup::cache_dir().join(format!("cargo-fuzz-{CARGO_FUZZ_VERSION}"));
    let bin = dir.join("bin/cargo-fuzz");
    if !bin.is_file() {
        run_cmd(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
            "--root",
            dir.to_str().context("cache path is not UTF-8")?,
        ]))
        .context("cannot install cargo-fuzz from crates.io")?;
    }
    Ok(dir.join("bin"))
}

/// Builds every target, then runs `targets` for `secs` each.
pub fn run(tools: &setup::Tools, secs: u64, targets: &[String]) -> anyhow::Result<Vec<FuzzRun>> {
    let bin_dir = step("fuzz: cargo-fuzz", cargo_fuzz)?;
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let fuzz_dir = root().join("fuzz");
    let cargo_fuzz = |args: &[&str]| {
        let mut cmd = Command::new("rustup");
        cmd.current_dir(&fuzz_dir)
            .args(["run", &tools.nightly, "cargo", "fuzz"])
            .args(args)
            .env("PATH", &path)
            // The outer cargo's toolchain must not leak into the nightly build.
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO")
            .env_remove("RUSTC")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR");
        cmd
    };
    step("fuzz: build the targets (nightly, ASan)", || {
        run_cmd(&mut cargo_fuzz(&["build", "-O"]))
    })?;
    let wanted: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!("no fuzz target {t}; known: {}", TARGETS.join(", "));
            }
        }
        targets.iter().map(String::as_str).collect()
    };
    let mut runs = Vec::new();
    for target in wanted {
        let corpus = root().join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let seeds = fuzz_dir.join("seeds").join(target);
        let artifacts = root().join("target/fuzz-artifacts").join(target);
        std::fs::create_dir_all(&artifacts)?;
        let out = step(&format!("fuzz: {target} for {secs} s"), || {
            Ok(cargo_fuzz(&[
                "run",
                "-O",
                target,
                corpus.to_str().context("utf-8")?,
                seeds.to_str().context("utf-8")?,
                "--",
                &format!("-max_total_time={secs}"),
                "-print_final_stats=1",
                &format!("-artifact_prefix={}/", artifacts.display()),
            ])
            .output()?)
        })?;
        let text = String::from_utf8_lossy(&out.stderr);
        let executions = text
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        let crash = (!out.status.success()).then(|| {
            text.lines()
                .find(|l| l.contains("Test unit written to"))
                .map_or_else(
                    || {
                        format!(
                            "exited with {}; last lines:\n{}",
                            out.status,
                            text.lines().rev().take(15).collect::<Vec<_>>().join("\n")
                        )
                    },
                    str::to_string,
                )
        });
        println!(
            "    {target}: {executions} executions{}",
            crash
                .as_deref()
                .map_or(String::new(), |c| format!(", CRASH: {c}"))
        );
        runs.push(FuzzRun {
            target: target.to_string(),
            executions,
            crash,
        });
    }
    Ok(runs)
}

/// The verb: runs, prints the table, fails on any crash.
pub fn fuzz(args: FuzzArgs) -> anyhow::Result<()> {
    let tools = setup::setup()?;
    let runs = run(&tools, args.secs, &args.targets)?;
    println!();
    println!("| target | executions in {} s | result |", args.secs);
    println!("|---|---|---|");
    for r in &runs {
        println!(
            "| {} | {} | {} |",
            r.target,
            r.executions,
            r.crash.as_deref().unwrap_or("no crash")
        );
    }
    let crashed: Vec<&str> = runs
        .iter()
        .filter(|r| r.crash.is_some())
        .map(|r| r.target.as_str())
        .collect();
    if !crashed.is_empty() {
        bail!("fuzz targets crashed: {}", crashed.join(", "));
    }
    Ok(())
}
