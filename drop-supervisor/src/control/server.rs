//! The control socket's server: HTTP/1.1 by hyper, one task per connection. A request is decoded
//! with [`api::decode`], answered by the [`Supervisor`], and every failure becomes a JSON error
//! with its own status.
//!
//! The [`Limits`] and where each is enforced:
//! - request head: hyper (`max_header_size`): hyper itself answers 431, and 400 for a head it
//!   cannot parse, both with an empty body (no service runs for them), then closes.
//! - request body: checked against `Content-Length` before reading, then read through
//!   [`Limited`], so no more than the limit is ever buffered (413).
//! - connections: a semaphore here; one over gets 503 `busy` and is closed unread.
//! - time: hyper's `header_read_timeout` for the head (it also bounds the wait for the next
//!   request of a keep-alive connection; hyper then closes the connection without an answer),
//!   then the same again for the body (408 JSON).
//!
//! An answer after which the connection's bytes are out of step (411, 413, 408, a malformed
//! head) closes it; every other error keeps a keep-alive connection usable.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Incoming};
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderValue, TRANSFER_ENCODING};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info, warn};

use super::Supervisor;
use super::api::{self, ApiError};
use crate::http;

/// Connections served at once; more get `503 busy` and are closed.
pub const MAX_CONNECTIONS: usize = 256;
/// A request's head (and then its body) must arrive within this; a connection that sends
/// nothing for this long is closed after a 408.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body accepted.
pub const MAX_BODY: usize = 1024 * 1024;

/// What one client may cost the daemon. [`Limits::default`] is what the daemon uses; tests pass
/// small values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request head in bytes; larger gets 431 `headers_too_large`.
    pub max_head: usize,
    /// Largest request body in bytes; larger gets 413 `payload_too_large`.
    pub max_body: usize,
    /// Connections served at once; more get 503 `busy`.
    pub max_connections: usize,
    /// Time for a request's head, then again for its body; over gets 408 `timeout`.
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head: MAX_HEAD,
            max_body: MAX_BODY,
            max_connections: MAX_CONNECTIONS,
            request_timeout: IDLE_TIMEOUT,
        }
    }
}

/// Serves `listener` with the production [`Limits`] until `shutdown` turns true.
pub async fn serve(
    listener: UnixListener,
    supervisor: Arc<Supervisor>,
    shutdown: watch::Receiver<bool>,
) {
    serve_with(listener, supervisor, shutdown, Limits::default()).await;
}

/// Serves `listener` until `shutdown` turns true; then stops accepting and returns. Connections
/// in progress finish their current request (hyper's graceful shutdown), idle ones close.
pub async fn serve_with(
    listener: UnixListener,
    supervisor: Arc<Supervisor>,
    mut shutdown: watch::Receiver<bool>,
    limits: Limits,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.request_timeout)
        .max_header_size(limits.max_head);
    let builder = Arc::new(builder);
    loop {
        let stream = tokio::select! {
            () = stopped(&mut shutdown) => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(error = %e, "accept on control socket failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let connection = Connection {
                    supervisor: supervisor.clone(),
                    builder: builder.clone(),
                    limits,
                };
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    connection.serve(stream, shutdown).await;
                    drop(permit);
                });
            }
            Err(_) => {
                // Answered without reading the request: reading would be the work the limit
                // is there to refuse.
                let max = limits.max_connections;
                tokio::spawn(async move {
                    let err =
                        ApiError::new(503, "busy", format!("more than {max} control connections"));
                    let _ = write_error(stream, &err).await;
                });
            }
        }
    }
}

