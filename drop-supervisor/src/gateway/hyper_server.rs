//! The gateway on hyper 1 (HTTP/1.1) and a tokio multi-thread runtime of its own, beside the
//! hand-written epoll server of [`super::server`]: the same [`route`], the same body and
//! connection caps, so the two can be measured against each other (`cargo xtask bench
//! runtime`, rows (e)). It is the measuring stick, not the daemon's server: it does not keep
//! the per-client caps, head and body deadlines or body budget of [`super::limits`].
//!
//! A call to a local pool is [`Pool::submit`]ted from the request's task, which awaits the
//! answer on a oneshot channel. With an idle worker `submit` runs the exchange at once on the
//! runtime thread that polls the task, as the epoll leader does, inside `block_in_place` so
//! that the thread's other connections move to another thread meanwhile (a slow function must
//! not stall them). Queued calls hold no thread.
//!
//! Stopping: the listener closes at once, idle connections close, a connection with a request
//! in flight gets its answer with `Connection: close`.

use std::convert::Infallible;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{StatusCode, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::{oneshot, watch};
use tracing::{debug, warn};

use super::{Answer, Ctx, Routed, route};
use crate::error::ApiError;
use crate::http::{self, HttpError, Request};
use crate::runtime::worker::pool::CallError;

type Response = hyper::Response<Full<Bytes>>;

/// What the connections share.
struct Shared {
    ctx: Ctx,
    /// Set by [`HyperServer::stop`]: answers say `Connection: close`.
    stopping: AtomicBool,
    /// Connections open now, for the `max_connections` cap.
    open: AtomicUsize,
}

/// A running hyper gateway; [`HyperServer::stop`] ends it. Dropping it does not.
pub(super) struct HyperServer {
    shared: Arc<Shared>,
    stop: Arc<watch::Sender<bool>>,
    /// Told once the listener is closed.
    closed: Mutex<mpsc::Receiver<()>>,
}

impl std::fmt::Debug for HyperServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HyperServer")
            .field("open", &self.shared.open.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl HyperServer {
    /// Serves `listener` on a runtime of one thread per CPU this process may run on, driven
    /// from a thread of its own: the runtime is dropped there, never inside the caller's
    /// (perhaps async) context.
    pub(super) fn start(listener: TcpListener, ctx: Ctx) -> std::io::Result<HyperServer> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cpus)
            .thread_name("drop-gw-hyper")
            .enable_all()
            .build()?;
        listener.set_nonblocking(true)?;
        let listener = {
            let _g = rt.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let shared = Arc::new(Shared {
            ctx,
            stopping: AtomicBool::new(false),
            open: AtomicUsize::new(0),
        });
        let stop = Arc::new(watch::Sender::new(false));
        let (closed_tx, closed_rx) = mpsc::channel();
        let (sh, st) = (shared.clone(), stop.clone());
        std::thread::Builder::new()
            .name("drop-gw-hyper-accept".into())
            .spawn(move || rt.block_on(accept_loop(listener, sh, st, closed_tx)))?;
        Ok(HyperServer {
            shared,
            stop,
            closed: Mutex::new(closed_rx),
        })
    }

    /// Stops accepting (the listener is closed when this returns); idle connections close
    /// now, busy ones after their current answer.
    pub(super) fn stop(&self) {
        if self.shared.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        self.stop.send_replace(true);
        // The accept loop answers at once unless its runtime is wedged; do not hang on that.
        let closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        let _ = closed.recv_timeout(Duration::from_secs(1));
    }
}

/// Resolves once stopping is asked. The sender lives as long as the server, so a closed
/// channel cannot happen; it would mean "never".
async fn stopped(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Accepts until stopped, then waits for the open connections to end.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    stop: Arc<watch::Sender<bool>>,
    closed: mpsc::Sender<()>,
) {
    let mut stop_rx = stop.subscribe();
    // Every connection task holds a clone; `recv` says `None` once the last one has ended.
    let (alive, mut all_ended) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stopped(&mut stop_rx) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, typically: try again a little later.
                warn!(error = %e, "gateway accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // Only this loop adds, so the check and the increment cannot race past the cap.
        if shared.open.load(Ordering::Acquire) >= shared.ctx.options.limits.max_connections {
            tokio::spawn(refuse(stream));
            continue;
        }
        shared.open.fetch_add(1, Ordering::AcqRel);
        let guard = Open {
            shared: shared.clone(),
            _alive: alive.clone(),
        };
        tokio::spawn(connection(stream, guard, stop.subscribe()));
    }
    drop(listener);
    let _ = closed.send(());
    drop(alive);
    let _ = all_ended.recv().await;
}

/// One connection counted in [`Shared::open`] until dropped.
struct Open {
    shared: Arc<Shared>,
    _alive: tokio::sync::mpsc::Sender<()>,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.shared.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Over the cap: `503 busy`, as the epoll server answers, and close.
async fn refuse(mut stream: tokio::net::TcpStream) {
    let err = ApiError::new(503, "busy", "too many gateway connections");
    let bytes = http::encode_json_response(err.status, &err.to_json(), true);
    let _ = stream.write_all(&bytes).await;
    let _ = stream.shutdown().await;
}

async fn connection(stream: tokio::net::TcpStream, open: Open, mut stop_rx: watch::Receiver<bool>) {
    let shared = open.shared.clone();
    let idle_timeout = shared.ctx.options.limits.idle_timeout;
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(serve(&shared, req).await) }
    });
    // The head read timeout also runs while a keep-alive connection waits for its next
    // request, so it is the idle timeout as well.
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(idle_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => Some(r),
        () = stopped(&mut stop_rx) => None,
    };
    let result = match ended {
        Some(r) => r,
        None => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "gateway connection ended");
    }
    drop(open);
}

