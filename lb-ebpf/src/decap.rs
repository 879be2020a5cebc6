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
    maps::{Array, HashMap, LpmTrie, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{AddrKey, geo::GeoData};
use lb_ebpf::{Frame, tunnel::tunnel};

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

/// Who may encapsulate to this host: the balancers' outer source prefixes (the setup
/// command's `--source`). A tunnel from anywhere else is passed as it came, never stripped, so
/// nobody on the path can hand this host's stack a packet "from" any client to a VIP.
#[map]
static DECAP_SOURCES: LpmTrie<GeoData, u32> = LpmTrie::pinned(64, 0);

/// This host's own outer addresses (the setup command's `--address`, by default the
/// interface's): a tunnel addressed to another host is not ours.
#[map]
static DECAP_LOCAL: HashMap<AddrKey, u32> = HashMap::pinned(64, 0);

/// Per-CPU: [0] decapsulated, [1] a tunnel for an address that is not a local VIP, [2] a tunnel
/// from a source not allowed or to an address not this host's (both passed as they came).
#[map]
static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::pinned(3, 0);

#[xdp]
pub fn decap(ctx: XdpContext) -> u32 {
    let frame = Frame::new(ctx.data(), ctx.data_end());
    let gue_port = DECAP_GUE_PORT.get(0).copied().unwrap_or(0);
    // Only packets the balancer could have written, whole by their own length fields.
    let Some(t) = tunnel(&frame, gue_port) else {
        return xdp_action::XDP_PASS;
    };
    let Some(eth) = frame.ptr_at::<[u8; 14]>(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: bounds checked by ptr_at.
    let dst_mac = unsafe { (eth as *const [u8; 6]).read_unaligned() };
    if let Some(mine) = DECAP_MAC.get(0)
        && mine[..6] != [0; 6]
        && mine[..6] != dst_mac
    {
        return xdp_action::XDP_PASS;
    }
    // From a balancer, to this host.
    let (len, data) = lb_common::geo::key(t.family, t.outer_src, lb_common::geo::max_prefix(t.family));
    let from = aya_ebpf::maps::lpm_trie::Key::new(len, data);
    // SAFETY: plain lookups; the values are not read.
    if DECAP_SOURCES.get(&from).is_none()
        || unsafe { DECAP_LOCAL.get(&AddrKey::new(t.family, t.outer_dst)) }.is_none()
    {
        count(2);
        return xdp_action::XDP_PASS;
    }
    // The inner destination must be a local VIP.
    let key = AddrKey::new(t.family, t.inner_dst);
    // SAFETY: plain lookup; the value is not read.
    if unsafe { DECAP_VIPS.get(&key) }.is_none() {
        count(1);
        return xdp_action::XDP_PASS;
    }
    let outer_len = t.outer_len;
    let Some(_) = frame.ptr_at::<[u8; 14]>(outer_len) else {
        return xdp_action::XDP_PASS;
    };
    // Move the Ethernet addresses forward over the outer header, then drop it.
    // SAFETY: 14 + outer_len bytes were bounds-checked by `tunnel`, and 14 at outer_len above.
    unsafe {
        let base = eth.cast::<u8>();
        let mut macs = [0u8; 12];
        core::ptr::copy_nonoverlapping(base, macs.as_mut_ptr(), 12);
        let to = base.add(outer_len);
        core::ptr::copy_nonoverlapping(macs.as_ptr(), to, 12);
        (to.add(12) as *mut u16).write_unaligned(t.ethertype);
    }
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return xdp_action::XDP_DROP;
    }
    count(0);
    xdp_action::XDP_PASS
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
