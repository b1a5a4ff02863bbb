//! The floating-IP protocol on the wire: one UDP datagram per message, authenticated and
//! replay-proof.
//!
//! A datagram is a JSON header and body followed by a 32-byte HMAC-SHA256 tag over everything
//! before it, keyed with a key derived from the cluster key (never the gossip key itself). The
//! header names the namespace, the sender, the sender's boot (a random number drawn at start)
//! and a counter that only grows within a boot. A receiver keeps, per sender, the newest
//! (boot, counter) it accepted and refuses anything not newer; a datagram from a boot it has not
//! seen is accepted only when its timestamp is within [`MAX_SKEW`] of the receiver's clock, so
//! a recorded datagram cannot be replayed later than that after a restart.

use std::collections::HashMap;
use std::time::Duration;

use hmac::{Hmac, Mac as _};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::protocol::{Id, Msg};

type HmacSha256 = Hmac<Sha256>;

/// Datagrams from an unknown boot must be this fresh.
pub const MAX_SKEW: Duration = Duration::from_secs(5);
/// Largest datagram accepted (they are ~200 bytes).
pub const MAX_DATAGRAM: usize = 1024;
const TAG: usize = 32;

/// The key, derived from the cluster key for this protocol only.
#[derive(Clone)]
pub struct VipKey([u8; 32]);

impl std::fmt::Debug for VipKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VipKey(..)")
    }
}

impl VipKey {
    /// From the raw cluster key bytes.
    pub fn derive(cluster_key: &[u8]) -> VipKey {
        let mut mac = HmacSha256::new_from_slice(cluster_key).expect("HMAC takes any key length");
        mac.update(b"drop floating ip v1");
        VipKey(mac.finalize().into_bytes().into())
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length")
    }
}

/// Header and message of one datagram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub ns: String,
    pub from: Id,
    pub boot: u64,
    pub ctr: u64,
    /// Sender's clock, Unix ms.
    pub ts: u64,
    pub m: Msg,
    /// The sender's interface MAC, on holder beats (for `vip show` on followers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// Why a datagram was refused (counted, logged at debug).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("datagram of {0} bytes is too short or too long")]
    Size(usize),
    #[error("bad signature")]
    Signature,
    #[error("not a message: {0}")]
    Decode(String),
    #[error("replayed or reordered (counter {ctr} not above {last})")]
    Replay { ctr: u64, last: u64 },
    #[error("stale: timestamp {ts} is more than {MAX_SKEW:?} from now ({now})")]
    Stale { ts: u64, now: u64 },
}

pub fn encode(key: &VipKey, env: &Envelope) -> Vec<u8> {
    let mut buf = serde_json::to_vec(env).expect("an envelope serialises");
    let mut mac = key.mac();
    mac.update(&buf);
    buf.extend_from_slice(&mac.finalize().into_bytes());
    buf
}

/// Checks the tag and decodes; freshness is [`Replay::check`]'s job.
pub fn decode(key: &VipKey, buf: &[u8]) -> Result<Envelope, WireError> {
    if buf.len() <= TAG || buf.len() > MAX_DATAGRAM {
        return Err(WireError::Size(buf.len()));
    }
    let (body, tag) = buf.split_at(buf.len() - TAG);
    let mut mac = key.mac();
    mac.update(body);
    mac.verify_slice(tag).map_err(|_| WireError::Signature)?;
    serde_json::from_slice(body).map_err(|e| WireError::Decode(e.to_string()))
}

/// Per-sender freshness.
#[derive(Debug, Default)]
pub struct Replay {
    last: HashMap<Id, (u64, u64)>,
}

impl Replay {
    /// Accepts `env` if it is newer than anything accepted from its sender (same boot), or from
    /// a new boot with a fresh timestamp; remembers it.
    pub fn check(&mut self, env: &Envelope, now_ms: u64) -> Result<(), WireError> {
        match self.last.get(&env.from) {
            Some((boot, ctr)) if *boot == env.boot => {
                if env.ctr <= *ctr {
                    return Err(WireError::Replay {
                        ctr: env.ctr,
                        last: *ctr,
                    });
                }
            }
            _ => {
                let skew = u64::try_from(MAX_SKEW.as_millis()).unwrap_or(u64::MAX);
                if env.ts.abs_diff(now_ms) > skew {
                    return Err(WireError::Stale {
                        ts: env.ts,
                        now: now_ms,
                    });
                }
            }
        }
        self.last.insert(env.from, (env.boot, env.ctr));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(ctr: u64, boot: u64, ts: u64) -> Envelope {
        Envelope {
            ns: "web".into(),
            from: Id::from_u128(7),
            boot,
            ctr,
            ts,
            m: Msg::Beat {
                term: 3,
                holder: true,
                seq: 9,
                healthy: true,
            },
            mac: Some("02:00:00:00:00:01".into()),
        }
    }

    #[test]
    fn round_trip_and_tamper() {
        let key = VipKey::derive(b"0123456789abcdef");
        let e = env(1, 42, 1000);
        let mut buf = encode(&key, &e);
        assert_eq!(decode(&key, &buf), Ok(e));
        let other = VipKey::derive(b"another key 1234");
        assert_eq!(decode(&other, &buf), Err(WireError::Signature));
        buf[5] ^= 1;
        assert_eq!(decode(&key, &buf), Err(WireError::Signature));
        assert!(matches!(decode(&key, &[0u8; 10]), Err(WireError::Size(10))));
        assert!(matches!(
            decode(&key, &vec![0u8; MAX_DATAGRAM + 1]),
            Err(WireError::Size(_))
        ));
    }

    #[test]
    fn replays_and_stale_boots_are_refused() {
        let mut r = Replay::default();
        assert_eq!(r.check(&env(1, 42, 10_000), 10_000), Ok(()));
        assert_eq!(r.check(&env(2, 42, 10_000), 10_000), Ok(()));
        assert!(matches!(
            r.check(&env(2, 42, 10_000), 10_000),
            Err(WireError::Replay { .. })
        ));
        assert!(matches!(
            r.check(&env(1, 42, 10_000), 10_000),
            Err(WireError::Replay { .. })
        ));
        // A new boot: only with a fresh timestamp.
        assert!(matches!(
            r.check(&env(1, 43, 1_000), 10_000),
            Err(WireError::Stale { .. })
        ));
        assert_eq!(r.check(&env(1, 43, 9_000), 10_000), Ok(()));
        // Within a known boot the timestamp no longer matters (monotonic counter).
        assert_eq!(r.check(&env(5, 43, 0), 60_000), Ok(()));
    }
}
