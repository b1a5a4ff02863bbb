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
//! One thread per connection, blocking I/O: the connection's thread parses the request and
//! calls the pool itself, so a request never waits for another thread to wake up.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tracing::{debug, warn};

use crate::api::ApiError;
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
}

#[derive(Debug, Clone, Default)]
pub struct GatewayOptions {
    /// `Authorization: Bearer <token>` required when set.
    pub token: Option<String>,
}

/// A running gateway; dropping it does not stop it, [`Gateway::stop`] does.
#[derive(Debug)]
pub struct Gateway {
    addr: std::net::SocketAddr,
    stopping: Arc<AtomicBool>,
    acceptor: Option<std::thread::JoinHandle<()>>,
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
                    let (lookup, options, active, stop) = (
                        lookup.clone(),
                        options.clone(),
                        active.clone(),
                        stop.clone(),
                    );
                    let spawned = std::thread::Builder::new()
                        .name("drop-gw-conn".into())
                        .stack_size(256 * 1024)
                        .spawn(move || {
                            serve_connection(stream, &*lookup, &options, &stop);
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
        })
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

fn handle(req: &Request, lookup: &dyn PoolLookup, options: &GatewayOptions, out: &mut Vec<u8>) {
    let close = req.close;
    if req.path == "/metrics"
        && req.method == "GET"
        && let Some(text) = lookup.metrics()
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
    if let Some(token) = &options.token {
        let given = req
            .authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            let err = ApiError::new(401, "unauthorized", "missing or wrong bearer token");
            return error_response(&err, close, out);
        }
    }
    let Some(pool) = lookup.pool(name) else {
        let err = ApiError::new(404, "unknown_pool", format!("no pool named {name:?}"));
        return error_response(&err, close, out);
    };
    match pool.call(&req.body) {
        Ok(reply) => http::encode_response(200, "text/plain; charset=utf-8", &reply, close, out),
        Err(e) => error_response(&call_error(&e), close, out),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn serve_connection(
    stream: TcpStream,
    lookup: &dyn PoolLookup,
    options: &GatewayOptions,
    stopping: &AtomicBool,
) {
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
        handle(&req, lookup, options, &mut out);
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
