//! The control API as types: what a client may ask ([`ApiRequest`]), what it gets back
//! ([`ApiResponse`]) and every distinct error ([`ApiError`]). The server only decodes an HTTP
//! request into an `ApiRequest`, hands it to the owner of the state, and encodes the answer.
//!
//! Routes (all under `/v1/`, JSON bodies):
//! - `GET  /v1/status` — node id, name, version, uptime, pid, config path
//! - `GET  /v1/tune/check[?only=KEY,KEY]` — the host against the tuning profile, key by key
//! - `POST /v1/tune/apply` with optional `{"only": ["KEY", ...]}` — apply and read back
//! - `GET /v1/flows`, `POST /v1/flows` `{"file", "source"}`, `GET|DELETE /v1/flows/<name>`
//! - `GET /v1/pools`, `GET /v1/pools/<name>`, `POST /v1/pools/<name>/call` `{"payload"}`
//! - `POST /v1/pools/<name>/cast` `{"payload", "all"}` — queue without waiting (202-like `{"queued": true}`)
//! - `POST /v1/pools/<name>/scale` `{"min", "max"}` — resize at run time
//! - `POST /v1/pools/<name>/restart` — stop and start it again (also a `failed` pool)
//! - `GET /v1/images`, `PUT /v1/images/<name>[?replace=true]` with the bundle as a tarball
//!   (`.tar` or gzip) as the body, `DELETE /v1/images/<name>` — bundles
//! - `GET /v1/pools/<name>/logs[?offset=N]` — the pool's log from `offset` (default: the tail)
//! - `GET /v1/events[?since=SEQ&limit=N&wait=SECS&cluster=true]` — this node's event log after
//!   `since` (default: from the oldest kept), waiting up to `wait` seconds (≤ 30) for the next
//!   event when there is none; `cluster=true` merges every reachable member's recent events
//!
//! - `GET /v1/plugins` — the plugins (folders that packages install under `[plugins] dir`):
//!   name, folder, flow, state (`applied`, `error` or `conflict`, with a `message`), pools, as
//!   of the last pass; `POST /v1/plugins/reload` — a pass now: applies new and changed plugins'
//!   flows, stops those of plugins that are gone, and says what it changed (409
//!   `plugins_off` with `[plugins] enabled = false`)
//!
//! - `POST /v1/drain`, `POST /v1/undrain`, `GET /v1/drain` — drain this node: no new gateway
//!   calls, leadership, floating IP or service instances; the answer says what still keeps it
//!   from being drained (`drained: true` once nothing does)
//!
//! Cluster mode only (409 `not_clustered` otherwise):
//! - `GET /v1/overview` — the node's namespace as a whole: leader, quorum, floating IP and
//!   holder, every member with its state, drain and pools (asked of each over the peer
//!   transport), services with their active count
//! - `GET /v1/nodes` — every member: state (alive/suspect/dead/left), namespace, leader, version
//! - `GET|POST /v1/namespaces` `{"name", "vip", "nodes"}`, `GET|DELETE /v1/namespaces/<name>`
//! - `POST /v1/namespaces/<name>/join` — move this node there; `POST /v1/leave` — leave it
//! - `PUT|DELETE /v1/namespaces/<name>/health` with `{"pool"|"command"|"unit", "rise", "fall",
//!   "interval_ms", "timeout_ms", "payload"}` — the floating IP's health check
//! - `GET /v1/vip`, `GET /v1/vip/<namespace>` — floating IPs: address, holder, MAC, since, GARPs
//!   sent, conflicts seen, health (the counters are this node's)
//! - `GET /v1/services[?ns=]`, `GET|PUT|DELETE /v1/services/<name>[?ns=]` (PUT body: `count`
//!   and `unit` (text) or `exec` (argv) with `memory`, `cpu`, `tasks`, `user`, `env`, `restart`,
//!   `ns`), `GET /v1/services/<name>/logs[?lines=N]` — services kept at their count
//! - `GET /v1/lb` — the XDP balancer here: interface, mode, VIP:ports with backends and counters
//! - `POST /v1/flows` takes an optional `"ns"`; `DELETE /v1/flows/<name>[?ns=NAME]`: in cluster
//!   mode flows go to the replicated state and every member runs its share

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::error::{ApiError, ErrorBody, ErrorDetail};
use crate::host::tune::{ApplyReport, CheckReport};
use crate::http::Request;

