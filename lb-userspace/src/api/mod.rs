//! The control API: HTTP/JSON, one router (`server`) served on the root-only Unix socket (the
//! CLI's way in) and optionally on TCP with bearer tokens; its OpenAPI document (`openapi`).
//! This module also holds what a client does: the operations ([`Request`]), how each maps to
//! a method and path, and a blocking call over the Unix socket for the CLI.

pub mod access;
pub mod failure;
pub mod openapi;
pub mod server;

use std::{net::SocketAddr, path::Path, time::Duration};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::{Deserialize, Serialize};

use crate::config::{BackendSpec, Protocol, ServiceSpec};

/// What a client can ask of the daemon.
#[derive(Debug, Clone)]
pub enum Request {
    Status,
    /// The effective config: `[daemon]` with its defaults, and the services as they run.
    Config,
    ListServices,
    AddService {
        service: ServiceSpec,
    },
    RemoveService {
        name: String,
    },
    /// Register a backend; with `ttl` (seconds) it must heartbeat within it.
    AddBackend {
        service: String,
        backend: BackendSpec,
        ttl: Option<f64>,
        deregister_after: Option<f64>,
    },
    /// Renew the TTL of a backend registered with one.
    Heartbeat {
        service: String,
        id: String,
    },
    RemoveBackend {
        service: String,
        id: String,
    },
    SetWeight {
        service: String,
        id: String,
        weight: u32,
    },
    /// The operator's drain of a backend: no new flows, its weight kept; `drained: false`
    /// lifts it.
    DrainBackend {
        service: String,
        id: String,
        drained: bool,
    },
    SetStrategy {
        service: String,
        strategy: crate::model::Strategy,
    },
    Stats,
    /// Every backend's health, or one service's.
    Health {
        service: Option<String>,
    },
    /// Set a backend's external health score (0..1), optionally for `ttl` seconds.
    SetHealth {
        service: String,
        id: String,
        score: f64,
        ttl: Option<f64>,
    },
    /// A backend's own load report, holding `ttl` seconds (default 30).
    ReportLoad {
        service: String,
        id: String,
        report: crate::status::load::LoadReport,
        ttl: Option<f64>,
    },
    Lookup {
        protocol: Protocol,
        src: SocketAddr,
        dst: SocketAddr,
    },
    /// Re-read the config file and apply what changed.
    Reload,
    /// The geo data in use and each geo service's serving regions.
    Geo,
    /// Load the geo data file again.
    GeoReload,
    /// Stop the daemon; the data plane stays attached.
    Shutdown,
    /// This node's announcements, BGP sessions, drain flag and VIP traffic.
    Node,
    /// Withdraw every VIP (`lb node drain`), or announce them again.
    Drain,
    Undrain,
    /// The cluster's nodes, revisions and digests.
    Cluster,
    /// Make a config file's services the cluster's state.
    ClusterPush {
        text: String,
    },
    /// What a change would do, applied to nothing (disruption preview).
    Plan {
        change: crate::control::preview::PlanChange,
    },
}

/// A successful answer: the data, and warnings about the system around the balancer.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Envelope {
    /// Any JSON value: an object, a list or a short message, per operation.
    #[schema(value_type = Value)]
    pub data: serde_json::Value,
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// Every error: a short kind and a one-line message.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiError {
    /// `invalid`, `not-found`, `exists`, `unauthorized`, `forbidden`, `internal`.
    pub error: String,
    pub detail: String,
}

/// What a call returned: ok with data and warnings, or the API's error.
#[derive(Debug, Clone)]
pub struct Response {
    pub ok: bool,
    pub error: Option<String>,
    pub warnings: Vec<String>,
    pub data: serde_json::Value,
}

/// Characters a path segment keeps as they are.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn seg(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