/// Resolves once `rx` turns true (or its sender is gone). The guard `wait_for` returns is
/// dropped here, so callers' futures stay `Send`.
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Writes `err` as a whole answer outside hyper, then closes the stream.
async fn write_error(mut stream: UnixStream, err: &ApiError) -> std::io::Result<()> {
    let bytes = http::encode_json_response(err.status, &err.to_json(), true);
    // A client that does not read cannot hold the task.
    tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await
    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// What serving one connection needs.
struct Connection {
    supervisor: Arc<Supervisor>,
    builder: Arc<http1::Builder>,
    limits: Limits,
}

impl Connection {
    async fn serve(self, stream: UnixStream, mut shutdown: watch::Receiver<bool>) {
        // Who is asking (SO_PEERCRED): every change is logged with the caller's uid and pid.
        let caller = stream
            .peer_cred()
            .map(|c| Caller {
                uid: c.uid(),
                pid: c.pid(),
            })
            .ok();
        let io = TokioIo::new(stream);
        let (supervisor, limits) = (self.supervisor, self.limits);
        let service = service_fn(move |req| {
            let supervisor = supervisor.clone();
            async move { Ok::<_, Infallible>(answer(req, &supervisor, limits, caller).await) }
        });
        let conn = self.builder.serve_connection(io, service);
        tokio::pin!(conn);
        let served = tokio::select! {
            served = conn.as_mut() => served,
            () = stopped(&mut shutdown) => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = served {
            debug!(error = %e, "control connection ended");
        }
    }
}

/// The process at the other end of a control connection.
#[derive(Debug, Clone, Copy)]
struct Caller {
    uid: u32,
    pid: Option<i32>,
}

/// Answers one request; never fails (every failure is a JSON answer). A request that changes
/// something (any method but GET and HEAD) is logged with who asked and how it ended.
async fn answer(
    req: hyper::Request<Incoming>,
    supervisor: &Supervisor,
    limits: Limits,
    caller: Option<Caller>,
) -> hyper::Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let response = route(req, supervisor, limits).await;
    if method != Method::GET && method != Method::HEAD {
        let status = response.status().as_u16();
        info!(
            uid = caller.map(|c| c.uid),
            pid = caller.and_then(|c| c.pid),
            %method,
            path,
            status,
            "control change"
        );
    }
    response
}

async fn route(
    req: hyper::Request<Incoming>,
    supervisor: &Supervisor,
    limits: Limits,
) -> hyper::Response<Full<Bytes>> {
    if req.method() == Method::PUT
        && let Some(name) = req
            .uri()
            .path()
            .strip_prefix("/v1/images/")
            .filter(|n| !n.is_empty() && !n.contains('/'))
            .map(str::to_string)
    {
        let replace = req
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|p| p == "replace=true" || p == "replace"));
        let mut body = req.into_body();
        return match import(&mut body, &name, replace, supervisor, limits).await {
            Ok(resp) => json(200, resp.to_json(), false),
            Err(e) => {
                // The client may still be sending the bundle; read it away (for 2 s at most)
                // so that it gets to read the refusal instead of a reset connection. Then close.
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while let Some(Ok(_)) = body.frame().await {}
                })
                .await;
                json(e.status, e.to_json(), true)
            }
        };
    }
    let (head, body) = req.into_parts();
    let body = match read_body(&head.headers, body, limits).await {
        Ok(body) => body,
        Err(e) => {
            debug!(method = %head.method, path = %head.uri.path(), status = e.status, error = %e, "control request refused");
            // The body was not read to its end: the connection's bytes are out of step.
            return json(e.status, e.to_json(), true);
        }
    };
    let req = http::Request {
        method: head.method.to_string(),
        path: head.uri.path().to_string(),
        query: head.uri.query().map(str::to_string),
        body,
        close: false,
        authorization: None,
        peer_auth: None,
        head: Vec::new(),
    };
    let (status, body) = match api::decode(&req) {
        Ok(api_req) => match supervisor.handle(api_req).await {
            Ok(resp) => (200, resp.to_json()),
            Err(e) => (e.status, e.to_json()),
        },
        Err(e) => (e.status, e.to_json()),
    };
    debug!(method = %req.method, path = %req.path, status, "control request");
    json(status, body, false)
}

