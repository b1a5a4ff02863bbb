//! `cargo xtask bench cluster`: the cluster benchmark (drop-supervisor/benches/cluster.rs), many
//! members in one process on 127.0.0.1: convergence after a join, crash detection and the spread
//! of a state update, with the `lan` and `fast` timing profiles. The bench prints its progress on
//! stderr and a markdown report on stdout, written to target/bench/cluster.md for BENCHMARKS.md.

use std::process::Command;

use super::{BenchArgs, bench_binary};
use crate::step;

pub fn cluster(a: &BenchArgs) -> anyhow::Result<()> {
    let bin = step("build: cluster bench", || bench_binary("cluster"))?;
    let runs = a.runs.to_string();
    let mut args = vec![
        "--nodes",
        &a.nodes,
        "--fast-nodes",
        &a.fast_nodes,
        "--runs",
        &runs,
    ];
    if let Some(lan) = &a.lan {
        args.extend(["--lan", lan]);
    }
    if let Some(fast) = &a.fast {
        args.extend(["--fast", fast]);
    }
    let command = format!("cargo xtask bench cluster {}", args.join(" "));
    super::report(
        "cluster",
        "bench: cluster (converge, crash detection, update spread)",
        Command::new(&bin).args(&args),
        &command,
    )
}
