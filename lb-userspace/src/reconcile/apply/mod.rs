//! Carries a plan out on the maps. The order keeps every packet safe: backend slots are
//! written (and activated) before any table names them, tables are swapped whole (write a fresh
//! pool region, then flip the service value), and a slot is deactivated or retired only after
//! no table names it any more.

mod backends;
mod geo;
#[cfg(test)]
mod order_tests;
mod retire;
mod services;
mod tables;

use std::collections::BTreeSet;

use lb_common::{ServiceKey, geo::GeoKey};
use log::debug;

use super::plan::Plan;
pub use super::plan::addr_bytes;
use crate::{
    dataplane::{DataPlane, MapWrites, RegionAllocator},
    error::{Error, Result},
    model::Service,
    snapshot::{Assignments, Region, ServiceKeyRepr, TableInput},
};
use tables::pool_need;
pub use tables::{BUILD_BATCH, build, build_all};

impl From<ServiceKeyRepr> for ServiceKey {
    fn from(k: ServiceKeyRepr) -> Self {
        ServiceKey::new(k.family, k.proto, k.addr, k.port)
    }
}

pub fn service_key(spec: &Service) -> ServiceKey {
    let (addr, family) = addr_bytes(spec.vip);
    ServiceKey::new(family, spec.protocol.number(), addr, spec.port.to_be())
}

/// The region a live value names, reserved; `None` for no table, or one overlapping a
/// reserved region.
fn reserve(regions: &mut RegionAllocator, offset: u32, size: u32) -> Option<Region> {
    (size > 0 && regions.reserve(offset, size)).then_some(Region { offset, size })
}

/// The key of a VIP's fragment service: its address and protocol, port 0.
pub(super) fn fragment_key(k: &ServiceKey) -> ServiceKey {
    ServiceKey::from_words(k.family, k.proto, k.addr, 0)
}

pub(super) fn key_repr(k: &ServiceKey) -> ServiceKeyRepr {
    ServiceKeyRepr {
        addr: k.addr_bytes(),
        port: k.port,
        proto: k.proto,
        family: k.family,
    }
}

/// The maps and the book of what they hold: the writer's one handle on the data plane.
pub struct Maps {
    pub dp: DataPlane,
    pub slots: Slots,
}

impl Maps {
    /// Maps restored from a state file: the slots it names, checked against the maps.
    pub fn adopt(dp: DataPlane, assignments: Assignments) -> Self {
        let mut dp = dp;
        let slots = Slots::adopt(&mut dp, assignments);
        Self { dp, slots }
    }

    pub fn new(dp: DataPlane) -> Self {
        let slots = Slots::new(&dp);
        Self { dp, slots }
    }
}

/// Which map slots and pool regions are given out: the assignments plus the pool's free space.
pub struct Slots {
    pub assignments: Assignments,
    pub regions: RegionAllocator,
}

impl Slots {
    /// Rebuilds allocator state from persisted assignments and what the maps hold now: every
    /// region a live value names (its table, its previous table for second chance, and a geo
    /// service's per-region tables) is reserved, so no later table is written over one that
    /// packets still read.
    pub fn adopt<M: MapWrites>(dp: &mut M, mut assignments: Assignments) -> Self {
        let mut regions = RegionAllocator::new(dp.pool_slots());
        for slot in assignments.services.values_mut() {
            let saved = slot.active;
            let value = slot.key.and_then(|k| dp.service_value(&ServiceKey::from(k)));
            slot.active = value.and_then(|v| reserve(&mut regions, v.table_offset, v.table_size));
            // A crash between a pass and its save leaves a table the state file does not
            // describe: its inputs are unknown, so the next pass builds it again (and keeps
            // the region if the table comes out the same).
            if slot.active != saved {
                slot.built = None;
            }
            // The value names a previous table only when it is a Maglev one (second chance).
            slot.previous = value.and_then(|v| reserve(&mut regions, v.prev_offset, v.prev_size));
            slot.previous_maglev = slot.previous.is_some();
            if slot.previous.is_none()
                && value.is_some_and(|v| v.prev_size != 0)
                && let Some(k) = slot.key
            {
                // Overlapping what is reserved already: the value must stop naming it.
                let _ = forget_previous(dp, &ServiceKey::from(k));
            }
            let id = slot.id;
            slot.geo.retain(|&region, g| {
                let Some(v) = dp.geo_value(&GeoKey { service: id, region }) else {
                    return false;
                };
                let saved = g.active;
                g.active = reserve(&mut regions, v.table_offset, v.table_size);
                g.previous = reserve(&mut regions, v.prev_offset, v.prev_size);
                if g.active != saved || g.active.is_none() {
                    g.built = None;
                }
                true
            });
        }
        Self { assignments, regions }
    }

    pub fn new<M: MapWrites>(dp: &M) -> Self {
        Self {
            assignments: Assignments::default(),
            regions: RegionAllocator::new(dp.pool_slots()),
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
    fn make_room<M: MapWrites>(&mut self, dp: &mut M, rebuild: &[(String, TableInput)]) -> Result<()> {
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

    /// Makes the maps match `services` as `plan` (made from them) says, in the three steps
    /// whose order keeps every packet safe.
    pub fn apply<M: MapWrites>(&mut self, dp: &mut M, services: &[Service], plan: Plan) -> Result<Applied> {
        self.check_pool(&plan)?;
        crate::failpoints::leak_descriptor("apply-leak-descriptor");
        let Plan {
            assignments,
            new_service_ids,
            backends,
            retired,
            rebuild,
            geo,
        } = plan;
        let mut geo_inputs = services::GeoInputs::new();
        for (name, region, input, serving) in geo {
            geo_inputs.entry(name).or_default().push((region, input, serving));
        }
        self.assignments = assignments;
        self.make_room(dp, &rebuild)?;
        let mut applied = Applied::default();
        let deactivate = backends::write(dp, &backends)?;
        crate::crash_point!("apply-backends-written");
        for id in new_service_ids {
            dp.reset_service_traffic(id)?;
        }
        let wanted = services::write(self, dp, services, rebuild, geo_inputs, &mut applied)?;
        crate::crash_point!("apply-services-written");
        retire::run(self, dp, services, wanted, deactivate, retired)?;
        // The maps are done; the state file does not know yet.
        crate::crash_point!("apply-retired");
        Ok(applied)
    }
}

/// What one pass did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Applied {
    pub built: usize,
    pub swapped: usize,
    pub build_time: std::time::Duration,
}

/// Stops a service's value (and its fragment value) naming its previous table.
pub(super) fn forget_previous<M: MapWrites>(dp: &mut M, key: &ServiceKey) -> Result<()> {
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
