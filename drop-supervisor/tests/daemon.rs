//! The daemon and dropctl as processes, unprivileged: config, identity, the control socket and
//! its errors, tuning against a temporary sysctl tree, clean shutdown.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use drop_supervisor::host::tune::{Profile, key_path};

const DAEMON: &str = env!("CARGO_BIN_EXE_drop-supervisor");
const DROPCTL: &str = env!("CARGO_BIN_EXE_dropctl");

struct Node {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// The log of the daemon that `stop` ended.
    last_stderr: Option<std::process::ChildStderr>,
}

impl Node {
    /// A config in a fresh temporary folder, with a sysctl tree holding every profile key at 0.
    fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        for e in Profile::builtin().entries {
            let p = key_path(&dir.path().join("sys"), &e.key);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "0\n").unwrap();
        }
        let config = format!(
            "[node]\nname = \"t1\"\nstate_dir = \"{0}/state\"\n[control]\nsocket = \"{0}/run/drop.sock\"\n\
             [tuning]\nsysctl_root = \"{0}/sys\"\n[runtime]\ncgroups = false\n[gateway]\nlisten = \"127.0.0.1:0\"\n\
             [plugins]\ndir = \"{0}/plugins\"\n",
            dir.path().display()
        );
        std::fs::write(dir.path().join("drop.toml"), config).unwrap();
        Node {
            dir,
            child: None,
            last_stderr: None,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    fn socket(&self) -> PathBuf {
        self.path("run/drop.sock")
    }

    fn spawn(&self) -> Child {
        Command::new(DAEMON)
            .arg("--config")
            .arg(self.path("drop.toml"))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn start(&mut self) -> u32 {
        let child = self.spawn();
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(self.socket()).is_err() {
            assert!(
                Instant::now() < deadline,
                "daemon did not listen within 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        pid
    }

    fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = child.wait().unwrap();
        self.last_stderr = child.stderr.take();
        status
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(DROPCTL)
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .unwrap()
    }

    fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend(args);
        let out = self.ctl(&all);
        assert!(
            out.status.code() == Some(0) || out.status.code() == Some(4),
            "{out:?}"
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Node {
    /// `pool show` of `pool` once it is `failed` (or after 10 s, for the caller to assert on).
    fn pool_when_failed(&self, pool: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let show = self.ctl_json(&["pool", "show", pool]);
            if show["phase"]["state"] == "failed" || Instant::now() > deadline {
                return show;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends raw bytes on a fresh connection and reads until the daemon closes it.
fn raw(socket: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn status_answers_and_identity_survives_restart() {
    let mut node = Node::new();
    let pid = node.start();
    let mode = std::fs::metadata(node.socket())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660);
    let s = node.ctl_json(&["status"]);
    assert_eq!(s["pid"], pid);
    assert_eq!(s["name"], "t1");
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["config_path"], node.path("drop.toml").to_str().unwrap());
    let id = s["node_id"].as_str().unwrap().to_string();
    assert_eq!(
        std::fs::read_to_string(node.path("state/node-id"))
            .unwrap()
            .trim(),
        id
    );
    let human = node.ctl(&["status"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains(&id));

    assert!(node.stop().success());
    assert!(!node.socket().exists(), "socket removed on SIGTERM");
    node.start();
    assert_eq!(
        node.ctl_json(&["status"])["node_id"],
        id.as_str(),
        "identity is persisted"
    );
}

#[test]
fn tune_check_apply_and_exit_codes() {
    let mut node = Node::new();
    node.start();
    let out = node.ctl(&["tune", "check"]);
    assert_eq!(out.status.code(), Some(4), "drift exits 4: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("27 keys"),
        "{out:?}"
    );

    // A capacity key that the host already set higher must stay.
    std::fs::write(key_path(&node.path("sys"), "fs.file-max"), "5000000\n").unwrap();
    let applied = node.ctl_json(&["tune", "apply"]);
    let keys = applied["keys"].as_array().unwrap();
    assert_eq!(
        keys.iter().filter(|k| k["outcome"] == "changed").count(),
        26
    );
    let file_max = keys.iter().find(|k| k["key"] == "fs.file-max").unwrap();
    assert_eq!(file_max["outcome"], "unchanged");
    assert_eq!(
        std::fs::read_to_string(key_path(&node.path("sys"), "fs.file-max")).unwrap(),
        "5000000\n"
    );
    assert_eq!(
        std::fs::read_to_string(key_path(&node.path("sys"), "net.ipv4.tcp_rmem")).unwrap(),
        "4096 8388608 16777216\n"
    );

    let out = node.ctl(&["tune", "check"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let check = node.ctl_json(&["tune", "check", "--only", "vm.swappiness,fs.file-max"]);
    let keys = check["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert!(keys.iter().all(|k| k["state"] == "ok"), "{check}");

    let out = node.ctl(&["tune", "apply", "--only", "vm.nonsense"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("vm.nonsense"),
        "{out:?}"
    );
}

#[test]
fn malformed_requests_get_distinct_json_errors() {
    let mut node = Node::new();
    node.start();
    let sock = node.socket();

    let garbage = raw(&sock, b"\x00\x01 nonsense\r\n\r\n");
    assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");

    let too_big = raw(
        &sock,
        b"POST /v1/tune/apply HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n",
    );
    assert!(
        too_big.starts_with("HTTP/1.1 413 ") && too_big.contains("payload_too_large"),
        "{too_big}"
    );

    let chunked = raw(
        &sock,
        b"POST /v1/tune/apply HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    assert!(chunked.starts_with("HTTP/1.1 411 "), "{chunked}");

    let bad_json = raw(
        &sock,
        b"POST /v1/tune/apply HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\n{oops",
    );
    assert!(
        bad_json.starts_with("HTTP/1.1 400 ") && bad_json.contains("invalid_body"),
        "{bad_json}"
    );

    // Unknown path and wrong method are answered on a connection that stays usable.
    let both = raw(
        &sock,
        b"GET /v1/nope HTTP/1.1\r\n\r\nDELETE /v1/status HTTP/1.1\r\n\r\nGET /v1/status HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    // Bodies carry no trailing newline, so status lines are found by their prefix.
    let statuses: Vec<&str> = both
        .split("HTTP/1.1 ")
        .skip(1)
        .map(|r| r.split("\r\n").next().unwrap_or_default())
        .collect();
    assert_eq!(
        statuses,
        ["404 Not Found", "405 Method Not Allowed", "200 OK"],
        "{both}"
    );
    assert!(
        both.contains(r#""code":"not_found""#) && both.contains(r#""code":"method_not_allowed""#)
    );

    // The daemon is still healthy afterwards.
    assert_eq!(node.ctl(&["status"]).status.code(), Some(0));
}

#[test]
fn dropctl_without_a_daemon_names_the_socket_and_exits_3() {
    let node = Node::new();
    let out = node.ctl(&["status"]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(node.socket().to_str().unwrap()), "{err}");
    // DROP_SOCKET is used when --socket is absent.
    let out = Command::new(DROPCTL)
        .arg("status")
        .env("DROP_SOCKET", node.socket())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains(node.socket().to_str().unwrap()));
}

#[test]
fn stale_socket_is_replaced_and_a_second_daemon_is_refused() {
    let mut node = Node::new();
    std::fs::create_dir_all(node.path("run")).unwrap();
    drop(std::os::unix::net::UnixListener::bind(node.socket()).unwrap()); // leaves a dead socket file
    node.start();
    assert_eq!(node.ctl(&["status"]).status.code(), Some(0));

    let second = node.spawn().wait_with_output().unwrap();
    assert_eq!(second.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already listening"),
        "{second:?}"
    );
    assert_eq!(
        node.ctl(&["status"]).status.code(),
        Some(0),
        "the first daemon keeps its socket"
    );
}

#[test]
fn bad_config_names_file_key_line_and_column() {
    let node = Node::new();
    std::fs::write(
        node.path("drop.toml"),
        "[node]\nname = \"x\"\nsocket = \"/x\"\n",
    )
    .unwrap();
    let out = node.spawn().wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("drop.toml") && err.contains("socket") && err.contains("line 3, column 1"),
        "{err}"
    );
}

const ECHO: &str = env!("CARGO_BIN_EXE_drop-echo-worker");

/// POSTs `body` to the gateway at `addr` and returns (status, body).
fn gateway_post(addr: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let r = drop_supervisor::http::roundtrip(&mut s, "POST", path, Some(body)).unwrap();
    (r.status, r.body)
}

#[test]
fn original_style_flow_answers_through_gateway_and_dropctl_and_survives_a_restart() {
    let mut node = Node::new();
    node.start();
    let flow = node.path("echo.yaml");
    std::fs::write(
        &flow,
        format!("name: echo\npriority: 0\nfunc:\n  - name: echo\n    cmd: {ECHO}\n    num: 2\n    memory: 100\n    timeout: 10000\n"),
    )
    .unwrap();
    let out = node.ctl(&["flow", "apply", flow.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("started   echo"),
        "{out:?}"
    );

    let gw = node.ctl_json(&["status"])["gateway"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, body) = gateway_post(&gw, "/api/v1/echo", "héllo\nwörld".as_bytes());
    assert_eq!((status, body.as_slice()), (200, "héllo\nwörld".as_bytes()));
    let (status, body) = gateway_post(&gw, "/api/v1/nope", b"x");
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("unknown_pool"));
    let (status, _) = gateway_post(&gw, "/api/v1/echo", &vec![b'a'; 70_000]);
    assert_eq!(status, 413);

    let out = node.ctl(&["call", "echo", "ping"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ping\n", "{out:?}");
    let pools = node.ctl_json(&["pool", "ls"]);
    assert_eq!(pools[0]["name"], "echo");
    assert_eq!(pools[0]["workers"], 2);
    assert_eq!(pools[0]["stats"]["ok"], 2);

    // The flow is persisted: after a restart the pool comes back by itself.
    assert!(node.stop().success());
    node.start();
    let gw = node.ctl_json(&["status"])["gateway"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, body) = gateway_post(&gw, "/api/v1/echo", b"after restart");
    assert_eq!((status, body.as_slice()), (200, &b"after restart"[..]));
    assert_eq!(node.ctl_json(&["flow", "ls"])[0]["name"], "echo");

    let out = node.ctl(&["flow", "rm", "echo"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(gateway_post(&gw, "/api/v1/echo", b"x").0, 404);
    assert!(!node.path("state/flows/echo.yaml").exists());
}

#[test]
fn a_malformed_flow_is_refused_with_file_line_and_column() {
    let mut node = Node::new();
    node.start();
    let flow = node.path("bad.yaml");
    std::fs::write(
        &flow,
        format!("name: bad\nfunc:\n  - name: p\n    cmd: {ECHO}\n    nmu: 2\n"),
    )
    .unwrap();
    let out = node.ctl(&["flow", "apply", flow.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml:5:5") && err.contains("func[0].nmu") && err.contains("invalid_flow"),
        "{err}"
    );
    assert!(
        node.ctl_json(&["flow", "ls"])
            .as_array()
            .unwrap()
            .is_empty(),
        "nothing applied"
    );
    let out = node.ctl(&["flow", "show", "bad"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn dropctl_generates_completions_and_its_man_page_without_a_daemon() {
    let out = Command::new(DROPCTL)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(
        script.contains("_dropctl") && script.contains("flow") && script.contains("tune"),
        "{script}"
    );
    let out = Command::new(DROPCTL).arg("man").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let man = String::from_utf8_lossy(&out.stdout);
    assert!(
        man.contains(".TH dropctl 1") && man.contains("Exit codes"),
        "{man}"
    );
}

/// One request on a fresh connection: (status, lower-cased headers, body).
fn http_exchange(
    addr: &str,
    method: &str,
    target: &str,
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: t\r\nX-Request-Id: r-1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    s.write_all(&req).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, out[split + 4..].to_vec())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn an_envelope_pool_answers_any_method_with_what_its_function_sets() {
    // The example function, written as original DROP L7 functions were (Python, one JSON
    // envelope in, one JSON answer out).
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/images/users:0.1.0/users.py");
    let mut node = Node::new();
    node.start();
    let flow = node.path("users.yaml");
    std::fs::write(
        &flow,
        format!(
            "name: users\nfunc:\n  - name: users\n    cmd: /usr/bin/python3 {}\n    num: 1\n    envelope: true\n  - name: echo\n    cmd: {ECHO}\n",
            script.display()
        ),
    )
    .unwrap();
    let out = node.ctl(&["flow", "apply", flow.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let gw = node.ctl_json(&["status"])["gateway"]
        .as_str()
        .unwrap()
        .to_string();

    let (status, headers, body) =
        http_exchange(&gw, "PUT", "/api/v1/users/ann", br#"{"name": "Ann"}"#);
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    assert_eq!(header(&headers, "location"), Some("/api/v1/users/ann"));
    let (status, headers, body) = http_exchange(&gw, "GET", "/api/v1/users/ann", b"");
    assert_eq!(
        (status, header(&headers, "content-type")),
        (200, Some("application/json"))
    );
    assert_eq!(body, br#"{"name":"Ann"}"#);
    // Query keys arrive lower-cased.
    let (status, _, body) = http_exchange(&gw, "GET", "/api/v1/users?Prefix=a", b"");
    assert_eq!((status, body.as_slice()), (200, &br#"["ann"]"#[..]));
    let (status, _, body) = http_exchange(&gw, "GET", "/api/v1/users/bob", b"");
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    let (status, headers, _) = http_exchange(&gw, "POST", "/api/v1/users", b"{}");
    assert_eq!(
        (status, header(&headers, "allow")),
        (405, Some("GET, POST, PUT, DELETE"))
    );
    let (status, _, body) = http_exchange(&gw, "DELETE", "/api/v1/users/ann", b"");
    assert_eq!((status, body.len()), (204, 0));
    // A reply that is no envelope passes through as 200; an impossible status is a 502.
    let (status, _, body) = http_exchange(&gw, "OPTIONS", "/api/v1/users", b"");
    assert_eq!(
        (status, body.as_slice()),
        (200, &b"GET, POST, PUT, DELETE"[..])
    );
    let (status, _, body) = http_exchange(&gw, "PATCH", "/api/v1/users/ann", b"");
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, 502, "{text}");
    assert!(
        text.contains("bad_envelope_reply") && text.contains("x_res_code 99"),
        "{text}"
    );

    // A plain pool keeps the plain rules: POST only, no sub-paths.
    let (status, _, _) = http_exchange(&gw, "GET", "/api/v1/echo", b"");
    assert_eq!(status, 405);
    let (status, _, _) = http_exchange(&gw, "POST", "/api/v1/echo/more", b"x");
    assert_eq!(status, 404);
    let (status, _, body) = http_exchange(&gw, "POST", "/api/v1/echo", b"plain");
    assert_eq!((status, body.as_slice()), (200, &b"plain"[..]));
}

#[test]
fn images_arrive_as_bytes_within_quotas_and_changes_are_logged_with_the_caller() {
    let mut node = Node::new();
    // Small limits: 1 MiB per import, 2 MiB in all.
    let config = std::fs::read_to_string(node.path("drop.toml")).unwrap();
    let config = config.replace(
        "[runtime]\ncgroups = false\n",
        "[runtime]\ncgroups = false\nimage_max_mb = 1\nimages_quota_mb = 2\n",
    );
    std::fs::write(node.path("drop.toml"), config).unwrap();
    node.start();

    // A folder and a tarball, read by dropctl (the caller), sent as bytes.
    let bundle = node.path("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(bundle.join("run.sh"), "echo hi\n").unwrap();
    let out = node.ctl(&["image", "import", "dir:1", bundle.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let tgz = node.path("b.tgz");
    let st = Command::new("tar")
        .args([
            "-C",
            bundle.to_str().unwrap(),
            "-czf",
            tgz.to_str().unwrap(),
            ".",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let out = node.ctl(&["image", "import", "tgz:1", tgz.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let images = node.ctl_json(&["image", "ls"]);
    let names: Vec<&str> = images
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["dir:1", "tgz:1"]);
    assert_eq!(
        std::fs::read_to_string(node.path("state/images/tgz:1/run.sh")).unwrap(),
        "echo hi\n"
    );

    // A source the caller cannot name to the daemon: the old path API is gone.
    let body = r#"{"name":"x:1","source":"/etc","replace":true}"#;
    let gone = raw(
        &node.socket(),
        format!(
            "POST /v1/images HTTP/1.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    assert!(gone.starts_with("HTTP/1.1 410 "), "{gone}");

    // Over the per-import limit: refused before it is stored, nothing left behind.
    let big = node.path("big");
    std::fs::create_dir_all(&big).unwrap();
    std::fs::write(big.join("blob"), vec![7u8; 1_200_000]).unwrap();
    let out = node.ctl(&["image", "import", "big:1", big.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("image_max_mb"),
        "{out:?}"
    );
    // Within the per-import limit but past the quota once a few are installed.
    std::fs::write(big.join("blob"), vec![7u8; 900_000]).unwrap();
    for i in 1..=2 {
        let out = node.ctl(&[
            "image",
            "import",
            &format!("mid:{i}"),
            big.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(0), "import {i}: {out:?}");
    }
    let out = node.ctl(&["image", "import", "mid:3", big.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("images_quota_mb"),
        "{out:?}"
    );
    let leftovers: Vec<String> = std::fs::read_dir(node.path("state/images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Every change is in the log with the caller's uid and pid.
    assert!(node.stop().success());
    let mut log = String::new();
    node.last_stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    let uid = nix::unistd::getuid().as_raw();
    let changes: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("control change"))
        .collect();
    assert!(
        changes.iter().any(|l| l.contains("PUT")
            && l.contains("/v1/images/dir:1")
            && l.contains(&format!("uid={uid}"))
            && l.contains("pid=")
            && l.contains("status=200")),
        "{log}"
    );
    assert!(
        changes
            .iter()
            .any(|l| l.contains("/v1/images/big:1") && l.contains("status=413")),
        "{log}"
    );
}

#[test]
fn a_missing_program_is_named_with_the_path_and_applying_again_retries_the_failed_pool() {
    use std::os::unix::fs::PermissionsExt as _;
    let mut node = Node::new();
    node.start();
    // The pool's PATH is a folder the test controls (readable by the worker user).
    let bin = node.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for dir in [node.path(""), bin.clone()] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let flow = node.path("tool.yaml");
    std::fs::write(
        &flow,
        format!(
            "name: tool\nfunc:\n  - name: tool\n    cmd: drop-test-tool\n    env:\n      PATH: {}\n    \
             restart: {{backoff_initial_ms: 10, backoff_max_ms: 20, intensity: 2, period_ms: 60000}}\n",
            bin.display()
        ),
    )
    .unwrap();
    let out = node.ctl(&["flow", "apply", flow.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let show = node.pool_when_failed("tool");
    let reason = show["phase"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(show["phase"]["state"], "failed", "{show}");
    assert!(
        reason.contains("`drop-test-tool` was not found in the worker's PATH")
            && reason.contains(&bin.display().to_string()),
        "{reason}"
    );

    // Install the program, apply the same flow again: the failed pool is retried and says so.
    let tool = bin.join("drop-test-tool");
    std::fs::write(
        &tool,
        "#!/bin/sh\nwhile read l; do echo \"tool: $l\"; done\n",
    )
    .unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = node.ctl(&["flow", "apply", flow.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("retried   tool (had failed; started again)"),
        "{out:?}"
    );
    let out = node.ctl(&["call", "tool", "hi"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "tool: hi\n",
        "{out:?}"
    );
}

#[test]
fn a_worker_dying_before_its_first_reply_shows_its_stderr_and_pool_restart_retries() {
    let mut node = Node::new();
    node.start();
    let flow = node.path("dies.yaml");
    std::fs::write(
        &flow,
        "name: dies\nfunc:\n  - name: dies\n    cmd: [/bin/sh, -c, 'echo \"cannot open /etc/dies.conf\" >&2; exit 3']\n    \
         restart: {backoff_initial_ms: 10, backoff_max_ms: 20, intensity: 2, period_ms: 60000}\n",
    )
    .unwrap();
    let out = node.ctl(&["flow", "apply", flow.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let show = node.pool_when_failed("dies");
    assert_eq!(show["phase"]["state"], "failed", "{show}");
    let tail = show["stderr_tail"].to_string();
    assert!(tail.contains("cannot open /etc/dies.conf"), "{show}");
    // Without --json, sections a person reads.
    let out = node.ctl(&["pool", "show", "dies"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "pool       dies",
        "state      failed:",
        "stderr",
        "  cannot open /etc/dies.conf",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
    let out = node.ctl(&["flow", "show", "dies"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("flow       dies") && text.contains("POOL") && text.contains("/bin/sh -c"),
        "{text}"
    );

    // `pool restart` starts even a failed pool again (it fails again here, on purpose).
    let out = node.ctl(&["pool", "restart", "dies"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("pool dies restarted: running"),
        "{out:?}"
    );
    let out = node.ctl(&["pool", "restart", "nope"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nope"),
        "{out:?}"
    );
}

#[test]
fn events_record_restarts_and_failures_and_follow_prints_new_ones_as_they_happen() {
    let mut node = Node::new();
    node.start();
    // A follower started before anything fails: it must print the failure when it happens.
    let mut follower = Command::new(DROPCTL)
        .arg("--socket")
        .arg(node.socket())
        .args(["events", "-f", "-n", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Its first line is the newest event so far, the daemon's start; then it waits.
    let first = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the follower's first line");
    assert!(first.contains("ready"), "{first}");
    let flow = node.path("dies.yaml");
    std::fs::write(
        &flow,
        "name: dies\nfunc:\n  - name: dies\n    cmd: [/bin/sh, -c, 'exit 3']\n    \
         restart: {backoff_initial_ms: 10, backoff_max_ms: 20, intensity: 2, period_ms: 60000}\n",
    )
    .unwrap();
    let out = node.ctl(&["flow", "apply", flow.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let show = node.pool_when_failed("dies");
    assert_eq!(show["phase"]["state"], "failed", "{show}");

    let out = node.ctl(&["events", "-n", "100"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].contains(" t1 ") && lines[0].contains("daemon") && lines[0].contains("ready"),
        "the log starts with the daemon's start:\n{text}"
    );
    let restarts = lines
        .iter()
        .filter(|l| l.contains(" restart ") && l.contains(" dies ") && l.contains("exit"))
        .count();
    assert!(
        restarts >= 2,
        "two restarts before the pool failed:\n{text}"
    );
    let failure = lines
        .iter()
        .position(|l| l.contains(" failure ") && l.contains("pool failed: more than 2 restarts"))
        .unwrap_or_else(|| panic!("no failure event:\n{text}"));
    assert_eq!(
        failure,
        lines.len() - 1,
        "the failure is the newest:\n{text}"
    );
    // -n takes the newest.
    let out = node.ctl(&["events", "-n", "1"]);
    let last = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(last.lines().count(), 1, "{last}");
    assert!(last.contains("pool failed"), "{last}");

    // The follower printed the failure without being asked again (it long-polls).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = vec![first];
    while !seen.iter().any(|l: &String| l.contains("pool failed")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("the follower printed no failure within 5 s: {seen:?}"),
        }
    }
    follower.kill().unwrap();
    follower.wait().unwrap();

    // Asking for what the log cannot give is a clear 400.
    let out = node.ctl(&["events", "-n", "0"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = node.ctl(&["events", "--cluster"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not_clustered")
            || String::from_utf8_lossy(&out.stderr).contains("runs alone"),
        "{out:?}"
    );
    node.stop();
}

/// One keep-alive request; whether the gateway said it closes the connection after it.
fn gateway_closes_after(addr: &str, path: &str, body: &[u8]) -> (u16, bool) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    s.write_all(&req).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let split = loop {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed before a head");
        out.extend_from_slice(&buf[..n]);
        if let Some(p) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
    };
    let head = String::from_utf8_lossy(&out[..split]).to_ascii_lowercase();
    let status = head[9..12].parse().unwrap();
    (status, head.contains("\r\nconnection: close"))
}

#[test]
fn drain_waits_for_calls_in_flight_closes_connections_survives_a_restart_and_undrains() {
    let mut node = Node::new();
    node.start();
    let flow = node.path("slow.yaml");
    std::fs::write(
        &flow,
        "name: slow\nfunc:\n  - name: slow\n    cmd: [/bin/sh, -c, 'while read l; do sleep 1.5; echo \"$l\"; done']\n    num: 2\n",
    )
    .unwrap();
    let out = node.ctl(&["flow", "apply", flow.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let gw = node.ctl_json(&["status"])["gateway"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        gateway_closes_after(&gw, "/api/v1/slow", b"warm"),
        (200, false),
        "not draining: keep-alive is kept"
    );

    // A call in flight when the drain begins finishes, and the drain waits for it.
    let gw2 = gw.clone();
    let call = std::thread::spawn(move || gateway_post(&gw2, "/api/v1/slow", b"in flight"));
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let out = node.ctl(&["node", "drain", "--wait", "10"]);
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        text.contains("t1 is draining; waiting for 1 calls in flight"),
        "{text}"
    );
    assert!(text.trim_end().ends_with("t1 is drained"), "{text}");
    assert!(
        took >= Duration::from_millis(800),
        "drained after {took:?}, before the call ended"
    );
    let (status, body) = call.join().unwrap();
    assert_eq!((status, body.as_slice()), (200, &b"in flight"[..]));

    // A single node has nobody to hand calls to: it answers them, and closes each connection.
    assert_eq!(gateway_closes_after(&gw, "/api/v1/slow", b"x"), (200, true));
    // The metrics say so too.
    let (status, _, body) = http_exchange(&gw, "GET", "/metrics", b"");
    let text = String::from_utf8_lossy(&body).to_string();
    assert_eq!(status, 200);
    assert!(text.contains("\ndrop_node_draining 1\n"), "{text}");
    assert!(
        text.contains("drop_events_total{kind=\"drain\"} 1\n"),
        "{text}"
    );
    let v = node.ctl_json(&["node", "drain-status"]);
    assert_eq!(
        (v["draining"].clone(), v["drained"].clone()),
        (true.into(), true.into()),
        "{v}"
    );

    // Kept across a restart.
    assert!(node.stop().success());
    node.start();
    let v = node.ctl_json(&["node", "drain-status"]);
    assert_eq!(v["draining"], true, "{v}");
    let events = String::from_utf8_lossy(&node.ctl(&["events"]).stdout).to_string();
    assert!(
        events.contains("still draining after a restart"),
        "{events}"
    );
    let gw = node.ctl_json(&["status"])["gateway"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(gateway_closes_after(&gw, "/api/v1/slow", b"y"), (200, true));

    let out = node.ctl(&["node", "undrain"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(node.ctl_json(&["node", "drain-status"])["draining"], false);
    assert_eq!(
        gateway_closes_after(&gw, "/api/v1/slow", b"z"),
        (200, false)
    );
    assert!(!node.path("state/draining").exists());
    let events = String::from_utf8_lossy(&node.ctl(&["events"]).stdout).to_string();
    assert!(
        events.contains("drain") && events.contains("undrained"),
        "{events}"
    );
    node.stop();
}

/// Writes `text` to `path` (and its folders) with `mode`.
fn write_mode(path: &Path, text: &str, mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Makes the node's folder and `dirs` under it readable by the worker user (as root, workers
/// run as an unprivileged user).
fn open_to_workers(node: &Node, dirs: &[&str]) {
    std::fs::set_permissions(node.path(""), std::fs::Permissions::from_mode(0o755)).unwrap();
    for d in dirs {
        std::fs::create_dir_all(node.path(d)).unwrap();
        std::fs::set_permissions(node.path(d), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// `dropctl plugin reload --json`: (exit code, answer).
fn plugin_reload(node: &Node) -> (Option<i32>, serde_json::Value) {
    let out = node.ctl(&["--json", "plugin", "reload"]);
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{out:?}"));
    (out.status.code(), v)
}

fn plugin<'a>(list: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no plugin {name} in {list}"))
}

#[test]
fn plugins_apply_at_start_and_on_reload_and_never_shadow_an_operators_flow() {
    let mut node = Node::new();
    open_to_workers(&node, &["plugins"]);
    // A plugin as a package installs it: a flow whose program is the plugin's own file.
    write_mode(
        &node.path("plugins/replier/flow.yaml"),
        "name: replier\nfunc:\n  - name: replier_pool\n    cmd: ./reply --prefix\n",
        0o644,
    );
    write_mode(
        &node.path("plugins/replier/reply"),
        "#!/bin/sh\nwhile read -r l; do echo \"$1 plugin: $l\"; done\n",
        0o755,
    );
    std::fs::set_permissions(
        node.path("plugins/replier"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    node.start();

    // Applied at start: its pool answers, from the plugin's folder.
    let out = node.ctl(&["call", "replier_pool", "hi"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "--prefix plugin: hi\n",
        "{out:?}"
    );
    let ls = node.ctl_json(&["plugin", "ls"]);
    let p = plugin(&ls, "replier");
    assert_eq!(
        (&p["state"], &p["flow"], &p["pools"]),
        (
            &serde_json::json!("applied"),
            &serde_json::json!("replier"),
            &serde_json::json!(["replier_pool"])
        ),
        "{ls}"
    );
    assert_eq!(p["dir"], node.path("plugins/replier").to_str().unwrap());
    let human = String::from_utf8_lossy(&node.ctl(&["plugin", "ls"]).stdout).to_string();
    assert!(
        human.contains("PLUGIN") && human.contains("replier_pool") && human.contains("applied"),
        "{human}"
    );
    let flows = node.ctl_json(&["flow", "ls"]);
    assert_eq!(flows[0]["plugin"], "replier", "{flows}");
    assert!(
        !node.path("state/flows/replier.yaml").exists(),
        "a plugin's flow is not persisted as the operator's"
    );

    // The operator can neither replace nor remove it: a distinct error that says what to do.
    let mine = node.path("replier.yaml");
    std::fs::write(
        &mine,
        format!("name: replier\nfunc:\n  - name: mine\n    cmd: {ECHO}\n"),
    )
    .unwrap();
    for args in [
        vec!["flow", "apply", mine.to_str().unwrap()],
        vec!["flow", "rm", "replier"],
    ] {
        let out = node.ctl(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            err.contains("plugin_flow")
                && err.contains("plugin replier")
                && err.contains("remove the plugin's package"),
            "{err}"
        );
    }
    assert_eq!(
        String::from_utf8_lossy(&node.ctl(&["call", "replier_pool", "still"]).stdout),
        "--prefix plugin: still\n"
    );

    // An operator's flow, then a second plugin of that flow name and a third one: the
    // second conflicts (the operator's flow runs on), the third is applied, the first left alone.
    let echo = node.path("echo.yaml");
    std::fs::write(
        &echo,
        format!("name: echo\nfunc:\n  - name: echo\n    cmd: {ECHO}\n"),
    )
    .unwrap();
    assert_eq!(
        node.ctl(&["flow", "apply", echo.to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );
    write_mode(
        &node.path("plugins/shadow/flow.yaml"),
        "name: echo\nfunc:\n  - name: shadow_pool\n    cmd: /bin/cat\n",
        0o644,
    );
    write_mode(
        &node.path("plugins/third/flow.yaml"),
        "name: third\nfunc:\n  - name: third_pool\n    cmd: /bin/cat\n",
        0o644,
    );
    let (code, r) = plugin_reload(&node);
    assert_eq!(code, Some(1), "a plugin not applied exits 1: {r}");
    assert_eq!(r["applied"], serde_json::json!(["third"]), "{r}");
    assert_eq!(r["unchanged"], serde_json::json!(["replier"]), "{r}");
    let shadow = plugin(&r, "shadow");
    assert_eq!(shadow["state"], "conflict", "{r}");
    assert!(
        shadow["message"]
            .as_str()
            .unwrap()
            .contains("flow echo is an operator's flow"),
        "{shadow}"
    );
    assert_eq!(
        String::from_utf8_lossy(&node.ctl(&["call", "echo", "operator's"]).stdout),
        "operator's\n",
        "the operator's flow runs on"
    );
    let human = String::from_utf8_lossy(&node.ctl(&["plugin", "ls"]).stdout).to_string();
    assert!(
        human.contains("conflict: flow echo is an operator's flow"),
        "{human}"
    );
    let events = String::from_utf8_lossy(&node.ctl(&["events", "-n", "50"]).stdout).to_string();
    assert!(
        events.contains("plugin shadow not applied (conflict)"),
        "{events}"
    );

    // A broken plugin is reported with file:line:column; the others go on.
    write_mode(
        &node.path("plugins/broken/flow.yaml"),
        "name: broken\nfunc:\n  - name: b\n    cmd: /bin/cat\n    nmu: 2\n",
        0o644,
    );
    // A plugin removed (its package erased): its flow goes.
    std::fs::remove_dir_all(node.path("plugins/third")).unwrap();
    let (_, r) = plugin_reload(&node);
    let broken = plugin(&r, "broken");
    assert_eq!(broken["state"], "error", "{r}");
    assert!(
        broken["message"]
            .as_str()
            .unwrap()
            .contains("broken/flow.yaml:5:5: func[0].nmu"),
        "{broken}"
    );
    assert_eq!(r["removed"][0]["plugin"], "third", "{r}");
    assert_eq!(r["removed"][0]["flow"], "third", "{r}");
    let out = node.ctl(&["pool", "show", "third_pool"]);
    assert_eq!(out.status.code(), Some(1), "its pool is gone: {out:?}");
    assert_eq!(
        String::from_utf8_lossy(&node.ctl(&["call", "replier_pool", "on"]).stdout),
        "--prefix plugin: on\n"
    );

    // After a restart: the operator's flow first (persisted), then the plugins — the same
    // picture; a plugin erased while the daemon was down has no flow any more.
    assert!(node.stop().success());
    std::fs::remove_dir_all(node.path("plugins/replier")).unwrap();
    node.start();
    let ls = node.ctl_json(&["plugin", "ls"]);
    assert_eq!(plugin(&ls, "shadow")["state"], "conflict", "{ls}");
    assert_eq!(plugin(&ls, "broken")["state"], "error", "{ls}");
    assert_eq!(ls["plugins"].as_array().unwrap().len(), 2, "{ls}");
    let flows: Vec<String> = node
        .ctl_json(&["flow", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(flows, ["echo"], "only the operator's flow is left");
}

#[test]
fn the_node_stats_plugin_feeds_a_subscriber_pool() {
    let mut node = Node::new();
    open_to_workers(&node, &["plugins", "out"]);
    std::fs::set_permissions(node.path("out"), std::fs::Permissions::from_mode(0o777)).unwrap();
    node.start();
    // The subscriber first: an operator's pool that appends what it gets to a file.
    let got = node.path("out/stats.jsonl");
    let collector = node.path("collector.yaml");
    std::fs::write(
        &collector,
        format!(
            "name: collector\nfunc:\n  - name: collector\n    \
             cmd: [/bin/sh, -c, 'while read -r l; do printf \"%s\\n\" \"$l\" >> {}; echo stored; done']\n    \
             sub:\n      - name: node_stats_stream\n        type: one\n",
            got.display()
        ),
    )
    .unwrap();
    assert_eq!(
        node.ctl(&["flow", "apply", collector.to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );
    // The real plugin, as its package installs it, with a 1 s interval.
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/plugins/node-stats");
    let dst = node.path("plugins/node-stats");
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).unwrap();
    let flow = std::fs::read_to_string(src.join("flow.yaml")).unwrap();
    assert!(flow.contains("NODE_STATS_INTERVAL: \"5\""), "{flow}");
    write_mode(
        &dst.join("flow.yaml"),
        &flow.replace("NODE_STATS_INTERVAL: \"5\"", "NODE_STATS_INTERVAL: \"1\""),
        0o644,
    );
    write_mode(
        &dst.join("node-stats"),
        &std::fs::read_to_string(src.join("node-stats")).unwrap(),
        0o755,
    );
    let started = Instant::now();
    let (code, r) = plugin_reload(&node);
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["applied"], serde_json::json!(["node-stats"]), "{r}");
    assert_eq!(
        plugin(&r, "node-stats")["pools"],
        serde_json::json!(["node_stats_stream"])
    );
    let lines = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let text = std::fs::read_to_string(&got).unwrap_or_default();
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "{n} lines not within 15 s: {lines:?}\n{}",
                String::from_utf8_lossy(&node.ctl(&["logs", "node_stats_stream"]).stdout)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let first = lines(1);
    let first_after = started.elapsed();
    let three = lines(3);
    let all_after = started.elapsed();
    for line in &three {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let pct = v["cpu_busy_pct"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&pct), "{line}");
        assert!(v["mem_total_kb"].as_u64().unwrap() > 0, "{line}");
        assert!(
            v["mem_available_kb"].as_u64().unwrap() <= v["mem_total_kb"].as_u64().unwrap(),
            "{line}"
        );
        assert!(
            v["load1"].as_f64().is_some() && v["load15"].as_f64().is_some(),
            "{line}"
        );
        assert_eq!(v["node"], "t1", "the node's name, from DROP_NODE: {line}");
        assert_eq!(v["interval_s"], 1, "{line}");
    }
    eprintln!(
        "node-stats → collector: first line {:.2} s after the reload, three after {:.2} s: {}",
        first_after.as_secs_f64(),
        all_after.as_secs_f64(),
        first[0]
    );
    let show = node.ctl_json(&["pool", "show", "collector"]);
    assert!(show["stats"]["ok"].as_u64().unwrap() >= 3, "{show}");
}
