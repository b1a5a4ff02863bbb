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
//! Connections are spread over one epoll shard per CPU (see [`server`]); in each, one leader
//! thread polls. A call to a local pool is [`Pool::submit`]ted: with an idle worker the leader
//! runs it itself, as a blocking caller would, so a request never waits for another thread to
//! wake up; when every worker is busy it is queued without holding a thread, and the pool's
//! executor that runs it writes the answer. 64 connections on 2 workers thus cost a leader and
//! at most 2 busy executors, not 64 threads taking turns.

pub mod server;

use std::net::TcpListener;
use std::sync::{Arc, OnceLock};

use crate::cluster::peer::PeerKey;
use crate::error::ApiError;
use crate::http::{self, Request};
use crate::runtime::worker::pool::{CallError, Pool};
use crate::runtime::{Forward, PoolLookup};

pub use server::{IDLE_TIMEOUT, MAX_BODY, MAX_CONNECTIONS};
use server::{Responder, Serve, Server};

const PREFIX: &str = "/api/v1/";

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
    server: Server,
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
        let forward: ForwardSlot = Arc::default();
        let ctx = Ctx {
            lookup,
            options,
            forward: forward.clone(),
        };
        let server = Server::start(listener, Box::new(ctx))?;
        Ok(Gateway {
            addr,
            server,
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
        self.server.stop();
    }
}

fn error_response(err: &ApiError, close: bool, out: &mut Vec<u8>) {
    http::encode_response(err.status, "application/json", &err.to_json(), close, out);
}

/// What every request is served with.
struct Ctx {
    lookup: Arc<dyn PoolLookup>,
    options: GatewayOptions,
    forward: ForwardSlot,
}

impl Serve for Ctx {
    fn serve(&self, req: Request, responder: Responder, before_blocking: &mut dyn FnMut()) {
        let close = req.close || responder.closing();
        let mut out = Vec::new();
        let Some(pool) = handle(&req, close, self, &mut out, before_blocking) else {
            return responder.respond(out, close);
        };
        let body = req.body;
        let req_close = req.close;
        let done = Box::new(move |result: Result<Vec<u8>, CallError>| {
            let close = req_close || responder.closing();
            let mut out = Vec::new();
            match result {
                Ok(reply) => {
                    http::encode_response(200, "text/plain; charset=utf-8", &reply, close, &mut out)
                }
                Err(e) => error_response(&ApiError::from(&e), close, &mut out),
            }
            responder.respond(out, close);
        });
        pool.submit(body, done, before_blocking);
    }
}

/// Answers `req` into `out`, except a plain call to a pool of this node: that pool is returned
/// for the caller to submit the body to. `before_blocking` is called before anything that may
/// block (a call forwarded to another node).
fn handle(
    req: &Request,
    close: bool,
    ctx: &Ctx,
    out: &mut Vec<u8>,
    before_blocking: &mut dyn FnMut(),
) -> Option<Pool> {
    let forward = ctx.forward.get().map(|f| &**f);
    if req.path == "/metrics"
        && req.method == "GET"
        && ctx.options.peer_key.is_none()
        && let Some(text) = ctx.lookup.metrics()
    {
        http::encode_response(
            200,
            "text/plain; version=0.0.4",
            text.as_bytes(),
            close,
            out,
        );
        return None;
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
        error_response(&err, close, out);
        return None;
    };
    if req.method != "POST" {
        let err = ApiError::new(
            405,
            "method_not_allowed",
            format!("{} is not allowed; use POST", req.method),
        );
        error_response(&err, close, out);
        return None;
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
            error_response(&err, close, out);
            return None;
        }
    } else if let Some(token) = &ctx.options.token {
        let given = req
            .authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            let err = ApiError::new(401, "unauthorized", "missing or wrong bearer token");
            error_response(&err, close, out);
            return None;
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
        let result = match (ctx.lookup.cast(name, &req.body, all), forward) {
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
        match result {
            Ok(()) => {
                http::encode_response(202, "application/json", br#"{"queued":true}"#, close, out)
            }
            Err(e) => error_response(&e, close, out),
        }
        return None;
    }
    let local = ctx.lookup.pool(name);
    if every {
        before_blocking();
        let me = ctx.options.node_name.as_deref().unwrap_or("local");
        every_response(name, me, &req.body, local.as_ref(), forward, close, out);
        return None;
    }
    let result = match (local, forward) {
        (Some(pool), _) => return Some(pool),
        (None, Some(fwd)) => {
            before_blocking();
            match fwd.call_any(name, &req.body) {
                Some(r) => r,
                None => Err(unknown_pool(name)),
            }
        }
        (None, None) => Err(unknown_pool(name)),
    };
    match result {
        Ok(reply) => http::encode_response(200, "text/plain; charset=utf-8", &reply, close, out),
        Err(e) => error_response(&e, close, out),
    }
    None
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
        answers.push((
            me.to_string(),
            pool.call(body).map_err(|e| ApiError::from(&e)),
        ));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
