//! The control socket's server: accepts connections, reads HTTP requests, decodes them with
//! [`api::decode`], asks the [`Supervisor`] and writes the answer. Every failure becomes a JSON
//! error with its own status; a connection is closed only after its answer was written.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};
use tracing::{debug, warn};

use super::Supervisor;
use super::api::{self, ApiError};
use crate::http::{self, RequestReader};

/// Connections served at once; more get `503 busy` and are closed.
pub const MAX_CONNECTIONS: usize = 256;
/// A connection that sends nothing for this long is closed (a request in progress gets 408).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves `listener` until `shutdown` turns true; then stops accepting and returns. Connections
/// in progress finish their current request.
pub async fn serve(
    listener: UnixListener,
    supervisor: Arc<Supervisor>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
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
                let supervisor = supervisor.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    serve_connection(stream, &supervisor, shutdown).await;
                    drop(permit);
                });
            }
            Err(_) => {
                tokio::spawn(async move {
                    let err = ApiError::new(
                        503,
                        "busy",
                        format!("more than {MAX_CONNECTIONS} control connections"),
                    );
                    let _ = write(&mut { stream }, &err.to_json(), err.status, true).await;
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

async fn write(
    stream: &mut UnixStream,
    body: &[u8],
    status: u16,
    close: bool,
) -> std::io::Result<()> {
    stream
        .write_all(&http::encode_json_response(status, body, close))
        .await
}

async fn serve_connection(
    stream: UnixStream,
    supervisor: &Supervisor,
    shutdown: watch::Receiver<bool>,
) {
    let (read, mut write_half) = stream.into_split();
    let mut reader = RequestReader::new(read);
    loop {
        let next = match tokio::time::timeout(IDLE_TIMEOUT, reader.next_request()).await {
            Ok(next) => next,
            Err(_) => {
                let err = ApiError::new(408, "timeout", "no complete request within 60 s");
                let _ = write_half
                    .write_all(&http::encode_json_response(
                        err.status,
                        &err.to_json(),
                        true,
                    ))
                    .await;
                return;
            }
        };
        let req = match next {
            Ok(Some(req)) => req,
            Ok(None) => return,
            Err(e) => {
                // The stream is out of step after a framing error: answer, then close.
                debug!(error = %e, "malformed control request");
                let err = ApiError::from(&e);
                let _ = write_half
                    .write_all(&http::encode_json_response(
                        err.status,
                        &err.to_json(),
                        true,
                    ))
                    .await;
                return;
            }
        };
        let stopping = *shutdown.borrow();
        let close = req.close || stopping;
        let (status, body) = match api::decode(&req) {
            Ok(api_req) => match supervisor.handle(api_req).await {
                Ok(resp) => (200, resp.to_json()),
                Err(e) => (e.status, e.to_json()),
            },
            Err(e) => (e.status, e.to_json()),
        };
        debug!(method = %req.method, path = %req.path, status, "control request");
        if write_half
            .write_all(&http::encode_json_response(status, &body, close))
            .await
            .is_err()
            || close
        {
            return;
        }
    }
}
