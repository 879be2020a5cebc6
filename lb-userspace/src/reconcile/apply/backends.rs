//! Step 1: backend entries. A slot that stops serving is written only after the tables no
//! longer name it (step 3), so no packet meets a dead slot in between.

use lb_common::Backend;
use log::debug;

use crate::{
    dataplane::MapWrites,
    error::Result,
    reconcile::plan::{BackendWrite, backend_entry},
};

/// Writes every planned backend entry that serves, and returns the ones that stop serving,
/// for step 3.
pub fn write<M: MapWrites>(dp: &mut M, backends: &[BackendWrite]) -> Result<Vec<(u32, Backend)>> {
    let mut deactivate = Vec::new();
    for w in backends {
        let current = dp.backend(w.slot)?;
        let entry = backend_entry(w, &current);
        if let Some(hop) = &w.hop {
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
    Ok(deactivate)
}
