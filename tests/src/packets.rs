//! Packet builders for golden tests and benchmarks: headers with correct lengths and IPv4
//! header checksums; and the addresses and verdicts both use.

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x1b];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc1];
pub const VIP4: [u8; 4] = [10, 100, 0, 1];
pub const VIP6: [u8; 16] = [0xfd, 0x99, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const CLIENT4: [u8; 4] = [10, 99, 0, 1];
pub const CLIENT6: [u8; 16] = [0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// Routed backends behind `topology::ipip_routes`'s router (its MAC), and the encapsulation
/// sources the golden tests and the fuzzer configure.
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x50];
pub const BACKEND4: [u8; 4] = [10, 60, 0, 5];
pub const BACKEND6: [u8; 16] = [0xfd, 0x60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
pub const ENCAP_SRC4: [u8; 4] = [172, 16, 0, 0];
pub const ENCAP_SRC6: [u8; 16] = [0xfd, 0, 0, 0x1b, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// NAT: backends that know nothing of the VIP, and the SNAT sources.
pub const NAT_B4: [u8; 4] = [10, 97, 0, 11];
pub const NAT_B6: [u8; 16] = [0xfd, 0x97, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11];
pub const SNAT4: [u8; 4] = [10, 97, 0, 1];
pub const SNAT6: [u8; 16] = [0xfd, 0x97, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// An address of 4 or 16 bytes as map words (`lb_common::addr_words`).
pub fn words(addr: &[u8]) -> [u32; 4] {
    let mut a = [0u8; 16];
    a[..addr.len()].copy_from_slice(addr);
    lb_common::addr_words(a)
}

pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

pub fn ipv4(proto: u8, src: [u8; 4], dst: [u8; 4], l4: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, proto, 0, 0];
    h[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let sum = checksum(&h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h.extend_from_slice(l4);
    h
}

pub fn ipv6(next: u8, src: [u8; 16], dst: [u8; 16], l4: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(l4);
    h
}

pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&1u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    t
}

pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(payload);
    u
}

/// Recomputes the header checksum of the IPv4 packet `h` after its header was edited.
pub fn fix_ipv4_checksum(h: &mut [u8]) {
    let len = ((h[0] & 0x0f) as usize) * 4;
    h[10..12].copy_from_slice(&[0, 0]);
    let sum = checksum(&h[..len]);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
}

pub fn checksum(b: &[u8]) -> u16 {
    let mut s: u32 = b
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Fills in the TCP or UDP checksum of the IPv4 or IPv6 packet `ip` (no extension headers),
/// over the pseudo-header and the whole segment. A UDP checksum that comes out 0 is sent as
/// 0xffff.
pub fn fix_l4_checksum(ip: &mut [u8]) {
    let (proto, l4) = if ip[0] >> 4 == 4 {
        (ip[9], ((ip[0] & 0x0f) as usize) * 4)
    } else {
        (ip[6], 40)
    };
    let at = l4 + if proto == 6 { 16 } else { 6 };
    ip[at..at + 2].copy_from_slice(&[0, 0]);
    let mut sum = pseudo_checksum(ip, proto, &ip[l4..]);
    if proto == 17 && sum == 0 {
        sum = 0xffff;
    }
    ip[at..at + 2].copy_from_slice(&sum.to_be_bytes());
}

/// The checksum of `segment` (TCP, UDP or ICMPv6, with its own checksum field as it stands)
/// under the pseudo-header of the IPv4 or IPv6 packet `ip` and protocol `proto`.
pub fn pseudo_checksum(ip: &[u8], proto: u8, segment: &[u8]) -> u16 {
    let mut p = if ip[0] >> 4 == 4 {
        let mut p = ip[12..20].to_vec();
        p.extend_from_slice(&[0, proto]);
        p.extend_from_slice(&(segment.len() as u16).to_be_bytes());
        p
    } else {
        let mut p = ip[8..40].to_vec();
        p.extend_from_slice(&(segment.len() as u32).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, proto]);
        p
    };
    p.extend_from_slice(segment);
    checksum(&p)
}
