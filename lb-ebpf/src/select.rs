//! Backend selection: VIP filter, connection table, then the service's Maglev table.
//!
//! Two tables remember flows. A flow's first packet (a SYN, a UDP flow's first datagram, a
//! segment of a connection no table knows) goes into EMBRYONIC; its client's next packet that
//! is not a SYN moves it to CONNTRACK. A flood of first packets, each a fresh tuple, so only
//! evicts other first packets, never a flow that has completed its handshake, whatever the
//! strategy.

use core::mem::MaybeUninit;

use aya_ebpf::bindings::BPF_NOEXIST;

use lb_common::{
    Backend, Counter, FAMILY_V4, FlowKey, FlowState, NatEntry, PROTO_TCP, PROTO_UDP, ServiceKey,
    ServiceValue, VipFilter,
    dpconfig::DP_F_GEO_B,
    dpconfig::FLOOD_WINDOW_NS,
    flow::{FLOW_COUNTED, FLOW_RETRANSMIT, SYN_RETRANSMIT_WINDOW, coarse_seconds},
    geo::GeoKey,
    hash::{flow_hash, source_hash},
    maps::POOL_LANES,
    service::{FWD_NAT, SVC_F_COUNT, SVC_F_HASH_SOURCE, SVC_F_SHED, SVC_F_SHED_DROP},
    shed::service_bucket,
    strategy::{self, MEMBER_STRIDE},
};
use lb_ebpf::{Flow, FlowKind, Verdict};

use crate::{
    maps::{
        ACTIVE, BACKENDS, CONNTRACK, CURSORS, DP_CONFIG, EMBRYONIC, FLOOD, FRAGMENT_SERVICES, GEO_A, GEO_B,
        GEO_SERVICES, MAGLEV_POOL, NAT_FLOWS, SERVICES, SHED, VIP_FILTER, active_add, active_release,
        backend_of, pool_slot,
    },
    stats::{count, finish},
};

/// What the balancer does with a packet it takes.
pub enum Choice {
    /// Balance (or keep) the flow on this backend, in the service's forwarding mode.
    Backend(Chosen),
    /// A packet of a NAT connection: its entry, and for a request the (live) backend.
    Nat {
        entry: *mut NatEntry,
        backend: Option<&'static Backend>,
    },
    /// Not balanced: the counted XDP action.
    Done(u32),
}

pub struct Chosen {
    pub slot: u32,
    /// The backend's slot in BACKENDS, read in place.
    pub backend: &'static Backend,
    pub new_flow: bool,
    /// The service's stats id and forwarding mode.
    pub service: u32,
    pub forward: u32,
}

/// What `pick_new` returns when it found a backend (else the counted XDP action).
const PICKED: u32 = u32::MAX;