impl Request {
    /// The method, path (with query) and JSON body of this operation.
    pub fn route(&self) -> (&'static str, String, Option<serde_json::Value>) {
        use serde_json::json;
        match self {
            Self::Status => ("GET", "/v1/status".into(), None),
            Self::ListServices => ("GET", "/v1/services".into(), None),
            Self::AddService { service } => ("POST", "/v1/services".into(), Some(json!(service))),
            Self::RemoveService { name } => ("DELETE", format!("/v1/services/{}", seg(name)), None),
            Self::AddBackend {
                service,
                backend,
                ttl,
                deregister_after,
            } => {
                let mut body = json!(backend);
                for (key, v) in [("ttl", ttl), ("deregister_after", deregister_after)] {
                    if let Some(v) = v {
                        body[key] = json!(v);
                    }
                }
                (
                    "POST",
                    format!("/v1/services/{}/instances", seg(service)),
                    Some(body),
                )
            }
            Self::Heartbeat { service, id } => (
                "PUT",
                format!("/v1/services/{}/instances/{}/heartbeat", seg(service), seg(id)),
                None,
            ),
            Self::RemoveBackend { service, id } => (
                "DELETE",
                format!("/v1/services/{}/instances/{}", seg(service), seg(id)),
                None,
            ),
            Self::SetWeight { service, id, weight } => (
                "PUT",
                format!("/v1/services/{}/instances/{}/weight", seg(service), seg(id)),
                Some(json!({ "weight": weight })),
            ),
            Self::DrainBackend { service, id, drained } => (
                "POST",
                format!(
                    "/v1/services/{}/instances/{}/{}",
                    seg(service),
                    seg(id),
                    if *drained { "drain" } else { "undrain" }
                ),
                None,
            ),
            Self::SetStrategy { service, strategy } => (
                "PUT",
                format!("/v1/services/{}/strategy", seg(service)),
                Some(json!({ "strategy": strategy })),
            ),
            Self::Stats => ("GET", "/v1/stats".into(), None),
            Self::Health { service } => (
                "GET",
                match service {
                    Some(s) => format!("/v1/health?service={}", seg(s)),
                    None => "/v1/health".into(),
                },
                None,
            ),
            Self::SetHealth {
                service,
                id,
                score,
                ttl,
            } => (
                "PUT",
                format!("/v1/services/{}/instances/{}/health", seg(service), seg(id)),
                Some(json!({ "score": score, "ttl": ttl })),
            ),
            Self::ReportLoad {
                service,
                id,
                report,
                ttl,
            } => {
                let mut body = json!(report);
                if let Some(t) = ttl {
                    body["ttl"] = json!(t);
                }
                (
                    "PUT",
                    format!("/v1/services/{}/instances/{}/load", seg(service), seg(id)),
                    Some(body),
                )
            }
            Self::Lookup { protocol, src, dst } => (
                "GET",
                format!(
                    "/v1/lookup?protocol={protocol}&src={}&dst={}",
                    seg(&src.to_string()),
                    seg(&dst.to_string())
                ),
                None,
            ),
            Self::Reload => ("POST", "/v1/reload".into(), None),
            Self::Geo => ("GET", "/v1/geo".into(), None),
            Self::Config => ("GET", "/v1/config".into(), None),
            Self::GeoReload => ("POST", "/v1/geo/reload".into(), None),
            Self::Shutdown => ("POST", "/v1/shutdown".into(), None),
            Self::Node => ("GET", "/v1/node".into(), None),
            Self::Drain => ("POST", "/v1/node/drain".into(), None),
            Self::Undrain => ("POST", "/v1/node/undrain".into(), None),
            Self::Cluster => ("GET", "/v1/cluster".into(), None),
            Self::ClusterPush { text } => ("POST", "/v1/cluster/push".into(), Some(json!({ "text": text }))),
            Self::Plan { change } => ("POST", "/v1/plan".into(), Some(json!(change))),
        }
    }
}

/// Sends one request over the Unix socket and waits for its answer.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> anyhow::Result<Response> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (method, path, body) = request.route();
    rt.block_on(async {
        tokio::time::timeout(timeout, send(socket, method, &path, body))
            .await
            .map_err(|_| anyhow::anyhow!("the daemon did not answer within {} s", timeout.as_secs()))?
    })
}

async fn send(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<Response> {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                " (is the daemon running?)"
            }
            std::io::ErrorKind::PermissionDenied => " (the control socket is root-only)",
            _ => "",
        };
        anyhow::anyhow!("cannot reach the daemon at {}: {e}{hint}", socket.display())
    })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let driver = tokio::spawn(conn);
    let bytes = body
        .map(|b| serde_json::to_vec(&b))
        .transpose()?
        .unwrap_or_default();
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "lb")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)))?;
    let answer = sender.send_request(request).await?;
    let status = answer.status();
    let raw = answer.into_body().collect().await?.to_bytes();
    driver.abort();
    if status.is_success() {
        let env: Envelope = serde_json::from_slice(&raw)
            .map_err(|e| anyhow::anyhow!("the daemon's answer is not what this CLI expects: {e}"))?;
        return Ok(Response {
            ok: true,
            error: None,
            warnings: env.warnings,
            data: env.data,
        });
    }
    let detail = match serde_json::from_slice::<ApiError>(&raw) {
        Ok(e) => e.detail,
        Err(_) => format!("HTTP {status}: {}", String::from_utf8_lossy(&raw).trim()),
    };
    Ok(Response {
        ok: false,
        error: Some(detail),
        warnings: Vec::new(),
        data: serde_json::Value::Null,
    })
}
