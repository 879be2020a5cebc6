//! What reaches the writer: one channel of commands (API changes, health, agents, next hops,
//! discovery sources' sets, adaptive switches). Producers import this; it imports nothing above the model and status.

use std::{net::IpAddr, time::Duration};

use tokio::sync::oneshot;

use crate::{
    error::Result,
    model::{Backend, BackendRef, Service},
    neigh::NextHop,
    status::{AgentState, BreakerState, HealthState, lease::Terms, load::LoadReport},
};

/// A change to the desired state, from the API.
#[derive(Debug)]
pub enum Change {
    /// Replace every service (the cluster's state, as etcd holds it).
    Replace(Vec<Service>),
    /// The config file's services, read again: the run-time layer laid over them (`layers`):
    /// run-time changes kept, the file's new values applied.
    Reload(Vec<Service>),
    AddService(Service),
    RemoveService(String),
    /// Register a backend; with `lease`, it must heartbeat within its TTL (`status::lease`).
    AddBackend {
        service: String,
        backend: Backend,
        lease: Option<Terms>,
    },
    /// A heartbeat of a backend registered with a TTL.
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
    /// The operator's drain of a backend (`lb backend drain`/`undrain`): no new flows while
    /// set, its weight kept.
    SetDrain {
        service: String,
        id: String,
        drained: bool,
    },
    /// A service's strategy (new flows only).
    SetStrategy {
        service: String,
        strategy: crate::model::Strategy,
    },
    /// The external score of one backend (0..1), optionally for `ttl` only.
    SetExternal {
        service: String,
        id: String,
        score: f64,
        ttl: Option<Duration>,
    },
    /// Read `[daemon.geo] data` again and load it whole, or refuse it and keep what runs.
    ReloadGeo,
    /// A backend's own load report, holding for `ttl` (default 30 s).
    ReportLoad {
        service: String,
        id: String,
        report: LoadReport,
        ttl: Option<Duration>,
    },
}

impl Change {
    /// The one service a change reads and writes, and the one backend whose status it may set,
    /// for a change of one backend: it is applied to copies of those alone (`Writer::pass`),
    /// not of every service and status, which made 10,000 registrations quadratic. `None`: a
    /// change that may touch any service.
    pub fn backend_scope(&self) -> Option<(&str, &str)> {
        match self {
            Change::AddBackend { service, backend, .. } => Some((service, &backend.id)),
            Change::Heartbeat { service, id }
            | Change::RemoveBackend { service, id }
            | Change::SetWeight { service, id, .. }
            | Change::SetDrain { service, id, .. }
            | Change::SetExternal { service, id, .. }
            | Change::ReportLoad { service, id, .. } => Some((service, id)),
            Change::Replace(_)
            | Change::Reload(_)
            | Change::AddService(_)
            | Change::RemoveService(_)
            | Change::SetStrategy { .. }
            | Change::ReloadGeo => None,
        }
    }
}

/// A backend's health as the monitor last published it.
#[derive(Clone, Debug)]
pub struct HealthUpdate {
    pub backend: BackendRef,
    pub state: HealthState,
    pub score: f64,
    pub slow_start: Duration,
    pub breaker: BreakerState,
    /// The weight share while half-open.
    pub half_open_share: f64,
}

pub enum Command {
    Change {
        change: Box<Change>,
        /// The warnings of the pass that applied it, or why it was refused.
        reply: oneshot::Sender<Result<Vec<String>>>,
    },
    /// Next hops looked up again: `None` = no longer resolves.
    Hops(Vec<(IpAddr, Option<NextHop>)>),
    /// The kernel reported a route, neighbour, address or link change: the data plane's
    /// cached next hops (IPIP, GUE) are to be looked up again (`DataPlane::next_hop_epoch`).
    HopEpoch,
    Health(HealthUpdate),
    /// What a backend's agent now says.
    Agent {
        backend: BackendRef,
        state: AgentState,
    },
    /// The cluster's external scores, whole (they replace every backend's).
    Externals(std::collections::BTreeMap<BackendRef, f64>),
    /// The cluster's health view changed: the live nodes' votes (`status::cluster`).
    View(crate::status::cluster::View),
    /// A discovery source's read of its service's instances (`discovery`).
    Discovered(crate::status::discovery::Report),
    /// An adaptive service's switch (`strategy::adaptive`).
    Adapt {
        service: String,
        to: crate::model::Strategy,
        reason: String,
    },
}
