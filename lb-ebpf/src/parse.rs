//! Header parsing: Ethernet (one 802.1Q/802.1ad tag), IPv4 with options, IPv6 without extension
//! headers, TCP and UDP. The VIP filter is asked right after the fixed IP header: a packet to
//! another address goes to the kernel unparsed, malformed or not (the kernel judges it).
//! Malformed headers of packets that may be ours are dropped; anything we do not balance is
//! passed.

use core::mem::size_of;

use lb_common::{Counter, FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP, VipFilter};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

use crate::verdict::Verdict;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
const ETH_P_IPV4: u16 = 0x0800u16.to_be();
const ETH_P_IPV6: u16 = 0x86DDu16.to_be();
const ETH_P_8021Q: u16 = 0x8100u16.to_be();
const ETH_P_8021AD: u16 = 0x88A8u16.to_be();

/// The bytes of one frame: `[start, end)` as addresses, as XDP hands them over.
#[derive(Copy, Clone)]
pub struct Frame {
    start: usize,
    end: usize,
}

impl Frame {
    #[inline(always)]
    pub const fn new(start: usize, end: usize) -> Self {
        Self { start, end }
    }

    #[inline(always)]
    pub const fn len(&self) -> usize {
        self.end - self.start
    }

    #[inline(always)]
    pub const fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// A bounds-checked pointer to a `T` at `offset`: the one check the verifier needs.
    #[inline(always)]
    pub fn ptr_at<T>(&self, offset: usize) -> Option<*mut T> {
        if self.start + offset + size_of::<T>() > self.end {
            return None;
        }
        Some((self.start + offset) as *mut T)
    }
}

/// A parsed packet: its flow key, what kind of packet it is, and where its IP header starts.
#[derive(Copy, Clone, Debug)]
pub struct Flow {
    pub key: FlowKey,
    pub kind: FlowKind,
    /// Offset of the IP header in the frame (after Ethernet and any VLAN tag).
    pub l3: usize,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FlowKind {
    /// TCP or UDP. `syn`: a TCP SYN without ACK opens a flow, so the connection table need not
    /// be searched. `close`: a TCP FIN or RST, which ends the flow's place in its backend's
    /// active-flow count.
    Transport { syn: bool, close: bool },
    /// An ICMP error (fragmentation needed / packet too big, port unreachable) about a flow:
    /// `key` is the flow of the packet it quotes, direction reversed, so the error goes to the
    /// backend that owns the flow.
    IcmpError,
    /// An ICMP echo request (`key`: client -> destination, protocol ICMP/ICMPv6, no ports).
    Echo,
    /// An IP fragment: `key` has no ports (later fragments have none), so every fragment of a
    /// datagram has the same key.
    Fragment,
}

impl Flow {
    /// `l3`, as one of its two values: read back from map memory (the data plane keeps the
    /// parsed flow there between its stages) it would be a number the verifier knows nothing
    /// about, and packet accesses at a variable offset are refused. Here each branch is a
    /// constant.
    #[inline(always)]
    pub fn l3(&self) -> usize {
        if self.l3 == EthHdr::LEN + VlanHdr::LEN {
            EthHdr::LEN + VlanHdr::LEN
        } else {
            EthHdr::LEN
        }
    }

    #[inline(always)]
    fn new(kind: FlowKind, l3: usize, key: FlowKey) -> Self {
        Self { key, kind, l3 }
    }
}

/// Parses a frame into its flow, or says why it is not balanced.
///
/// `vips`: the VIP filter, asked right after the IP header (`None`: every address may be ours).
/// A TCP, UDP or other non-ICMP packet whose addresses it clears is passed as `pass_not_vip`
/// without a look past the fixed IP header: IHL, lengths and the L4 header are the kernel's to
/// judge. ICMP is parsed first: an error's flow is the one it quotes, whose addresses
/// `select` asks the filter about.
#[inline(always)]
pub fn parse_flow(frame: &Frame, vips: Option<&VipFilter>) -> Result<Flow, Verdict> {
    let eth: *const EthHdr = frame.ptr_at(0).ok_or(Verdict::Drop(Counter::DropTruncatedL2))?;
    // SAFETY: bounds checked by ptr_at.
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut offset = EthHdr::LEN;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let vlan: *const VlanHdr = frame
            .ptr_at(offset)
            .ok_or(Verdict::Drop(Counter::DropTruncatedL2))?;
        ether_type = unsafe { (*vlan).ether_type };
        offset += VlanHdr::LEN;
        if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
            return Err(Verdict::Pass(Counter::PassStackedVlan));
        }
    }
    match ether_type {
        ETH_P_IPV4 => parse_ipv4(frame, offset, vips),
        ETH_P_IPV6 => parse_ipv6(frame, offset, vips),
        _ => Err(Verdict::Pass(Counter::PassNotIp)),
    }
}

