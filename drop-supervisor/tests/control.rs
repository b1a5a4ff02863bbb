//! The control server's limits and errors, against a real `serve_with` on a Unix socket in a
//! temporary folder, with small limits so each is quick to hit; and the client's view of them.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drop_supervisor::config::Config;
use drop_supervisor::control::Supervisor;
use drop_supervisor::control::client::{Client, ClientError};
use drop_supervisor::control::server::{Limits, serve_with};
use drop_supervisor::runtime::{Runtime, RuntimeOptions};
use tokio::sync::watch;

const SMALL: Limits = Limits {
    max_head: 1024,
    max_body: 1024,
    max_connections: 4,
    request_timeout: Duration::from_secs(30),
};

/// A control server on its own tokio runtime; the test thread talks to it with blocking
/// sockets and the blocking client.
struct Server {
    dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    fn start(limits: Limits) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        // No `[tuning]` requests are sent: nothing here touches the host.
        let text = format!(
            "[node]\nname = \"c1\"\nstate_dir = \"{d}/state\"\n[control]\nsocket = \"{d}/drop.sock\"\n\
             [tuning]\nsysctl_root = \"{d}/sys\"\n[runtime]\ncgroups = false\n"
        );
        let config = Config::parse(&text, &dir.path().join("drop.toml")).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let socket = dir.path().join("drop.sock");
        let task = {
            // `Runtime::new` and the listener need to be made inside the runtime.
            let _inside = runtime.enter();
            let pools = Arc::new(Runtime::new(RuntimeOptions {
                state_dir: dir.path().join("state"),
                images_dir: dir.path().join("images"),
                logs_dir: dir.path().join("logs"),
                cgroups: None,
                worker_credentials: None,
                allow_root_workers: false,
                node_name: None,
            }));
            let supervisor = Arc::new(Supervisor::new(config, uuid::Uuid::new_v4(), pools, None));
            let listener = tokio::net::UnixListener::bind(&socket).unwrap();
            runtime.spawn(serve_with(listener, supervisor, stop_rx, limits))
        };
        Server {
            dir,
            runtime,
            stop,
            task: Some(task),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("drop.sock")
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(self.socket()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    /// Sends `bytes` on a fresh connection and reads until the server closes it.
    fn raw(&self, bytes: &[u8]) -> String {
        let mut s = self.connect();
        // The server may answer and close before all of a large request is written.
        let _ = s.write_all(bytes);
        read_until_closed(&mut s)
    }

    fn status_ok(&self) -> bool {
        Client::new(self.socket())
            .get::<serde_json::Value>("/v1/status")
            .is_ok_and(|v| v["name"] == "c1")
    }
}

/// Everything the peer sends until it closes. A reset after the answer counts as closed: the
/// server closes with a request it chose not to read still queued, which Linux reports so.
fn read_until_closed(s: &mut UnixStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !out.is_empty() => break,
            Err(e) => panic!("reading the answer: {e} (got {out:?})"),
        }
    }
    String::from_utf8(out).unwrap()
}

