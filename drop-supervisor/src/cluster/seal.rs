//! The sealed peer transport: node-to-node requests and their replies encrypted and
//! authenticated with AES-256-GCM under keys derived from the cluster key, and replay-proof.
//!
//! A request is `POST /peer` with the header `X-Drop-Peer: 2.<sender>.<counter>.<unix-ms>` and
//! a body that is the sealed `method \n target \n body`:
//!
//! - `<sender>` is a random id drawn when the process starts; every sender has its own request
//!   and reply keys, `HMAC-SHA256(peer key, "req"|"rep" ‖ sender)`, so a nonce is only ever
//!   unique per sender: it is the sender's counter, which grows by one per request.
//! - The associated data is the header value and the recipient's peer address: a request
//!   cannot be replayed to another node, nor its header changed.
//! - The recipient keeps, per sender, the highest counter seen and which of the
//!   [`WINDOW`] below it were seen; anything at or below that window, or seen, is refused. A
//!   sender it has not heard from must send a timestamp within [`MAX_SKEW`] of its clock, so a
//!   recorded request cannot be played to a node that restarted (and forgot its windows) later
//!   than that.
//! - The reply is sealed under the sender's reply key with the request's counter as nonce and
//!   the request's header as associated data: it answers that request and no other, and the
//!   caller knows it came from a holder of the key.
//!
//! Anything that does not open gets 401 `unauthorized_peer`, in the clear and without detail
//! beyond "why": a node without the key learns nothing else.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// A sender not seen before must be this fresh.
pub const MAX_SKEW: Duration = Duration::from_secs(30);
/// Counters this far below the highest one seen may still arrive (calls run in parallel on
/// several connections); older ones are refused.
pub const WINDOW: u64 = 4096;
/// Senders remembered per receiver; the oldest is forgotten beyond this (only senders that
/// hold the key get an entry at all).
const MAX_SENDERS: usize = 4096;
/// The path of every sealed request (the real one travels inside).
pub const PATH: &str = "/peer";

/// Why a sealed message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("unsealed peer request")]
    Missing,
    #[error("malformed peer header")]
    Malformed,
    #[error("peer message does not open (different cluster key, tampered, or not for this node)")]
    Open,
    #[error("replayed peer request")]
    Replay,
    #[error("stale peer request from an unknown sender (check the clocks)")]
    Stale,
}

/// The two keys of one sender.
struct Keys {
    request: Aes256Gcm,
    reply: Aes256Gcm,
}

fn derive(base: &[u8; 32], label: &[u8], sender: u128) -> Aes256Gcm {
    let mut mac =
        <HmacSha256 as hmac::Mac>::new_from_slice(base).expect("HMAC takes any key length");
    mac.update(label);
    mac.update(&sender.to_be_bytes());
    let key: [u8; 32] = mac.finalize().into_bytes().into();
    Aes256Gcm::new_from_slice(&key).expect("a 32-byte key")
}

fn keys(base: &[u8; 32], sender: u128) -> Keys {
    Keys {
        request: derive(base, b"drop peer request v2", sender),
        reply: derive(base, b"drop peer reply v2", sender),
    }
}

fn nonce(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n
}

/// The sending side: this process's sender id, its keys and counter.
pub struct Sealer {
    sender: u128,
    keys: Keys,
    counter: AtomicU64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").finish_non_exhaustive()
    }
}

/// A request ready to send, and what opens its reply.
#[derive(Debug)]
pub struct SealedRequest {
    pub header: String,
    pub body: Vec<u8>,
    pub reply: ReplyOpener,
}

/// Opens the reply to one request.
pub struct ReplyOpener {
    key: Aes256Gcm,
    counter: u64,
    aad: String,
}

impl std::fmt::Debug for ReplyOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyOpener")
            .field("counter", &self.counter)
            .finish()
    }
}

/// A reply: status, content type, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl Sealer {
    /// A sender with a fresh random id (one per process), from the derived peer key.
    pub fn new(base: &[u8; 32]) -> Sealer {
        let sender = uuid::Uuid::new_v4().as_u128();
        Sealer {
            sender,
            keys: keys(base, sender),
            counter: AtomicU64::new(0),
        }
    }

    /// Seals `method target body` for the node whose peer address is `to`.
    pub fn seal(
        &self,
        to: SocketAddr,
        method: &str,
        target: &str,
        body: &[u8],
        now_ms: u64,
    ) -> SealedRequest {
        let counter = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        let header = format!("2.{:032x}.{counter}.{now_ms}", self.sender);
        let aad = format!("{header}\n{to}");
        let mut plain = Vec::with_capacity(method.len() + target.len() + 2 + body.len());
        plain.extend_from_slice(method.as_bytes());
        plain.push(b'\n');
        plain.extend_from_slice(target.as_bytes());
        plain.push(b'\n');
        plain.extend_from_slice(body);
        let sealed = self
            .keys
            .request
            .encrypt(
                Nonce::from_slice(&nonce(counter)),
                Payload {
                    msg: &plain,
                    aad: aad.as_bytes(),
                },
            )
            .expect("AES-GCM seals any message of this size");
        SealedRequest {
            reply: ReplyOpener {
                key: self.keys.reply.clone(),
                counter,
                aad: header.clone(),
            },
            header,
            body: sealed,
        }
    }
}

