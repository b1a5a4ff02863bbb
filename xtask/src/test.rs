//! `cargo xtask test` / `ci`: set up, then fmt, clippy, unit tests and the privileged
//! integration tests, ending with one line `N passed, N failed, N skipped` (skips listed with
//! their reasons above it).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use crate::{cargo, ebpf, root, setup, step};

#[derive(Debug, Default, clap::Args)]
pub struct TestArgs {
    /// Count a skipped privileged test as a failure (default when CI=true).
    #[arg(long)]
    pub strict: bool,
    /// Leave out fmt and clippy.
    #[arg(long)]
    pub no_lint: bool,
    /// Only the cgroup v2 guest: the privileged tests of cgroups, images, workers and faults in
    /// a qemu guest with Debian's stock kernel (`cargo xtask test` runs it after the host's).
    #[arg(long, conflicts_with = "no_vm")]
    pub vm: bool,
    /// Leave out the cgroup v2 guest (also left out when FILTERs are given).
    #[arg(long)]
    pub no_vm: bool,
    /// Only privileged tests whose name contains one of these (unit tests still run).
    pub filters: Vec<String>,
}

/// Seconds each fuzz target runs in `test` (the long runs are `cargo xtask fuzz`).
const FUZZ_SECS: u64 = 5;

/// Tests ran and some failed: already counted in the tally, so not counted again as a step.
#[derive(Debug)]
struct TestsFailed(usize);

impl std::fmt::Display for TestsFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} test(s) failed", self.0)
    }
}

impl std::error::Error for TestsFailed {}

impl Tally {
    /// Records the error of a test step: a step that failed by itself (build error, no summary)
    /// counts as one failure; failed tests were already counted.
    fn step_failed(&mut self, what: &str, e: &anyhow::Error) {
        if e.downcast_ref::<TestsFailed>().is_none() {
            self.failed += 1;
            self.failures.push(format!("{what}: {e:#}"));
        }
    }
}

#[derive(Debug, Default)]
struct Tally {
    passed: usize,
    failed: usize,
    skipped: Vec<String>,
    failures: Vec<String>,
}

impl Tally {
    fn check(&mut self, name: &str, result: anyhow::Result<()>) {
        match result {
            Ok(()) => self.passed += 1,
            Err(e) => {
                self.failed += 1;
                self.failures.push(format!("{name}: {e:#}"));
            }
        }
    }
}

/// Runs `cmd`, echoing its stdout and stderr, and returns its stdout lines and whether it succeeded.
fn run_capture(cmd: &mut Command) -> anyhow::Result<(Vec<String>, bool)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let mut lines = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let line = line?;
        println!("{line}");
        lines.push(line);
    }
    Ok((lines, child.wait()?.success()))
}

/// Sums libtest's `test result: ok. N passed; M failed; K ignored; ...` lines.
fn libtest_counts(lines: &[String]) -> (usize, usize, usize) {
    let mut totals = (0, 0, 0);
    for line in lines.iter().filter_map(|l| l.strip_prefix("test result: ")) {
        for part in line.split(['.', ';']).map(str::trim) {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (
                words.next().and_then(|n| n.parse::<usize>().ok()),
                words.next(),
            ) else {
                continue;
            };
            match what {
                "passed" => totals.0 += n,
                "failed" => totals.1 += n,
                "ignored" => totals.2 += n,
                _ => {}
            }
        }
    }
    totals
}

