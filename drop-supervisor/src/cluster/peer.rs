//! The peer transport: node-to-node calls for cluster-wide posting (DESIGN §5).
//!
//! A peer request is the gateway's `POST /api/v1/<pool>` sent to another node's peer listener,
//! signed with a key derived from the cluster key: header `X-Drop-Peer: <unix-ms>.<hex>` where
//! `<hex>` is HMAC-SHA256 over the timestamp, method, path (with its query) and body. The listener refuses
//! unsigned, wrongly signed, or stale (more than [`MAX_SKEW`] away) requests with 401 and never
//! forwards further, so a call crosses at most one hop. A signature can be replayed within the
//! skew window by someone who captured it; the listener is meant for the cluster network.
//!
//! [`Forwarder`] is the client side: it picks a node that runs the pool from the registry the
//! reconcile loop keeps, and fails calls in flight to a node at once when membership declares it
//! gone (their sockets are shut down).

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::state::physical_now_ms;
use crate::error::ApiError;
use crate::http;
use crate::runtime::Forward;

/// Signatures older or newer than this are refused.
pub const MAX_SKEW: Duration = Duration::from_secs(30);
/// Header carrying the signature.
pub const HEADER: &str = "X-Drop-Peer";
/// Connecting to a peer gives up after this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A forwarded call gives up after this (the remote pool answers 504 on its own timeout first).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

type HmacSha256 = Hmac<Sha256>;

/// The peer key, derived from the cluster key so the gossip key is never used twice: it signs
/// multicast announcements, and its [`seal`](super::seal) sender and opener carry every
/// node-to-node call (clones share them: one sender id and one set of replay windows per
/// process).
#[derive(Clone)]
pub struct PeerKey {
    key: [u8; 32],
    sealer: Arc<super::seal::Sealer>,
    opener: Arc<super::seal::Opener>,
}

impl std::fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerKey(..)")
    }
}

impl PeerKey {
    /// Derives the key from the cluster key's text (base64, as in the key file).
    pub fn derive(cluster_key: &str) -> Result<PeerKey, String> {
        let key = super::membership::parse_key(cluster_key)?;
        let mut mac = HmacSha256::new_from_slice(key.as_ref()).expect("HMAC takes any key length");
        mac.update(b"drop peer transport v1");
        let key: [u8; 32] = mac.finalize().into_bytes().into();
        Ok(PeerKey {
            key,
            sealer: Arc::new(super::seal::Sealer::new(&key)),
            opener: Arc::new(super::seal::Opener::new(&key)),
        })
    }

    /// Seals a call for the node whose peer address is `to`.
    pub fn seal(
        &self,
        to: SocketAddr,
        method: &str,
        target: &str,
        body: &[u8],
    ) -> super::seal::SealedRequest {
        self.sealer
            .seal(to, method, target, body, physical_now_ms())
    }

    /// Opens a call addressed to `me`.
    pub fn open(
        &self,
        header: Option<&str>,
        body: &[u8],
        me: &str,
    ) -> Result<super::seal::Opened, super::seal::SealError> {
        self.opener.open(header, body, me, physical_now_ms())
    }

    pub fn from_file(path: &Path) -> Result<PeerKey, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        PeerKey::derive(&text)
    }

    fn mac(&self, ts_ms: u64, method: &str, path: &str, body: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(ts_ms.to_string().as_bytes());
        mac.update(b"\n");
        mac.update(method.as_bytes());
        mac.update(b"\n");
        mac.update(path.as_bytes());
        mac.update(b"\n");
        mac.update(body);
        mac
    }

    /// The header value for a request made at `ts_ms`.
    pub fn sign(&self, ts_ms: u64, method: &str, path: &str, body: &[u8]) -> String {
        let tag = self.mac(ts_ms, method, path, body).finalize().into_bytes();
        let mut out = format!("{ts_ms}.");
        for b in tag {
            let _ = write!(out, "{b:02x}");
        }
        out
    }

    /// Checks a header value against the request, at time `now_ms`.
    pub fn verify(
        &self,
        header: Option<&str>,
        method: &str,
        path: &str,
        body: &[u8],
        now_ms: u64,
    ) -> Result<(), &'static str> {
        let header = header.ok_or("unsigned peer request")?;
        let (ts, hex) = header.split_once('.').ok_or("malformed peer signature")?;
        let ts: u64 = ts.parse().map_err(|_| "malformed peer signature")?;
        let skew = u64::try_from(MAX_SKEW.as_millis()).unwrap_or(u64::MAX);
        if ts.abs_diff(now_ms) > skew {
            return Err("stale peer signature (check the clocks)");
        }
        let tag = decode_hex(hex).ok_or("malformed peer signature")?;
        self.mac(ts, method, path, body)
            .verify_slice(&tag)
            .map_err(|_| "wrong peer signature (different cluster key?)")
    }
}

