//! The HTTP/JSON router. Changes go to the writer and wait for its pass; reads are answered
//! from its snapshot. The same router serves the root-only Unix socket (no token) and,
//! optionally, TCP, where every request needs a bearer token: the read token for reads, the
//! admin token for anything else.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{
        Path, Query, State,
        rejection::{JsonRejection, PathRejection, QueryRejection},
    },
    http::{StatusCode, header},
    middleware,
    response::IntoResponse,
    routing::{get, post, put},
};
use log::warn;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    ApiError, Envelope,
    access::{Access, guard},
    failure::Failure,
};
use crate::control::preview::PlanChange;
use crate::{
    config::{BackendSpec, Config, ConfigFile, DaemonConfig, ServiceSpec},
    control::queries::Queries,
    dataplane::Readers,
    error::Error,
    model::{Protocol, Service},
    nat::NatStatus,
    reconcile::{Change, Command},
    snapshot::Snapshot,
    status::checks::Board,
};

/// What every request shares.
pub struct Shared {
    pub config_path: PathBuf,
    pub cfg: DaemonConfig,
    pub writer: mpsc::Sender<Command>,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub readers: Arc<Readers>,
    pub nat: Arc<Mutex<NatStatus>>,
    /// The connection-table census's last count.
    pub conntrack: Arc<Mutex<crate::dataplane::census::ConntrackCensus>>,
    pub board: Board,
    /// The announcer's state, and the node's drain flag (`lb node drain`).
    pub bgp: Arc<Mutex<crate::status::bgp::BgpStatus>>,
    pub drain: Arc<watch::Sender<bool>>,
    /// `[cluster]`: changes go to etcd, and come back through the node's sync.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    pub cluster_status: Arc<Mutex<crate::status::cluster::ClusterStatus>>,
    pub stop: watch::Sender<bool>,
    /// Held through a reload: SIGHUP, the file watch and the API reload one at a time, so an
    /// older version of the file is never applied after a newer one.
    pub reloading: tokio::sync::Mutex<()>,
}

type Ctx = State<Arc<Shared>>;

type Answer = Result<Json<Envelope>, Failure>;

fn ok(data: serde_json::Value, warnings: Vec<String>) -> Answer {
    Ok(Json(Envelope { data, warnings }))
}

fn bad_body(r: JsonRejection) -> Failure {
    Failure::new(
        StatusCode::BAD_REQUEST,
        format!("malformed request body: {}", r.body_text()),
    )
}

fn bad_path(r: PathRejection) -> Failure {
    Failure::new(
        StatusCode::BAD_REQUEST,
        format!("malformed path: {}", r.body_text()),
    )
}

fn bad_query(r: QueryRejection) -> Failure {
    Failure::new(
        StatusCode::BAD_REQUEST,
        format!("malformed query: {}", r.body_text()),
    )
}

/// The read side of the API's state, as every query (and the status page) reads it.
pub fn queries(s: &Shared) -> Queries<'_> {
    Queries {
        instance: &s.cfg.instance,
        cfg: &s.cfg,
        snap: s.snapshot.borrow().clone(),
        readers: &s.readers,
        nat: &s.nat,
        conntrack: &s.conntrack,
        board: &s.board,
        bgp: &s.bgp,
    }
}

/// Hands a change to the writer and waits for the pass that applies (or refuses) it.
pub async fn submit(writer: &mpsc::Sender<Command>, change: Change) -> crate::error::Result<Vec<String>> {
    let (reply, answer) = oneshot::channel();
    writer
        .send(Command::Change {
            change: Box::new(change),
            reply,
        })
        .await
        .map_err(|_| Error::dataplane("the reconciler has stopped"))?;
    answer
        .await
        .map_err(|_| Error::dataplane("the reconciler dropped the request"))?
}

async fn change(s: &Shared, c: Change) -> Answer {
    refuse_own_addresses(s, &c)?;
    let shared_state = matches!(
        c,
        Change::Replace(_)
            | Change::Reload(_)
            | Change::AddService(_)
            | Change::RemoveService(_)
            | Change::AddBackend { .. }
            | Change::RemoveBackend { .. }
            | Change::SetWeight { .. }
            | Change::SetStrategy { .. }
    );
    if let (Some(cluster), Change::SetExternal { .. }) = (&s.cluster, &c) {
        let revision = cluster.store.set_score(&s.cfg, c).await?;
        log::debug!("cluster: score written at revision {revision}");
        return ok(json!("ok"), vec![]);
    }
    if let (Some(cluster), true) = (&s.cluster, shared_state) {
        let (revision, mut warnings) = cluster.store.change(&s.cfg, c).await?;
        warnings.extend(applied_here(cluster, revision).await);
        return ok(json!("ok"), warnings);
    }
    let warnings = submit(&s.writer, c).await?;
    ok(json!("ok"), warnings)
}

