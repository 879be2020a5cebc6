//! IPIP encapsulation: the packet, as the client sent it, inside an outer IPv4 (IPv6) header
//! addressed to the backend. The next hop comes from the kernel's FIB (bpf_fib_lookup), never
//! from configuration: no route passes the packet untouched, an unresolved neighbour passes it
//! encapsulated so the kernel resolves it. Each CPU caches a backend's next hop (egress, MACs,
//! route MTU): two FIB lookups per packet would cost more than the rest. A cached hop holds
//! until the daemon bumps `hop_epoch` (it does on the kernel's route, neighbour, address and
//! link notifications, at most every 100 ms) or for NEXT_HOP_USES packets, with no clock read
//! per packet.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{
    Backend, Counter, FAMILY_V4, addr_words,
    dpconfig::{DP_F_TOO_BIG_ICMP, HOP_F_RESOLVED, NextHop, encap_variation},
};
use lb_ebpf::{Flow, FlowKind, Frame, Verdict};

use super::too_big;
use crate::{
    headers::{IPV4_DF, TTL, write_eth, write_ipv4},
    maps::{DP_CONFIG, FIB_SCRATCH, HOP_SCRATCH, NEXT_HOPS},
    stats::finish,
    tx::{frame_of, send},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const IPPROTO_UDP: u8 = 17;

/// Packets a CPU sends by a cached next hop before asking the FIB again, whatever the epoch:
/// the bound on a change the daemon does not report (it is stopped, or lost a notification).
/// Two FIB lookups per this many packets cost well under a nanosecond each.
const NEXT_HOP_USES: u32 = 4096;

/// Bytes of UDP + GUE header (version 0, no options) in front of the inner packet.
const GUE_LEN: usize = 12;

/// Encapsulates the packet for the backend in `slot` (IPIP, or with `gue` IP/UDP/GUE); returns
/// the counted XDP action. A stage of its own (see `stats::finish`).
#[inline(never)]
pub fn encapsulate(ctx: &XdpContext, flow: &Flow, slot: u32, backend: &Backend, gue: bool) -> u32 {
    finish(encapsulate_verdict(ctx, flow, slot, backend, gue))
}

#[inline(always)]
fn encapsulate_verdict(ctx: &XdpContext, flow: &Flow, slot: u32, backend: &Backend, gue: bool) -> Verdict {
    let frame = &frame_of(ctx);
    let Some(cfg) = DP_CONFIG.get(0) else {
        return Verdict::Pass(Counter::PassNoRoute);
    };
    let key = &flow.key;
    // The inner packet's own length: a short frame may carry Ethernet padding after it.
    let inner_len = inner_length(frame, flow).unwrap_or(frame.len() - flow.l3());
    let variation = encap_variation(key.src_addr[0], key.src_port);
    let dst = addr_words(backend.addr);
    let v4 = key.family == FAMILY_V4;
    let ip_len = if v4 { 20 } else { 40 };
    let outer_len = if gue { ip_len + GUE_LEN } else { ip_len };
    let gue_port = cfg.gue_port;
    // Wire bytes [prefix, prefix, variation (big-endian)].
    let v = (variation as u16).to_be_bytes();
    let src4 =
        (cfg.encap_src4 & u32::from_ne_bytes([0xff, 0xff, 0, 0])) | u32::from_ne_bytes([0, 0, v[0], v[1]]);
    let src6 = [
        cfg.encap_src6[0],
        cfg.encap_src6[1],
        cfg.encap_src6[2],
        (variation as u32).to_be(),
    ];
    let hop = match next_hop(ctx, slot, backend, cfg.hop_epoch, v4, src4, &src6, &dst) {
        // SAFETY: a per-CPU map value; nothing else on this CPU touches it meanwhile.
        Ok(hop) => unsafe { &mut *hop },
        Err(verdict) => return verdict,
    };
    if (inner_len + outer_len) as u32 > hop.mtu {
        // Never an ICMP error about an ICMP error (RFC 1122, RFC 4443 2.4(e)).
        if cfg.flags & DP_F_TOO_BIG_ICMP != 0 && flow.kind != FlowKind::IcmpError {
            return too_big::answer(ctx, flow, hop.mtu.saturating_sub(outer_len as u32));
        }
        return Verdict::Drop(Counter::DropEncapTooBig);
    }
    let resolved = hop.flags & HOP_F_RESOLVED != 0;
    // Unresolved next hop: the kernel forwards the packet and resolves the neighbour, but only
    // accepts a frame addressed to this host, so it keeps the MACs it arrived with.
    if !resolved {
        let Some(eth) = frame.ptr_at::<[u8; 12]>(0) else {
            return Verdict::Drop(Counter::DropTruncatedL2);
        };
        // SAFETY: bounds checked by ptr_at; `hop` is not a cache slot (unresolved).
        unsafe {
            let m = eth.cast::<u8>();
            core::ptr::copy_nonoverlapping(m, hop.dmac.as_mut_ptr(), 6);
            core::ptr::copy_nonoverlapping(m.add(6), hop.smac.as_mut_ptr(), 6);
        }
    }
    // Grow the head so that [Ethernet][outer][inner IP...] fits; any VLAN tag is dropped, the
    // egress is decided by the FIB.
    let delta = flow.l3() as i32 - (14 + outer_len as i32);
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return Verdict::Drop(Counter::DropEncapFailed);
    }
    let out = Frame::new(ctx.data(), ctx.data_end());
    let inner = inner_len as u16;
    // Each shape is bounds-checked with its own size: Ethernet, the outer headers, and the inner
    // header's first two bytes (for its TOS / traffic class).
    let written = match (v4, gue) {
        (true, false) => out.ptr_at::<[u8; 14 + 20 + 2]>(0).map(|h| {
            // SAFETY: 36 bytes bounds-checked.
            unsafe { write_v4(h.cast(), hop, 20, IPPROTO_IPIP, inner, src4, dst[0]) }
        }),
        (true, true) => out.ptr_at::<[u8; 14 + 32 + 2]>(0).map(|h| {
            // SAFETY: 48 bytes bounds-checked.
            unsafe {
                let h = h.cast::<u8>();
                write_v4(h, hop, 32, IPPROTO_UDP, inner, src4, dst[0]);
                write_gue(h.add(34), variation, gue_port, inner, IPPROTO_IPIP);
            }
        }),
        (false, false) => out.ptr_at::<[u8; 14 + 40 + 2]>(0).map(|h| {
            // SAFETY: 56 bytes bounds-checked.
            unsafe { write_v6(h.cast(), hop, 40, IPPROTO_IPV6, inner, variation, &src6, &dst) }
        }),
        (false, true) => out.ptr_at::<[u8; 14 + 52 + 2]>(0).map(|h| {
            // SAFETY: 68 bytes bounds-checked.
            unsafe {
                let h = h.cast::<u8>();
                write_v6(h, hop, 52, IPPROTO_UDP, inner, variation, &src6, &dst);
                write_gue(h.add(54), variation, gue_port, inner, IPPROTO_IPV6);
            }
        }),
    };
    if written.is_none() {
        return Verdict::Drop(Counter::DropEncapFailed);
    }
    if !resolved {
        return Verdict::Pass(Counter::PassEncapNoNeigh);
    }
    send(ctx, hop.ifindex)
}

