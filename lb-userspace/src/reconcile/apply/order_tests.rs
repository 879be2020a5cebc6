//! The order apply writes in, recorded by a map sink that keeps what it is told and logs each
//! write. A test of order: what the kernel does with each write is the golden tests' job.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::Instant,
};

use lb_common::{AddrKey, Backend, ServiceKey, ServiceValue, VipFilter, geo::GeoKey};

use super::{Slots, service_key};
use crate::{
    dataplane::MapWrites,
    error::Result,
    model::{Backend as ModelBackend, BackendRef, Protocol, Service},
    neigh::NextHop,
    reconcile::plan::{Desired, plan},
    status::{BackendStatus, HealthState, effective_weights},
};

/// One write, as the data plane would see it.
#[derive(Clone, Debug, PartialEq)]
enum Write {
    /// A backend slot, serving (active) or not.
    Backend {
        slot: u32,
        active: bool,
    },
    /// A service value, and the table region it names (offset, size).
    Service {
        key: ServiceKey,
        table: (u32, u32),
    },
    RemoveService(ServiceKey),
    /// The VIP filter: which of the test's VIPs it lets through.
    Filter {
        lets: Vec<IpAddr>,
    },
    Table {
        offset: u32,
        len: u32,
    },
    Other,
}

#[derive(Default)]
struct Recorder {
    backends: HashMap<u32, Backend>,
    services: HashMap<ServiceKey, ServiceValue>,
    geo: HashMap<GeoKey, ServiceValue>,
    filter: Option<VipFilter>,
    addrs: Vec<AddrKey>,
    pool: HashMap<u32, Vec<u16>>,
    log: Vec<Write>,
    /// The VIPs whose filter bits the log reports.
    vips: Vec<IpAddr>,
}

impl Recorder {
    fn lets(&self, f: &VipFilter) -> Vec<IpAddr> {
        self.vips
            .iter()
            .copied()
            .filter(|v| {
                let (addr, _) = super::addr_bytes(*v);
                f.may_be_vip(VipFilter::bit(&lb_common::addr_words(addr)))
            })
            .collect()
    }
}