/// Refuses a change that would make one of this host's addresses a VIP without
/// `allow_own_address`. Checked where an operator's change comes in, against this node's
/// addresses (a cluster's nodes apply what the node that took the change accepted).
fn refuse_own_addresses(s: &Shared, c: &Change) -> crate::error::Result<()> {
    let after: &[Service] = match c {
        Change::AddService(svc) => std::slice::from_ref(svc),
        Change::Replace(all) | Change::Reload(all) => all,
        _ => return Ok(()),
    };
    let before = s.snapshot.borrow().services.clone();
    crate::config::check_own_addresses(&before, after)
}

/// Waits (2 s at most) for this node to apply a cluster revision it wrote; a warning if not.
async fn applied_here(cluster: &crate::cluster::Cluster, revision: i64) -> Vec<String> {
    if cluster.wait_applied(revision, Duration::from_secs(2)).await {
        vec![]
    } else {
        vec![format!(
            "written to the cluster (revision {revision}) but not yet applied on this node"
        )]
    }
}

#[utoipa::path(get, path = "/v1/cluster", tag = "cluster",
    responses((status = 200, description = "The cluster: etcd reachable, the revision this node applied, refused entries, and every node with its revision and table digests", body = Envelope)))]
pub async fn cluster_status(State(s): Ctx) -> Answer {
    let status = s.cluster_status.lock().unwrap_or_else(|p| p.into_inner()).clone();
    ok(json!(status), vec![])
}

/// `lb cluster push`: a config file's services, to become the cluster's state whole.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct PushBody {
    /// The whole TOML file; only its services are pushed, checked whole against this node's
    /// `[daemon]`.
    pub text: String,
}

#[utoipa::path(post, path = "/v1/cluster/push", tag = "cluster", request_body = PushBody,
    responses((status = 200, description = "The file's services are the cluster's state", body = Envelope),
        (status = 400, description = "Invalid file, no [cluster], or etcd unavailable", body = ApiError)))]
pub async fn cluster_push(State(s): Ctx, body: Result<Json<PushBody>, JsonRejection>) -> Answer {
    let Json(body) = body.map_err(bad_body)?;
    let Some(cluster) = &s.cluster else {
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            "this node has no [cluster] in its config",
        ));
    };
    let cfg = Config::parse_pushed(&body.text)?;
    crate::config::validate_against(&s.cfg, &cfg.services)?;
    let before = s.snapshot.borrow().services.clone();
    crate::config::check_own_addresses(&before, &cfg.services)?;
    let revision = cluster.store.push(&cfg.services).await?;
    log::info!(target: "audit", "cluster push: {} services at revision {revision}", cfg.services.len());
    ok(
        json!({ "revision": revision, "services": cfg.services.len() }),
        applied_here(cluster, revision).await,
    )
}

#[utoipa::path(get, path = "/v1/status", tag = "daemon",
    responses((status = 200, description = "Instance, interfaces with their attach modes and XDP transmit errors, services, backends and how many are unhealthy, table pool, conntrack fill, reconciler counters", body = Envelope)))]
pub async fn status(State(s): Ctx) -> Answer {
    ok(queries(&s).status(), vec![])
}

#[utoipa::path(get, path = "/v1/config", tag = "daemon",
    responses((status = 200, description = "The effective config as the file's tables: [daemon] with every default filled in, [cluster], and the services as they run now (changes through the API included)", body = Envelope)))]
pub async fn config(State(s): Ctx) -> Answer {
    let services = s.snapshot.borrow().services.clone();
    let file = ConfigFile::effective(&s.cfg, &services);
    let data =
        serde_json::to_value(file).map_err(|e| Failure::from(Error::invalid(format!("config: {e}"))))?;
    ok(data, vec![])
}

#[utoipa::path(get, path = "/v1/services", tag = "services",
    responses((status = 200, description = "Every service with its backends, weights, health and table slots", body = Envelope)))]
pub async fn list_services(State(s): Ctx) -> Answer {
    ok(queries(&s).list(), vec![])
}