/// Whether the filter lets a packet from `src` to `dst` on to the rest of the parse.
#[inline(always)]
fn may_be_ours(vips: Option<&VipFilter>, src: &[u32; 4], dst: &[u32; 4]) -> bool {
    vips.is_none_or(|f| f.may_be_ours(src, dst))
}

#[inline(always)]
fn parse_ipv4(frame: &Frame, offset: usize, vips: Option<&VipFilter>) -> Result<Flow, Verdict> {
    let ip: *const Ipv4Hdr = frame
        .ptr_at(offset)
        .ok_or(Verdict::Drop(Counter::DropTruncatedL3))?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    // Another version is no IPv4 header, so it has no addresses to ask the filter about.
    if ip.vihl >> 4 != 4 {
        return Err(Verdict::Drop(Counter::DropBadIpHeader));
    }
    let proto = ip.proto;
    let src = [load_word(ip.src_addr.as_ptr()), 0, 0, 0];
    let dst = [load_word(ip.dst_addr.as_ptr()), 0, 0, 0];
    if proto != PROTO_ICMP && !may_be_ours(vips, &src, &dst) {
        return Err(Verdict::Pass(Counter::PassNotVip));
    }
    let header_len = ((ip.vihl & 0x0f) as usize) << 2;
    let total_len = u16::from_be_bytes(ip.tot_len) as usize;
    if header_len < Ipv4Hdr::LEN || total_len < header_len {
        return Err(Verdict::Drop(Counter::DropBadIpHeader));
    }
    // The packet must fit the frame (trailing padding is allowed, and kept).
    if offset + total_len > frame.len() {
        return Err(Verdict::Drop(Counter::DropTruncatedL3));
    }
    let end = offset + total_len;
    // MF set or a non-zero offset: a fragment. Only the first one has ports.
    if u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        if proto != PROTO_TCP && proto != PROTO_UDP {
            return Err(Verdict::Pass(Counter::PassIpv4Fragment));
        }
        return Ok(fragment(FAMILY_V4, proto, src, dst, offset));
    }
    if proto == PROTO_ICMP {
        if is_echo_request(frame, offset + header_len, end, 8) {
            return Ok(echo(FAMILY_V4, PROTO_ICMP, src, dst, offset));
        }
        return icmp4_error(frame, offset, offset + header_len, end, dst);
    }
    let (sport, dport, syn, close) = parse_ports(frame, offset + header_len, end, proto)?;
    let key = FlowKey::from_words(FAMILY_V4, proto, src, dst, sport, dport);
    Ok(Flow::new(FlowKind::Transport { syn, close }, offset, key))
}

#[inline(always)]
fn fragment(family: u8, proto: u8, src: [u32; 4], dst: [u32; 4], l3: usize) -> Flow {
    Flow::new(
        FlowKind::Fragment,
        l3,
        FlowKey::from_words(family, proto, src, dst, 0, 0),
    )
}

#[inline(always)]
fn is_echo_request(frame: &Frame, offset: usize, end: usize, request_type: u8) -> bool {
    // The whole 8-byte echo header must be there, within the IP packet, to be answered. The
    // frame check comes first and apart: folded into one condition with the packet check
    // (which implies it), LLVM drops the one the verifier needs.
    let Some(h) = frame.ptr_at::<[u8; 8]>(offset) else {
        return false;
    };
    if offset + 8 > end {
        return false;
    }
    // SAFETY: bounds checked by ptr_at.
    unsafe { (*h)[0] == request_type && (*h)[1] == 0 }
}

#[inline(always)]
fn echo(family: u8, proto: u8, src: [u32; 4], dst: [u32; 4], l3: usize) -> Flow {
    Flow::new(
        FlowKind::Echo,
        l3,
        FlowKey::from_words(family, proto, src, dst, 0, 0),
    )
}

