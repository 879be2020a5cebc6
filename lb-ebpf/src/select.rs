//! Backend selection: VIP filter, connection table, then the service's Maglev table.

use lb_common::{
    Backend, Counter, FAMILY_V4, FlowKey, FlowState, NatEntry, ServiceKey, ServiceValue, VipFilter,
    hash::{flow_hash, source_hash},
    service::{FWD_NAT, SVC_F_HASH_SOURCE},
};
use lb_ebpf::{Flow, FlowKind, Verdict};

use crate::{
    maps::{BACKENDS, CONNTRACK, FRAGMENT_SERVICES, MAGLEV_POOL, NAT_FLOWS, SERVICES, VIP_FILTER},
    stats::count,
};

/// What the balancer does with a packet it takes.
enum Choice {
    /// Balance (or keep) the flow on this backend, in the service's forwarding mode.
    Backend(Chosen),
    /// A packet of a NAT connection: its entry, and for a request the (live) backend.
    Nat {
        entry: *mut NatEntry,
        backend: Option<Backend>,
    },
}

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
/// Order, cheapest answer first: the NAT table, only while NAT services exist and only for
/// addresses the VIP filter marks as NAT VIPs or NAT backends; the VIP filter (one array read
/// turns away non-VIP traffic), the connection table (a known flow needs nothing else; a
/// TCP SYN opens a new flow, so it skips the search and its insert replaces any old entry),
/// then the service (exact port, then the VIP's all-ports wildcard if it may have one) and its
/// Maglev table.
///
/// A function of its own (a BPF-to-BPF call), so its frame is not added to the per-mode paths'
/// that run after it. It writes the backend into `out`: all of it for `Found::Backend`, the
/// `backend` field for `Found::NatRequest`.
#[inline(never)]
pub fn choose(flow: &Flow, out: *mut Chosen) -> Result<Found, Verdict> {
    // SAFETY: `out` is the caller's room for one Chosen.
    unsafe {
        match choice(flow)? {
            Choice::Backend(c) => {
                out.write(c);
                Ok(Found::Backend)
            }
            Choice::Nat { entry, backend: None } => Ok(Found::NatReply(entry)),
            Choice::Nat {
                entry,
                backend: Some(b),
            } => {
                core::ptr::addr_of_mut!((*out).backend).write(b);
                Ok(Found::NatRequest(entry))
            }
        }
    }
}

/// What `choose` found.
pub enum Found {
    Backend,
    /// A reply of a NAT connection, with its entry.
    NatReply(*mut NatEntry),
    /// A request of a NAT connection, with its entry (its live backend is in `Chosen::backend`).
    NatRequest(*mut NatEntry),
}

#[inline(always)]
fn choice(flow: &Flow) -> Result<Choice, Verdict> {
    let key = &flow.key;
    let not_vip = Verdict::Pass(Counter::PassNotVip);
    let filter = VIP_FILTER.get(0).ok_or(not_vip)?;
    let bit = VipFilter::bit(&key.dst_addr);
    // NAT connections first: requests to a NAT VIP and replies from a NAT backend, whatever a
    // reply's destination (a client or the SNAT address may share a filter bit with a VIP).
    // ICMP errors carry the key of the flow they quote, so they find its entry too.
    if filter.nat_in_use()
        && matches!(flow.kind, FlowKind::Transport { .. } | FlowKind::IcmpError)
        && (filter.may_be_nat(bit) || filter.may_be_nat(VipFilter::bit(&key.src_addr)))
        && let Some(entry) = NAT_FLOWS.get_ptr_mut(key)
    {
        match nat_backend(key, entry) {
            NatHit::Reply => return Ok(Choice::Nat { entry, backend: None }),
            NatHit::Request(b) => {
                return Ok(Choice::Nat {
                    entry,
                    backend: Some(b),
                });
            }
            // The pair went with its backend: a new connection may open below.
            NatHit::Gone => {}
        }
    }
    if !filter.may_be_vip(bit) {
        return Err(not_vip);
    }
    if flow.kind == FlowKind::Fragment {
        return fragment(key).map(Choice::Backend);
    }
    let mut stale = false;
    if flow.kind != (FlowKind::Transport { syn: true })
        && let Some(state) = CONNTRACK.get_ptr(key)
    {
        // SAFETY: pointer from a successful lookup; FlowState is plain data.
        let state = unsafe { *state };
        if let Some(backend) = BACKENDS.get(state.backend)
            && backend.serves(state.generation)
        {
            count(Counter::ConntrackHit);
            return Ok(Choice::Backend(Chosen {
                slot: state.backend,
                backend: *backend,
                new_flow: false,
                service: state.service,
                forward: state.forward,
            }));
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
    pick(key, &service, flow.kind != FlowKind::IcmpError).map(Choice::Backend)
}

enum NatHit {
    Reply,
    Request(Backend),
    Gone,
}

/// What a NAT entry leads to: a reply (sent where the client's packets came from), or a
/// request and its live backend. If the backend was removed or its slot reused, the connection
/// cannot go on: both entries are removed.
#[inline(always)]
fn nat_backend(key: &FlowKey, entry: *mut NatEntry) -> NatHit {
    // SAFETY: a pointer from a successful lookup; plain data.
    let e = unsafe { &*entry };
    if e.is_reply() {
        return NatHit::Reply;
    }
    if let Some(b) = crate::nat::backend_of(e) {
        return NatHit::Request(b);
    }
    let _ = NAT_FLOWS.remove(&e.twin_key(key.family, key.proto));
    let _ = NAT_FLOWS.remove(key);
    NatHit::Gone
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
    // NAT connections are pinned by their NAT entries instead.
    if remember && service.forward < FWD_NAT && CONNTRACK.insert(key, state, 0).is_err() {
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
