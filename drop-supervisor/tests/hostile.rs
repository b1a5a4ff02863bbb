//! The gateway against hostile clients, with the real daemon as a process: slowloris from one
//! address, bodies announced far beyond any limit, slow bodies, a body budget, and `/metrics`
//! behind the token. Each test states what it measured on stderr (`cargo test -- --nocapture`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DAEMON: &str = env!("CARGO_BIN_EXE_drop-supervisor");
const DROPCTL: &str = env!("CARGO_BIN_EXE_dropctl");
const ECHO: &str = env!("CARGO_BIN_EXE_drop-echo-worker");
const TOKEN: &str = "0123456789abcdef-token";

/// A daemon with one echo pool, its gateway on 127.0.0.1, and `gateway_extra` in `[gateway]`.
struct Daemon {
    /// Holds the daemon's state and config; removed when the daemon is.
    _dir: tempfile::TempDir,
    child: Child,
    gateway: SocketAddr,
}

impl Daemon {
    fn start(gateway_extra: &str, pool_extra: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        std::fs::write(
            dir.path().join("drop.toml"),
            format!(
                "[node]\nname = \"h1\"\nstate_dir = \"{d}/state\"\n[control]\nsocket = \"{d}/drop.sock\"\n\
                 [tuning]\nsysctl_root = \"{d}/sys\"\n[runtime]\ncgroups = false\n\
                 [gateway]\nlisten = \"127.0.0.1:0\"\n{gateway_extra}\n"
            ),
        )
        .unwrap();
        let child = Command::new(DAEMON)
            .arg("--config")
            .arg(dir.path().join("drop.toml"))
            .env("DROP_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let socket = dir.path().join("drop.sock");
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "daemon did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        let flow = dir.path().join("echo.yaml");
        std::fs::write(
            &flow,
            format!(
                "name: echo\nfunc:\n  - name: echo\n    cmd: {ECHO}\n    num: 2\n    queue: 1024\n{pool_extra}"
            ),
        )
        .unwrap();
        let ctl = |args: &[&str]| {
            let out = Command::new(DROPCTL)
                .arg("--socket")
                .arg(&socket)
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            out.stdout
        };
        ctl(&["flow", "apply", flow.to_str().unwrap()]);
        let status: serde_json::Value =
            serde_json::from_slice(&ctl(&["--json", "status"])).unwrap();
        let gateway = status["gateway"].as_str().unwrap().parse().unwrap();
        Daemon {
            _dir: dir,
            child,
            gateway,
        }
    }

    /// Peak resident memory of the daemon so far (`VmHWM`), in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Raises this process's descriptor limit to what the test needs (the soft limit is often 1024).
fn want_descriptors(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < n {
            assert!(
                lim.rlim_max >= n,
                "this test needs {n} descriptors; the hard limit is {}",
                lim.rlim_max
            );
            lim.rlim_cur = n;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
}

/// A connection from `source` (an address of 127.0.0.0/8) to `to`.
fn connect_from(source: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((source, 0)).into())?;
    socket.connect_timeout(&to.into(), Duration::from_secs(5))?;
    Ok(socket.into())
}

/// One call on a fresh connection: (status, body). Status 0: no answer (reset or timeout).
fn call(
    source: [u8; 4],
    to: SocketAddr,
    path: &str,
    body: &[u8],
    auth: Option<&str>,
) -> (u16, Vec<u8>) {
    let Ok(mut s) = connect_from(source, to) else {
        return (0, Vec::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let auth = auth.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    if s.write_all(&req).is_err() {
        return (0, Vec::new());
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    parse_status(&out)
}

fn parse_status(raw: &[u8]) -> (u16, Vec<u8>) {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or(Vec::new(), |(_, b)| b.as_bytes().to_vec());
    (status, body)
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[test]
fn slowloris_from_one_address_does_not_lock_out_other_clients() {
    want_descriptors(4096);
    let head_timeout = Duration::from_secs(3);
    let daemon = Daemon::start("head_timeout = \"3s\"\n", "");
    let gw = daemon.gateway;
    let attacker = [127, 0, 0, 1];
    let other = [127, 0, 0, 2];

    // 1500 connections from one address, each with an unfinished head, one more byte a second.
    let started = Instant::now();
    let mut slow: Vec<TcpStream> = Vec::new();
    let mut refused_at_once = 0;
    for _ in 0..1500 {
        let mut s = connect_from(attacker, gw).unwrap();
        s.set_nonblocking(true).unwrap();
        if s.write_all(b"POST /api/v1/echo HTTP/1.1\r\nHost: t\r\n")
            .is_ok()
        {
            slow.push(s);
        } else {
            refused_at_once += 1;
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let slow = Arc::new(Mutex::new(slow));
    let dripper = {
        let (stop, slow) = (stop.clone(), slow.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for s in slow.lock().unwrap().iter_mut() {
                    let _ = s.write(b"X");
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };

    let setup = started.elapsed();
    // Fresh clients from another address, all through the attack.
    let mut during = Vec::new();
    let attack = Instant::now();
    while attack.elapsed() < head_timeout + Duration::from_secs(2) {
        let t0 = Instant::now();
        let (status, body) = call(other, gw, "/api/v1/echo", b"fresh", None);
        during.push((status, t0.elapsed(), body));
        // A steady stream of fresh clients, not a flood of ephemeral ports.
        std::thread::sleep(Duration::from_millis(2));
    }
    // After the head deadline: the attacker's own address is served again too.
    let same_after: Vec<u16> = (0..20)
        .map(|_| call(attacker, gw, "/api/v1/echo", b"again", None).0)
        .collect();
    stop.store(true, Ordering::Relaxed);
    dripper.join().unwrap();

    // What the slow connections were told: 503 busy beyond the per-address cap, 408 after the
    // head deadline for those that got a slot.
    let mut told = std::collections::BTreeMap::<u16, usize>::new();
    for s in slow.lock().unwrap().iter_mut() {
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        *told.entry(parse_status(&out).0).or_default() += 1;
    }

    let ok = during
        .iter()
        .filter(|(s, _, b)| *s == 200 && b == b"fresh")
        .count();
    let mut lat: Vec<Duration> = during.iter().map(|(_, l, _)| *l).collect();
    lat.sort();
    let share = ok as f64 / during.len() as f64;
    eprintln!("slowloris: 1500 connections opened in {setup:?}");
    eprintln!(
        "slowloris: {} fresh calls from another address during the attack, {:.1}% answered 200, \
         p50 {:?}, p99 {:?}; the attacker's 1500 connections were told {told:?} \
         ({refused_at_once} refused while writing); after the head deadline {}/20 calls from the \
         attacker's address answered 200",
        during.len(),
        share * 100.0,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        same_after.iter().filter(|s| **s == 200).count()
    );
    assert!(during.len() >= 50, "too few fresh calls: {}", during.len());
    assert!(
        share >= 0.99,
        "only {:.1}% of fresh calls answered",
        share * 100.0
    );
    assert!(percentile(&lat, 0.99) < Duration::from_secs(1));
    assert!(same_after.iter().all(|s| *s == 200), "{same_after:?}");
    assert!(told.get(&408).copied().unwrap_or(0) > 0, "{told:?}");
    assert!(told.get(&503).copied().unwrap_or(0) > 0, "{told:?}");
}

#[test]
fn bodies_announced_far_beyond_the_limit_get_413_without_growing_memory() {
    want_descriptors(4096);
    let daemon = Daemon::start("", "");
    let before = daemon.peak_rss_kib();
    let conns: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = TcpStream::connect(daemon.gateway).unwrap();
            s.write_all(
                b"POST /api/v1/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1073741824\r\n\r\n",
            )
            .unwrap();
            // Start the body anyway, as a client that does not wait for an answer would.
            let _ = s.write_all(&vec![b'a'; 64 * 1024]);
            s
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for mut s in conns {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = vec![0; 4096];
        let n = s.read(&mut out).unwrap_or(0);
        *statuses.entry(parse_status(&out[..n]).0).or_default() += 1;
    }
    let peak = daemon.peak_rss_kib();
    eprintln!(
        "1 GiB bodies: 200 connections told {statuses:?}; daemon peak RSS {before} KiB before, \
         {peak} KiB after"
    );
    assert_eq!(statuses.get(&413), Some(&200), "{statuses:?}");
    // The bound: 64 MiB for the whole daemon, far below one buffered body.
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB");
    // And it still serves.
    assert_eq!(
        call([127, 0, 0, 1], daemon.gateway, "/api/v1/echo", b"x", None).0,
        200
    );
}

#[test]
fn a_body_that_does_not_arrive_in_time_gets_408() {
    let daemon = Daemon::start("body_timeout = \"1s\"\n", "");
    let mut s = TcpStream::connect(daemon.gateway).unwrap();
    s.write_all(b"POST /api/v1/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123")
        .unwrap();
    let t0 = Instant::now();
    let mut dripped = 0;
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut out = Vec::new();
    // One byte every 300 ms keeps the connection busy, never finishing the body.
    loop {
        let mut buf = [0; 1024];
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => {
                dripped += 1;
                if s.write_all(b"x").is_err() || t0.elapsed() > Duration::from_secs(10) {
                    break;
                }
            }
        }
    }
    let (status, body) = parse_status(&out);
    eprintln!(
        "slow body: {status} after {:?} ({dripped} bytes dripped)",
        t0.elapsed()
    );
    assert_eq!(status, 408, "{}", String::from_utf8_lossy(&body));
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
}

#[test]
fn the_body_budget_refuses_what_does_not_fit_at_once() {
    // One pool that takes 800 KB lines and a budget of 1 MiB: one such body fits, two do not.
    let daemon = Daemon::start("body_budget_mb = 1\n", "    line_max: 800000\n");
    let mut first = TcpStream::connect(daemon.gateway).unwrap();
    first
        .write_all(b"POST /api/v1/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 700000\r\n\r\nabc")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let (status, body) = call(
        [127, 0, 0, 1],
        daemon.gateway,
        "/api/v1/echo",
        &vec![b'b'; 700_000],
        None,
    );
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("busy"));
    assert!(t0.elapsed() < Duration::from_secs(2));
    // The first body completes and is answered; then the budget is free again.
    first.write_all(&vec![b'a'; 700_000 - 3]).unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut out = vec![0; 64];
    let n = first.read(&mut out).unwrap();
    assert_eq!(parse_status(&out[..n]).0, 200);
    let (status, _) = call(
        [127, 0, 0, 1],
        daemon.gateway,
        "/api/v1/echo",
        &vec![b'c'; 700_000],
        None,
    );
    assert_eq!(status, 200);
}

#[test]
fn metrics_need_the_token_when_one_is_set() {
    let daemon = Daemon::start(&format!("token = \"{TOKEN}\"\n"), "");
    let get = |auth: Option<&str>| {
        let mut s = TcpStream::connect(daemon.gateway).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let auth = auth.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: t\r\n{auth}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        parse_status(&out)
    };
    let (status, body) = get(None);
    assert_eq!(status, 401, "{}", String::from_utf8_lossy(&body));
    assert!(!String::from_utf8_lossy(&body).contains("drop_pool"));
    let (status, body) = get(Some(TOKEN));
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("echo"));
}

#[test]
fn a_client_sending_a_refused_body_reads_its_413_not_a_reset() {
    // The pool takes 64 KiB lines; each client sends 32 MiB at once and only then reads. The
    // gateway refuses from the head, then reads the rest away before it closes, so the answer
    // is not lost to a connection reset.
    let daemon = Daemon::start("", "");
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(daemon.gateway).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut req =
            b"POST /api/v1/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 33554432\r\n\r\n".to_vec();
        req.extend(std::iter::repeat_n(b'x', 32 << 20));
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || w.write_all(&req).is_ok());
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let wrote_all = writer.join().unwrap();
        *statuses.entry(parse_status(&out).0).or_default() += 1;
        assert!(
            wrote_all,
            "the gateway reset the connection while the body was sent"
        );
    }
    eprintln!("refused 32 MiB bodies: {statuses:?}");
    assert_eq!(statuses.get(&413), Some(&20), "{statuses:?}");
}
