//! Carries a plan out on the maps. The order keeps every packet safe: backend slots are
//! written (and activated) before any table names them, tables are swapped whole (write a fresh
//! pool region, then flip the service value), and a slot is deactivated or retired only after
//! no table names it any more.

use std::{collections::BTreeSet, net::IpAddr};

use lb_common::{
    AddrKey, Backend, FAMILY_V4, FAMILY_V6, ServiceKey, ServiceValue, VipFilter, addr_words,
    backend::BACKEND_F_ACTIVE,
    geo::GeoKey,
    service::{
        FWD_DSR_L2, FWD_GUE, FWD_IPIP, FWD_NAT, FWD_SNAT, SVC_F_HASH_SOURCE, SVC_F_SHED, SVC_F_SHED_DROP,
    },
};
use log::debug;

use super::plan::{Assignments, Plan, Region, ServiceKeyRepr, TableInput};
use crate::{
    dataplane::{DataPlane, RegionAllocator, grace_period},
    error::{Error, Result},
    maglev::{MaglevBackend, build_table},
    model::{Forwarding, FragmentPolicy, HashMode, Service},
};

impl From<ServiceKeyRepr> for ServiceKey {
    fn from(k: ServiceKeyRepr) -> Self {
        ServiceKey::new(k.family, k.proto, k.addr, k.port)
    }
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

pub fn service_key(spec: &Service) -> ServiceKey {
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

    /// Pool slots the rebuilt tables need beyond what they free (checked before touching maps).
    /// The tables other services keep for second chance count as room: they give it up.
    fn check_pool(&self, plan: &Plan) -> Result<()> {
        let need = pool_need(&plan.rebuild);
        let held: u64 = self
            .assignments
            .services
            .values()
            .filter_map(|slot| slot.previous.map(|r| r.size as u64))
            .sum();
        let free = self.regions.free_slots() + held;
        if need > free {
            return Err(Error::invalid(format!(
                "not enough Maglev table space: {need} slots needed, {free} free of {}; raise daemon.table_pool_slots (takes effect after `lb detach`) or use smaller table_size",
                self.regions.capacity()
            )));
        }
        Ok(())
    }

    /// Makes room for the rebuilt tables where free space and their own services' previous
    /// tables fall short: other services give up their previous tables (second chance), the
    /// largest first, each value rewritten before its region is released.
    fn make_room(&mut self, dp: &mut DataPlane, rebuild: &[(String, TableInput)]) -> Result<()> {
        let need = pool_need(rebuild);
        let rebuilt: BTreeSet<&str> = rebuild.iter().map(|(name, _)| name.as_str()).collect();
        let own: u64 = rebuilt
            .iter()
            .filter_map(|name| self.assignments.services.get(*name)?.previous)
            .map(|r| r.size as u64)
            .sum();
        let mut room = self.regions.free_slots() + own;
        if room >= need {
            return Ok(());
        }
        let mut others: Vec<(u32, String)> = self
            .assignments
            .services
            .iter()
            .filter(|(name, _)| !rebuilt.contains(name.as_str()))
            .filter_map(|(name, slot)| Some((slot.previous?.size, name.clone())))
            .collect();
        others.sort_by(|a, b| b.cmp(a));
        for (_, name) in others {
            if room >= need {
                break;
            }
            let slot = self.assignments.services.get_mut(&name).expect("listed");
            let Some(prev) = slot.previous.take() else {
                continue;
            };
            if let Some(key) = slot.key {
                forget_previous(dp, &ServiceKey::from(key))?;
            }
            debug!(
                "service {name} gives up its previous table ({} slots) for a swap",
                prev.size
            );
            self.regions.release(prev.offset, prev.size);
            room += prev.size as u64;
        }
        Ok(())
    }

    /// Makes the maps match `services` as `plan` (made from them) says.
    pub fn apply(&mut self, dp: &mut DataPlane, services: &[Service], plan: Plan) -> Result<Applied> {
        self.check_pool(&plan)?;
        let Plan {
            assignments,
            new_service_ids,
            backends,
            retired,
            rebuild,
            geo,
        } = plan;
        let mut geo_inputs: std::collections::BTreeMap<String, Vec<(u32, TableInput, Option<String>)>> =
            std::collections::BTreeMap::new();
        for (name, region, input, serving) in geo {
            geo_inputs.entry(name).or_default().push((region, input, serving));
        }
        self.assignments = assignments;
        self.make_room(dp, &rebuild)?;
        let a = &mut self.assignments;
        let mut applied = Applied::default();

        // 1. Backend entries. A slot that stops serving is written only after the tables no
        // longer name it (step 3), so no packet meets a dead slot in between.
        let mut deactivate = Vec::new();
        for w in &backends {
            let current = dp.backend(w.slot)?;
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
                dp.ensure_tx_port(hop.ifindex, &hop.ifname)?;
            }
            if w.fresh {
                dp.reset_backend_slot(w.slot)?;
            }
            dp.set_shed(w.slot, w.max_new_flows_per_s.unwrap_or(0))?;
            if entry == current {
                continue;
            }
            if current.is_active() && !entry.is_active() && !w.fresh {
                deactivate.push((w.slot, entry));
            } else {
                debug!("backend {} slot {}: {entry:?}", w.key, w.slot);
                dp.set_backend(w.slot, entry)?;
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
            .fragment_keys()
            .into_iter()
            .filter(|k| !fragment_keys.contains(&key_repr(k)))
            .collect();
        for k in stray_fragments {
            dp.remove_fragment(&k)?;
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
            dp.add_vip_addr(*a)?;
        }
        let mut rebuild: std::collections::BTreeMap<String, TableInput> = rebuild.into_iter().collect();
        let mut prebuilt: std::collections::HashMap<String, Vec<u16>> = std::collections::HashMap::new();
        for (i, s) in services.iter().enumerate() {
            let key = service_key(s);
            let svc = a.services.get_mut(&s.name).expect("planned");
            let shedding =
                s.max_new_flows_per_s.is_some() || s.backends.iter().any(|b| b.max_new_flows_per_s.is_some());
            dp.set_shed(
                lb_common::shed::service_bucket(svc.id),
                s.max_new_flows_per_s.unwrap_or(0),
            )?;
            let mut value = ServiceValue {
                id: svc.id,
                flags: if s.hash == HashMode::Source {
                    SVC_F_HASH_SOURCE
                } else {
                    0
                } | if shedding { SVC_F_SHED } else { 0 }
                    | if s.on_shed == crate::model::OnShed::Drop {
                        SVC_F_SHED_DROP
                    } else {
                        0
                    }
                    // Adaptive services measure imbalance by the counts, whatever they run.
                    | if s.strategy == crate::model::Strategy::Adaptive {
                        lb_common::service::SVC_F_COUNT
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
                strategy: 0,
                prev_offset: 0,
                prev_size: 0,
            };
            // The previous table this pass replaces, released once the value no longer names it.
            let mut release_after = None;
            if rebuild.contains_key(&s.name) && !prebuilt.contains_key(&s.name) {
                // This table and the next ones this pass rebuilds, on every CPU at once.
                let batch: Vec<(&str, &TableInput)> = services[i..]
                    .iter()
                    .filter_map(|x| rebuild.get_key_value(&x.name))
                    .take(BUILD_BATCH)
                    .map(|(name, input)| (name.as_str(), input))
                    .collect();
                let started = std::time::Instant::now();
                let built = build_all(&batch);
                applied.build_time += started.elapsed();
                prebuilt.extend(built);
            }
            if let Some(input) = rebuild.remove(&s.name) {
                let table = prebuilt.remove(&s.name).unwrap_or_else(|| build(&input));
                applied.built += 1;
                // After a restart the inputs are unknown, but the table may be the same.
                let unchanged = svc.active.is_some_and(|r| {
                    r.size as usize == table.len()
                        && dp.pool.read(r.offset, r.size).as_deref() == Some(table.as_slice())
                });
                if !unchanged {
                    // The service value names the previous table (second chance) until it is
                    // replaced below: that region is released after, unless the pool has no
                    // room for the new table beside it.
                    let mut old_previous = svc.previous.take();
                    let new_region = if table.is_empty() {
                        None
                    } else {
                        let size = table.len() as u32;
                        let mut offset = self.regions.alloc_after_grace(size, grace_period);
                        if offset.is_none()
                            && let Some(prev) = old_previous.take()
                        {
                            // The value stops naming it before it is released.
                            forget_previous(dp, &key)?;
                            self.regions.release(prev.offset, prev.size);
                            offset = self.regions.alloc_after_grace(size, grace_period);
                        }
                        let offset = offset.ok_or_else(|| {
                            Error::invalid(format!("not enough Maglev table space for service {}", s.name))
                        })?;
                        dp.pool.write(offset, &table)?;
                        Some(Region { offset, size })
                    };
                    release_after = old_previous;
                    svc.previous_maglev = svc
                        .built
                        .as_ref()
                        .is_some_and(|b| b.strategy == crate::model::Strategy::Maglev);
                    svc.previous = svc.active.take();
                    svc.active = new_region;
                    svc.generation += 1;
                    applied.swapped += 1;
                }
                svc.built = Some(input);
            }
            if let Some(r) = svc.active {
                value.table_offset = r.offset;
                value.table_size = r.size;
            }
            // What the region holds says how the data plane reads it.
            let built = svc.built.as_ref().map_or(s.strategy.table(), |b| b.strategy);
            value.strategy = if s.strategy == crate::model::Strategy::Geo {
                lb_common::strategy::STRATEGY_GEO
            } else {
                built.id()
            };
            if built == crate::model::Strategy::Maglev
                && svc.previous_maglev
                && let Some(p) = svc.previous
            {
                value.prev_offset = p.offset;
                value.prev_size = p.size;
            }
            dp.set_service(key, value)?;
            if let Some(r) = release_after {
                self.regions.release(r.offset, r.size);
            }
            if s.fragments == FragmentPolicy::Hash {
                let fkey = fragment_key(&key);
                dp.set_fragment(fkey, value)?;
            }
            let inputs = geo_inputs.remove(&s.name).unwrap_or_default();
            apply_geo(dp, &mut self.regions, svc, &value, inputs, &mut applied)?;
            let old_key = svc.key.replace(key_repr(&key));
            if let Some(old) = old_key.filter(|k| !live_keys.contains(k)) {
                let _ = dp.remove_service(&ServiceKey::from(old));
            }
        }

        // 3. Retire what is gone: service keys, then backend slots, then service ids and tables.
        let stray: Vec<ServiceKey> = dp
            .service_keys()
            .into_iter()
            .filter(|k| !live_keys.contains(&key_repr(k)))
            .collect();
        for k in stray {
            dp.remove_service(&k)?;
        }
        dp.vip_filter.set(0, wanted_filter, 0).map_err(Error::dataplane)?;
        let stray_addrs: Vec<AddrKey> = dp
            .vip_addr_keys()
            .into_iter()
            .filter(|k| !wanted_addrs.contains(k))
            .collect();
        for a in stray_addrs {
            dp.remove_vip_addr(&a)?;
        }
        for (slot, entry) in deactivate {
            dp.set_backend(slot, entry)?;
        }
        for slot in retired {
            let mut entry = dp.backend(slot)?;
            entry.flags = 0;
            dp.set_backend(slot, entry)?;
        }
        let wanted: BTreeSet<&str> = services.iter().map(|s| s.name.as_str()).collect();
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
                for (region, g) in slot.geo {
                    let _ = dp.geo_services.remove(&GeoKey {
                        service: slot.id,
                        region,
                    });
                    for r in [g.active, g.previous].into_iter().flatten() {
                        self.regions.release(r.offset, r.size);
                    }
                }
            }
        }
        Ok(applied)
    }
}

/// A geo service's per-region tables and their service values: each region's table is built
/// when its inputs changed and swapped in by rewriting the region's value (which keeps the
/// one before for second chance); regions no longer wanted go, value first.
fn apply_geo(
    dp: &mut DataPlane,
    regions: &mut RegionAllocator,
    svc: &mut super::plan::ServiceSlot,
    main: &ServiceValue,
    inputs: Vec<(u32, TableInput, Option<String>)>,
    applied: &mut Applied,
) -> Result<()> {
    let wanted: BTreeSet<u32> = inputs.iter().map(|i| i.0).collect();
    let main_input = svc.built.clone();
    for (region, input, serving) in inputs {
        let g = svc.geo.entry(region).or_default();
        g.serving = serving;
        // A region served like the default region (itself, or a failover to it) shares the
        // service's own table: no table of its own.
        let shared = main_input.as_ref() == Some(&input);
        let mut release = Vec::new();
        if shared {
            release.extend(g.active.take());
            release.extend(g.previous.take());
            g.built = None;
        } else if g.built.as_ref() != Some(&input) {
            let started = std::time::Instant::now();
            let table = build(&input);
            applied.built += 1;
            applied.build_time += started.elapsed();
            let new_region = if table.is_empty() {
                None
            } else {
                let size = table.len() as u32;
                let mut offset = regions.alloc_after_grace(size, grace_period);
                // No room beside the previous table: this region gives up its second chance,
                // its value first.
                if offset.is_none()
                    && let Some(prev) = g.previous.take()
                {
                    let key = GeoKey {
                        service: svc.id,
                        region,
                    };
                    if let Ok(mut v) = dp.geo_services.get(&key, 0) {
                        (v.prev_offset, v.prev_size) = (0, 0);
                        dp.geo_services.insert(key, v, 0).map_err(Error::dataplane)?;
                    }
                    regions.release(prev.offset, prev.size);
                    offset = regions.alloc_after_grace(size, grace_period);
                }
                let offset = offset.ok_or_else(|| {
                    Error::invalid(format!(
                        "not enough Maglev table space for a geo region's table ({size} slots): raise daemon.table_pool_slots"
                    ))
                })?;
                dp.pool.write(offset, &table)?;
                Some(Region { offset, size })
            };
            release.extend(g.previous.take());
            g.previous = g.active.take();
            g.active = new_region;
            g.built = Some(input);
            applied.swapped += 1;
        }
        let g = svc.geo.get(&region).expect("just set");
        let value = if shared {
            ServiceValue {
                strategy: lb_common::strategy::STRATEGY_MAGLEV,
                ..*main
            }
        } else {
            geo_value(main, g)
        };
        let key = GeoKey {
            service: svc.id,
            region,
        };
        if dp.geo_services.get(&key, 0).ok() != Some(value) {
            dp.geo_services.insert(key, value, 0).map_err(Error::dataplane)?;
        }
        // Released only once the value no longer names them.
        for r in release {
            regions.release(r.offset, r.size);
        }
    }
    let stale: Vec<u32> = svc.geo.keys().copied().filter(|r| !wanted.contains(r)).collect();
    for region in stale {
        let _ = dp.geo_services.remove(&GeoKey {
            service: svc.id,
            region,
        });
        if let Some(g) = svc.geo.remove(&region) {
            for r in [g.active, g.previous].into_iter().flatten() {
                regions.release(r.offset, r.size);
            }
        }
    }
    Ok(())
}

/// A region's service value: the service's, on the region's own Maglev table (and its
/// previous one, for second chance).
fn geo_value(main: &ServiceValue, g: &super::plan::GeoSlot) -> ServiceValue {
    let (table_offset, table_size) = g.active.map_or((0, 0), |r| (r.offset, r.size));
    let (prev_offset, prev_size) = g.previous.map_or((0, 0), |r| (r.offset, r.size));
    ServiceValue {
        table_offset,
        table_size,
        strategy: lb_common::strategy::STRATEGY_MAGLEV,
        prev_offset,
        prev_size,
        ..*main
    }
}

/// What one pass did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Applied {
    pub built: usize,
    pub swapped: usize,
    pub build_time: std::time::Duration,
}