#[utoipa::path(get, path = "/v1/services/{name}", tag = "services",
    params(("name" = String, Path, description = "Service name")),
    responses((status = 200, body = Envelope), (status = 404, body = ApiError), (status = 400, body = ApiError)))]
pub async fn get_service(State(s): Ctx, name: Result<Path<String>, PathRejection>) -> Answer {
    let Path(name) = name.map_err(bad_path)?;
    let list = queries(&s).list();
    let found = list
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == name.as_str()))
        .cloned()
        .ok_or_else(|| Failure::new(StatusCode::NOT_FOUND, format!("unknown service {name}")))?;
    ok(found, vec![])
}

#[utoipa::path(post, path = "/v1/services", tag = "services", request_body = ServiceSpec,
    responses((status = 200, body = Envelope), (status = 400, body = ApiError), (status = 409, body = ApiError)))]
pub async fn add_service(State(s): Ctx, body: Result<Json<ServiceSpec>, JsonRejection>) -> Answer {
    let Json(spec) = body.map_err(bad_body)?;
    change(&s, Change::AddService(Service::from(spec))).await
}

#[utoipa::path(delete, path = "/v1/services/{name}", tag = "services",
    params(("name" = String, Path, description = "Service name")),
    responses((status = 200, body = Envelope), (status = 404, body = ApiError), (status = 400, body = ApiError)))]
pub async fn remove_service(State(s): Ctx, name: Result<Path<String>, PathRejection>) -> Answer {
    let Path(name) = name.map_err(bad_path)?;
    change(&s, Change::RemoveService(name)).await
}

/// A registration: an instance as in the config file, optionally with a lifetime. Its fields
/// are a backend's and these two (the daemon reads them out, then the rest as a backend,
/// whose unknown keys are refused as ever).
#[derive(Deserialize, utoipa::ToSchema)]
pub struct InstanceBody {
    #[serde(flatten)]
    pub backend: BackendSpec,
    /// Seconds (1..=86400): the instance must heartbeat (`PUT .../heartbeat`) within it, or it
    /// is drained (no new flows), then removed `deregister_after` later.
    #[serde(default)]
    pub ttl: Option<f64>,
    /// Seconds (1..=86400) a drained registration is kept before it is removed (default: the
    /// daemon's `deregister_after`, 60). Only with `ttl`.
    #[serde(default)]
    pub deregister_after: Option<f64>,
}

/// Splits a registration's body into its backend and its lifetime, each checked.
fn registration(
    cfg: &DaemonConfig,
    mut body: serde_json::Value,
) -> Result<(BackendSpec, Option<crate::status::lease::Terms>), Failure> {
    let invalid = |m: String| Failure::new(StatusCode::BAD_REQUEST, m);
    let mut take = |key: &str| -> Result<Option<f64>, Failure> {
        match body.as_object_mut().and_then(|o| o.remove(key)) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                invalid(format!(
                    "malformed request body: {key} must be a number of seconds"
                ))
            }),
        }
    };
    let (ttl, deregister_after) = (take("ttl")?, take("deregister_after")?);
    let backend: BackendSpec =
        serde_json::from_value(body).map_err(|e| invalid(format!("malformed request body: {e}")))?;
    let terms = match (ttl, deregister_after) {
        (None, None) => None,
        (None, Some(_)) => return Err(invalid("deregister_after needs a ttl".into())),
        (Some(t), d) => Some(cfg.registration_terms(t, d).map_err(invalid)?),
    };
    Ok((backend, terms))
}

#[utoipa::path(post, path = "/v1/services/{name}/instances", tag = "instances", request_body = InstanceBody,
    params(("name" = String, Path, description = "Service name")),
    responses((status = 200, body = Envelope), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn add_instance(
    State(s): Ctx,
    name: Result<Path<String>, PathRejection>,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Answer {
    let Path(service) = name.map_err(bad_path)?;
    let Json(body) = body.map_err(bad_body)?;
    let (backend, lease) = registration(&s.cfg, body)?;
    if lease.is_some() && s.cluster.is_some() {
        // In a cluster an instance's lifetime is its etcd lease: its key in the cluster's etcd.
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            "with [cluster], an instance with a lifetime registers in etcd under its own lease (a service with [service.discovery] kind = \"etcd\"): register here without ttl",
        ));
    }
    change(
        &s,
        Change::AddBackend {
            service,
            backend: backend.into(),
            lease,
        },
    )
    .await
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct InstancesQuery {
    /// Watch: answer once the instances' index is above this one (the `index` of an earlier
    /// answer), or when `wait` runs out with the same one. Without it, answer now.
    pub index: Option<u64>,
    /// Seconds a watch waits at most (default 20; at most the request timeout less a second).
    pub wait: Option<f64>,
}

#[utoipa::path(get, path = "/v1/services/{name}/instances", tag = "instances",
    params(("name" = String, Path, description = "Service name"), InstancesQuery),
    responses((status = 200, description = "`{index, instances: [{id, address, port, weight, state, serving}]}`; with `index`, a long poll that answers when they change", body = Envelope),
        (status = 400, body = ApiError), (status = 404, body = ApiError)))]
