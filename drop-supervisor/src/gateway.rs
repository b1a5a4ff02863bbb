//! The gateway: `POST /api/v1/<pool>` with a text body, answered with the function's reply
//! (DESIGN.md §5).
//!
//! | status | code | when |
//! |---|---|---|
//! | 200 | — | the reply, `text/plain` |
//! | 401 | `unauthorized` | a bearer token is configured and the request lacks it |
//! | 404 | `unknown_pool` / `not_found` | no such pool / not `/api/v1/<pool>` |
//! | 405 | `method_not_allowed` | not POST |
//! | 413 | `payload_too_large` | body longer than the pool's line limit |
//! | 429 | `overloaded` | the pool's queue is full |
//! | 503 | `worker_error` / `unavailable` / `busy` | worker failed / pool failed or stopped / too many connections |
//! | 504 | `timeout` | no reply before the pool's timeout |
//!
//! `GET /metrics` answers the Prometheus text of every pool.
//!
//! In a cluster, a pool this node does not run is called on a node that does (`any`, through
//! the peer transport, see `cluster::peer`); `POST /api/v1/<pool>?every` calls every instance
//! and answers `{"replies": [{"node", "status", "reply" | "error"}]}`. Errors of a forwarded
//! call keep the remote status; `503 peer_lost` means the node running the call went away and
//! `503 peer_unreachable` that no node running the pool could be reached. `?cast` (`?cast=all`:
//! every worker) queues the body without waiting and answers `202 {"queued": true}`; a pool
//! that is not here is cast to one node that runs it. The same server,
//! started with a peer key, is the peer listener: it accepts only signed requests (401
//! `unauthorized_peer` otherwise) and never forwards.
//!
//! One thread per connection, blocking I/O: the connection's thread parses the request and
//! calls the pool itself, so a request never waits for another thread to wake up.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tracing::{debug, warn};

use crate::api::ApiError;
use crate::cluster::peer::{Forward, PeerKey};
use crate::http::{self, BlockingReader, HttpError, Request};
use crate::worker::pool::{CallError, Pool};

/// Requests are refused past this body size before any pool is looked at.
pub const MAX_BODY: usize = 16 * 1024 * 1024;
/// Connections served at once; more get `503 busy`.
pub const MAX_CONNECTIONS: usize = 1024;
/// A keep-alive connection idle this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const PREFIX: &str = "/api/v1/";

/// Finds pools by name; the runtime implements it.
pub trait PoolLookup: Send + Sync {
    fn pool(&self, name: &str) -> Option<Pool>;
    /// Prometheus text for `GET /metrics`; `None` when this server has none.
    fn metrics(&self) -> Option<String> {
        None
    }
    /// Queues `payload` for one worker of the pool (`all`: every worker) without waiting;
    /// `None` when the pool is not here.
    fn cast(&self, name: &str, payload: &[u8], all: bool) -> Option<Result<(), ApiError>> {
        let _ = (name, payload, all);
        None
    }
}

#[derive(Debug, Clone, Default)]
pub struct GatewayOptions {
    /// `Authorization: Bearer <token>` required when set.
    pub token: Option<String>,
    /// Set: this is the peer listener; requests must be signed with this key.
    pub peer_key: Option<PeerKey>,
    /// How `?every` answers name this node's own instance (default `local`).
    pub node_name: Option<String>,
}

/// Where calls for pools this node does not run go; set once the cluster is up.
type ForwardSlot = Arc<OnceLock<Arc<dyn Forward>>>;

/// A running gateway; dropping it does not stop it, [`Gateway::stop`] does.
#[derive(Debug)]
pub struct Gateway {
    addr: std::net::SocketAddr,
    stopping: Arc<AtomicBool>,
    acceptor: Option<std::thread::JoinHandle<()>>,
    forward: ForwardSlot,
}