/// Tables built ahead at most this many at a time: a pass that rebuilds many (a start, a
/// reload, a backend of many services going down) spreads them over the CPUs, and holds no
/// more than this many built tables at once.
pub const BUILD_BATCH: usize = 16;

/// Builds each input's region, the batch split over the CPUs (one alone: on this thread).
pub fn build_all(batch: &[(&str, &TableInput)]) -> Vec<(String, Vec<u16>)> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(batch.len());
    if workers <= 1 {
        return batch
            .iter()
            .map(|(name, input)| (name.to_string(), build(input)))
            .collect();
    }
    let per = batch.len().div_ceil(workers);
    std::thread::scope(|scope| {
        let handles: Vec<_> = batch
            .chunks(per)
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|(name, input)| (name.to_string(), build(input)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// Stops a service's value (and its fragment value) naming its previous table.
fn forget_previous(dp: &mut DataPlane, key: &ServiceKey) -> Result<()> {
    if let Some(mut v) = dp.service_value(key)
        && v.prev_size != 0
    {
        (v.prev_offset, v.prev_size) = (0, 0);
        dp.set_service(*key, v)?;
    }
    let fkey = fragment_key(key);
    if let Some(mut v) = dp.fragment_value(&fkey)
        && v.prev_size != 0
    {
        (v.prev_offset, v.prev_size) = (0, 0);
        dp.set_fragment(fkey, v)?;
    }
    Ok(())
}

/// The pool slots the rebuilt tables take, at most.
fn pool_need(rebuild: &[(String, TableInput)]) -> u64 {
    rebuild.iter().map(|(_, input)| region_len(input) as u64).sum()
}

/// The pool slots `build` fills for these inputs, at most (none without members).
fn region_len(input: &TableInput) -> u32 {
    use crate::model::Strategy;
    let n = input.members.len() as u32;
    match input.strategy {
        _ if n == 0 => 0,
        Strategy::RoundRobin => n,
        Strategy::LeastConnections | Strategy::PowerOfTwo => n * lb_common::strategy::MEMBER_STRIDE,
        _ => input.size,
    }
}

/// A service's pool region for a plan's members (see `lb_common::strategy`): the Maglev table,
/// the members in turn, one period of smooth weighted round robin, or one element of (slot,
/// weight, cap) per member. Backend slots fit 16 bits (`MAX_BACKENDS`).
pub fn build(input: &TableInput) -> Vec<u16> {
    use crate::model::Strategy;
    let slots = input.members.iter().map(|m| m.2 as u16);
    match input.strategy {
        Strategy::Maglev | Strategy::ResourceAware | Strategy::Adaptive | Strategy::Geo => maglev(input),
        Strategy::RoundRobin => slots.collect(),
        Strategy::WeightedRoundRobin => {
            let mut weights: Vec<u32> = input.members.iter().map(|m| m.1).collect();
            // A period no longer than the Maglev table the service would have.
            lb_common::strategy::wrr_weights(&mut weights, input.size);
            let total: usize = weights.iter().map(|&w| w as usize).sum();
            let mut current = vec![0i64; weights.len()];
            let mut order = vec![0u32; total];
            let n = lb_common::strategy::smooth_wrr(&weights, &mut current, &mut order);
            order[..n]
                .iter()
                .map(|&i| input.members[i as usize].2 as u16)
                .collect()
        }
        Strategy::LeastConnections | Strategy::PowerOfTwo => input
            .members
            .iter()
            .enumerate()
            .flat_map(|(i, m)| {
                lb_common::strategy::member_words(m.2 as u16, m.1, input.caps.get(i).copied().unwrap_or(0))
            })
            .collect(),
    }
}

/// The Maglev table of a plan's members, as backend slots.
fn maglev(input: &TableInput) -> Vec<u16> {
    let members: Vec<MaglevBackend<'_>> = input
        .members
        .iter()
        .map(|(id, weight, _)| MaglevBackend { id, weight: *weight })
        .collect();
    build_table(&members, input.size)
        .into_iter()
        .map(|i| input.members[i as usize].2 as u16)
        .collect()
}