/// Picks the backend for a parsed flow, or says why the packet is not balanced.
///
/// Order, cheapest answer first: the NAT table, only while NAT services exist and only for
/// addresses the VIP filter marks as NAT VIPs or NAT backends; the VIP filter (one array read
/// turns away non-VIP traffic), the connection table (a known flow needs nothing else; a
/// TCP SYN opens a new flow, so it skips the search and its insert replaces any old entry),
/// then the service (exact port, then the VIP's all-ports wildcard if it may have one) and its
/// Maglev table.
///
/// Inline up to a connection-table hit; a new flow (or a fragment) is picked by `pick_new`, a
/// function of its own: its frame, the deepest of this path, is not stacked on the per-mode
/// paths'.
#[inline(always)]
pub fn choose(flow: &Flow) -> Choice {
    match choice(flow) {
        Ok(choice) => choice,
        Err(verdict) => Choice::Done(finish(verdict)),
    }
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
    let mut stale = false;
    let searched =
        !matches!(flow.kind, FlowKind::Transport { syn: true, .. }) && flow.kind != FlowKind::Fragment;
    let mut known = if searched {
        CONNTRACK.get_ptr_mut(key)
    } else {
        None
    };
    if searched && known.is_none() {
        if flow.kind == FlowKind::IcmpError {
            // An error about a flow of one packet (a UDP query's answer) follows it too.
            known = EMBRYONIC.get_ptr_mut(key);
        } else if promote(flow) {
            // Read again after a promotion: the verifier then meets one kind of pointer here,
            // and prunes the hit path's states instead of walking them twice.
            known = CONNTRACK.get_ptr_mut(key);
        }
    }
    if let Some(state) = known {
        // SAFETY: pointer from a successful lookup; FlowState is plain data.
        let state = unsafe { &mut *state };
        let slot = state.backend;
        if let Some(backend) = BACKENDS.get(slot)
            && backend.serves(state.generation)
        {
            count(Counter::ConntrackHit);
            // The client's FIN or RST: the flow leaves its backend's active count, once.
            if state.forward & FLOW_COUNTED != 0
                && matches!(flow.kind, FlowKind::Transport { close: true, .. })
            {
                state.forward &= !FLOW_COUNTED;
                active_add(slot, -1);
            }
            return Ok(Choice::Backend(Chosen {
                slot,
                backend,
                new_flow: false,
                service: state.service,
                forward: u32::from(state.mode()),
            }));
        }
        // The backend was removed or its slot reused: pick again, as a flow of one packet.
        let _ = CONNTRACK.remove(key);
        stale = true;
    }
    let mut picked = Picked(MaybeUninit::uninit());
    let action = pick_new(flow, stale, &mut picked);
    if action != PICKED {
        return Ok(Choice::Done(action));
    }
    // SAFETY: pick_new wrote it.
    let picked = unsafe { picked.0.assume_init_ref() };
    let backend = BACKENDS
        .get(picked.backend)
        .ok_or(Verdict::Drop(Counter::DropBackendMissing))?;
    Ok(Choice::Backend(Chosen {
        slot: picked.backend,
        backend,
        new_flow: picked.forward & FLOW_RETRANSMIT == 0,
        service: picked.service,
        // FLOW_COUNTED stays: a NAT pick tells the NAT path to count the connection with it.
        forward: u32::from(picked.forward & !FLOW_RETRANSMIT),
    }))
}

/// A flow CONNTRACK does not know, looked up in EMBRYONIC. A TCP or UDP packet that finds it
/// there is the client's second (a SYN never comes here): the entry moves to CONNTRACK, with
/// its active-flow count; true if it did. Out of line: a flow's second packet is rare next to
/// the packets that hit CONNTRACK.
#[inline(never)]
fn promote(flow: &Flow) -> bool {
    let key = &flow.key;
    let Some(entry) = EMBRYONIC.get_ptr(key) else {
        return false;
    };
    // SAFETY: a pointer from a successful lookup; plain data.
    if CONNTRACK.insert(key, unsafe { &*entry }, 0).is_err() {
        // The flow is picked as new; its next packet finds the embryonic entry again.
        count(Counter::ConntrackInsertFailed);
        return false;
    }
    let _ = EMBRYONIC.remove(key);
    count(Counter::EmbryonicPromoted);
    true
}

/// A SYN's tuple may still have an entry in CONNTRACK, from an earlier connection (the client
/// reused its port): it goes, with its active-flow count, or the new connection's ACK would
/// find the old connection's backend. Out of line: one lookup that nearly always misses.
#[inline(never)]
fn forget_established(key: &FlowKey) {
    let Some(old) = CONNTRACK.get_ptr(key) else {
        return;
    };
    // SAFETY: a pointer from a successful lookup; plain data.
    let (slot, generation, counted) = unsafe {
        (
            (*old).backend,
            (*old).generation,
            (*old).forward & FLOW_COUNTED != 0,
        )
    };
    if CONNTRACK.remove(key).is_ok() && counted {
        active_release(slot, generation);
    }
}

