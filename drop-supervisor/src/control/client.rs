//! The control API client used by `dropctl`: one blocking request per connection over the Unix
//! socket, JSON in and out, with the daemon's error answers turned back into [`ApiError`].
//!
//! HTTP is hyper's client connection, driven by a current-thread tokio runtime made for each
//! request: dropctl sends one or a few requests, and a blocking API keeps its code plain. So the
//! methods must not be called from inside a tokio runtime.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONNECTION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use super::api::{ApiError, ErrorBody};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket: the daemon is not running, or the path is wrong.
    #[error(
        "cannot connect to drop-supervisor at {socket}: {source} (is the daemon running? set --socket or DROP_SOCKET)"
    )]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("talking to drop-supervisor at {socket}")]
    Io {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Something on the caller's side, before anything was sent (a bundle that cannot be read
    /// or packed with the caller's own rights).
    #[error("{0}")]
    Local(String),
    /// The daemon answered with an error.
    #[error("drop-supervisor: {0}")]
    Api(ApiError),
    #[error("unexpected answer from drop-supervisor (HTTP {status}): {detail}")]
    BadResponse { status: u16, detail: String },
}

#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
            timeout: Duration::from_secs(30),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.request(Method::GET, path, None)
    }

    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.request(Method::DELETE, path, None)
    }

    pub fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).expect("JSON values serialise");
        self.request(Method::POST, path, Some(body))
    }

    pub fn put<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).expect("JSON values serialise");
        self.request(Method::PUT, path, Some(body))
    }

    /// `PUT path` with `body` as raw bytes (an image bundle as a tarball).
    pub fn put_bytes<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<T, ClientError> {
        self.request(Method::PUT, path, Some(body))
    }

    fn io(&self, source: io::Error) -> ClientError {
        ClientError::Io {
            socket: self.socket.clone(),
            source,
        }
    }

    fn request<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| self.io(e))?;
        let (status, body) = runtime.block_on(async {
            tokio::time::timeout(self.timeout, self.exchange(method, path, body))
                .await
                .unwrap_or_else(|_| {
                    Err(self.io(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer within {} s", self.timeout.as_secs()),
                    )))
                })
        })?;
        if status == 200 {
            return serde_json::from_slice(&body).map_err(|e| ClientError::BadResponse {
                status,
                detail: format!("{e}: {}", String::from_utf8_lossy(&body)),
            });
        }
        match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => Err(ClientError::Api(ApiError {
                status,
                code: e.error.code,
                message: e.error.message,
            })),
            Err(_) => Err(ClientError::BadResponse {
                status,
                detail: String::from_utf8_lossy(&body).into_owned(),
            }),
        }
    }

    /// Connects, sends one request and reads the whole answer: `(status, body)`.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes), ClientError> {
        let content_type = if method == Method::PUT {
            "application/x-tar"
        } else {
            "application/json"
        };
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, HeaderValue::from_static("drop"))
            // One request per connection: the daemon can let go of it after answering.
            .header(CONNECTION, HeaderValue::from_static("close"));
        let request = match body {
            Some(body) => request
                .header(CONTENT_TYPE, HeaderValue::from_static(content_type))
                .body(Full::new(Bytes::from(body))),
            None => request.body(Full::new(Bytes::new())),
        }
        .map_err(|e| self.io(io::Error::new(io::ErrorKind::InvalidInput, e)))?;

        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Unreachable {
                    socket: self.socket.clone(),
                    source,
                })?;
        let hyper_err = |e: hyper::Error| self.io(io::Error::other(e));
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(hyper_err)?;
        // The connection moves the bytes while `sender` waits for the answer; it ends once the
        // answer is read and `sender` is gone.
        tokio::spawn(connection);
        let response = sender.send_request(request).await.map_err(hyper_err)?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(hyper_err)?
            .to_bytes();
        Ok((status, body))
    }
}
