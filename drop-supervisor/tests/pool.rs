//! The pool engine with real worker processes (no root needed): protocol, supervision,
//! overload, timeouts, out-of-step workers, elasticity.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{config, devnull, sh, wait_for};
use drop_supervisor::runtime::worker::pool::{CallError, Phase, Pool, PoolConfig, RestartPolicy};

const ECHO: &str = env!("CARGO_BIN_EXE_drop-echo-worker");

struct Rt {
    rt: tokio::runtime::Runtime,
}

impl Rt {
    fn new() -> Rt {
        Rt {
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
        }
    }
    fn pool(&self, cfg: PoolConfig) -> Pool {
        let _g = self.rt.enter();
        Pool::start(cfg, devnull())
    }
}

#[test]
fn payloads_round_trip_unchanged() {
    let rt = Rt::new();
    let pool = rt.pool(config("echo", &[ECHO]));
    for payload in [
        "",
        "hello",
        "line one\nline two\n",
        "héllo wörld ✓ 日本",
        "\n\n",
        "tab\there",
        "  spaces  ",
    ] {
        assert_eq!(
            pool.call(payload.as_bytes()).unwrap(),
            payload.as_bytes(),
            "{payload:?}"
        );
    }
    let s = pool.status();
    assert_eq!((s.stats.ok, s.stats.error, s.workers), (7, 0, 1));
}

#[test]
fn concurrent_callers_each_get_their_own_reply() {
    let rt = Rt::new();
    let mut cfg = config("echo2", &[ECHO]);
    (cfg.min, cfg.max) = (2, 2);
    let pool = rt.pool(cfg);
    std::thread::scope(|s| {
        for t in 0..8 {
            let pool = pool.clone();
            s.spawn(move || {
                for i in 0..300 {
                    let msg = format!("caller {t} request {i}");
                    assert_eq!(pool.call(msg.as_bytes()).unwrap(), msg.as_bytes());
                }
            });
        }
    });
    assert_eq!(pool.status().stats.ok, 2400);
}

#[test]
fn full_queue_is_refused_at_once_then_served_again() {
    let rt = Rt::new();
    let mut cfg = config("slow", &sh("while read l; do sleep 0.3; echo \"$l\"; done"));
    cfg.queue = 2;
    let pool = rt.pool(cfg);
    wait_for("a worker", Duration::from_secs(5), || {
        pool.status().workers == 1
    });
    std::thread::scope(|s| {
        let busy: Vec<_> = (0..3)
            .map(|i| {
                let pool = pool.clone();
                s.spawn(move || pool.call(format!("{i}").as_bytes()))
            })
            .collect();
        wait_for("1 busy + 2 queued", Duration::from_secs(5), || {
            pool.status().queue_depth == 2
        });
        let t = Instant::now();
        assert_eq!(pool.call(b"x"), Err(CallError::Overloaded("slow".into())));
        assert!(
            t.elapsed() < Duration::from_millis(50),
            "overload answered at once"
        );
        for b in busy {
            assert!(b.join().unwrap().is_ok());
        }
    });
    assert_eq!(pool.call(b"again").unwrap(), b"again");
    assert_eq!(pool.status().stats.rejected, 1);
}

#[test]
fn a_worker_that_never_answers_times_out_and_is_replaced() {
    let rt = Rt::new();
    let mut cfg = config(
        "hang",
        &sh("while read l; do if [ \"$l\" = hang ]; then sleep 1000; fi; echo \"$l\"; done"),
    );
    cfg.timeout = Duration::from_millis(300);
    let pool = rt.pool(cfg);
    let first_pid = {
        wait_for("a worker", Duration::from_secs(5), || {
            pool.status().workers == 1
        });
        pool.status().pids[0]
    };
    let t = Instant::now();
    assert_eq!(pool.call(b"hang"), Err(CallError::Timeout("hang".into())));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    // The process group (sh and its sleep) is gone; a new worker serves the next call.
    assert_eq!(pool.call(b"next").unwrap(), b"next");
    let s = pool.status();
    assert_eq!((s.stats.timeout, s.stats.ok), (1, 1));
    assert_ne!(s.pids[0], first_pid);
    wait_for("old worker reaped", Duration::from_secs(5), || {
        std::fs::metadata(format!("/proc/{first_pid}")).is_err()
    });
}