/// A peer's answer to a sealed request: a sealed `200` opens into the real status and body; a
/// plain `401` (the peer could not open the request) is passed on as it is.
fn open_answer(
    reply: &super::seal::ReplyOpener,
    r: http::Response,
) -> Result<(u16, Vec<u8>), super::seal::SealError> {
    if r.status == 200 {
        let opened = reply.open(&r.body)?;
        Ok((opened.status, opened.body))
    } else if r.status == 401 {
        Ok((r.status, r.body))
    } else {
        Err(super::seal::SealError::Open)
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Where a pool runs elsewhere: the forwarding table the [`Forwarder`] reads. The reconcile
/// loop (`node`) writes it from the registry entries of the replicated state.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    /// Pool name → (node id, node name, peer address) of up nodes other than this one.
    pub pools: HashMap<String, Vec<(String, String, SocketAddr)>>,
    /// Ids of nodes that are up.
    pub up: BTreeSet<String>,
}

/// A cast waiting for the sender thread.
struct Cast {
    node: String,
    addr: SocketAddr,
    pool: String,
    body: Vec<u8>,
    all: bool,
}

/// Casts waiting to be sent; more are dropped (and logged) rather than block a pool's output.
const CAST_QUEUE: usize = 4096;

/// Streams of calls in flight, by node id, so a lost node's calls can be cut at once.
type InFlight = Mutex<HashMap<String, HashMap<u64, TcpStream>>>;

/// The client side of the peer transport.
pub struct Forwarder {
    registry: Arc<RwLock<Registry>>,
    key: PeerKey,
    next: AtomicUsize,
    ids: AtomicU64,
    inflight: Arc<InFlight>,
    casts: std::sync::mpsc::SyncSender<Cast>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder").finish_non_exhaustive()
    }
}

