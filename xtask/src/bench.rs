//! `cargo xtask bench runtime`: the function-runtime benchmark, every mode in one run, with the
//! same echo worker binary and the same number of workers throughout. Prints a markdown table
//! (also written to target/bench/runtime.md) for BENCHMARKS.md.
//!
//! (a) floor: workers driven over pipes, one blocking caller thread per worker
//! (b) the pool API in process
//! (c) the HTTP gateway in front of the pool, keep-alive, wrk at 2 and 64 connections
//! (d) a bare keep-alive HTTP echo server (no worker), same wrk load
//! (e) the same gateway routing and pool served by hyper instead of the epoll server, measured
//!     exactly like (c), beside it in the same run: is the hand-written server worth keeping?

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::{cargo, output, root, run_cmd, step};

mod cluster;
mod failover;
mod services;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// What to benchmark: `runtime`, `cluster`, `failover`, `peer`, `services` or `lb`.
    pub what: String,
    /// runtime: workers in every mode.
    #[arg(long, default_value_t = 2)]
    pub workers: u32,
    /// runtime: seconds per measurement.
    #[arg(long, default_value_t = 5)]
    pub secs: u32,
    /// runtime: payload bytes.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Runs per measurement; the median is reported (the VMs are noisy).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// cluster: member counts with the `lan` timing profile.
    #[arg(long, default_value = "50,100,200")]
    pub nodes: String,
    /// cluster: member counts with the `fast` timing profile.
    #[arg(long, default_value = "5,10")]
    pub fast_nodes: String,
    /// cluster: overrides of `lan` knobs (fields of `Timing`), e.g. `suspicion_mult=2,probe_interval=300ms`.
    #[arg(long)]
    pub lan: Option<String>,
    /// cluster: overrides of `fast` knobs, as for `--lan`.
    #[arg(long)]
    pub fast: Option<String>,
    /// failover, services: trials per system, setting and kind of failure.
    #[arg(long, default_value_t = 10)]
    pub trials: usize,
    /// failover: `drop` or `keepalived` alone (default: both, side by side).
    #[arg(long)]
    pub only: Option<String>,
}

/// Runs `measure` `runs` times and keeps the run with the median requests/s.
fn median(runs: usize, measure: impl FnMut() -> anyhow::Result<Figure>) -> anyhow::Result<Figure> {
    median_by(runs, measure, |f| f.req_s)
}

/// Runs `measure` `runs` times and keeps the run with the median `key`.
fn median_by(
    runs: usize,
    mut measure: impl FnMut() -> anyhow::Result<Figure>,
    key: impl Fn(&Figure) -> f64,
) -> anyhow::Result<Figure> {
    let mut all = Vec::new();
    for _ in 0..runs.max(1) {
        all.push(measure()?);
    }
    all.sort_by(|a, b| key(a).total_cmp(&key(b)));
    Ok(all[all.len() / 2])
}

#[derive(Debug, Clone, Copy, Default)]
struct Figure {
    req_s: f64,
    p50_us: f64,
    p99_us: f64,
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Builds the bench target `name` of drop-supervisor (release) and returns its executable.
fn bench_binary(name: &str) -> anyhow::Result<PathBuf> {
    bench_binary_of("drop-supervisor", name)
}

/// Builds the bench target `name` of `package` (release) and returns its executable.
fn bench_binary_of(package: &str, name: &str) -> anyhow::Result<PathBuf> {
    let out = output(cargo().args([
        "bench",
        "--locked",
        "-p",
        package,
        "--bench",
        name,
        "--no-run",
        "--message-format=json",
    ]))?;
    let quoted = format!("\"{name}\"");
    out.lines()
        .filter(|l| {
            l.contains("\"compiler-artifact\"") && l.contains(&quoted) && l.contains("\"bench\"")
        })
        .find_map(|l| {
            let start = l.find("\"executable\":\"")? + 14;
            let end = l[start..].find('"')? + start;
            Some(PathBuf::from(&l[start..end]))
        })
        .with_context(|| format!("cannot find the {name} bench executable in cargo's output"))
}

fn json_num(line: &str, key: &str) -> Option<f64> {
    let start = line.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &line[start..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim().parse().ok()
}

fn run_json(bin: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = output(
        Command::new(bin)
            .args(args)
            .env("DROP_ECHO_WORKER", echo_worker()),
    )?;
    out.lines()
        .last()
        .map(str::to_string)
        .context("the bench printed nothing")
}

fn echo_worker() -> PathBuf {
    root().join("target/release/drop-echo-worker")
}

fn in_process(bin: &Path, mode: &str, a: &BenchArgs) -> anyhow::Result<Figure> {
    let line = run_json(
        bin,
        &[
            mode,
            &a.workers.to_string(),
            &a.secs.to_string(),
            &a.payload.to_string(),
        ],
    )?;
    Ok(Figure {
        req_s: json_num(&line, "req_s").context("req_s")?,
        p50_us: json_num(&line, "p50_us").context("p50_us")?,
        p99_us: json_num(&line, "p99_us").context("p99_us")?,
    })
}

/// `taskset -c CPU` in front of a command when `cpu` is given.
fn pinned(cpu: Option<u32>, program: &Path) -> Command {
    match cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpu.to_string()).arg(program);
            c
        }
        None => Command::new(program),
    }
}

