//! When an encapsulated packet would exceed the route MTU, answer the client the way a router
//! would: ICMP "fragmentation needed" (IPv4, only for packets with DF set) or ICMPv6 "packet too
//! big", from the VIP, with the MTU that leaves room for the outer headers, so the client's path
//! MTU discovery shrinks its packets. The frame is turned into the answer in place and sent back
//! out of the interface it came in on.

use aya_ebpf::{
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{Counter, FAMILY_V4};
use lb_ebpf::{Flow, Frame, Verdict, parse::PROTO_ICMP};

use crate::{
    headers::{TTL, fold, sum_words, write_eth, write_ipv4},
    tx::frame_of,
};

/// What an IPv4 answer quotes: an option-less header and the first 8 bytes after it.
const QUOTE4: usize = 28;
/// What an IPv6 answer quotes: the header and the first 8 bytes after it.
const QUOTE6: usize = 48;

/// Answers `flow`'s packet (in `ctx`, untouched so far) with "too big, use `mtu`".
#[inline(always)]
pub fn answer(ctx: &XdpContext, flow: &Flow, mtu: u32) -> Verdict {
    let too_big = Verdict::Drop(Counter::DropEncapTooBig);
    let frame = frame_of(ctx);
    let l3 = flow.l3();
    // The answer is built untagged: a VLAN-tagged client would not get it.
    if l3 != 14 {
        return too_big;
    }
    // The client's MACs and addresses, read before the frame is rewritten.
    let Some(eth) = frame.ptr_at::<[u8; 12]>(0) else {
        return too_big;
    };
    // SAFETY: 12 bytes bounds-checked.
    let macs = unsafe { eth.read_unaligned() };
    let v4 = flow.key.family == FAMILY_V4;
    if v4 {
        let Some(ip) = frame.ptr_at::<[u8; 20]>(l3) else {
            return too_big;
        };
        // SAFETY: 20 bytes bounds-checked.
        let (vihl, df) = unsafe { ((*ip)[0], (*ip)[6] & 0x40 != 0) };
        // Without DF a router would fragment, which XDP cannot: the drop is counted. Options
        // would change the quote's size; such clients are rare enough to drop too.
        if !df || vihl != 0x45 {
            return too_big;
        }
    }
    let (quote, answer_len) = if v4 {
        (QUOTE4, 14 + 20 + 8 + QUOTE4)
    } else {
        (QUOTE6, 14 + 40 + 8 + QUOTE6)
    };
    // Keep exactly the quote after the original IP start, then make room in front for the new
    // Ethernet, IP and ICMP headers.
    let keep = l3 + quote;
    if frame.len() < keep {
        return too_big;
    }
    // SAFETY: plain helper calls on our own context.
    unsafe {
        if bpf_xdp_adjust_tail(ctx.ctx, -((frame.len() - keep) as i32)) != 0
            || bpf_xdp_adjust_head(ctx.ctx, l3 as i32 - (answer_len - quote) as i32) != 0
        {
            return too_big;
        }
    }
    let out = Frame::new(ctx.data(), ctx.data_end());
    let written = if v4 {
        out.ptr_at::<[u8; 14 + 20 + 8 + QUOTE4]>(0).map(|p| {
            // SAFETY: the whole answer is bounds-checked.
            unsafe { write_v4(p.cast(), &macs, mtu) }
        })
    } else {
        out.ptr_at::<[u8; 14 + 40 + 8 + QUOTE6]>(0).map(|p| {
            // SAFETY: the whole answer is bounds-checked.
            unsafe { write_v6(p.cast(), &macs, mtu) }
        })
    };
    if written.is_none() {
        return too_big;
    }
    crate::stats::count(Counter::IcmpTooBigSent);
    Verdict::Tx
}

/// Builds Ethernet, IPv4 and ICMP "fragmentation needed" in front of the quote at 42.
///
/// # Safety
/// `p` must hold 14 + 20 + 8 + QUOTE4 bytes.
#[inline(always)]
unsafe fn write_v4(p: *mut u8, macs: &[u8; 12], mtu: u32) {
    // SAFETY: the caller's contract; the quote starts at 42 and is the client's packet, so the
    // answer goes from its destination (the VIP) to its source.
    unsafe {
        let quote = p.add(42);
        let client = (quote.add(12) as *const u32).read_unaligned();
        let vip = (quote.add(16) as *const u32).read_unaligned();
        // Back to where the packet came from.
        write_eth(p, macs.as_ptr().add(6), macs.as_ptr(), 0x0800);
        write_ipv4(p.add(14), 0, PROTO_ICMP, (20 + 8 + QUOTE4) as u16, 0, vip, client);
        let icmp = p.add(34);
        let mtu = mtu.min(u16::MAX as u32) as u16;
        let head = [0x0304u16, 0, 0, mtu];
        for (i, w) in head.iter().enumerate() {
            (icmp.add(2 * i) as *mut u16).write_unaligned(w.to_be());
        }
        let sum = fold(sum_words(icmp, 8 + QUOTE4));
        (icmp.add(2) as *mut u16).write_unaligned((!sum).to_be());
    }
}

/// Builds Ethernet, IPv6 and ICMPv6 "packet too big" in front of the quote at 62.
///
/// # Safety
/// `p` must hold 14 + 40 + 8 + QUOTE6 bytes.
#[inline(always)]
unsafe fn write_v6(p: *mut u8, macs: &[u8; 12], mtu: u32) {
    // SAFETY: the caller's contract.
    unsafe {
        let quote = p.add(62);
        write_eth(p, macs.as_ptr().add(6), macs.as_ptr(), 0x86dd);
        let ip = p.add(14);
        (ip as *mut u32).write_unaligned((6u32 << 28).to_be());
        let payload = (8 + QUOTE6) as u16;
        (ip.add(4) as *mut u16).write_unaligned(payload.to_be());
        *ip.add(6) = 58;
        *ip.add(7) = TTL;
        for i in 0..4 {
            // Source: the quoted packet's destination (the VIP); destination: its source.
            let vip = (quote.add(24 + 4 * i) as *const u32).read_unaligned();
            let client = (quote.add(8 + 4 * i) as *const u32).read_unaligned();
            (ip.add(8 + 4 * i) as *mut u32).write_unaligned(vip);
            (ip.add(24 + 4 * i) as *mut u32).write_unaligned(client);
        }
        let icmp = p.add(54);
        (icmp as *mut u32).write_unaligned(u32::from_be_bytes([2, 0, 0, 0]).to_be());
        (icmp.add(4) as *mut u32).write_unaligned(mtu.to_be());
        // The pseudo-header: both addresses, the upper-layer length, next header 58.
        let mut sum = sum_words(ip.add(8), 32) + payload as u32 + 58;
        sum += sum_words(icmp, 8 + QUOTE6);
        (icmp.add(2) as *mut u16).write_unaligned((!fold(sum)).to_be());
    }
}
