//! What the process tests of pools and the gateway (and the runtime bench) share: a pool
//! configuration with test defaults, worker stderr to /dev/null, and waiting for a condition.
#![allow(dead_code)] // each test crate uses its own subset

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drop_supervisor::runtime::worker::pool::{PoolConfig, RestartPolicy};
use drop_supervisor::runtime::worker::process::Launch;

/// A sync pool of one worker running `argv`: queue 64, timeout 5 s, 64 KiB lines.
pub fn config(name: &str, argv: &[&str]) -> PoolConfig {
    PoolConfig {
        name: name.into(),
        mode: drop_supervisor::runtime::flow::Mode::Sync,
        concurrency: 1,
        launch: Launch {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
            cwd: None,
            credentials: None,
            cgroup_procs: Vec::new(),
            image: None,
        },
        min: 1,
        max: 1,
        queue: 64,
        timeout: Duration::from_secs(5),
        line_max: 64 * 1024,
        restart: RestartPolicy::default(),
        grow_threshold: 1,
        idle_shrink_after: Duration::from_secs(3600),
        cache: None,
        cgroups: None,
        envelope: false,
    }
}

/// `argv` of a shell running `script`.
pub fn sh(script: &str) -> Vec<&str> {
    vec!["/bin/sh", "-c", script]
}

/// Worker stderr goes nowhere.
pub fn devnull() -> Arc<dyn Fn() -> std::io::Result<OwnedFd> + Send + Sync> {
    Arc::new(|| {
        Ok(std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")?
            .into())
    })
}

/// Polls `f` every 10 ms until it holds; fails the test after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
