//! The control socket: accepts connections, reads HTTP requests, decodes them with
//! [`api::decode`], asks the [`Supervisor`] (the single owner of node state) and writes the
//! answer. Every failure becomes a JSON error with its own status; a connection is closed only
//! after its answer was written.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Mutex, Semaphore, watch};
use tracing::{debug, warn};

use crate::api::{self, ApiError, ApiRequest, ApiResponse, StatusInfo};
use crate::cluster::node::Cluster;
use crate::config::Config;
use crate::gateway::{self, PoolLookup};
use crate::http::{self, RequestReader};
use crate::runtime::{Runtime, RuntimeError};
use crate::tune::{self, Profile};

/// Connections served at once; more get `503 busy` and are closed.
pub const MAX_CONNECTIONS: usize = 256;
/// A connection that sends nothing for this long is closed (a request in progress gets 408).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Owner of the node's state, answering API requests.
#[derive(Debug)]
pub struct Supervisor {
    config: Config,
    node_id: uuid::Uuid,
    started: Instant,
    profile: Profile,
    /// Tuning writes are serialised: two applies never interleave key by key.
    tune_lock: Mutex<()>,
    runtime: Arc<Runtime>,
    gateway: Option<std::net::SocketAddr>,
    /// `None`: a single node (no `[cluster]` in the config).
    cluster: Option<Arc<Cluster>>,
    /// Calls for pools that run on other nodes.
    forward: Option<Arc<dyn crate::cluster::peer::Forward>>,
}

fn not_clustered() -> ApiError {
    ApiError::new(
        409,
        "not_clustered",
        "this node runs alone: add a `[cluster]` section to its config to use nodes and namespaces",
    )
}

/// A runtime error as the API answers it.
pub fn runtime_error(e: &RuntimeError) -> ApiError {
    let msg = format!("{e:#}");
    match e {
        RuntimeError::Flow(_) => ApiError::new(422, "invalid_flow", msg),
        RuntimeError::PoolConflict { .. } => ApiError::new(409, "conflict", msg),
        RuntimeError::Unsupported { .. } => ApiError::new(422, "unsupported", msg),
        RuntimeError::Invalid { .. } => ApiError::new(422, "invalid_flow", msg),
        RuntimeError::UnknownFlow(_) => ApiError::new(404, "unknown_flow", msg),
        RuntimeError::UnknownPool(_) => ApiError::new(404, "unknown_pool", msg),
        RuntimeError::Overloaded(_) => ApiError::new(429, "overloaded", msg),
        RuntimeError::Persist { .. } | RuntimeError::Cgroup { .. } => ApiError::internal(msg),
    }
}

