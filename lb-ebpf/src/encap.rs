//! IPIP encapsulation: the packet, as the client sent it, inside an outer IPv4 (IPv6) header
//! addressed to the backend. The next hop comes from the kernel's FIB (bpf_fib_lookup), never
//! from configuration: no route passes the packet untouched, an unresolved neighbour passes it
//! encapsulated so the kernel resolves it.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{Backend, Counter, FAMILY_V4, addr_words, dpconfig::encap_variation};
use lb_ebpf::{Flow, Frame, Verdict};

use crate::{forward::send, maps::DP_CONFIG};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const OUTER_TTL: u8 = 64;

#[inline(always)]
pub fn ipip(ctx: &XdpContext, frame: &Frame, flow: &Flow, backend: &Backend) -> Verdict {
    let Some(cfg) = DP_CONFIG.get(0) else {
        return Verdict::Pass(Counter::PassNoRoute);
    };
    let key = &flow.key;
    let inner_len = frame.len() - flow.l3;
    let variation = encap_variation(key.src_addr[0], key.src_port);
    let dst = addr_words(backend.addr);
    // SAFETY: a zeroed bpf_fib_lookup is a valid input (all plain integers).
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.ifindex = ctx.ingress_ifindex() as u32;
    let outer_len;
    if key.family == FAMILY_V4 {
        outer_len = 20;
        fib.family = AF_INET;
        fib.l4_protocol = IPPROTO_IPIP;
        fib.__bindgen_anon_1.tot_len = (inner_len + outer_len) as u16;
        // Wire bytes [prefix, prefix, variation (big-endian)].
        let v = (variation as u16).to_be_bytes();
        fib.__bindgen_anon_3.ipv4_src = (cfg.encap_src4 & u32::from_ne_bytes([0xff, 0xff, 0, 0]))
            | u32::from_ne_bytes([0, 0, v[0], v[1]]);
        fib.__bindgen_anon_4.ipv4_dst = dst[0];
    } else {
        outer_len = 40;
        fib.family = AF_INET6;
        fib.l4_protocol = IPPROTO_IPV6;
        fib.__bindgen_anon_1.tot_len = (inner_len + outer_len) as u16;
        let src = [
            cfg.encap_src6[0],
            cfg.encap_src6[1],
            cfg.encap_src6[2],
            (variation as u32).to_be(),
        ];
        // Word by word with volatile stores: LLVM (built to allow misaligned access) would
        // otherwise merge pairs into 8-byte stores at 4-byte stack offsets, which the verifier
        // rejects.
        // SAFETY: writes within the union fields of a local struct.
        unsafe {
            let s = fib.__bindgen_anon_3.ipv6_src.as_mut_ptr();
            let d = fib.__bindgen_anon_4.ipv6_dst.as_mut_ptr();
            for i in 0..4 {
                s.add(i).write_volatile(src[i]);
                d.add(i).write_volatile(dst[i]);
            }
        }
    }
    // SAFETY: helper call with a stack struct of the size we pass.
    let rc = unsafe {
        fib_lookup(
            ctx.ctx.cast(),
            &mut fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    let resolved = match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS if rc >= 0 => true,
        BPF_FIB_LKUP_RET_NO_NEIGH => false,
        BPF_FIB_LKUP_RET_FRAG_NEEDED => return Verdict::Drop(Counter::DropEncapTooBig),
        _ => return Verdict::Pass(Counter::PassNoRoute),
    };
    // SAFETY: reading the source union member we wrote above.
    let (src4, src6) = unsafe { (fib.__bindgen_anon_3.ipv4_src, fib.__bindgen_anon_3.ipv6_src) };

    // Unresolved next hop: the kernel forwards the packet and resolves the neighbour, but only
    // accepts a frame addressed to this host, so it keeps the MACs it arrived with.
    if !resolved {
        let Some(eth) = frame.ptr_at::<[u8; 12]>(0) else {
            return Verdict::Drop(Counter::DropTruncatedL2);
        };
        // SAFETY: bounds checked by ptr_at.
        let macs = unsafe { eth.read_unaligned() };
        fib.dmac.copy_from_slice(&macs[..6]);
        fib.smac.copy_from_slice(&macs[6..]);
    }
    // Grow the head so that [Ethernet][outer][inner IP...] fits; any VLAN tag is dropped, the
    // egress is decided by the FIB.
    let delta = flow.l3 as i32 - (14 + outer_len as i32);
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return Verdict::Drop(Counter::DropEncapFailed);
    }
    let out = Frame::new(ctx.data(), ctx.data_end());
    if outer_len == 20 {
        // Ethernet, outer header, and the inner header's first two bytes (for its TOS).
        let Some(hdr) = out.ptr_at::<[u8; 14 + 20 + 2]>(0) else {
            return Verdict::Drop(Counter::DropEncapFailed);
        };
        let hdr = hdr.cast::<u8>();
        // SAFETY: 36 bytes bounds-checked above.
        unsafe {
            write_eth(hdr, &fib, 0x0800);
            let tos = *hdr.add(14 + 20 + 1);
            write_ipv4(hdr.add(14), tos, inner_len as u16 + 20, src4, dst[0]);
        }
    } else {
        let Some(hdr) = out.ptr_at::<[u8; 14 + 40 + 2]>(0) else {
            return Verdict::Drop(Counter::DropEncapFailed);
        };
        let hdr = hdr.cast::<u8>();
        // SAFETY: 56 bytes bounds-checked above.
        unsafe {
            write_eth(hdr, &fib, 0x86dd);
            // Traffic class from the inner header; the flow label carries the variation too.
            let tc = (*hdr.add(54) & 0x0f) << 4 | *hdr.add(55) >> 4;
            write_ipv6(hdr.add(14), tc, variation, inner_len as u16, &src6, &dst);
        }
    }
    if !resolved {
        return Verdict::Pass(Counter::PassEncapNoNeigh);
    }
    send(ctx, fib.ifindex)
}

