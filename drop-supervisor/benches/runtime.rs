//! `cargo xtask bench runtime` drives this binary (harness = false). Modes:
//!
//! - `floor N SECS BYTES`: N echo workers over plain pipes, one blocking caller thread each (a)
//! - `pool N SECS BYTES`: the same workers through `Pool::call`, N caller threads (b)
//! - `serve-gateway N PORT`: the gateway in front of a pool of N echo workers, until killed (c)
//! - `serve-floor PORT`: a bare keep-alive HTTP echo server, thread per connection (d)
//! - `serve-gateway-hyper N PORT`: the same gateway routing served by hyper, until killed (e)
//! - `paced N SECS BYTES RATE`: the pool at a fixed request rate (latency at a given load)
//! - `cold RUNS`: spawn-to-first-reply of a new echo worker through a fresh pool
//! - `idle-rss POOLS WORKERS`: this process's RSS with POOLS × WORKERS idle workers
//!
//! Results are printed as one JSON line.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drop_supervisor::gateway::{Gateway, GatewayKind, GatewayOptions};
use drop_supervisor::http::{self, BlockingReader};
use drop_supervisor::runtime::PoolLookup;
use drop_supervisor::runtime::worker::pool::{Pool, PoolConfig};

fn echo_worker() -> String {
    std::env::var("DROP_ECHO_WORKER").unwrap_or_else(|_| {
        let exe = std::env::current_exe().expect("current exe");
        // target/release/deps/runtime-HASH -> target/release/drop-echo-worker
        exe.parent()
            .and_then(|d| d.parent())
            .expect("target dir")
            .join("drop-echo-worker")
            .display()
            .to_string()
    })
}

/// A pool of `workers` echo workers; the queue holds every caller, the timeout never fires.
fn config(name: &str, workers: u32) -> PoolConfig {
    let echo = echo_worker();
    let mut cfg = common::config(name, &[echo.as_str()]);
    (cfg.min, cfg.max, cfg.queue) = (workers, workers, 1024);
    cfg.timeout = Duration::from_secs(10);
    cfg
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[idx] as f64 / 1000.0
}

