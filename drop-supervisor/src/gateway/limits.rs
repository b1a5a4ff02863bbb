//! What the gateway grants any one client and all of them together, so that hostile or broken
//! clients (slow heads, slow or huge bodies, one address opening every connection) cannot lock
//! others out or grow the daemon's memory without bound.

use std::time::Duration;

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

#[cfg(test)]
mod tests {
    use super::*;

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
