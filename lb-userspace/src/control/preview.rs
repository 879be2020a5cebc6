//! Disruption preview (`lb plan`, `POST /v1/plan`): what a proposed change would do, before
//! anything is applied. Per service, the share of its table's slots that would change owner,
//! and how many live flows (read from the connection table) would change backend if their
//! entry were lost. Nothing here writes: the change is applied to copies of the services and
//! statuses, and the tables are built in memory the way the reconciler builds them.

use std::{collections::HashMap, net::IpAddr, time::Instant};

use serde_json::{Value, json};

use crate::{
    config::{BackendSpec, Config, DaemonConfig},
    dataplane::Readers,
    error::Result,
    model::{HashMode, Service, Strategy},
    reconcile::{Change, apply::build},
    snapshot::{Snapshot, TableInput},
    status::effective_weights,
};

/// A change to preview (`POST /v1/plan`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum PlanChange {
    /// A backend's new weight.
    Weight {
        service: String,
        id: String,
        weight: u32,
    },
    /// A new backend.
    AddBackend {
        service: String,
        backend: Box<BackendSpec>,
    },
    RemoveBackend {
        service: String,
        id: String,
    },
    /// A service's new strategy.
    Strategy {
        service: String,
        strategy: Strategy,
    },
    /// A whole config file's services (its `[daemon]` section is not previewed).
    Config {
        text: String,
    },
}

impl PlanChange {
    pub fn into_change(self) -> Result<Change> {
        Ok(match self {
            Self::Weight { service, id, weight } => Change::SetWeight { service, id, weight },
            Self::AddBackend { service, backend } => Change::AddBackend {
                service,
                backend: (*backend).into(),
                lease: None,
            },
            Self::RemoveBackend { service, id } => Change::RemoveBackend { service, id },
            Self::Strategy { service, strategy } => Change::SetStrategy { service, strategy },
            Self::Config { text } => Change::Reload(Config::parse(&text)?.services),
        })
    }
}

/// A service's table as backend ids (one per entry; per member for the counting strategies).
struct Table {
    strategy: Strategy,
    owners: Vec<String>,
}

/// The table a service would get: its members at their effective weights, as ids.
fn proposed(
    s: &Service,
    weights: &crate::status::ServiceWeights,
    resolved: &impl Fn(IpAddr) -> bool,
) -> Table {
    // Slots stand in as indices into the id-sorted members, which TableInput::new keeps.
    let mut members: Vec<(String, u32, u32, u32)> = s
        .backends
        .iter()
        .filter(|b| resolved(b.address))
        .filter_map(|b| {
            let e = weights.backends.get(&b.id)?;
            (e.weight > 0).then(|| (b.id.clone(), e.weight, 0, e.maxconn))
        })
        .collect();
    members.sort();
    for (i, m) in members.iter_mut().enumerate() {
        m.2 = i as u32;
    }
    let input = TableInput::new(s, weights.strategy, members);
    let owners = build(&input)
        .into_iter()
        .step_by(input.strategy.stride())
        .map(|i| input.members[i as usize].0.clone())
        .collect();
    Table {
        strategy: input.strategy,
        owners,
    }
}

/// A service's backends by the slot the snapshot gave them.
fn slot_ids<'a>(snap: &Snapshot, s: &'a Service) -> HashMap<u32, &'a str> {
    s.backends
        .iter()
        .filter_map(|b| Some((snap.assignments.slot(&s.name, &b.id)?.slot, b.id.as_str())))
        .collect()
}

/// The table a service has now, read from the pool, as ids.
fn current(snap: &Snapshot, readers: &Readers, s: &Service, by_slot: &HashMap<u32, &str>) -> Option<Table> {
    let slot = snap.assignments.services.get(&s.name)?;
    let region = slot.active?;
    let strategy = slot.built.as_ref().map_or(s.strategy.table(), |b| b.strategy);
    let words = readers.pool.read(region.offset, region.size)?;
    Some(Table {
        strategy,
        owners: words
            .into_iter()
            .step_by(strategy.stride())
            .map(|slot| {
                let slot = u32::from(slot);
                by_slot
                    .get(&slot)
                    .map_or_else(|| format!("slot {slot}"), |id| id.to_string())
            })
            .collect(),
    })
}