#[inline(always)]
unsafe fn write_eth(p: *mut u8, fib: &bpf_fib_lookup, ethertype: u16) {
    // SAFETY: the caller checked 14 bytes at p.
    unsafe {
        core::ptr::copy_nonoverlapping(fib.dmac.as_ptr(), p, 6);
        core::ptr::copy_nonoverlapping(fib.smac.as_ptr(), p.add(6), 6);
        (p.add(12) as *mut u16).write_unaligned(ethertype.to_be());
    }
}

#[inline(always)]
unsafe fn write_ipv4(p: *mut u8, tos: u8, total_len: u16, src: u32, dst: u32) {
    let w0 = 0x4500u16 | tos as u16;
    let w4 = (OUTER_TTL as u16) << 8 | IPPROTO_IPIP as u16;
    // Addresses are in wire order; sum their big-endian halves.
    let (s, d) = (u32::from_be(src), u32::from_be(dst));
    let mut sum = w0 as u32 + total_len as u32 + w4 as u32;
    sum += (s >> 16) + (s & 0xffff) + (d >> 16) + (d & 0xffff);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let csum = !(sum as u16);
    // SAFETY: the caller checked 20 bytes at p.
    unsafe {
        let h = p as *mut u16;
        h.write_unaligned(w0.to_be());
        h.add(1).write_unaligned(total_len.to_be());
        h.add(2).write_unaligned(0);
        h.add(3).write_unaligned(0);
        h.add(4).write_unaligned(w4.to_be());
        h.add(5).write_unaligned(csum.to_be());
        (p.add(12) as *mut u32).write_unaligned(src);
        (p.add(16) as *mut u32).write_unaligned(dst);
    }
}

#[inline(always)]
unsafe fn write_ipv6(p: *mut u8, tc: u8, label: u32, payload_len: u16, src: &[u32; 4], dst: &[u32; 4]) {
    let first = 6u32 << 28 | (tc as u32) << 20 | (label & 0xf_ffff);
    // SAFETY: the caller checked 40 bytes at p.
    unsafe {
        (p as *mut u32).write_unaligned(first.to_be());
        (p.add(4) as *mut u16).write_unaligned(payload_len.to_be());
        *p.add(6) = IPPROTO_IPV6;
        *p.add(7) = OUTER_TTL;
        let s = p.add(8) as *mut u32;
        let d = p.add(24) as *mut u32;
        for i in 0..4 {
            s.add(i).write_unaligned(src[i]);
            d.add(i).write_unaligned(dst[i]);
        }
    }
}
