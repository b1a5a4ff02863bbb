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
//!
//! Which request gets what is decided by `route`, apart from any server: it answers
//! ([`Routed::Done`]) or names the pool to submit to and how to turn the result into the
//! answer ([`Routed::Submit`]). The same routing can thus run on a hyper server
//! ([`GatewayKind::Hyper`], see `hyper_server`), kept to measure the epoll server against.

pub mod envelope;
mod hyper_server;
pub mod limits;
pub mod server;

use std::borrow::Cow;
use std::net::TcpListener;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::cluster::peer::PeerKey;
use crate::error::ApiError;
use crate::http::{self, Request};
use crate::runtime::worker::pool::{CallError, Pool};
use crate::runtime::{Forward, PoolLookup};

pub use limits::Limits;
use server::{Responder, Serve, Server};

const PREFIX: &str = "/api/v1/";

/// The status page: one self-contained file (HTML, CSS, JavaScript), no fetches but
/// `/ui/state`.
pub const UI_PAGE: &[u8] = include_bytes!("ui.html");

/// Standard base64 (with or without padding); `None` if it is not.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        if chunk.len() == 1 {
            return None;
        }
        let mut acc = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            acc |= value(*c)? << (18 - 6 * i);
        }
        let b = acc.to_be_bytes();
        out.extend_from_slice(&b[1..chunk.len()]);
    }
    Some(out)
}

#[derive(Debug, Clone, Default)]
pub struct GatewayOptions {
    /// `Authorization: Bearer <token>` required when set.
    pub token: Option<String>,
    /// Set: this is the peer listener; requests must be sealed with this key
    /// (`cluster::seal`), and answers are sealed.
    pub peer_key: Option<PeerKey>,
    /// This node's peer address as the others know it (`cluster.peer`): a sealed request
    /// names its recipient, and one for another node does not open here.
    pub peer_self: Option<String>,
    /// How `?every` answers name this node's own instance (default `local`).
    pub node_name: Option<String>,
    /// What one client and all of them may take (connections, deadlines, body bytes).
    pub limits: Limits,
}

/// Where calls for pools this node does not run go; set once the cluster is up.
type ForwardSlot = Arc<OnceLock<Arc<dyn Forward>>>;

/// Which HTTP server carries the gateway; both serve the same `route`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GatewayKind {
    /// The hand-written epoll server of [`server`]: the daemon's.
    #[default]
    Epoll,
    /// hyper 1 on a tokio runtime of its own (see `hyper_server`), to measure against.
    Hyper,
}

/// A running gateway; dropping it does not stop it, [`Gateway::stop`] does.
#[derive(Debug)]
pub struct Gateway {
    addr: std::net::SocketAddr,
    server: Running,
    forward: ForwardSlot,
}

#[derive(Debug)]
enum Running {
    Epoll(Server),
    Hyper(hyper_server::HyperServer),
}

impl Gateway {
    /// Serves `listener` on its own threads, with the epoll server.
    pub fn start(
        listener: TcpListener,
        lookup: Arc<dyn PoolLookup>,
        options: GatewayOptions,
    ) -> std::io::Result<Gateway> {
        Gateway::start_kind(GatewayKind::Epoll, listener, lookup, options)
    }

    /// Serves `listener` on its own threads, with the server `kind`.
    pub fn start_kind(
        kind: GatewayKind,
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
        let server = match kind {
            GatewayKind::Epoll => {
                let limits = ctx.options.limits.clone();
                Running::Epoll(Server::start(listener, Box::new(ctx), limits)?)
            }
            GatewayKind::Hyper => Running::Hyper(hyper_server::HyperServer::start(listener, ctx)?),
        };
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
        match &self.server {
            Running::Epoll(server) => server.stop(),
            Running::Hyper(server) => server.stop(),
        }
    }

    /// Stops taking new connections (queued ones are taken and served first; a new caller is
    /// refused and goes to another gateway), lets the requests already on open connections
    /// finish — at least `settle`, at most `limit` — then stops. Only the epoll server (the
    /// daemon's) waits; the other stops at once.
    pub async fn stop_gracefully(&mut self, settle: Duration, limit: Duration) {
        if let Running::Epoll(server) = &self.server {
            server.pause_accepting();
            let started = std::time::Instant::now();
            while started.elapsed() < limit
                && (started.elapsed() < settle || server.connections_at_work() > 0)
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        self.stop();
    }
}

/// A gateway answer before any server encodes it: what `route` and a [`Finish`] produce,
/// so that the routing is the same whichever server (the epoll one in [`server`] or the hyper
/// one in `hyper_server`) carries it. The server adds the framing (`Content-Length`, and
/// `Connection: close` when the connection ends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// Borrowed for the fixed types; owned when a reply names its own.
    pub content_type: Cow<'static, str>,
    /// Extra headers, e.g. set by a function's reply. Servers leave out those that
    /// [`http::extra_header_ok`] refuses.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn new(status: u16, content_type: &'static str, body: Vec<u8>) -> Answer {
        Answer {
            status,
            content_type: Cow::Borrowed(content_type),
            headers: Vec::new(),
            body,
        }
    }

    /// A function's reply as the plain gateway answers it: `200 text/plain`.
    pub fn reply(body: Vec<u8>) -> Answer {
        Answer::new(200, "text/plain; charset=utf-8", body)
    }

    pub fn error(err: &ApiError) -> Answer {
        Answer::new(err.status, "application/json", err.to_json())
    }
}