/// An ICMPv4 error sent to a VIP quotes the header of a packet the VIP sent (a backend's reply):
/// source VIP, destination client. Reversed, that is the client's flow.
#[inline(always)]
fn icmp4_error(
    frame: &Frame,
    l3: usize,
    offset: usize,
    end: usize,
    outer_dst: [u32; 4],
) -> Result<Flow, Verdict> {
    let not_ours = Verdict::Pass(Counter::PassNotTcpUdp);
    let icmp: *const [u8; 8] = frame.ptr_at(offset).ok_or(not_ours)?;
    // SAFETY: bounds checked by ptr_at.
    let (kind, code) = unsafe { ((*icmp)[0], (*icmp)[1]) };
    // Destination unreachable: port unreachable (3) or fragmentation needed (4).
    if kind != 3 || (code != 3 && code != 4) {
        return Err(not_ours);
    }
    let inner_at = offset + 8;
    let inner: *const Ipv4Hdr = frame.ptr_at(inner_at).ok_or(not_ours)?;
    // SAFETY: bounds checked by ptr_at.
    let inner = unsafe { &*inner };
    let inner_len = ((inner.vihl & 0x0f) as usize) << 2;
    if inner.vihl >> 4 != 4 || inner_len < Ipv4Hdr::LEN || u16::from_be_bytes(inner.frags) & 0x1fff != 0 {
        return Err(not_ours);
    }
    let proto = inner.proto;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(not_ours);
    }
    let vip = [load_word(inner.src_addr.as_ptr()), 0, 0, 0];
    let client = [load_word(inner.dst_addr.as_ptr()), 0, 0, 0];
    // The quote is about a packet from this VIP, to which the error is addressed.
    if vip != outer_dst {
        return Err(not_ours);
    }
    let ports: *const [u16; 2] = frame.ptr_at(inner_at + inner_len).ok_or(not_ours)?;
    // The quote (its IP header and the 8 bytes after it) must lie within the outer packet.
    // After the frame check, as in is_echo_request.
    if inner_at + inner_len + 8 > end {
        return Err(not_ours);
    }
    // SAFETY: bounds checked by ptr_at; the first 4 bytes of TCP and UDP are the ports.
    let [vip_port, client_port] = unsafe { ports.read_unaligned() };
    let key = FlowKey::from_words(FAMILY_V4, proto, client, vip, client_port, vip_port);
    Ok(Flow::new(FlowKind::IcmpError, l3, key))
}

/// As `icmp4_error`, for ICMPv6 packet too big (2) and port unreachable (type 1, code 4).
#[inline(always)]
fn icmp6_error(
    frame: &Frame,
    l3: usize,
    offset: usize,
    end: usize,
    outer_dst: [u32; 4],
) -> Result<Flow, Verdict> {
    let not_ours = Verdict::Pass(Counter::PassNotTcpUdp);
    let icmp: *const [u8; 8] = frame.ptr_at(offset).ok_or(not_ours)?;
    // SAFETY: bounds checked by ptr_at.
    let (kind, code) = unsafe { ((*icmp)[0], (*icmp)[1]) };
    if kind != 2 && !(kind == 1 && code == 4) {
        return Err(not_ours);
    }
    let inner_at = offset + 8;
    let inner: *const Ipv6Hdr = frame.ptr_at(inner_at).ok_or(not_ours)?;
    // SAFETY: bounds checked by ptr_at.
    let inner = unsafe { &*inner };
    let proto = inner.next_hdr;
    if inner.vcf[0] >> 4 != 6 || (proto != PROTO_TCP && proto != PROTO_UDP) {
        return Err(not_ours);
    }
    let vip = load_words(inner.src_addr.as_ptr());
    if vip != outer_dst {
        return Err(not_ours);
    }
    let client = load_words(inner.dst_addr.as_ptr());
    let ports: *const [u16; 2] = frame.ptr_at(inner_at + Ipv6Hdr::LEN).ok_or(not_ours)?;
    // The quote (its IPv6 header and the 8 bytes after it) must lie within the outer packet.
    if inner_at + Ipv6Hdr::LEN + 8 > end {
        return Err(not_ours);
    }
    // SAFETY: bounds checked by ptr_at.
    let [vip_port, client_port] = unsafe { ports.read_unaligned() };
    let key = FlowKey::from_words(FAMILY_V6, proto, client, vip, client_port, vip_port);
    Ok(Flow::new(FlowKind::IcmpError, l3, key))
}

