//! NAT, for backends that cannot be changed: requests are rewritten to the backend's address
//! and port (and with SNAT, from the balancer's NAT address and a port of its range); replies
//! come back through the balancer, on whichever interface faces the backends, and are rewritten
//! to come from the VIP. Both directions of a connection have an entry in NAT_FLOWS (see
//! `lb_common::nat`); the daemon expires them.
//!
//! Only a TCP SYN or a UDP datagram opens a connection (as IPVS does): anything else without
//! an entry is a counted drop, so stray segments cannot fill the table. `select::choose` finds
//! a packet's entry (the VIP filter's NAT bits keep other traffic away from the table).

use aya_ebpf::{bindings::BPF_NOEXIST, programs::XdpContext};
use lb_common::{
    Backend, Counter, FAMILY_V4, FlowKey, NatEntry, PROTO_TCP, addr_words,
    hash::flow_hash,
    nat::{
        NAT_F_ANSWERED, NAT_F_COUNTED, NAT_F_COUNTS, NAT_F_ESTABLISHED, NAT_F_FIN_BACKEND, NAT_F_FIN_CLIENT,
        NAT_F_REPLY, NAT_F_RST, NAT_F_SNAT, NAT_PORT_PROBES, NAT_SOURCE_WINDOW_NS, NAT_TOUCH_NS,
        SourceWindow, snat_port,
    },
};
use lb_ebpf::{Flow, FlowKind, Frame, Verdict};

use crate::{
    headers::{copy_mac, csum_apply, half_delta, word_delta},
    maps::{BACKENDS, DP_CONFIG, NAT_FLOWS, NAT_SCRATCH, NAT_SOURCES, NatScratch, active_add, backend_of},
    stats::{count, finish, traffic},
    tx::{frame_of, send},
};

const EEXIST: i32 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// A packet of a NAT connection, with its entry: translated and sent on; returns the counted
/// XDP action. `backend` is the request's backend when the caller has already checked it. A
/// stage of its own (see `stats::finish`).
#[inline(never)]
pub fn translate(ctx: &XdpContext, flow: &Flow, entry: *mut NatEntry, backend: Option<&Backend>) -> u32 {
    finish(translate_verdict(ctx, flow, entry, backend))
}