/// Turns the result of a submitted call into the answer; called exactly once, on whichever
/// thread finished the call. A boxed function item or capture-less closure allocates nothing.
pub type Finish = Box<dyn FnOnce(Result<Vec<u8>, CallError>) -> Answer + Send>;

/// What `route` decided for a request.
pub enum Routed {
    /// Answered already (an error, metrics, a cast, a call forwarded to another node).
    Done(Answer),
    /// A call to a pool of this node: the server submits `payload` to `pool` the way it can
    /// wait best and answers with `finish` of the result.
    Submit {
        pool: Pool,
        payload: Vec<u8>,
        finish: Finish,
    },
}

impl std::fmt::Debug for Routed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Routed::Done(answer) => f.debug_tuple("Done").field(answer).finish(),
            Routed::Submit { pool, payload, .. } => f
                .debug_struct("Submit")
                .field("pool", &pool.name())
                .field("len", &payload.len())
                .finish_non_exhaustive(),
        }
    }
}

/// The plain call's [`Finish`]: the reply as is, or the call error's status.
fn plain_finish(result: Result<Vec<u8>, CallError>) -> Answer {
    match result {
        Ok(reply) => Answer::reply(reply),
        Err(e) => Answer::error(&ApiError::from(&e)),
    }
}

/// What every request is served with.
struct Ctx {
    lookup: Arc<dyn PoolLookup>,
    options: GatewayOptions,
    forward: ForwardSlot,
}

/// The epoll server's request: routed, then submitted from this thread (which may run it at
/// once) and encoded by whichever thread finishes it.
impl Serve for Ctx {
    fn serve(&self, req: Request, responder: Responder, before_blocking: &mut dyn FnMut()) {
        // Draining: each connection ends after its answer, so a client behind a balancer
        // reconnects to a node that takes new work.
        let req_close = req.close || self.lookup.draining();
        match route(req, self, before_blocking) {
            Routed::Done(answer) => {
                let close = req_close || responder.closing();
                responder.respond(encode(&answer, close), close);
            }
            Routed::Submit {
                pool,
                payload,
                finish,
            } => {
                let done = Box::new(move |result: Result<Vec<u8>, CallError>| {
                    let close = req_close || responder.closing();
                    responder.respond(encode(&finish(result), close), close);
                });
                pool.submit(payload, done, before_blocking);
            }
        }
    }

    /// The target pool's line limit (the body is one line for it); for a pool of another
    /// node, or no pool, the server's own cap applies.
    fn body_limit(&self, req: &Request) -> usize {
        req.path
            .strip_prefix(PREFIX)
            .map(|rest| rest.split_once('/').map_or(rest, |(name, _)| name))
            .and_then(|name| self.lookup.pool(name))
            .map_or(usize::MAX, |pool| pool.config().line_max)
    }
}

/// The wire bytes of `answer`, in one buffer sized up front (a head is ~100 bytes).
fn encode(answer: &Answer, close: bool) -> Vec<u8> {
    let extra: usize = answer
        .headers
        .iter()
        .map(|(k, v)| k.len() + v.len() + 4)
        .sum();
    let mut out = Vec::with_capacity(128 + extra + answer.body.len());
    http::encode_response_with(
        answer.status,
        &answer.content_type,
        &answer.headers,
        &answer.body,
        close,
        &mut out,
    );
    out
}

