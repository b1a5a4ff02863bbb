//! The runtime with real workers (no root): subscriptions with filters, a subscription loop,
//! casts to every worker.

use std::path::Path;
use std::time::{Duration, Instant};

use drop_supervisor::runtime::PoolLookup;
use drop_supervisor::runtime::{Runtime, RuntimeOptions};

fn runtime(dir: &Path) -> (tokio::runtime::Runtime, Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let runtime = {
        let _g = rt.enter();
        Runtime::new(RuntimeOptions {
            state_dir: dir.join("state"),
            images_dir: dir.join("images"),
            logs_dir: dir.join("logs"),
            cgroups: None,
            worker_credentials: None,
            allow_root_workers: false,
            node_name: Some("n-test".into()),
        })
    };
    (rt, runtime)
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn filtered_subscribers_receive_only_their_tag() {
    let dir = tempfile::tempdir().unwrap();
    let (_rt, runtime) = runtime(dir.path());
    let (good, bad) = (dir.path().join("good.txt"), dir.path().join("bad.txt"));
    let flow = format!(
        r#"name: pipeline
func:
  - name: validator
    cmd: [/bin/sh, -c, 'while read l; do case "$l" in *ok*) echo "tag:valid $l";; *) echo "tag:invalid $l";; esac; done']
  - name: good
    cmd: [/bin/sh, -c, 'while read l; do echo "$l" >> {good}; echo stored; done']
    sub:
      - name: validator
        filter: "tag:valid "
  - name: bad
    cmd: [/bin/sh, -c, 'while read l; do echo "$l" >> {bad}; echo stored; done']
    sub:
      - name: validator
        filter: "tag:invalid "
        type: all
"#,
        good = good.display(),
        bad = bad.display()
    );
    runtime.apply(&flow, Path::new("pipeline.yaml")).unwrap();
    let validator = runtime.pool("validator").unwrap();
    for i in 0..10 {
        let msg = if i % 2 == 0 {
            format!("ok {i}")
        } else {
            format!("nope {i}")
        };
        validator.call(msg.as_bytes()).unwrap();
    }
    wait_for("5 + 5 deliveries", Duration::from_secs(10), || {
        lines(&good).len() == 5 && lines(&bad).len() == 5
    });
    assert!(
        lines(&good).iter().all(|l| l.starts_with("tag:valid ok")),
        "{:?}",
        lines(&good)
    );
    assert!(
        lines(&bad)
            .iter()
            .all(|l| l.starts_with("tag:invalid nope")),
        "{:?}",
        lines(&bad)
    );
}

#[test]
fn a_ping_pong_loop_runs_bounded_and_stops_with_its_flow() {
    let dir = tempfile::tempdir().unwrap();
    let (_rt, runtime) = runtime(dir.path());
    let flow = r#"name: pingpong
func:
  - name: ping
    cmd: [/bin/sh, -c, 'while read l; do echo "ping $l"; done']
    sub:
      - name: pong
  - name: pong
    cmd: [/bin/sh, -c, 'while read l; do echo "pong"; done']
    sub:
      - name: ping
        type: one
"#;
    runtime.apply(flow, Path::new("pingpong.yaml")).unwrap();
    runtime.cast("ping", b"start", false).unwrap();
    let ok = |name: &str| runtime.pool_status(name).map(|s| s.stats.ok).unwrap_or(0);
    wait_for(
        "the loop to go round 20 times",
        Duration::from_secs(10),
        || ok("pong") >= 20,
    );
    let report = runtime.remove("pingpong").unwrap();
    assert_eq!(report.stopped.len(), 2);
    assert!(runtime.pool("ping").is_none());
}

#[test]
fn workers_know_their_pool_and_node() {
    let dir = tempfile::tempdir().unwrap();
    let (_rt, runtime) = runtime(dir.path());
    let flow = "name: who\nfunc:\n  - name: who\n    env: {DROP_NODE: forged}\n    cmd: [/bin/sh, -c, 'while read l; do echo \"$DROP_NODE $DROP_POOL\"; done']\n";
    runtime.apply(flow, Path::new("who.yaml")).unwrap();
    let pool = runtime.pool("who").unwrap();
    // The daemon's node name wins over a pool's own env.
    assert_eq!(pool.call(b"x").unwrap(), b"n-test who");
}

#[test]
fn cast_all_reaches_every_worker() {
    let dir = tempfile::tempdir().unwrap();
    let (_rt, runtime) = runtime(dir.path());
    let out = dir.path().join("seen.txt");
    let flow = format!(
        "name: fan\nfunc:\n  - name: fan\n    num: 3\n    cmd: [/bin/sh, -c, 'while read l; do echo \"$DROP_WORKER $l\" >> {}; echo ok; done']\n",
        out.display()
    );
    runtime.apply(&flow, Path::new("fan.yaml")).unwrap();
    wait_for("3 workers", Duration::from_secs(5), || {
        runtime.pool_status("fan").unwrap().workers == 3
    });
    runtime.cast("fan", b"hello", true).unwrap();
    wait_for("3 deliveries", Duration::from_secs(10), || {
        lines(&out).len() == 3
    });
    let mut workers: Vec<String> = lines(&out)
        .iter()
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect();
    workers.sort();
    workers.dedup();
    assert_eq!(workers.len(), 3, "{:?}", lines(&out));
}

#[test]
fn the_result_cache_answers_repeated_payloads_within_its_ttl_and_size() {
    let dir = tempfile::tempdir().unwrap();
    let (_rt, runtime) = runtime(dir.path());
    let calls = dir.path().join("calls.txt");
    let flow = format!(
        "name: pure\nfunc:\n  - name: pure\n    cmd: [/bin/sh, -c, 'while read l; do echo \"$l\" >> {}; echo \"f($l)\"; done']\n    cache:\n      ttl_ms: 60000\n      size: 2\n",
        calls.display()
    );
    runtime.apply(&flow, Path::new("pure.yaml")).unwrap();
    let pool = runtime.pool("pure").unwrap();
    for _ in 0..3 {
        assert_eq!(pool.call(b"a").unwrap(), b"f(a)");
    }
    assert_eq!(lines(&calls), ["a"], "computed once");
    assert_eq!(pool.status().stats.cache_hits, 2);
    // Size bound 2: b and c push a out.
    for p in [&b"b"[..], b"c", b"a"] {
        pool.call(p).unwrap();
    }
    assert_eq!(lines(&calls), ["a", "b", "c", "a"]);
}

#[test]
fn scaling_at_run_time_grows_and_shrinks_without_failures() {
    let dir = tempfile::tempdir().unwrap();
    let (_rt, runtime) = runtime(dir.path());
    runtime
        .apply(
            "name: s\nfunc:\n  - name: s\n    cmd: /bin/cat\n",
            Path::new("s.yaml"),
        )
        .unwrap();
    let status = || runtime.pool_status("s").unwrap();
    wait_for("1 worker", Duration::from_secs(5), || status().workers == 1);
    runtime.scale("s", 3, 3).unwrap();
    wait_for("3 workers", Duration::from_secs(5), || {
        status().workers == 3
    });
    let pool = runtime.pool("s").unwrap();
    std::thread::scope(|s| {
        let caller = s.spawn(|| (0..200).all(|i| pool.call(format!("{i}").as_bytes()).is_ok()));
        runtime.scale("s", 1, 1).unwrap();
        assert!(caller.join().unwrap(), "no call failed while shrinking");
    });
    wait_for("1 worker", Duration::from_secs(5), || status().workers == 1);
    assert_eq!(status().stats.restarts, 0);
    assert!(
        runtime.scale("s", 2, 1).is_err(),
        "min above max is refused"
    );
}

#[test]
fn a_failed_pool_recovers_when_its_flow_is_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let (_rt, runtime) = runtime(dir.path());
    let broken = "name: f\nfunc:\n  - name: f\n    cmd: [/bin/sh, -c, 'exit 1']\n    restart:\n      backoff_initial_ms: 10\n      intensity: 2\n";
    runtime.apply(broken, Path::new("f.yaml")).unwrap();
    wait_for("failed", Duration::from_secs(10), || {
        matches!(
            runtime.pool_status("f").unwrap().phase,
            drop_supervisor::runtime::worker::pool::Phase::Failed(_)
        )
    });
    let fixed = "name: f\nfunc:\n  - name: f\n    cmd: /bin/cat\n";
    let report = runtime.apply(fixed, Path::new("f.yaml")).unwrap();
    assert_eq!(report.restarted, ["f"]);
    assert_eq!(runtime.pool("f").unwrap().call(b"back").unwrap(), b"back");
}

#[test]
fn a_root_flow_is_refused_unless_the_node_allows_root_workers() {
    let dir = tempfile::tempdir().unwrap();
    let (_rt, runtime) = runtime(dir.path());
    let flow = "name: r\nfunc:\n  - name: r\n    cmd: /bin/cat\n    user: root\n";
    let err = runtime
        .apply(flow, Path::new("r.yaml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("user: root") && err.contains("runtime.allow_root_workers"),
        "{err}"
    );
    assert!(runtime.pool("r").is_none());
}