#[inline(always)]
fn translate_verdict(
    ctx: &XdpContext,
    flow: &Flow,
    entry: *mut NatEntry,
    backend: Option<&Backend>,
) -> Verdict {
    let frame = &frame_of(ctx);
    let key = &flow.key;
    // SAFETY: a pointer from a successful lookup; plain data. Concurrent writers only store
    // whole fields (the timestamp, flag bits), which a torn read at worst sees one update late.
    let e = unsafe { &mut *entry };
    let len = frame.len() as u64;
    if flow.kind == FlowKind::IcmpError {
        return error(ctx, frame, flow, e, backend);
    }
    let flags = tcp_flags(frame, flow);
    let now = crate::clock::now_ns();
    if now.wrapping_sub(e.last_seen_ns) > NAT_TOUCH_NS {
        e.last_seen_ns = now;
    }
    if e.flags & NAT_F_REPLY != 0 {
        // The backend's first answer marks both entries answered (the forward one tells a
        // client's SYN retransmit from a reopened tuple); a RST as that answer is a refusal,
        // counted for passive health.
        let first = e.flags & NAT_F_ANSWERED == 0;
        if first {
            e.flags |= NAT_F_ANSWERED;
            if flags & TCP_RST != 0 {
                crate::stats::refused(e.backend);
            }
        }
        let state = tcp_state(flags, NAT_F_FIN_BACKEND) | if first { NAT_F_ANSWERED } else { 0 };
        // A SYN-ACK (the first or a retransmit, or a reopened tuple's) names the ACK that
        // completes the handshake.
        let syn_ack = flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK);
        if (state != 0 || syn_ack)
            && let Some(fwd) = NAT_FLOWS.get_ptr_mut(&e.twin_key(key.family, key.proto))
        {
            // SAFETY: as above.
            let fwd = unsafe { &mut *fwd };
            if syn_ack && let Some(seq) = tcp_word(frame, flow, 4) {
                // A whole 4-byte store beside the flags' atomics, which keep this half.
                fwd.ack_expect = seq.wrapping_add(1);
            }
            if state != 0 {
                settle(fwd, state);
            }
        }
        if rewrite(frame, flow, e).is_none() {
            return Verdict::Drop(Counter::DropTruncatedL4);
        }
        count(Counter::NatReply);
        traffic(e.service, e.backend, len, false);
        return to_client(ctx, frame, e);
    }
    let Some(backend) = backend.or_else(|| backend_of(e)) else {
        return Verdict::Drop(Counter::DropBackendMissing);
    };
    let mut retransmit = false;
    if flags & (TCP_SYN | TCP_ACK) == TCP_SYN && e.flags & NAT_F_ANSWERED == 0 && !e.is_closing() {
        // The client's SYN again, and the backend never answered: a retransmit, counted for
        // passive health (and as a new flow, as the other modes count each SYN they pick).
        retransmit = true;
        crate::stats::syn_retransmit(e.backend);
    } else if flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        // The client opens the same tuple again: the connection lives anew (and counts again),
        // half-open until its new handshake completes.
        e.flags &= !(NAT_F_FIN_CLIENT | NAT_F_FIN_BACKEND | NAT_F_RST | NAT_F_ESTABLISHED);
        if e.flags & NAT_F_COUNTS != 0 && atomic_or(&mut e.flags, NAT_F_COUNTED) & NAT_F_COUNTED == 0 {
            active_add(e.backend, 1);
        }
    } else {
        let state = tcp_state(flags, NAT_F_FIN_CLIENT);
        if state != 0 {
            settle(e, state);
        } else if flags & TCP_ACK != 0
            && e.flags & (NAT_F_ANSWERED | NAT_F_ESTABLISHED) == NAT_F_ANSWERED
            && tcp_word(frame, flow, 8) == Some(e.ack_expect)
        {
            // The client acknowledged the backend's SYN-ACK: the handshake is complete.
            atomic_or(&mut e.flags, NAT_F_ESTABLISHED);
        }
    }
    if rewrite(frame, flow, e).is_none() {
        return Verdict::Drop(Counter::DropTruncatedL4);
    }
    traffic(e.service, e.backend, len, retransmit);
    to_backend(ctx, frame, backend)
}

/// An ICMP error about a NAT connection (fragmentation needed / packet too big, port
/// unreachable), from either side: the outer addresses and the quoted packet are translated
/// as the connection's packets are, and it goes where they go. It keeps no connection alive.
#[inline(always)]
fn error(ctx: &XdpContext, frame: &Frame, flow: &Flow, e: &NatEntry, backend: Option<&Backend>) -> Verdict {
    if rewrite_icmp(frame, flow, e).is_none() {
        return Verdict::Drop(Counter::DropTruncatedL4);
    }
    count(Counter::IcmpErrorForwarded);
    traffic(e.service, e.backend, frame.len() as u64, false);
    if e.flags & NAT_F_REPLY != 0 {
        return to_client(ctx, frame, e);
    }
    match backend.or_else(|| backend_of(e)) {
        Some(b) => to_backend(ctx, frame, b),
        None => Verdict::Drop(Counter::DropBackendMissing),
    }
}

/// What `open` returns when another CPU opened the connection first (it counted nothing): the
/// caller goes on with `translate`, so that frame is not stacked on this one.
pub const RACED: u32 = u32::MAX;

/// `open`'s `how`: full NAT (the source translated too).
pub const OPEN_SNAT: u32 = 1;
/// `open`'s `how`: the service counts active flows; the connection joins its backend's count.
pub const OPEN_COUNT: u32 = 2;