pub async fn list_instances(
    State(s): Ctx,
    name: Result<Path<String>, PathRejection>,
    q: Result<Query<InstancesQuery>, QueryRejection>,
) -> Answer {
    let Path(name) = name.map_err(bad_path)?;
    let Query(q) = q.map_err(bad_query)?;
    // Below the request timeout, so a watch answers rather than being cut off.
    let most = s.cfg.http.request_timeout_s.saturating_sub(1).max(1) as f64;
    let wait = match q.wait {
        None => DEFAULT_WATCH_WAIT.min(most),
        Some(w) if w.is_finite() && w > 0.0 && w <= most => w,
        Some(w) => {
            return Err(Failure::new(
                StatusCode::BAD_REQUEST,
                format!("wait {w} s is out of range (0, {most}]"),
            ));
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(wait);
    let mut snapshots = s.snapshot.clone();
    loop {
        let snap = snapshots.borrow_and_update().clone();
        let found = snap
            .instances
            .get(&name)
            .ok_or_else(|| Failure::new(StatusCode::NOT_FOUND, format!("unknown service {name}")))?;
        // An index from before a restart (above every pass so far) is answered at once too.
        let changed = q
            .index
            .is_none_or(|i| found.index > i || i > snap.counters.passes);
        if changed {
            return ok(json!(found), vec![]);
        }
        match tokio::time::timeout_at(deadline, snapshots.changed()).await {
            Ok(Ok(())) => continue,
            // Timed out, or the writer stopped: the same index again.
            _ => return ok(json!(found), vec![]),
        }
    }
}

/// How long a watch waits for a change by default, in seconds.
const DEFAULT_WATCH_WAIT: f64 = 20.0;

#[utoipa::path(put, path = "/v1/services/{name}/instances/{id}/heartbeat", tag = "instances",
    params(("name" = String, Path, description = "Service name"), ("id" = String, Path, description = "Instance (backend) id")),
    responses((status = 200, description = "The registration's TTL starts again; a drained instance takes new flows again", body = Envelope),
        (status = 400, description = "The instance was registered without a ttl", body = ApiError),
        (status = 404, body = ApiError)))]
pub async fn heartbeat(State(s): Ctx, path: Result<Path<(String, String)>, PathRejection>) -> Answer {
    let Path((service, id)) = path.map_err(bad_path)?;
    change(&s, Change::Heartbeat { service, id }).await
}

#[utoipa::path(delete, path = "/v1/services/{name}/instances/{id}", tag = "instances",
    params(("name" = String, Path, description = "Service name"), ("id" = String, Path, description = "Instance (backend) id")),
    responses((status = 200, body = Envelope), (status = 404, body = ApiError), (status = 400, body = ApiError)))]
pub async fn remove_instance(State(s): Ctx, path: Result<Path<(String, String)>, PathRejection>) -> Answer {
    let Path((service, id)) = path.map_err(bad_path)?;
    change(&s, Change::RemoveBackend { service, id }).await
}

/// A new weight.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WeightBody {
    /// 0..=10000; 0 drains.
    pub weight: u32,
}

#[utoipa::path(put, path = "/v1/services/{name}/instances/{id}/weight", tag = "instances", request_body = WeightBody,
    params(("name" = String, Path, description = "Service name"), ("id" = String, Path, description = "Instance (backend) id")),
    responses((status = 200, body = Envelope), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
pub async fn set_weight(
    State(s): Ctx,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Json<WeightBody>, JsonRejection>,
) -> Answer {
    let Path((service, id)) = path.map_err(bad_path)?;
    let Json(WeightBody { weight }) = body.map_err(bad_body)?;
    change(&s, Change::SetWeight { service, id, weight }).await
}

#[utoipa::path(post, path = "/v1/services/{name}/instances/{id}/drain", tag = "instances",
    params(("name" = String, Path, description = "Service name"), ("id" = String, Path, description = "Instance (backend) id")),
    responses((status = 200, description = "The instance takes no new flows; its established flows go on and its configured weight is kept. Kept over a reload and a restart, until undrained", body = Envelope),
        (status = 400, description = "A node of a cluster: its tables take the weights the nodes agree on", body = ApiError),
        (status = 404, body = ApiError)))]