/// Room in the caller's frame for what `pick_new` picked. 8-aligned: LLVM merges neighbouring
/// fields into 8-byte accesses, and the verifier refuses misaligned ones on the stack.
#[repr(C, align(8))]
struct Picked(MaybeUninit<FlowState>);

/// A flow the connection table does not know (or a fragment): its service's Maglev table picks
/// the backend, into `out`. Returns PICKED, or the counted XDP action.
#[inline(never)]
fn pick_new(flow: &Flow, stale: bool, out: &mut Picked) -> u32 {
    let picked = if flow.kind == FlowKind::Fragment {
        fragment(&flow.key)
    } else {
        service_pick(flow, stale)
    };
    match picked {
        Ok(state) => {
            out.0.write(state);
            PICKED
        }
        Err(verdict) => finish(verdict),
    }
}

#[inline(always)]
fn service_pick(flow: &Flow, stale: bool) -> Result<FlowState, Verdict> {
    let key = &flow.key;
    let not_vip = Verdict::Pass(Counter::PassNotVip);
    let filter = VIP_FILTER.get(0).ok_or(not_vip)?;
    let service = service(key, filter, VipFilter::bit(&key.dst_addr)).ok_or(not_vip)?;
    count(if stale {
        Counter::ConntrackStale
    } else {
        Counter::ConntrackMiss
    });
    // An ICMP error's quote must not create a connection-table entry: spoofed errors, each
    // quoting another tuple, would fill the table.
    let remember = if flow.kind == FlowKind::IcmpError {
        Remember::No
    } else if matches!(flow.kind, FlowKind::Transport { syn: true, .. }) {
        Remember::Syn
    } else {
        Remember::Yes
    };
    pick(key, service, remember)
}

/// Whether `pick` pins the flow (in EMBRYONIC), and whether it is a SYN.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Remember {
    No,
    /// A packet that is not a SYN, of a flow no table knows (a UDP flow's first datagram, a TCP
    /// segment whose entry was lost, a flow whose backend was removed): EMBRYONIC.
    Yes,
    /// A SYN (which may be a retransmit): EMBRYONIC.
    Syn,
}

enum NatHit {
    Reply,
    Request(&'static Backend),
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
    if let Some(b) = backend_of(e) {
        return NatHit::Request(b);
    }
    forget(key, e);
    NatHit::Gone
}

/// Removes both entries of a NAT connection. Out of line: the twin's key would take 40 bytes
/// of the balancer's frame.
#[inline(never)]
fn forget(key: &FlowKey, e: &NatEntry) {
    let _ = NAT_FLOWS.remove(&e.twin_key(key.family, key.proto));
    if NAT_FLOWS.remove(key).is_ok() && e.flags & lb_common::nat::NAT_F_COUNTED != 0 {
        active_release(e.backend, e.generation);
    }
}

/// A fragment goes to the backend its (source, destination, protocol) hashes to in the table of
/// the VIP's fragment service, if the VIP has one (`fragments = "hash"`); else to the kernel.
/// Nothing is remembered: every fragment hashes the same way.
#[inline(always)]
fn fragment(key: &FlowKey) -> Result<FlowState, Verdict> {
    let pass = Verdict::Pass(if key.family == FAMILY_V4 {
        Counter::PassIpv4Fragment
    } else {
        Counter::PassIpv6Fragment
    });
    let skey = ServiceKey::from_words(key.family, key.proto, key.dst_addr, 0);
    // SAFETY: the map is not preallocated, so a value we read is never recycled under us.
    let service = unsafe { FRAGMENT_SERVICES.get(skey) }.ok_or(pass)?;
    count(Counter::FragmentForwarded);
    pick(key, service, Remember::No)
}

/// The forwarding mode of the service a packet is addressed to (checks through the VIP).
#[inline(always)]
pub fn service_mode(key: &FlowKey) -> Option<u32> {
    let filter = VIP_FILTER.get(0)?;
    let bit = VipFilter::bit(&key.dst_addr);
    if !filter.may_be_vip(bit) {
        return None;
    }
    service(key, filter, bit).map(|s| s.forward)
}

/// The service's value, read in place (not copied into the new-flow frame).
#[inline(always)]
fn service(key: &FlowKey, filter: &VipFilter, bit: usize) -> Option<&'static ServiceValue> {
    let mut skey = ServiceKey::from_words(key.family, key.proto, key.dst_addr, key.dst_port);
    // SAFETY: the map is not preallocated, so a value we read is never recycled under us.
    if let Some(v) = unsafe { SERVICES.get(skey) } {
        return Some(v);
    }
    if !filter.may_have_wildcard(bit) {
        return None;
    }
    skey.port = 0;
    unsafe { SERVICES.get(skey) }
}

