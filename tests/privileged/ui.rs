//! The status page in a real browser: Debian's headless Chromium, driven by chromedriver over
//! the W3C WebDriver protocol (plain HTTP + JSON), against a daemon in a network namespace.
//! Everything (daemon, chromedriver, Chromium) runs inside that namespace; the screenshot is kept
//! under `target/test-artifacts/`.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use drop_tests::cluster::{ClusterFixture, ClusterSpec, wait_for};
use drop_tests::netns::Netns;
use drop_tests::{Outcome, Test, paths, require_command, require_root};
use serde_json::{Value, json};

pub const TESTS: &[Test] = &[Test {
    name: "ui_status_page_live_in_headless_chromium",
    run: status_page,
}];

const DRIVER_PORT: u16 = 9515;
/// How long the page may take to show a change (the bound).
const LIVE: Duration = Duration::from_secs(2);

/// chromedriver, killed when dropped.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One WebDriver request from inside `netns`; the `value` of the answer.
fn wd(netns: &Netns, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let (status, text) = netns.run(|| -> anyhow::Result<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", DRIVER_PORT))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        // chromedriver keeps the connection open: read the head, then Content-Length bytes.
        let mut raw = Vec::new();
        let mut chunk = [0u8; 8192];
        let head_end = loop {
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let n = s.read(&mut chunk)?;
            ensure!(n > 0, "chromedriver closed before its answer");
            raw.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .context("no Content-Length")?;
        let body_start = head_end + 4;
        while raw.len() < body_start + length {
            let n = s.read(&mut chunk)?;
            ensure!(n > 0, "chromedriver closed mid-answer");
            raw.extend_from_slice(&chunk[..n]);
        }
        let rest = String::from_utf8_lossy(&raw[body_start..body_start + length]).to_string();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .context("no status")?
            .parse()?;
        let (start, end) = (0, rest.len());
        Ok((status, rest[start..end].to_string()))
    })??;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("WebDriver said {text}"))?;
    ensure!(status == 200, "WebDriver {method} {path}: {status} {v}");
    Ok(v["value"].clone())
}

fn script(netns: &Netns, session: &str, js: &str) -> anyhow::Result<Value> {
    wd(
        netns,
        "POST",
        &format!("/session/{session}/execute/sync"),
        Some(json!({ "script": js, "args": [] })),
    )
}

/// The text of the cell of `pool`'s `field` on the page, if shown.
fn field(netns: &Netns, session: &str, pool: &str, field: &str) -> anyhow::Result<Option<String>> {
    let js = format!(
        "const e = document.querySelector('[data-pool=\"{pool}\"][data-field=\"{field}\"]'); \
         return e ? e.textContent : null;"
    );
    Ok(script(netns, session, &js)?.as_str().map(str::to_string))
}

