//! Step 2: tables and service values. The VIP filter lets a VIP through before its value
//! appears (it is narrowed in step 3); each rebuilt table goes into a fresh pool region and is
//! swapped in whole by rewriting the service value, which keeps the one before for second
//! chance.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use lb_common::{AddrKey, ServiceKey, VipFilter, addr_words};

use super::{
    Applied, Slots, forget_previous, fragment_key,
    geo::apply_geo,
    key_repr, service_key,
    tables::{BUILD_BATCH, build, build_all},
};
use crate::{
    dataplane::{MapWrites, grace_period},
    error::{Error, Result},
    model::{Forwarding, FragmentPolicy, Service, Strategy},
    reconcile::plan::{addr_bytes, service_value},
    snapshot::{Region, ServiceKeyRepr, TableInput},
};

/// What step 3 keeps: everything else goes.
pub struct Wanted {
    pub filter: VipFilter,
    pub addrs: BTreeSet<AddrKey>,
    pub keys: BTreeSet<ServiceKeyRepr>,
}

/// Geo services' per-region inputs, by service.
pub type GeoInputs = BTreeMap<String, Vec<(u32, TableInput, Option<String>)>>;

pub fn write<M: MapWrites>(
    slots: &mut Slots,
    dp: &mut M,
    services: &[Service],
    rebuild: Vec<(String, TableInput)>,
    mut geo_inputs: GeoInputs,
    applied: &mut Applied,
) -> Result<Wanted> {
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
    let keys: BTreeSet<ServiceKeyRepr> = services.iter().map(|s| key_repr(&service_key(s))).collect();
    // The filter must let a VIP through before its service value appears, and may only
    // forget it once the value is gone: widen it now, narrow it after step 3.
    let mut filter = VipFilter::EMPTY;
    for s in services {
        let key = service_key(s);
        filter.add(&key);
        if s.forwarding == Forwarding::Nat {
            // Requests to the VIP and replies from its backends look in the NAT table.
            filter.add_nat(&key.addr);
            for b in &s.backends {
                filter.add_nat(&addr_words(addr_bytes(b.address).0));
            }
        }
    }
    let mut widened = dp.vip_filter()?;
    widened.union(&filter);
    dp.set_vip_filter(widened)?;
    let addrs: BTreeSet<AddrKey> = services
        .iter()
        .map(|s| {
            let k = service_key(s);
            AddrKey::new(k.family, k.addr)
        })
        .collect();
    for a in &addrs {
        dp.add_vip_addr(*a)?;
    }
    let mut rebuild: BTreeMap<String, TableInput> = rebuild.into_iter().collect();
    let mut prebuilt: HashMap<String, Vec<u16>> = HashMap::new();
    for (i, s) in services.iter().enumerate() {
        let key = service_key(s);
        let svc = slots.assignments.services.get_mut(&s.name).expect("planned");
        dp.set_shed(
            lb_common::shed::service_bucket(svc.id),
            s.max_new_flows_per_s.unwrap_or(0),
        )?;
        let mut value = service_value(s, svc.id);
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
                    && dp.read_table(r.offset, r.size).as_deref() == Some(table.as_slice())
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
                    let mut offset = slots.regions.alloc_after_grace(size, grace_period);
                    if offset.is_none()
                        && let Some(prev) = old_previous.take()
                    {
                        // The value stops naming it before it is released.
                        forget_previous(dp, &key)?;
                        slots.regions.release(prev.offset, prev.size);
                        offset = slots.regions.alloc_after_grace(size, grace_period);
                    }
                    let offset = offset.ok_or_else(|| {
                        Error::invalid(format!("not enough Maglev table space for service {}", s.name))
                    })?;
                    dp.write_table(offset, &table)?;
                    // The region is written and given out; no value names it yet.
                    crate::crash_point!("apply-table-written");
                    Some(Region { offset, size })
                };
                release_after = old_previous;
                svc.previous_maglev = svc.built.as_ref().is_some_and(|b| b.strategy == Strategy::Maglev);
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
        value.strategy = if s.strategy == Strategy::Geo {
            lb_common::strategy::STRATEGY_GEO
        } else {
            built.id()
        };
        if built == Strategy::Maglev
            && svc.previous_maglev
            && let Some(p) = svc.previous
        {
            value.prev_offset = p.offset;
            value.prev_size = p.size;
        }
        dp.set_service(key, value)?;
        if let Some(r) = release_after {
            slots.regions.release(r.offset, r.size);
        }
        if s.fragments == FragmentPolicy::Hash {
            dp.set_fragment(fragment_key(&key), value)?;
        }
        let inputs = geo_inputs.remove(&s.name).unwrap_or_default();
        apply_geo(dp, &mut slots.regions, svc, &value, inputs, applied)?;
        let old_key = svc.key.replace(key_repr(&key));
        if let Some(old) = old_key.filter(|k| !keys.contains(k)) {
            let _ = dp.remove_service(&ServiceKey::from(old));
        }
    }
    Ok(Wanted { filter, addrs, keys })
}
