//! Root-only integration tests, one binary with its own harness.
//!
//! Every test returns `Ok(Outcome::Pass)`, `Ok(Outcome::Skip(reason))` when a precondition is
//! missing (never a silent pass), or an error. The last line is `N passed, N failed, N skipped`,
//! which `cargo xtask test` reads. With `DROP_TEST_STRICT=1` (CI) a skip counts as a failure.
//!
//! Usage: `privileged [FILTER...] [--exclude=SUBSTRING...]` runs the tests whose name contains
//! any FILTER (all without one) and none of the excluded substrings.

mod cgroups;
mod cgroups_v2;
mod cluster;
mod faults;
mod images;
mod lb;
mod netns;
mod package;
mod plugins;
mod rollout;
mod runtime;
mod services;
mod systemd;
mod tune;
mod ui;
mod vip;
mod vipnet;
mod workers;
mod xdp;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use drop_tests::{Outcome, Test};

fn main() {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let excluded: Vec<String> = std::env::args()
        .skip(1)
        .filter_map(|a| a.strip_prefix("--exclude=").map(str::to_string))
        .collect();
    let strict = std::env::var("DROP_TEST_STRICT").is_ok_and(|v| v == "1");
    let all = [
        netns::TESTS,
        vipnet::TESTS,
        xdp::TESTS,
        lb::TESTS,
        systemd::TESTS,
        services::TESTS,
        tune::TESTS,
        package::TESTS,
        plugins::TESTS,
        cgroups::TESTS,
        cgroups_v2::TESTS,
        images::TESTS,
        faults::TESTS,
        runtime::TESTS,
        workers::TESTS,
        cluster::TESTS,
        vip::TESTS,
        ui::TESTS,
        rollout::TESTS,
    ]
    .into_iter()
    .flatten();
    let selected: Vec<&Test> = all
        .filter(|t| filters.is_empty() || filters.iter().any(|f| t.name.contains(f.as_str())))
        .filter(|t| !excluded.iter().any(|x| t.name.contains(x.as_str())))
        .collect();

    let (mut passed, mut failed, mut skipped) = (0usize, 0usize, Vec::new());
    for test in selected {
        println!("RUN  {}", test.name);
        let started = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(test.run));
        let took = started.elapsed().as_secs_f64();
        match outcome {
            Ok(Ok(Outcome::Pass)) => {
                passed += 1;
                println!("PASS {} ({took:.2}s)", test.name);
            }
            Ok(Ok(Outcome::Skip(reason))) => {
                println!("SKIP {}: {reason}", test.name);
                skipped.push((test.name, reason));
            }
            Ok(Err(err)) => {
                failed += 1;
                println!("FAIL {} ({took:.2}s): {err:#}", test.name);
            }
            Err(panic) => {
                failed += 1;
                let msg = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(non-string panic)");
                println!("FAIL {} ({took:.2}s): panicked: {msg}", test.name);
            }
        }
    }
    for (name, reason) in &skipped {
        println!("skipped: {name}: {reason}");
    }
    if strict && !skipped.is_empty() {
        println!("strict mode (DROP_TEST_STRICT=1): skips count as failures");
        failed += skipped.len();
    }
    println!(
        "{passed} passed, {failed} failed, {} skipped",
        skipped.len()
    );
    std::process::exit(i32::from(failed > 0));
}
