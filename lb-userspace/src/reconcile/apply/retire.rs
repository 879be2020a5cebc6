//! Step 3: retire what is gone, once no table names it: service keys, then the VIP filter and
//! addresses, then backend slots, then service ids and their tables.

use std::collections::BTreeSet;

use lb_common::{AddrKey, Backend, ServiceKey, geo::GeoKey};

use super::{Slots, key_repr, services::Wanted};
use crate::{dataplane::MapWrites, error::Result, model::Service};

pub fn run<M: MapWrites>(
    slots: &mut Slots,
    dp: &mut M,
    services: &[Service],
    wanted: Wanted,
    deactivate: Vec<(u32, Backend)>,
    retired: Vec<u32>,
) -> Result<()> {
    let stray: Vec<ServiceKey> = dp
        .service_keys()
        .into_iter()
        .filter(|k| !wanted.keys.contains(&key_repr(k)))
        .collect();
    for k in stray {
        dp.remove_service(&k)?;
    }
    dp.set_vip_filter(wanted.filter)?;
    let stray_addrs: Vec<AddrKey> = dp
        .vip_addr_keys()
        .into_iter()
        .filter(|k| !wanted.addrs.contains(k))
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
    let names: BTreeSet<&str> = services.iter().map(|s| s.name.as_str()).collect();
    let gone: Vec<String> = slots
        .assignments
        .services
        .keys()
        .filter(|n| !names.contains(n.as_str()))
        .cloned()
        .collect();
    for name in gone {
        if let Some(slot) = slots.assignments.services.remove(&name) {
            for r in [slot.active, slot.previous].into_iter().flatten() {
                slots.regions.release(r.offset, r.size);
            }
            for (region, g) in slot.geo {
                let _ = dp.remove_geo_value(&GeoKey {
                    service: slot.id,
                    region,
                });
                for r in [g.active, g.previous].into_iter().flatten() {
                    slots.regions.release(r.offset, r.size);
                }
            }
        }
    }
    Ok(())
}