#[inline(always)]
fn parse_ipv6(frame: &Frame, offset: usize, vips: Option<&VipFilter>) -> Result<Flow, Verdict> {
    let ip: *const Ipv6Hdr = frame
        .ptr_at(offset)
        .ok_or(Verdict::Drop(Counter::DropTruncatedL3))?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    if ip.vcf[0] >> 4 != 6 {
        return Err(Verdict::Drop(Counter::DropBadIpHeader));
    }
    if ip.next_hdr != PROTO_ICMPV6
        && !may_be_ours(
            vips,
            &load_words(ip.src_addr.as_ptr()),
            &load_words(ip.dst_addr.as_ptr()),
        )
    {
        return Err(Verdict::Pass(Counter::PassNotVip));
    }
    let end = offset + Ipv6Hdr::LEN + u16::from_be_bytes(ip.payload_len) as usize;
    if end > frame.len() {
        return Err(Verdict::Drop(Counter::DropTruncatedL3));
    }
    let proto = ip.next_hdr;
    match proto {
        PROTO_TCP | PROTO_UDP => {}
        PROTO_ICMPV6 => {
            let dst = load_words(ip.dst_addr.as_ptr());
            if is_echo_request(frame, offset + Ipv6Hdr::LEN, end, 128) {
                let src = load_words(ip.src_addr.as_ptr());
                return Ok(echo(FAMILY_V6, PROTO_ICMPV6, src, dst, offset));
            }
            return icmp6_error(frame, offset, offset + Ipv6Hdr::LEN, end, dst);
        }
        44 => {
            // The fragment header: the upper protocol is its next header.
            let pass = Verdict::Pass(Counter::PassIpv6Fragment);
            let frag: *const [u8; 8] = frame.ptr_at(offset + Ipv6Hdr::LEN).ok_or(pass)?;
            // SAFETY: bounds checked by ptr_at.
            let upper = unsafe { (*frag)[0] };
            if upper != PROTO_TCP && upper != PROTO_UDP {
                return Err(pass);
            }
            let (src, dst) = (load_words(ip.src_addr.as_ptr()), load_words(ip.dst_addr.as_ptr()));
            return Ok(fragment(FAMILY_V6, upper, src, dst, offset));
        }
        // Hop-by-hop, routing, destination options, AH, mobility, HIP, shim6, experimental.
        0 | 43 | 60 | 51 | 135 | 139 | 140 | 253 | 254 => {
            return Err(Verdict::Pass(Counter::PassIpv6ExtHeader));
        }
        _ => return Err(Verdict::Pass(Counter::PassNotTcpUdp)),
    }
    let (sport, dport, syn, close) = parse_ports(frame, offset + Ipv6Hdr::LEN, end, proto)?;
    let (src, dst) = (load_words(ip.src_addr.as_ptr()), load_words(ip.dst_addr.as_ptr()));
    let key = FlowKey::from_words(FAMILY_V6, proto, src, dst, sport, dport);
    Ok(Flow::new(FlowKind::Transport { syn, close }, offset, key))
}

/// Four wire bytes as one word (the bytes keep their order in memory). One load on the kernel
/// target, which is built to allow misaligned access (lb-ebpf/build.rs).
#[inline(always)]
fn load_word(p: *const u8) -> u32 {
    // SAFETY: callers pass a pointer into a header that ptr_at bounds-checked.
    unsafe { p.cast::<u32>().read_unaligned() }
}

#[inline(always)]
fn load_words(p: *const u8) -> [u32; 4] {
    // SAFETY: as load_word; an IPv6 address is 16 bytes.
    unsafe {
        [
            load_word(p),
            load_word(p.add(4)),
            load_word(p.add(8)),
            load_word(p.add(12)),
        ]
    }
}