/// The IP packet's length from its header (IPv4 total length, IPv6 header + payload length),
/// capped by what the frame holds.
#[inline(always)]
fn inner_length(frame: &Frame, flow: &Flow) -> Option<usize> {
    let ip = frame.ptr_at::<[u8; 6]>(flow.l3())?.cast::<u8>();
    // SAFETY: 6 bytes bounds-checked.
    let len = unsafe {
        if flow.key.family == FAMILY_V4 {
            u16::from_be_bytes([*ip.add(2), *ip.add(3)]) as usize
        } else {
            40 + u16::from_be_bytes([*ip.add(4), *ip.add(5)]) as usize
        }
    };
    Some(len.min(frame.len() - flow.l3()))
}

/// The backend's next hop from this CPU's cache (learnt in this `epoch`, for this backend
/// generation, with uses left), or from the FIB (and then cached). An unresolved neighbour is
/// not cached: the kernel is resolving it and the next packet asks again.
///
/// The answer stays in map memory (the cache slot, or this CPU's HOP_SCRATCH for an unresolved
/// one) and is used through the pointer: as a value, its MAC bytes took a stack slot each.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn next_hop(
    ctx: &XdpContext,
    slot: u32,
    backend: &Backend,
    epoch: u32,
    v4: bool,
    src4: u32,
    src6: &[u32; 4],
    dst: &[u32; 4],
) -> Result<*mut NextHop, Verdict> {
    let cached = NEXT_HOPS.get_ptr_mut(slot);
    if let Some(c) = cached
        // SAFETY: per-CPU slot, only this CPU touches it.
        && unsafe { (*c).uses != 0 && (*c).epoch == epoch && (*c).generation == backend.generation }
    {
        // SAFETY: as above.
        unsafe { (*c).uses -= 1 };
        return Ok(c);
    }
    let no_route = Verdict::Pass(Counter::PassNoRoute);
    let mut fib = FibQuery::new(ctx, v4, src4, src6, dst).ok_or(no_route)?;
    let resolved = match fib.lookup(ctx) {
        BPF_FIB_LKUP_RET_SUCCESS => true,
        BPF_FIB_LKUP_RET_NO_NEIGH => false,
        _ => return Err(no_route),
    };
    let hop = match cached {
        Some(c) if resolved => c,
        _ => HOP_SCRATCH.get_ptr_mut(0).ok_or(no_route)?,
    };
    // SAFETY: a per-CPU slot of either map, only this CPU touches it. Until uses is written
    // below, a cache slot being refilled is not usable.
    unsafe {
        (*hop).uses = 0;
        fib.result_into(&mut *hop);
        (*hop).generation = backend.generation;
        (*hop).flags = if resolved { HOP_F_RESOLVED } else { 0 };
    }
    // The route's MTU: ask for the largest packet, the FIB answers with the limit (before it
    // looks at the neighbour, so unresolved next hops get it too).
    let mut probe = FibQuery::new(ctx, v4, src4, src6, dst).ok_or(no_route)?;
    probe.set_tot_len(u16::MAX);
    let mtu = match probe.lookup(ctx) {
        BPF_FIB_LKUP_RET_FRAG_NEEDED => probe.mtu_result() as u32,
        _ => u16::MAX as u32,
    };
    // SAFETY: as above.
    unsafe {
        (*hop).mtu = mtu;
        (*hop).epoch = epoch;
        (*hop).uses = NEXT_HOP_USES;
    }
    Ok(hop)
}

