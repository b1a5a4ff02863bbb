//! The control API client used by `dropctl`: one blocking request per connection over the Unix
//! socket, JSON in and out, with the daemon's error answers turned back into [`ApiError`].

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::api::{ApiError, ErrorBody};
use crate::http;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket: the daemon is not running, or the path is wrong.
    #[error(
        "cannot connect to drop-supervisor at {socket}: {source} (is the daemon running? set --socket or DROP_SOCKET)"
    )]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to drop-supervisor at {socket}")]
    Io {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
        self.request("GET", path, None)
    }

    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.request("DELETE", path, None)
    }

    pub fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).expect("JSON values serialise");
        self.request("POST", path, Some(&body))
    }

    fn request<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<T, ClientError> {
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|source| ClientError::Unreachable {
                socket: self.socket.clone(),
                source,
            })?;
        let io = |source| ClientError::Io {
            socket: self.socket.clone(),
            source,
        };
        stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
        stream.set_write_timeout(Some(self.timeout)).map_err(io)?;
        let resp = http::roundtrip(&mut stream, method, path, body).map_err(io)?;
        if resp.status == 200 {
            return serde_json::from_slice(&resp.body).map_err(|e| ClientError::BadResponse {
                status: resp.status,
                detail: format!("{e}: {}", String::from_utf8_lossy(&resp.body)),
            });
        }
        match serde_json::from_slice::<ErrorBody>(&resp.body) {
            Ok(e) => Err(ClientError::Api(ApiError {
                status: resp.status,
                code: e.error.code,
                message: e.error.message,
            })),
            Err(_) => Err(ClientError::BadResponse {
                status: resp.status,
                detail: String::from_utf8_lossy(&resp.body).into_owned(),
            }),
        }
    }
}
