//! `cargo xtask bench services`: node loss → the unit active on another node (profiles `fast`
//! and `lan`), and 100 transient instances brought up across five nodes, each node a supervisor
//! with its own sandboxed systemd (tests/bench/services.rs). Root only. Builds the release
//! binaries, prints a markdown report and writes it to target/bench/services.md.

use std::process::Command;

use anyhow::bail;

use super::{BenchArgs, bench_binary_of};
use crate::{root, setup, step};

pub fn services(a: &BenchArgs) -> anyhow::Result<()> {
    if !setup::is_root() {
        bail!("the services benchmark needs root (network namespaces, sandboxed systemds)");
    }
    crate::build_release_binaries()?;
    let bin = step("build: services bench", || {
        bench_binary_of("drop-tests", "services")
    })?;
    let trials = a.trials.to_string();
    let runs = a.runs.to_string();
    let args = ["--trials", trials.as_str(), "--runs", runs.as_str()];
    let command = format!("cargo xtask bench services {}", args.join(" "));
    super::report(
        "services",
        "bench: services (node loss fast/lan, 100 instances)",
        Command::new(&bin)
            .args(args)
            .env("DROP_BIN_DIR", root().join("target/release")),
        &command,
    )
}