/// Decides what `req` gets, whichever server carries it: an answer, or — a plain call to a
/// pool of this node — the pool and payload to submit and how to answer the result.
/// `before_blocking` is called before anything here that may block (a call forwarded to
/// another node, `?every`).
fn route(req: Request, ctx: &Ctx, before_blocking: &mut dyn FnMut()) -> Routed {
    // Who may ask comes first, for every path: with a token set, `/metrics` needs it too.
    if let Some(key) = &ctx.options.peer_key {
        let me = ctx.options.peer_self.as_deref().unwrap_or_default();
        let opened = match key.open(req.peer_auth.as_deref(), &req.body, me) {
            Ok(o) if req.method == "POST" && req.path == crate::cluster::seal::PATH => o,
            Ok(_) => {
                return error(ApiError::new(
                    401,
                    "unauthorized_peer",
                    "sealed requests go to POST /peer",
                ));
            }
            Err(why) => return error(ApiError::new(401, "unauthorized_peer", why.to_string())),
        };
        let (path, query) = match opened.target.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (opened.target.clone(), None),
        };
        let inner = Request {
            method: opened.method,
            path,
            query,
            body: opened.body,
            close: req.close,
            authorization: None,
            peer_auth: None,
            head: Vec::new(),
        };
        let reply = Arc::new(opened.reply);
        return match route_call(inner, ctx, before_blocking) {
            Routed::Done(answer) => Routed::Done(seal_answer(&reply, &answer)),
            Routed::Submit {
                pool,
                payload,
                finish,
            } => Routed::Submit {
                pool,
                payload,
                finish: Box::new(move |result| seal_answer(&reply, &finish(result))),
            },
        };
    }
    route_call(req, ctx, before_blocking)
}

/// The answer to a sealed request, sealed: `200` outside, the real status inside.
fn seal_answer(reply: &crate::cluster::seal::ReplySealer, answer: &Answer) -> Answer {
    Answer::new(
        200,
        "application/octet-stream",
        reply.seal(answer.status, &answer.content_type, &answer.body),
    )
}

/// [`route`] once the caller is known to be allowed.
fn route_call(req: Request, ctx: &Ctx, before_blocking: &mut dyn FnMut()) -> Routed {
    let forward = ctx.forward.get().map(|f| &**f);
    let ui = req.path == "/ui" || req.path.starts_with("/ui/");
    if ctx.options.peer_key.is_some() {
        // Opened above.
    } else if let Some(token) = &ctx.options.token {
        let auth = req.authorization.as_deref();
        let bearer = auth.and_then(|a| a.strip_prefix("Bearer "));
        // A browser cannot send a bearer token to a page: the status page also takes the
        // token as the password of HTTP basic authentication (any user name).
        let basic = auth
            .filter(|_| ui)
            .and_then(|a| a.strip_prefix("Basic "))
            .and_then(|b| decode_base64(b.trim()))
            .and_then(|pair| {
                let colon = pair.iter().position(|c| *c == b':')?;
                Some(pair[colon + 1..].to_vec())
            });
        let ok = bearer.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes()))
            || basic.is_some_and(|p| constant_time_eq(&p, token.as_bytes()));
        if !ok {
            let mut answer = Answer::error(&ApiError::new(
                401,
                "unauthorized",
                "missing or wrong bearer token",
            ));
            if ui {
                answer.headers.push((
                    "WWW-Authenticate".into(),
                    "Basic realm=\"DROP status (the gateway token is the password)\"".into(),
                ));
            }
            return Routed::Done(answer);
        }
    }
    // Requests about this node from another (sealed, so only through the peer listener).
    if ctx.options.peer_key.is_some() && req.path.starts_with("/peer/") {
        before_blocking();
        return Routed::Done(
            match ctx.lookup.peer_request(&req.path, req.query.as_deref()) {
                Some(Ok(v)) => Answer::new(
                    200,
                    "application/json",
                    serde_json::to_vec(&v).unwrap_or_default(),
                ),
                Some(Err(e)) => Answer::error(&e),
                None => Answer::error(&ApiError::new(
                    404,
                    "not_found",
                    format!("{} is not served here", req.path),
                )),
            },
        );
    }
    if ui && req.method == "GET" && ctx.options.peer_key.is_none() {
        match req.path.as_str() {
            "/ui" | "/ui/" => {
                let mut answer = Answer::new(200, "text/html; charset=utf-8", UI_PAGE.to_vec());
                answer
                    .headers
                    .push(("Cache-Control".into(), "no-store".into()));
                return Routed::Done(answer);
            }
            "/ui/state" => {
                if let Some(state) = ctx.lookup.ui_state() {
                    let mut answer = Answer::new(
                        200,
                        "application/json",
                        serde_json::to_vec(&state).unwrap_or_default(),
                    );
                    answer
                        .headers
                        .push(("Cache-Control".into(), "no-store".into()));
                    return Routed::Done(answer);
                }
            }
            _ => {}
        }
    }
    if req.path == "/metrics"
        && req.method == "GET"
        && ctx.options.peer_key.is_none()
        && let Some(text) = ctx.lookup.metrics()
    {
        return Routed::Done(Answer::new(
            200,
            "text/plain; version=0.0.4",
            text.into_bytes(),
        ));
    }
    let Some((name, sub_path)) = req
        .path
        .strip_prefix(PREFIX)
        .map(|rest| {
            rest.split_once('/')
                .map_or((rest, false), |(n, _)| (n, true))
        })
        .filter(|(n, _)| !n.is_empty())
    else {
        return error(ApiError::new(
            404,
            "not_found",
            format!("no such endpoint: {}; use POST {PREFIX}<pool>", req.path),
        ));
    };
    let local = ctx.lookup.pool(name);
    // An envelope pool of this node takes any method and any sub-path, wrapped as the
    // original DROP's L7 envelope; `?cast` and `?every` stay plain calls.
    if let Some(pool) = local.as_ref().filter(|p| p.config().envelope)
        && !req.query.as_deref().is_some_and(plain_mode)
    {
        let payload = envelope::request_line(
            &req.method,
            &req.path,
            req.query.as_deref(),
            req.headers(),
            &req.body,
        );
        let pool_name = name.to_string();
        return Routed::Submit {
            pool: pool.clone(),
            payload,
            finish: Box::new(move |result| envelope_finish(&pool_name, result)),
        };
    }
    if sub_path {
        return error(ApiError::new(
            404,
            "not_found",
            format!(
                "no such endpoint: {}; sub-paths are for envelope pools, use POST {PREFIX}<pool>",
                req.path
            ),
        ));
    }
    if req.method != "POST" {
        return error(ApiError::new(
            405,
            "method_not_allowed",
            format!("{} is not allowed; use POST", req.method),
        ));
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
        return match result {
            Ok(()) => Routed::Done(Answer::new(
                202,
                "application/json",
                br#"{"queued":true}"#.to_vec(),
            )),
            Err(e) => error(e),
        };
    }
    if every {
        before_blocking();
        let me = ctx.options.node_name.as_deref().unwrap_or("local");
        return Routed::Done(every_answer(name, me, &req.body, local.as_ref(), forward));
    }
    let result = match (local, forward) {
        // Draining: another node that runs the pool takes the call; none does, this one.
        (Some(pool), Some(fwd)) if ctx.lookup.draining() => {
            before_blocking();
            match fwd.call_any(name, &req.body) {
                // Nothing was sent anywhere: this node answers after all.
                Some(Err(e)) if e.code == "peer_unreachable" => {
                    return Routed::Submit {
                        pool,
                        payload: req.body,
                        finish: Box::new(plain_finish),
                    };
                }
                Some(r) => r,
                None => {
                    return Routed::Submit {
                        pool,
                        payload: req.body,
                        finish: Box::new(plain_finish),
                    };
                }
            }
        }
        (Some(pool), _) => {
            return Routed::Submit {
                pool,
                payload: req.body,
                finish: Box::new(plain_finish),
            };
        }
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
        Ok(reply) => Routed::Done(Answer::reply(reply)),
        Err(e) => error(e),
    }
}