/// A `bpf_fib_lookup` in this CPU's scratch slot (FIB_SCRATCH): 64 bytes is too much for the
/// 512-byte stack next to the rest, and on the stack LLVM (told it may access memory misaligned,
/// for packet headers) would merge neighbouring fields into misaligned accesses the verifier
/// rejects there. Fields are written and read one at a time at their uapi offsets.
struct FibQuery {
    buf: *mut u8,
}
const _: () = assert!(core::mem::size_of::<bpf_fib_lookup>() == 64);

impl FibQuery {
    /// A query for the outer packet as received on the ingress interface, without MTU check.
    #[inline(always)]
    fn new(ctx: &XdpContext, v4: bool, src4: u32, src6: &[u32; 4], dst: &[u32; 4]) -> Option<Self> {
        let scratch = FIB_SCRATCH.get_ptr_mut(0)?;
        let q = Self {
            buf: scratch.cast::<u8>(),
        };
        let p = q.buf;
        // SAFETY: offsets within this CPU's 64-byte slot (the layout of struct bpf_fib_lookup
        // in the kernel's uapi); nothing else runs on this CPU meanwhile.
        unsafe {
            // Word by word: as one array, the zeros were built on the stack first (64 bytes).
            for i in 0..8 {
                scratch.cast::<u64>().add(i).write_volatile(0);
            }
            p.write_volatile(if v4 { AF_INET } else { AF_INET6 });
            p.add(1)
                .write_volatile(if v4 { IPPROTO_IPIP } else { IPPROTO_IPV6 });
            (p.add(8) as *mut u32).write_volatile(ctx.ingress_ifindex() as u32);
            let s = p.add(16) as *mut u32;
            let d = p.add(32) as *mut u32;
            if v4 {
                s.write_volatile(src4);
                d.write_volatile(dst[0]);
            } else {
                for i in 0..4 {
                    s.add(i).write_volatile(src6[i]);
                    d.add(i).write_volatile(dst[i]);
                }
            }
        }
        Some(q)
    }

    #[inline(always)]
    fn set_tot_len(&mut self, len: u16) {
        // SAFETY: tot_len is the u16 at offset 6.
        unsafe { (self.buf.add(6) as *mut u16).write_volatile(len) };
    }

    #[inline(always)]
    fn mtu_result(&self) -> u16 {
        // SAFETY: mtu_result shares offset 6 with tot_len.
        unsafe { (self.buf.add(6) as *const u16).read_volatile() }
    }

