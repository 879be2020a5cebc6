//! The plan: which map slots each service and backend gets, what each backend entry must hold,
//! and which services' tables must be rebuilt. Pure: desired services, their effective weights
//! and the next hops in; no maps, no kernel. `apply` carries a plan out in a safe order.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use lb_common::{
    Backend, FAMILY_V4, FAMILY_V6, ServiceValue,
    backend::BACKEND_F_ACTIVE,
    maps::{MAX_BACKENDS, MAX_SERVICES},
    service::{
        FWD_DSR_L2, FWD_GUE, FWD_IPIP, FWD_NAT, FWD_SNAT, SVC_F_COUNT, SVC_F_HASH_SOURCE, SVC_F_SHED,
        SVC_F_SHED_DROP,
    },
};

use crate::{
    error::{Error, Result},
    model::{Forwarding, HashMode, OnShed, Service, Strategy},
    neigh::NextHop,
    snapshot::{Assignments, BackendSlot, ServiceSlot, TableInput, backend_key},
    status::ServiceWeights,
};

/// What the maps should hold.
pub struct Desired<'a> {
    pub services: &'a [Service],
    /// Effective weights by service name (`status::effective_weights`).
    pub weights: &'a BTreeMap<String, ServiceWeights>,
    pub hops: &'a HashMap<IpAddr, NextHop>,
    /// `[daemon.geo]`, for geo services.
    pub geo: Option<&'a crate::model::geo_settings::GeoSettings>,
}

/// One backend entry to write.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendWrite {
    pub key: String,
    pub slot: u32,
    pub address: IpAddr,
    /// Network order.
    pub port_be: u16,
    pub hop: Option<NextHop>,
    /// Serves flows (pinned or new). An active entry has a hop.
    pub active: bool,
    /// A slot new to this backend: its generation moves on so old flows are not taken for it.
    pub fresh: bool,
    /// Its new-flow limit.
    pub max_new_flows_per_s: Option<u32>,
}

#[derive(Debug)]
pub struct Plan {
    /// Service ids and backend slots after this pass (regions and built inputs as they are).
    pub assignments: Assignments,
    pub new_service_ids: Vec<u32>,
    pub backends: Vec<BackendWrite>,
    /// Slots no backend holds any more: deactivated once no table names them.
    pub retired: Vec<u32>,
    /// Services whose table must be built, with its inputs.
    pub rebuild: Vec<(String, TableInput)>,
    /// Every geo service's table per region id: the inputs, and the region that serves it.
    pub geo: Vec<(String, u32, TableInput, Option<String>)>,
}

/// A service's value before its table is placed: its id, flags and forwarding mode (the
/// table fields are the apply's). Pure.
pub fn service_value(s: &Service, id: u32) -> ServiceValue {
    let shedding =
        s.max_new_flows_per_s.is_some() || s.backends.iter().any(|b| b.max_new_flows_per_s.is_some());
    let flag = |on: bool, f: u32| if on { f } else { 0 };
    ServiceValue {
        id,
        flags: flag(s.hash == HashMode::Source, SVC_F_HASH_SOURCE)
            | flag(shedding, SVC_F_SHED)
            | flag(s.on_shed == OnShed::Drop, SVC_F_SHED_DROP)
            // Adaptive services measure imbalance by the counts, whatever they run.
            | flag(s.strategy == Strategy::Adaptive, SVC_F_COUNT),
        table_offset: 0,
        table_size: 0,
        forward: match s.forwarding {
            Forwarding::Dsr => FWD_DSR_L2,
            Forwarding::Ipip => FWD_IPIP,
            Forwarding::Gue => FWD_GUE,
            Forwarding::Nat if s.snat => FWD_SNAT,
            Forwarding::Nat => FWD_NAT,
        },
        strategy: 0,
        prev_offset: 0,
        prev_size: 0,
    }
}