fn start_server(bin: &Path, args: &[&str], cpu: Option<u32>) -> anyhow::Result<Server> {
    let mut child = pinned(cpu, bin)
        .args(args)
        .env("DROP_ECHO_WORKER", echo_worker())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {} {args:?}", bin.display()))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("{args:?} did not get ready: {line:?}");
    }
    Ok(Server(child))
}

/// Parses wrk's `Requests/sec:` and the 50% / 99% lines of `--latency`.
fn parse_wrk(out: &str) -> anyhow::Result<Figure> {
    let unit = |v: &str| -> Option<f64> {
        let (num, mult) = if let Some(n) = v.strip_suffix("us") {
            (n, 1.0)
        } else if let Some(n) = v.strip_suffix("ms") {
            (n, 1000.0)
        } else if let Some(n) = v.strip_suffix('s') {
            (n, 1_000_000.0)
        } else {
            return None;
        };
        num.parse::<f64>().ok().map(|x| x * mult)
    };
    let pct = |p: &str| {
        out.lines().find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next()? == p)
                .then(|| it.next().and_then(unit))
                .flatten()
        })
    };
    let req_s = out
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Requests/sec:")?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .context("no Requests/sec in wrk output")?;
    if out.contains("Non-2xx or 3xx responses") || out.contains("Socket errors") {
        bail!("wrk saw errors:\n{out}");
    }
    Ok(Figure {
        req_s,
        p50_us: pct("50%").context("no 50% line")?,
        p99_us: pct("99%").context("no 99% line")?,
    })
}

fn wrk(
    url: &str,
    conns: u32,
    a: &BenchArgs,
    script: &Path,
    cpu: Option<u32>,
) -> anyhow::Result<Figure> {
    let threads = conns.min(2);
    let out = output(
        pinned(cpu, Path::new("wrk"))
            .args([
                "-t",
                &threads.to_string(),
                "-c",
                &conns.to_string(),
                "-d",
                &format!("{}s", a.secs),
                "--latency",
                "-s",
            ])
            .arg(script)
            .arg(url),
    )?;
    parse_wrk(&out)
}

pub fn bench(a: BenchArgs) -> anyhow::Result<()> {
    match a.what.as_str() {
        "runtime" => runtime(a),
        "cluster" => cluster::cluster(&a),
        "failover" => failover::failover(&a),
        "services" => services::services(&a),
        "lb" => lb(),
        "peer" => peer(),
        other => {
            bail!(
                "unknown benchmark {other:?}; known: runtime, cluster, failover, peer, services, lb"
            )
        }
    }
}

/// `cargo xtask bench peer`: the sealed peer transport's crypto per call
/// (drop-supervisor/benches/peer.rs), printed as a markdown table.
fn peer() -> anyhow::Result<()> {
    let bin = step("build: peer bench", || bench_binary("peer"))?;
    report(
        "peer",
        "bench: peer (sealed call vs HMAC signature)",
        Command::new(&bin).arg("--ms").arg("1000"),
        "cargo xtask bench peer",
    )
}

/// `cargo xtask bench lb`: the balancer per packet (tests/bench/lb.rs). Root; builds the
/// XDP object first.
fn lb() -> anyhow::Result<()> {
    if !crate::setup::is_root() {
        bail!("the lb benchmark needs root (BPF_PROG_TEST_RUN)");
    }
    let tools = crate::setup::setup()?;
    crate::ebpf::build(&tools)?;
    step("setup: nftables (the DR stand-in)", || {
        crate::setup::apt_install(&["nftables"])
    })?;
    let bin = step("build: lb bench", || bench_binary_of("drop-tests", "lb"))?;
    report(
        "lb",
        "bench: lb (drop_lb per packet)",
        &mut Command::new(&bin),
        "cargo xtask bench lb",
    )
}