#[test]
fn extra_output_lines_retire_the_worker_and_no_caller_gets_a_stale_reply() {
    let rt = Rt::new();
    // The extra line arrives together with the reply (one write): seen right after the reply.
    let pool = rt.pool(config(
        "chatty",
        &sh("while read l; do printf '%s\\nextra\\n' \"$l\"; done"),
    ));
    for i in 0..5 {
        let msg = format!("m{i}");
        // Every reply is the caller's own; the extra line costs the worker its life.
        assert_eq!(pool.call(msg.as_bytes()).unwrap(), msg.as_bytes());
    }
    wait_for("5 restarts", Duration::from_secs(10), || {
        pool.status().stats.restarts == 5
    });
    assert_eq!(pool.status().stats.out_of_step, 5);
}

#[test]
fn unsolicited_output_before_a_request_is_detected() {
    let rt = Rt::new();
    let marker = tempfile::tempdir().unwrap();
    let flag = marker.path().join("printed");
    // Only the first worker prints a banner at start; its replacement does not.
    let script = format!(
        "if [ ! -e {0} ]; then touch {0}; echo hello-banner; fi; while read l; do echo \"$l\"; done",
        flag.display()
    );
    let pool = rt.pool(config("banner", &sh(&script)));
    wait_for("the banner", Duration::from_secs(5), || flag.exists());
    std::thread::sleep(Duration::from_millis(100)); // the banner is in the pipe now
    // The banner is noticed before the request is written; the request goes to a fresh worker.
    assert_eq!(pool.call(b"req").unwrap(), b"req", "never the banner");
    wait_for("1 restart", Duration::from_secs(10), || {
        pool.status().stats.restarts == 1
    });
    assert_eq!(pool.status().stats.out_of_step, 1);
}

#[test]
fn overlong_reply_lines_are_a_worker_error() {
    let rt = Rt::new();
    let mut cfg = config(
        "long",
        &sh("while read l; do head -c 200000 /dev/zero | tr '\\0' a; echo; done"),
    );
    cfg.line_max = 1024;
    let pool = rt.pool(cfg);
    match pool.call(b"x") {
        Err(CallError::Worker { reason, .. }) => {
            assert!(reason.contains("longer than 1024"), "{reason}")
        }
        other => panic!("expected a worker error, got {other:?}"),
    }
    assert_eq!(
        pool.call(&vec![b'a'; 2000]),
        Err(CallError::TooLarge {
            len: 2000,
            max: 1024
        })
    );
}