/// Receives an image bundle into the daemon's own upload file — never more than the per-import
/// limit, never past the total quota, within the request time — and hands it to the
/// Supervisor to install.
async fn import(
    body: &mut Incoming,
    name: &str,
    replace: bool,
    supervisor: &Supervisor,
    limits: Limits,
) -> Result<api::ApiResponse, ApiError> {
    use crate::runtime::images;
    use tokio::io::AsyncWriteExt as _;

    let config = supervisor.config();
    let (max, quota) = (config.image_max_bytes, config.images_quota_bytes);
    let too_large = |what: String| ApiError::new(413, "payload_too_large", what);
    let announced = body.size_hint().lower();
    if announced > max {
        return Err(too_large(format!(
            "a bundle of {announced} bytes is larger than the import limit of {max} bytes \
             (runtime.image_max_mb)"
        )));
    }
    let dir = config.images_dir.clone();
    let used = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || images::total_bytes(&dir))
            .await
            .map_err(|e| ApiError::internal(format!("images task: {e}")))?
            .map_err(|e| ApiError::from(&e))?
    };
    if used.saturating_add(announced) > quota {
        return Err(too_large(format!(
            "installed images take {used} bytes; {announced} more would pass the quota of \
             {quota} bytes (runtime.images_quota_mb)"
        )));
    }
    let upload = images::upload_file(&dir, name).map_err(|e| ApiError::from(&e))?;
    let io = |e: std::io::Error| ApiError::internal(format!("receiving the bundle: {e}"));
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&upload.0)
        .await
        .map_err(io)?;
    let mut received: u64 = 0;
    let mut head = [0u8; 2];
    let receive = async {
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|e| ApiError::new(400, "bad_request", format!("the body: {e}")))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if received < 2 {
                for (i, b) in data.iter().take(2 - received as usize).enumerate() {
                    head[received as usize + i] = *b;
                }
            }
            received += data.len() as u64;
            if received > max || used.saturating_add(received) > quota {
                return Err(too_large(format!(
                    "the bundle passed the import limit ({max} bytes) or the images quota \
                     ({quota} bytes)"
                )));
            }
            file.write_all(&data).await.map_err(io)?;
        }
        file.flush().await.map_err(io)
    };
    tokio::time::timeout(limits.request_timeout, receive)
        .await
        .map_err(|_| late("the bundle", limits))??;
    // gzip's magic number; anything else is handed to tar as a plain archive.
    let gzip = head == [0x1f, 0x8b];
    let result = supervisor
        .handle(api::ApiRequest::ImageImport {
            name: name.to_string(),
            upload: upload.0.clone(),
            gzip,
            replace,
        })
        .await;
    drop(upload);
    result
}

/// 408: `what` did not arrive within the request time.
fn late(what: &str, limits: Limits) -> ApiError {
    ApiError::new(
        408,
        "timeout",
        format!(
            "{what} did not arrive within {} s",
            limits.request_timeout.as_secs_f64()
        ),
    )
}

/// The request body, at most `limits.max_body` bytes of it, within `limits.request_timeout`.
async fn read_body(
    headers: &hyper::HeaderMap,
    body: Incoming,
    limits: Limits,
) -> Result<Vec<u8>, ApiError> {
    if headers.contains_key(TRANSFER_ENCODING) {
        // dropctl always sends a length; refusing the rest keeps one way to frame a body.
        return Err(ApiError::new(
            411,
            "length_required",
            "a body needs a Content-Length header (chunked transfer encoding is not supported)",
        ));
    }
    let too_large = |len: u64| {
        ApiError::new(
            413,
            "payload_too_large",
            format!(
                "request body of {len} bytes is larger than the limit of {} bytes",
                limits.max_body
            ),
        )
    };
    // hyper has checked Content-Length, and its hint is that length: refuse before reading.
    let announced = body.size_hint().lower();
    if announced > limits.max_body as u64 {
        return Err(too_large(announced));
    }
    let collected = tokio::time::timeout(
        limits.request_timeout,
        Limited::new(body, limits.max_body).collect(),
    )
    .await
    .map_err(|_| late("the request body", limits))?;
    match collected {
        Ok(collected) => Ok(collected.to_bytes().to_vec()),
        Err(e) if e.is::<LengthLimitError>() => Err(too_large(announced)),
        Err(e) => Err(ApiError::new(
            400,
            "bad_request",
            format!("reading the request body: {e}"),
        )),
    }
}

fn json(status: u16, body: Vec<u8>, close: bool) -> hyper::Response<Full<Bytes>> {
    let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if close {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}
