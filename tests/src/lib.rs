//! Harness pieces for DROP's privileged integration tests: network-namespace hosts, a throw-away
//! systemd, and paths to the built artefacts. Everything here cleans up on drop, also on panic.
//! Never used in production code.

pub mod cluster;
pub mod netns;
pub mod package;
pub mod paths;
pub mod services;
pub mod systemd;
pub mod vip;

/// What a privileged test concluded when it did not fail.
#[derive(Debug)]
pub enum Outcome {
    Pass,
    /// A precondition is missing; the reason is printed and counted, never hidden.
    Skip(String),
}

/// One named test of the privileged binary.
#[derive(Debug)]
pub struct Test {
    pub name: &'static str,
    pub run: fn() -> anyhow::Result<Outcome>,
}

/// `Some(skip)` unless the process runs as root (uid 0) — most tests here need it.
pub fn require_root() -> Option<Outcome> {
    if nix::unistd::Uid::effective().is_root() {
        None
    } else {
        Some(Outcome::Skip("needs root (uid 0)".into()))
    }
}

/// `Some(skip)` unless `cmd` is on PATH.
pub fn require_command(cmd: &str) -> Option<Outcome> {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(cmd).is_file()));
    if found {
        None
    } else {
        Some(Outcome::Skip(format!("`{cmd}` not found on PATH")))
    }
}

/// A name unique to this process and call: `<prefix><pid>x<counter>`, short enough for an
/// interface name (15 bytes) when `prefix` is at most 4 bytes.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id())
}

/// Removes a test's cgroup subtree (a name unique to the run, below this process's cgroup) in every hierarchy when dropped, killing what is left in it
/// first — also when the test fails half-way.
#[derive(Debug)]
pub struct CgroupSubtreeGuard(pub String);

impl Drop for CgroupSubtreeGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "for d in $(find /sys/fs/cgroup -maxdepth 6 -type d -name '{0}'); do \
                   find \"$d\" -name cgroup.procs -exec cat {{}} + 2>/dev/null | xargs -r kill -9 2>/dev/null; done; \
                 sleep 0.1; \
                 for d in $(find /sys/fs/cgroup -maxdepth 6 -type d -name '{0}'); do \
                   find \"$d\" -depth -type d -exec rmdir {{}} \\; 2>/dev/null; done",
                self.0
            ))
            .status();
    }
}