/// A new connection to a NAT service (`how`: OPEN_* bits): makes its pair of entries, then
/// translates the packet to the backend in `slot`; returns the counted XDP action, or RACED. A
/// stage of its own (see `stats::finish`).
#[inline(never)]
pub fn open(ctx: &XdpContext, flow: &Flow, slot: u32, service: u32, how: u32) -> u32 {
    let mut raced = false;
    let verdict = open_verdict(ctx, flow, slot, service, how, &mut raced);
    if raced {
        return RACED;
    }
    finish(verdict)
}

#[inline(always)]
fn open_verdict(
    ctx: &XdpContext,
    flow: &Flow,
    slot: u32,
    service: u32,
    how: u32,
    raced: &mut bool,
) -> Verdict {
    let snat = how & OPEN_SNAT != 0;
    let counts = how & OPEN_COUNT != 0;
    let frame = &frame_of(ctx);
    // Read again from its slot: five arguments are all a call takes.
    let Some(backend) = BACKENDS.get(slot).filter(|b| b.is_active()) else {
        return Verdict::Drop(Counter::DropBackendMissing);
    };
    let key = &flow.key;
    let FlowKind::Transport { syn, .. } = flow.kind else {
        return Verdict::Drop(Counter::DropNatNoEntry);
    };
    if key.proto == PROTO_TCP && !syn {
        return Verdict::Drop(Counter::DropNatNoEntry);
    }
    let (Some(cfg), Some(s), Some(eth)) = (
        DP_CONFIG.get(0),
        NAT_SCRATCH.get_ptr_mut(0),
        frame.ptr_at::<[u8; 12]>(0),
    ) else {
        return Verdict::Drop(Counter::DropNatTableFull);
    };
    let v4 = key.family == FAMILY_V4;
    let now = crate::clock::now_ns();
    let (family, proto) = (key.family, key.proto);
    if cfg.nat_source_limit != 0 && !source_allowed(s, family, &key.src_addr, cfg.nat_source_limit, now) {
        return Verdict::Drop(Counter::DropNatSourceLimit);
    }
    // SAFETY: a per-CPU map value of NatScratch; `eth` is 12 bounds-checked bytes.
    unsafe {
        let fwd = &mut (*s).fwd;
        fwd.last_seen_ns = now;
        fwd.src_addr = key.src_addr;
        fwd.dst_addr = addr_words(backend.addr);
        fwd.src_port = key.src_port;
        fwd.dst_port = backend.port;
        fwd.backend = slot;
        fwd.generation = backend.generation;
        fwd.service = service;
        fwd.ifindex = 0;
        fwd.dst_mac = [0; 6];
        fwd.src_mac = [0; 6];
        fwd.flags = 0;
        let rev = &mut (*s).rev;
        rev.last_seen_ns = now;
        rev.src_addr = key.dst_addr;
        rev.dst_addr = key.src_addr;
        rev.src_port = key.dst_port;
        rev.dst_port = key.src_port;
        rev.backend = slot;
        rev.generation = backend.generation;
        rev.service = service;
        // Replies leave where the client's packets came in, to the MAC they came from.
        rev.ifindex = ctx.ingress_ifindex() as u32;
        let m = eth.read_unaligned();
        rev.dst_mac = [m[6], m[7], m[8], m[9], m[10], m[11]];
        rev.src_mac = [m[0], m[1], m[2], m[3], m[4], m[5]];
        rev.flags = NAT_F_REPLY;
        if snat {
            fwd.src_addr = if v4 { [cfg.nat_src4, 0, 0, 0] } else { cfg.nat_src6 };
            fwd.flags = NAT_F_SNAT;
            rev.flags = NAT_F_REPLY | NAT_F_SNAT;
        }
        if counts {
            fwd.flags |= NAT_F_COUNTS | NAT_F_COUNTED;
        }
    }
    let placed = if snat {
        place_snat(
            s,
            family,
            proto,
            flow_hash(key),
            cfg.nat_port_first,
            cfg.nat_port_count,
        )
    } else {
        // SAFETY: as above.
        unsafe {
            (*s).rev_key = (*s).fwd.twin_key(family, proto);
            place(&(*s).rev_key, &(*s).rev, Counter::DropNatCollision)
        }
    };
    if let Err(verdict) = placed {
        return verdict;
    }
    // SAFETY: as above.
    if let Err(e) = NAT_FLOWS.insert(key, unsafe { &(*s).fwd }, BPF_NOEXIST as u64) {
        let _ = NAT_FLOWS.remove(unsafe { &(*s).rev_key });
        if e != -EEXIST {
            return Verdict::Drop(Counter::DropNatTableFull);
        }
        // Another CPU opened this connection a moment ago: the caller goes with its entries.
        *raced = true;
        return Verdict::Drop(Counter::DropNatCollision);
    }
    count(Counter::NatCreated);
    if counts {
        active_add(slot, 1);
    }
    traffic(service, slot, frame.len() as u64, true);
    // SAFETY: as above.
    if rewrite(frame, flow, unsafe { &(*s).fwd }).is_none() {
        return Verdict::Drop(Counter::DropTruncatedL4);
    }
    to_backend(ctx, frame, backend)
}