impl Gateway {
    /// Serves `listener` on its own threads.
    pub fn start(
        listener: TcpListener,
        lookup: Arc<dyn PoolLookup>,
        options: GatewayOptions,
    ) -> std::io::Result<Gateway> {
        let addr = listener.local_addr()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let active = Arc::new(AtomicUsize::new(0));
        let stop = stopping.clone();
        let options = Arc::new(options);
        let forward: ForwardSlot = Arc::default();
        let fwd = forward.clone();
        let acceptor = std::thread::Builder::new()
            .name("drop-gateway".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                    let stream = match stream {
                        Ok(s) => s,
                        Err(e) => {
                            warn!(error = %e, "gateway accept failed");
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                    };
                    if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                        active.fetch_sub(1, Ordering::AcqRel);
                        let err = ApiError::new(
                            503,
                            "busy",
                            format!("more than {MAX_CONNECTIONS} gateway connections"),
                        );
                        let _ = (&stream).write_all(&http::encode_json_response(
                            err.status,
                            &err.to_json(),
                            true,
                        ));
                        continue;
                    }
                    let (lookup, options, active, stop, fwd) = (
                        lookup.clone(),
                        options.clone(),
                        active.clone(),
                        stop.clone(),
                        fwd.clone(),
                    );
                    let spawned = std::thread::Builder::new()
                        .name("drop-gw-conn".into())
                        .stack_size(256 * 1024)
                        .spawn(move || {
                            let ctx = Ctx {
                                lookup: &*lookup,
                                options: &options,
                                forward: fwd.get().map(|f| &**f),
                            };
                            serve_connection(stream, &ctx, &stop);
                            active.fetch_sub(1, Ordering::AcqRel);
                        });
                    if let Err(e) = spawned {
                        warn!(error = %e, "cannot start a gateway connection thread");
                    }
                }
            })?;
        Ok(Gateway {
            addr,
            stopping,
            acceptor: Some(acceptor),
            forward,
        })
    }

    /// Sends calls for pools this node does not run to other nodes (set once).
    pub fn set_forwarder(&self, forward: Arc<dyn Forward>) {
        let _ = self.forward.set(forward);
    }

    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Stops accepting; open connections end after their current request.
    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

fn error_response(err: &ApiError, close: bool, out: &mut Vec<u8>) {
    http::encode_response(err.status, "application/json", &err.to_json(), close, out);
}

/// Maps a pool's call error to the gateway's answer.
pub fn call_error(err: &CallError) -> ApiError {
    let msg = err.to_string();
    match err {
        CallError::Overloaded(_) => ApiError::new(429, "overloaded", msg),
        CallError::Timeout(_) => ApiError::new(504, "timeout", msg),
        CallError::Worker { .. } => ApiError::new(503, "worker_error", msg),
        CallError::Unavailable { .. } => ApiError::new(503, "unavailable", msg),
        CallError::TooLarge { .. } => ApiError::new(413, "payload_too_large", msg),
    }
}

/// What a connection's requests are served with.
struct Ctx<'a> {
    lookup: &'a dyn PoolLookup,
    options: &'a GatewayOptions,
    forward: Option<&'a dyn Forward>,
}

fn handle(req: &Request, ctx: &Ctx<'_>, out: &mut Vec<u8>) {
    let close = req.close;
    if req.path == "/metrics"
        && req.method == "GET"
        && ctx.options.peer_key.is_none()
        && let Some(text) = ctx.lookup.metrics()
    {
        return http::encode_response(
            200,
            "text/plain; version=0.0.4",
            text.as_bytes(),
            close,
            out,
        );
    }
    let Some(name) = req
        .path
        .strip_prefix(PREFIX)
        .filter(|n| !n.is_empty() && !n.contains('/'))
    else {
        let err = ApiError::new(
            404,
            "not_found",
            format!("no such endpoint: {}; use POST {PREFIX}<pool>", req.path),
        );
        return error_response(&err, close, out);
    };
    if req.method != "POST" {
        let err = ApiError::new(
            405,
            "method_not_allowed",
            format!("{} is not allowed; use POST", req.method),
        );
        return error_response(&err, close, out);
    }
    if let Some(key) = &ctx.options.peer_key {
        let target = match &req.query {
            Some(q) => format!("{}?{q}", req.path),
            None => req.path.clone(),
        };
        if let Err(why) = key.verify(
            req.peer_auth.as_deref(),
            &req.method,
            &target,
            &req.body,
            crate::cluster::state::physical_now_ms(),
        ) {
            let err = ApiError::new(401, "unauthorized_peer", why);
            return error_response(&err, close, out);
        }
    } else if let Some(token) = &ctx.options.token {
        let given = req
            .authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            let err = ApiError::new(401, "unauthorized", "missing or wrong bearer token");
            return error_response(&err, close, out);
        }
    }
    let every = req
        .query
        .as_deref()
        .is_some_and(|q| q.split('&').any(|p| p == "every" || p == "mode=every"));
    let cast = req.query.as_deref().and_then(|q| {
        q.split('&').find_map(|p| match p {
            "cast" => Some(false),
            "cast=all" => Some(true),
            _ => None,
        })
    });
    if let Some(all) = cast {
        let result = match (ctx.lookup.cast(name, &req.body, all), ctx.forward) {
            (Some(r), _) => r,
            (None, Some(fwd)) if ctx.options.peer_key.is_none() => {
                if fwd.cast(name, &req.body, all, false) {
                    Ok(())
                } else {
                    Err(unknown_pool(name))
                }
            }
            (None, _) => Err(unknown_pool(name)),
        };
        return match result {
            Ok(()) => {
                http::encode_response(202, "application/json", br#"{"queued":true}"#, close, out)
            }
            Err(e) => error_response(&e, close, out),
        };
    }
    let local = ctx.lookup.pool(name);
    if every {
        let me = ctx.options.node_name.as_deref().unwrap_or("local");
        return every_response(name, me, &req.body, local.as_ref(), ctx.forward, close, out);
    }
    let result = match (local, ctx.forward) {
        (Some(pool), _) => pool.call(&req.body).map_err(|e| call_error(&e)),
        (None, Some(fwd)) => match fwd.call_any(name, &req.body) {
            Some(r) => r,
            None => Err(unknown_pool(name)),
        },
        (None, None) => Err(unknown_pool(name)),
    };
    match result {
        Ok(reply) => http::encode_response(200, "text/plain; charset=utf-8", &reply, close, out),
        Err(e) => error_response(&e, close, out),
    }
}