/// `?cast`, `?cast=all`, `?every`: asks for the plain call even of an envelope pool.
fn plain_mode(query: &str) -> bool {
    query
        .split('&')
        .any(|p| matches!(p, "cast" | "cast=all" | "every" | "mode=every"))
}

/// An envelope pool's [`Finish`]: the reply's `x_res_*` fields become the answer.
fn envelope_finish(pool: &str, result: Result<Vec<u8>, CallError>) -> Answer {
    let reply = result
        .map_err(|e| ApiError::from(&e))
        .and_then(|raw| envelope::reply(pool, raw));
    match reply {
        Ok(r) => Answer {
            status: r.status,
            content_type: Cow::Owned(r.content_type),
            headers: r.headers,
            body: r.body,
        },
        Err(e) => Answer::error(&e),
    }
}

fn error(err: ApiError) -> Routed {
    Routed::Done(Answer::error(&err))
}

fn unknown_pool(name: &str) -> ApiError {
    ApiError::new(404, "unknown_pool", format!("no pool named {name:?}"))
}

/// `?every`: this node's instance (if any) and every other node's, each with its own answer.
fn every_answer(
    name: &str,
    me: &str,
    body: &[u8],
    local: Option<&Pool>,
    forward: Option<&dyn Forward>,
) -> Answer {
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
        return Answer::error(&unknown_pool(name));
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
    Answer::new(200, "application/json", body)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_decodes_with_and_without_padding_and_refuses_junk() {
        assert_eq!(decode_base64("dXNlcjpzM2NyZXQ=").unwrap(), b"user:s3cret");
        assert_eq!(decode_base64("dXNlcjpzM2NyZXQ").unwrap(), b"user:s3cret");
        assert_eq!(decode_base64("Zm9vYmFy").unwrap(), b"foobar");
        assert_eq!(decode_base64("").unwrap(), b"");
        assert!(decode_base64("Zm9v!").is_none());
        assert!(decode_base64("Z").is_none());
    }

    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