impl MapWrites for Recorder {
    fn backend(&mut self, slot: u32) -> Result<Backend> {
        Ok(self.backends.get(&slot).copied().unwrap_or_default())
    }
    fn set_backend(&mut self, slot: u32, entry: Backend) -> Result<()> {
        self.log.push(Write::Backend {
            slot,
            active: entry.is_active(),
        });
        self.backends.insert(slot, entry);
        Ok(())
    }
    fn reset_backend_slot(&mut self, _: u32) -> Result<()> {
        self.log.push(Write::Other);
        Ok(())
    }
    fn set_shed(&mut self, _: u32, _: u32) -> Result<()> {
        Ok(())
    }
    fn ensure_tx_port(&mut self, _: u32, _: &str) -> Result<()> {
        Ok(())
    }
    fn service_value(&mut self, key: &ServiceKey) -> Option<ServiceValue> {
        self.services.get(key).copied()
    }
    fn set_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<()> {
        self.log.push(Write::Service {
            key,
            table: (value.table_offset, value.table_size),
        });
        self.services.insert(key, value);
        Ok(())
    }
    fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        self.log.push(Write::RemoveService(*key));
        self.services.remove(key);
        Ok(())
    }
    fn service_keys(&mut self) -> Vec<ServiceKey> {
        self.services.keys().copied().collect()
    }
    fn reset_service_traffic(&mut self, _: u32) -> Result<()> {
        Ok(())
    }
    fn fragment_value(&mut self, _: &ServiceKey) -> Option<ServiceValue> {
        None
    }
    fn set_fragment(&mut self, _: ServiceKey, _: ServiceValue) -> Result<()> {
        Ok(())
    }
    fn remove_fragment(&mut self, _: &ServiceKey) -> Result<()> {
        Ok(())
    }
    fn fragment_keys(&mut self) -> Vec<ServiceKey> {
        Vec::new()
    }
    fn geo_value(&mut self, key: &GeoKey) -> Option<ServiceValue> {
        self.geo.get(key).copied()
    }
    fn set_geo_value(&mut self, key: GeoKey, value: ServiceValue) -> Result<()> {
        self.geo.insert(key, value);
        Ok(())
    }
    fn remove_geo_value(&mut self, key: &GeoKey) -> Result<()> {
        self.geo.remove(key);
        Ok(())
    }
    fn vip_filter(&mut self) -> Result<VipFilter> {
        Ok(self.filter.unwrap_or(VipFilter::EMPTY))
    }
    fn set_vip_filter(&mut self, filter: VipFilter) -> Result<()> {
        self.log.push(Write::Filter {
            lets: self.lets(&filter),
        });
        self.filter = Some(filter);
        Ok(())
    }
    fn add_vip_addr(&mut self, addr: AddrKey) -> Result<()> {
        if !self.addrs.contains(&addr) {
            self.addrs.push(addr);
        }
        Ok(())
    }
    fn remove_vip_addr(&mut self, addr: &AddrKey) -> Result<()> {
        self.addrs.retain(|a| a != addr);
        Ok(())
    }
    fn vip_addr_keys(&mut self) -> Vec<AddrKey> {
        self.addrs.clone()
    }
    fn pool_slots(&self) -> u32 {
        1 << 16
    }
    fn read_table(&self, offset: u32, len: u32) -> Option<Vec<u16>> {
        self.pool
            .get(&offset)
            .filter(|t| t.len() == len as usize)
            .cloned()
    }
    fn write_table(&mut self, offset: u32, table: &[u16]) -> Result<()> {
        self.log.push(Write::Table {
            offset,
            len: table.len() as u32,
        });
        self.pool.insert(offset, table.to_vec());
        Ok(())
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn web(backends: &[&str]) -> Service {
    Service {
        table_size: 251,
        backends: backends
            .iter()
            .enumerate()
            .map(|(i, id)| ModelBackend::new(*id, ip(&format!("10.0.1.{}", i + 1))))
            .collect(),
        ..Service::new("web", ip("10.0.0.1"), 80, Protocol::Tcp)
    }
}

fn hops(services: &[Service]) -> HashMap<IpAddr, NextHop> {
    services
        .iter()
        .flat_map(|s| &s.backends)
        .map(|b| {
            let hop = NextHop {
                ifindex: 2,
                ifname: "eth0".into(),
                src_mac: [2; 6],
                dst_mac: [4; 6],
                mtu: 0,
            };
            (b.address, hop)
        })
        .collect()
}

/// Plans `services` against what `slots` holds and applies it; the writes it made.
fn pass(slots: &mut Slots, dp: &mut Recorder, services: &[Service]) -> Vec<Write> {
    pass_with(slots, dp, services, &BTreeMap::new())
}

fn pass_with(
    slots: &mut Slots,
    dp: &mut Recorder,
    services: &[Service],
    status: &BTreeMap<BackendRef, BackendStatus>,
) -> Vec<Write> {
    let hops = hops(services);
    let weights = services
        .iter()
        .map(|s| {
            let w = effective_weights(s, s.strategy, status, |_| true, Instant::now());
            (s.name.clone(), w)
        })
        .collect();
    let desired = Desired {
        services,
        weights: &weights,
        hops: &hops,
        geo: None,
    };
    let p = plan(&desired, &slots.assignments).expect("plan");
    dp.log.clear();
    slots.apply(dp, services, p).expect("apply");
    std::mem::take(&mut dp.log)
}

fn position(log: &[Write], what: impl Fn(&Write) -> bool, name: &str) -> usize {
    log.iter()
        .position(what)
        .unwrap_or_else(|| panic!("no {name} in {log:#?}"))
}

fn slot_of(slots: &Slots, id: &str) -> u32 {
    slots.assignments.slot("web", id).expect("assigned").slot
}

#[test]
fn a_new_service_is_let_through_and_its_backends_serve_before_its_value_names_them() {
    let mut dp = Recorder {
        vips: vec![ip("10.0.0.1")],
        ..Default::default()
    };
    let mut slots = Slots::new(&dp);
    let services = [web(&["b0", "b1"])];
    let log = pass(&mut slots, &mut dp, &services);
    let key = service_key(&services[0]);
    let value = position(
        &log,
        |w| matches!(w, Write::Service { key: k, .. } if *k == key),
        "service value",
    );
    let filter = position(
        &log,
        |w| matches!(w, Write::Filter { lets } if lets.contains(&ip("10.0.0.1"))),
        "filter",
    );
    let table = position(&log, |w| matches!(w, Write::Table { .. }), "table");
    assert!(filter < value, "the filter lets the VIP through first: {log:#?}");
    assert!(
        table < value,
        "the table is written before the value names it: {log:#?}"
    );
    for id in ["b0", "b1"] {
        let slot = slot_of(&slots, id);
        let serving = position(
            &log,
            |w| *w == Write::Backend { slot, active: true },
            "backend entry",
        );
        assert!(
            serving < value,
            "backend {id} serves before the value names it: {log:#?}"
        );
    }
}

#[test]
fn a_removed_backend_stops_serving_only_after_the_new_table_is_in() {
    let mut dp = Recorder::default();
    let mut slots = Slots::new(&dp);
    pass(&mut slots, &mut dp, &[web(&["b0", "b1", "b2"])]);
    let gone = slot_of(&slots, "b1");
    let old_table = dp
        .services
        .values()
        .next()
        .map(|v| (v.table_offset, v.table_size));
    let log = pass(&mut slots, &mut dp, &[web(&["b0", "b2"])]);
    let swapped = position(
        &log,
        |w| matches!(w, Write::Service { table, .. } if Some(*table) != old_table),
        "the new table's value",
    );
    let retired = position(
        &log,
        |w| {
            *w == Write::Backend {
                slot: gone,
                active: false,
            }
        },
        "the retired slot",
    );
    assert!(swapped < retired, "{log:#?}");
}

#[test]
fn a_backend_that_goes_down_stops_serving_only_after_the_table_without_it_is_in() {
    let mut dp = Recorder::default();
    let mut slots = Slots::new(&dp);
    let services = [web(&["b0", "b1", "b2"])];
    pass(&mut slots, &mut dp, &services);
    let b1 = slot_of(&slots, "b1");
    let old_table = dp
        .services
        .values()
        .next()
        .map(|v| (v.table_offset, v.table_size));
    let down = BackendStatus {
        health: HealthState::Down,
        score: 0.0,
        ..Default::default()
    };
    let status = BTreeMap::from([(BackendRef::new("web", "b1"), down)]);
    let log = pass_with(&mut slots, &mut dp, &services, &status);
    let swapped = position(
        &log,
        |w| matches!(w, Write::Service { table, .. } if Some(*table) != old_table),
        "the new table's value",
    );
    let stopped = position(
        &log,
        |w| {
            *w == Write::Backend {
                slot: b1,
                active: false,
            }
        },
        "b1 stopped",
    );
    assert!(swapped < stopped, "{log:#?}");
}

#[test]
fn a_removed_service_goes_before_its_vip_is_filtered_out_and_its_slots_retire() {
    let mut dp = Recorder {
        vips: vec![ip("10.0.0.1"), ip("10.0.0.2")],
        ..Default::default()
    };
    let mut slots = Slots::new(&dp);
    let other = Service {
        table_size: 251,
        backends: vec![ModelBackend::new("x0", ip("10.0.2.1"))],
        ..Service::new("other", ip("10.0.0.2"), 80, Protocol::Tcp)
    };
    let both = [web(&["b0"]), other.clone()];
    pass(&mut slots, &mut dp, &both);
    let b0 = slot_of(&slots, "b0");
    let key = service_key(&both[0]);
    let log = pass(&mut slots, &mut dp, &[other]);
    let removed = position(&log, |w| *w == Write::RemoveService(key), "removal");
    let narrowed = position(
        &log,
        |w| matches!(w, Write::Filter { lets } if !lets.contains(&ip("10.0.0.1"))),
        "the narrowed filter",
    );
    let retired = position(
        &log,
        |w| {
            *w == Write::Backend {
                slot: b0,
                active: false,
            }
        },
        "retired slot",
    );
    assert!(removed < narrowed, "{log:#?}");
    assert!(removed < retired, "{log:#?}");
    assert!(!slots.assignments.services.contains_key("web"));
}

/// Whether `a` and `b` (offset, length) share a slot.
fn overlap(a: (u32, u32), b: (u32, u32)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

#[test]
fn a_restarted_writer_never_writes_a_table_over_one_a_value_still_names() {
    let mut dp = Recorder::default();
    let mut slots = Slots::new(&dp);
    pass(&mut slots, &mut dp, &[web(&["b0", "b1", "b2"])]);
    pass(&mut slots, &mut dp, &[web(&["b0", "b1"])]);
    let key = service_key(&web(&[]));
    let value = dp.services[&key];
    assert_ne!(
        value.prev_size, 0,
        "the swap keeps the table before for second chance"
    );
    let held = slots.regions.free_slots() + slots.assignments.second_chance_slots();

    // A geo region's own table, named by its value only.
    let id = slots.assignments.services["web"].id;
    let region = (1 << 15, 251);
    dp.geo.insert(
        GeoKey {
            service: id,
            region: 7,
        },
        ServiceValue {
            table_offset: region.0,
            table_size: region.1,
            ..value
        },
    );
    let mut assignments = slots.assignments.clone();
    assignments.services.get_mut("web").unwrap().geo.insert(
        7,
        crate::snapshot::GeoSlot {
            active: Some(crate::snapshot::Region {
                offset: region.0,
                size: region.1,
            }),
            ..Default::default()
        },
    );

    // The daemon restarts: the same state, the same maps.
    let mut adopted = Slots::adopt(&mut dp, assignments);
    assert_eq!(
        adopted.regions.free_slots() + adopted.assignments.second_chance_slots() + 252,
        held,
        "second chance and the geo table stay reserved over a restart"
    );
    assert_eq!(
        adopted.assignments.services["web"]
            .previous
            .map(|r| (r.offset, r.size)),
        Some((value.prev_offset, value.prev_size))
    );
    let log = pass(&mut adopted, &mut dp, &[web(&["b0"])]);
    for w in &log {
        if let Write::Table { offset, len } = *w {
            for named in [
                (value.prev_offset, value.prev_size),
                (value.table_offset, value.table_size),
                region,
            ] {
                assert!(
                    !overlap((offset, len), named),
                    "table {offset}+{len} written over {named:?}, which a value still names: {log:#?}"
                );
            }
        }
    }
}