fn unknown_pool(name: &str) -> ApiError {
    ApiError::new(404, "unknown_pool", format!("no pool named {name:?}"))
}

/// `?every`: this node's instance (if any) and every other node's, each with its own answer.
fn every_response(
    name: &str,
    me: &str,
    body: &[u8],
    local: Option<&Pool>,
    forward: Option<&dyn Forward>,
    close: bool,
    out: &mut Vec<u8>,
) {
    let mut answers = Vec::new();
    if let Some(pool) = local {
        answers.push((me.to_string(), pool.call(body).map_err(|e| call_error(&e))));
    }
    if let Some(fwd) = forward {
        answers.extend(fwd.call_every(name, body));
    }
    if answers.is_empty() {
        return error_response(&unknown_pool(name), close, out);
    }
    let replies: Vec<serde_json::Value> = answers
        .into_iter()
        .map(|(node, r)| match r {
            Ok(reply) => serde_json::json!({
                "node": node, "status": 200, "reply": String::from_utf8_lossy(&reply),
            }),
            Err(e) => serde_json::json!({
                "node": node, "status": e.status, "error": {"code": e.code, "message": e.message},
            }),
        })
        .collect();
    let body =
        serde_json::to_vec(&serde_json::json!({ "replies": replies })).expect("replies serialise");
    http::encode_response(200, "application/json", &body, close, out);
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn serve_connection(stream: TcpStream, ctx: &Ctx<'_>, stopping: &AtomicBool) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BlockingReader::new(stream, MAX_BODY);
    let mut out = Vec::with_capacity(4096);
    loop {
        out.clear();
        let req = match reader.next_request() {
            Ok(Some(req)) => req,
            Ok(None) => return,
            Err(HttpError::Io(_)) => return, // idle timeout or reset: nothing to answer
            Err(e) => {
                debug!(error = %e, "malformed gateway request");
                error_response(&ApiError::from(&e), true, &mut out);
                let _ = writer.write_all(&out);
                return;
            }
        };
        let close = req.close || stopping.load(Ordering::Acquire);
        handle(&req, ctx, &mut out);
        if writer.write_all(&out).is_err() || close {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_errors_map_to_distinct_statuses() {
        let cases = [
            (CallError::Overloaded("p".into()), 429),
            (CallError::Timeout("p".into()), 504),
            (
                CallError::Worker {
                    pool: "p".into(),
                    reason: "x".into(),
                },
                503,
            ),
            (
                CallError::Unavailable {
                    pool: "p".into(),
                    reason: "x".into(),
                },
                503,
            ),
            (CallError::TooLarge { len: 9, max: 1 }, 413),
        ];
        for (err, status) in cases {
            assert_eq!(call_error(&err).status, status, "{err}");
        }
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