#[derive(Debug, Clone, PartialEq)]
pub enum ApiRequest {
    Status,
    TuneCheck {
        only: Vec<String>,
    },
    TuneApply {
        only: Vec<String>,
    },
    FlowList,
    FlowApply {
        file: String,
        source: String,
        ns: Option<String>,
    },
    FlowShow {
        name: String,
    },
    FlowRemove {
        name: String,
        ns: Option<String>,
    },
    NodeList,
    NsList,
    NsCreate {
        name: String,
        vip: Option<String>,
        nodes: Vec<String>,
    },
    NsShow {
        name: String,
    },
    NsRemove {
        name: String,
    },
    NsJoin {
        name: String,
    },
    NsLeave,
    /// Sets (`Some`) or removes the namespace's floating-IP health check.
    NsHealth {
        name: String,
        health: Option<serde_json::Value>,
    },
    VipList,
    VipShow {
        ns: String,
    },
    PoolList,
    PoolShow {
        name: String,
    },
    PoolRestart {
        name: String,
    },
    Call {
        pool: String,
        payload: String,
    },
    Cast {
        pool: String,
        payload: String,
        all: bool,
    },
    Logs {
        pool: String,
        offset: Option<u64>,
    },
    Scale {
        pool: String,
        min: u32,
        max: u32,
    },
    ImageList,
    /// A bundle a client sent, already received into the daemon's own upload file (the
    /// server builds this after the body; `decode` never does).
    ImageImport {
        name: String,
        upload: PathBuf,
        gzip: bool,
        replace: bool,
    },
    ImageRemove {
        name: String,
    },
    ServiceList {
        ns: Option<String>,
    },
    LbStatus,
    ServiceSet {
        name: String,
        request: Box<crate::services::spec::ServiceRequest>,
    },
    ServiceShow {
        name: String,
        ns: Option<String>,
    },
    ServiceRemove {
        name: String,
        ns: Option<String>,
    },
    ServiceLogs {
        name: String,
        ns: Option<String>,
        lines: u32,
    },
    Events(EventsQuery),
    /// `Some(true)`: drain; `Some(false)`: undrain; `None`: only report.
    Drain(Option<bool>),
    /// The namespace as a whole (`dropctl status` in cluster mode).
    Overview,
    PluginList,
    PluginReload,
}

/// `GET /v1/events`: where to start, how many, how long to wait, and whose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventsQuery {
    pub since: u64,
    pub limit: usize,
    pub wait_secs: u64,
    pub cluster: bool,
}

/// Longest wait of one `GET /v1/events` (a follower asks again).
pub const EVENTS_MAX_WAIT_SECS: u64 = 30;

