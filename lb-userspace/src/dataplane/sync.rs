//! Reconciles the maps with the desired services. The order keeps every packet safe:
//! backend slots are written before any table names them, tables are swapped whole (write a
//! fresh pool region, then flip the service value), and slots are retired only after no table
//! names them any more.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use lb_common::{
    AddrKey, Backend, FAMILY_V4, FAMILY_V6, ServiceKey, ServiceValue, VipFilter, addr_words,
    backend::BACKEND_F_ACTIVE,
    maps::{MAX_BACKENDS, MAX_SERVICES},
    service::{FWD_DSR_L2, FWD_GUE, FWD_IPIP, FWD_NAT, FWD_SNAT, SVC_F_HASH_SOURCE},
};
use log::debug;
use serde::{Deserialize, Serialize};

use super::{DataPlane, RegionAllocator};
use crate::{
    config::{Forwarding, FragmentPolicy, HashMode, ServiceSpec},
    error::{Error, Result},
    maglev::{MaglevBackend, build_table},
    neigh::NextHop,
};

/// A pool region holding one table.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Region {
    pub offset: u32,
    pub size: u32,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServiceSlot {
    pub id: u32,
    pub key: Option<ServiceKeyRepr>,
    pub active: Option<Region>,
    /// The table before the last swap; kept so in-flight readers never see it rewritten.
    pub previous: Option<Region>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceKeyRepr {
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

impl From<ServiceKeyRepr> for ServiceKey {
    fn from(k: ServiceKeyRepr) -> Self {
        ServiceKey::new(k.family, k.proto, k.addr, k.port)
    }
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

pub fn backend_key(service: &str, id: &str) -> String {
    format!("{service}/{id}")
}

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

pub fn service_key(spec: &ServiceSpec) -> ServiceKey {
    let (addr, family) = addr_bytes(spec.vip);
    ServiceKey::new(family, spec.protocol.number(), addr, spec.port.to_be())
}

/// The key of a VIP's fragment service: its address and protocol, port 0.
fn fragment_key(k: &ServiceKey) -> ServiceKey {
    ServiceKey::from_words(k.family, k.proto, k.addr, 0)
}

fn key_repr(k: &ServiceKey) -> ServiceKeyRepr {
    ServiceKeyRepr {
        addr: k.addr_bytes(),
        port: k.port,
        proto: k.proto,
        family: k.family,
    }
}

/// In-memory side of the reconciler: assignments plus the pool's free space.
pub struct Reconciler {
    pub assignments: Assignments,
    pub regions: RegionAllocator,
}

impl Reconciler {
    /// Rebuilds allocator state from persisted assignments and what the maps hold now.
    pub fn adopt(dp: &DataPlane, mut assignments: Assignments) -> Self {
        let mut regions = RegionAllocator::new(dp.pool.slots());
        for slot in assignments.services.values_mut() {
            // Only the table a live service value points at is known to be in use.
            slot.previous = None;
            slot.active = slot.key.and_then(|k| {
                let v = dp.services.get(&ServiceKey::from(k), 0).ok()?;
                (v.table_size > 0 && regions.reserve(v.table_offset, v.table_size)).then_some(Region {
                    offset: v.table_offset,
                    size: v.table_size,
                })
            });
        }
        Self { assignments, regions }
    }

    pub fn new(dp: &DataPlane) -> Self {
        Self {
            assignments: Assignments::default(),
            regions: RegionAllocator::new(dp.pool.slots()),
        }
    }

    /// Pool slots the desired services need beyond what they hold now (checked before touching maps).
    fn check_pool(&self, services: &[ServiceSpec]) -> Result<()> {
        let mut need: u64 = 0;
        let mut held: u64 = 0;
        for s in services {
            need += s.table_size as u64;
            if let Some(slot) = self.assignments.services.get(&s.name) {
                held += slot.previous.map_or(0, |r| r.size as u64);
            }
        }
        let free = self.regions.free_slots() + held;
        if need > free {
            return Err(Error::invalid(format!(
                "not enough Maglev table space: {need} slots needed, {free} free of {}; raise daemon.table_pool_slots (takes effect after `lb detach`) or use smaller table_size",
                self.regions.capacity()
            )));
        }
        Ok(())
    }

    /// Makes the maps match `services`. `hops` holds the resolved next hop of each backend
    /// address; unresolved backends stay out of the tables.
    pub fn apply(
        &mut self,
        dp: &mut DataPlane,
        services: &[ServiceSpec],
        hops: &HashMap<IpAddr, NextHop>,
    ) -> Result<()> {
        self.check_pool(services)?;
        let a = &mut self.assignments;

        // Service ids.
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

        // Backend slots: keep a slot while the backend keeps its address.
        let wanted_backends: BTreeMap<String, (&ServiceSpec, usize)> = services
            .iter()
            .flat_map(|s| {
                s.backends
                    .iter()
                    .enumerate()
                    .map(move |(i, b)| (backend_key(&s.name, &b.id), (s, i)))
            })
            .collect();
        let mut retired: Vec<u32> = Vec::new();
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
        let mut fresh_slots = Vec::new();
        for (k, (s, i)) in &wanted_backends {
            if a.backends.contains_key(k) {
                continue;
            }
            let slot = (0..MAX_BACKENDS)
                .find(|i| !used_slots.contains(i) && !reserved.contains(i))
                .ok_or_else(|| Error::invalid("no free backend slot"))?;
            used_slots.insert(slot);
            a.backends.insert(
                k.clone(),
                BackendSlot {
                    slot,
                    address: s.backends[*i].address,
                },
            );
            fresh_slots.push(slot);
        }

        // 1. Backend entries.
        for (k, (s, i)) in &wanted_backends {
            let spec = &s.backends[*i];
            let slot = a.backends[k].slot;
            let current = dp.backends.get(&slot, 0).map_err(Error::dataplane)?;
            let generation = if fresh_slots.contains(&slot) {
                current.generation.wrapping_add(1)
            } else {
                current.generation
            };
            let (addr, family) = addr_bytes(spec.address);
            let mut entry = Backend {
                addr,
                family,
                flags: 0,
                port: spec.port(s).to_be(),
                generation,
                ifindex: 0,
                dst_mac: [0; 6],
                src_mac: [0; 6],
            };
            if let Some(hop) = hops.get(&spec.address) {
                entry.flags = BACKEND_F_ACTIVE;
                entry.ifindex = hop.ifindex;
                entry.dst_mac = hop.dst_mac;
                entry.src_mac = hop.src_mac;
                if dp.tx_ports.get(hop.ifindex, 0).is_err() {
                    dp.tx_ports
                        .insert(hop.ifindex, hop.ifindex, None, 0)
                        .map_err(|e| Error::dataplane(format!("add {} to TX_PORTS: {e}", hop.ifname)))?;
                }
            }
            if fresh_slots.contains(&slot) {
                dp.reset_backend_traffic(slot)?;
            }
            if entry != current {
                debug!("backend {k} slot {slot}: {entry:?}");
                dp.backends.set(slot, entry, 0).map_err(Error::dataplane)?;
            }
        }
        for id in new_service_ids {
            dp.reset_service_traffic(id)?;
        }

        // Fragment entries that are no longer wanted go first: one left behind (say, after a
        // restart) could point at a pool region this pass hands to another table.
        let fragment_keys: BTreeSet<ServiceKeyRepr> = services
            .iter()
            .filter(|s| s.fragments == FragmentPolicy::Hash)
            .map(|s| key_repr(&fragment_key(&service_key(s))))
            .collect();
        let stray_fragments: Vec<ServiceKey> = dp
            .fragment_services
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !fragment_keys.contains(&key_repr(k)))
            .collect();
        for k in stray_fragments {
            dp.fragment_services.remove(&k).map_err(Error::dataplane)?;
        }
        // 2. Tables and service values.
        let live_keys: BTreeSet<ServiceKeyRepr> =
            services.iter().map(|s| key_repr(&service_key(s))).collect();
        // The filter must let a VIP through before its service value appears, and may only
        // forget it once the value is gone: widen it now, narrow it after step 3.
        let mut wanted_filter = VipFilter::EMPTY;
        for s in services {
            let key = service_key(s);
            wanted_filter.add(&key);
            if s.forwarding == Forwarding::Nat {
                // Requests to the VIP and replies from its backends look in the NAT table.
                wanted_filter.add_nat(&key.addr);
                for b in &s.backends {
                    wanted_filter.add_nat(&addr_words(addr_bytes(b.address).0));
                }
            }
        }
        let mut widened = dp.vip_filter.get(&0, 0).map_err(Error::dataplane)?;
        widened.union(&wanted_filter);
        dp.vip_filter.set(0, widened, 0).map_err(Error::dataplane)?;
        let wanted_addrs: BTreeSet<AddrKey> = services
            .iter()
            .map(|s| {
                let k = service_key(s);
                AddrKey::new(k.family, k.addr)
            })
            .collect();
        for a in &wanted_addrs {
            dp.vip_addrs.insert(a, 1, 0).map_err(Error::dataplane)?;
        }
        for s in services {
            let slot_of = |id: &str| a.backends[&backend_key(&s.name, id)].slot;
            let mut eligible: Vec<&crate::config::BackendSpec> = s
                .backends
                .iter()
                .filter(|b| b.weight > 0 && hops.contains_key(&b.address))
                .collect();
            eligible.sort_by(|x, y| x.id.cmp(&y.id));
            let members: Vec<MaglevBackend<'_>> = eligible
                .iter()
                .map(|b| MaglevBackend {
                    id: &b.id,
                    weight: b.weight,
                })
                .collect();
            let table: Vec<u32> = build_table(&members, s.table_size)
                .into_iter()
                .map(|i| slot_of(&eligible[i as usize].id))
                .collect();

            let key = service_key(s);
            let svc = a.services.get_mut(&s.name).expect("assigned above");
            let mut value = ServiceValue {
                id: svc.id,
                flags: if s.hash == HashMode::Source {
                    SVC_F_HASH_SOURCE
                } else {
                    0
                },
                table_offset: 0,
                table_size: 0,
                forward: match s.forwarding {
                    Forwarding::Dsr => FWD_DSR_L2,
                    Forwarding::Ipip => FWD_IPIP,
                    Forwarding::Gue => FWD_GUE,
                    Forwarding::Nat if s.snat => FWD_SNAT,
                    Forwarding::Nat => FWD_NAT,
                },
                _reserved: 0,
            };
            let unchanged = svc.active.is_some_and(|r| {
                r.size as usize == table.len()
                    && dp.pool.read(r.offset, r.size).as_deref() == Some(table.as_slice())
            });
            if unchanged {
                let r = svc.active.expect("checked");
                value.table_offset = r.offset;
                value.table_size = r.size;
            } else {
                if let Some(prev) = svc.previous.take() {
                    self.regions.release(prev.offset, prev.size);
                }
                let new_region = if table.is_empty() {
                    None
                } else {
                    let size = table.len() as u32;
                    let offset = self.regions.alloc(size).ok_or_else(|| {
                        Error::invalid(format!("not enough Maglev table space for service {}", s.name))
                    })?;
                    dp.pool.write(offset, &table)?;
                    Some(Region { offset, size })
                };
                if let Some(r) = new_region {
                    value.table_offset = r.offset;
                    value.table_size = r.size;
                }
                svc.previous = svc.active.take();
                svc.active = new_region;
            }
            let current = dp.services.get(&key, 0).ok();
            if current != Some(value) {
                dp.services.insert(key, value, 0).map_err(Error::dataplane)?;
            }
            if s.fragments == FragmentPolicy::Hash {
                let fkey = fragment_key(&key);
                if dp.fragment_services.get(&fkey, 0).ok() != Some(value) {
                    dp.fragment_services
                        .insert(fkey, value, 0)
                        .map_err(Error::dataplane)?;
                }
            }
            let old_key = svc.key.replace(key_repr(&key));
            if let Some(old) = old_key.filter(|k| !live_keys.contains(k)) {
                let _ = dp.services.remove(&ServiceKey::from(old));
            }
        }

        // 3. Retire what is gone: service keys, then backend slots, then service ids and tables.
        let stray: Vec<ServiceKey> = dp
            .services
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !live_keys.contains(&key_repr(k)))
            .collect();
        for k in stray {
            dp.services.remove(&k).map_err(Error::dataplane)?;
        }
        dp.vip_filter.set(0, wanted_filter, 0).map_err(Error::dataplane)?;
        let stray_addrs: Vec<AddrKey> = dp
            .vip_addrs
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !wanted_addrs.contains(k))
            .collect();
        for a in stray_addrs {
            dp.vip_addrs.remove(&a).map_err(Error::dataplane)?;
        }
        for slot in retired {
            let mut entry = dp.backends.get(&slot, 0).map_err(Error::dataplane)?;
            entry.flags = 0;
            dp.backends.set(slot, entry, 0).map_err(Error::dataplane)?;
        }
        let gone: Vec<String> = a
            .services
            .keys()
            .filter(|n| !wanted.contains(n.as_str()))
            .cloned()
            .collect();
        for name in gone {
            if let Some(slot) = a.services.remove(&name) {
                for r in [slot.active, slot.previous].into_iter().flatten() {
                    self.regions.release(r.offset, r.size);
                }
            }
        }
        Ok(())
    }
}
