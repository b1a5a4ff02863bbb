//! `cargo xtask bench failover`: how long a client goes without an answer through the floating
//! IP when its holder fails, DROP (profiles `lan` and `fast`) and keepalived (VRRP, advert_int
//! 1 s and 0.1 s) side by side in one run, in the same topology: five hosts and a client in
//! network namespaces on one bridge, a UDP echo on every host bound to the VIP.
//!
//! One trial: the client sends a UDP probe through the VIP every 2 ms; the holder fails (`kill`:
//! SIGKILL of the daemon — for DROP followed by `drop-supervisor --release-vip`, what the unit's
//! `ExecStopPost=` runs; keepalived has no such step and its address stays on the dead host —
//! or `ifdown`: its link set down); the figure is the time from the failure to the first answer
//! from another host. The failed host is brought back and the group left to settle before the
//! next trial. Trials in which the prober itself stalled for more than 50 ms (the VMs steal CPU
//! now and then) are flagged.
//!
//! Prints progress on stderr and a markdown report on stdout. Root only. Usage:
//! `failover [--trials N] [--only drop|keepalived]`.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use drop_tests::cluster::{ClusterFixture, ClusterSpec, poll, wait_until};
use drop_tests::netns::{Bridge, Netns, check};
use drop_tests::paths;
use drop_tests::vip::{ECHO_PORT, EchoServers, holds};

const NODES: usize = 5;
const CLIENT: usize = NODES;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 200);
const PROBE_EVERY: Duration = Duration::from_millis(2);
const STALL: Duration = Duration::from_millis(50);
const TRIAL_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Kill,
    Ifdown,
}

impl Failure {
    fn name(self) -> &'static str {
        match self {
            Failure::Kill => "kill",
            Failure::Ifdown => "ifdown",
        }
    }
}

/// One measured trial.
#[derive(Debug, Clone, Copy)]
struct Trial {
    took: Duration,
    stalled: bool,
}

/// Sends probes through the VIP from the client and records every answer: (when, who).
struct Prober {
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<(Instant, String)>>>,
    /// Longest gap between two probes sent, per (start of gap).
    gaps: Arc<Mutex<Vec<(Instant, Duration)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    fn start(client: &Netns) -> anyhow::Result<Prober> {
        let stop = Arc::new(AtomicBool::new(false));
        let answers: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let gaps: Arc<Mutex<Vec<(Instant, Duration)>>> = Arc::default();
        let path = client.path().to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        let (s, a, g) = (stop.clone(), answers.clone(), gaps.clone());
        let thread = std::thread::spawn(move || {
            let setup = (|| -> anyhow::Result<UdpSocket> {
                let file = std::fs::File::open(&path)?;
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
                let sock = UdpSocket::bind(("0.0.0.0", 0))?;
                sock.set_read_timeout(Some(Duration::from_micros(500)))?;
                Ok(sock)
            })();
            let sock = match setup {
                Ok(s) => {
                    let _ = tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let target = SocketAddr::from((VIP, ECHO_PORT));
            let mut buf = [0u8; 256];
            let mut last_sent = Instant::now();
            let mut seq = 0u64;
            while !s.load(Ordering::Relaxed) {
                let now = Instant::now();
                if now >= last_sent + PROBE_EVERY {
                    let gap = now - last_sent;
                    if gap > STALL {
                        g.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((last_sent, gap));
                    }
                    seq += 1;
                    let _ = sock.send_to(seq.to_string().as_bytes(), target);
                    last_sent = now;
                }
                if let Ok((n, _)) = sock.recv_from(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).to_string();
                    if let Some((who, _)) = text.split_once(' ') {
                        a.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((Instant::now(), who.to_string()));
                    }
                }
            }
        });
        rx.recv().context("prober ended during set-up")??;
        Ok(Prober {
            stop,
            answers,
            gaps,
            thread: Some(thread),
        })
    }

    /// The first answer after `since` from someone other than `not`.
    fn first_other(&self, since: Instant, not: &str) -> Option<(Instant, String)> {
        self.answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(at, who)| *at > since && who != not)
            .cloned()
    }

