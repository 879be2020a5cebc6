//! What readers see: the writer's state as of its last pass (services, slots, next hops, every
//! backend's status, effective weights), published after each pass. Health, the strategies,
//! metrics and the API read this; only the writer makes one.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::{
    dataplane::Attachment,
    model::{BackendRef, Service, Strategy},
    neigh::NextHop,
    status::{AdaptiveState, BackendStatus, ServiceWeights},
};

/// What readers see: the state as of the last pass.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Arc<Vec<Service>>,
    /// The config file's services as last loaded (`reconcile::layers`).
    pub file: Arc<Vec<Service>>,
    pub assignments: Assignments,
    pub hops: HashMap<IpAddr, NextHop>,
    pub status: BTreeMap<BackendRef, BackendStatus>,
    /// The weights the tables use: this node's own, or in a cluster the ones the nodes agree on.
    pub weights: BTreeMap<String, ServiceWeights>,
    /// In a cluster, this node's own weights before agreement (what it votes).
    pub votes: crate::status::cluster::Votes,
    pub pool_capacity: u32,
    pub pool_free: u64,
    pub attachments: Vec<Attachment>,
    pub adopted: bool,
    /// What the start did with another build's pins (`dataplane::layout::Upgrade::summary`).
    pub upgrade: Option<String>,
    pub counters: PassCounters,
    /// Each adaptive service's pick, and why.
    pub adaptive: BTreeMap<String, AdaptiveState>,
    /// The geo data in use.
    pub geo: Option<GeoStatus>,
    /// Each service's instances as watchers see them, and the pass that last changed them.
    pub instances: BTreeMap<String, Instances>,
    /// Each discovery source's state, by service.
    pub discovery: BTreeMap<String, crate::status::discovery::SourceState>,
}

/// One instance as a watcher sees it (`GET /v1/services/{name}/instances`): where it is, and
/// whether it takes new flows. Effective weights are left out: a slow-start ramp would wake
/// every watcher ten times.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InstanceView {
    pub id: String,
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    /// `up`, `down` or `drained` (by the operator, a late heartbeat, gone from its source).
    pub state: &'static str,
    /// It takes new flows (an effective weight above 0).
    pub serving: bool,
}

/// A service's instances and their watch index: the writer's pass that last changed them.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Instances {
    pub index: u64,
    pub instances: Vec<InstanceView>,
}

/// A service's instances as of `status` and `weights`.
pub fn instance_views(
    s: &Service,
    status: &BTreeMap<BackendRef, BackendStatus>,
    weights: Option<&ServiceWeights>,
) -> Vec<InstanceView> {
    s.backends
        .iter()
        .map(|b| InstanceView {
            id: b.id.clone(),
            address: b.address,
            port: b.port(s),
            weight: b.weight,
            state: status
                .get(&BackendRef::new(&s.name, &b.id))
                .map_or("up", BackendStatus::state_name),
            serving: weights
                .and_then(|w| w.backends.get(&b.id))
                .is_some_and(|e| e.weight > 0),
        })
        .collect()
}

/// Every service's instances, each keeping its index from `before` unless its view changed
/// (then `pass` is its index). A removed service is left out.
pub fn next_instances(
    before: &BTreeMap<String, Instances>,
    views: impl IntoIterator<Item = (String, Vec<InstanceView>)>,
    pass: u64,
) -> BTreeMap<String, Instances> {
    views
        .into_iter()
        .map(|(name, instances)| {
            let index = match before.get(&name) {
                Some(b) if b.instances == instances => b.index,
                _ => pass,
            };
            (name, Instances { index, instances })
        })
        .collect()
}

/// The geo data set in the data plane: counts only (no client is ever named).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GeoStatus {
    pub source: String,
    pub prefixes: usize,
    pub prefixes_per_region: BTreeMap<String, usize>,
    /// Seconds since the Unix epoch.
    pub loaded_at: u64,
}

impl Snapshot {
    /// The strategy a service runs now: the declared one, or an adaptive service's pick.
    pub fn in_effect(&self, s: &Service) -> Strategy {
        in_effect(&self.adaptive, s)
    }
}

pub fn in_effect(adaptive: &BTreeMap<String, AdaptiveState>, s: &Service) -> Strategy {
    match s.strategy {
        Strategy::Adaptive => adaptive.get(&s.name).map_or(Strategy::Maglev, |a| a.current),
        other => other,
    }
}

/// Totals since the daemon started.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PassCounters {
    pub passes: u64,
    pub commands: u64,
    pub tables_built: u64,
    pub tables_swapped: u64,
    /// Resource-aware updates that changed some backend's weight factor.
    pub resource_steps: u64,
}