pub async fn drain_instance(State(s): Ctx, path: Result<Path<(String, String)>, PathRejection>) -> Answer {
    set_backend_drain(&s, path, true).await
}

#[utoipa::path(post, path = "/v1/services/{name}/instances/{id}/undrain", tag = "instances",
    params(("name" = String, Path, description = "Service name"), ("id" = String, Path, description = "Instance (backend) id")),
    responses((status = 200, description = "The operator's drain lifted: the instance takes new flows at its configured weight (through slow start, as after a recovery); a late heartbeat or its source's removal still drains it", body = Envelope),
        (status = 400, description = "A node of a cluster", body = ApiError),
        (status = 404, body = ApiError)))]
pub async fn undrain_instance(State(s): Ctx, path: Result<Path<(String, String)>, PathRejection>) -> Answer {
    set_backend_drain(&s, path, false).await
}

async fn set_backend_drain(
    s: &Shared,
    path: Result<Path<(String, String)>, PathRejection>,
    drained: bool,
) -> Answer {
    let Path((service, id)) = path.map_err(bad_path)?;
    if s.cluster.is_some() {
        // Each node votes its own weights and the tables take the nodes' median: one node's
        // drain would be outvoted.
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            "a node of a cluster cannot drain a backend alone (the nodes' agreed weights outvote it): set its weight to 0 in the cluster's services",
        ));
    }
    change(s, Change::SetDrain { service, id, drained }).await
}

/// A new strategy.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StrategyBody {
    pub strategy: crate::model::Strategy,
}

#[utoipa::path(put, path = "/v1/services/{name}/strategy", tag = "services", request_body = StrategyBody,
    params(("name" = String, Path, description = "Service name")),
    responses((status = 200, body = Envelope), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
pub async fn set_strategy(
    State(s): Ctx,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<StrategyBody>, JsonRejection>,
) -> Answer {
    let Path(service) = path.map_err(bad_path)?;
    let Json(StrategyBody { strategy }) = body.map_err(bad_body)?;
    change(&s, Change::SetStrategy { service, strategy }).await
}

/// An external health score (`update_instance_health`).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthBody {
    /// 0..1; 0 excludes the instance.
    pub score: f64,
    /// Seconds until the score expires (default: never).
    #[serde(default)]
    pub ttl: Option<f64>,
}

#[utoipa::path(put, path = "/v1/services/{name}/instances/{id}/health", tag = "instances", request_body = HealthBody,
    params(("name" = String, Path, description = "Service name"), ("id" = String, Path, description = "Instance (backend) id")),
    responses((status = 200, body = Envelope), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
pub async fn set_health(
    State(s): Ctx,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Json<HealthBody>, JsonRejection>,
) -> Answer {
    let Path((service, id)) = path.map_err(bad_path)?;
    let Json(HealthBody { score, ttl }) = body.map_err(bad_body)?;
    let ttl = match ttl {
        None => None,
        Some(t) if t.is_finite() && t > 0.0 && t <= 30.0 * 24.0 * 3600.0 => Some(Duration::from_secs_f64(t)),
        Some(t) => {
            return Err(Failure::new(
                StatusCode::BAD_REQUEST,
                format!("ttl {t} s is out of range (0, 2592000]"),
            ));
        }
    };
    change(
        &s,
        Change::SetExternal {
            service,
            id,
            score,
            ttl,
        },
    )
    .await
}

/// A backend's own load (resource-aware weighting).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadBody {
    /// CPU in use, 0..1.
    #[serde(default)]
    pub cpu: Option<f64>,
    /// Memory in use, 0..1.
    #[serde(default)]
    pub memory: Option<f64>,
    /// Open connections (a load against the backend's maxconn).
    #[serde(default)]
    pub connections: Option<u64>,
    /// Seconds the report holds (default 30, at most 3600).
    #[serde(default)]
    pub ttl: Option<f64>,
}

