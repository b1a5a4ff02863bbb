//! The gateway's servers with real worker processes (no root needed): many connections on
//! few workers, pipelining, answers larger than a socket buffer, slow functions next to fast
//! ones, queue timeouts, malformed requests, every status of the routing table, the
//! connection cap, stop. Each case runs against both servers (the epoll one and hyper), which
//! must answer alike.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{devnull, sh, wait_for};
use drop_supervisor::gateway::{Gateway, GatewayKind, GatewayOptions, Limits};
use drop_supervisor::runtime::PoolLookup;
use drop_supervisor::runtime::worker::pool::{Pool, PoolConfig};

const ECHO: &str = env!("CARGO_BIN_EXE_drop-echo-worker");

/// A pool of `workers` workers with room to queue every test's requests.
fn config(name: &str, argv: &[&str], workers: u32) -> PoolConfig {
    let mut cfg = common::config(name, argv);
    (cfg.min, cfg.max, cfg.queue) = (workers, workers, 1024);
    cfg.timeout = Duration::from_secs(10);
    cfg
}

/// Both servers, for the cases that hold for both.
const KINDS: [GatewayKind; 2] = [GatewayKind::Epoll, GatewayKind::Hyper];

const METRICS: &str = "# TYPE drop_test gauge\ndrop_test 1\n";

struct Pools(Vec<Pool>);

impl PoolLookup for Pools {
    fn pool(&self, name: &str) -> Option<Pool> {
        self.0.iter().find(|p| p.name() == name).cloned()
    }
    fn metrics(&self) -> Option<String> {
        Some(METRICS.to_string())
    }
}

/// A gateway in front of `configs`, with the runtime its pools run on.
struct Fixture {
    _rt: tokio::runtime::Runtime,
    pools: Vec<Pool>,
    gateway: Gateway,
}

impl Fixture {
    fn new(kind: GatewayKind, configs: Vec<PoolConfig>) -> Fixture {
        Fixture::with_options(kind, configs, GatewayOptions::default())
    }

    fn with_options(
        kind: GatewayKind,
        configs: Vec<PoolConfig>,
        options: GatewayOptions,
    ) -> Fixture {
        // Printed with the output of a failing test: which server it was.
        eprintln!("--- gateway server: {kind:?}");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let pools: Vec<Pool> = {
            let _g = rt.enter();
            configs
                .into_iter()
                .map(|c| Pool::start(c, devnull()))
                .collect()
        };
        for pool in &pools {
            let want = pool.config().min;
            wait_for("the workers", Duration::from_secs(10), || {
                pool.status().workers >= want
            });
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let gateway =
            Gateway::start_kind(kind, listener, Arc::new(Pools(pools.clone())), options).unwrap();
        Fixture {
            _rt: rt,
            pools,
            gateway,
        }
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.gateway.local_addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.gateway.stop();
        for p in &self.pools {
            p.stop();
        }
    }
}

fn request(path: &str, body: &[u8]) -> Vec<u8> {
    request_with("POST", path, &[], body)
}

fn request_with(method: &str, path: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// The `code` of a JSON error body.
fn code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)));
    v["error"]["code"].as_str().unwrap_or_default().to_string()
}

/// One read; a signal (a worker of this process ended) is not an error. A socket with a read
/// timeout is not restarted after a signal handler, so `read` can say `Interrupted`.
fn read_more(s: &mut TcpStream, chunk: &mut [u8]) -> usize {
    loop {
        match s.read(chunk) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            r => return r.unwrap(),
        }
    }
}