pub fn test(args: TestArgs) -> anyhow::Result<()> {
    let strict = args.strict || std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let tools = setup::setup()?;
    let mut tally = Tally::default();
    if args.vm {
        guest(&mut tally, strict);
        return tally.finish();
    }

    ebpf::build(&tools)?;
    if !args.no_lint {
        let fmt = step("lint: cargo fmt --check", || {
            crate::run_cmd(cargo().args(["fmt", "--all", "--check"]))?;
            // The two nightly workspaces: the XDP program and the fuzz targets.
            for dir in ["drop-ebpf", "fuzz"] {
                crate::run_cmd(
                    Command::new("rustup")
                        .current_dir(root().join(dir))
                        .args(["run", &tools.nightly, "cargo", "fmt", "--check"])
                        .env_remove("RUSTUP_TOOLCHAIN")
                        .env_remove("CARGO"),
                )?;
            }
            Ok(())
        });
        tally.check("fmt", fmt);
        let clippy = step("lint: cargo clippy -D warnings", || {
            crate::run_cmd(cargo().args([
                "clippy",
                "--locked",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
        });
        tally.check("clippy", clippy);
        let layers = step("lint: no module cycle inside a crate", || {
            crate::layers::check(&crate::workspace_crates())
        });
        tally.check("layers", layers);
        // The Ansible role and playbooks (packaging/ansible): ansible-lint and a syntax check.
        tally.check("ansible-lint", crate::ansible::lint());
    }

    let unit = step("test: unit tests", || {
        // --no-fail-fast: a failing test binary does not hide the ones after it.
        let (lines, ok) = run_capture(cargo().args([
            "test",
            "--locked",
            "--no-fail-fast",
            "--workspace",
            "--exclude",
            "drop-tests",
        ]))?;
        let (p, f, _) = libtest_counts(&lines);
        tally.passed += p;
        tally.failed += f;
        tally.failures.extend(
            lines
                .iter()
                .filter_map(|l| l.strip_prefix("test ")?.strip_suffix(" ... FAILED"))
                .map(|name| format!("unit test {name}")),
        );
        // Each ignored test is a skip of its own. Strict mode accepts one only when its
        // attribute says why it may not run (`#[ignore = "..."]`).
        let mut unexplained = 0;
        for (name, reason) in ignored_tests(&lines) {
            match reason {
                Some(reason) => tally
                    .skipped
                    .push(format!("unit test {name} ignored: {reason}")),
                None => {
                    unexplained += 1;
                    let what = format!("unit test {name} is ignored without a reason");
                    if strict {
                        tally.failed += 1;
                        tally.failures.push(what);
                    } else {
                        tally.skipped.push(what);
                    }
                }
            }
        }
        if !ok && f == 0 && unexplained == 0 {
            bail!("cargo test failed before running tests (build error?)");
        }
        if strict && unexplained > 0 {
            return Err(TestsFailed(unexplained).into());
        }
        if f > 0 {
            return Err(TestsFailed(f).into());
        }
        Ok(())
    });
    if let Err(e) = unit {
        tally.step_failed("unit tests", &e);
    }

    // Every fuzz target briefly on its seeds and what earlier runs found: a parser that
    // panics on an input it has met before fails here.
    let fuzzing = step("test: fuzz targets, 5 s each", || {
        let runs = crate::fuzz::run(&tools, FUZZ_SECS, &[])?;
        let crashed: Vec<String> = runs
            .iter()
            .filter_map(|r| Some(format!("fuzz target {}: {}", r.target, r.crash.as_ref()?)))
            .collect();
        tally.passed += runs.len() - crashed.len();
        tally.failed += crashed.len();
        let n = crashed.len();
        tally.failures.extend(crashed);
        if n > 0 {
            return Err(TestsFailed(n).into());
        }
        Ok(())
    });
    if let Err(e) = fuzzing {
        tally.step_failed("fuzz targets", &e);
    }

    // The package the package test installs (release binaries; a failure here fails that test).
    // The packages the package tests install: this version and the next (the upgrade), from
    // the same release binaries.
    let wants_package = args.filters.is_empty()
        || args.filters.iter().any(|f| {
            [
                "package_rpm_installs_files_modes_config_and_erases",
                "package_rpm_in_systemd_installs_starts_upgrades_and_erases",
                "rollout_ansible_three_nodes_under_load_no_failed_call",
            ]
            .iter()
            .any(|t| t.contains(f.as_str()))
        });
    if setup::is_root() && wants_package {
        let next = crate::rpm::upgrade_version();
        for version in [None, Some(next)] {
            let rpm_args = crate::rpm::RpmArgs {
                version,
                plugin: None,
            };
            if let Err(e) = crate::rpm::rpm(&rpm_args) {
                tally.step_failed("rpm", &e);
                break;
            }
        }
    }
    // The plugins' packages (the node package's step above builds them too; alone they need
    // no build).
    let wants_plugins = args.filters.iter().any(|f| {
        "plugin_rpm_node_stats_installs_files_modes_owners_and_erases".contains(f.as_str())
    });
    if setup::is_root() && wants_plugins && !wants_package {
        for name in crate::rpm::plugin::PLUGINS {
            if let Err(e) = crate::rpm::plugin::build(name, None) {
                tally.step_failed("rpm", &e);
            }
        }
    }
    let privileged = step("test: privileged integration tests", || {
        crate::run_cmd(cargo().args(["build", "--locked", "-p", "drop-supervisor", "--bins"]))?;
        if !setup::is_root() {
            bail!(
                "the privileged tests need root (network namespaces, XDP, cgroups, a throw-away systemd)"
            );
        }
        let mut cmd = cargo();
        cmd.args([
            "test",
            "--locked",
            "-p",
            "drop-tests",
            "--test",
            "privileged",
            "--",
        ])
        .args(&args.filters)
        .arg(crate::vm::HOST_EXCLUDE)
        .env("DROP_BIN_DIR", root().join("target/debug"))
        .env("DROP_XDP_OBJ", ebpf::object_path());
        // The pinned Ansible for the rollout test (the lint step built it; cached here).
        match crate::ansible::venv() {
            Ok(a) => {
                cmd.env("DROP_ANSIBLE_VENV", &a.venv);
            }
            Err(e) => println!("    no Ansible for the rollout test: {e:#}"),
        }
        if strict {
            cmd.env("DROP_TEST_STRICT", "1");
        }
        let (lines, ok) = run_capture(&mut cmd)?;
        let summary = lines.iter().rev().find_map(|l| parse_summary(l));
        let Some((p, f, _)) = summary else {
            bail!("the privileged test binary printed no summary line (did it build?)");
        };
        tally.passed += p;
        tally.failed += f;
        tally.skipped.extend(
            lines
                .iter()
                .filter_map(|l| l.strip_prefix("skipped: "))
                .map(str::to_string),
        );
        tally.failures.extend(
            lines
                .iter()
                .filter_map(|l| l.strip_prefix("FAIL "))
                .map(str::to_string),
        );
        if !ok && f == 0 {
            bail!("the privileged test binary failed");
        }
        if f > 0 {
            return Err(TestsFailed(f).into());
        }
        Ok(())
    });
    if let Err(e) = privileged {
        tally.step_failed("privileged tests", &e);
    }
    if !args.no_vm && args.filters.is_empty() {
        guest(&mut tally, strict);
    }
    tally.finish()
}

/// The cgroup v2 guest's run, counted like the host's privileged tests (names prefixed `v2:`).
fn guest(tally: &mut Tally, strict: bool) {
    let run = step(
        "test: privileged tests in the cgroup v2 guest (qemu)",
        || {
            if !setup::is_root() {
                bail!("the cgroup v2 guest needs root (qemu with the host's file system, cgroups)");
            }
            crate::run_cmd(cargo().args(["build", "--locked", "-p", "drop-supervisor", "--bins"]))?;
            let lines = crate::vm::run(strict)?;
            for l in lines
                .iter()
                .filter(|l| l.starts_with("PASS ") || l.starts_with("FAIL "))
            {
                println!("    v2: {l}");
            }
            let Some((p, f, _)) = lines.iter().rev().find_map(|l| parse_summary(l)) else {
                bail!(
                    "the guest's test binary printed no summary line: {}",
                    lines.join("\n")
                );
            };
            tally.passed += p;
            tally.failed += f;
            tally.skipped.extend(
                lines
                    .iter()
                    .filter_map(|l| l.strip_prefix("skipped: "))
                    .map(|s| format!("v2: {s}")),
            );
            tally.failures.extend(
                lines
                    .iter()
                    .filter_map(|l| l.strip_prefix("FAIL "))
                    .map(|s| format!("v2: {s}")),
            );
            if f > 0 {
                return Err(TestsFailed(f).into());
            }
            Ok(())
        },
    );
    if let Err(e) = run {
        tally.step_failed("cgroup v2 guest", &e);
    }
}

impl Tally {
    /// Prints the skips, the failures and the summary line; an error when anything failed.
    fn finish(&self) -> anyhow::Result<()> {
        println!();
        for s in &self.skipped {
            println!("skipped: {s}");
        }
        for f in &self.failures {
            println!("failed: {f}");
        }
        println!(
            "{} passed, {} failed, {} skipped",
            self.passed,
            self.failed,
            self.skipped.len()
        );
        if self.failed > 0 {
            bail!("{} failed", self.failed);
        }
        Ok(())
    }
}

/// `test NAME ... ignored[, REASON]` lines: every ignored test with its reason, if it has one.
fn ignored_tests(lines: &[String]) -> Vec<(String, Option<String>)> {
    lines
        .iter()
        .filter_map(|l| {
            let (name, outcome) = l.strip_prefix("test ")?.split_once(" ... ")?;
            let rest = outcome.strip_prefix("ignored")?;
            let reason = rest
                .strip_prefix(", ")
                .map(str::trim)
                .filter(|r| !r.is_empty());
            Some((name.to_string(), reason.map(str::to_string)))
        })
        .collect()
}

/// `N passed, N failed, N skipped` → the three numbers.
fn parse_summary(line: &str) -> Option<(usize, usize, usize)> {
    let mut nums = line.split(", ").map(|part| {
        let (n, _) = part.split_once(' ')?;
        n.parse::<usize>().ok()
    });
    let (p, f, s) = (nums.next()??, nums.next()??, nums.next()??);
    line.ends_with(" skipped").then_some((p, f, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_libtest_result_lines() {
        let lines = vec![
            "test result: ok. 28 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.02s".to_string(),
            "noise".to_string(),
            "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out".to_string(),
        ];
        assert_eq!(libtest_counts(&lines), (31, 2, 1));
    }

    #[test]
    fn ignored_tests_are_listed_each_with_its_reason() {
        let lines: Vec<String> = [
            "test a::b ... ok",
            "test slow_one ... ignored, needs a kernel with IPVS",
            "test bare ... ignored",
            "test c ... FAILED",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            ignored_tests(&lines),
            vec![
                (
                    "slow_one".to_string(),
                    Some("needs a kernel with IPVS".to_string())
                ),
                ("bare".to_string(), None),
            ]
        );
    }

    #[test]
    fn parses_the_privileged_summary() {
        assert_eq!(
            parse_summary("7 passed, 1 failed, 2 skipped"),
            Some((7, 1, 2))
        );
        assert_eq!(parse_summary("PASS something"), None);
    }
}