    #[inline(always)]
    fn lookup(&mut self, ctx: &XdpContext) -> u32 {
        // SAFETY: helper call with a buffer of the size we pass.
        let rc = unsafe {
            fib_lookup(
                ctx.ctx.cast(),
                self.buf.cast::<bpf_fib_lookup>(),
                core::mem::size_of::<bpf_fib_lookup>() as i32,
                0,
            )
        };
        if rc < 0 { u32::MAX } else { rc as u32 }
    }

    /// Egress ifindex, next hop MAC and egress MAC after a successful lookup, into `hop`.
    #[inline(always)]
    fn result_into(&self, hop: &mut NextHop) {
        let p = self.buf;
        // SAFETY: ifindex at 8, smac at 52, dmac at 58, all within the buffer.
        unsafe {
            for i in 0..6 {
                hop.smac[i] = p.add(52 + i).read_volatile();
                hop.dmac[i] = p.add(58 + i).read_volatile();
            }
            hop.ifindex = (p.add(8) as *const u32).read_volatile();
        }
    }
}

/// Ethernet and the outer IPv4 header; `outer_len` is every outer byte after Ethernet.
///
/// # Safety
/// `p` must hold 14 + `outer_len` + 2 bytes (the inner header's TOS is read from there).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn write_v4(p: *mut u8, hop: &NextHop, outer_len: usize, proto: u8, inner: u16, src: u32, dst: u32) {
    // SAFETY: the caller's contract.
    unsafe {
        write_eth(p, hop.dmac.as_ptr(), hop.smac.as_ptr(), 0x0800);
        let tos = *p.add(14 + outer_len + 1);
        // DF: the backend's decapsulator cannot reassemble outer fragments; a path narrower than
        // the route MTU must say so instead of fragmenting.
        write_ipv4(p.add(14), tos, proto, inner + outer_len as u16, IPV4_DF, src, dst);
    }
}

/// Ethernet and the outer IPv6 header.
///
/// # Safety
/// `p` must hold 14 + `outer_len` + 2 bytes.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn write_v6(
    p: *mut u8,
    hop: &NextHop,
    outer_len: usize,
    next: u8,
    inner: u16,
    label: u32,
    src: &[u32; 4],
    dst: &[u32; 4],
) {
    // SAFETY: the caller's contract.
    unsafe {
        write_eth(p, hop.dmac.as_ptr(), hop.smac.as_ptr(), 0x86dd);
        // Traffic class from the inner header; the flow label carries the variation too.
        let at = 14 + outer_len;
        let tc = (*p.add(at) & 0x0f) << 4 | *p.add(at + 1) >> 4;
        let payload = inner + (outer_len - 40) as u16;
        write_ipv6(p.add(14), tc, next, label, payload, src, dst);
    }
}

/// UDP (source port from the flow, so receivers spread flows; checksum 0: the inner packet
/// carries its own) and a GUE header (version 0, no options, the inner protocol).
///
/// # Safety
/// `p` must hold 12 bytes.
#[inline(always)]
unsafe fn write_gue(p: *mut u8, variation: u32, port: u16, inner: u16, proto: u8) {
    let sport = 0xc000 | (variation as u16 & 0x3fff);
    // SAFETY: the caller's contract.
    unsafe {
        let u = p as *mut u16;
        u.write_unaligned(sport.to_be());
        u.add(1).write_unaligned(port.to_be());
        u.add(2).write_unaligned((inner + GUE_LEN as u16).to_be());
        u.add(3).write_unaligned(0);
        (p.add(8) as *mut u32).write_unaligned(u32::from_ne_bytes([0, proto, 0, 0]));
    }
}

#[inline(always)]
unsafe fn write_ipv6(
    p: *mut u8,
    tc: u8,
    next: u8,
    label: u32,
    payload_len: u16,
    src: &[u32; 4],
    dst: &[u32; 4],
) {
    let first = 6u32 << 28 | (tc as u32) << 20 | (label & 0xf_ffff);
    // SAFETY: the caller checked 40 bytes at p.
    unsafe {
        (p as *mut u32).write_unaligned(first.to_be());
        (p.add(4) as *mut u16).write_unaligned(payload_len.to_be());
        *p.add(6) = next;
        *p.add(7) = TTL;
        let s = p.add(8) as *mut u32;
        let d = p.add(24) as *mut u32;
        for i in 0..4 {
            s.add(i).write_unaligned(src[i]);
            d.add(i).write_unaligned(dst[i]);
        }
    }
}
