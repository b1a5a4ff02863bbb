//! Tuning against the real kernel, inside a network namespace: the daemon runs in a fresh netns
//! with `sysctl_root = /proc/sys` and applies only per-namespace keys, so the host's own values
//! are never changed — which the test checks key by key.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use drop_tests::netns::Netns;
use drop_tests::{Outcome, Test, paths, require_command, require_root};

pub const TESTS: &[Test] = &[Test {
    name: "tune_apply_in_netns_changes_only_that_namespace",
    run: tune_apply_in_netns,
}];

/// Keys that are per network namespace (writable inside one) in the profile.
const NETNS_KEYS: &[&str] = &[
    "net.core.somaxconn",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_tw_reuse",
    "net.ipv4.tcp_max_syn_backlog",
    "net.ipv4.tcp_rmem",
    "net.ipv4.conf.all.arp_ignore",
    "net.ipv4.conf.all.arp_announce",
];
/// A global key that a non-initial namespace sees read-only: the write must be refused there.
const READ_ONLY_IN_NETNS: &str = "net.core.rmem_max";

fn read_sysctl(key: &str) -> anyhow::Result<String> {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    let v =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(v.split_whitespace().collect::<Vec<_>>().join(" "))
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn dropctl(socket: &Path, args: &[&str]) -> anyhow::Result<(i32, serde_json::Value)> {
    let out = Command::new(paths::bin("dropctl"))
        .arg("--socket")
        .arg(socket)
        .arg("--json")
        .args(args)
        .output()
        .context("running dropctl")?;
    let code = out.status.code().unwrap_or(-1);
    let json = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "dropctl {args:?} exited {code}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((code, json))
}

fn tune_apply_in_netns() -> anyhow::Result<Outcome> {
    if let Some(skip) = require_root()
        .or_else(|| require_command("ip"))
        .or_else(|| require_command("nsenter"))
    {
        return Ok(skip);
    }
    let daemon_bin = paths::bin("drop-supervisor");
    if !daemon_bin.is_file() {
        return Ok(Outcome::Skip(format!(
            "{} is not built",
            daemon_bin.display()
        )));
    }
    let mut keys: Vec<&str> = NETNS_KEYS.to_vec();
    keys.push(READ_ONLY_IN_NETNS);
    let host_before: Vec<String> = keys
        .iter()
        .map(|k| read_sysctl(k))
        .collect::<anyhow::Result<_>>()?;

    let netns = Netns::new()?;
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("drop.sock");
    std::fs::write(
        dir.path().join("drop.toml"),
        format!(
            "[node]\nname = \"tune-netns\"\nstate_dir = \"{}\"\n[control]\nsocket = \"{}\"\n[tuning]\nsysctl_root = \"/proc/sys\"\n[runtime]\ncgroups = false\n[gateway]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().join("state").display(),
            socket.display()
        ),
    )?;
    let _daemon = Daemon(
        netns
            .command(daemon_bin.to_str().context("binary path is not UTF-8")?)
            .arg("--config")
            .arg(dir.path().join("drop.toml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting drop-supervisor in the namespace")?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if Instant::now() > deadline {
            bail!(
                "daemon in {} did not listen on {} within 10 s",
                netns.name(),
                socket.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let only = keys.join(",");
    let (code, applied) = dropctl(&socket, &["tune", "apply", "--only", &only])?;
    let entries = applied["keys"]
        .as_array()
        .context("apply report has keys")?;
    ensure!(
        entries.len() == keys.len(),
        "apply reported {} keys, asked {}",
        entries.len(),
        keys.len()
    );
    let mut refused = false;
    for e in entries {
        let key = e["key"].as_str().unwrap_or_default();
        let outcome = e["outcome"].as_str().unwrap_or_default();
        if key == READ_ONLY_IN_NETNS {
            // Read-only inside the namespace: refused with its reason, unless the host value is
            // already high enough, in which case nothing is written.
            match outcome {
                "failed" => {
                    let err = e["error"].as_str().unwrap_or_default();
                    ensure!(
                        err.starts_with("write:"),
                        "{key}: expected a refused write, got {e}"
                    );
                    refused = true;
                }
                "unchanged" => {}
                other => bail!("{key} in a netns: expected failed or unchanged, got {other}: {e}"),
            }
        } else {
            ensure!(outcome == "changed" || outcome == "unchanged", "{key}: {e}");
            let after = e["after"].as_str().unwrap_or_default();
            let wanted = e["wanted"].as_str().unwrap_or_default();
            if key == "net.core.somaxconn" || key == "net.ipv4.tcp_max_syn_backlog" {
                // Minimums: at least the wanted value; a higher one is kept.
                let a = after.parse::<u64>().unwrap_or(0);
                let w = wanted.parse::<u64>().unwrap_or(u64::MAX);
                ensure!(a >= w, "{key}: after {after} is below the minimum {wanted}");
            } else {
                ensure!(after == wanted, "{key}: after {after:?}, wanted {wanted:?}");
            }
        }
    }
    ensure!(
        code == if refused { 1 } else { 0 },
        "dropctl tune apply exit code {code} (refused write: {refused})"
    );

    // Inside the namespace the keys now read as wanted; `tune check` agrees.
    let (_, checked) = dropctl(&socket, &["tune", "check", "--only", &NETNS_KEYS.join(",")])?;
    for k in checked["keys"]
        .as_array()
        .context("check report has keys")?
    {
        ensure!(k["state"] == "ok", "after apply inside the netns: {k}");
    }
    let inside = netns.run(|| read_sysctl("net.ipv4.tcp_fin_timeout"))??;
    ensure!(
        inside == "30",
        "tcp_fin_timeout inside the netns is {inside}"
    );

    // The host (initial namespace) is untouched.
    for (key, before) in keys.iter().zip(&host_before) {
        let now = read_sysctl(key)?;
        ensure!(
            &now == before,
            "host value of {key} changed from {before} to {now}"
        );
    }
    Ok(Outcome::Pass)
}
