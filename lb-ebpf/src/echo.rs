//! ICMP echo requests to a VIP: answered here (the request turned around and sent back out), or
//! passed to the kernel when the daemon is configured so (`icmp_echo = "pass"`).

use aya_ebpf::programs::XdpContext;
use lb_common::{AddrKey, Counter, FAMILY_V4, VipFilter, dpconfig::DP_F_ECHO_REPLY};
use lb_ebpf::{Flow, Frame, Verdict};

use crate::{
    headers::{TTL, fold},
    maps::{DP_CONFIG, VIP_ADDRS, VIP_FILTER},
    stats::{count, finish},
};

/// Answers or passes an echo request; returns the counted XDP action. A stage of its own (see
/// `stats::finish`).
#[inline(never)]
pub fn reply(ctx: &XdpContext, flow: &Flow) -> u32 {
    finish(reply_verdict(ctx, flow))
}

#[inline(always)]
fn reply_verdict(ctx: &XdpContext, flow: &Flow) -> Verdict {
    let frame = &crate::tx::frame_of(ctx);
    let key = &flow.key;
    let filter = VIP_FILTER.get(0);
    if !filter.is_some_and(|f| f.may_be_vip(VipFilter::bit(&key.dst_addr))) {
        return Verdict::Pass(Counter::PassNotVip);
    }
    // The filter may err; answering for an address we do not own must not.
    // SAFETY: plain lookup; the value is not read.
    if unsafe { VIP_ADDRS.get(&AddrKey::new(key.family, key.dst_addr)) }.is_none() {
        return Verdict::Pass(Counter::PassNotVip);
    }
    if !DP_CONFIG.get(0).is_some_and(|c| c.flags & DP_F_ECHO_REPLY != 0) {
        return Verdict::Pass(Counter::PassNotTcpUdp);
    }
    let l3 = flow.l3();
    let done = if key.family == FAMILY_V4 {
        reply_v4(frame, l3)
    } else {
        reply_v6(frame, l3)
    };
    if done.is_none() {
        return Verdict::Pass(Counter::PassNotTcpUdp);
    }
    count(Counter::EchoReplied);
    Verdict::Tx
}

/// Swaps the Ethernet addresses.
#[inline(always)]
fn swap_macs(frame: &Frame) -> Option<()> {
    let eth = frame.ptr_at::<[u8; 12]>(0)?;
    // SAFETY: 12 bytes bounds-checked.
    unsafe {
        let m = eth.read_unaligned();
        let mut out = [0u8; 12];
        out[..6].copy_from_slice(&m[6..]);
        out[6..].copy_from_slice(&m[..6]);
        eth.write_unaligned(out);
    }
    Some(())
}

#[inline(always)]
fn reply_v4(frame: &Frame, l3: usize) -> Option<()> {
    let ip = frame.ptr_at::<[u8; 20]>(l3)?.cast::<u8>();
    // SAFETY: 20 bytes bounds-checked; offsets within the IPv4 header.
    let ihl = unsafe { (*ip & 0x0f) as usize * 4 };
    let icmp = frame.ptr_at::<[u8; 8]>(l3 + ihl)?.cast::<u8>();
    swap_macs(frame)?;
    // SAFETY: as above; the ICMP header's 8 bytes are bounds-checked.
    unsafe {
        let src = (ip.add(12) as *const u32).read_unaligned();
        let dst = (ip.add(16) as *const u32).read_unaligned();
        (ip.add(12) as *mut u32).write_unaligned(dst);
        (ip.add(16) as *mut u32).write_unaligned(src);
        // TTL and protocol share a 16-bit word of the header checksum.
        let old = u16::from_be_bytes([*ip.add(8), *ip.add(9)]);
        *ip.add(8) = TTL;
        let new = u16::from_be_bytes([TTL, *ip.add(9)]);
        csum_replace(ip.add(10), old, new);
        // Echo request (8) -> echo reply (0): the type is the high byte of the first word.
        let old = u16::from_be_bytes([*icmp, *icmp.add(1)]);
        *icmp = 0;
        csum_replace(icmp.add(2), old, u16::from_be_bytes([0, *icmp.add(1)]));
    }
    Some(())
}

#[inline(always)]
fn reply_v6(frame: &Frame, l3: usize) -> Option<()> {
    let ip = frame.ptr_at::<[u8; 40]>(l3)?.cast::<u8>();
    let icmp = frame.ptr_at::<[u8; 8]>(l3 + 40)?.cast::<u8>();
    swap_macs(frame)?;
    // SAFETY: 40 + 8 bytes bounds-checked. Swapping the addresses leaves the pseudo-header sum
    // as it was; only the type changes the ICMPv6 checksum.
    unsafe {
        for i in 0..4 {
            let s = ip.add(8 + 4 * i) as *mut u32;
            let d = ip.add(24 + 4 * i) as *mut u32;
            let (a, b) = (s.read_unaligned(), d.read_unaligned());
            s.write_unaligned(b);
            d.write_unaligned(a);
        }
        *ip.add(7) = TTL;
        // Echo request (128) -> echo reply (129).
        let old = u16::from_be_bytes([*icmp, *icmp.add(1)]);
        *icmp = 129;
        csum_replace(icmp.add(2), old, u16::from_be_bytes([129, *icmp.add(1)]));
    }
    Some(())
}

/// RFC 1624 incremental update of the big-endian checksum at `at` when one 16-bit word of the
/// summed data changes from `old` to `new`: HC' = ~(~HC + ~m + m').
///
/// # Safety
/// `at` must point at two writable bytes.
#[inline(always)]
unsafe fn csum_replace(at: *mut u8, old: u16, new: u16) {
    // SAFETY: the caller's contract.
    unsafe {
        let hc = u16::from_be_bytes([*at, *at.add(1)]);
        let out = (!fold((!hc) as u32 + (!old) as u32 + new as u32)).to_be_bytes();
        *at = out[0];
        *at.add(1) = out[1];
    }
}