/// Whether `src` may open another NAT connection in its current window (`limit` a window),
/// counting it if so. Windows are per source address in an LRU map, so a source that stops
/// is forgotten; counts from two CPUs at once may both pass, which only loosens the limit.
#[inline(always)]
fn source_allowed(s: *mut NatScratch, family: u8, src: &[u32; 4], limit: u32, now: u64) -> bool {
    // SAFETY: `s` is the per-CPU scratch value; a window pointer is from a lookup.
    unsafe {
        (*s).src_key = lb_common::AddrKey::new(family, *src);
        if let Some(w) = NAT_SOURCES.get_ptr_mut(&(*s).src_key) {
            let w = &mut *w;
            if now.wrapping_sub(w.start_ns) >= NAT_SOURCE_WINDOW_NS {
                w.start_ns = now;
                w.count = 1;
                return true;
            }
            if w.count >= limit {
                return false;
            }
            w.count += 1;
            return true;
        }
        (*s).src_window = SourceWindow {
            start_ns: now,
            count: 1,
            _pad: 0,
        };
        // A failed insert only forgets this source's first connection.
        let _ = NAT_SOURCES.insert(&(*s).src_key, &(*s).src_window, 0);
    }
    true
}

/// Inserts the reply entry under the first free source port of the probe sequence.
#[inline(always)]
fn place_snat(
    s: *mut NatScratch,
    family: u8,
    proto: u8,
    hash: u32,
    first: u16,
    count: u32,
) -> Result<(), Verdict> {
    if count == 0 {
        return Err(Verdict::Drop(Counter::DropNatNoPort));
    }
    for probe in 0..NAT_PORT_PROBES {
        // SAFETY: `s` is the per-CPU scratch value.
        unsafe {
            (*s).fwd.src_port = snat_port(hash, probe, first, count).to_be();
            (*s).rev_key = (*s).fwd.twin_key(family, proto);
            match place(&(*s).rev_key, &(*s).rev, Counter::DropNatNoPort) {
                Err(Verdict::Drop(Counter::DropNatNoPort)) => continue,
                other => return other,
            }
        }
    }
    Err(Verdict::Drop(Counter::DropNatNoPort))
}

/// Inserts an entry only if its key is free; `taken` is the verdict when it is not.
#[inline(always)]
fn place(key: &FlowKey, entry: &NatEntry, taken: Counter) -> Result<(), Verdict> {
    match NAT_FLOWS.insert(key, entry, BPF_NOEXIST as u64) {
        Ok(()) => Ok(()),
        Err(e) if e == -EEXIST => Err(Verdict::Drop(taken)),
        Err(_) => Err(Verdict::Drop(Counter::DropNatTableFull)),
    }
}

