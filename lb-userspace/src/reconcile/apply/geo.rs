//! A geo service's per-region tables: one Maglev table per region whose serving backends differ
//! from the service's own, each behind its region's service value.

use std::collections::BTreeSet;

use lb_common::{ServiceValue, geo::GeoKey};

use super::{Applied, tables::build};
use crate::{
    dataplane::{MapWrites, RegionAllocator, grace_period},
    error::{Error, Result},
    snapshot::{GeoSlot, Region, ServiceSlot, TableInput},
};

/// A geo service's per-region tables and their service values: each region's table is built
/// when its inputs changed and swapped in by rewriting the region's value (which keeps the
/// one before for second chance); regions no longer wanted go, value first.
pub(super) fn apply_geo<M: MapWrites>(
    dp: &mut M,
    regions: &mut RegionAllocator,
    svc: &mut ServiceSlot,
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
                    if let Some(mut v) = dp.geo_value(&key) {
                        (v.prev_offset, v.prev_size) = (0, 0);
                        dp.set_geo_value(key, v)?;
                    }
                    regions.release(prev.offset, prev.size);
                    offset = regions.alloc_after_grace(size, grace_period);
                }
                let offset = offset.ok_or_else(|| {
                    Error::invalid(format!(
                        "not enough Maglev table space for a geo region's table ({size} slots): raise daemon.table_pool_slots"
                    ))
                })?;
                dp.write_table(offset, &table)?;
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
        if dp.geo_value(&key) != Some(value) {
            dp.set_geo_value(key, value)?;
        }
        // Released only once the value no longer names them.
        for r in release {
            regions.release(r.offset, r.size);
        }
    }
    let stale: Vec<u32> = svc.geo.keys().copied().filter(|r| !wanted.contains(r)).collect();
    for region in stale {
        let _ = dp.remove_geo_value(&GeoKey {
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
fn geo_value(main: &ServiceValue, g: &GeoSlot) -> ServiceValue {
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