/// Runs a bench binary (progress on stderr, a markdown report on stdout), prints the report
/// under the command that made it and writes it to `target/bench/<name>.md` for BENCHMARKS.md.
fn report(name: &str, what: &str, cmd: &mut Command, command: &str) -> anyhow::Result<()> {
    let out = step(what, || {
        let out = cmd
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        if !out.status.success() {
            bail!("{cmd:?} exited with {}", out.status);
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    })?;
    let md = format!("Command: `{command}`\n\n{out}");
    println!("\n{md}");
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.md"));
    std::fs::write(&path, md)?;
    println!("(written to {})", path.display());
    Ok(())
}

fn runtime(a: BenchArgs) -> anyhow::Result<()> {
    if Command::new("taskset").arg("--version").output().is_err() {
        bail!("taskset (util-linux) is not installed");
    }
    if Command::new("wrk").arg("--version").output().is_err() {
        bail!("wrk is not installed (cargo xtask setup installs it)");
    }
    step("build: release binaries", || {
        run_cmd(cargo().args([
            "build",
            "--locked",
            "--release",
            "-p",
            "drop-supervisor",
            "--bins",
        ]))
    })?;
    let bin = step("build: runtime bench", || bench_binary("runtime"))?;
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("post.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = string.rep(\"x\", {})\nwrk.headers[\"Content-Type\"] = \"text/plain\"\n",
            a.payload
        ),
    )?;

    let floor = step("bench: (a) floor over pipes", || {
        median(a.runs, || in_process(&bin, "floor", &a))
    })?;
    let pool = step("bench: (b) pool API in process", || {
        median(a.runs, || in_process(&bin, "pool", &a))
    })?;
    // A hypervisor stall (~1 s, PLATFORM.md) puts every later paced request behind schedule,
    // so this one too is the median of several runs, by p99.
    let half = step("bench: (b) pool API at half of its max rate", || {
        let rate = format!("{:.0}", pool.req_s / 2.0);
        median_by(
            a.runs,
            || {
                let args = [
                    "paced",
                    &a.workers.to_string(),
                    &a.secs.to_string(),
                    &a.payload.to_string(),
                    &rate,
                ];
                let line = run_json(&bin, &args)?;
                Ok(Figure {
                    req_s: json_num(&line, "req_s").context("req_s")?,
                    p50_us: json_num(&line, "p50_us").context("p50_us")?,
                    p99_us: json_num(&line, "p99_us").context("p99_us")?,
                })
            },
            |f| f.p99_us,
        )
    })?;
    // Two placements. Isolated: wrk on CPU 0, the server (and its workers) on CPU 1, as a
    // client on another machine would be; this is the comparison the targets are about.
    // Shared: no pinning; the scheduler may put wrk and a bare server thread on one core,
    // a same-core ping-pong that favours (d) and that no remote client gets.
    let http =
        |label: &str, args: &[&str], path: &str, server_cpu: Option<u32>, wrk_cpu: Option<u32>| {
            step(&format!("bench: {label}"), || {
                let port = args.last().copied().unwrap_or_default().to_string();
                let _s = start_server(&bin, args, server_cpu)?;
                let url = format!("http://127.0.0.1:{port}{path}");
                Ok((
                    median(a.runs, || wrk(&url, 2, &a, &script, wrk_cpu))?,
                    median(a.runs, || wrk(&url, 64, &a, &script, wrk_cpu))?,
                ))
            })
        };
    let workers = a.workers.to_string();
    let (gw2, gw64) = http(
        "(c) gateway, isolated",
        &["serve-gateway", &workers, "18081"],
        "/api/v1/echo",
        Some(1),
        Some(0),
    )?;
    let (fl2, fl64) = http(
        "(d) bare HTTP, isolated",
        &["serve-floor", "18082"],
        "/echo",
        Some(1),
        Some(0),
    )?;
    let (hy2, hy64) = http(
        "(e) hyper gateway, isolated",
        &["serve-gateway-hyper", &workers, "18085"],
        "/api/v1/echo",
        Some(1),
        Some(0),
    )?;
    let (sgw2, sgw64) = http(
        "(c) gateway, shared cores",
        &["serve-gateway", &workers, "18083"],
        "/api/v1/echo",
        None,
        None,
    )?;
    let (shy2, shy64) = http(
        "(e) hyper gateway, shared cores",
        &["serve-gateway-hyper", &workers, "18086"],
        "/api/v1/echo",
        None,
        None,
    )?;
    let (sfl2, sfl64) = http(
        "(d) bare HTTP, shared cores",
        &["serve-floor", "18084"],
        "/echo",
        None,
        None,
    )?;
    let cold = step("bench: cold start (spawn to first reply)", || {
        run_json(&bin, &["cold", "50"])
    })?;
    let rss = step(
        "bench: supervisor RSS, 1000 idle workers in 10 pools",
        || run_json(&bin, &["idle-rss", "10", "100"]),
    )?;

    let row = |name: &str, f: Figure| {
        format!(
            "| {name} | {:.0} | {:.1} | {:.1} |\n",
            f.req_s, f.p50_us, f.p99_us
        )
    };
    let mut md = format!(
        "Workers: {}, payload: {} bytes, {} s per measurement, median of {} runs by req/s, echo worker: drop-echo-worker (release).\n\n\
         | mode | req/s | p50 µs | p99 µs |\n|---|---|---|---|\n",
        a.workers, a.payload, a.secs, a.runs
    );
    md += &row("(a) floor: pipes, one caller thread per worker", floor);
    md += &row("(b) pool API in process", pool);
    md += &row("(b) pool API at half of its max rate", half);
    md += &row("(c) gateway, 2 connections, isolated", gw2);
    md += &row("(c) gateway, 64 connections, isolated", gw64);
    md += &row("(d) bare HTTP, 2 connections, isolated", fl2);
    md += &row("(d) bare HTTP, 64 connections, isolated", fl64);
    md += &row("(e) hyper gateway, 2 connections, isolated", hy2);
    md += &row("(e) hyper gateway, 64 connections, isolated", hy64);
    md += &row("(c) gateway, 2 connections, shared cores", sgw2);
    md += &row("(c) gateway, 64 connections, shared cores", sgw64);
    md += &row("(d) bare HTTP, 2 connections, shared cores", sfl2);
    md += &row("(d) bare HTTP, 64 connections, shared cores", sfl64);
    md += &row("(e) hyper gateway, 2 connections, shared cores", shy2);
    md += &row("(e) hyper gateway, 64 connections, shared cores", shy64);
    md += &format!(
        "\nRatios: b/a = {:.2} (target ≥ 0.5); c/d isolated = {:.2} at 2 connections, {:.2} at 64 \
         (target ≥ 0.7); c/d on shared cores = {:.2} and {:.2}.\n",
        pool.req_s / floor.req_s,
        gw2.req_s / fl2.req_s,
        gw64.req_s / fl64.req_s,
        sgw2.req_s / sfl2.req_s,
        sgw64.req_s / sfl64.req_s
    );
    md += &format!(
        "Epoll gateway against hyper (c/e, above 1: the hand-written server is faster): \
         isolated = {:.2} at 2 connections, {:.2} at 64; shared cores = {:.2} and {:.2}.\n",
        gw2.req_s / hy2.req_s,
        gw64.req_s / hy64.req_s,
        sgw2.req_s / shy2.req_s,
        sgw64.req_s / shy64.req_s
    );
    md += &format!(
        "Latency at half of max load (pool API): p99 {:.1} µs (target ≤ 1 ms).\n",
        half.p99_us
    );
    md += &format!(
        "Cold start (new pool, spawn to first reply, 50 runs): p50 {:.2} ms, p99 {:.2} ms (target p50 ≤ 5 ms).\n",
        json_num(&cold, "p50_ms").unwrap_or(f64::NAN),
        json_num(&cold, "p99_ms").unwrap_or(f64::NAN)
    );
    md += &format!(
        "Supervisor RSS with 1000 idle workers in 10 pools: {:.1} MB (aim < 50 MB).\n",
        json_num(&rss, "rss_kb").unwrap_or(f64::NAN) / 1024.0
    );
    println!("\n{md}");
    let path = dir.join("runtime.md");
    std::fs::File::create(&path)?.write_all(md.as_bytes())?;
    println!("(written to {})", path.display());
    std::thread::sleep(Duration::from_millis(10));
    Ok(())
}
