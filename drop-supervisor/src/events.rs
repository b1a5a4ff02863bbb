//! The node's event log: what changed and why, for operators (`dropctl events`, the status
//! page). Leader changes, floating-IP moves, worker restarts, failures, placements, membership
//! and drains are recorded here as they happen, beside the tracing log line that says the same.
//!
//! The log is bounded ([`CAPACITY`] entries, oldest dropped first) and kept in memory: it is a
//! view of recent history, not state — a restarted daemon starts a new log (its first event says
//! so). Every event has a sequence number that only grows, so a reader asks for what came after
//! the last one it saw and learns when it fell behind by more than the log keeps.
//!
//! One log per process: every capability records into it without being handed a reference,
//! as every capability logs through `tracing` without one.

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Events kept per node.
pub const CAPACITY: usize = 2000;

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The daemon started or is stopping.
    Daemon,
    /// A member joined, became suspect, died or left; namespaces created, joined, left.
    Membership,
    /// A namespace's leader changed, or its lease lapsed.
    Leader,
    /// The floating IP moved, was released, or a conflict was seen.
    Vip,
    /// A flow or service was stored, placed here, moved or removed.
    Placement,
    /// A worker or service instance ended and was started again.
    Restart,
    /// A pool, flow or service instance failed.
    Failure,
    /// The node was drained or undrained.
    Drain,
}

impl Kind {
    /// Every kind, in a fixed order.
    pub const ALL: [Kind; 8] = [
        Kind::Daemon,
        Kind::Membership,
        Kind::Leader,
        Kind::Vip,
        Kind::Placement,
        Kind::Restart,
        Kind::Failure,
        Kind::Drain,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Daemon => "daemon",
            Kind::Membership => "membership",
            Kind::Leader => "leader",
            Kind::Vip => "vip",
            Kind::Placement => "placement",
            Kind::Restart => "restart",
            Kind::Failure => "failure",
            Kind::Drain => "drain",
        }
    }
}

/// One thing that happened on a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Position in this node's log (from 1; grows by one per event).
    pub seq: u64,
    /// Wall-clock time, ms since the Unix epoch.
    pub at_unix_ms: u64,
    /// The node that recorded it.
    pub node: String,
    pub kind: Kind,
    /// What it is about: a pool, flow, service, namespace or node name.
    pub subject: String,
    pub text: String,
}

/// What a reader gets for "after `since`".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Page {
    pub events: Vec<Event>,
    /// Ask for `since = next` to get what follows.
    pub next: u64,
    /// Events after `since` that the log no longer holds (the reader fell behind).
    pub missed: u64,
    /// The newest sequence number in the log (0: none yet), for a reader that wants the last few.
    #[serde(default)]
    pub newest: u64,
}

#[derive(Debug)]
struct Inner {
    node: String,
    /// Events recorded per kind since the start ([`Kind::ALL`] order), dropped ones included.
    counts: [u64; 8],
    next_seq: u64,
    ring: VecDeque<Event>,
    capacity: usize,
}

/// A bounded, sequenced event log.
#[derive(Debug)]
pub struct EventLog {
    inner: Mutex<Inner>,
    /// The newest sequence number, for readers that wait.
    newest: tokio::sync::watch::Sender<u64>,
}