    fn stalled_between(&self, from: Instant, to: Instant) -> bool {
        self.gaps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(at, gap)| *at + *gap > from && *at < to)
    }

    fn clear(&self) {
        self.answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.gaps.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn holder_of(bridge: &Bridge) -> anyhow::Result<Option<usize>> {
    let mut found = Vec::new();
    for i in 0..NODES {
        if holds(bridge.host(i).netns(), VIP)? {
            found.push(i);
        }
    }
    Ok(match found[..] {
        [h] => Some(h),
        _ => None,
    })
}

/// Waits until exactly one host holds the VIP and answers the prober.
fn wait_serving(bridge: &Bridge, prober: &Prober, names: &[String]) -> anyhow::Result<usize> {
    let h = poll(
        TRIAL_TIMEOUT,
        Duration::from_millis(20),
        "one holder",
        || holder_of(bridge)?.context("no single holder"),
    )?
    .value;
    let since = Instant::now();
    wait_until(TRIAL_TIMEOUT, "the holder answering the prober", || {
        Ok(prober
            .first_other(since, "")
            .is_some_and(|(_, who)| who == names[h]))
    })?;
    Ok(h)
}

/// Waits for the first answer after `failed_at` from a host other than `failed` and prints the
/// trial under `label`.
fn measure(
    prober: &Prober,
    failed_at: Instant,
    failed: &str,
    label: &str,
) -> anyhow::Result<Trial> {
    let (at, who) = poll(
        TRIAL_TIMEOUT,
        Duration::from_millis(5),
        "an answer from another host",
        || prober.first_other(failed_at, failed).context("none yet"),
    )?
    .value;
    let trial = Trial {
        took: at - failed_at,
        stalled: prober.stalled_between(failed_at, at),
    };
    eprintln!(
        "  {label}: {failed} -> {who} in {} ms{}",
        ms(trial.took),
        if trial.stalled {
            " (prober stalled)"
        } else {
            ""
        }
    );
    Ok(trial)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// A row of the report.
struct Row {
    system: String,
    setting: String,
    failure: Failure,
    trials: Vec<Trial>,
}

impl Row {
    fn sorted(&self) -> Vec<Duration> {
        let mut v: Vec<Duration> = self.trials.iter().map(|t| t.took).collect();
        v.sort();
        v
    }
    fn p50(&self) -> Duration {
        percentile(&self.sorted(), 0.5)
    }
    fn p90(&self) -> Duration {
        percentile(&self.sorted(), 0.9)
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e3)
}

/// DROP with `profile`: `trials` of each failure.
fn drop_rows(profile: &str, trials: usize) -> anyhow::Result<Vec<Row>> {
    let fx = ClusterFixture::start(ClusterSpec {
        spare_hosts: 1,
        profile: profile.to_string(),
        ..ClusterSpec::new(NODES)
    })?;
    let result = drop_trials(&fx, profile, trials);
    if result.is_err() {
        eprintln!("{}", fx.log_tails(30));
    }
    result
}

fn drop_trials(fx: &ClusterFixture, profile: &str, trials: usize) -> anyhow::Result<Vec<Row>> {
    let names: Vec<String> = (0..NODES).map(|i| fx.node(i).name().to_string()).collect();
    fx.wait_all_alive(Duration::from_secs(30))?;
    fx.node(0).dropctl(&[
        "ns",
        "create",
        "b",
        "--vip",
        &VIP.to_string(),
        "--nodes",
        &names.join(","),
    ])?;
    let hosts: Vec<(&Netns, String)> = (0..NODES)
        .map(|i| (fx.bridge().host(i).netns(), names[i].clone()))
        .collect();
    let _echo = EchoServers::start(&hosts, VIP)?;
    let prober = Prober::start(fx.bridge().host(CLIENT).netns())?;
    let settled = |fx: &ClusterFixture| -> anyhow::Result<()> {
        // Every member hears all four others on the fast path again.
        wait_until(
            Duration::from_secs(30),
            "every member hearing the others",
            || {
                for i in 0..NODES {
                    let v = fx.node(i).dropctl(&["vip", "show", "b"])?;
                    let heard = v["this_node"]["heard"].as_array().map_or(0, Vec::len);
                    if heard != NODES - 1 {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        )?;
        Ok(())
    };
    let mut rows = Vec::new();
    for failure in [Failure::Kill, Failure::Ifdown] {
        let mut row = Row {
            system: "DROP".into(),
            setting: format!("profile {profile}"),
            failure,
            trials: Vec::new(),
        };
        for t in 0..trials {
            settled(fx)?;
            let h = wait_serving(fx.bridge(), &prober, &names)?;
            prober.clear();
            std::thread::sleep(Duration::from_millis(200));
            let failed_at = Instant::now();
            match failure {
                Failure::Kill => {
                    fx.node(h).sigkill()?;
                    // What the unit's ExecStopPost= does after the kill.
                    check(
                        fx.bridge()
                            .host(h)
                            .netns()
                            .command(paths::bin("drop-supervisor").to_str().context("path")?)
                            .arg("--release-vip"),
                    )?;
                }
                Failure::Ifdown => {
                    fx.bridge()
                        .host(h)
                        .netns()
                        .ip(&["link", "set", "eth0", "down"])?;
                }
            }
            let trial = measure(
                &prober,
                failed_at,
                &names[h],
                &format!("DROP {profile} {} #{t}", failure.name()),
            )?;
            row.trials.push(trial);
            match failure {
                Failure::Kill => fx.node(h).restart()?,
                Failure::Ifdown => {
                    fx.bridge()
                        .host(h)
                        .netns()
                        .ip(&["link", "set", "eth0", "up"])?;
                }
            }
        }
        rows.push(row);
    }
    Ok(rows)
}

/// keepalived in every host's namespace: VRRP instance for the VIP, nopreempt (a returning
/// node does not take it back, like DROP), VRRP version 3 (version 2 knows whole seconds only
/// and runs an `advert_int` of 0.1 as 1 s), everything else at its defaults.
struct Keepalived {
    dir: tempfile::TempDir,
    children: Vec<Option<Child>>,
}

impl Keepalived {
    fn config(&self, i: usize, advert: &str) -> String {
        format!(
            "global_defs {{\n  router_id n{i}\n  enable_script_security\n  vrrp_version 3\n}}\n\
             vrrp_instance VI_1 {{\n  state BACKUP\n  nopreempt\n  interface eth0\n  \
             virtual_router_id 51\n  priority {}\n  advert_int {advert}\n  \
             virtual_ipaddress {{\n    {VIP}/32 dev eth0\n  }}\n}}\n",
            200 - i * 10
        )
    }

    fn spawn(&mut self, bridge: &Bridge, i: usize, advert: &str) -> anyhow::Result<()> {
        let d = self.dir.path().join(format!("n{i}"));
        std::fs::create_dir_all(&d)?;
        // A killed keepalived leaves its pid files; a new one refuses to start beside them.
        let _ = std::fs::remove_file(d.join("k.pid"));
        let _ = std::fs::remove_file(d.join("v.pid"));
        let conf = d.join("keepalived.conf");
        std::fs::write(&conf, self.config(i, advert))?;
        let log = std::fs::File::create(d.join("log"))?;
        let mut cmd = bridge.host(i).netns().command("keepalived");
        cmd.args(["--dont-fork", "--log-console", "--vrrp", "-f"])
            .arg(&conf)
            .arg("-p")
            .arg(d.join("k.pid"))
            .arg("-r")
            .arg(d.join("v.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().context("starting keepalived")?;
        self.children[i] = Some(child);
        Ok(())
    }

    /// SIGKILL of keepalived's whole process group (the parent and its VRRP child): a crash.
    fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut c) = self.children[i].take() {
            let pgid = nix::unistd::Pid::from_raw(-(c.id() as i32));
            let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = c.wait();
        }
        Ok(())
    }
}

impl Drop for Keepalived {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let pgid = nix::unistd::Pid::from_raw(-(c.id() as i32));
            let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = c.wait();
        }
    }
}

fn keepalived_rows(advert: &str, trials: usize) -> anyhow::Result<Vec<Row>> {
    let bridge = Bridge::new(NODES + 1)?;
    let names: Vec<String> = (0..NODES).map(|i| format!("n{i}")).collect();
    let mut k = Keepalived {
        dir: tempfile::Builder::new().prefix("dka").tempdir()?,
        children: (0..NODES).map(|_| None).collect(),
    };
    for i in 0..NODES {
        k.spawn(&bridge, i, advert)?;
    }
    let hosts: Vec<(&Netns, String)> = (0..NODES)
        .map(|i| (bridge.host(i).netns(), names[i].clone()))
        .collect();
    let _echo = EchoServers::start(&hosts, VIP)?;
    let prober = Prober::start(bridge.host(CLIENT).netns())?;
    let mut rows = Vec::new();
    let advert_d: f64 = advert.parse().unwrap_or(1.0);
    let settle = Duration::from_secs_f64((advert_d * 5.0).max(1.0));
    for failure in [Failure::Kill, Failure::Ifdown] {
        let mut row = Row {
            system: "keepalived 2.2.7".into(),
            setting: format!("advert_int {advert} s"),
            failure,
            trials: Vec::new(),
        };
        for t in 0..trials {
            std::thread::sleep(settle);
            let h = wait_serving(&bridge, &prober, &names)?;
            prober.clear();
            std::thread::sleep(Duration::from_millis(200));
            let failed_at = Instant::now();
            match failure {
                Failure::Kill => k.kill(h)?,
                Failure::Ifdown => {
                    bridge
                        .host(h)
                        .netns()
                        .ip(&["link", "set", "eth0", "down"])?;
                }
            }
            let trial = measure(
                &prober,
                failed_at,
                &names[h],
                &format!("keepalived {advert} {} #{t}", failure.name()),
            )?;
            row.trials.push(trial);
            match failure {
                Failure::Kill => {
                    // Its address stayed on the dead host (after the measurement: remove it so
                    // the next trial starts from one holder), then keepalived starts again.
                    let _ = bridge.host(h).netns().ip(&[
                        "addr",
                        "del",
                        &format!("{VIP}/32"),
                        "dev",
                        "eth0",
                    ]);
                    k.spawn(&bridge, h, advert)?;
                }
                Failure::Ifdown => {
                    bridge.host(h).netns().ip(&["link", "set", "eth0", "up"])?;
                }
            }
        }
        rows.push(row);
    }
    Ok(rows)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut trials = 10usize;
    let mut only: Option<String> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--trials" => trials = it.next().context("--trials N")?.parse()?,
            "--only" => only = it.next().cloned(),
            "--bench" => {}
            other => bail!(
                "unknown argument {other:?}; usage: failover [--trials N] [--only drop|keepalived]"
            ),
        }
    }
    ensure!(
        nix::unistd::Uid::effective().is_root(),
        "needs root (network namespaces)"
    );
    ensure!(
        Path::new(&paths::bin("drop-supervisor")).is_file(),
        "drop-supervisor not built"
    );
    let run_drop = only.as_deref() != Some("keepalived");
    let run_ka = only.as_deref() != Some("drop");
    if run_ka {
        ensure!(
            Command::new("keepalived").arg("--version").output().is_ok(),
            "keepalived is not installed (cargo xtask bench failover installs it)"
        );
    }
    let started = Instant::now();
    let mut rows = Vec::new();
    if run_drop {
        for profile in ["fast", "lan"] {
            eprintln!("DROP, profile {profile}");
            rows.extend(drop_rows(profile, trials)?);
        }
    }
    if run_ka {
        for advert in ["0.1", "1"] {
            eprintln!("keepalived, advert_int {advert}");
            rows.extend(keepalived_rows(advert, trials)?);
        }
    }
    let mut out = String::new();
    writeln!(
        out,
        "Failover: holder failure → first answer through the VIP at the client ({trials} trials each, \
         5 hosts + client on one bridge, UDP probe every 2 ms; run took {:.0} s)\n",
        started.elapsed().as_secs_f64()
    )?;
    writeln!(
        out,
        "| system | setting | failure | p50 ms | p90 ms | min ms | max ms | prober stalls |"
    )?;
    writeln!(out, "|---|---|---|---:|---:|---:|---:|---:|")?;
    for r in &rows {
        let s = r.sorted();
        writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.system,
            r.setting,
            r.failure.name(),
            ms(r.p50()),
            ms(r.p90()),
            ms(*s.first().unwrap_or(&Duration::ZERO)),
            ms(*s.last().unwrap_or(&Duration::ZERO)),
            r.trials.iter().filter(|t| t.stalled).count()
        )?;
    }
    // Targets: fast p50 ≤ 250 ms and below keepalived 0.1 s; lan p50 ≤ 3 s and below keepalived 1 s.
    let find = |system: &str, setting: &str, f: Failure| {
        rows.iter()
            .find(|r| r.system.starts_with(system) && r.setting == setting && r.failure == f)
            .map(Row::p50)
    };
    if run_drop && run_ka {
        writeln!(out)?;
        for f in [Failure::Kill, Failure::Ifdown] {
            for (drop_setting, ka_setting, target) in [
                (
                    "profile fast",
                    "advert_int 0.1 s",
                    Duration::from_millis(250),
                ),
                ("profile lan", "advert_int 1 s", Duration::from_secs(3)),
            ] {
                if let (Some(d), Some(k)) = (
                    find("DROP", drop_setting, f),
                    find("keepalived", ka_setting, f),
                ) {
                    let ok = d <= target && d < k;
                    writeln!(
                        out,
                        "- {} {drop_setting}: p50 {} ms vs keepalived {ka_setting} {} ms (ratio {:.2}); target ≤ {} ms and below keepalived: {}",
                        f.name(),
                        ms(d),
                        ms(k),
                        d.as_secs_f64() / k.as_secs_f64().max(1e-9),
                        ms(target),
                        if ok { "met" } else { "NOT met" }
                    )?;
                }
            }
        }
    }
    print!("{out}");
    Ok(())
}