/// Source and destination ports, in network byte order, whether this is a TCP SYN without ACK,
/// and whether it is a TCP FIN or RST. The header must lie within the IP packet, which ends at
/// `end`.
#[inline(always)]
fn parse_ports(
    frame: &Frame,
    offset: usize,
    end: usize,
    proto: u8,
) -> Result<(u16, u16, bool, bool), Verdict> {
    match proto {
        PROTO_TCP => {
            let tcp: *const TcpHdr = frame
                .ptr_at(offset)
                .ok_or(Verdict::Drop(Counter::DropTruncatedL4))?;
            if offset + TcpHdr::LEN > end {
                return Err(Verdict::Drop(Counter::DropTruncatedL4));
            }
            // SAFETY: bounds checked by ptr_at.
            let tcp = unsafe { &*tcp };
            if tcp.doff() < 5 || offset + ((tcp.doff() as usize) << 2) > end {
                return Err(Verdict::Drop(Counter::DropBadL4Header));
            }
            let syn = tcp.syn() != 0 && tcp.ack() == 0;
            let close = tcp.fin() != 0 || tcp.rst() != 0;
            Ok((
                u16::from_ne_bytes(tcp.source),
                u16::from_ne_bytes(tcp.dest),
                syn,
                close,
            ))
        }
        PROTO_UDP => {
            let udp: *const UdpHdr = frame
                .ptr_at(offset)
                .ok_or(Verdict::Drop(Counter::DropTruncatedL4))?;
            if offset + UdpHdr::LEN > end {
                return Err(Verdict::Drop(Counter::DropTruncatedL4));
            }
            // SAFETY: bounds checked by ptr_at.
            let udp = unsafe { &*udp };
            Ok((
                u16::from_ne_bytes(udp.src),
                u16::from_ne_bytes(udp.dst),
                false,
                false,
            ))
        }
        _ => Err(Verdict::Pass(Counter::PassNotTcpUdp)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eth(ethertype: u16) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    fn ipv4(proto: u8, ihl_words: u8, frags: u16, payload: &[u8]) -> Vec<u8> {
        let hl = ihl_words as usize * 4;
        let mut h = vec![0u8; hl];
        h[0] = 0x40 | ihl_words;
        h[2..4].copy_from_slice(&((hl + payload.len()) as u16).to_be_bytes());
        h[6..8].copy_from_slice(&frags.to_be_bytes());
        h[8] = 64;
        h[9] = proto;
        h[12..16].copy_from_slice(&[10, 0, 0, 1]);
        h[16..20].copy_from_slice(&[10, 0, 0, 100]);
        h.extend_from_slice(payload);
        h
    }

    fn tcp(sport: u16, dport: u16) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t
    }

    fn udp(sport: u16, dport: u16) -> Vec<u8> {
        let mut u = vec![0u8; 8];
        u[0..2].copy_from_slice(&sport.to_be_bytes());
        u[2..4].copy_from_slice(&dport.to_be_bytes());
        u[4..6].copy_from_slice(&8u16.to_be_bytes());
        u
    }

    fn run(bytes: &[u8]) -> Result<FlowKey, Verdict> {
        let start = bytes.as_ptr() as usize;
        parse_flow(&Frame::new(start, start + bytes.len()), None).map(|f| f.key)
    }

    fn frame(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn ipv4_tcp_key() {
        let f = frame(&[&eth(0x0800), &ipv4(6, 5, 0x4000, &tcp(40000, 80))]);
        let k = run(&f).expect("parsed");
        assert_eq!(k.family, FAMILY_V4);
        assert_eq!(k.proto, PROTO_TCP);
        let (src, dst) = (
            lb_common::addr_bytes(k.src_addr),
            lb_common::addr_bytes(k.dst_addr),
        );
        assert_eq!(&src[..4], &[10, 0, 0, 1]);
        assert_eq!(&dst[..4], &[10, 0, 0, 100]);
        assert_eq!(src[4..], [0; 12]);
        assert_eq!(dst[4..], [0; 12]);
        assert_eq!(u16::from_be(k.src_port), 40000);
        assert_eq!(u16::from_be(k.dst_port), 80);
    }

    #[test]
    fn ipv4_options_are_skipped() {
        let f = frame(&[&eth(0x0800), &ipv4(17, 7, 0, &udp(5353, 53))]);
        let k = run(&f).expect("parsed");
        assert_eq!(u16::from_be(k.src_port), 5353);
        assert_eq!(u16::from_be(k.dst_port), 53);
    }

    #[test]
    fn vlan_tag_is_skipped_and_double_tag_passed() {
        let mut f = eth(0x8100);
        f.extend_from_slice(&[0x00, 0x64, 0x08, 0x00]);
        f.extend_from_slice(&ipv4(6, 5, 0, &tcp(1, 2)));
        assert_eq!(u16::from_be(run(&f).expect("parsed").dst_port), 2);

        let mut qinq = eth(0x88a8);
        qinq.extend_from_slice(&[0x00, 0x64, 0x81, 0x00, 0x00, 0x65, 0x08, 0x00]);
        qinq.extend_from_slice(&ipv4(6, 5, 0, &tcp(1, 2)));
        assert_eq!(run(&qinq), Err(Verdict::Pass(Counter::PassStackedVlan)));
    }

    #[test]
    fn ipv6_udp_key_and_ext_headers() {
        let mut ip6 = vec![0u8; 40];
        ip6[0] = 0x60;
        ip6[4..6].copy_from_slice(&8u16.to_be_bytes());
        ip6[6] = 17;
        ip6[8..24].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        ip6[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x64]);
        let f = frame(&[&eth(0x86dd), &ip6, &udp(7, 9)]);
        let k = run(&f).expect("parsed");
        assert_eq!(k.family, FAMILY_V6);
        assert_eq!(lb_common::addr_bytes(k.dst_addr)[15], 0x64);
        assert_eq!(u16::from_be(k.dst_port), 9);

        ip6[6] = 0; // hop-by-hop
        let f = frame(&[&eth(0x86dd), &ip6, &udp(7, 9)]);
        assert_eq!(run(&f), Err(Verdict::Pass(Counter::PassIpv6ExtHeader)));
        ip6[6] = 44;
        // A fragment header whose upper protocol is UDP: a portless fragment key.
        let f = frame(&[&eth(0x86dd), &ip6, &[17, 0, 0, 1, 0, 0, 0, 7], &udp(7, 9)]);
        let start = f.as_ptr() as usize;
        let flow = parse_flow(&Frame::new(start, start + f.len()), None).expect("fragment");
        assert_eq!(flow.kind, FlowKind::Fragment);
        assert_eq!((flow.key.proto, flow.key.src_port, flow.key.dst_port), (17, 0, 0));
        let f = frame(&[&eth(0x86dd), &ip6, &[58, 0, 0, 1, 0, 0, 0, 7]]);
        assert_eq!(run(&f), Err(Verdict::Pass(Counter::PassIpv6Fragment)));
    }

    /// The length fields must agree with the frame and with each other (padding after the
    /// packet is allowed).
    #[test]
    fn lengths_that_disagree_are_dropped() {
        let set_total = |p: &mut Vec<u8>, n: u16| p[2..4].copy_from_slice(&n.to_be_bytes());
        // Total length past the frame.
        let mut long = ipv4(6, 5, 0, &tcp(1, 2));
        set_total(&mut long, 41);
        assert_eq!(
            run(&frame(&[&eth(0x0800), &long])),
            Err(Verdict::Drop(Counter::DropTruncatedL3))
        );
        // Total length too small for the TCP header the ports come from (the bytes are there).
        let mut short = ipv4(6, 5, 0, &tcp(1, 2));
        set_total(&mut short, 30);
        assert_eq!(
            run(&frame(&[&eth(0x0800), &short])),
            Err(Verdict::Drop(Counter::DropTruncatedL4))
        );
        // A data offset past the segment.
        let mut doff = tcp(1, 2);
        doff[12] = 8 << 4;
        assert_eq!(
            run(&frame(&[&eth(0x0800), &ipv4(6, 5, 0, &doff)])),
            Err(Verdict::Drop(Counter::DropBadL4Header))
        );
        // A UDP header past the payload.
        let mut udp_short = ipv4(17, 5, 0, &udp(1, 2));
        set_total(&mut udp_short, 24);
        assert_eq!(
            run(&frame(&[&eth(0x0800), &udp_short])),
            Err(Verdict::Drop(Counter::DropTruncatedL4))
        );
        // Padding after the packet (a 60-byte minimum frame) is fine.
        let padded = frame(&[&eth(0x0800), &ipv4(17, 5, 0, &udp(1, 2)), &[0u8; 18]]);
        assert!(run(&padded).is_ok());
        // IPv6: payload length past the frame, and too short for the UDP header.
        let mut ip6 = vec![0u8; 40];
        ip6[0] = 0x60;
        ip6[6] = 17;
        ip6[4..6].copy_from_slice(&9u16.to_be_bytes());
        assert_eq!(
            run(&frame(&[&eth(0x86dd), &ip6, &udp(1, 2)])),
            Err(Verdict::Drop(Counter::DropTruncatedL3))
        );
        ip6[4..6].copy_from_slice(&4u16.to_be_bytes());
        assert_eq!(
            run(&frame(&[&eth(0x86dd), &ip6, &udp(1, 2)])),
            Err(Verdict::Drop(Counter::DropTruncatedL4))
        );
        ip6[4..6].copy_from_slice(&8u16.to_be_bytes());
        assert!(run(&frame(&[&eth(0x86dd), &ip6, &udp(1, 2)])).is_ok());
    }

    #[test]
    fn malformed_and_other_traffic() {
        assert_eq!(run(&[0u8; 10]), Err(Verdict::Drop(Counter::DropTruncatedL2)));
        assert_eq!(run(&eth(0x0806)), Err(Verdict::Pass(Counter::PassNotIp)));
        let f = frame(&[&eth(0x0800), &[0x45, 0, 0]]);
        assert_eq!(run(&f), Err(Verdict::Drop(Counter::DropTruncatedL3)));
        let mut bad = ipv4(6, 5, 0, &tcp(1, 2));
        bad[0] = 0x44; // IHL 4 < 5
        assert_eq!(
            run(&frame(&[&eth(0x0800), &bad])),
            Err(Verdict::Drop(Counter::DropBadIpHeader))
        );
        let mut v6_in_v4 = ipv4(6, 5, 0, &tcp(1, 2));
        v6_in_v4[0] = 0x65;
        assert_eq!(
            run(&frame(&[&eth(0x0800), &v6_in_v4])),
            Err(Verdict::Drop(Counter::DropBadIpHeader))
        );
        let short_tcp = ipv4(6, 5, 0, &tcp(1, 2)[..10]);
        assert_eq!(
            run(&frame(&[&eth(0x0800), &short_tcp])),
            Err(Verdict::Drop(Counter::DropTruncatedL4))
        );
        let mut bad_doff = tcp(1, 2);
        bad_doff[12] = 4 << 4;
        assert_eq!(
            run(&frame(&[&eth(0x0800), &ipv4(6, 5, 0, &bad_doff)])),
            Err(Verdict::Drop(Counter::DropBadL4Header))
        );
        // Options claimed but missing: the packet is shorter than its total length.
        let f = frame(&[&eth(0x0800), &ipv4(6, 15, 0, &[])]);
        assert_eq!(
            run(&f[..f.len() - 30]),
            Err(Verdict::Drop(Counter::DropTruncatedL3))
        );
        assert_eq!(
            run(&frame(&[&eth(0x0800), &ipv4(1, 5, 0, &[8, 0, 0, 0])])),
            Err(Verdict::Pass(Counter::PassNotTcpUdp))
        );
        // First and later fragments of one datagram: the same portless key.
        let first = run(&frame(&[&eth(0x0800), &ipv4(17, 5, 0x2000, &udp(1, 2))])).expect("first");
        let later = run(&frame(&[&eth(0x0800), &ipv4(17, 5, 0x0010, &[])])).expect("later");
        assert_eq!(first, later);
        assert_eq!((first.src_port, first.dst_port), (0, 0));
        assert_eq!(
            run(&frame(&[&eth(0x0800), &ipv4(1, 5, 0x0010, &[])])),
            Err(Verdict::Pass(Counter::PassIpv4Fragment))
        );
    }

    /// With the VIP filter: what goes to another address passes right after the IP header,
    /// however malformed the rest; to a VIP the same packet is a counted drop. ICMP is read
    /// first whatever its address (an error's flow is the one it quotes).
    #[test]
    fn the_vip_filter_passes_other_addresses_after_the_ip_header() {
        let vip = [10, 0, 0, 100];
        let mut vips = VipFilter::EMPTY;
        vips.add(&lb_common::ServiceKey::new(
            4,
            6,
            [10, 0, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            0,
        ));
        let mut vip6 = [0u8; 16];
        vip6[15] = 0x64;
        vips.add(&lb_common::ServiceKey::new(6, 17, vip6, 0));
        let ours = |bytes: &[u8]| {
            let start = bytes.as_ptr() as usize;
            parse_flow(&Frame::new(start, start + bytes.len()), Some(&vips)).map(|f| f.key)
        };
        let to = |dst: [u8; 4], mut packet: Vec<u8>| {
            packet[16..20].copy_from_slice(&dst);
            frame(&[&eth(0x0800), &packet])
        };
        let other = [10, 0, 0, 7];
        let short_tcp = ipv4(6, 5, 0, &tcp(1, 2)[..10]);
        assert_eq!(
            ours(&to(vip, short_tcp.clone())),
            Err(Verdict::Drop(Counter::DropTruncatedL4))
        );
        assert_eq!(
            ours(&to(other, short_tcp)),
            Err(Verdict::Pass(Counter::PassNotVip))
        );
        let mut bad_ihl = ipv4(17, 5, 0, &udp(1, 2));
        bad_ihl[0] = 0x44;
        assert_eq!(
            ours(&to(vip, bad_ihl.clone())),
            Err(Verdict::Drop(Counter::DropBadIpHeader))
        );
        assert_eq!(ours(&to(other, bad_ihl)), Err(Verdict::Pass(Counter::PassNotVip)));
        // No IPv4 header (another version, or cut short): no address to ask about.
        let mut v5 = ipv4(6, 5, 0, &tcp(1, 2));
        v5[0] = 0x55;
        assert_eq!(ours(&to(other, v5)), Err(Verdict::Drop(Counter::DropBadIpHeader)));
        assert_eq!(
            ours(&to(other, ipv4(6, 5, 0, &[]))[..30]),
            Err(Verdict::Drop(Counter::DropTruncatedL3))
        );
        assert!(ours(&to(vip, ipv4(6, 5, 0, &tcp(1, 2)))).is_ok());
        // ICMP to another address is still read (select asks the filter about the quote).
        assert!(ours(&to(other, ipv4(1, 5, 0, &[8, 0, 0, 0, 0, 0, 0, 0]))).is_ok());
        // IPv6: the same cut UDP header, to another address and to a VIP.
        let v6 = |last: u8| {
            let mut ip6 = vec![0u8; 40];
            ip6[0] = 0x60;
            ip6[4..6].copy_from_slice(&4u16.to_be_bytes());
            ip6[6] = 17;
            ip6[39] = last;
            frame(&[&eth(0x86dd), &ip6, &[0, 1, 0, 2]])
        };
        assert_eq!(ours(&v6(0x64)), Err(Verdict::Drop(Counter::DropTruncatedL4)));
        assert_eq!(ours(&v6(0x65)), Err(Verdict::Pass(Counter::PassNotVip)));
    }

    #[test]
    fn icmp_errors_map_to_the_quoted_flow_reversed() {
        // The backend's reply VIP:8080 -> client:40000, quoted in a fragmentation-needed
        // error sent to the VIP.
        let mut quoted = ipv4(6, 5, 0, &tcp(8080, 40000));
        quoted[12..16].copy_from_slice(&[10, 0, 0, 100]);
        quoted[16..20].copy_from_slice(&[10, 0, 0, 1]);
        let mut icmp = vec![3, 4, 0, 0, 0, 0, 0x05, 0xdc];
        icmp.extend_from_slice(&quoted[..28]);
        let mut outer = ipv4(1, 5, 0, &icmp);
        outer[12..16].copy_from_slice(&[192, 0, 2, 1]);
        let f = frame(&[&eth(0x0800), &outer]);
        let start = f.as_ptr() as usize;
        let flow = parse_flow(&Frame::new(start, start + f.len()), None).expect("parsed");
        assert_eq!(flow.kind, FlowKind::IcmpError);
        let k = flow.key;
        assert_eq!(lb_common::addr_bytes(k.src_addr)[..4], [10, 0, 0, 1]);
        assert_eq!(lb_common::addr_bytes(k.dst_addr)[..4], [10, 0, 0, 100]);
        assert_eq!(
            (u16::from_be(k.src_port), u16::from_be(k.dst_port)),
            (40000, 8080)
        );
        assert_eq!(k.proto, 6);

        // Quoting a packet from another address than the one the error is sent to: not ours.
        let mut other = outer.clone();
        other[16..20].copy_from_slice(&[10, 0, 0, 7]);
        assert_eq!(
            run(&frame(&[&eth(0x0800), &other])),
            Err(Verdict::Pass(Counter::PassNotTcpUdp))
        );
        // The fuzzer's find: an error whose own length ends before the quote's 8 bytes of
        // ports (the frame still holds them, as padding) is not used.
        let mut short = outer.clone();
        short[2..4].copy_from_slice(&(20u16 + 8 + 20 + 4).to_be_bytes());
        assert_eq!(
            run(&frame(&[&eth(0x0800), &short])),
            Err(Verdict::Pass(Counter::PassNotTcpUdp))
        );
        // An echo request is its own kind; an echo reply is not ours.
        let mut echo = outer.clone();
        echo[20] = 8;
        echo[21] = 0;
        let f = frame(&[&eth(0x0800), &echo]);
        let start = f.as_ptr() as usize;
        let flow = parse_flow(&Frame::new(start, start + f.len()), None).expect("echo");
        assert_eq!(flow.kind, FlowKind::Echo);
        assert_eq!(lb_common::addr_bytes(flow.key.dst_addr)[..4], [10, 0, 0, 100]);
        echo[20] = 0;
        assert_eq!(
            run(&frame(&[&eth(0x0800), &echo])),
            Err(Verdict::Pass(Counter::PassNotTcpUdp))
        );
    }
}