/// The entry a backend write leaves in its slot, from what the slot holds now: a fresh slot's
/// generation moves on, so old flows pinned to it are not taken for the new backend. Pure.
pub fn backend_entry(w: &BackendWrite, current: &Backend) -> Backend {
    let generation = if w.fresh {
        current.generation.wrapping_add(1)
    } else {
        current.generation
    };
    let (addr, family) = addr_bytes(w.address);
    let mut entry = Backend {
        addr,
        family,
        flags: 0,
        port: w.port_be,
        generation,
        ifindex: 0,
        dst_mac: [0; 6],
        src_mac: [0; 6],
    };
    if let Some(hop) = &w.hop {
        entry.ifindex = hop.ifindex;
        entry.dst_mac = hop.dst_mac;
        entry.src_mac = hop.src_mac;
        if w.active {
            entry.flags = BACKEND_F_ACTIVE;
        }
    }
    entry
}

/// An address as the maps hold it: 16 bytes (IPv4 in the first 4) and its family.
pub fn addr_bytes(addr: IpAddr) -> ([u8; 16], u8) {
    let mut out = [0u8; 16];
    match addr {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            (out, FAMILY_V4)
        }
        IpAddr::V6(v6) => (v6.octets(), FAMILY_V6),
    }
}

pub fn plan(desired: &Desired<'_>, current: &Assignments) -> Result<Plan> {
    let mut a = current.clone();
    let services = desired.services;

    // Service ids: kept by name.
    let wanted: BTreeSet<&str> = services.iter().map(|s| s.name.as_str()).collect();
    let mut used_ids: BTreeSet<u32> = a
        .services
        .iter()
        .filter(|(n, _)| wanted.contains(n.as_str()))
        .map(|(_, s)| s.id)
        .collect();
    let mut new_service_ids = Vec::new();
    for s in services {
        if !a.services.contains_key(&s.name) {
            let id = (0..MAX_SERVICES)
                .find(|i| !used_ids.contains(i))
                .ok_or_else(|| Error::invalid("no free service id"))?;
            used_ids.insert(id);
            a.services.insert(
                s.name.clone(),
                ServiceSlot {
                    id,
                    ..Default::default()
                },
            );
            new_service_ids.push(id);
        }
    }

    // Backend slots: kept while the backend keeps its address.
    let wanted_backends: BTreeMap<String, (&Service, usize)> = services
        .iter()
        .flat_map(|s| {
            s.backends
                .iter()
                .enumerate()
                .map(move |(i, b)| (backend_key(&s.name, &b.id), (s, i)))
        })
        .collect();
    let mut retired = Vec::new();
    a.backends.retain(|k, slot| {
        let keep = wanted_backends
            .get(k)
            .is_some_and(|(s, i)| s.backends[*i].address == slot.address);
        if !keep {
            retired.push(slot.slot);
        }
        keep
    });
    let mut used_slots: BTreeSet<u32> = a.backends.values().map(|b| b.slot).collect();
    // A retired slot is not reused in the same pass: tables may still name it until swapped.
    let reserved: BTreeSet<u32> = retired.iter().copied().collect();
    let mut fresh = BTreeSet::new();
    // Every slot below `next` is taken (the search resumes there: 16,384 new backends cost one
    // walk of the slots, not one each).
    let mut next = 0;
    for (k, (s, i)) in &wanted_backends {
        if a.backends.contains_key(k) {
            continue;
        }
        let slot = (next..MAX_BACKENDS)
            .find(|i| !used_slots.contains(i) && !reserved.contains(i))
            .ok_or_else(|| Error::invalid("no free backend slot"))?;
        next = slot + 1;
        used_slots.insert(slot);
        a.backends.insert(
            k.clone(),
            BackendSlot {
                slot,
                address: s.backends[*i].address,
            },
        );
        fresh.insert(slot);
    }

    let none = ServiceWeights::default();
    let mut backends = Vec::new();
    let mut rebuild = Vec::new();
    let mut geo = Vec::new();
    for s in services {
        let weights = desired.weights.get(&s.name).unwrap_or(&none);
        let mut members = Vec::new();
        for b in &s.backends {
            let k = backend_key(&s.name, &b.id);
            let slot = a.backends[&k].slot;
            let hop = desired.hops.get(&b.address).cloned();
            let e = weights.backends.get(&b.id).copied().unwrap_or_default();
            // No hop, no frames: whatever the weights say, the slot cannot serve.
            let usable = hop.is_some();
            if usable && e.weight > 0 {
                members.push((b.id.clone(), e.weight, slot, e.maxconn));
            }
            backends.push(BackendWrite {
                key: k,
                slot,
                address: b.address,
                port_be: b.port(s).to_be(),
                hop,
                active: usable && e.active,
                fresh: fresh.contains(&slot),
                max_new_flows_per_s: b.max_new_flows_per_s,
            });
        }
        if s.strategy == crate::model::Strategy::Geo
            && let Some(g) = desired.geo
        {
            let places: std::collections::BTreeMap<&str, &str> = s
                .backends
                .iter()
                .filter_map(|b| Some((b.id.as_str(), g.place(b.region.as_deref(), b.zone.as_deref())?)))
                .collect();
            let region_of = |id: &str| places.get(id).copied();
            let live = |r: &str| members.iter().any(|m| region_of(&m.0) == Some(r));
            let of = |serving: Option<&str>| -> Vec<(String, u32, u32, u32)> {
                members
                    .iter()
                    .filter(|m| serving.is_none_or(|r| region_of(&m.0) == Some(r)))
                    .cloned()
                    .collect()
            };
            for (id, region) in g.regions().into_iter().enumerate() {
                let serving = g.serving(region, live);
                geo.push((
                    s.name.clone(),
                    id as u32,
                    TableInput::new(s, weights.strategy, of(serving)),
                    serving.map(str::to_string),
                ));
            }
            members = of(g.serving(&g.default_region, live));
        }
        let input = TableInput::new(s, weights.strategy, members);
        if a.services[&s.name].built.as_ref() != Some(&input) {
            rebuild.push((s.name.clone(), input));
        }
    }
    Ok(Plan {
        assignments: a,
        new_service_ids,
        backends,
        retired,
        rebuild,
        geo,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{Backend, Protocol},
        status::HealthState,
        status::{BackendStatus, effective_weights},
    };
    use std::time::Instant;

    fn hop() -> NextHop {
        NextHop {
            ifindex: 2,
            ifname: "eth0".into(),
            src_mac: [2; 6],
            dst_mac: [4; 6],
            mtu: 0,
        }
    }

    fn services(n: usize, per: usize) -> Vec<Service> {
        (0..n)
            .map(|i| Service {
                table_size: 1031,
                backends: (0..per)
                    .map(|j| {
                        let address = format!("10.2.{}.{}", j / 250, j % 250 + 1);
                        Backend::new(format!("b{j}"), address.parse().unwrap())
                    })
                    .collect(),
                ..Service::new(
                    format!("svc{i}"),
                    format!("10.1.{}.{}", i / 250, i % 250 + 1).parse().unwrap(),
                    80,
                    Protocol::Tcp,
                )
            })
            .collect()
    }

    /// Plans, then marks every table as built, as a successful apply would.
    fn plan_and_build(
        services: &[Service],
        status: &BTreeMap<crate::model::BackendRef, BackendStatus>,
        hops: &HashMap<IpAddr, NextHop>,
        current: &Assignments,
    ) -> Plan {
        let now = Instant::now();
        let weights: BTreeMap<String, ServiceWeights> = services
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    effective_weights(s, s.strategy, status, |a| hops.contains_key(&a), now),
                )
            })
            .collect();
        plan(
            &Desired {
                services,
                weights: &weights,
                hops,
                geo: None,
            },
            current,
        )
        .expect("plan")
    }

    fn built(mut p: Plan) -> Assignments {
        for (name, input) in p.rebuild.drain(..) {
            p.assignments.services.get_mut(&name).unwrap().built = Some(input);
        }
        p.assignments
    }

    #[test]
    fn a_geo_service_places_a_backend_by_its_zone_when_the_regions_name_zones() {
        let geo: crate::model::geo_settings::GeoSettings =
            toml::from_str("default_region = \"a\"\nfailover = { a = [\"b\"], b = [\"a\"] }").expect("geo");
        let mut svcs = services(1, 3);
        svcs[0].strategy = crate::model::Strategy::Geo;
        // Region "eu" is no region of these: the zone places b0 and b1; b2 has only a zone.
        for (b, (region, zone)) in
            svcs[0]
                .backends
                .iter_mut()
                .zip([(Some("eu"), "a"), (Some("eu"), "b"), (None, "b")])
        {
            b.region = region.map(str::to_string);
            b.zone = Some(zone.to_string());
        }
        let hops: HashMap<IpAddr, NextHop> = svcs[0].backends.iter().map(|b| (b.address, hop())).collect();
        let weights: BTreeMap<String, ServiceWeights> = svcs
            .iter()
            .map(|s| {
                let w = effective_weights(s, s.strategy, &BTreeMap::new(), |_| true, Instant::now());
                (s.name.clone(), w)
            })
            .collect();
        let p = plan(
            &Desired {
                services: &svcs,
                weights: &weights,
                hops: &hops,
                geo: Some(&geo),
            },
            &Assignments::default(),
        )
        .expect("plan");
        let members = |region: u32| -> Vec<String> {
            let (_, _, input, _) = p.geo.iter().find(|g| g.1 == region).expect("region's table");
            input.members.iter().map(|m| m.0.clone()).collect()
        };
        assert_eq!(members(geo.id("a").unwrap()), ["b0"]);
        assert_eq!(members(geo.id("b").unwrap()), ["b1", "b2"]);
    }

    #[test]
    fn one_flap_among_100_services_rebuilds_one_table() {
        let svcs = services(100, 100);
        let hops: HashMap<IpAddr, NextHop> = svcs
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| (b.address, hop())))
            .collect();
        let mut status = BTreeMap::new();
        let first = plan_and_build(&svcs, &status, &hops, &Assignments::default());
        assert_eq!(first.rebuild.len(), 100, "every table is new");
        assert_eq!(first.new_service_ids.len(), 100);
        let a = built(first);
        let again = plan_and_build(&svcs, &status, &hops, &a);
        assert!(again.rebuild.is_empty(), "nothing changed, nothing rebuilt");

        status.insert(
            crate::model::BackendRef::new("svc42", "b7"),
            BackendStatus {
                health: HealthState::Down,
                score: 0.0,
                ..Default::default()
            },
        );
        let flap = plan_and_build(&svcs, &status, &hops, &a);
        let names: Vec<&str> = flap.rebuild.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, vec!["svc42"]);
        assert_eq!(flap.rebuild[0].1.members.len(), 99);
        let write = flap.backends.iter().find(|w| w.key == "svc42/b7").unwrap();
        assert!(
            !write.active,
            "down with down_flows = repick: pinned flows move too"
        );
        assert!(flap.retired.is_empty() && flap.new_service_ids.is_empty());
    }

    #[test]
    fn slots_are_kept_and_never_reused_in_the_pass_that_retires_them() {
        let mut svcs = services(1, 3);
        let hops: HashMap<IpAddr, NextHop> = svcs[0].backends.iter().map(|b| (b.address, hop())).collect();
        let status = BTreeMap::new();
        let a = built(plan_and_build(&svcs, &status, &hops, &Assignments::default()));
        let slot_of = |a: &Assignments, id: &str| a.backends[&backend_key("svc0", id)].slot;
        let b1 = slot_of(&a, "b1");
        // b1 moves to a new address: a new slot, the old one retired.
        svcs[0].backends[1].address = "10.2.9.9".parse().unwrap();
        let mut hops2 = hops.clone();
        hops2.insert("10.2.9.9".parse().unwrap(), hop());
        let p = plan_and_build(&svcs, &status, &hops2, &a);
        assert_eq!(p.retired, vec![b1]);
        let new_b1 = p.assignments.backends[&backend_key("svc0", "b1")].slot;
        assert_ne!(new_b1, b1);
        assert!(p.backends.iter().any(|w| w.slot == new_b1 && w.fresh));
        assert_eq!(slot_of(&p.assignments, "b0"), slot_of(&a, "b0"));
        // Unresolved: inactive and out of the table.
        let p = plan_and_build(&svcs, &status, &HashMap::new(), &a);
        assert!(p.backends.iter().all(|w| !w.active));
        assert!(p.rebuild[0].1.members.is_empty());
    }
}
