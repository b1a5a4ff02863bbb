//! `cargo xtask bench failover`: DROP's floating IP (profiles `fast` and `lan`) against
//! keepalived (advert_int 0.1 s and 1 s) in the same topology and the same run
//! (tests/bench/failover.rs). Root only: network namespaces. Installs keepalived (Debian's
//! package) when missing, builds the release binaries, prints a markdown report and writes it
//! to target/bench/failover.md for BENCHMARKS.md.

use std::process::Command;

use anyhow::bail;

use super::{BenchArgs, bench_binary_of};
use crate::{root, setup, step};

pub fn failover(a: &BenchArgs) -> anyhow::Result<()> {
    if !setup::is_root() {
        bail!("the failover benchmark needs root (network namespaces, addresses, keepalived)");
    }
    if a.only.as_deref() != Some("drop") {
        step("setup: keepalived", || setup::apt_install(&["keepalived"]))?;
    }
    crate::build_release_binaries()?;
    let bin = step("build: failover bench", || {
        bench_binary_of("drop-tests", "failover")
    })?;
    let trials = a.trials.to_string();
    let mut args = vec!["--trials", trials.as_str()];
    if let Some(only) = &a.only {
        args.extend(["--only", only.as_str()]);
    }
    let command = format!("cargo xtask bench failover {}", args.join(" "));
    super::report(
        "failover",
        "bench: failover (DROP fast/lan, keepalived 0.1 s/1 s)",
        Command::new(&bin)
            .args(&args)
            .env("DROP_BIN_DIR", root().join("target/release")),
        &command,
    )
}
