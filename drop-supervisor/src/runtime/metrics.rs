//! Prometheus text exposition (version 0.0.4) of the per-pool numbers.

use std::fmt::Write;

use crate::runtime::worker::pool::{Phase, PoolStatus};
use crate::runtime::worker::stats::BUCKETS_US;

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A metric: name, help text, and how to read it from a pool.
type Metric = (&'static str, &'static str, fn(&PoolStatus) -> u64);

/// Renders every pool's counters, gauges and latency histogram.
pub fn render(pools: &[PoolStatus]) -> String {
    let mut out = String::new();
    let counters: [Metric; 6] = [
        ("drop_pool_requests_ok_total", "Requests answered.", |p| {
            p.stats.ok
        }),
        (
            "drop_pool_requests_error_total",
            "Requests failed by a worker error.",
            |p| p.stats.error,
        ),
        (
            "drop_pool_requests_timeout_total",
            "Requests that timed out.",
            |p| p.stats.timeout,
        ),
        (
            "drop_pool_requests_rejected_total",
            "Requests refused because the queue was full.",
            |p| p.stats.rejected,
        ),
        ("drop_pool_worker_restarts_total", "Worker restarts.", |p| {
            p.stats.restarts
        }),
        (
            "drop_pool_out_of_step_total",
            "Workers that printed out of step.",
            |p| p.stats.out_of_step,
        ),
    ];
    for (name, help, get) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for p in pools {
            let _ = writeln!(out, "{name}{{pool=\"{}\"}} {}", escape(&p.name), get(p));
        }
    }
    let gauges: [Metric; 5] = [
        ("drop_pool_workers", "Live workers.", |p| {
            u64::from(p.workers)
        }),
        (
            "drop_pool_workers_busy",
            "Workers serving a request.",
            |p| u64::from(p.busy),
        ),
        (
            "drop_pool_queue_depth",
            "Requests waiting for a worker.",
            |p| u64::from(p.queue_depth),
        ),
        ("drop_pool_running", "Requests in progress.", |p| {
            p.stats.running
        }),
        (
            "drop_pool_failed",
            "1 when the pool is in the failed state.",
            |p| u64::from(matches!(p.phase, Phase::Failed(_))),
        ),
    ];
    for (name, help, get) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for p in pools {
            let _ = writeln!(out, "{name}{{pool=\"{}\"}} {}", escape(&p.name), get(p));
        }
    }
    let name = "drop_pool_request_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Request latency.\n# TYPE {name} histogram"
    );
    for p in pools {
        let pool = escape(&p.name);
        let mut cumulative = 0;
        for (i, n) in p.stats.latency_buckets.iter().enumerate() {
            cumulative += n;
            let le = BUCKETS_US
                .get(i)
                .map_or("+Inf".to_string(), |us| format!("{}", *us as f64 / 1e6));
            let _ = writeln!(
                out,
                "{name}_bucket{{pool=\"{pool}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "{name}_sum{{pool=\"{pool}\"}} {}",
            p.stats.latency_sum_us as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "{name}_count{{pool=\"{pool}\"}} {}",
            p.stats.latency_count
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::worker::stats::PoolStats;

    #[test]
    fn renders_counters_gauges_and_a_cumulative_histogram() {
        let stats = PoolStats::default();
        stats.observe(std::time::Duration::from_micros(70));
        stats.observe(std::time::Duration::from_millis(3));
        let status = PoolStatus {
            name: "echo".into(),
            phase: Phase::Running,
            workers: 2,
            idle: 2,
            busy: 0,
            starting: 0,
            queue_depth: 0,
            min: 2,
            max: 2,
            pids: vec![],
            stats: stats.snapshot(),
        };
        let text = render(&[status]);
        assert!(
            text.contains("# TYPE drop_pool_requests_ok_total counter"),
            "{text}"
        );
        assert!(
            text.contains("drop_pool_workers{pool=\"echo\"} 2"),
            "{text}"
        );
        assert!(
            text.contains(
                "drop_pool_request_duration_seconds_bucket{pool=\"echo\",le=\"0.0001\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("drop_pool_request_duration_seconds_bucket{pool=\"echo\",le=\"+Inf\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("drop_pool_request_duration_seconds_count{pool=\"echo\"} 2"),
            "{text}"
        );
    }
}
