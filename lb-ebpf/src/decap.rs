//! The backend side of IPIP and GUE: strips the outer headers of packets whose inner destination is one
//! of this host's VIPs and hands the inner packet to the stack, for kernels without (or
//! without loaded) ipip modules. Built as its own object: a backend needs none of the
//! balancer's maps.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{AddrKey, FAMILY_V4, FAMILY_V6};
use lb_ebpf::Frame;

/// Local VIPs (the backend setup command fills it with what it puts on loopback).
#[map]
static DECAP_VIPS: HashMap<AddrKey, u32> = HashMap::pinned(1024, 0);

/// The UDP port GUE arrives on (0: GUE off), set by the backend setup command.
#[map]
static DECAP_GUE_PORT: Array<u32> = Array::pinned(1, 0);

/// The interface's MAC (in the first 6 bytes; all zero: not checked). Only frames addressed to
/// it are ours: on a bridge or hypervisor port, an IPIP packet for another backend (VIPs are
/// shared by all backends) must not be taken.
#[map]
static DECAP_MAC: Array<[u8; 8]> = Array::pinned(1, 0);

/// Per-CPU: [0] decapsulated, [1] IPIP for an address that is not a local VIP (passed as is).
#[map]
static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::pinned(2, 0);

const ETH_P_IPV4: u16 = 0x0800u16.to_be();
const ETH_P_IPV6: u16 = 0x86DDu16.to_be();
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const IPPROTO_UDP: u8 = 17;
/// UDP header and GUE header.
const GUE_LEN: usize = 12;

#[xdp]
pub fn decap(ctx: XdpContext) -> u32 {
    let frame = Frame::new(ctx.data(), ctx.data_end());
    let Some(eth) = frame.ptr_at::<[u8; 14]>(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: bounds checked by ptr_at.
    let (ethertype, dst_mac) = unsafe {
        let e = eth.cast::<u8>();
        (
            (e.add(12) as *const u16).read_unaligned(),
            (e as *const [u8; 6]).read_unaligned(),
        )
    };
    if let Some(mine) = DECAP_MAC.get(0)
        && mine[..6] != [0; 6]
        && mine[..6] != dst_mac
    {
        return xdp_action::XDP_PASS;
    }
    let (outer_len, family) = if ethertype == ETH_P_IPV4 {
        let Some(ip) = frame.ptr_at::<[u8; 20]>(14) else {
            return xdp_action::XDP_PASS;
        };
        let ip = ip.cast::<u8>();
        // SAFETY: 20 bytes bounds-checked. Only option-less outer headers, as the balancer
        // writes them; anything else is the stack's business.
        let (vihl, proto, frags) = unsafe { (*ip, *ip.add(9), u16::from_be_bytes([*ip.add(6), *ip.add(7)])) };
        // An outer fragment holds no whole inner packet: the stack's business.
        if vihl != 0x45 || frags & 0x3fff != 0 {
            return xdp_action::XDP_PASS;
        }
        match proto {
            IPPROTO_IPIP => (20usize, FAMILY_V4),
            IPPROTO_UDP if is_gue(&frame, 14 + 20, IPPROTO_IPIP) => (20 + GUE_LEN, FAMILY_V4),
            _ => return xdp_action::XDP_PASS,
        }
    } else if ethertype == ETH_P_IPV6 {
        let Some(ip) = frame.ptr_at::<[u8; 40]>(14) else {
            return xdp_action::XDP_PASS;
        };
        // SAFETY: 40 bytes bounds-checked.
        match unsafe { *ip.cast::<u8>().add(6) } {
            IPPROTO_IPV6 => (40usize, FAMILY_V6),
            IPPROTO_UDP if is_gue(&frame, 14 + 40, IPPROTO_IPV6) => (40 + GUE_LEN, FAMILY_V6),
            _ => return xdp_action::XDP_PASS,
        }
    } else {
        return xdp_action::XDP_PASS;
    };
    // The inner destination must be a local VIP.
    let key = if family == FAMILY_V4 {
        let Some(inner) = frame.ptr_at::<[u8; 20]>(14 + outer_len) else {
            return xdp_action::XDP_PASS;
        };
        // SAFETY: 20 bytes bounds-checked; the destination is at 16.
        let dst = unsafe { (inner.cast::<u8>().add(16) as *const u32).read_unaligned() };
        AddrKey::new(FAMILY_V4, [dst, 0, 0, 0])
    } else {
        let Some(inner) = frame.ptr_at::<[u8; 40]>(14 + outer_len) else {
            return xdp_action::XDP_PASS;
        };
        let d = inner.cast::<u8>();
        // SAFETY: 40 bytes bounds-checked; the destination is at 24.
        let w = |i: usize| unsafe { (d.add(24 + 4 * i) as *const u32).read_unaligned() };
        AddrKey::new(FAMILY_V6, [w(0), w(1), w(2), w(3)])
    };
    // SAFETY: plain lookup; the value is not read.
    if unsafe { DECAP_VIPS.get(&key) }.is_none() {
        count(1);
        return xdp_action::XDP_PASS;
    }
    // Move the Ethernet addresses forward over the outer header, then drop it.
    // SAFETY: 14 + outer_len bytes were bounds-checked above.
    unsafe {
        let base = eth.cast::<u8>();
        let mut macs = [0u8; 12];
        core::ptr::copy_nonoverlapping(base, macs.as_mut_ptr(), 12);
        let to = base.add(outer_len);
        core::ptr::copy_nonoverlapping(macs.as_ptr(), to, 12);
        (to.add(12) as *mut u16).write_unaligned(ethertype);
    }
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return xdp_action::XDP_DROP;
    }
    count(0);
    xdp_action::XDP_PASS
}

/// UDP to the configured GUE port carrying a version-0, option-less GUE header for `inner`.
#[inline(always)]
fn is_gue(frame: &Frame, udp_at: usize, inner: u8) -> bool {
    let Some(port) = DECAP_GUE_PORT.get(0) else {
        return false;
    };
    let Some(h) = frame.ptr_at::<[u8; GUE_LEN]>(udp_at) else {
        return false;
    };
    // SAFETY: 12 bytes bounds-checked: UDP header, then the GUE header.
    let (dport, gue0, gue_proto) = unsafe {
        let h = h.cast::<u8>();
        (u16::from_be_bytes([*h.add(2), *h.add(3)]), *h.add(8), *h.add(9))
    };
    *port != 0 && dport as u32 == *port && gue0 == 0 && gue_proto == inner
}

#[inline(always)]
fn count(i: u32) {
    if let Some(c) = DECAP_STATS.get_ptr_mut(i) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