/// A new (or re-picked) flow: hash into the service's Maglev table, shed it if a limit says
/// so, and (`remember`) pin it.
#[inline(always)]
fn pick(key: &FlowKey, service: &'static ServiceValue, remember: Remember) -> Result<FlowState, Verdict> {
    let service = if service.strategy == strategy::STRATEGY_GEO {
        geo_service(key, service)
    } else {
        service
    };
    let size = service.table_size;
    if size == 0 {
        return Err(Verdict::Drop(Counter::DropNoBackend));
    }
    let hash = if service.flags & SVC_F_HASH_SOURCE != 0 {
        source_hash(key)
    } else {
        flow_hash(key)
    };
    let counting = strategy::counts(service.strategy);
    let stride = strategy::stride(service.strategy);
    // The counting strategies' scan, called from here so its frame is not stacked on
    // first_choice's.
    let picked = if counting {
        let i = least_loaded(service.table_offset, size, hash, service.strategy);
        if i == NONE_UNDER_CAP {
            return Err(Verdict::Drop(Counter::DropMaxconn));
        }
        i
    } else {
        UNPICKED
    };
    // Second chance: a TCP segment of a connection the table does not know (evicted, a
    // restarted daemon, another node's flow) most likely belongs to the backend the previous
    // table gave its hash, if the tables changed since and that backend still serves.
    let second = remember == Remember::Yes && key.proto == PROTO_TCP;
    // One register back: the word in the high half, the slot in the low (no stack slot for
    // an out-parameter in this frame).
    let both = first_choice(service, hash, second, picked);
    let index = (both >> 32) as u32;
    let mut slot = both as u32;
    let mut backend = BACKENDS
        .get(slot)
        .ok_or(Verdict::Drop(Counter::DropBackendMissing))?;
    if !backend.is_active() {
        return Err(Verdict::Drop(Counter::DropBackendMissing));
    }
    let now_ns = crate::clock::now_ns();
    let now = coarse_seconds(now_ns);
    // A new flow, as shedding counts them: a SYN, or a UDP flow's first datagram. A TCP
    // segment of an unknown flow is an established connection that lost its entry: never shed.
    let new_flow = remember == Remember::Syn || (remember == Remember::Yes && key.proto == PROTO_UDP);
    if new_flow && service.flags & SVC_F_SHED != 0 {
        if remember == Remember::Syn && retransmit(key, slot, backend.generation, now) {
            return Ok(FlowState {
                backend: slot,
                generation: backend.generation,
                service: service.id,
                forward: service.forward as u16 | FLOW_RETRANSMIT,
                opened: now,
                #[cfg(feature = "flow-v2")]
                extra: 0,
            });
        }
        if !take(service_bucket(service.id), now_ns) {
            crate::events::note(crate::events::Event::Shed, slot);
            return Err(Verdict::Drop(Counter::DropShed));
        }
        if !take(slot, now_ns) {
            crate::events::note(crate::events::Event::Shed, slot);
            if service.flags & SVC_F_SHED_DROP != 0 {
                return Err(Verdict::Drop(Counter::DropShed));
            }
            // Spill to the next candidates of the table, as Maglev's own order has them.
            let mut spilled = None;
            for step in 1..=SPILL_TRIES {
                let Some(other) = pool_slot(service.table_offset + (index + step * stride) % size) else {
                    break;
                };
                if other == slot {
                    continue;
                }
                if let Some(b) = BACKENDS.get(other)
                    && b.is_active()
                    && take(other, now_ns)
                {
                    spilled = Some((other, b));
                    break;
                }
            }
            let (other, b) = spilled.ok_or(Verdict::Drop(Counter::DropShed))?;
            count(Counter::ShedSpilled);
            slot = other;
            backend = b;
        }
    }
    let state = FlowState {
        backend: slot,
        generation: backend.generation,
        service: service.id,
        forward: service.forward as u16,
        opened: now,
        #[cfg(feature = "flow-v2")]
        extra: 0,
    };
    if remember == Remember::No {
        return Ok(state);
    }
    // NAT connections are pinned by their NAT entries instead; `nat::open` counts them (it
    // learns that it should from FLOW_COUNTED).
    if service.forward >= FWD_NAT {
        let counting = counting || service.flags & SVC_F_COUNT != 0;
        return Ok(FlowState {
            forward: state.forward | if counting { FLOW_COUNTED } else { 0 },
            ..state
        });
    }
    // The guard only where a flow's hash alone picks its backend again: a flow of a cursor or
    // counting strategy that is not remembered moves at its next packet.
    if !counting && !strategy::cursor(service.strategy) && flooded(now_ns) {
        count(Counter::ConntrackFloodSkipped);
        return Ok(state);
    }
    let counting = counting || service.flags & SVC_F_COUNT != 0;
    let counted = if counting { FLOW_COUNTED } else { 0 };
    let entry = FlowState {
        forward: state.forward | counted,
        ..state
    };
    // A SYN inserts only where there is no entry, so the common case costs one insert; one
    // that finds a fresh entry of its own backend is the client retrying: counted for passive
    // health, and the entry (and its age) stays.
    if remember == Remember::Syn {
        forget_established(key);
        if EMBRYONIC.insert(key, entry, BPF_NOEXIST as u64).is_ok() {
            count(Counter::EmbryonicInsert);
            if counting {
                active_add(slot, 1);
            }
            return Ok(state);
        }
        if retransmit(key, slot, state.generation, now) {
            return Ok(FlowState {
                forward: state.forward | FLOW_RETRANSMIT,
                ..state
            });
        }
    }
    if EMBRYONIC.insert(key, entry, 0).is_err() {
        count(Counter::ConntrackInsertFailed);
        crate::events::note(crate::events::Event::ConntrackInsertFailed, slot);
    } else {
        count(Counter::EmbryonicInsert);
        if counting {
            active_add(slot, 1);
        }
    }
    Ok(state)
}