fn status_page() -> anyhow::Result<Outcome> {
    let missing = require_root()
        .or_else(|| require_command("ip"))
        .or_else(|| require_command("nsenter"))
        .or_else(|| require_command("chromium"))
        .or_else(|| require_command("chromedriver"))
        .or_else(|| require_command("base64"));
    if let Some(skip) = missing {
        return Ok(skip);
    }
    let fx = ClusterFixture::start(ClusterSpec {
        cluster: false,
        ..ClusterSpec::new(1)
    })?;
    let node = fx.node(0);
    let netns = fx.bridge().host(0).netns();
    let echo = paths::bin("drop-echo-worker");
    let flow = node.dir().join("ui.yaml");
    std::fs::write(
        &flow,
        format!(
            "name: ui\nfunc:\n  - name: echo\n    cmd: {0}\n    num: 2\n  - name: other\n    cmd: {0}\n    num: 1\n",
            echo.display()
        ),
    )?;
    node.dropctl(&["flow", "apply", flow.to_str().context("path")?])?;

    let profile = tempfile::Builder::new().prefix("dui").tempdir()?;
    let mut cmd = netns.command("chromedriver");
    cmd.arg(format!("--port={DRIVER_PORT}"))
        .env("HOME", profile.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _driver = Driver(cmd.spawn().context("starting chromedriver")?);
    wait_for(Duration::from_secs(15), "chromedriver answering", || {
        wd(netns, "GET", "/status", None)
    })?;
    let caps = json!({ "capabilities": { "alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900",
                     format!("--user-data-dir={}", profile.path().join("chrome").display())]
        }
    }}});
    let session = wd(netns, "POST", "/session", Some(caps))?["sessionId"]
        .as_str()
        .context("no session id")?
        .to_string();
    let result = (|| -> anyhow::Result<()> {
        let url = format!("http://{}/ui/", node.gateway());
        wd(
            netns,
            "POST",
            &format!("/session/{session}/url"),
            Some(json!({ "url": url })),
        )?;

        // Every pool listed with its state.
        wait_for(
            Duration::from_secs(10),
            "both pools running on the page",
            || {
                for pool in ["echo", "other"] {
                    match field(netns, &session, pool, "phase")?.as_deref() {
                        Some("running") => {}
                        other => bail!("{pool}: {other:?}"),
                    }
                }
                Ok(())
            },
        )?;
        let title = script(netns, &session, "return document.title")?;
        ensure!(title == "DROP node", "title {title}");

        // Calls: the counter changes on the page without a reload, within LIVE.
        let ok_now = |_: ()| -> anyhow::Result<u64> {
            Ok(field(netns, &session, "echo", "ok")?
                .and_then(|t| t.parse().ok())
                .unwrap_or(0))
        };
        let before = ok_now(())?;
        script(netns, &session, "window.__marker = 'no reload'; return 1")?;
        for i in 0..5 {
            let (status, _) = node.post("echo", format!("hi {i}").as_bytes())?;
            ensure!(status == 200, "call {i}: {status}");
        }
        let called = Instant::now();
        let seen = wait_for(LIVE, "the ok counter to move on the page", || {
            let now = ok_now(())?;
            if now >= before + 5 {
                Ok(called.elapsed())
            } else {
                bail!("ok {now}, want {}", before + 5)
            }
        })?;
        let marker = script(netns, &session, "return window.__marker || null")?;
        ensure!(marker == "no reload", "the page was reloaded");
        println!(
            "  5 calls: the page showed ok {before} -> {} after {:.0} ms, without a reload",
            ok_now(())?,
            seen.as_secs_f64() * 1e3
        );

        // A worker killed: the restart shows.
        let show = node.dropctl(&["pool", "show", "echo"])?;
        let pid = show["pids"][0].as_u64().context("no worker pid")?;
        let restarts_before: u64 = field(netns, &session, "echo", "restarts")?
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid)?),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let killed = Instant::now();
        wait_for(Duration::from_secs(10), "the restart on the page", || {
            let r: u64 = field(netns, &session, "echo", "restarts")?
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            if r > restarts_before {
                Ok(())
            } else {
                bail!("restarts {r}")
            }
        })?;
        println!(
            "  worker {pid} killed: the page showed the restart after {:.0} ms",
            killed.elapsed().as_secs_f64() * 1e3
        );
        // ... and the event log's entry for it, among the recent events.
        wait_for(
            Duration::from_secs(2),
            "the restart event on the page",
            || {
                let text = script(
                    netns,
                    &session,
                    "return [...document.querySelectorAll('#events li[data-kind=\"restart\"]')].map(e => e.textContent).join('\\n')",
                )?;
                let text = text.as_str().unwrap_or_default().to_string();
                if text.contains("echo") && text.contains("worker") {
                    Ok(())
                } else {
                    bail!("restart events on the page: {text:?}")
                }
            },
        )?;
        println!(
            "  ... and its restart event after {:.0} ms",
            killed.elapsed().as_secs_f64() * 1e3
        );
        // A single node without systemd or balancer says so rather than showing empty tables.
        let sections = script(
            netns,
            &session,
            "return [document.getElementById('no-services').hidden, document.getElementById('no-lb').hidden]",
        )?;
        ensure!(
            sections == json!([false, false]),
            "services/balancer placeholders: {sections}"
        );

        // The screenshot, kept.
        let png = wd(
            netns,
            "GET",
            &format!("/session/{session}/screenshot"),
            None,
        )?;
        let b64 = png.as_str().context("no screenshot")?;
        let dir = paths::bin("x")
            .parent()
            .and_then(|d| d.parent())
            .map(|t| t.join("test-artifacts"))
            .context("no target folder")?;
        std::fs::create_dir_all(&dir)?;
        let b64_file = dir.join("ui-status-page.png.b64");
        std::fs::write(&b64_file, b64)?;
        let out = std::process::Command::new("base64")
            .arg("-d")
            .arg(&b64_file)
            .output()?;
        ensure!(
            out.status.success() && out.stdout.starts_with(b"\x89PNG"),
            "not a PNG"
        );
        let png_file = dir.join("ui-status-page.png");
        std::fs::write(&png_file, &out.stdout)?;
        let _ = std::fs::remove_file(&b64_file);
        println!(
            "  screenshot: {} ({} bytes); page weight {} bytes (one file, no other fetch than /ui/state)",
            png_file.display(),
            out.stdout.len(),
            drop_supervisor::gateway::UI_PAGE.len()
        );
        Ok(())
    })();
    let _ = wd(netns, "DELETE", &format!("/session/{session}"), None);
    match result {
        Ok(()) => Ok(Outcome::Pass),
        Err(e) => {
            println!("  daemon log:\n{}", fx.log_tails(30));
            Err(e)
        }
    }
}