/// A pool region holding one table.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Region {
    pub offset: u32,
    pub size: u32,
}

/// What a service's table was built from: equal inputs give an equal table, so it is not
/// built again.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TableInput {
    pub size: u32,
    /// (backend id, effective weight, backend slot) of every member, by id.
    pub members: Vec<(String, u32, u32)>,
    /// What the region holds (see `lb_common::strategy`).
    #[serde(default)]
    pub strategy: Strategy,
    /// Each member's connection cap (0: none), for the counting strategies; else empty.
    #[serde(default)]
    pub caps: Vec<u32>,
}

impl TableInput {
    /// A service's inputs from its members (id, effective weight, slot, connection cap), in
    /// any order: sorted by id, caps kept only for the counting strategies.
    pub fn new(s: &Service, strategy: Strategy, mut members: Vec<(String, u32, u32, u32)>) -> Self {
        let strategy = strategy.table();
        members.sort();
        let caps = if strategy.counts() {
            members.iter().map(|m| m.3).collect()
        } else {
            Vec::new()
        };
        Self {
            size: s.table_size,
            members: members
                .into_iter()
                .map(|(id, w, slot, _)| (id, w, slot))
                .collect(),
            strategy,
            caps,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServiceSlot {
    pub id: u32,
    pub key: Option<ServiceKeyRepr>,
    pub active: Option<Region>,
    /// The table before the last swap; kept so in-flight readers never see it rewritten, and
    /// (when it was a Maglev table) for second chance.
    pub previous: Option<Region>,
    /// `previous` holds a Maglev table.
    #[serde(default)]
    pub previous_maglev: bool,
    /// The inputs of the active table.
    #[serde(default)]
    pub built: Option<TableInput>,
    /// Tables swapped in since the service was created.
    #[serde(default)]
    pub generation: u64,
    /// A geo service's table per region id (the default region's is `active`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub geo: BTreeMap<u32, GeoSlot>,
}

/// One region's table of a geo service.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GeoSlot {
    pub active: Option<Region>,
    pub previous: Option<Region>,
    pub built: Option<TableInput>,
    /// The region whose backends serve it (itself, or one of its failover list).
    #[serde(default)]
    pub serving: Option<String>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceKeyRepr {
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendSlot {
    pub slot: u32,
    pub address: IpAddr,
}

/// Which map slots the daemon gave to which service and backend. Persisted with the services
/// so a restarted daemon finds its slots again.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Assignments {
    pub services: BTreeMap<String, ServiceSlot>,
    /// Keyed by `service/backend-id`.
    pub backends: BTreeMap<String, BackendSlot>,
}

impl Assignments {
    /// Pool slots the services' previous tables hold for second chance (given up when a swap
    /// needs the room).
    pub fn second_chance_slots(&self) -> u64 {
        self.services
            .values()
            .filter_map(|s| s.previous)
            .map(|r| u64::from(lb_common::maps::pool_region(r.size)))
            .sum()
    }

    /// The slot of service `service`'s backend `id`, if it has one.
    pub fn slot(&self, service: &str, id: &str) -> Option<&BackendSlot> {
        self.backends.get(&backend_key(service, id))
    }

    pub fn slot_of(&self, backend: &BackendRef) -> Option<&BackendSlot> {
        self.slot(&backend.service, &backend.id)
    }
}

/// The key of a backend in `Assignments::backends` (and the state file).
pub fn backend_key(service: &str, id: &str) -> String {
    format!("{service}/{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(id: &str, state: &'static str) -> InstanceView {
        InstanceView {
            id: id.into(),
            address: "10.0.1.1".parse().unwrap(),
            port: 80,
            weight: 100,
            state,
            serving: state == "up",
        }
    }

    #[test]
    fn a_service_keeps_its_index_until_its_instances_change() {
        let first = next_instances(
            &BTreeMap::new(),
            [("web".into(), vec![view("b1", "up")]), ("dns".into(), vec![])],
            1,
        );
        assert_eq!((first["web"].index, first["dns"].index), (1, 1));
        // Pass 7 changes web's only: dns keeps index 1.
        let next = next_instances(
            &first,
            [
                ("web".into(), vec![view("b1", "drained")]),
                ("dns".into(), vec![]),
            ],
            7,
        );
        assert_eq!((next["web"].index, next["dns"].index), (7, 1));
        // Removed: gone from the map.
        let last = next_instances(&next, [("web".into(), vec![view("b1", "drained")])], 9);
        assert_eq!(last["web"].index, 7);
        assert!(!last.contains_key("dns"));
    }
}