/// Status and error code of a single answer.
fn status_and_code(answer: &str) -> (u16, String) {
    let status = answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("body not JSON ({e}): {answer:?}"));
    let code = v["error"]["code"].as_str().unwrap_or_default().to_string();
    (status, code)
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn garbage_gets_a_400_and_the_server_keeps_serving() {
    // hyper answers a head it cannot parse itself, with an empty body.
    let server = Server::start(SMALL);
    let answer = server.raw(b"\x00\x01 nonsense\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    let answer = server.raw(b"GET /v1/status HTTP/1.1\r\nBad Header\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(server.status_ok());
}

#[test]
fn a_head_over_the_limit_gets_431() {
    let server = Server::start(SMALL);
    let big = format!(
        "GET /v1/status HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(SMALL.max_head)
    );
    let answer = server.raw(big.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");

    // A head within the limit is served.
    let fits = format!(
        "GET /v1/status HTTP/1.1\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(SMALL.max_head / 2)
    );
    assert!(server.raw(fits.as_bytes()).starts_with("HTTP/1.1 200 "));
}

#[test]
fn a_body_over_the_limit_gets_413_and_the_server_keeps_serving() {
    let server = Server::start(SMALL);
    // Announced too large: refused before a byte of it is read.
    let answer = server.raw(b"POST /v1/pools/p/call HTTP/1.1\r\nContent-Length: 1025\r\n\r\n");
    assert_eq!(status_and_code(&answer), (413, "payload_too_large".into()));
    assert!(answer.contains("connection: close"), "{answer}");

    // Sent in full anyway.
    let mut req = b"POST /v1/pools/p/call HTTP/1.1\r\nContent-Length: 5000\r\n\r\n".to_vec();
    req.extend(std::iter::repeat_n(b' ', 5000));
    let answer = server.raw(&req);
    assert_eq!(status_and_code(&answer), (413, "payload_too_large".into()));

    // Exactly the limit is read and decoded (the pool does not exist).
    let json = r#"{"payload":"x"}"#;
    let padded = format!("{json}{}", " ".repeat(SMALL.max_body - json.len()));
    let req = format!(
        "POST /v1/pools/p/call HTTP/1.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{padded}",
        padded.len()
    );
    assert_eq!(
        status_and_code(&server.raw(req.as_bytes())),
        (404, "unknown_pool".into())
    );

    // Chunked bodies are refused rather than framed a second way.
    let answer =
        server.raw(b"POST /v1/pools/p/call HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
    assert_eq!(status_and_code(&answer), (411, "length_required".into()));

    assert!(server.status_ok());
}

#[test]
fn a_connection_over_the_limit_gets_503_busy_until_one_closes() {
    let server = Server::start(Limits {
        max_connections: 2,
        ..SMALL
    });
    let first = server.connect();
    let _second = server.connect();
    let answer = server.raw(b"GET /v1/status HTTP/1.1\r\n\r\n");
    assert_eq!(status_and_code(&answer), (503, "busy".into()));
    assert!(answer.contains("more than 2"), "{answer}");

    // A closed connection gives its slot back.
    drop(first);
    wait_until("a free slot", || server.status_ok());
}

#[test]
fn a_request_that_never_completes_is_cut_after_the_timeout() {
    let timeout = Duration::from_millis(300);
    let server = Server::start(Limits {
        request_timeout: timeout,
        ..SMALL
    });
    let cases: [(&str, &[u8]); 3] = [
        ("nothing sent", b""),
        ("half a head", b"GET /v1/status HTTP/1.1\r\nHost: x"),
        (
            "half a body",
            b"POST /v1/pools/p/call HTTP/1.1\r\nContent-Length: 20\r\n\r\n{\"pay",
        ),
    ];
    for (what, bytes) in cases {
        let started = Instant::now();
        let answer = server.raw(bytes);
        let took = started.elapsed();
        // A head that does not arrive: hyper closes without a word; a body that does not: 408.
        if what == "half a body" {
            assert_eq!(status_and_code(&answer), (408, "timeout".into()), "{what}");
        } else {
            assert_eq!(answer, "", "{what}");
        }
        assert!(
            took >= timeout && took < timeout * 10,
            "{what}: answered after {took:?}"
        );
    }
    assert!(server.status_ok());
}

#[test]
fn keep_alive_answers_in_order_and_errors_keep_the_connection() {
    let server = Server::start(SMALL);
    let answer = server.raw(
        b"GET /v1/nope HTTP/1.1\r\n\r\nPOST /v1/status HTTP/1.1\r\nContent-Length: 0\r\n\r\nGET /v1/status HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    let statuses: Vec<&str> = answer.split("HTTP/1.1 ").skip(1).map(|r| &r[..3]).collect();
    assert_eq!(statuses, ["404", "405", "200"], "{answer}");

    // A malformed head after an answer on the same connection gets a 400.
    let answer = server.raw(b"GET /v1/status HTTP/1.1\r\n\r\n\x00garbage\r\n\r\n");
    let (first, second) = answer.split_at(answer.rfind("HTTP/1.1 ").unwrap());
    assert!(first.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(second.starts_with("HTTP/1.1 400 "), "{answer}");

    // HEAD answers carry no body, and the connection stays usable.
    let answer = server.raw(
        b"HEAD /v1/status HTTP/1.1\r\n\r\nGET /v1/status HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    let statuses: Vec<&str> = answer.split("HTTP/1.1 ").skip(1).map(|r| &r[..3]).collect();
    assert_eq!(statuses, ["405", "200"], "{answer}");
}

#[test]
fn a_client_that_expects_100_continue_gets_it_then_the_answer() {
    let server = Server::start(SMALL);
    let mut s = server.connect();
    s.write_all(
        b"POST /v1/pools/p/call HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 15\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(br#"{"payload":"x"}"#).unwrap();
    let answer = read_until_closed(&mut s);
    assert_eq!(status_and_code(&answer), (404, "unknown_pool".into()));
}

#[test]
fn the_client_maps_answers_and_failures() {
    let server = Server::start(SMALL);
    let client = Client::new(server.socket());
    let status: serde_json::Value = client.get("/v1/status").unwrap();
    assert_eq!(status["name"], "c1");

    match client.get::<serde_json::Value>("/v1/nope") {
        Err(ClientError::Api(e)) => assert_eq!((e.status, e.code.as_str()), (404, "not_found")),
        other => panic!("{other:?}"),
    }
    match client.delete::<serde_json::Value>("/v1/status") {
        Err(ClientError::Api(e)) => {
            assert_eq!((e.status, e.code.as_str()), (405, "method_not_allowed"))
        }
        other => panic!("{other:?}"),
    }
    let big = serde_json::json!({ "payload": "x".repeat(2000) });
    match client.post::<serde_json::Value>("/v1/pools/p/call", &big) {
        Err(ClientError::Api(e)) => {
            assert_eq!((e.status, e.code.as_str()), (413, "payload_too_large"))
        }
        other => panic!("{other:?}"),
    }

    let gone = Client::new(server.dir.path().join("nothing.sock"));
    assert!(matches!(
        gone.get::<serde_json::Value>("/v1/status"),
        Err(ClientError::Unreachable { .. })
    ));
}

#[test]
fn shutdown_stops_accepting_and_lets_a_request_in_progress_finish() {
    let mut server = Server::start(SMALL);
    let mut idle = server.connect();
    let mut busy = server.connect();
    // The 100 Continue says the server is reading this request's body: it is in progress.
    busy.write_all(
        b"POST /v1/pools/p/call HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 15\r\n\r\n",
    )
    .unwrap();
    let mut buf = [0u8; 64];
    let n = busy.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"HTTP/1.1 100 Continue\r\n\r\n");
    busy.write_all(b"{\"payl").unwrap();

    server.stop.send(true).unwrap();
    let task = server.task.take().unwrap();
    server.runtime.block_on(task).unwrap();
    assert_eq!(
        read_until_closed(&mut idle),
        "",
        "an idle connection is closed"
    );

    busy.write_all(b"oad\":\"x\"}").unwrap();
    let answer = read_until_closed(&mut busy);
    assert_eq!(status_and_code(&answer), (404, "unknown_pool".into()));

    // Nobody listens any more (the socket file stays; the daemon removes it).
    assert!(UnixStream::connect(server.socket()).is_err());
}
