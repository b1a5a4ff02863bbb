//! What the gateway grants any one client and all of them together, so that hostile or broken
//! clients (slow heads, slow or huge bodies, one address opening every connection) cannot lock
//! others out or grow the daemon's memory without bound.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::ApiError;

/// The gateway's limits (`[gateway]` in the config file; defaults in [`Limits::default`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once; more are answered `503 busy` and closed.
    pub max_connections: usize,
    /// Connections open at once from one client address; more are answered `503 busy`.
    pub max_connections_per_client: usize,
    /// The whole request head must arrive within this, counted from its first byte:
    /// `408` and close otherwise (not per read: one byte a second does not keep it alive).
    pub head_timeout: Duration,
    /// The whole body must arrive within this, counted from the end of the head.
    pub body_timeout: Duration,
    /// A keep-alive connection with nothing to do is closed after this.
    pub idle_timeout: Duration,
    /// Bytes of request bodies being received at once, over all connections. A request whose
    /// announced body does not fit what is left is answered `503 busy` at once.
    pub body_budget: usize,
    /// No body is ever larger than this, whatever the pool's line limit (which applies first).
    pub max_body: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 1024,
            max_connections_per_client: 256,
            head_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            body_budget: 64 * 1024 * 1024,
            max_body: 16 * 1024 * 1024,
        }
    }
}

/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = crate::http::MAX_HEAD;

impl Limits {
    /// The most memory the gateway's connection buffers can hold at once, given the largest
    /// reply any pool may produce (its line limit): every connection with a full head buffer
    /// and an answer waiting for a slow reader, plus the body budget.
    pub fn worst_case_bytes(&self, largest_reply: usize) -> usize {
        self.body_budget + self.max_connections * (MAX_HEAD + largest_reply)
    }

    /// A refusal of the configuration, naming what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_connections == 0 {
            return Err("max_connections must be at least 1".into());
        }
        if self.max_connections_per_client == 0
            || self.max_connections_per_client > self.max_connections
        {
            return Err(format!(
                "max_connections_per_client must be between 1 and max_connections ({})",
                self.max_connections
            ));
        }
        if self.head_timeout.is_zero() || self.body_timeout.is_zero() || self.idle_timeout.is_zero()
        {
            return Err("timeouts must be longer than zero".into());
        }
        if self.body_budget < self.max_body.min(64 * 1024) {
            return Err("body_budget must hold at least one 64 KiB body".into());
        }
        Ok(())
    }
}

/// Who holds connection slots and body bytes right now. Slots and bytes are given back when
/// their ticket is dropped, on every path a connection or request can end.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    per_client: Mutex<HashMap<IpAddr, usize>>,
    connections: AtomicUsize,
    body_bytes: AtomicUsize,
}

/// One admitted connection; its slot is free again when this is dropped.
#[derive(Debug)]
pub struct ConnTicket {
    admission: Arc<Admission>,
    client: IpAddr,
}

/// Room for one body being received; given back when this is dropped.
#[derive(Debug)]
pub struct BodyTicket {
    admission: Arc<Admission>,
    bytes: usize,
}

fn busy(message: String) -> ApiError {
    ApiError::new(503, "busy", message)
}

impl Admission {
    pub fn new(limits: Limits) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            per_client: Mutex::new(HashMap::new()),
            connections: AtomicUsize::new(0),
            body_bytes: AtomicUsize::new(0),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A slot for a new connection from `client`, or the `503 busy` to answer it with.
    pub fn open(self: &Arc<Self>, client: IpAddr) -> Result<ConnTicket, ApiError> {
        let mut per_client = self.per_client.lock().unwrap_or_else(|e| e.into_inner());
        if self.connections.load(Ordering::Relaxed) >= self.limits.max_connections {
            return Err(busy(format!(
                "more than {} gateway connections",
                self.limits.max_connections
            )));
        }
        let mine = per_client.entry(client).or_insert(0);
        if *mine >= self.limits.max_connections_per_client {
            return Err(busy(format!(
                "more than {} gateway connections from {client}",
                self.limits.max_connections_per_client
            )));
        }
        *mine += 1;
        self.connections.fetch_add(1, Ordering::Relaxed);
        Ok(ConnTicket {
            admission: self.clone(),
            client,
        })
    }