/// A reply goes out where the client's packets came in, to the MAC they came from.
#[inline(always)]
fn to_client(ctx: &XdpContext, frame: &Frame, reply: &NatEntry) -> Verdict {
    match set_macs(frame, &reply.dst_mac, &reply.src_mac) {
        Some(()) => send(ctx, reply.ifindex),
        None => Verdict::Drop(Counter::DropTruncatedL2),
    }
}

#[inline(always)]
fn to_backend(ctx: &XdpContext, frame: &Frame, backend: &Backend) -> Verdict {
    match set_macs(frame, &backend.dst_mac, &backend.src_mac) {
        Some(()) => send(ctx, backend.ifindex),
        None => Verdict::Drop(Counter::DropTruncatedL2),
    }
}

#[inline(always)]
fn set_macs(frame: &Frame, dst: &[u8; 6], src: &[u8; 6]) -> Option<()> {
    let eth = frame.ptr_at::<[u8; 12]>(0)?;
    // SAFETY: 12 bounds-checked bytes.
    unsafe {
        let p = eth.cast::<u8>();
        copy_mac(p, dst.as_ptr());
        copy_mac(p.add(6), src.as_ptr());
    }
    Some(())
}

/// Sets a forward entry's TCP `state` bits; a counted connection that is now closing leaves
/// its backend's active count, once (whichever CPU clears NAT_F_COUNTED takes it off).
#[inline(always)]
fn settle(fwd: &mut NatEntry, state: u32) {
    let flags = atomic_or(&mut fwd.flags, state) | state;
    if lb_common::nat::closing(flags)
        && flags & NAT_F_COUNTED != 0
        && atomic_and(&mut fwd.flags, !NAT_F_COUNTED) & NAT_F_COUNTED != 0
    {
        active_add(fwd.backend, -1);
    }
}

// `flags` and `ack_expect` are the 8-aligned word at offset 72, `flags` its low half (little
// endian): the atomics work on that word, since BPF has 32-bit fetch atomics only from cpu v3.
const _: () = assert!(core::mem::offset_of!(NatEntry, flags) == 72 && core::mem::align_of::<NatEntry>() == 8);

/// Atomic `|=` on an entry's flags; returns the flags before.
#[inline(always)]
fn atomic_or(flags: &mut u32, bits: u32) -> u32 {
    let word = (flags as *mut u32).cast::<u64>();
    // SAFETY: `flags` starts the 8-aligned word of `flags` and `ack_expect` (asserted above).
    unsafe {
        core::intrinsics::atomic_or::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            word,
            u64::from(bits),
        ) as u32
    }
}

/// Atomic `&=` on an entry's flags; returns the flags before.
#[inline(always)]
fn atomic_and(flags: &mut u32, bits: u32) -> u32 {
    let word = (flags as *mut u32).cast::<u64>();
    // SAFETY: as atomic_or; the high half (`ack_expect`) is kept.
    unsafe {
        core::intrinsics::atomic_and::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            word,
            u64::from(bits) | 0xffff_ffff_0000_0000,
        ) as u32
    }
}

/// The state bits a segment's flags set: `fin` for a FIN from its side, `NAT_F_RST` for a RST.
#[inline(always)]
fn tcp_state(flags: u8, fin: u32) -> u32 {
    let mut state = 0;
    if flags & TCP_FIN != 0 {
        state |= fin;
    }
    if flags & TCP_RST != 0 {
        state |= NAT_F_RST;
    }
    state
}

/// Offset of the TCP/UDP header.
#[inline(always)]
fn l4_offset(frame: &Frame, flow: &Flow) -> Option<usize> {
    if flow.key.family != FAMILY_V4 {
        return Some(flow.l3() + 40);
    }
    let vihl = frame.ptr_at::<u8>(flow.l3())?;
    // SAFETY: one bounds-checked byte.
    Some(flow.l3() + ((unsafe { *vihl } & 0x0f) as usize) * 4)
}