impl EventsQuery {
    /// Decodes `since`, `limit`, `wait` and `cluster` from a query string.
    pub fn from_query(query: Option<&str>) -> Result<EventsQuery, ApiError> {
        let mut q = EventsQuery {
            since: 0,
            limit: 200,
            wait_secs: 0,
            cluster: false,
        };
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let bad = || {
                ApiError::new(
                    400,
                    "invalid_query",
                    format!(
                        "{pair:?}: expected since=SEQ, limit=1..={}, wait=0..={EVENTS_MAX_WAIT_SECS} or cluster=true|false",
                        crate::events::CAPACITY
                    ),
                )
            };
            let (k, v) = pair.split_once('=').ok_or_else(bad)?;
            match k {
                "since" => q.since = v.parse().map_err(|_| bad())?,
                "limit" => {
                    q.limit = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=crate::events::CAPACITY).contains(n))
                        .ok_or_else(bad)?
                }
                "wait" => {
                    q.wait_secs = v
                        .parse()
                        .ok()
                        .filter(|n| *n <= EVENTS_MAX_WAIT_SECS)
                        .ok_or_else(bad)?
                }
                "cluster" => q.cluster = v.parse().map_err(|_| bad())?,
                _ => return Err(bad()),
            }
        }
        Ok(q)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusInfo {
    pub node_id: String,
    pub name: String,
    pub version: String,
    pub uptime_secs: u64,
    pub pid: u32,
    pub config_path: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// Address of the HTTP gateway, when it is on.
    pub gateway: Option<String>,
    /// Pools running on this node.
    pub pools: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ApiResponse {
    Status(StatusInfo),
    TuneCheck(CheckReport),
    TuneApply(ApplyReport),
    /// Answers whose shape is defined by the runtime's serialisable types.
    Json(serde_json::Value),
}

impl ApiResponse {
    pub fn to_json(&self) -> Vec<u8> {
        let result = match self {
            ApiResponse::Status(s) => serde_json::to_vec(s),
            ApiResponse::TuneCheck(r) => serde_json::to_vec(r),
            ApiResponse::TuneApply(r) => serde_json::to_vec(r),
            ApiResponse::Json(v) => serde_json::to_vec(v),
        };
        result.expect("API responses serialise")
    }
}

fn not_found(req: &Request) -> ApiError {
    ApiError::new(
        404,
        "not_found",
        format!("no such endpoint: {} {}", req.method, req.path),
    )
}

fn method_not_allowed(req: &Request, allowed: &str) -> ApiError {
    ApiError::new(
        405,
        "method_not_allowed",
        format!(
            "{} is not allowed on {}; use {allowed}",
            req.method, req.path
        ),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FlowApplyBody {
    file: String,
    source: String,
    #[serde(default)]
    ns: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NsCreateBody {
    name: String,
    #[serde(default)]
    vip: Option<String>,
    #[serde(default)]
    nodes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallBody {
    payload: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaleBody {
    min: u32,
    max: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CastBody {
    payload: String,
    #[serde(default)]
    all: bool,
}

fn json_body<T: serde::de::DeserializeOwned>(req: &Request) -> Result<T, ApiError> {
    serde_json::from_slice(&req.body)
        .map_err(|e| ApiError::invalid_body(format!("body of {}: {e}", req.path)))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TuneApplyBody {
    #[serde(default)]
    only: Vec<String>,
}

/// Decodes an HTTP request into an API request.
pub fn decode(req: &Request) -> Result<ApiRequest, ApiError> {
    let method = req.method.as_str();
    match req.path.trim_end_matches('/') {
        "/v1/status" => match method {
            "GET" => Ok(ApiRequest::Status),
            _ => Err(method_not_allowed(req, "GET")),
        },
        "/v1/tune/check" => match method {
            "GET" => Ok(ApiRequest::TuneCheck {
                only: query_list(req.query.as_deref(), "only")?,
            }),
            _ => Err(method_not_allowed(req, "GET")),
        },
        "/v1/tune/apply" => match method {
            "POST" => {
                let body: TuneApplyBody = if req.body.iter().all(u8::is_ascii_whitespace) {
                    TuneApplyBody::default()
                } else {
                    serde_json::from_slice(&req.body)
                        .map_err(|e| ApiError::invalid_body(format!("body of {}: {e}", req.path)))?
                };
                Ok(ApiRequest::TuneApply { only: body.only })
            }
            _ => Err(method_not_allowed(req, "POST")),
        },
        "/v1/flows" => match method {
            "GET" => Ok(ApiRequest::FlowList),
            "POST" => {
                let body: FlowApplyBody = json_body(req)?;
                Ok(ApiRequest::FlowApply {
                    file: body.file,
                    source: body.source,
                    ns: body.ns,
                })
            }
            _ => Err(method_not_allowed(req, "GET or POST")),
        },
        "/v1/images" => match method {
            "GET" => Ok(ApiRequest::ImageList),
            // The daemon never opens a path on a caller's behalf: the bundle's bytes come with
            // the request (`PUT /v1/images/<name>`).
            "POST" => Err(ApiError::new(
                410,
                "gone",
                "the daemon no longer reads a path for its caller: send the bundle as a tarball \
                 with PUT /v1/images/<name> (dropctl image import does)",
            )),
            _ => Err(method_not_allowed(req, "GET")),
        },
        "/v1/nodes" => match method {
            "GET" => Ok(ApiRequest::NodeList),
            _ => Err(method_not_allowed(req, "GET")),
        },
        "/v1/namespaces" => match method {
            "GET" => Ok(ApiRequest::NsList),
            "POST" => {
                let body: NsCreateBody = json_body(req)?;
                Ok(ApiRequest::NsCreate {
                    name: body.name,
                    vip: body.vip,
                    nodes: body.nodes,
                })
            }
            _ => Err(method_not_allowed(req, "GET or POST")),
        },
        "/v1/leave" => match method {
            "POST" => Ok(ApiRequest::NsLeave),
            _ => Err(method_not_allowed(req, "POST")),
        },
        "/v1/pools" => match method {
            "GET" => Ok(ApiRequest::PoolList),
            _ => Err(method_not_allowed(req, "GET")),
        },
        "/v1/vip" => match method {
            "GET" => Ok(ApiRequest::VipList),
            _ => Err(method_not_allowed(req, "GET")),
        },
        "/v1/plugins" => match method {
            "GET" => Ok(ApiRequest::PluginList),
            _ => Err(method_not_allowed(req, "GET")),
        },
        "/v1/plugins/reload" => match method {
            "POST" => Ok(ApiRequest::PluginReload),
            _ => Err(method_not_allowed(req, "POST")),
        },
        "/v1/overview" => match method {
            "GET" => Ok(ApiRequest::Overview),
            _ => Err(method_not_allowed(req, "GET")),
        },
        "/v1/drain" => match method {
            "GET" => Ok(ApiRequest::Drain(None)),
            "POST" => Ok(ApiRequest::Drain(Some(true))),
            _ => Err(method_not_allowed(req, "GET or POST")),
        },
        "/v1/undrain" => match method {
            "POST" => Ok(ApiRequest::Drain(Some(false))),
            _ => Err(method_not_allowed(req, "POST")),
        },
        "/v1/events" => match method {
            "GET" => Ok(ApiRequest::Events(EventsQuery::from_query(
                req.query.as_deref(),
            )?)),
            _ => Err(method_not_allowed(req, "GET")),
        },
        "/v1/lb" => match method {
            "GET" => Ok(ApiRequest::LbStatus),
            _ => Err(method_not_allowed(req, "GET")),
        },
        "/v1/services" => match method {
            "GET" => Ok(ApiRequest::ServiceList {
                ns: query_params(req, &["ns"])?.remove("ns"),
            }),
            _ => Err(method_not_allowed(req, "GET")),
        },
        path => decode_named(req, method, path),
    }
}

/// `/v1/flows/<name>` and `/v1/pools/<name>[/call|/logs]`.
fn decode_named(req: &Request, method: &str, path: &str) -> Result<ApiRequest, ApiError> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["v1", "flows", name] if !name.is_empty() => match method {
            "GET" => Ok(ApiRequest::FlowShow {
                name: name.to_string(),
            }),
            "DELETE" => Ok(ApiRequest::FlowRemove {
                name: name.to_string(),
                ns: query_list(req.query.as_deref(), "ns")?.into_iter().next(),
            }),
            _ => Err(method_not_allowed(req, "GET or DELETE")),
        },
        ["v1", "namespaces", name] if !name.is_empty() => match method {
            "GET" => Ok(ApiRequest::NsShow {
                name: name.to_string(),
            }),
            "DELETE" => Ok(ApiRequest::NsRemove {
                name: name.to_string(),
            }),
            _ => Err(method_not_allowed(req, "GET or DELETE")),
        },
        ["v1", "namespaces", name, "health"] if !name.is_empty() => match method {
            "PUT" => {
                let body: serde_json::Value = json_body(req)?;
                Ok(ApiRequest::NsHealth {
                    name: name.to_string(),
                    health: Some(body),
                })
            }
            "DELETE" => Ok(ApiRequest::NsHealth {
                name: name.to_string(),
                health: None,
            }),
            _ => Err(method_not_allowed(req, "PUT or DELETE")),
        },
        ["v1", "services", name] if !name.is_empty() => {
            let ns = query_params(req, &["ns"])?.remove("ns");
            match method {
                "GET" => Ok(ApiRequest::ServiceShow {
                    name: name.to_string(),
                    ns,
                }),
                "PUT" => Ok(ApiRequest::ServiceSet {
                    name: name.to_string(),
                    request: json_body(req)?,
                }),
                "DELETE" => Ok(ApiRequest::ServiceRemove {
                    name: name.to_string(),
                    ns,
                }),
                _ => Err(method_not_allowed(req, "GET, PUT or DELETE")),
            }
        }
        ["v1", "services", name, "logs"] if !name.is_empty() => match method {
            "GET" => {
                let mut q = query_params(req, &["ns", "lines"])?;
                let lines = match q.get("lines") {
                    None => 100,
                    Some(n) => n
                        .parse::<u32>()
                        .ok()
                        .filter(|n| (1..=10_000).contains(n))
                        .ok_or_else(|| {
                            ApiError::invalid_body(format!("lines={n}: a number from 1 to 10000"))
                        })?,
                };
                Ok(ApiRequest::ServiceLogs {
                    name: name.to_string(),
                    ns: q.remove("ns"),
                    lines,
                })
            }
            _ => Err(method_not_allowed(req, "GET")),
        },
        ["v1", "vip", ns] if !ns.is_empty() => match method {
            "GET" => Ok(ApiRequest::VipShow { ns: ns.to_string() }),
            _ => Err(method_not_allowed(req, "GET")),
        },
        ["v1", "namespaces", name, "join"] if !name.is_empty() => match method {
            "POST" => Ok(ApiRequest::NsJoin {
                name: name.to_string(),
            }),
            _ => Err(method_not_allowed(req, "POST")),
        },
        ["v1", "pools", name] if !name.is_empty() => match method {
            "GET" => Ok(ApiRequest::PoolShow {
                name: name.to_string(),
            }),
            _ => Err(method_not_allowed(req, "GET")),
        },
        ["v1", "pools", name, "call"] if !name.is_empty() => match method {
            "POST" => {
                let body: CallBody = json_body(req)?;
                Ok(ApiRequest::Call {
                    pool: name.to_string(),
                    payload: body.payload,
                })
            }
            _ => Err(method_not_allowed(req, "POST")),
        },
        ["v1", "images", name] if !name.is_empty() => match method {
            "DELETE" => Ok(ApiRequest::ImageRemove {
                name: name.to_string(),
            }),
            _ => Err(method_not_allowed(req, "PUT or DELETE")),
        },
        ["v1", "pools", name, "restart"] if !name.is_empty() => match method {
            "POST" => Ok(ApiRequest::PoolRestart {
                name: name.to_string(),
            }),
            _ => Err(method_not_allowed(req, "POST")),
        },
        ["v1", "pools", name, "scale"] if !name.is_empty() => match method {
            "POST" => {
                let body: ScaleBody = json_body(req)?;
                Ok(ApiRequest::Scale {
                    pool: name.to_string(),
                    min: body.min,
                    max: body.max,
                })
            }
            _ => Err(method_not_allowed(req, "POST")),
        },
        ["v1", "pools", name, "cast"] if !name.is_empty() => match method {
            "POST" => {
                let body: CastBody = json_body(req)?;
                Ok(ApiRequest::Cast {
                    pool: name.to_string(),
                    payload: body.payload,
                    all: body.all,
                })
            }
            _ => Err(method_not_allowed(req, "POST")),
        },
        ["v1", "pools", name, "logs"] if !name.is_empty() => match method {
            "GET" => {
                let mut offset = None;
                for pair in req
                    .query
                    .as_deref()
                    .unwrap_or_default()
                    .split('&')
                    .filter(|p| !p.is_empty())
                {
                    match pair.split_once('=') {
                        Some(("offset", v)) => {
                            offset = Some(v.parse().map_err(|_| {
                                ApiError::new(
                                    400,
                                    "invalid_query",
                                    format!("offset {v:?} is not a number"),
                                )
                            })?);
                        }
                        _ => {
                            return Err(ApiError::new(
                                400,
                                "invalid_query",
                                format!("unknown query parameter {pair:?}"),
                            ));
                        }
                    }
                }
                Ok(ApiRequest::Logs {
                    pool: name.to_string(),
                    offset,
                })
            }
            _ => Err(method_not_allowed(req, "GET")),
        },
        _ => Err(not_found(req)),
    }
}

/// `only=a,b&x=y` → `["a", "b"]` for `name = "only"`. Other parameters are refused.
/// `k=v` pairs of the query, each named in `allowed`; another name is a 400.
fn query_params(
    req: &Request,
    allowed: &[&str],
) -> Result<std::collections::BTreeMap<String, String>, ApiError> {
    let mut out = std::collections::BTreeMap::new();
    for pair in req
        .query
        .as_deref()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some((k, v)) if allowed.contains(&k) && !v.is_empty() => {
                out.insert(k.to_string(), v.to_string());
            }
            _ => {
                return Err(ApiError::new(
                    400,
                    "invalid_query",
                    format!(
                        "unknown query parameter {pair:?} (known: {})",
                        allowed.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(out)
}

fn query_list(query: Option<&str>, name: &str) -> Result<Vec<String>, ApiError> {
    let mut out = Vec::new();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some((k, v)) if k == name => {
                out.extend(v.split(',').filter(|s| !s.is_empty()).map(str::to_string));
            }
            _ => {
                return Err(ApiError::new(
                    400,
                    "invalid_query",
                    format!("unknown query parameter {pair:?}"),
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, target: &str, body: &str) -> Request {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (target.to_string(), None),
        };
        Request {
            method: method.into(),
            path,
            query,
            body: body.as_bytes().to_vec(),
            close: false,
            authorization: None,
            peer_auth: None,
            head: Vec::new(),
        }
    }

    #[test]
    fn events_query_decodes_and_refuses_what_it_cannot_honour() {
        assert_eq!(
            decode(&req("GET", "/v1/events", "")),
            Ok(ApiRequest::Events(EventsQuery {
                since: 0,
                limit: 200,
                wait_secs: 0,
                cluster: false
            }))
        );
        assert_eq!(
            decode(&req(
                "GET",
                "/v1/events?since=41&limit=5&wait=25&cluster=true",
                ""
            )),
            Ok(ApiRequest::Events(EventsQuery {
                since: 41,
                limit: 5,
                wait_secs: 25,
                cluster: true
            }))
        );
        for bad in [
            "wait=31",
            "limit=0",
            "limit=2001",
            "since=-1",
            "cluster=yes",
            "x=1",
            "since",
        ] {
            let err = decode(&req("GET", &format!("/v1/events?{bad}"), "")).unwrap_err();
            assert_eq!(
                (err.status, err.code.as_str()),
                (400, "invalid_query"),
                "{bad}"
            );
        }
        assert_eq!(
            decode(&req("POST", "/v1/events", "")).unwrap_err().status,
            405
        );
        assert_eq!(
            decode(&req("POST", "/v1/drain", "")),
            Ok(ApiRequest::Drain(Some(true)))
        );
        assert_eq!(
            decode(&req("GET", "/v1/drain", "")),
            Ok(ApiRequest::Drain(None))
        );
        assert_eq!(
            decode(&req("POST", "/v1/undrain", "")),
            Ok(ApiRequest::Drain(Some(false)))
        );
    }

    #[test]
    fn plugin_routes_decode() {
        assert_eq!(
            decode(&req("GET", "/v1/plugins", "")),
            Ok(ApiRequest::PluginList)
        );
        assert_eq!(
            decode(&req("POST", "/v1/plugins/reload", "")),
            Ok(ApiRequest::PluginReload)
        );
        assert_eq!(
            decode(&req("POST", "/v1/plugins/reload/", "{}")),
            Ok(ApiRequest::PluginReload)
        );
        for (method, path) in [
            ("POST", "/v1/plugins"),
            ("GET", "/v1/plugins/reload"),
            ("DELETE", "/v1/plugins"),
        ] {
            let e = decode(&req(method, path, "")).unwrap_err();
            assert_eq!((e.status, e.code.as_str()), (405, "method_not_allowed"));
        }
        let e = decode(&req("GET", "/v1/plugins/node-stats", "")).unwrap_err();
        assert_eq!((e.status, e.code.as_str()), (404, "not_found"));
    }

    #[test]
    fn routes_decode_to_typed_requests() {
        assert_eq!(
            decode(&req("GET", "/v1/status", "")),
            Ok(ApiRequest::Status)
        );
        assert_eq!(
            decode(&req("GET", "/v1/status/", "")),
            Ok(ApiRequest::Status)
        );
        assert_eq!(
            decode(&req(
                "GET",
                "/v1/tune/check?only=vm.swappiness,kernel.panic",
                ""
            )),
            Ok(ApiRequest::TuneCheck {
                only: vec!["vm.swappiness".into(), "kernel.panic".into()]
            })
        );
        assert_eq!(
            decode(&req("POST", "/v1/tune/apply", "")),
            Ok(ApiRequest::TuneApply { only: vec![] })
        );
        assert_eq!(
            decode(&req(
                "POST",
                "/v1/tune/apply",
                r#"{"only":["kernel.panic"]}"#
            )),
            Ok(ApiRequest::TuneApply {
                only: vec!["kernel.panic".into()]
            })
        );
    }

    #[test]
    fn errors_are_distinct() {
        let status = |r: Request| decode(&r).unwrap_err();
        let e = status(req("GET", "/v2/status", ""));
        assert_eq!((e.status, e.code.as_str()), (404, "not_found"));
        let e = status(req("DELETE", "/v1/status", ""));
        assert_eq!((e.status, e.code.as_str()), (405, "method_not_allowed"));
        let e = status(req("POST", "/v1/tune/apply", "{not json"));
        assert_eq!((e.status, e.code.as_str()), (400, "invalid_body"));
        let e = status(req("POST", "/v1/tune/apply", r#"{"onyl":[]}"#));
        assert!(e.message.contains("onyl"), "{e}");
        let e = status(req("GET", "/v1/tune/check?x=1", ""));
        assert_eq!((e.status, e.code.as_str()), (400, "invalid_query"));
    }

    #[test]
    fn error_body_shape() {
        let e = ApiError::new(404, "not_found", "nope");
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": {"code": "not_found", "message": "nope"}})
        );
    }
}