    /// Room for a body of `bytes`, or the `503 busy` to answer it with at once.
    pub fn reserve_body(self: &Arc<Self>, bytes: usize) -> Result<BodyTicket, ApiError> {
        let budget = self.limits.body_budget;
        self.body_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|total| *total <= budget)
            })
            .map_err(|held| {
                busy(format!(
                    "a body of {bytes} bytes does not fit the gateway's body budget \
                     ({held} of {budget} bytes are being received)"
                ))
            })?;
        Ok(BodyTicket {
            admission: self.clone(),
            bytes,
        })
    }

    /// Connections admitted now, and from `client`.
    pub fn connections(&self, client: IpAddr) -> (usize, usize) {
        let per_client = self.per_client.lock().unwrap_or_else(|e| e.into_inner());
        (
            self.connections.load(Ordering::Relaxed),
            per_client.get(&client).copied().unwrap_or(0),
        )
    }

    /// Body bytes reserved now.
    pub fn body_bytes(&self) -> usize {
        self.body_bytes.load(Ordering::Relaxed)
    }
}

impl Drop for ConnTicket {
    fn drop(&mut self) {
        let a = &self.admission;
        let mut per_client = a.per_client.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                per_client.remove(&self.client);
            }
        }
        a.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for BodyTicket {
    fn drop(&mut self) {
        self.admission
            .body_bytes
            .fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_client_cannot_take_every_slot_and_slots_come_back() {
        let a = Admission::new(Limits {
            max_connections: 4,
            max_connections_per_client: 2,
            ..Limits::default()
        });
        let (x, y, z): (IpAddr, IpAddr, IpAddr) = (
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "10.0.0.3".parse().unwrap(),
        );
        let x1 = a.open(x).unwrap();
        let _x2 = a.open(x).unwrap();
        let e = a.open(x).unwrap_err();
        assert_eq!((e.status, e.code.as_str()), (503, "busy"));
        assert!(e.message.contains("from 10.0.0.1"), "{e}");
        let _y1 = a.open(y).unwrap();
        let _y2 = a.open(y).unwrap();
        let e = a.open(z).unwrap_err();
        assert!(e.message.contains("more than 4"), "{e}");
        drop(x1);
        assert_eq!(a.connections(x), (3, 1));
        let _z1 = a.open(z).unwrap();
    }

    #[test]
    fn the_body_budget_is_shared_and_given_back() {
        let a = Admission::new(Limits {
            body_budget: 1000,
            ..Limits::default()
        });
        let first = a.reserve_body(700).unwrap();
        let e = a.reserve_body(400).unwrap_err();
        assert_eq!(e.status, 503);
        let _small = a.reserve_body(300).unwrap();
        assert_eq!(a.body_bytes(), 1000);
        drop(first);
        assert_eq!(a.body_bytes(), 300);
        let _again = a.reserve_body(700).unwrap();
    }

    #[test]
    fn the_default_worst_case_stays_under_256_mib() {
        // 64 KiB is the default line limit of a pool, so the largest default reply.
        let worst = Limits::default().worst_case_bytes(64 * 1024);
        assert!(worst < 256 * 1024 * 1024, "{worst}");
        assert_eq!(Limits::default().validate(), Ok(()));
    }

    #[test]
    fn nonsense_limits_are_refused() {
        let bad = [
            Limits {
                max_connections_per_client: 2000,
                ..Limits::default()
            },
            Limits {
                head_timeout: Duration::ZERO,
                ..Limits::default()
            },
            Limits {
                max_connections: 0,
                ..Limits::default()
            },
        ];
        for l in bad {
            assert!(l.validate().is_err(), "{l:?}");
        }
    }
}