/// Reads one response off a keep-alive connection: (status, body, connection closes).
fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> (u16, Vec<u8>, bool) {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head) = resp.parse(buf).unwrap() {
            let header = |name: &str| {
                resp.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| String::from_utf8_lossy(h.value).to_string())
            };
            let len: usize = header("content-length").unwrap().parse().unwrap();
            let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
            let status = resp.code.unwrap();
            while buf.len() < head + len {
                let n = read_more(s, &mut chunk);
                assert!(n > 0, "connection closed inside a response");
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[head..head + len].to_vec();
            buf.drain(..head + len);
            return (status, body, close);
        }
        let n = read_more(s, &mut chunk);
        assert!(n > 0, "connection closed before a response");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn sixty_four_connections_on_two_workers_each_get_their_own_replies() {
    for kind in KINDS {
        let fx = Fixture::new(kind, vec![config("echo", &[ECHO], 2)]);
        std::thread::scope(|scope| {
            for c in 0..64 {
                let mut s = fx.connect();
                scope.spawn(move || {
                    let mut buf = Vec::new();
                    for i in 0..50 {
                        let payload = format!("conn-{c}-req-{i}");
                        s.write_all(&request("/api/v1/echo", payload.as_bytes()))
                            .unwrap();
                        let (status, body, _) = read_response(&mut s, &mut buf);
                        assert_eq!(status, 200);
                        assert_eq!(body, payload.as_bytes());
                    }
                });
            }
        });
        let st = fx.pools[0].status();
        assert_eq!(st.stats.ok, 64 * 50);
        assert_eq!(st.queue_depth, 0);
    }
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    for kind in KINDS {
        // Slow enough that later requests are read while earlier ones still run.
        let fx = Fixture::new(
            kind,
            vec![config(
                "slow",
                &sh("while read l; do sleep 0.02; echo \"$l\"; done"),
                2,
            )],
        );
        let mut s = fx.connect();
        let mut all = Vec::new();
        for i in 0..6 {
            all.extend(request("/api/v1/slow", format!("p{i}").as_bytes()));
        }
        s.write_all(&all).unwrap();
        let mut buf = Vec::new();
        for i in 0..6 {
            let (status, body, _) = read_response(&mut s, &mut buf);
            assert_eq!((status, body), (200, format!("p{i}").into_bytes()));
        }
    }
}

#[test]
fn an_answer_larger_than_the_socket_buffer_reaches_a_slow_reader() {
    for kind in KINDS {
        let mut cfg = config("big", &[ECHO], 1);
        cfg.line_max = 16 * 1024 * 1024;
        let fx = Fixture::new(kind, vec![cfg]);
        let payload: Vec<u8> = (0..8 * 1024 * 1024)
            .map(|i| b'a' + (i % 26) as u8)
            .collect();
        let mut s = fx.connect();
        let writer = {
            let mut w = s.try_clone().unwrap();
            let req = request("/api/v1/big", &payload);
            std::thread::spawn(move || w.write_all(&req).unwrap())
        };
        // Not reading yet: the answer fills the socket buffers and the rest waits for room.
        std::thread::sleep(Duration::from_millis(500));
        // Meanwhile the gateway serves others.
        let mut other = fx.connect();
        let mut obuf = Vec::new();
        other.write_all(&request("/api/v1/big", b"small")).unwrap();
        assert_eq!(read_response(&mut other, &mut obuf).1, b"small");
        let mut buf = Vec::new();
        let (status, body, _) = read_response(&mut s, &mut buf);
        writer.join().unwrap();
        assert_eq!(status, 200);
        assert!(body == payload, "the 8 MiB answer arrived intact");
    }
}

/// The epoll leader hands its other connections to a standby thread while it runs a slow call;
/// the hyper server does the same with `block_in_place`.
#[test]
fn a_slow_function_does_not_hold_up_calls_to_a_fast_one() {
    for kind in KINDS {
        slow_does_not_hold_up_fast(kind);
    }
}

