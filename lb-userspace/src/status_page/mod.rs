//! The live status page (`/status`): one page of HTML, CSS and JavaScript built into the
//! binary, and the JSON it fetches every second (`/status/data`): the API's own fields
//! (`GET /v1/services` less its table slot counts, `/v1/health` whole, `/v1/stats`'s counters,
//! the announcer's state) taken from one snapshot. The page computes rates from two samples,
//! as `lb top` does.
//!
//! The page itself holds no data, so it is served to anyone who can reach the listener; its
//! data needs what the listener needs (`Gate`): the metrics token, if the metrics listener has
//! one, or a read or admin token on the TCP API. A browser cannot send a bearer header with a
//! page load, so the page takes the token from the URL's fragment (`/status#token=...`,
//! which is never sent to the server) and sends it with each fetch.
//!
//! What backends control (agent replies, labels) reaches the page as JSON strings and is put
//! in the DOM as text only; the Content-Security-Policy lets no inline script or outside
//! resource run or load even if something slipped through.

use std::sync::Arc;

use axum::{
    Router,
    extract::{Path, Query, State, rejection::QueryRejection},
    http::{HeaderValue, StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    api::{
        failure::Failure,
        server::{Shared, queries},
    },
    control::queries::Queries,
};

const PAGE: &str = include_str!("status.html");
const SCRIPT: &str = include_str!("status.js");
const STYLE: &str = include_str!("status.css");

/// How often the page fetches its data, in milliseconds (the page reads it from the data).
pub const REFRESH_MS: u64 = 1000;

/// Scripts and styles from this origin only, no inline script or style attribute run, no
/// outside fetch, image or frame (`data:` images: the page's empty icon, so the browser asks
/// for no /favicon.ico).
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Who may read the page's data on a listener: the listener's own rule, given the request
/// (the metrics token, or the API's scopes, which audit a refusal as the API's guard does).
#[derive(Clone)]
pub struct Gate {
    /// Anyone may: the metrics listener without `token_file`.
    open: bool,
    check: Arc<Check>,
}

type Check = dyn Fn(&Parts) -> Result<(), Failure> + Send + Sync;

impl Gate {
    pub fn new(check: impl Fn(&Parts) -> Result<(), Failure> + Send + Sync + 'static) -> Self {
        Self {
            open: false,
            check: Arc::new(check),
        }
    }

    /// The metrics listener's rule: its token, if it has one (as a scrape's).
    pub fn metrics(token: Option<String>) -> Self {
        match token {
            None => Self {
                open: true,
                check: Arc::new(|_| Ok(())),
            },
            Some(token) => Self::new(move |request| {
                if crate::metrics::bearer_matches(&request.headers, &token) {
                    Ok(())
                } else {
                    Err(Failure::new(
                        StatusCode::UNAUTHORIZED,
                        "missing or wrong bearer token (the metrics token)",
                    ))
                }
            }),
        }
    }
}

/// The page's data is read as the API's queries read theirs.
#[derive(Clone)]
struct Ctx {
    shared: Arc<Shared>,
    gate: Gate,
}

/// The page's routes, for a listener whose rule is `gate`.
pub fn router(shared: Arc<Shared>, gate: Gate) -> Router {
    Router::new()
        .route("/status", get(page))
        .route("/status/", get(page))
        .route("/status/service/{name}", get(service_page))
        .route("/status/app.js", get(script))
        .route("/status/app.css", get(style))
        .route("/status/data", get(data))
        .with_state(Ctx { shared, gate })
}

/// A static body with the page's headers.
fn asset(kind: &'static str, body: &'static str) -> Response {
    let mut r = ([(header::CONTENT_TYPE, kind)], body).into_response();
    secure(&mut r);
    r
}

fn secure(r: &mut Response) {
    let h = r.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

/// One service's page: 404 for a service that does not exist, to a caller who may read (and
/// 401 or 403 for a token that may not). Without a token on a listener that needs one (a
/// browser's page load), the page whatever the name, so such a request learns nothing of
/// which services exist; the page's data fetch, with the token, gets the 404 and says so.
async fn service_page(State(c): State<Ctx>, name: Path<String>, request: Parts) -> Response {
    if c.gate.open || request.headers.contains_key(header::AUTHORIZATION) {
        let known = |name: &str| c.shared.snapshot.borrow().services.iter().any(|s| s.name == name);
        let refused = match (c.gate.check)(&request) {
            Err(refused) => Some(refused),
            Ok(()) if !known(&name) => Some(Failure::new(
                StatusCode::NOT_FOUND,
                format!("unknown service {}", *name),
            )),
            Ok(()) => None,
        };
        if let Some(refused) = refused {
            let mut r = refused.into_response();
            secure(&mut r);
            return r;
        }
    }
    page().await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DataQuery {
    /// Only this service (404 if there is none).
    service: Option<String>,
}

async fn data(State(c): State<Ctx>, request: Parts, q: Result<Query<DataQuery>, QueryRejection>) -> Response {
    let mut r = match answer(&c, &request, q).await {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(f) => f.into_response(),
    };
    secure(&mut r);
    r
}

async fn answer(
    c: &Ctx,
    request: &Parts,
    q: Result<Query<DataQuery>, QueryRejection>,
) -> Result<Vec<u8>, Failure> {
    (c.gate.check)(request)?;
    let Query(q) = q.map_err(|r| {
        Failure::new(
            StatusCode::BAD_REQUEST,
            format!("malformed query: {}", r.body_text()),
        )
    })?;
    // Reading the maps and encoding take milliseconds: off the async workers.
    let shared = c.shared.clone();
    let body = tokio::task::spawn_blocking(move || {
        let data = snapshot(&queries(&shared), q.service.as_deref())?;
        serde_json::to_vec(&data).map_err(|e| crate::error::Error::invalid(format!("status data: {e}")))
    })
    .await
    .map_err(|e| Failure::new(StatusCode::INTERNAL_SERVER_ERROR, format!("status data: {e}")))??;
    Ok(body)
}

/// The page's data, from one snapshot: per service (all, or `only`: 404 if there is none) what
/// `GET /v1/services` says of it and its backends, less the table slot counts (which read
/// every table: too much once a second), with their traffic counters; every backend's health
/// as `GET /v1/health` gives it; the data plane's counters as `GET /v1/stats` gives them; the
/// attached interfaces as `GET /v1/status` gives them (XDP TX errors included); the
/// announcer's state. And the clocks the page needs: `at_ms` (monotonic, for rates) and
/// `now_ms` (Unix, for how long ago a check changed).
pub fn snapshot(q: &Queries, only: Option<&str>) -> crate::error::Result<Value> {
    let health = q.health(only)?;
    let snap = &q.snap;
    let services: Vec<_> = snap
        .services
        .iter()
        .filter(|s| only.is_none_or(|n| n == s.name))
        .collect();
    // Traffic: one read of each per-CPU map, as a scrape does.
    let most = |ids: &mut dyn Iterator<Item = u32>| ids.map(|i| i + 1).max().unwrap_or(0);
    let slots = most(&mut services.iter().flat_map(|s| {
        s.backends
            .iter()
            .filter_map(|b| snap.assignments.slot(&s.name, &b.id).map(|x| x.slot))
    }));
    let ids = most(
        &mut services
            .iter()
            .filter_map(|s| snap.assignments.services.get(&s.name).map(|x| x.id)),
    );
    let backend_traffic = q.readers.backends_traffic(slots)?;
    let service_traffic = q.readers.services_traffic(ids)?;
    let counts = q.readers.counters()?;
    let traffic = |all: &[lb_common::TrafficStats], i: Option<u32>| {
        i.and_then(|i| all.get(i as usize)).map_or(
            json!({"packets": null, "new_flows": null}),
            |t| json!({"packets": t.packets, "new_flows": t.new_flows}),
        )
    };
    let services: Vec<Value> = services
        .iter()
        .map(|s| {
            let weights = snap.weights.get(&s.name);
            let backends: Vec<Value> = s
                .backends
                .iter()
                .map(|b| {
                    let slot = snap.assignments.slot(&s.name, &b.id).map(|x| x.slot);
                    let e = weights.and_then(|w| w.backends.get(&b.id));
                    let mut v = json!({
                        "id": b.id, "address": b.address, "port": b.port(s), "weight": b.weight,
                        "effective_weight": e.map_or(0, |e| e.weight), "maxconn": e.map_or(0, |e| e.maxconn),
                        "labels": b.labels, "active_flows": slot.map(|x| q.readers.active.get(x)),
                    });
                    merge(&mut v, traffic(&backend_traffic, slot));
                    v
                })
                .collect();
            let id = snap.assignments.services.get(&s.name).map(|x| x.id);
            let mut v = json!({
                "name": s.name, "vip": s.vip, "port": s.port, "protocol": s.protocol,
                "strategy": s.strategy, "in_effect": snap.in_effect(s), "forwarding": s.forwarding,
                "panic": weights.is_some_and(|w| w.panic), "backends": backends,
            });
            merge(&mut v, traffic(&service_traffic, id));
            v
        })
        .collect();
    let counters: serde_json::Map<String, Value> = lb_common::Counter::ALL
        .iter()
        .map(|&c| {
            (
                c.name().to_string(),
                json!(counts.get(c as usize).copied().unwrap_or(0)),
            )
        })
        .collect();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Ok(json!({
        "instance": q.instance,
        "refresh_ms": REFRESH_MS,
        "at_ms": crate::nat::monotonic_ns() / 1_000_000,
        "now_ms": now_ms,
        "services": services,
        "health": health,
        "counters": counters,
        "interfaces": q.interfaces(),
        "bgp": q.bgp(),
    }))
}

/// `extra`'s keys into `v` (both objects).
fn merge(v: &mut Value, extra: Value) {
    if let (Value::Object(v), Value::Object(extra)) = (v, extra) {
        v.extend(extra);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(authorization: Option<&str>) -> Parts {
        let mut r = axum::http::Request::builder().uri("/status/data");
        if let Some(a) = authorization {
            r = r.header(header::AUTHORIZATION, a);
        }
        r.body(()).expect("request").into_parts().0
    }

    #[test]
    fn the_metrics_listener_asks_its_token_if_it_has_one() {
        let open = Gate::metrics(None);
        assert!(open.open && (open.check)(&request(None)).is_ok());
        let token = "0123456789abcdef0123456789abcdef";
        let gate = Gate::metrics(Some(token.into()));
        assert!(!gate.open);
        for refused in [None, Some("Bearer wrong"), Some(&*format!("Basic {token}"))] {
            let e = (gate.check)(&request(refused)).expect_err("refused");
            assert_eq!(e.status(), StatusCode::UNAUTHORIZED, "{refused:?}");
        }
        assert!((gate.check)(&request(Some(&format!("Bearer {token}")))).is_ok());
    }
}