/// A geo service's value for this client: its region's (failover resolved by the daemon), or
/// the service's own (the default region's) when the client's prefix has no region. Out of
/// line: the trie key stays out of the new-flow frame.
#[inline(never)]
fn geo_service(key: &FlowKey, service: &'static ServiceValue) -> &'static ServiceValue {
    let b = DP_CONFIG.get(0).is_some_and(|c| c.flags & DP_F_GEO_B != 0);
    let (len, data) = lb_common::geo::key(key.family, key.src_addr, lb_common::geo::max_prefix(key.family));
    let k = aya_ebpf::maps::lpm_trie::Key::new(len, data);
    let region = if b { GEO_B.get(&k) } else { GEO_A.get(&k) };
    let Some(&region) = region else {
        return service;
    };
    let k = GeoKey {
        service: service.id,
        region,
    };
    // SAFETY: the map is not preallocated, so a value we read is never recycled under us.
    unsafe { GEO_SERVICES.get(&k) }.unwrap_or(service)
}

/// `index` before `first_choice`: no counting strategy picked a word.
const UNPICKED: u32 = u32::MAX;

/// The strategy's pick for a new flow: the word of the service's region it came from (shedding
/// spills from there; a counting strategy's scan gives it as `picked`) in the high half, the
/// backend slot in the low half (u32::MAX, no such slot, when the region cannot be read). With `second` (a TCP
/// segment the connection table did not know), a Maglev service whose previous table gives the
/// hash to another live backend picks that one. Out of line: its state stays out of the
/// new-flow frame.
#[inline(never)]
fn first_choice(service: &ServiceValue, hash: u32, second: bool, picked: u32) -> u64 {
    let size = service.table_size;
    if size == 0 {
        return u64::from(u32::MAX);
    }
    let i = if picked != UNPICKED {
        picked
    } else if strategy::cursor(service.strategy) {
        next_cursor(service.id) % size
    } else {
        hash % size
    };
    let at = u64::from(i) << 32;
    let Some(slot) = pool_slot(service.table_offset + i) else {
        return at | u64::from(u32::MAX);
    };
    if second && service.prev_size != 0 && service.strategy == strategy::STRATEGY_MAGLEV {
        match pool_slot(service.prev_offset + hash % service.prev_size) {
            Some(prev) if prev != slot && BACKENDS.get(prev).is_some_and(|b| b.is_active()) => {
                count(Counter::SecondChanceHit);
                return at | u64::from(prev);
            }
            _ => {}
        }
    }
    at | u64::from(slot)
}

/// A slot's active flows (a race with a FIN on another CPU may leave it briefly below 0).
#[inline(always)]
fn active(slot: u32) -> u64 {
    ACTIVE.get(slot).map_or(0, |&a| if a < 0 { 0 } else { a as u64 })
}

/// This CPU's next position in a cursor strategy's region (the caller takes it modulo size).
#[inline(always)]
fn next_cursor(service: u32) -> u32 {
    let Some(c) = CURSORS.get_ptr_mut(service) else {
        return 0;
    };
    // SAFETY: a per-CPU slot; nothing else on this CPU touches it meanwhile.
    let c = unsafe { &mut *c };
    let at = *c;
    *c = at.wrapping_add(1);
    at
}

/// What `least_loaded` returns when every candidate is at its connection cap.
const NONE_UNDER_CAP: u32 = u32::MAX;

/// The word index (in the region at `offset`, `size` words) of the least loaded candidate
/// member: every member up to LC_SCAN (least connections; a window of LC_SCAN members from the
/// hash's start above that), or the better of two hashed ones (power of two choices). Members
/// at their cap are skipped. The scan runs under `bpf_loop`, so the verifier checks its body
/// once instead of every path through 32 unrolled comparisons.
#[inline(never)]
fn least_loaded(offset: u32, size: u32, hash: u32, strategy_id: u32) -> u32 {
    let n = size / MEMBER_STRIDE;
    if n == 0 {
        return NONE_UNDER_CAP;
    }
    let (first, step, loops) = strategy::scan_plan(hash, n, strategy_id);
    let mut scan = Scan {
        offset: u64::from(offset),
        n: u64::from(n),
        first: u64::from(first),
        step: u64::from(step),
        best: u64::from(NONE_UNDER_CAP),
        best_weight: 0,
        best_active: 0,
    };
    // SAFETY: the callback reads only `scan`, which outlives the call.
    unsafe {
        aya_ebpf::helpers::bpf_loop(
            loops,
            scan_member as *mut core::ffi::c_void,
            core::ptr::from_mut(&mut scan).cast(),
            0,
        );
    }
    scan.best as u32
}

/// `least_loaded`'s state across `bpf_loop` calls. 8-aligned: LLVM merges neighbouring fields
/// into 8-byte stack accesses, which the verifier wants aligned.
#[repr(C, align(8))]
struct Scan {
    // Every field a word: LLVM merges neighbouring u32 stores into 8-byte ones at 4-byte
    // offsets, which the verifier refuses on the stack.
    offset: u64,
    n: u64,
    first: u64,
    step: u64,
    best: u64,
    best_weight: u64,
    best_active: u64,
}

/// One candidate of `least_loaded`: the i-th member from `first`, `step` apart.
extern "C" fn scan_member(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `least_loaded` passes its own Scan.
    let s = unsafe { &mut *ctx.cast::<Scan>() };
    if s.n == 0 {
        return 1;
    }
    let member = strategy::scan_member(s.first as u32, s.step as u32, i as u32, s.n as u32);
    // Regions start at an element, and a member is one element.
    let word = s.offset as u32 + member * MEMBER_STRIDE;
    let Some(words) = MAGLEV_POOL.get(word / POOL_LANES) else {
        return 1;
    };
    let (slot, weight, cap) = strategy::member_of(words);
    let a = active(slot);
    if strategy::under_cap(a, cap)
        && (s.best == u64::from(NONE_UNDER_CAP)
            || strategy::less_loaded(a, weight, s.best_active, s.best_weight as u32))
    {
        s.best = u64::from(member * MEMBER_STRIDE);
        s.best_active = a;
        s.best_weight = u64::from(weight);
    }
    0
}

/// Whether this CPU is past its budget of remembered new flows for the current window
/// (`DataPlaneConfig::flood_limit`). Past it, a flood of new flows (each one a fresh tuple)
/// would only evict live flows from the LRU: Maglev sends them to the same backend without an
/// entry, and a table change in between is what second chance is for. Katran's guard, per CPU.
#[inline(always)]
fn flooded(now_ns: u64) -> bool {
    let limit = match DP_CONFIG.get(0) {
        Some(c) if c.flood_limit != 0 => u64::from(c.flood_limit),
        _ => return false,
    };
    let Some(w) = FLOOD.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a per-CPU slot; nothing else on this CPU touches it meanwhile.
    let w = unsafe { &mut *w };
    if now_ns.wrapping_sub(w.start_ns) >= FLOOD_WINDOW_NS {
        w.start_ns = now_ns;
        w.count = 0;
    }
    w.count += 1;
    w.count > limit
}

/// Candidates after the first that a shed flow may spill to.
const SPILL_TRIES: u32 = 3;

/// Whether a SYN's flow is pinned, freshly, to this backend: the client's retransmit (counted
/// for passive health).
#[inline(always)]
fn retransmit(key: &FlowKey, slot: u32, generation: u32, now: u16) -> bool {
    let Some(old) = EMBRYONIC.get_ptr(key) else {
        return false;
    };
    // SAFETY: a pointer from a successful lookup; plain data.
    let old = unsafe { &*old };
    let fresh = old.backend == slot
        && old.generation == generation
        && now.wrapping_sub(old.opened) <= SYN_RETRANSMIT_WINDOW;
    if fresh {
        crate::stats::syn_retransmit(slot);
        // A SYN was counted a miss before its pick (`service_pick`): it is a retransmit.
        crate::stats::recount(Counter::ConntrackMiss, Counter::SynRetransmit);
    }
    fresh
}

/// Takes one new flow from a bucket; false when its window is full. Racy by design: two CPUs
/// may both reset a window at its turn, or count at once and lose one of the two adds (the BPF
/// target has no atomic add in Rust), so a limit may let a few more through, never fewer.
#[inline(always)]
fn take(index: u32, now_ns: u64) -> bool {
    let Some(b) = SHED.get_ptr_mut(index) else {
        return true;
    };
    // SAFETY: a pointer into an array slot; plain data, updated by every CPU.
    let b = unsafe { &mut *b };
    if b.limit == 0 {
        return true;
    }
    if now_ns.wrapping_sub(b.window_start) >= u64::from(b.window_ms) * 1_000_000 {
        b.window_start = now_ns;
        b.count = 0;
    }
    if b.count >= u64::from(b.limit) {
        return false;
    }
    b.count += 1;
    true
}