/// Runs `threads` loops of `one()` for `secs`, returns (requests/s, p50 µs, p99 µs).
fn drive(
    threads: usize,
    secs: f64,
    one: impl Fn(usize) -> Box<dyn FnMut() + Send> + Sync,
) -> (f64, f64, f64) {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut all: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let mut f = one(t);
                s.spawn(move || {
                    let mut lat = Vec::with_capacity(1 << 20);
                    while Instant::now() < until {
                        let t0 = Instant::now();
                        f();
                        lat.push(t0.elapsed().as_nanos() as u64);
                    }
                    lat
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    (
        all.len() as f64 / elapsed,
        percentile(&all, 0.5),
        percentile(&all, 0.99),
    )
}

fn print(mode: &str, r: (f64, f64, f64)) {
    println!(
        "{{\"mode\":\"{mode}\",\"req_s\":{:.0},\"p50_us\":{:.1},\"p99_us\":{:.1}}}",
        r.0, r.1, r.2
    );
}

fn floor(workers: usize, secs: f64, bytes: usize) {
    let payload: Vec<u8> = std::iter::repeat_n(b'x', bytes).chain([b'\n']).collect();
    let mut children = Vec::new();
    let pipes: Vec<_> = (0..workers)
        .map(|_| {
            let mut c = Command::new(echo_worker())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let pipes = (
                c.stdin.take().unwrap(),
                BufReader::new(c.stdout.take().unwrap()),
            );
            children.push(c);
            std::sync::Mutex::new(Some(pipes))
        })
        .collect();
    let r = drive(workers, secs, |t| {
        let (mut stdin, mut stdout) = pipes[t].lock().unwrap().take().unwrap();
        let payload = payload.clone();
        let mut line = Vec::with_capacity(bytes + 1);
        Box::new(move || {
            stdin.write_all(&payload).unwrap();
            line.clear();
            stdout.read_until(b'\n', &mut line).unwrap();
            assert_eq!(line.len(), payload.len());
        })
    });
    print("floor", r);
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn wait_workers(pool: &Pool, n: u32) {
    let until = Instant::now() + Duration::from_secs(30);
    while pool.status().workers < n {
        assert!(Instant::now() < until, "workers did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The pool at a fixed total rate (`rate` requests/s spread over `workers` caller threads),
/// for the latency at a given load. Latency is measured from the scheduled send time, so a
/// caller that falls behind shows it.
fn pool_paced(workers: usize, secs: f64, bytes: usize, rate: f64) {
    let rt = runtime();
    let pool = {
        let _g = rt.enter();
        Pool::start(config("paced", workers as u32), common::devnull())
    };
    wait_workers(&pool, workers as u32);
    let payload = vec![b'x'; bytes];
    let interval = Duration::from_secs_f64(workers as f64 / rate);
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(secs);
    let mut all: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|t| {
                let (pool, payload) = (pool.clone(), payload.clone());
                s.spawn(move || {
                    let mut lat = Vec::new();
                    let mut next = Instant::now() + interval.mul_f64(t as f64 / workers as f64);
                    while next < until {
                        // sleep() cannot pace microsecond intervals (timer slack is ~50 µs):
                        // sleep only when far ahead, else yield (lets a worker on this core run).
                        loop {
                            let now = Instant::now();
                            if now >= next {
                                break;
                            }
                            if next - now > Duration::from_micros(200) {
                                std::thread::sleep(next - now - Duration::from_micros(100));
                            } else {
                                std::thread::yield_now();
                            }
                        }
                        let reply = pool.call(&payload).unwrap();
                        assert_eq!(reply.len(), payload.len());
                        lat.push(next.elapsed().as_nanos() as u64);
                        next += interval;
                    }
                    lat
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    print(
        "paced",
        (
            all.len() as f64 / elapsed,
            percentile(&all, 0.5),
            percentile(&all, 0.99),
        ),
    );
    pool.stop();
}

fn pool_mode(workers: usize, secs: f64, bytes: usize) {
    let rt = runtime();
    let pool = {
        let _g = rt.enter();
        Pool::start(config("bench", workers as u32), common::devnull())
    };
    wait_workers(&pool, workers as u32);
    let payload = vec![b'x'; bytes];
    let r = drive(workers, secs, |_| {
        let pool = pool.clone();
        let payload = payload.clone();
        Box::new(move || {
            let reply = pool.call(&payload).unwrap();
            assert_eq!(reply.len(), payload.len());
        })
    });
    print("pool", r);
    pool.stop();
}

struct One(Pool);
impl PoolLookup for One {
    fn pool(&self, name: &str) -> Option<Pool> {
        (name == self.0.name()).then(|| self.0.clone())
    }
}

/// (c) with the epoll server, (e) with hyper: the same pool, routing and listener.
fn serve_gateway(kind: GatewayKind, workers: u32, port: u16) {
    let rt = runtime();
    let pool = {
        let _g = rt.enter();
        Pool::start(config("echo", workers), common::devnull())
    };
    wait_workers(&pool, workers);
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let _gw = Gateway::start_kind(
        kind,
        listener,
        Arc::new(One(pool)),
        GatewayOptions::default(),
    )
    .unwrap();
    println!("ready");
    std::io::stdout().flush().unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn serve_floor(port: u16) {
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    println!("ready");
    std::io::stdout().flush().unwrap();
    for stream in listener.incoming() {
        let stream = stream.unwrap();
        std::thread::spawn(move || {
            let _ = stream.set_nodelay(true);
            let mut w = stream.try_clone().unwrap();
            let mut r = BlockingReader::new(stream, 1 << 20);
            let mut out = Vec::new();
            while let Ok(Some(req)) = r.next_request() {
                out.clear();
                http::encode_response(
                    200,
                    "text/plain; charset=utf-8",
                    &req.body,
                    req.close,
                    &mut out,
                );
                if w.write_all(&out).is_err() || req.close {
                    return;
                }
            }
        });
    }
}

fn cold(runs: usize) {
    let rt = runtime();
    let mut times = Vec::new();
    for i in 0..runs {
        let t0 = Instant::now();
        let pool = {
            let _g = rt.enter();
            Pool::start(config(&format!("cold{i}"), 1), common::devnull())
        };
        pool.call(b"first").unwrap();
        times.push(t0.elapsed().as_nanos() as u64);
        pool.stop();
        rt.block_on(pool.stopped(Duration::from_secs(5)));
    }
    times.sort_unstable();
    println!(
        "{{\"mode\":\"cold\",\"runs\":{runs},\"p50_ms\":{:.2},\"p99_ms\":{:.2}}}",
        percentile(&times, 0.5) / 1000.0,
        percentile(&times, 0.99) / 1000.0
    );
}

fn rss_kb() -> u64 {
    let mut s = String::new();
    std::fs::File::open("/proc/self/status")
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn idle_rss(pools: u32, workers: u32) {
    let rt = runtime();
    let before = rss_kb();
    let all: Vec<Pool> = (0..pools)
        .map(|i| {
            let _g = rt.enter();
            Pool::start(config(&format!("idle{i}"), workers), common::devnull())
        })
        .collect();
    for p in &all {
        wait_workers(p, workers);
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kb();
    println!(
        "{{\"mode\":\"idle-rss\",\"pools\":{pools},\"workers\":{},\"rss_kb_before\":{before},\"rss_kb\":{after}}}",
        pools * workers
    );
    for p in &all {
        p.stop();
    }
    for p in &all {
        rt.block_on(p.stopped(Duration::from_secs(10)));
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let num = |i: usize, d: f64| args.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(d);
    match args.first().map(String::as_str) {
        Some("floor") => floor(num(1, 2.0) as usize, num(2, 3.0), num(3, 64.0) as usize),
        Some("pool") => pool_mode(num(1, 2.0) as usize, num(2, 3.0), num(3, 64.0) as usize),
        Some("serve-gateway") => serve_gateway(
            GatewayKind::Epoll,
            num(1, 2.0) as u32,
            num(2, 18081.0) as u16,
        ),
        Some("serve-gateway-hyper") => serve_gateway(
            GatewayKind::Hyper,
            num(1, 2.0) as u32,
            num(2, 18085.0) as u16,
        ),
        Some("serve-floor") => serve_floor(num(1, 18082.0) as u16),
        Some("paced") => pool_paced(
            num(1, 2.0) as usize,
            num(2, 3.0),
            num(3, 64.0) as usize,
            num(4, 100_000.0),
        ),
        Some("cold") => cold(num(1, 50.0) as usize),
        Some("idle-rss") => idle_rss(num(1, 10.0) as u32, num(2, 100.0) as u32),
        _ => eprintln!(
            "usage: runtime floor|pool|serve-gateway|serve-gateway-hyper|serve-floor|paced|cold|idle-rss ..."
        ),
    }
}