#[utoipa::path(put, path = "/v1/services/{name}/instances/{id}/load", tag = "instances", request_body = LoadBody,
    params(("name" = String, Path, description = "Service name"), ("id" = String, Path, description = "Instance (backend) id")),
    responses((status = 200, body = Envelope), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
pub async fn report_load(
    State(s): Ctx,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Json<LoadBody>, JsonRejection>,
) -> Answer {
    let Path((service, id)) = path.map_err(bad_path)?;
    let Json(b) = body.map_err(bad_body)?;
    let ttl = match b.ttl {
        None => None,
        Some(t) if t.is_finite() && t > 0.0 && t <= 3600.0 => Some(Duration::from_secs_f64(t)),
        Some(t) => {
            return Err(Failure::new(
                StatusCode::BAD_REQUEST,
                format!("ttl {t} s is out of range (0, 3600]"),
            ));
        }
    };
    let report = crate::status::load::LoadReport {
        cpu: b.cpu,
        memory: b.memory,
        connections: b.connections,
    };
    change(
        &s,
        Change::ReportLoad {
            service,
            id,
            report,
            ttl,
        },
    )
    .await
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct HealthQuery {
    /// Only this service.
    pub service: Option<String>,
}

#[utoipa::path(get, path = "/v1/health", tag = "health", params(HealthQuery),
    responses((status = 200, body = Envelope), (status = 404, body = ApiError), (status = 400, body = ApiError)))]
pub async fn health(State(s): Ctx, q: Result<Query<HealthQuery>, QueryRejection>) -> Answer {
    let Query(q) = q.map_err(bad_query)?;
    ok(queries(&s).health(q.service.as_deref())?, vec![])
}

#[utoipa::path(get, path = "/v1/stats", tag = "daemon",
    responses((status = 200, description = "Traffic per service and backend, every data-plane counter, the NAT census", body = Envelope)))]
pub async fn stats(State(s): Ctx) -> Answer {
    ok(queries(&s).stats()?, vec![])
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LookupQuery {
    pub protocol: Protocol,
    /// Client address and port, `IP:PORT` or `[IPv6]:PORT`.
    #[param(value_type = String)]
    pub src: SocketAddr,
    /// VIP and port.
    #[param(value_type = String)]
    pub dst: SocketAddr,
}

#[utoipa::path(get, path = "/v1/lookup", tag = "services", params(LookupQuery),
    responses((status = 200, body = Envelope), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
pub async fn lookup(State(s): Ctx, q: Result<Query<LookupQuery>, QueryRejection>) -> Answer {
    let Query(q) = q.map_err(bad_query)?;
    ok(queries(&s).lookup(q.protocol, q.src, q.dst)?, vec![])
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PickQuery {
    /// Client address and port; without it, the pick for a fresh flow from a random client.
    #[param(value_type = Option<String>)]
    pub src: Option<SocketAddr>,
    /// VIP and port (default: the service's).
    #[param(value_type = Option<String>)]
    pub dst: Option<SocketAddr>,
}

#[utoipa::path(get, path = "/v1/services/{name}/pick", tag = "services", params(("name" = String, Path, description = "Service name"), PickQuery),
    responses((status = 200, description = "The instance that flow gets, and why (NAT table, connection table or Maglev)", body = Envelope),
        (status = 400, body = ApiError), (status = 404, body = ApiError)))]
pub async fn pick(
    State(s): Ctx,
    name: Result<Path<String>, PathRejection>,
    q: Result<Query<PickQuery>, QueryRejection>,
) -> Answer {
    let Path(name) = name.map_err(bad_path)?;
    let Query(q) = q.map_err(bad_query)?;
    let queries = queries(&s);
    ok(queries.pick(&name, q.src, q.dst)?, vec![])
}

#[utoipa::path(get, path = "/v1/geo", tag = "geo",
    responses((status = 200, description = "The geo data in use (counts per region, never a client) and each geo service's serving region per region", body = Envelope)))]
pub async fn geo(State(s): Ctx) -> Answer {
    ok(queries(&s).geo(), vec![])
}

#[utoipa::path(post, path = "/v1/geo/reload", tag = "geo",
    responses((status = 200, body = Envelope), (status = 400, body = ApiError)))]
pub async fn geo_reload(State(s): Ctx) -> Answer {
    change(&s, Change::ReloadGeo).await
}

#[utoipa::path(post, path = "/v1/reload", tag = "daemon",
    responses((status = 200, body = Envelope), (status = 400, body = ApiError)))]