impl EventLog {
    pub fn new(capacity: usize) -> EventLog {
        EventLog {
            inner: Mutex::new(Inner {
                node: String::new(),
                counts: [0; 8],
                next_seq: 1,
                ring: VecDeque::new(),
                capacity: capacity.max(1),
            }),
            newest: tokio::sync::watch::Sender::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Names the node that records from now on.
    pub fn set_node(&self, node: &str) {
        self.lock().node = node.to_string();
    }

    /// Appends an event stamped now and returns its sequence number.
    pub fn record(&self, kind: Kind, subject: &str, text: impl Into<String>) -> u64 {
        self.record_at(now_ms(), kind, subject, text.into())
    }

    fn record_at(&self, at_unix_ms: u64, kind: Kind, subject: &str, text: String) -> u64 {
        let seq = {
            let mut g = self.lock();
            let seq = g.next_seq;
            g.next_seq += 1;
            if let Some(i) = Kind::ALL.iter().position(|k| *k == kind) {
                g.counts[i] += 1;
            }
            let event = Event {
                seq,
                at_unix_ms,
                node: g.node.clone(),
                kind,
                subject: subject.to_string(),
                text,
            };
            if g.ring.len() == g.capacity {
                g.ring.pop_front();
            }
            g.ring.push_back(event);
            seq
        };
        self.newest.send_replace(seq);
        seq
    }

    /// Events after `since`, oldest first, at most `limit` of them (the oldest ones when there
    /// are more: the reader continues from `next`).
    pub fn since(&self, since: u64, limit: usize) -> Page {
        let g = self.lock();
        let first_kept = g.ring.front().map_or(g.next_seq, |e| e.seq);
        let missed = first_kept.saturating_sub(since + 1);
        let events: Vec<Event> = g
            .ring
            .iter()
            .filter(|e| e.seq > since)
            .take(limit)
            .cloned()
            .collect();
        let next = events.last().map_or(since.max(first_kept - 1), |e| e.seq);
        Page {
            events,
            next,
            missed,
            newest: g.next_seq - 1,
        }
    }

    /// Prometheus text: `drop_events_total{kind}` (every event since the daemon started).
    pub fn metrics(&self) -> String {
        let counts = self.lock().counts;
        let mut out = String::from(
            "# HELP drop_events_total Events recorded in the node's event log, by kind.\n# TYPE drop_events_total counter\n",
        );
        for (k, n) in Kind::ALL.iter().zip(counts) {
            out.push_str(&format!(
                "drop_events_total{{kind=\"{}\"}} {n}\n",
                k.as_str()
            ));
        }
        out
    }

    /// The newest `n` events, oldest first.
    pub fn recent(&self, n: usize) -> Vec<Event> {
        let g = self.lock();
        let skip = g.ring.len().saturating_sub(n);
        g.ring.iter().skip(skip).cloned().collect()
    }

    /// Like [`EventLog::since`], but when nothing follows `since` yet, waits up to `wait` for
    /// the next event.
    pub async fn wait_since(&self, since: u64, limit: usize, wait: Duration) -> Page {
        let mut rx = self.newest.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(|newest| *newest > since)).await;
        self.since(since, limit)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The process's event log.
pub fn log() -> &'static EventLog {
    static LOG: OnceLock<EventLog> = OnceLock::new();
    LOG.get_or_init(|| EventLog::new(CAPACITY))
}

/// Records into the process's log.
pub fn record(kind: Kind, subject: &str, text: impl Into<String>) {
    log().record(kind, subject, text);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_grows_and_since_returns_what_follows() {
        let log = EventLog::new(10);
        log.set_node("n1");
        let a = log.record(Kind::Leader, "ns", "leader of ns: n1");
        let b = log.record(Kind::Vip, "ns", "took 10.0.0.9");
        assert_eq!((a, b), (1, 2));
        let page = log.since(0, 100);
        assert_eq!(page.events.len(), 2);
        assert_eq!(page.next, 2);
        assert_eq!(page.missed, 0);
        assert_eq!(page.events[0].node, "n1");
        assert_eq!(page.events[1].kind, Kind::Vip);
        let page = log.since(2, 100);
        assert!(page.events.is_empty());
        assert_eq!(page.next, 2, "an empty page keeps the reader's place");
        assert_eq!(log.since(0, 1).newest, 2);
    }

    #[test]
    fn bounded_and_a_reader_behind_learns_how_many_it_missed() {
        let log = EventLog::new(3);
        for i in 0..5 {
            log.record(Kind::Restart, "p", format!("worker {i}"));
        }
        let page = log.since(0, 100);
        let seqs: Vec<u64> = page.events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [3, 4, 5]);
        assert_eq!(page.missed, 2);
        assert_eq!(
            log.recent(2).iter().map(|e| e.seq).collect::<Vec<_>>(),
            [4, 5]
        );
    }

    #[test]
    fn limit_takes_the_oldest_and_next_continues() {
        let log = EventLog::new(10);
        for i in 0..5 {
            log.record(Kind::Placement, "f", format!("{i}"));
        }
        let first = log.since(0, 2);
        assert_eq!(
            first.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2]
        );
        let second = log.since(first.next, 10);
        assert_eq!(
            second.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [3, 4, 5]
        );
    }

    #[test]
    fn kinds_serialise_as_their_names_and_are_counted_even_when_dropped() {
        for k in Kind::ALL {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
        let log = EventLog::new(1);
        log.record(Kind::Restart, "p", "a");
        log.record(Kind::Restart, "p", "b");
        log.record(Kind::Drain, "n", "c");
        let text = log.metrics();
        assert!(
            text.contains("drop_events_total{kind=\"restart\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("drop_events_total{kind=\"drain\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("drop_events_total{kind=\"vip\"} 0\n"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_waiting_reader_wakes_on_the_next_event() {
        let log = std::sync::Arc::new(EventLog::new(10));
        log.record(Kind::Daemon, "n", "started");
        let l2 = log.clone();
        let waiter =
            tokio::spawn(async move { l2.wait_since(1, 10, Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        log.record(Kind::Drain, "n", "draining");
        let page = waiter.await.unwrap();
        assert_eq!(page.events.len(), 1);
        assert_eq!(page.events[0].text, "draining");
        assert!(started.elapsed() < Duration::from_secs(5));
        // Nothing new: the wait ends at its timeout with an empty page.
        let empty = log.wait_since(2, 10, Duration::from_millis(20)).await;
        assert!(empty.events.is_empty());
    }
}