/// The TCP flags byte, or 0 for UDP.
#[inline(always)]
fn tcp_flags(frame: &Frame, flow: &Flow) -> u8 {
    if flow.key.proto != PROTO_TCP {
        return 0;
    }
    l4_offset(frame, flow)
        .and_then(|l4| frame.ptr_at::<[u8; 14]>(l4))
        // SAFETY: bounds-checked.
        .map_or(0, |t| unsafe { (*t)[13] })
}

/// The 32-bit TCP header word at byte `at` (4: sequence, 8: acknowledgement number), host order.
#[inline(always)]
fn tcp_word(frame: &Frame, flow: &Flow, at: usize) -> Option<u32> {
    let t = frame.ptr_at::<[u8; 12]>(l4_offset(frame, flow)?)?;
    // SAFETY: 12 bounds-checked bytes.
    let b = unsafe { *t };
    Some(u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}

/// Translates an ICMP error whose quoted packet is `flow.key` turned around (see
/// `parse::icmp4_error`): the outer destination and the quoted tuple take `to`'s tuple, the
/// outer source takes `to`'s source when the connection's source is translated (SNAT, or a
/// reply leaving as the VIP), else stays (a router on the client's path). The quoted TCP/UDP
/// checksum is left alone, as receivers of errors do not check it; the quoted IPv4 header's,
/// the outer IPv4 header's and the ICMP checksum (with ICMPv6's pseudo-header) are updated.
#[inline(always)]
fn rewrite_icmp(frame: &Frame, flow: &Flow, to: &NatEntry) -> Option<()> {
    let key = &flow.key;
    let l3 = flow.l3();
    let src_changes = key.src_addr != to.src_addr;
    let ports_delta = half_delta(key.dst_port, to.dst_port) + half_delta(key.src_port, to.src_port);
    // SAFETY: every pointer below is inside a bounds-checked header.
    unsafe {
        if key.family == FAMILY_V4 {
            let ip = frame.ptr_at::<[u8; 20]>(l3)?.cast::<u8>();
            let icmp_at = l3 + ((*ip & 0x0f) as usize) * 4;
            let icmp = frame.ptr_at::<[u8; 8]>(icmp_at)?.cast::<u8>();
            let inner = frame.ptr_at::<[u8; 20]>(icmp_at + 8)?.cast::<u8>();
            let ports = frame
                .ptr_at::<[u8; 4]>(icmp_at + 8 + ((*inner & 0x0f) as usize) * 4)?
                .cast::<u8>();
            let mut outer = word_delta(key.dst_addr[0], to.dst_addr[0]);
            (ip.add(16) as *mut u32).write_unaligned(to.dst_addr[0]);
            if src_changes {
                outer += word_delta((ip.add(12) as *const u32).read_unaligned(), to.src_addr[0]);
                (ip.add(12) as *mut u32).write_unaligned(to.src_addr[0]);
            }
            csum_apply(ip.add(10), outer);
            let quoted =
                word_delta(key.dst_addr[0], to.dst_addr[0]) + word_delta(key.src_addr[0], to.src_addr[0]);
            (inner.add(12) as *mut u32).write_unaligned(to.dst_addr[0]);
            (inner.add(16) as *mut u32).write_unaligned(to.src_addr[0]);
            let old_sum = (inner.add(10) as *const u16).read_unaligned();
            let new_sum = csum_apply(inner.add(10), quoted);
            (ports as *mut u16).write_unaligned(to.dst_port);
            (ports.add(2) as *mut u16).write_unaligned(to.src_port);
            csum_apply(icmp.add(2), quoted + half_delta(old_sum, new_sum) + ports_delta);
        } else {
            let ip = frame.ptr_at::<[u8; 40]>(l3)?.cast::<u8>();
            let icmp = frame.ptr_at::<[u8; 8]>(l3 + 40)?.cast::<u8>();
            let inner = frame.ptr_at::<[u8; 40]>(l3 + 48)?.cast::<u8>();
            let ports = frame.ptr_at::<[u8; 4]>(l3 + 88)?.cast::<u8>();
            let mut delta = ports_delta;
            for i in 0..4 {
                let (dst, src) = (to.dst_addr[i], to.src_addr[i]);
                // The pseudo-header's destination, the quoted source and destination.
                delta += word_delta(key.dst_addr[i], dst) * 2 + word_delta(key.src_addr[i], src);
                (ip.add(24 + 4 * i) as *mut u32).write_unaligned(dst);
                (inner.add(8 + 4 * i) as *mut u32).write_unaligned(dst);
                (inner.add(24 + 4 * i) as *mut u32).write_unaligned(src);
                if src_changes {
                    let at = ip.add(8 + 4 * i) as *mut u32;
                    delta += word_delta(at.read_unaligned(), src);
                    at.write_unaligned(src);
                }
            }
            (ports as *mut u16).write_unaligned(to.dst_port);
            (ports.add(2) as *mut u16).write_unaligned(to.src_port);
            csum_apply(icmp.add(2), delta);
        }
    }
    Some(())
}

/// Rewrites addresses and ports to `to`'s, updating the IPv4 header checksum and the TCP/UDP
/// checksum incrementally. A UDP checksum of 0 (none, IPv4) stays 0; a computed 0 is sent as
/// 0xffff, as RFC 768 asks.
#[inline(always)]
fn rewrite(frame: &Frame, flow: &Flow, to: &NatEntry) -> Option<()> {
    let key = &flow.key;
    let l3 = flow.l3();
    let l4 = l4_offset(frame, flow)?;
    let tcp = key.proto == PROTO_TCP;
    // Every header is checked before the first byte changes: a short packet stays as it came.
    if tcp {
        frame.ptr_at::<[u8; 20]>(l4)?;
    } else {
        frame.ptr_at::<[u8; 8]>(l4)?;
    }
    let mut addr = 0u32;
    // SAFETY: every pointer below is inside a bounds-checked header.
    unsafe {
        if key.family == FAMILY_V4 {
            let ip = frame.ptr_at::<[u8; 20]>(l3)?.cast::<u8>();
            addr += word_delta(key.src_addr[0], to.src_addr[0]) + word_delta(key.dst_addr[0], to.dst_addr[0]);
            (ip.add(12) as *mut u32).write_unaligned(to.src_addr[0]);
            (ip.add(16) as *mut u32).write_unaligned(to.dst_addr[0]);
            csum_apply(ip.add(10), addr);
        } else {
            let ip = frame.ptr_at::<[u8; 40]>(l3)?.cast::<u8>();
            for i in 0..4 {
                addr +=
                    word_delta(key.src_addr[i], to.src_addr[i]) + word_delta(key.dst_addr[i], to.dst_addr[i]);
                (ip.add(8 + 4 * i) as *mut u32).write_unaligned(to.src_addr[i]);
                (ip.add(24 + 4 * i) as *mut u32).write_unaligned(to.dst_addr[i]);
            }
        }
        let l4_delta = addr + half_delta(key.src_port, to.src_port) + half_delta(key.dst_port, to.dst_port);
        if tcp {
            let t = frame.ptr_at::<[u8; 20]>(l4)?.cast::<u8>();
            (t as *mut u16).write_unaligned(to.src_port);
            (t.add(2) as *mut u16).write_unaligned(to.dst_port);
            csum_apply(t.add(16), l4_delta);
        } else {
            let u = frame.ptr_at::<[u8; 8]>(l4)?.cast::<u8>();
            (u as *mut u16).write_unaligned(to.src_port);
            (u.add(2) as *mut u16).write_unaligned(to.dst_port);
            let at = u.add(6);
            if (at as *const u16).read_unaligned() != 0 && csum_apply(at, l4_delta) == 0 {
                (at as *mut u16).write_unaligned(0xffff);
            }
        }
    }
    Some(())
}