pub async fn reload(State(s): Ctx) -> Answer {
    let warnings = reload_config(&s).await?;
    // Logged as SIGHUP's and the file watch's are.
    for w in &warnings {
        warn!("reload: {w}");
    }
    ok(json!("reloaded"), warnings)
}

/// Reads the config file again and applies it whole (only what differs is rebuilt).
pub async fn reload_config(s: &Shared) -> crate::error::Result<Vec<String>> {
    if s.cluster.is_some() {
        return Err(Error::invalid(
            "this node takes its services from the cluster: push the file with lb cluster push",
        ));
    }
    let _one_at_a_time = s.reloading.lock().await;
    let cfg = Config::load(&s.config_path)?;
    fail::fail_point!("reload-read");
    if cfg.daemon != s.cfg {
        warn!("reload: [daemon] changes take effect only after a restart");
    }
    if let Some(stall) = crate::failpoints::stall("reload-apply") {
        tokio::time::sleep(stall).await;
    }
    let change = Change::Reload(cfg.services);
    refuse_own_addresses(s, &change)?;
    submit(&s.writer, change).await
}

#[utoipa::path(post, path = "/v1/plan", tag = "services", request_body = PlanChange,
    responses((status = 200, description = "Per service: table entries that would change owner, live flows that would change backend if their entry were lost", body = Envelope),
        (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn plan(State(s): Ctx, body: Result<Json<PlanChange>, JsonRejection>) -> Answer {
    let Json(p) = body.map_err(bad_body)?;
    let change = p.into_change()?;
    let (snap, readers, cfg) = (s.snapshot.borrow().clone(), s.readers.clone(), s.cfg.clone());
    // Builds tables and walks the connection table: off the async workers.
    let preview =
        tokio::task::spawn_blocking(move || crate::control::preview::preview(&cfg, &snap, &readers, change))
            .await
            .map_err(|e| Failure::new(StatusCode::INTERNAL_SERVER_ERROR, format!("plan: {e}")))??;
    ok(preview, vec![])
}

#[utoipa::path(post, path = "/v1/shutdown", tag = "daemon",
    responses((status = 200, description = "Stops the daemon; the data plane keeps forwarding", body = Envelope)))]
pub async fn shutdown(State(s): Ctx) -> Answer {
    let _ = s.stop.send(true);
    ok(json!("stopping"), vec![])
}

#[utoipa::path(get, path = "/v1/node", tag = "node",
    responses((status = 200, description = "This node's BGP sessions, announced VIPs (and why the others are not), drain flag, and the packets its VIPs received", body = Envelope)))]
pub async fn node(State(s): Ctx) -> Answer {
    ok(queries(&s).node()?, vec![])
}

#[utoipa::path(post, path = "/v1/node/drain", tag = "node",
    responses((status = 200, description = "Every VIP withdrawn; flows that still arrive are forwarded", body = Envelope),
        (status = 400, description = "No [daemon.bgp]", body = ApiError)))]
pub async fn drain(State(s): Ctx) -> Answer {
    set_drain(&s, true).await
}

#[utoipa::path(post, path = "/v1/node/undrain", tag = "node",
    responses((status = 200, description = "The VIPs announced again (those that can serve)", body = Envelope),
        (status = 400, description = "No [daemon.bgp]", body = ApiError)))]
pub async fn undrain(State(s): Ctx) -> Answer {
    set_drain(&s, false).await
}

/// Sets the drain flag (kept in the run directory, so a restart keeps it) and answers once
/// the announcer has acted on it, 2 s at most.
async fn set_drain(s: &Shared, on: bool) -> Answer {
    if s.cfg.bgp.is_none() {
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            "this node announces nothing: no [daemon.bgp] in its config",
        ));
    }
    let path = crate::bgp::drain_path(&s.cfg.run_dir, &s.cfg.instance);
    let written = if on {
        crate::files::write_private(&path, b"draining\n")
    } else {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    };
    written.map_err(|e| Failure::from(Error::io(format!("drain flag {}", path.display()), e)))?;
    s.drain.send_replace(on);
    log::info!(target: "audit", "node {}", if on { "drained" } else { "undrained" });
    let acted = {
        let until = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            let done = {
                let b = s.bgp.lock().unwrap_or_else(|p| p.into_inner());
                b.draining == on && (!on || b.announced.is_empty())
            };
            if done || tokio::time::Instant::now() >= until {
                break done;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let warnings = if acted {
        vec![]
    } else {
        vec!["the announcer has not acted on it yet (see lb node status)".to_string()]
    };
    ok(queries(s).node()?, warnings)
}

pub async fn openapi_json() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::openapi::document(),
    )
}