#[test]
fn a_crash_looping_worker_backs_off_then_fails_the_pool() {
    let rt = Rt::new();
    let mut cfg = config("crash", &sh("exit 3"));
    cfg.restart = RestartPolicy {
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        reset_after: Duration::from_secs(60),
        intensity: 4,
        period: Duration::from_secs(30),
    };
    let pool = rt.pool(cfg);
    let t = Instant::now();
    wait_for("failed state", Duration::from_secs(10), || {
        matches!(pool.status().phase, Phase::Failed(_))
    });
    // 1st restart at once, then 20, 40, 80 ms of backoff: at least 140 ms in total.
    assert!(
        t.elapsed() >= Duration::from_millis(140),
        "{:?}",
        t.elapsed()
    );
    let s = pool.status();
    assert_eq!(s.stats.restarts, 5);
    match pool.call(b"x") {
        Err(CallError::Unavailable { reason, .. }) => {
            assert!(reason.contains("restarts"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_command_that_cannot_start_fails_the_pool() {
    let rt = Rt::new();
    let mut cfg = config("nobin", &["/nonexistent/worker"]);
    cfg.restart.backoff_initial = Duration::from_millis(5);
    let pool = rt.pool(cfg);
    wait_for("failed state", Duration::from_secs(10), || {
        matches!(pool.status().phase, Phase::Failed(_))
    });
}

#[test]
fn the_pool_grows_under_load_and_shrinks_when_idle() {
    let rt = Rt::new();
    let mut cfg = config(
        "elastic",
        &sh("while read l; do sleep 0.05; echo \"$l\"; done"),
    );
    (cfg.min, cfg.max) = (1, 3);
    cfg.idle_shrink_after = Duration::from_millis(300);
    let pool = rt.pool(cfg);
    std::thread::scope(|s| {
        for t in 0..6 {
            let pool = pool.clone();
            s.spawn(move || {
                for i in 0..20 {
                    let m = format!("{t}/{i}");
                    assert_eq!(pool.call(m.as_bytes()).unwrap(), m.as_bytes());
                }
            });
        }
        wait_for("growth to 3", Duration::from_secs(10), || {
            pool.status().workers == 3
        });
    });
    wait_for("shrink to 1", Duration::from_secs(10), || {
        pool.status().workers == 1
    });
    assert_eq!(
        pool.status().stats.restarts,
        0,
        "shrinking is not a failure"
    );
}

#[test]
fn stopping_kills_every_worker() {
    let rt = Rt::new();
    let mut cfg = config("stopme", &[ECHO]);
    (cfg.min, cfg.max) = (3, 3);
    let pool = rt.pool(cfg);
    wait_for("3 workers", Duration::from_secs(5), || {
        pool.status().workers == 3
    });
    let pids = pool.status().pids;
    pool.stop();
    assert!(rt.rt.block_on(pool.stopped(Duration::from_secs(5))));
    for pid in pids {
        wait_for("worker gone", Duration::from_secs(5), || {
            std::fs::metadata(format!("/proc/{pid}")).is_err()
        });
    }
    assert!(matches!(
        pool.call(b"x"),
        Err(CallError::Unavailable { .. })
    ));
}

fn async_config(name: &str, argv: &[&str], concurrency: u32) -> PoolConfig {
    let mut cfg = config(name, argv);
    cfg.mode = drop_supervisor::runtime::flow::Mode::Async;
    cfg.concurrency = concurrency;
    cfg
}

/// An async worker that answers every request after a random delay, so replies come back out
/// of order; `slow` is answered after 3 s; `junk` makes it print a line without an id.
const ASYNC_PY: &str = r#"
import sys, threading, random, time
lock = threading.Lock()
def answer(rid, payload):
    time.sleep(3 if payload == "slow" else random.random() / 50)
    with lock:
        sys.stdout.write(("no id here" if payload == "junk" else rid + "::" + payload) + "\n")
        sys.stdout.flush()
for line in sys.stdin:
    rid, _, payload = line.rstrip("\n").partition("::")
    threading.Thread(target=answer, args=(rid, payload), daemon=True).start()
"#;

#[test]
fn async_replies_in_any_order_reach_their_own_callers() {
    let rt = Rt::new();
    let pool = rt.pool(async_config(
        "asyncpy",
        &["/usr/bin/python3", "-c", ASYNC_PY],
        16,
    ));
    std::thread::scope(|s| {
        for t in 0..6 {
            let pool = pool.clone();
            s.spawn(move || {
                for i in 0..30 {
                    let msg = format!("caller {t} request {i}\nsecond line");
                    assert_eq!(pool.call(msg.as_bytes()).unwrap(), msg.as_bytes());
                }
            });
        }
    });
    let s = pool.status();
    assert_eq!((s.stats.ok, s.workers), (180, 1));
}

#[test]
fn an_async_timeout_fails_only_that_request() {
    let rt = Rt::new();
    let mut cfg = async_config("asyncslow", &["/usr/bin/python3", "-c", ASYNC_PY], 8);
    cfg.timeout = Duration::from_millis(500);
    let pool = rt.pool(cfg);
    std::thread::scope(|s| {
        let slow = {
            let pool = pool.clone();
            s.spawn(move || pool.call(b"slow"))
        };
        for i in 0..10 {
            let m = format!("fast {i}");
            assert_eq!(
                pool.call(m.as_bytes()).unwrap(),
                m.as_bytes(),
                "served while another request hangs"
            );
        }
        assert_eq!(
            slow.join().unwrap(),
            Err(CallError::Timeout("asyncslow".into()))
        );
    });
    assert_eq!(pool.status().stats.restarts, 0, "the worker keeps running");
}

#[test]
fn an_async_line_without_an_id_is_out_of_step() {
    let rt = Rt::new();
    let pool = rt.pool(async_config(
        "asyncjunk",
        &["/usr/bin/python3", "-c", ASYNC_PY],
        8,
    ));
    assert!(matches!(pool.call(b"junk"), Err(CallError::Worker { .. })));
    wait_for("restart", Duration::from_secs(10), || {
        pool.status().stats.restarts == 1
    });
    assert_eq!(pool.status().stats.out_of_step, 1);
    assert_eq!(pool.call(b"fine").unwrap(), b"fine");
}

#[test]
fn stream_events_reach_the_output_hook_and_a_silent_worker_is_restarted() {
    let rt = Rt::new();
    let mut cfg = config(
        "ticker_stream",
        &sh(
            "i=0; while [ $i -lt 5 ]; do i=$((i+1)); echo \"tick $i\"; sleep 0.02; done; sleep 100",
        ),
    );
    cfg.mode = drop_supervisor::runtime::flow::Mode::Stream;
    cfg.timeout = Duration::from_millis(400);
    cfg.restart.intensity = 100;
    let pool = rt.pool(cfg);
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = seen.clone();
    pool.set_output(Some(Arc::new(move |line: &[u8]| {
        sink.lock()
            .unwrap()
            .push(String::from_utf8_lossy(line).into_owned())
    })));
    wait_for("a restart after silence", Duration::from_secs(10), || {
        pool.status().stats.restarts >= 1
    });
    let events = seen.lock().unwrap().clone();
    assert!(events.len() >= 5, "{events:?}");
    assert!(
        events.iter().filter(|e| e.starts_with("tick ")).count() >= 5,
        "{events:?}"
    );
    assert!(
        matches!(pool.call(b"x"), Err(CallError::Unavailable { .. })),
        "stream pools take no requests"
    );
}

/// Blocking callers on every worker of `pool` (payloads `call-0`, `call-1`, …), started in
/// `s`; returns once all `workers` are busy with them.
fn occupy<'s>(
    s: &'s std::thread::Scope<'s, '_>,
    pool: &Pool,
    workers: u32,
) -> Vec<std::thread::ScopedJoinHandle<'s, Result<Vec<u8>, CallError>>> {
    let callers = (0..workers)
        .map(|i| {
            let p = pool.clone();
            s.spawn(move || p.call(format!("call-{i}").as_bytes()))
        })
        .collect();
    wait_for("every worker busy", Duration::from_secs(5), || {
        pool.status().busy == workers
    });
    callers
}

/// Submits `payload` and returns where its answer arrives, plus whether it ran on this thread.
fn submit(
    pool: &Pool,
    payload: &str,
) -> (std::sync::mpsc::Receiver<Result<Vec<u8>, CallError>>, bool) {
    let (tx, rx) = std::sync::mpsc::channel();
    let mut inline = false;
    pool.submit(
        payload.as_bytes().to_vec(),
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
        &mut || inline = true,
    );
    (rx, inline)
}

#[test]
fn submitted_requests_beyond_the_workers_queue_and_each_gets_its_own_reply() {
    let rt = Rt::new();
    let mut cfg = config("sub", &sh("while read l; do sleep 0.05; echo \"$l\"; done"));
    (cfg.min, cfg.max, cfg.queue) = (2, 2, 1000);
    let pool = rt.pool(cfg);
    wait_for("2 workers", Duration::from_secs(5), || {
        pool.status().workers == 2
    });
    std::thread::scope(|s| {
        // Both workers busy with blocking callers: every submission queues.
        let callers = occupy(s, &pool, 2);
        let answers: Vec<_> = (0..98)
            .map(|i| (i, submit(&pool, &format!("req-{i}"))))
            .collect();
        assert!(answers.iter().all(|(_, (_, inline))| !inline), "all queued");
        // The pool's executors run them, each answer to its own request.
        for (i, (rx, _)) in answers {
            let reply = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
            assert_eq!(reply, format!("req-{i}").as_bytes());
        }
        for (i, c) in callers.into_iter().enumerate() {
            assert_eq!(c.join().unwrap().unwrap(), format!("call-{i}").as_bytes());
        }
    });
    // With a worker idle and nothing queued, a submission runs on the submitting thread.
    let (rx, inline) = submit(&pool, "now");
    assert!(inline);
    assert_eq!(rx.try_recv().unwrap().unwrap(), b"now");
    let st = pool.status();
    assert_eq!(st.stats.ok, 101);
    assert_eq!(st.queue_depth, 0);
}

#[test]
fn a_queued_submission_past_its_deadline_is_answered_with_a_timeout_on_time() {
    let rt = Rt::new();
    let mut cfg = config("hung", &sh("read l; sleep 100"));
    cfg.timeout = Duration::from_millis(300);
    let pool = rt.pool(cfg);
    wait_for("a worker", Duration::from_secs(5), || {
        pool.status().workers == 1
    });
    std::thread::scope(|s| {
        let first = occupy(s, &pool, 1).remove(0);
        let t = Instant::now();
        let (a, inline_a) = submit(&pool, "a");
        let (b, inline_b) = submit(&pool, "b");
        assert!(!inline_a && !inline_b, "no idle worker: both queue");
        assert_eq!(pool.status().queue_depth, 2);
        for rx in [a, b] {
            let r = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            assert_eq!(r, Err(CallError::Timeout("hung".into())));
        }
        // Answered at their own deadline (plus scheduling), not one timeout after another.
        let waited = t.elapsed();
        assert!(waited < Duration::from_millis(900), "{waited:?}");
        assert_eq!(
            first.join().unwrap(),
            Err(CallError::Timeout("hung".into()))
        );
    });
    assert_eq!(pool.status().stats.timeout, 3);
}

#[test]
fn a_full_queue_refuses_a_submission_at_once() {
    let rt = Rt::new();
    let mut cfg = config("full", &sh("while read l; do sleep 0.3; echo \"$l\"; done"));
    cfg.queue = 2;
    let pool = rt.pool(cfg);
    wait_for("a worker", Duration::from_secs(5), || {
        pool.status().workers == 1
    });
    std::thread::scope(|s| {
        let first = occupy(s, &pool, 1).remove(0);
        let queued = [submit(&pool, "q1").0, submit(&pool, "q2").0];
        let (refused, _) = submit(&pool, "q3");
        // Answered before `submit` returned.
        assert_eq!(
            refused.try_recv().unwrap(),
            Err(CallError::Overloaded("full".into()))
        );
        for (rx, want) in queued.into_iter().zip(["q1", "q2"]) {
            let r = rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
            assert_eq!(r, want.as_bytes());
        }
        assert_eq!(first.join().unwrap().unwrap(), b"call-0");
    });
    assert_eq!(pool.status().stats.rejected, 1);
}

#[test]
fn stopping_a_pool_answers_its_queued_submissions() {
    let rt = Rt::new();
    let pool = rt.pool(config("stopq", &sh("read l; sleep 100")));
    wait_for("a worker", Duration::from_secs(5), || {
        pool.status().workers == 1
    });
    std::thread::scope(|s| {
        let first = occupy(s, &pool, 1).remove(0);
        let queued = [submit(&pool, "a").0, submit(&pool, "b").0];
        pool.stop();
        for rx in queued {
            let r = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            assert!(matches!(r, Err(CallError::Unavailable { .. })), "{r:?}");
        }
        assert!(first.join().unwrap().is_err());
    });
}
