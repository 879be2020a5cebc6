//! The decapsulator's reading of a frame (host-testable, shared with the fuzzer's model): is it
//! an IPIP or GUE packet the balancer could have written, whole by its own length fields, and
//! where does its inner packet start? Anything else is the stack's business, passed untouched.

use lb_common::{FAMILY_V4, FAMILY_V6};

use crate::Frame;

const ETH_P_IPV4: u16 = 0x0800u16.to_be();
const ETH_P_IPV6: u16 = 0x86DDu16.to_be();
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const IPPROTO_UDP: u8 = 17;
/// UDP header and GUE header.
pub const GUE_LEN: usize = 12;

/// A tunnel packet the decapsulator may strip.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Tunnel {
    /// Outer bytes after Ethernet (IP header, and UDP + GUE).
    pub outer_len: usize,
    pub family: u8,
    /// The inner destination address, as map words (IPv4 in the first).
    pub inner_dst: [u32; 4],
    /// The outer source and destination, as map words: who encapsulated it, and to whom.
    pub outer_src: [u32; 4],
    pub outer_dst: [u32; 4],
    /// The Ethernet type, as on the wire.
    pub ethertype: u16,
}

/// Reads `frame` as the decapsulator does, with `gue_port` (0: GUE off). Only option-less,
/// unfragmented outer headers whose lengths agree with the frame (IPv4: total length ≥ the
/// outer headers and ≤ what follows Ethernet; IPv6: 40 + payload length ≤ that), GUE with a
/// UDP length that holds the GUE header, and an inner header of the outer's family within the
/// outer length.
#[inline(always)]
pub fn tunnel(frame: &Frame, gue_port: u32) -> Option<Tunnel> {
    let eth = frame.ptr_at::<[u8; 14]>(0)?.cast::<u8>();
    // SAFETY: bounds checked by ptr_at.
    let ethertype = unsafe { (eth.add(12) as *const u16).read_unaligned() };
    let after_eth = frame.len() - 14;
    let (ip_len, family, proto, inner_proto, outer_total, outer) = if ethertype == ETH_P_IPV4 {
        let ip = frame.ptr_at::<[u8; 20]>(14)?.cast::<u8>();
        // SAFETY: 20 bytes bounds-checked.
        let (vihl, total, frags, proto) = unsafe {
            (
                *ip,
                u16::from_be_bytes([*ip.add(2), *ip.add(3)]) as usize,
                u16::from_be_bytes([*ip.add(6), *ip.add(7)]),
                *ip.add(9),
            )
        };
        // An outer fragment holds no whole inner packet.
        if vihl != 0x45 || frags & 0x3fff != 0 {
            return None;
        }
        // SAFETY: as above; the addresses are at 12 and 16.
        let (src, dst) = unsafe {
            (
                (ip.add(12) as *const u32).read_unaligned(),
                (ip.add(16) as *const u32).read_unaligned(),
            )
        };
        let outer = ([src, 0, 0, 0], [dst, 0, 0, 0]);
        (20usize, FAMILY_V4, proto, IPPROTO_IPIP, total, outer)
    } else if ethertype == ETH_P_IPV6 {
        let ip = frame.ptr_at::<[u8; 40]>(14)?.cast::<u8>();
        // SAFETY: 40 bytes bounds-checked.
        let (vers, payload, next) = unsafe {
            (
                *ip >> 4,
                u16::from_be_bytes([*ip.add(4), *ip.add(5)]) as usize,
                *ip.add(6),
            )
        };
        if vers != 6 {
            return None;
        }
        // SAFETY: as above; the addresses are at 8 and 24.
        let w = |at: usize| unsafe { (ip.add(at) as *const u32).read_unaligned() };
        let outer = ([w(8), w(12), w(16), w(20)], [w(24), w(28), w(32), w(36)]);
        (40usize, FAMILY_V6, next, IPPROTO_IPV6, 40 + payload, outer)
    } else {
        return None;
    };
    if outer_total > after_eth {
        return None;
    }
    let outer_len = match proto {
        p if p == inner_proto => ip_len,
        IPPROTO_UDP if gue_port != 0 => {
            let h = frame.ptr_at::<[u8; GUE_LEN]>(14 + ip_len)?.cast::<u8>();
            // SAFETY: 12 bytes bounds-checked: UDP header, then the GUE header.
            let (dport, udp_len, gue0, gue_proto) = unsafe {
                (
                    u16::from_be_bytes([*h.add(2), *h.add(3)]),
                    u16::from_be_bytes([*h.add(4), *h.add(5)]) as usize,
                    *h.add(8),
                    *h.add(9),
                )
            };
            if u32::from(dport) != gue_port
                || gue0 != 0
                || gue_proto != inner_proto
                || udp_len < GUE_LEN
                || ip_len + udp_len > outer_total
            {
                return None;
            }
            ip_len + GUE_LEN
        }
        _ => return None,
    };
    // The inner header, of the outer's family, within the outer packet.
    let inner_at = 14 + outer_len;
    let inner_dst = if family == FAMILY_V4 {
        if outer_len + 20 > outer_total {
            return None;
        }
        let inner = frame.ptr_at::<[u8; 20]>(inner_at)?.cast::<u8>();
        // SAFETY: 20 bytes bounds-checked; the destination is at 16.
        let (v, dst) = unsafe { (*inner >> 4, (inner.add(16) as *const u32).read_unaligned()) };
        if v != 4 {
            return None;
        }
        [dst, 0, 0, 0]
    } else {
        if outer_len + 40 > outer_total {
            return None;
        }
        let inner = frame.ptr_at::<[u8; 40]>(inner_at)?.cast::<u8>();
        // SAFETY: 40 bytes bounds-checked; the destination is at 24.
        let w = |i: usize| unsafe { (inner.add(24 + 4 * i) as *const u32).read_unaligned() };
        // SAFETY: as above.
        if unsafe { *inner } >> 4 != 6 {
            return None;
        }
        [w(0), w(1), w(2), w(3)]
    };
    Some(Tunnel {
        outer_len,
        family,
        inner_dst,
        outer_src: outer.0,
        outer_dst: outer.1,
        ethertype,
    })
}
