//! Service lookup and backend selection: connection table first, then the Maglev table.

use lb_common::{
    Backend, Counter, FlowKey, FlowState, ServiceKey, ServiceValue,
    hash::{flow_hash, source_hash},
    service::SVC_F_HASH_SOURCE,
};
use lb_ebpf::Verdict;

use crate::{
    maps::{BACKENDS, CONNTRACK, MAGLEV_POOL, SERVICES},
    stats::count,
};

pub struct Chosen {
    pub slot: u32,
    pub backend: Backend,
    pub new_flow: bool,
}

/// Exact (VIP, port, proto) first, then the VIP's all-ports wildcard.
#[inline(always)]
pub fn service(key: &FlowKey) -> Option<ServiceValue> {
    let mut skey = ServiceKey::new(key.family, key.proto, key.dst_addr, key.dst_port);
    // SAFETY: the map is not preallocated, so a value we read is never recycled under us.
    if let Some(v) = unsafe { SERVICES.get(skey) } {
        return Some(*v);
    }
    skey.port = 0;
    unsafe { SERVICES.get(skey) }.copied()
}

#[inline(always)]
pub fn backend(key: &FlowKey, service: &ServiceValue) -> Result<Chosen, Verdict> {
    if let Some(state) = CONNTRACK.get_ptr(key) {
        // SAFETY: pointer from a successful lookup; FlowState is plain data.
        let state = unsafe { *state };
        if let Some(backend) = BACKENDS.get(state.backend)
            && backend.is_active()
            && backend.generation == state.generation
        {
            count(Counter::ConntrackHit);
            return Ok(Chosen {
                slot: state.backend,
                backend: *backend,
                new_flow: false,
            });
        }
        // The backend was removed or its slot reused: pick again.
        count(Counter::ConntrackStale);
    } else {
        count(Counter::ConntrackMiss);
    }

    let size = service.table_size;
    if size == 0 {
        return Err(Verdict::Drop(Counter::DropNoBackend));
    }
    let hash = if service.flags & SVC_F_HASH_SOURCE != 0 {
        source_hash(key)
    } else {
        flow_hash(key)
    };
    let index = service.table_offset + hash % size;
    let slot = *MAGLEV_POOL
        .get(index)
        .ok_or(Verdict::Drop(Counter::DropBackendMissing))?;
    let backend = *BACKENDS
        .get(slot)
        .ok_or(Verdict::Drop(Counter::DropBackendMissing))?;
    if !backend.is_active() {
        return Err(Verdict::Drop(Counter::DropBackendMissing));
    }
    let state = FlowState {
        backend: slot,
        generation: backend.generation,
    };
    if CONNTRACK.insert(key, state, 0).is_err() {
        count(Counter::ConntrackInsertFailed);
    }
    Ok(Chosen {
        slot,
        backend,
        new_flow: true,
    })
}