/// An image error as the API answers it: the caller's mistake (400/404/409) or ours (500).
pub fn image_error(e: &crate::images::ImageError) -> ApiError {
    use crate::images::ImageError as E;
    let msg = format!("{e:#}");
    match e {
        E::NotFound { .. } => ApiError::new(404, "unknown_image", msg),
        E::Exists { .. } => ApiError::new(409, "conflict", msg),
        E::Io { .. } => ApiError::internal(msg),
        _ => ApiError::new(400, "invalid_image", msg),
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> ApiResponse {
    ApiResponse::Json(serde_json::to_value(v).expect("runtime answers serialise"))
}

/// Largest log chunk one `logs` request returns.
const LOG_CHUNK: usize = 64 * 1024;

impl Supervisor {
    pub fn new(
        config: Config,
        node_id: uuid::Uuid,
        runtime: Arc<Runtime>,
        gateway: Option<std::net::SocketAddr>,
    ) -> Supervisor {
        Supervisor {
            config,
            node_id,
            started: Instant::now(),
            profile: Profile::builtin(),
            tune_lock: Mutex::new(()),
            runtime,
            gateway,
            cluster: None,
            forward: None,
        }
    }

    /// Puts the node in cluster mode: flows go to the replicated state.
    pub fn with_cluster(
        mut self,
        cluster: Arc<Cluster>,
        forward: Arc<dyn crate::cluster::peer::Forward>,
    ) -> Supervisor {
        self.cluster = Some(cluster);
        self.forward = Some(forward);
        self
    }

    fn cluster(&self) -> Result<&Arc<Cluster>, ApiError> {
        self.cluster.as_ref().ok_or_else(not_clustered)
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Runs blocking runtime work off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Runtime) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let rt = self.runtime.clone();
        tokio::task::spawn_blocking(move || f(&rt))
            .await
            .map_err(|e| ApiError::internal(format!("runtime task: {e}")))?
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub async fn handle(&self, req: ApiRequest) -> Result<ApiResponse, ApiError> {
        match req {
            ApiRequest::Status => Ok(ApiResponse::Status(self.status())),
            ApiRequest::TuneCheck { only } => {
                let entries = self.select(&only)?;
                let root = self.config.sysctl_root.clone();
                let report = tokio::task::spawn_blocking(move || {
                    tune::check(&root, &entries.iter().collect::<Vec<_>>())
                })
                .await
                .map_err(|e| ApiError::internal(format!("tune check task: {e}")))?;
                Ok(ApiResponse::TuneCheck(report))
            }
            ApiRequest::TuneApply { only } => {
                let entries = self.select(&only)?;
                let root = self.config.sysctl_root.clone();
                let _guard = self.tune_lock.lock().await;
                let report = tokio::task::spawn_blocking(move || {
                    tune::apply(&root, &entries.iter().collect::<Vec<_>>())
                })
                .await
                .map_err(|e| ApiError::internal(format!("tune apply task: {e}")))?;
                for k in report
                    .keys
                    .iter()
                    .filter(|k| k.outcome != tune::ApplyOutcome::Unchanged)
                {
                    tracing::info!(key = %k.key, before = ?k.before, after = ?k.after, outcome = ?k.outcome, error = ?k.error, "sysctl applied");
                }
                Ok(ApiResponse::TuneApply(report))
            }
            ApiRequest::FlowList => Ok(to_json(&self.runtime.flows())),
            ApiRequest::FlowApply { file, source, ns } => {
                if let Some(c) = &self.cluster {
                    return c
                        .flow_apply(&source, &file, ns)
                        .await
                        .map(ApiResponse::Json);
                }
                if ns.is_some() {
                    return Err(not_clustered());
                }
                self.blocking(move |rt| {
                    rt.apply(&source, Path::new(&file))
                        .map(|r| to_json(&r))
                        .map_err(|e| runtime_error(&e))
                })
                .await
            }
            ApiRequest::FlowShow { name } => self
                .runtime
                .flow(&name)
                .map(ApiResponse::Json)
                .map_err(|e| runtime_error(&e)),
            ApiRequest::FlowRemove { name, ns } => {
                if let Some(c) = &self.cluster {
                    return c.flow_remove(&name, ns).await.map(ApiResponse::Json);
                }
                if ns.is_some() {
                    return Err(not_clustered());
                }
                self.blocking(move |rt| {
                    rt.remove(&name)
                        .map(|r| to_json(&r))
                        .map_err(|e| runtime_error(&e))
                })
                .await
            }
            ApiRequest::NodeList => Ok(to_json(&self.cluster()?.nodes())),
            ApiRequest::NsList => Ok(to_json(&self.cluster()?.namespaces())),
            ApiRequest::NsShow { name } => self.cluster()?.namespace(&name).map(|v| to_json(&v)),
            ApiRequest::NsCreate { name, vip, nodes } => self
                .cluster()?
                .ns_create(&name, vip, &nodes)
                .await
                .map(|v| to_json(&v)),
            ApiRequest::NsRemove { name } => self
                .cluster()?
                .ns_remove(&name)
                .await
                .map(ApiResponse::Json),
            ApiRequest::NsJoin { name } => {
                self.cluster()?.ns_join(&name).await.map(|v| to_json(&v))
            }
            ApiRequest::NsLeave => self.cluster()?.ns_leave().await.map(ApiResponse::Json),
            ApiRequest::PoolList => Ok(to_json(&self.runtime.pool_statuses())),
            ApiRequest::PoolShow { name } => self
                .runtime
                .pool_status(&name)
                .map(|s| to_json(&s))
                .map_err(|e| runtime_error(&e)),
            ApiRequest::Call { pool, payload } => {
                let forward = self.forward.clone();
                self.blocking(move |rt| {
                    let reply = match (rt.pool(&pool), forward) {
                        (Some(p), _) => p
                            .call(payload.as_bytes())
                            .map_err(|e| gateway::call_error(&e))?,
                        (None, Some(f)) => {
                            f.call_any(&pool, payload.as_bytes()).unwrap_or_else(|| {
                                Err(runtime_error(&RuntimeError::UnknownPool(pool.clone())))
                            })?
                        }
                        (None, None) => {
                            return Err(runtime_error(&RuntimeError::UnknownPool(pool.clone())));
                        }
                    };
                    Ok(ApiResponse::Json(
                        serde_json::json!({ "reply": String::from_utf8_lossy(&reply) }),
                    ))
                })
                .await
            }
            ApiRequest::Scale { pool, min, max } => {
                self.runtime
                    .scale(&pool, min, max)
                    .map_err(|e| runtime_error(&e))?;
                self.runtime
                    .pool_status(&pool)
                    .map(|s| to_json(&s))
                    .map_err(|e| runtime_error(&e))
            }
            ApiRequest::ImageList => {
                let dir = self.config.images_dir.clone();
                let list = crate::images::list(&dir).map_err(|e| image_error(&e))?;
                Ok(to_json(&list))
            }
            ApiRequest::ImageImport {
                name,
                source,
                replace,
            } => {
                let dir = self.config.images_dir.clone();
                let report = tokio::task::spawn_blocking(move || {
                    crate::images::import(&dir, &name, Path::new(&source), replace)
                })
                .await
                .map_err(|e| ApiError::internal(format!("image import task: {e}")))?
                .map_err(|e| image_error(&e))?;
                Ok(to_json(&report))
            }
            ApiRequest::ImageRemove { name } => {
                crate::images::remove(&self.config.images_dir, &name)
                    .map_err(|e| image_error(&e))?;
                Ok(ApiResponse::Json(serde_json::json!({ "removed": name })))
            }
            ApiRequest::Cast { pool, payload, all } => {
                match self.runtime.cast(&pool, payload.as_bytes(), all) {
                    Ok(()) => {}
                    // Not here: one node that runs it takes it.
                    Err(RuntimeError::UnknownPool(_))
                        if self
                            .forward
                            .as_ref()
                            .is_some_and(|f| f.cast(&pool, payload.as_bytes(), all, false)) => {}
                    Err(e) => return Err(runtime_error(&e)),
                }
                Ok(ApiResponse::Json(
                    serde_json::json!({ "queued": true, "pool": pool, "all": all }),
                ))
            }
            ApiRequest::Logs { pool, offset } => {
                self.blocking(move |rt| {
                    let log = rt.pool_log(&pool).map_err(|e| runtime_error(&e))?;
                    let read = match offset {
                        Some(o) => log.read_from(o, LOG_CHUNK),
                        None => log.tail(LOG_CHUNK),
                    };
                    let (bytes, next) = read.map_err(|e| {
                        ApiError::internal(format!("reading the log of {pool}: {e}"))
                    })?;
                    Ok(ApiResponse::Json(serde_json::json!({
                        "pool": pool,
                        "path": log.path(),
                        "text": String::from_utf8_lossy(&bytes),
                        "next_offset": next,
                    })))
                })
                .await
            }
        }
    }

    fn status(&self) -> StatusInfo {
        StatusInfo {
            node_id: self.node_id.to_string(),
            name: self.config.node_name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            pid: std::process::id(),
            config_path: self.config.path.clone(),
            state_dir: self.config.state_dir.clone(),
            socket: self.config.socket.clone(),
            gateway: self.gateway.map(|a| a.to_string()),
            pools: self.runtime.pool_statuses().len(),
        }
    }

    fn select(&self, only: &[String]) -> Result<Vec<tune::Entry>, ApiError> {
        match self.profile.select(only) {
            Ok(entries) => Ok(entries.into_iter().cloned().collect()),
            Err(unknown) => Err(ApiError::new(
                400,
                "unknown_key",
                format!("not in the tuning profile: {}", unknown.join(", ")),
            )),
        }
    }
}

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