impl ReplyOpener {
    /// Opens the body of a `200` answer to the request.
    pub fn open(&self, body: &[u8]) -> Result<Reply, SealError> {
        let plain = self
            .key
            .decrypt(
                Nonce::from_slice(&nonce(self.counter)),
                Payload {
                    msg: body,
                    aad: self.aad.as_bytes(),
                },
            )
            .map_err(|_| SealError::Open)?;
        if plain.len() < 3 {
            return Err(SealError::Malformed);
        }
        let status = u16::from_be_bytes([plain[0], plain[1]]);
        let rest = &plain[2..];
        let nl = rest
            .iter()
            .position(|b| *b == b'\n')
            .ok_or(SealError::Malformed)?;
        let content_type =
            String::from_utf8(rest[..nl].to_vec()).map_err(|_| SealError::Malformed)?;
        Ok(Reply {
            status,
            content_type,
            body: rest[nl + 1..].to_vec(),
        })
    }
}

/// A request that opened: what to run, and how to seal its reply.
pub struct Opened {
    pub method: String,
    pub target: String,
    pub body: Vec<u8>,
    pub reply: ReplySealer,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("method", &self.method)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// Seals the reply to one opened request.
pub struct ReplySealer {
    key: Aes256Gcm,
    counter: u64,
    aad: String,
}

impl std::fmt::Debug for ReplySealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplySealer")
            .field("counter", &self.counter)
            .finish()
    }
}

impl ReplySealer {
    pub fn seal(&self, status: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
        let mut plain = Vec::with_capacity(3 + content_type.len() + body.len());
        plain.extend_from_slice(&status.to_be_bytes());
        plain.extend_from_slice(content_type.replace('\n', " ").as_bytes());
        plain.push(b'\n');
        plain.extend_from_slice(body);
        self.key
            .encrypt(
                Nonce::from_slice(&nonce(self.counter)),
                Payload {
                    msg: &plain,
                    aad: self.aad.as_bytes(),
                },
            )
            .expect("AES-GCM seals any message of this size")
    }
}

/// Per sender: the highest counter seen and a bitmap of the [`WINDOW`] below it.
#[derive(Debug, Clone)]
struct Window {
    top: u64,
    seen: Vec<u64>,
    /// Order of first sight, for forgetting the oldest sender.
    born: u64,
}

impl Window {
    fn new(born: u64) -> Window {
        Window {
            top: 0,
            seen: vec![0; (WINDOW / 64) as usize],
            born,
        }
    }

    fn bit(&mut self, counter: u64) -> (usize, u64) {
        let i = counter % WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    /// Whether `counter` is new; records it.
    fn accept(&mut self, counter: u64) -> bool {
        if counter == 0 || counter + WINDOW <= self.top {
            return false;
        }
        if counter > self.top {
            // Clear the slots between the old top and the new one (they are new counters).
            let clear = (counter - self.top).min(WINDOW);
            for c in (counter + 1 - clear)..=counter {
                let (w, b) = self.bit(c);
                self.seen[w] &= !b;
            }
            self.top = counter;
        }
        let (w, b) = self.bit(counter);
        if self.seen[w] & b != 0 {
            return false;
        }
        self.seen[w] |= b;
        true
    }
}

/// Senders seen: their replay windows and keys.
type Senders = HashMap<u128, (Window, std::sync::Arc<Keys>)>;

/// The receiving side: keys of the senders seen and their replay windows.
pub struct Opener {
    base: [u8; 32],
    /// Sender → its window and keys, and how many senders were ever seen (for `born`).
    senders: Mutex<(Senders, u64)>,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener").finish_non_exhaustive()
    }
}

impl Opener {
    pub fn new(base: &[u8; 32]) -> Opener {
        Opener {
            base: *base,
            senders: Mutex::new((HashMap::new(), 0)),
        }
    }