fn slow_does_not_hold_up_fast(kind: GatewayKind) {
    let fx = Fixture::new(
        kind,
        vec![
            config(
                "slow",
                &sh("while read l; do sleep 2; echo \"$l\"; done"),
                2,
            ),
            config("fast", &[ECHO], 1),
        ],
    );
    // Two slow calls run at once on the slow pool's idle workers, each on a polling thread;
    // two more wait in its queue without a thread.
    let mut slow: Vec<TcpStream> = (0..4).map(|_| fx.connect()).collect();
    for (i, s) in slow.iter_mut().enumerate() {
        s.write_all(&request("/api/v1/slow", format!("s{i}").as_bytes()))
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let mut fast = fx.connect();
    let mut buf = Vec::new();
    for i in 0..20 {
        let p = format!("f{i}");
        fast.write_all(&request("/api/v1/fast", p.as_bytes()))
            .unwrap();
        assert_eq!(read_response(&mut fast, &mut buf).1, p.as_bytes());
    }
    let fast_took = t.elapsed();
    assert!(
        fast_took < Duration::from_secs(1),
        "{kind:?}: fast calls waited for slow ones: {fast_took:?}"
    );
    for (i, s) in slow.iter_mut().enumerate() {
        let mut b = Vec::new();
        let (status, body, _) = read_response(s, &mut b);
        assert_eq!((status, body), (200, format!("s{i}").into_bytes()));
    }
}

#[test]
fn queued_calls_past_the_timeout_get_504_on_time() {
    for kind in KINDS {
        let mut cfg = config("hung", &sh("read l; sleep 100"), 1);
        cfg.timeout = Duration::from_millis(300);
        let fx = Fixture::new(kind, vec![cfg]);
        let mut conns: Vec<TcpStream> = (0..3).map(|_| fx.connect()).collect();
        let t = Instant::now();
        for s in &mut conns {
            s.write_all(&request("/api/v1/hung", b"x")).unwrap();
        }
        for s in &mut conns {
            let mut b = Vec::new();
            let (status, body, _) = read_response(s, &mut b);
            assert_eq!(status, 504, "{}", String::from_utf8_lossy(&body));
            assert!(String::from_utf8_lossy(&body).contains("\"timeout\""));
        }
        let took = t.elapsed();
        assert!(took < Duration::from_millis(1500), "{took:?}");
    }
}

#[test]
fn a_malformed_request_gets_400_and_the_connection_closes() {
    for kind in KINDS {
        let fx = Fixture::new(kind, vec![config("echo", &[ECHO], 1)]);
        let mut s = fx.connect();
        s.write_all(b"POST /api/v1/echo HTTP/1.1\r\nContent-Length: nope\r\n\r\n")
            .unwrap();
        let mut buf = Vec::new();
        let (status, body, close) = read_response(&mut s, &mut buf);
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
        assert!(close);
        let mut rest = Vec::new();
        assert_eq!(
            s.read_to_end(&mut rest).unwrap(),
            0,
            "closed after the answer"
        );
    }
}

#[test]
fn stop_closes_idle_connections_and_finishes_the_answer_in_flight() {
    for kind in KINDS {
        let mut fx = Fixture::new(
            kind,
            vec![config(
                "slow",
                &sh("while read l; do sleep 0.5; echo \"$l\"; done"),
                1,
            )],
        );
        let mut idle = fx.connect();
        let mut busy = fx.connect();
        // The idle connection has been served once, so it is known and waiting.
        let mut ibuf = Vec::new();
        idle.write_all(&request("/api/v1/slow", b"once")).unwrap();
        assert_eq!(read_response(&mut idle, &mut ibuf).1, b"once");
        busy.write_all(&request("/api/v1/slow", b"late")).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        fx.gateway.stop();
        let mut rest = Vec::new();
        assert_eq!(
            idle.read_to_end(&mut rest).unwrap(),
            0,
            "idle connection closed"
        );
        let mut buf = Vec::new();
        let (status, body, close) = read_response(&mut busy, &mut buf);
        assert_eq!((status, body.as_slice(), close), (200, &b"late"[..], true));
        assert!(
            TcpStream::connect(fx.gateway.local_addr()).is_err(),
            "no longer accepting"
        );
    }
}

/// A request of the status table and what it must get: method, path, extra headers, body,
/// status, error code.
type Case<'a> = (&'a str, &'a str, &'a [&'a str], &'a [u8], u16, &'a str);

#[test]
fn every_status_of_the_routing_table_and_metrics_on_one_keep_alive_connection() {
    for kind in KINDS {
        let mut tiny = config("tiny", &[ECHO], 1);
        tiny.line_max = 16;
        let dying = config("dying", &sh("read l; exit 3"), 1);
        let options = GatewayOptions {
            token: Some("s3cret".into()),
            ..GatewayOptions::default()
        };
        let fx =
            Fixture::with_options(kind, vec![config("echo", &[ECHO], 1), tiny, dying], options);
        let auth = "Authorization: Bearer s3cret";
        let cases: [Case<'_>; 9] = [
            // With a token set, the metrics need it too.
            ("GET", "/metrics", &[], b"", 401, "unauthorized"),
            ("GET", "/metrics", &[auth], b"", 200, ""),
            ("POST", "/api/v1/echo", &[auth], b"hello", 200, ""),
            ("POST", "/api/v1/echo", &[], b"x", 401, "unauthorized"),
            (
                "POST",
                "/api/v1/echo",
                &["Authorization: Bearer nope"],
                b"x",
                401,
                "unauthorized",
            ),
            ("POST", "/api/v1/nope", &[auth], b"x", 404, "unknown_pool"),
            ("POST", "/elsewhere", &[auth], b"x", 404, "not_found"),
            (
                "GET",
                "/api/v1/echo",
                &[auth],
                b"",
                405,
                "method_not_allowed",
            ),
            ("POST", "/api/v1/dying", &[auth], b"x", 503, "worker_error"),
        ];
        let mut s = fx.connect();
        let mut buf = Vec::new();
        for (method, path, headers, body, status, want) in cases {
            s.write_all(&request_with(method, path, headers, body))
                .unwrap();
            let (got, reply, close) = read_response(&mut s, &mut buf);
            let what = format!("{method} {path}: {}", String::from_utf8_lossy(&reply));
            assert_eq!(got, status, "{what}");
            assert!(!close, "{what}: the connection stays open");
            match (path, status) {
                ("/metrics", 200) => assert_eq!(reply, METRICS.as_bytes()),
                (_, 200) => assert_eq!(reply, body),
                _ => assert_eq!(code(&reply), want, "{what}"),
            }
        }
        // Past the pool's line limit: 413. The epoll server refuses it from the head alone and
        // closes the connection (the body it announced is never read); hyper reads the body
        // first and keeps the connection.
        let mut t = fx.connect();
        t.write_all(&request_with("POST", "/api/v1/tiny", &[auth], &[b'x'; 100]))
            .unwrap();
        let (status, reply, close) = read_response(&mut t, &mut Vec::new());
        assert_eq!(
            (status, code(&reply).as_str(), close),
            (413, "payload_too_large", kind == GatewayKind::Epoll)
        );
        // Past the body cap: refused from the head alone, and the connection closes (the body
        // it announced is never read).
        let head = format!(
            "POST /api/v1/echo HTTP/1.1\r\nHost: t\r\n{auth}\r\nContent-Length: {}\r\n\r\n",
            Limits::default().max_body + 1
        );
        s.write_all(head.as_bytes()).unwrap();
        let (status, reply, close) = read_response(&mut s, &mut buf);
        assert_eq!(
            (status, code(&reply).as_str(), close),
            (413, "payload_too_large", true)
        );
    }
}

#[test]
fn a_full_queue_gets_429() {
    for kind in KINDS {
        let mut cfg = config("one", &sh("while read l; do sleep 1; echo \"$l\"; done"), 1);
        cfg.queue = 0;
        let fx = Fixture::new(kind, vec![cfg]);
        // The only worker is busy with a call made beside the gateway; nothing may queue.
        let pool = fx.pools[0].clone();
        let beside = std::thread::spawn(move || pool.call(b"first"));
        wait_for("the call to run", Duration::from_secs(5), || {
            fx.pools[0].status().busy >= 1
        });
        let mut s = fx.connect();
        let mut buf = Vec::new();
        s.write_all(&request("/api/v1/one", b"second")).unwrap();
        let (status, body, _) = read_response(&mut s, &mut buf);
        assert_eq!((status, code(&body).as_str()), (429, "overloaded"));
        assert_eq!(beside.join().unwrap().unwrap(), b"first");
    }
}

#[test]
fn connections_past_the_cap_get_503_busy() {
    for kind in KINDS {
        let limits = Limits {
            max_connections: 16,
            max_connections_per_client: 16,
            ..Limits::default()
        };
        let options = GatewayOptions {
            limits: limits.clone(),
            ..GatewayOptions::default()
        };
        let fx = Fixture::with_options(kind, vec![config("echo", &[ECHO], 1)], options);
        let mut held: Vec<TcpStream> = (0..limits.max_connections).map(|_| fx.connect()).collect();
        // Accepted in order: the one past the cap comes after all the others are counted.
        let mut over = fx.connect();
        let mut buf = Vec::new();
        let (status, body, close) = read_response(&mut over, &mut buf);
        assert_eq!((status, code(&body).as_str(), close), (503, "busy", true));
        // The connections within the cap are served.
        let first = &mut held[0];
        first.write_all(&request("/api/v1/echo", b"in")).unwrap();
        assert_eq!(read_response(first, &mut Vec::new()).1, b"in");
    }
}

/// Sends `header` and `body` as `POST /peer` and reads the answer.
fn post_sealed(fx: &Fixture, header: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = fx.connect();
    let mut req = format!(
        "POST /peer HTTP/1.1\r\nHost: x\r\nX-Drop-Peer: {header}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    s.write_all(&req).unwrap();
    let mut buf = Vec::new();
    let (status, body, _) = read_response(&mut s, &mut buf);
    (status, body)
}

#[test]
fn the_peer_listener_takes_sealed_calls_once_and_nothing_else() {
    use drop_supervisor::cluster::peer::PeerKey;
    const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    const OTHER: &str = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=";
    for kind in KINDS {
        let key = PeerKey::derive(KEY).unwrap();
        // The listener's own key is a clone: the caller below is a different process in life,
        // here it is a second derivation (another sender id, the same keys).
        let options = GatewayOptions {
            peer_key: Some(PeerKey::derive(KEY).unwrap()),
            peer_self: Some("10.0.0.2:7947".into()),
            ..GatewayOptions::default()
        };
        let fx = Fixture::with_options(kind, vec![config("echo", &[ECHO], 1)], options);
        let me: std::net::SocketAddr = "10.0.0.2:7947".parse().unwrap();

        // A sealed call: 200 outside, the echo inside, readable only with the key.
        let req = key.seal(me, "POST", "/api/v1/echo", b"secret payload");
        assert!(!req.body.windows(6).any(|w| w == b"secret"));
        let (status, body) = post_sealed(&fx, &req.header, &req.body);
        assert_eq!(status, 200, "{kind:?}: {}", String::from_utf8_lossy(&body));
        assert!(
            !body.windows(6).any(|w| w == b"secret"),
            "the reply is sealed"
        );
        let reply = req.reply.open(&body).unwrap();
        assert_eq!(
            (reply.status, reply.body.as_slice()),
            (200, &b"secret payload"[..])
        );

        // Captured and played again: refused.
        let (status, body) = post_sealed(&fx, &req.header, &req.body);
        assert_eq!(
            (status, code(&body).as_str()),
            (401, "unauthorized_peer"),
            "{kind:?}"
        );

        // A flipped byte: refused (and the genuine request still goes through after it).
        let req = key.seal(me, "POST", "/api/v1/echo", b"x");
        let mut flipped = req.body.clone();
        flipped[3] ^= 0x20;
        let (status, body) = post_sealed(&fx, &req.header, &flipped);
        assert_eq!((status, code(&body).as_str()), (401, "unauthorized_peer"));
        assert_eq!(post_sealed(&fx, &req.header, &req.body).0, 200);

        // Another cluster key, another recipient, or no seal at all: refused.
        let other = PeerKey::derive(OTHER)
            .unwrap()
            .seal(me, "POST", "/api/v1/echo", b"x");
        assert_eq!(post_sealed(&fx, &other.header, &other.body).0, 401);
        let elsewhere = key.seal(
            "10.0.0.3:7947".parse().unwrap(),
            "POST",
            "/api/v1/echo",
            b"x",
        );
        assert_eq!(post_sealed(&fx, &elsewhere.header, &elsewhere.body).0, 401);
        let mut s = fx.connect();
        s.write_all(b"POST /api/v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
            .unwrap();
        let mut buf = Vec::new();
        let (status, body, _) = read_response(&mut s, &mut buf);
        assert_eq!((status, code(&body).as_str()), (401, "unauthorized_peer"));

        // Errors travel sealed too: an unknown pool is 404 inside a sealed 200.
        let req = key.seal(me, "POST", "/api/v1/nope", b"x");
        let (status, body) = post_sealed(&fx, &req.header, &req.body);
        assert_eq!(status, 200);
        let reply = req.reply.open(&body).unwrap();
        assert_eq!(
            (reply.status, code(&reply.body).as_str()),
            (404, "unknown_pool")
        );
    }
}

#[test]
fn the_status_page_and_its_state_ship_in_the_binary_and_honour_the_token() {
    for kind in KINDS {
        let options = GatewayOptions {
            token: Some("s3cret-token-0123".into()),
            ..GatewayOptions::default()
        };
        let fx = Fixture::with_options(kind, vec![config("echo", &[ECHO], 1)], options);
        let get = |path: &str, auth: Option<&str>| -> (u16, Vec<u8>, String) {
            let mut s = fx.connect();
            let auth = auth
                .map(|a| format!("Authorization: {a}\r\n"))
                .unwrap_or_default();
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
            )
            .unwrap();
            let mut raw = Vec::new();
            s.read_to_end(&mut raw).unwrap();
            let text = String::from_utf8_lossy(&raw).to_string();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
            (status, body.as_bytes().to_vec(), head.to_string())
        };
        // Without the token: 401, and a browser is asked for it.
        let (status, _, head) = get("/ui/", None);
        assert_eq!(status, 401, "{kind:?}");
        assert!(
            head.to_ascii_lowercase()
                .contains("www-authenticate: basic"),
            "{head}"
        );
        // The token as a bearer or as the basic-auth password (any user): the page.
        let basic = "Basic b3BlcmF0b3I6czNjcmV0LXRva2VuLTAxMjM="; // operator:s3cret-token-0123
        for auth in ["Bearer s3cret-token-0123", basic] {
            let (status, body, head) = get("/ui/", Some(auth));
            assert_eq!(status, 200, "{kind:?} {auth}");
            assert!(head.contains("text/html"), "{head}");
            assert!(body.starts_with(b"<!doctype html>"));
        }
        let (status, _, _) = get("/ui/", Some("Basic b3BlcmF0b3I6d3Jvbmc=")); // operator:wrong
        assert_eq!(status, 401);
        // The page fetches nothing but its state (no CDN, no other origin).
        let page = String::from_utf8_lossy(drop_supervisor::gateway::UI_PAGE).to_string();
        assert!(!page.contains("http://") && !page.contains("https://") && !page.contains("src="));
        // The state comes from the runtime (this fixture's lookup has none: 404); the real
        // daemon's is read in tests/privileged/ui.rs and vip.rs.
        let (status, _, _) = get("/ui/state", Some(basic));
        assert_eq!(status, 404);
    }
}
