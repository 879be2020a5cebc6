//! Backend selection: VIP filter, connection table, then the service's Maglev table.

use lb_common::{
    Backend, Counter, FAMILY_V4, FlowKey, FlowState, ServiceKey, ServiceValue, VipFilter,
    hash::{flow_hash, source_hash},
    service::SVC_F_HASH_SOURCE,
};
use lb_ebpf::{Flow, FlowKind, Verdict};

use crate::{
    maps::{BACKENDS, CONNTRACK, FRAGMENT_SERVICES, MAGLEV_POOL, SERVICES, VIP_FILTER},
    stats::count,
};

pub struct Chosen {
    pub slot: u32,
    pub backend: Backend,
    pub new_flow: bool,
    /// The service's stats id and forwarding mode.
    pub service: u32,
    pub forward: u32,
}

/// Picks the backend for a parsed flow, or says why the packet is not balanced.
///
/// Order, cheapest answer first: the VIP filter (one array read turns away non-VIP traffic),
/// the connection table (a known flow needs nothing else; a TCP SYN opens a new flow, so it
/// skips the search and its insert replaces any old entry), then the service (exact port, then
/// the VIP's all-ports wildcard if it may have one) and its Maglev table.
#[inline(always)]
pub fn choose(flow: &Flow) -> Result<Chosen, Verdict> {
    let key = &flow.key;
    let not_vip = Verdict::Pass(Counter::PassNotVip);
    let filter = VIP_FILTER.get(0).ok_or(not_vip)?;
    let bit = VipFilter::bit(&key.dst_addr);
    if !filter.may_be_vip(bit) {
        return Err(not_vip);
    }
    if flow.kind == FlowKind::Fragment {
        return fragment(key);
    }
    let mut stale = false;
    if flow.kind != (FlowKind::Transport { syn: true })
        && let Some(state) = CONNTRACK.get_ptr(key)
    {
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
                service: state.service,
                forward: state.forward,
            });
        }
        // The backend was removed or its slot reused: pick again.
        stale = true;
    }
    let service = service(key, filter, bit).ok_or(not_vip)?;
    count(if stale {
        Counter::ConntrackStale
    } else {
        Counter::ConntrackMiss
    });
    // An ICMP error's quote must not create a connection-table entry: spoofed errors, each
    // quoting another tuple, would fill the table.
    pick(key, &service, flow.kind != FlowKind::IcmpError)
}

/// A fragment goes to the backend its (source, destination, protocol) hashes to in the table of
/// the VIP's fragment service, if the VIP has one (`fragments = "hash"`); else to the kernel.
/// Nothing is remembered: every fragment hashes the same way.
#[inline(always)]
fn fragment(key: &FlowKey) -> Result<Chosen, Verdict> {
    let pass = Verdict::Pass(if key.family == FAMILY_V4 {
        Counter::PassIpv4Fragment
    } else {
        Counter::PassIpv6Fragment
    });
    let skey = ServiceKey::from_words(key.family, key.proto, key.dst_addr, 0);
    // SAFETY: the map is not preallocated, so a value we read is never recycled under us.
    let service = unsafe { FRAGMENT_SERVICES.get(skey) }.copied().ok_or(pass)?;
    count(Counter::FragmentForwarded);
    pick(key, &service, false)
}

#[inline(always)]
fn service(key: &FlowKey, filter: &VipFilter, bit: usize) -> Option<ServiceValue> {
    let mut skey = ServiceKey::from_words(key.family, key.proto, key.dst_addr, key.dst_port);
    // SAFETY: the map is not preallocated, so a value we read is never recycled under us.
    if let Some(v) = unsafe { SERVICES.get(skey) } {
        return Some(*v);
    }
    if !filter.may_have_wildcard(bit) {
        return None;
    }
    skey.port = 0;
    unsafe { SERVICES.get(skey) }.copied()
}

/// A new (or re-picked) flow: hash into the service's Maglev table and (`remember`) pin it.
#[inline(always)]
fn pick(key: &FlowKey, service: &ServiceValue, remember: bool) -> Result<Chosen, Verdict> {
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
        service: service.id,
        forward: service.forward,
    };
    if remember && CONNTRACK.insert(key, state, 0).is_err() {
        count(Counter::ConntrackInsertFailed);
    }
    Ok(Chosen {
        slot,
        backend,
        new_flow: true,
        service: service.id,
        forward: service.forward,
    })
}