impl Forwarder {
    /// Also starts a watcher thread that cuts calls to nodes membership no longer sees up; it
    /// ends when the forwarder is dropped.
    pub fn new(registry: Arc<RwLock<Registry>>, key: PeerKey) -> Forwarder {
        let inflight: Arc<InFlight> = Arc::default();
        let weak: Weak<InFlight> = Arc::downgrade(&inflight);
        let reg = registry.clone();
        let _ = std::thread::Builder::new()
            .name("drop-peer-watch".into())
            .spawn(move || {
                while let Some(inflight) = weak.upgrade() {
                    let up = reg.read().unwrap_or_else(|e| e.into_inner()).up.clone();
                    let map = inflight.lock().unwrap_or_else(|e| e.into_inner());
                    for (node, streams) in map.iter() {
                        if !up.contains(node) {
                            for s in streams.values() {
                                let _ = s.shutdown(Shutdown::Both);
                            }
                        }
                    }
                    drop(map);
                    drop(inflight);
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        let (casts, rx) = std::sync::mpsc::sync_channel::<Cast>(CAST_QUEUE);
        let sender_key = key.clone();
        let _ = std::thread::Builder::new()
            .name("drop-peer-cast".into())
            .spawn(move || {
                for c in rx {
                    let path = format!("/api/v1/{}?cast{}", c.pool, if c.all { "=all" } else { "" });
                    let sealed = sender_key.seal(c.addr, "POST", &path, &c.body);
                    let sent = TcpStream::connect_timeout(&c.addr, CONNECT_TIMEOUT).and_then(|mut s| {
                        s.set_read_timeout(Some(CONNECT_TIMEOUT * 5))?;
                        http::roundtrip_with(&mut s, "POST", super::seal::PATH, Some(&sealed.body), &[(HEADER, &sealed.header)])
                    });
                    match sent.map(|r| open_answer(&sealed.reply, r)) {
                        Ok(Ok((202, _))) => {}
                        Ok(Ok((status, _))) => tracing::warn!(node = %c.node, pool = %c.pool, status, "peer refused a cast"),
                        Ok(Err(e)) => tracing::warn!(node = %c.node, pool = %c.pool, error = %e, "peer answer to a cast refused"),
                        Err(e) => tracing::warn!(node = %c.node, pool = %c.pool, error = %e, "cast to a peer failed"),
                    }
                }
            });
        Forwarder {
            registry,
            key,
            next: AtomicUsize::new(0),
            ids: AtomicU64::new(0),
            inflight,
            casts,
        }
    }

    fn instances(&self, pool: &str) -> Vec<(String, String, SocketAddr)> {
        let reg = self.registry.read().unwrap_or_else(|e| e.into_inner());
        reg.pools
            .get(pool)
            .map(|v| {
                v.iter()
                    .filter(|(id, _, _)| reg.up.contains(id))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// One signed call. `Err(None)`: could not connect (safe to try another node).
    fn call_one(
        &self,
        node: &str,
        name: &str,
        addr: SocketAddr,
        pool: &str,
        body: &[u8],
    ) -> Result<Vec<u8>, Option<ApiError>> {
        self.sealed(
            node,
            name,
            addr,
            ("POST", &format!("/api/v1/{pool}"), pool),
            body,
        )
    }

    /// A sealed `GET path` to one node's peer listener (`/peer/…` requests its daemon serves,
    /// such as another node's service logs). `id` is the node's id: membership cuts the call
    /// when it declares that node gone. The node is named in errors.
    pub fn request(
        &self,
        id: &str,
        name: &str,
        addr: SocketAddr,
        path: &str,
    ) -> Result<Vec<u8>, ApiError> {
        // A read-only request whose connection broke (`peer_lost`) is asked once more on a new
        // connection: it changes nothing, so asking twice is safe. Pool calls are never retried.
        let ask = || self.sealed(id, name, addr, ("GET", path, path), b"");
        let first = ask();
        let answer = match &first {
            Err(Some(e)) if e.code == "peer_lost" => {
                tracing::debug!(node = name, error = %e.message, "peer request lost; asking again");
                ask()
            }
            _ => first,
        };
        answer.map_err(|e| {
            e.unwrap_or_else(|| {
                ApiError::new(
                    503,
                    "peer_unreachable",
                    format!("cannot connect to {name} ({addr})"),
                )
            })
        })
    }

    fn sealed(
        &self,
        node: &str,
        name: &str,
        addr: SocketAddr,
        (method, path, pool): (&str, &str, &str),
        body: &[u8],
    ) -> Result<Vec<u8>, Option<ApiError>> {
        let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|_| None)?;
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(CALL_TIMEOUT));
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = stream.try_clone() {
            self.inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(node.to_string())
                .or_default()
                .insert(id, clone);
        }
        let sealed = self.key.seal(addr, method, path, body);
        let result = http::roundtrip_with(
            &mut stream,
            "POST",
            super::seal::PATH,
            Some(&sealed.body),
            &[(HEADER, &sealed.header)],
        )
        .map(|r| open_answer(&sealed.reply, r));
        {
            let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(m) = map.get_mut(node) {
                m.remove(&id);
                if m.is_empty() {
                    map.remove(node);
                }
            }
        }
        match result {
            Ok(Err(e)) => Err(Some(ApiError::new(
                502,
                "peer_unauthenticated",
                format!(
                    "node {name} ({addr}) answered the call of {pool} with something that does not open: {e}"
                ),
            ))),
            Ok(Ok((200, body))) => Ok(body),
            Ok(Ok((status, body))) => {
                let r = http::Response { status, body };
                let (code, message) = serde_json::from_slice::<crate::error::ErrorBody>(&r.body)
                    .map(|b| (b.error.code, b.error.message))
                    .unwrap_or_else(|_| {
                        (
                            "peer_error".into(),
                            String::from_utf8_lossy(&r.body).into_owned(),
                        )
                    });
                Err(Some(ApiError::new(r.status, &code, message)))
            }
            Err(e) => Err(Some(ApiError::new(
                503,
                "peer_lost",
                format!("node {name} ({addr}) did not answer the call of {pool}: {e}"),
            ))),
        }
    }
}

impl Forward for Forwarder {
    fn call_any(&self, pool: &str, body: &[u8]) -> Option<Result<Vec<u8>, ApiError>> {
        let nodes = self.instances(pool);
        if nodes.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last = None;
        for i in 0..nodes.len() {
            let (id, name, addr) = &nodes[(start + i) % nodes.len()];
            match self.call_one(id, name, *addr, pool, body) {
                Ok(reply) => return Some(Ok(reply)),
                Err(Some(e)) => return Some(Err(e)),
                // Not connected, so nothing was sent: the next node may take it.
                Err(None) => last = Some(format!("{name} ({addr})")),
            }
        }
        Some(Err(ApiError::new(
            503,
            "peer_unreachable",
            format!(
                "no node running {pool} could be reached (last tried {})",
                last.unwrap_or_default()
            ),
        )))
    }

    fn cast(&self, pool: &str, body: &[u8], all: bool, every: bool) -> bool {
        let nodes = self.instances(pool);
        if nodes.is_empty() {
            return false;
        }
        let chosen: Vec<_> = if every {
            nodes
        } else {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % nodes.len();
            vec![nodes[i].clone()]
        };
        let mut queued = true;
        for (_, name, addr) in chosen {
            let c = Cast {
                node: name,
                addr,
                pool: pool.to_string(),
                body: body.to_vec(),
                all,
            };
            if self.casts.try_send(c).is_err() {
                tracing::warn!(pool, "peer cast queue full; event dropped");
                queued = false;
            }
        }
        queued
    }

    fn call_every(&self, pool: &str, body: &[u8]) -> Vec<(String, Result<Vec<u8>, ApiError>)> {
        let nodes = self.instances(pool);
        std::thread::scope(|s| {
            let handles: Vec<_> = nodes
                .iter()
                .map(|(id, name, addr)| {
                    s.spawn(move || {
                        let r = self.call_one(id, name, *addr, pool, body).map_err(|e| {
                            e.unwrap_or_else(|| {
                                ApiError::new(
                                    503,
                                    "peer_unreachable",
                                    format!("cannot connect to {name} ({addr})"),
                                )
                            })
                        });
                        (name.clone(), r)
                    })
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> PeerKey {
        PeerKey::derive(text).unwrap()
    }

    const K1: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    const K2: &str = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=";

    #[test]
    fn a_signature_verifies_with_the_same_key_only() {
        let (a, b) = (key(K1), key(K2));
        let sig = a.sign(1_000_000, "POST", "/api/v1/echo", b"hi");
        assert_eq!(
            a.verify(Some(&sig), "POST", "/api/v1/echo", b"hi", 1_000_500),
            Ok(())
        );
        assert!(
            b.verify(Some(&sig), "POST", "/api/v1/echo", b"hi", 1_000_500)
                .is_err()
        );
    }

    #[test]
    fn any_change_to_the_request_breaks_the_signature() {
        let a = key(K1);
        let sig = a.sign(1_000_000, "POST", "/api/v1/echo", b"hi");
        assert!(
            a.verify(Some(&sig), "POST", "/api/v1/echo", b"ho", 1_000_000)
                .is_err()
        );
        assert!(
            a.verify(Some(&sig), "POST", "/api/v1/other", b"hi", 1_000_000)
                .is_err()
        );
        assert!(
            a.verify(Some(&sig), "GET", "/api/v1/echo", b"hi", 1_000_000)
                .is_err()
        );
        let forged = sig.replacen("1000000", "1000001", 1);
        assert!(
            a.verify(Some(&forged), "POST", "/api/v1/echo", b"hi", 1_000_000)
                .is_err()
        );
    }

    #[test]
    fn stale_missing_and_malformed_signatures_are_refused() {
        let a = key(K1);
        let sig = a.sign(1_000_000, "POST", "/p", b"");
        assert_eq!(
            a.verify(Some(&sig), "POST", "/p", b"", 1_000_000 + 31_000),
            Err("stale peer signature (check the clocks)")
        );
        assert_eq!(
            a.verify(None, "POST", "/p", b"", 0),
            Err("unsigned peer request")
        );
        assert!(a.verify(Some("x.zz"), "POST", "/p", b"", 0).is_err());
        assert!(a.verify(Some("12"), "POST", "/p", b"", 0).is_err());
    }

    /// A peer listener that opens one sealed request, waits `delay`, and answers 200 with the
    /// request's target as the body.
    fn slow_peer(k: PeerKey, delay: Duration) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut reader = http::BlockingReader::new(conn.try_clone().unwrap(), 1 << 20);
            let req = reader.next_request().unwrap().unwrap();
            let opened = k
                .open(req.peer_auth.as_deref(), &req.body, &addr.to_string())
                .unwrap();
            std::thread::sleep(delay);
            let body = opened
                .reply
                .seal(200, "text/plain", opened.target.as_bytes());
            let mut out = Vec::new();
            http::encode_response(200, "application/octet-stream", &body, true, &mut out);
            let mut w = conn;
            let _ = std::io::Write::write_all(&mut w, &out);
        });
        addr
    }

    /// Membership's watcher cuts calls to nodes it does not see up, by node id. A read-only
    /// request was registered under the node's name, so the watcher cut every one that took
    /// longer than its 50 ms tick (the "broken pipe" a CI run once saw from `/peer/node`).
    #[test]
    fn a_slow_peer_request_to_an_up_node_is_not_cut() {
        let registry = Arc::new(RwLock::new(Registry {
            pools: HashMap::new(),
            up: ["id-n1".to_string()].into(),
        }));
        let f = Forwarder::new(registry, key(K1));
        let addr = slow_peer(key(K1), Duration::from_millis(300));
        let body = f
            .request("id-n1", "n1", addr, "/peer/node")
            .expect("answered");
        assert_eq!(body, b"/peer/node");
    }

    #[test]
    fn the_peer_key_is_not_the_gossip_key() {
        let k = key(K1);
        let raw = super::super::membership::parse_key(K1).unwrap();
        assert_ne!(&k.key[..], raw.as_ref());
    }
}
