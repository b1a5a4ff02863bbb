//! The acceptance path as an operator walks it, as root: import an image, apply an
//! original-style flow (`name`, `func`, `image`, `cmd`), and get answers through the gateway
//! (with a bearer token) and `dropctl call`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use drop_tests::{Outcome, Test, paths, require_root, unique_name};

pub const TESTS: &[Test] = &[Test {
    name: "runtime_original_flow_with_image_answers_via_gateway_and_dropctl",
    run: original_flow_with_image,
}];

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

fn dropctl(socket: &Path, args: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(Command::new(paths::bin("dropctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()?)
}

fn post(addr: &str, pool: &str, token: Option<&str>, body: &[u8]) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "POST /api/v1/{pool} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .context("no status line")?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn original_flow_with_image() -> anyhow::Result<Outcome> {
    if let Some(skip) = require_root() {
        return Ok(skip);
    }
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("drop.sock");
    let config = dir.path().join("drop.toml");
    let token = "test-token-0123456789abcdef";
    let subtree = unique_name("dropac");
    let _cleanup = drop_tests::CgroupSubtreeGuard(subtree.clone());
    std::fs::write(
        &config,
        format!(
            "[node]\nname = \"accept\"\nstate_dir = \"{0}/state\"\n[control]\nsocket = \"{1}\"\n\
             [tuning]\nsysctl_root = \"{0}/sys\"\n[runtime]\ncgroup_subtree = \"{2}\"\n\
             [gateway]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\n",
            dir.path().display(),
            socket.display(),
            subtree,
        ),
    )?;
    let _daemon = Daemon(
        Command::new(paths::bin("drop-supervisor"))
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let until = Instant::now() + Duration::from_secs(15);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        ensure!(Instant::now() < until, "daemon did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }

    // The flow names an image that is not installed yet: refused, with where.
    let flow = paths::workspace_root().join("examples/flows/pyecho.yaml");
    let out = dropctl(&socket, &["flow", "apply", flow.to_str().context("utf-8")?])?;
    ensure!(
        out.status.code() == Some(1),
        "apply without the image: {out:?}"
    );
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("pyecho:0.1.0"),
        "{out:?}"
    );

    let bundle = paths::workspace_root().join("examples/images/pyecho:0.1.0");
    let out = dropctl(
        &socket,
        &[
            "image",
            "import",
            "pyecho:0.1.0",
            bundle.to_str().context("utf-8")?,
        ],
    )?;
    ensure!(out.status.success(), "image import: {out:?}");
    let out = dropctl(&socket, &["flow", "apply", flow.to_str().context("utf-8")?])?;
    ensure!(out.status.success(), "flow apply: {out:?}");

    let status = dropctl(&socket, &["--json", "status"])?;
    let status: serde_json::Value = serde_json::from_slice(&status.stdout)?;
    let gw = status["gateway"]
        .as_str()
        .context("gateway address")?
        .to_string();
    let until = Instant::now() + Duration::from_secs(15);
    let (code, body) = loop {
        let r = post(&gw, "pyecho", Some(token), "hello\nfrom DROP ✓".as_bytes())?;
        if r.0 == 200 || Instant::now() > until {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    ensure!(
        code == 200 && body == "hello\nfrom DROP ✓",
        "gateway: {code} {body:?}"
    );
    let (code, _) = post(&gw, "pyecho", None, b"x")?;
    ensure!(code == 401, "without the token: {code}");
    let (code, _) = post(&gw, "pyecho", Some("wrong-token-0123456789"), b"x")?;
    ensure!(code == 401, "with a wrong token: {code}");

    let out = dropctl(&socket, &["call", "pyecho", "via dropctl"])?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout) == "via dropctl\n",
        "dropctl call: {out:?}"
    );
    println!(
        "  image imported, original flow applied, answered via gateway (bearer token) and dropctl"
    );
    Ok(Outcome::Pass)
}