async fn not_found() -> Failure {
    Failure::new(StatusCode::NOT_FOUND, "no such resource (see /v1/openapi.json)")
}

async fn method_not_allowed() -> Failure {
    Failure::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this resource",
    )
}

/// Every route.
pub fn router(shared: Arc<Shared>) -> Router {
    let router = Router::new();
    // Tests arm a failpoint just before the change it is for (`failpoints` builds only; not in
    // the API's document).
    #[cfg(feature = "failpoints")]
    let router = router.route("/v1/failpoints/{name}", put(set_failpoint));
    router
        .route("/v1/status", get(status))
        .route("/v1/config", get(config))
        .route("/v1/services", get(list_services).post(add_service))
        .route("/v1/services/{name}", get(get_service).delete(remove_service))
        .route(
            "/v1/services/{name}/instances",
            get(list_instances).post(add_instance),
        )
        .route(
            "/v1/services/{name}/instances/{id}",
            axum::routing::delete(remove_instance),
        )
        .route("/v1/services/{name}/instances/{id}/weight", put(set_weight))
        .route("/v1/services/{name}/instances/{id}/drain", post(drain_instance))
        .route(
            "/v1/services/{name}/instances/{id}/undrain",
            post(undrain_instance),
        )
        .route("/v1/services/{name}/strategy", put(set_strategy))
        .route("/v1/plan", post(plan))
        .route("/v1/services/{name}/instances/{id}/health", put(set_health))
        .route("/v1/services/{name}/instances/{id}/load", put(report_load))
        .route("/v1/services/{name}/instances/{id}/heartbeat", put(heartbeat))
        .route("/v1/services/{name}/pick", get(pick))
        .route("/v1/health", get(health))
        .route("/v1/stats", get(stats))
        .route("/v1/lookup", get(lookup))
        .route("/v1/reload", post(reload))
        .route("/v1/geo", get(geo))
        .route("/v1/geo/reload", post(geo_reload))
        .route("/v1/shutdown", post(shutdown))
        .route("/v1/node", get(node))
        .route("/v1/cluster", get(cluster_status))
        .route("/v1/cluster/push", post(cluster_push))
        .route("/v1/node/drain", post(drain))
        .route("/v1/node/undrain", post(undrain))
        .route("/v1/openapi.json", get(openapi_json))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(shared)
}

/// `PUT /v1/failpoints/{name}` with the actions as the body (the `fail` crate's syntax).
#[cfg(feature = "failpoints")]
async fn set_failpoint(axum::extract::Path(name): axum::extract::Path<String>, actions: String) -> Answer {
    fail::cfg(name.as_str(), actions.trim())
        .map_err(|e| Failure::new(StatusCode::BAD_REQUEST, format!("failpoint {name}: {e}")))?;
    log::warn!("failpoint {name} set: {}", actions.trim());
    ok(json!("set"), vec![])
}

/// Serves the API on `listener` until `stop` is set: the Unix socket (`Access::socket`) or TCP
/// behind the tokens' scopes (and TLS, if given). `also` (the status page) is served beside
/// it, outside the scopes' guard: it checks its own.
pub async fn serve(
    listener: crate::serve::Listener,
    shared: Arc<Shared>,
    access: Access,
    tls: Option<crate::serve::SharedTls>,
    also: Option<Router>,
) {
    let name = match listener {
        crate::serve::Listener::Unix(_) => "control socket",
        crate::serve::Listener::Tcp(_) => "control API",
    };
    let (stop, limits) = (shared.stop.subscribe(), shared.cfg.http);
    let app = router(shared)
        .layer(middleware::from_fn_with_state(access, guard))
        .merge(also.unwrap_or_default());
    crate::serve::serve(name, listener, app, tls, limits, stop).await;
}

/// A TLS acceptor from a PEM certificate chain and key. Each problem is one line naming the file.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| anyhow::anyhow!("cannot read certificates from {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("bad certificate in {}: {e}", cert.display()))?;
    if chain.is_empty() {
        anyhow::bail!("no certificate in {}", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("cannot read a private key from {}: {e}", key.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| anyhow::anyhow!("TLS: the key does not fit the certificate, or is unusable: {e}"))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