/// The preview of `change` against the snapshot, as the API answers it.
pub fn preview(cfg: &DaemonConfig, snap: &Snapshot, readers: &Readers, change: Change) -> Result<Value> {
    let now = Instant::now();
    let mut services = snap.services.to_vec();
    let mut status = snap.status.clone();
    let mut file = snap.file.clone();
    crate::reconcile::change::change_with_file(cfg, &mut file, &mut services, &mut status, change, now)?;
    // An address no service had yet is not resolved yet: count it as the reconciler will
    // once it is.
    let known: std::collections::HashSet<IpAddr> = snap
        .services
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| b.address))
        .collect();
    let resolved = |a: IpAddr| snap.hops.contains_key(&a) || !known.contains(&a);
    // Live flows by service id: (key, current backend id).
    let mut flows: HashMap<u32, Vec<(lb_common::FlowKey, u32)>> = HashMap::new();
    for (k, v) in readers
        .conntrack
        .iter()
        .flatten()
        .chain(readers.embryonic.iter().flatten())
    {
        flows.entry(v.service).or_default().push((k, v.backend));
    }
    let mut out = Vec::new();
    for s in &services {
        let before = snap.services.iter().find(|x| x.name == s.name);
        let weights = effective_weights(s, snap.in_effect(s), &status, resolved, now);
        let next = proposed(s, &weights, &resolved);
        let by_slot = before.map(|b| slot_ids(snap, b)).unwrap_or_default();
        let now_table = before.and_then(|b| current(snap, readers, b, &by_slot));
        let mut entry = json!({
            "service": s.name,
            "strategy": s.strategy,
            "strategy_before": before.map(|b| b.strategy),
            "entries": next.owners.len(),
            "added": before.is_none(),
        });
        let mut shares: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
        for o in &next.owners {
            *shares.entry(o.as_str()).or_default() += 1;
        }
        entry["entries_per_backend"] = json!(shares);
        if let Some(t) = &now_table {
            let same_shape = t.strategy == next.strategy && t.owners.len() == next.owners.len();
            let moved = if same_shape {
                t.owners.iter().zip(&next.owners).filter(|(a, b)| a != b).count()
            } else {
                next.owners.len()
            };
            entry["entries_moved"] = json!(moved);
            entry["share_moved"] = json!(if next.owners.is_empty() {
                0.0
            } else {
                moved as f64 / next.owners.len() as f64
            });
        }
        // Flows whose backend would change if their entry were lost: for a Maglev table, the
        // new owner of their hash; the other strategies pick again, so any flow may move.
        let id = snap.assignments.services.get(&s.name).map(|x| x.id);
        let live = id.and_then(|i| flows.get(&i)).map_or(&[][..], |v| v.as_slice());
        entry["live_flows"] = json!(live.len());
        if next.strategy == Strategy::Maglev && !next.owners.is_empty() {
            let moving = live
                .iter()
                .filter(|(k, slot)| {
                    let hash = if s.hash == HashMode::Source {
                        lb_common::hash::source_hash(k)
                    } else {
                        lb_common::hash::flow_hash(k)
                    };
                    let owner = &next.owners[(hash % next.owners.len() as u32) as usize];
                    by_slot.get(slot).is_none_or(|id| *id != owner)
                })
                .count();
            entry["flows_moving_if_lost"] = json!(moving);
        } else {
            entry["flows_moving_if_lost"] = json!(live.len());
            entry["note"] = json!(format!(
                "{} cannot recompute a lost choice: any flow may move",
                next.strategy.name()
            ));
        }
        out.push(entry);
    }
    for s in snap
        .services
        .iter()
        .filter(|b| !services.iter().any(|x| x.name == b.name))
    {
        let id = snap.assignments.services.get(&s.name).map(|x| x.id);
        let live = id.and_then(|i| flows.get(&i)).map_or(0, |v| v.len());
        out.push(
            json!({"service": s.name, "removed": true, "live_flows": live, "flows_moving_if_lost": live}),
        );
    }
    Ok(json!({ "services": out }))
}