    /// Opens a request addressed to `me` (this node's peer address as the others know it).
    pub fn open(
        &self,
        header: Option<&str>,
        body: &[u8],
        me: &str,
        now_ms: u64,
    ) -> Result<Opened, SealError> {
        let header = header.ok_or(SealError::Missing)?;
        let mut parts = header.split('.');
        let (Some("2"), Some(sender), Some(counter), Some(ts), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(SealError::Malformed);
        };
        let sender = u128::from_str_radix(sender, 16).map_err(|_| SealError::Malformed)?;
        let counter: u64 = counter.parse().map_err(|_| SealError::Malformed)?;
        let ts: u64 = ts.parse().map_err(|_| SealError::Malformed)?;
        let known = {
            let s = self.senders.lock().unwrap_or_else(|e| e.into_inner());
            s.0.get(&sender).map(|(_, k)| k.clone())
        };
        let keys = known.unwrap_or_else(|| std::sync::Arc::new(keys(&self.base, sender)));
        let aad = format!("{header}\n{me}");
        let plain = keys
            .request
            .decrypt(
                Nonce::from_slice(&nonce(counter)),
                Payload {
                    msg: body,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| SealError::Open)?;
        // Authentic: now the replay checks, and only now an entry for the sender.
        {
            let mut guard = self.senders.lock().unwrap_or_else(|e| e.into_inner());
            let (map, births) = &mut *guard;
            if !map.contains_key(&sender) {
                let skew = u64::try_from(MAX_SKEW.as_millis()).unwrap_or(u64::MAX);
                if ts.abs_diff(now_ms) > skew {
                    return Err(SealError::Stale);
                }
                if map.len() >= MAX_SENDERS
                    && let Some(oldest) =
                        map.iter().min_by_key(|(_, (w, _))| w.born).map(|(k, _)| *k)
                {
                    map.remove(&oldest);
                }
                *births += 1;
                map.insert(sender, (Window::new(*births), keys.clone()));
            }
            let (window, _) = map.get_mut(&sender).expect("inserted above");
            if !window.accept(counter) {
                return Err(SealError::Replay);
            }
        }
        let mut split = plain.splitn(3, |b| *b == b'\n');
        let method = split.next().ok_or(SealError::Malformed)?;
        let target = split.next().ok_or(SealError::Malformed)?;
        let body = split.next().ok_or(SealError::Malformed)?;
        Ok(Opened {
            method: String::from_utf8(method.to_vec()).map_err(|_| SealError::Malformed)?,
            target: String::from_utf8(target.to_vec()).map_err(|_| SealError::Malformed)?,
            body: body.to_vec(),
            reply: ReplySealer {
                key: keys.reply.clone(),
                counter,
                aad: header.to_string(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn base(b: u8) -> [u8; 32] {
        [b; 32]
    }

    fn to() -> SocketAddr {
        "10.0.0.2:7947".parse().unwrap()
    }

    #[test]
    fn request_and_reply_round_trip() {
        let sealer = Sealer::new(&base(1));
        let opener = Opener::new(&base(1));
        let req = sealer.seal(to(), "POST", "/api/v1/echo?cast", b"hello\nworld", NOW);
        assert!(
            !req.body.windows(5).any(|w| w == b"hello"),
            "the body is encrypted"
        );
        let opened = opener
            .open(Some(&req.header), &req.body, "10.0.0.2:7947", NOW)
            .unwrap();
        assert_eq!(opened.method, "POST");
        assert_eq!(opened.target, "/api/v1/echo?cast");
        assert_eq!(opened.body, b"hello\nworld");
        let sealed = opened.reply.seal(503, "application/json", b"{\"e\":1}");
        let reply = req.reply.open(&sealed).unwrap();
        assert_eq!(
            reply,
            Reply {
                status: 503,
                content_type: "application/json".into(),
                body: b"{\"e\":1}".to_vec()
            }
        );
    }

    #[test]
    fn a_replayed_request_is_refused() {
        let sealer = Sealer::new(&base(1));
        let opener = Opener::new(&base(1));
        let req = sealer.seal(to(), "POST", "/api/v1/p", b"x", NOW);
        opener
            .open(Some(&req.header), &req.body, "10.0.0.2:7947", NOW)
            .unwrap();
        assert_eq!(
            opener
                .open(Some(&req.header), &req.body, "10.0.0.2:7947", NOW)
                .unwrap_err(),
            SealError::Replay
        );
    }

    #[test]
    fn out_of_order_within_the_window_is_fine_older_is_not() {
        let sealer = Sealer::new(&base(1));
        let opener = Opener::new(&base(1));
        let first = sealer.seal(to(), "POST", "/a", b"", NOW);
        let mut later = Vec::new();
        for _ in 0..10 {
            later.push(sealer.seal(to(), "POST", "/a", b"", NOW));
        }
        // The tenth arrives first, then the others, then the first.
        for r in later.iter().rev() {
            opener
                .open(Some(&r.header), &r.body, "10.0.0.2:7947", NOW)
                .unwrap();
        }
        opener
            .open(Some(&first.header), &first.body, "10.0.0.2:7947", NOW)
            .unwrap();
        // Far behind the window.
        let old = sealer.seal(to(), "POST", "/a", b"", NOW);
        for _ in 0..WINDOW + 5 {
            let r = sealer.seal(to(), "POST", "/a", b"", NOW);
            let _ = opener.open(Some(&r.header), &r.body, "10.0.0.2:7947", NOW);
        }
        assert_eq!(
            opener
                .open(Some(&old.header), &old.body, "10.0.0.2:7947", NOW)
                .unwrap_err(),
            SealError::Replay
        );
    }

    #[test]
    fn a_flipped_byte_anywhere_is_refused() {
        let sealer = Sealer::new(&base(1));
        let opener = Opener::new(&base(1));
        let req = sealer.seal(to(), "POST", "/api/v1/p", b"payload", NOW);
        for i in 0..req.body.len() {
            let mut body = req.body.clone();
            body[i] ^= 0x01;
            assert_eq!(
                opener
                    .open(Some(&req.header), &body, "10.0.0.2:7947", NOW)
                    .unwrap_err(),
                SealError::Open,
                "byte {i}"
            );
        }
        // The header is bound too: another timestamp does not open.
        let forged = req
            .header
            .rsplit_once('.')
            .map(|(h, _)| format!("{h}.{}", NOW + 1))
            .unwrap();
        assert_eq!(
            opener
                .open(Some(&forged), &req.body, "10.0.0.2:7947", NOW)
                .unwrap_err(),
            SealError::Open
        );
        // And it still opens untouched (nothing was recorded by the failures).
        opener
            .open(Some(&req.header), &req.body, "10.0.0.2:7947", NOW)
            .unwrap();
    }

    #[test]
    fn another_key_or_another_recipient_cannot_open() {
        let sealer = Sealer::new(&base(2));
        let req = sealer.seal(to(), "POST", "/api/v1/p", b"x", NOW);
        assert_eq!(
            Opener::new(&base(1))
                .open(Some(&req.header), &req.body, "10.0.0.2:7947", NOW)
                .unwrap_err(),
            SealError::Open
        );
        assert_eq!(
            Opener::new(&base(2))
                .open(Some(&req.header), &req.body, "10.0.0.3:7947", NOW)
                .unwrap_err(),
            SealError::Open
        );
    }

    #[test]
    fn an_unknown_sender_must_be_fresh() {
        let sealer = Sealer::new(&base(1));
        let opener = Opener::new(&base(1));
        let req = sealer.seal(to(), "POST", "/a", b"", NOW - 31_000);
        assert_eq!(
            opener
                .open(Some(&req.header), &req.body, "10.0.0.2:7947", NOW)
                .unwrap_err(),
            SealError::Stale
        );
    }

    #[test]
    fn a_reply_answers_its_own_request_only() {
        let sealer = Sealer::new(&base(1));
        let opener = Opener::new(&base(1));
        let a = sealer.seal(to(), "POST", "/a", b"", NOW);
        let b = sealer.seal(to(), "POST", "/b", b"", NOW);
        let oa = opener
            .open(Some(&a.header), &a.body, "10.0.0.2:7947", NOW)
            .unwrap();
        let reply_to_a = oa.reply.seal(200, "text/plain", b"for a");
        assert_eq!(b.reply.open(&reply_to_a).unwrap_err(), SealError::Open);
        let mut tampered = reply_to_a.clone();
        tampered[0] ^= 1;
        assert_eq!(a.reply.open(&tampered).unwrap_err(), SealError::Open);
        assert_eq!(a.reply.open(&reply_to_a).unwrap().body, b"for a");
    }

    #[test]
    fn malformed_headers_are_refused_before_any_crypto() {
        let opener = Opener::new(&base(1));
        for h in ["", "1.2.3.4", "2.zz.1.1", "2.00.x.1", "2.00.1.1.1", "2"] {
            assert_eq!(
                opener.open(Some(h), b"", "x", NOW).unwrap_err(),
                SealError::Malformed,
                "{h:?}"
            );
        }
        assert_eq!(
            opener.open(None, b"", "x", NOW).unwrap_err(),
            SealError::Missing
        );
    }
}