/// One request: read (capped), routed, submitted if it is a local call, answered.
async fn serve(shared: &Shared, req: hyper::Request<Incoming>) -> Response {
    let (answer, close) = match read_request(req, shared.ctx.options.limits.max_body).await {
        Ok(req) => (answer(shared, req).await, false),
        // The body is (partly) unread: the connection cannot carry another request.
        Err(e) => (Answer::error(&ApiError::from(&e)), true),
    };
    response(answer, close || shared.stopping.load(Ordering::Acquire))
}

async fn answer(shared: &Shared, req: Request) -> Answer {
    let (tx, rx) = oneshot::channel();
    // Routing may block (a forwarded call, `?every`) and `submit` runs the call at once on an
    // idle worker. `block_in_place` hands this thread's other connections to another thread
    // while it does, so a slow function does not stall them — the job the epoll server's
    // standby takeover does. It costs a hand-over per request; without it, as many slow calls
    // as CPUs stall the whole gateway (tested).
    let routed = tokio::task::block_in_place(|| match route(req, &shared.ctx, &mut || {}) {
        Routed::Done(answer) => Err(answer),
        Routed::Submit {
            pool,
            payload,
            finish,
        } => {
            let done = Box::new(move |result: Result<Vec<u8>, CallError>| {
                let _ = tx.send(result);
            });
            pool.submit(payload, done, &mut || {});
            Ok((pool.name().to_string(), finish))
        }
    });
    match routed {
        Err(answer) => answer,
        Ok((pool, finish)) => {
            // `submit` calls `done` exactly once; a dropped sender would be a pool bug.
            let result = rx.await.unwrap_or_else(|_| {
                Err(CallError::Unavailable {
                    pool,
                    reason: "the call was dropped".into(),
                })
            });
            finish(result)
        }
    }
}

/// The request as the routing sees it, with the body read up to `max_body`.
async fn read_request(
    req: hyper::Request<Incoming>,
    max_body: usize,
) -> Result<Request, HttpError> {
    let (parts, body) = req.into_parts();
    // A Content-Length past the cap is refused before reading anything, as the epoll server
    // does; a chunked body is cut off at the cap.
    let declared = body.size_hint().lower();
    if declared > max_body as u64 {
        return Err(HttpError::BodyTooLarge(declared));
    }
    let body = match Limited::new(body, max_body).collect().await {
        Ok(collected) => Vec::from(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(HttpError::BodyTooLarge(max_body as u64 + 1));
        }
        Err(e) => return Err(HttpError::Io(e.to_string())),
    };
    let text = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_string())
    };
    let close = parts.version == Version::HTTP_10
        || parts
            .headers
            .get(header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let mut head = Vec::new();
    for (name, value) in &parts.headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    Ok(Request {
        method: parts.method.as_str().to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        close,
        authorization: text("authorization"),
        peer_auth: text("x-drop-peer"),
        head,
        body,
    })
}

/// `answer` as hyper sends it; hyper adds `Content-Length` (and `Date`). `close` asks hyper to
/// end the connection after it.
fn response(answer: Answer, close: bool) -> Response {
    let Answer {
        status,
        content_type,
        headers,
        body,
    } = answer;
    let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let content_type = match content_type {
        std::borrow::Cow::Borrowed(s) => Ok(HeaderValue::from_static(s)),
        std::borrow::Cow::Owned(s) => HeaderValue::try_from(s),
    };
    let h = resp.headers_mut();
    if let Ok(v) = content_type {
        h.insert(header::CONTENT_TYPE, v);
    }
    for (name, value) in headers {
        if !http::extra_header_ok(&name, &value) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) {
            h.append(n, v);
        }
    }
    if close {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}
