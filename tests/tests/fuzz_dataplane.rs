//! Generated frames through the balancer (BPF_PROG_TEST_RUN), each checked against a model.
//!
//! The model is the host build of the data plane's own parser (`lb_ebpf::parse_flow`) plus the
//! map state (VIP filter, services, connection table) read from the kernel before each case: it
//! says whether the program must pass the frame unchanged, drop it unchanged, or forward it
//! (L2 DSR: the MACs rewritten, nothing else), and which counters move. An independent check
//! of the frame's own length fields backs the rule that a malformed frame is never forwarded,
//! so a parser that let one through would fail here even though the model shares its code.
//! Likewise for the VIP filter's place right after the IP header: a dropped frame must be one the
//! filter may let through, read from its own bytes (`dropped_only_if_ours`), so malformed
//! traffic to other addresses is left to the kernel.
//!
//! Scope: the balancer in L2 DSR, IPIP, GUE, NAT and SNAT modes (one test each, in a namespace
//! of its own; the tunnels' backends are routed, so their frames are redirected with the outer
//! header the model builds), with services for both families and protocols, echo replies off,
//! IPv4 UDP fragments hashed to a backend (not for NAT) and the others passed. For NAT the
//! model reads the connection entries from the kernel before each case: a request or reply of a
//! known connection is translated to its entry's tuple, a new one (TCP only with a SYN) to the
//! backend, from the SNAT address and the first free port of the probe sequence with SNAT; the
//! checksums must say after translation what they said before (`checksums_follow`). NAT
//! templates add requests from a few client ports and the backends' replies, so connections
//! recur. ICMP errors about NAT connections are left to the golden tests. `LB_FUZZ_CASES` sets
//! the number of cases per mode (default 100,000 for DSR, 25,000 for each other mode),
//! `LB_FUZZ_SEED` replays a run; the seed is printed. The decapsulator has a test of its own: tunnel packets of both
//! families (IPIP and GUE, for local VIPs and others) and everything else, mutated alike,
//! against the shared reading of a tunnel packet (`lb_ebpf::tunnel`).

use lb_common::{
    Counter, NatEntry, ServiceKey, ServiceValue, VipFilter, addr_words,
    dpconfig::encap_variation,
    service::{FWD_DSR_L2, FWD_GUE, FWD_IPIP, FWD_NAT, FWD_SNAT},
};
use lb_ebpf::{Flow, FlowKind, Frame, Verdict, parse_flow};
use lb_tests::{
    NetNs,
    fixture::{Balancer, Decapsulator, dsr_backend, nat_backend, routed_backend},
    in_ns,
    packets::{
        BACKEND4, BACKEND6, CLIENT_MAC, CLIENT4, CLIENT6, ENCAP_SRC4, ENCAP_SRC6, LB_MAC, NAT_B4, NAT_B6,
        ROUTER_MAC, SNAT4, SNAT6, VIP4, VIP6, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, checksum, eth,
        fix_ipv4_checksum, fix_l4_checksum, ipv4, ipv6, pseudo_checksum, tcp, udp, words,
    },
};
use proptest::{
    prelude::*,
    test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner},
};

const B1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb1];
const OTHER4: [u8; 4] = [10, 200, 0, 7];
const OTHER6: [u8; 16] = [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
const TABLE: u32 = 13;
const GUE_PORT: u16 = lb_userspace::config::DEFAULT_GUE_PORT;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Dsr,
    Ipip,
    Gue,
    Nat,
    Snat,
}

/// The NAT backends' port and the SNAT port range.
const SNAT_FIRST: u16 = 40000;
const SNAT_COUNT: u32 = 64;
const NAT_PORT: u16 = 8080;
/// Client ports of the NAT templates: few, so connections recur and replies find entries.
const NAT_CLIENT_PORTS: u16 = 24;

impl Mode {
    fn nat(self) -> bool {
        matches!(self, Mode::Nat | Mode::Snat)
    }
}

/// The balancer set up for one mode, and what the model knows of that setup.
struct Subject {
    mode: Mode,
    lb: Balancer,
    /// The VIP filter as written, which the model asks as the program does.
    filter: VipFilter,
    vips: Vec<([u32; 4], u8)>,
}

impl Subject {
    /// The services in `mode`; for the tunnels, in a namespace where `ipip_routes` may run.
    fn new(mode: Mode) -> Self {
        let mut lb = Balancer::load().expect("load lb");
        // Slot 1: a backend on lo (test_run's ingress), so forwarding is XDP_TX.
        lb.backends.set(1, dsr_backend(B1_MAC, 1), 0).expect("backend");
        lb.pool.write(0, &[1; TABLE as usize]).expect("pool");
        let forward = match mode {
            Mode::Dsr => FWD_DSR_L2,
            Mode::Ipip => FWD_IPIP,
            Mode::Gue => FWD_GUE,
            Mode::Nat => FWD_NAT,
            Mode::Snat => FWD_SNAT,
        };
        if mode.nat() {
            // Slot 1 the IPv4 backend, slot 2 the IPv6 one (the v6 services' table at offset
            // TABLE), both on lo (test_run's ingress): forwarding is XDP_TX.
            for (slot, addr) in [(1u32, &NAT_B4[..]), (2, &NAT_B6[..])] {
                lb.backends
                    .set(slot, nat_backend(addr, NAT_PORT, 1, B1_MAC), 0)
                    .expect("backend");
            }
            lb.pool.write(TABLE, &[2; TABLE as usize]).expect("pool");
            lb.snat_ports(SNAT_FIRST, SNAT_COUNT).expect("config");
        }
        if matches!(mode, Mode::Ipip | Mode::Gue) {
            // Routed backends: slot 1 (IPv4) and slot 2 (IPv6, the v6 services' table at
            // offset TABLE); the next hop comes from the FIB.
            for (slot, addr) in [(1u32, &BACKEND4[..]), (2, &BACKEND6[..])] {
                lb.backends.set(slot, routed_backend(addr), 0).expect("backend");
            }
            lb.pool.write(TABLE, &[2; TABLE as usize]).expect("pool");
            lb.route_tunnels().expect("tunnels");
        }
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&VIP4);
        let mut vips = Vec::new();
        // Every service on the one table at offset 0, in L2 DSR.
        let service = |id: u32, family: u8| ServiceValue {
            id,
            table_offset: if family == 6 && mode != Mode::Dsr {
                TABLE
            } else {
                0
            },
            table_size: TABLE,
            forward,
            ..Default::default()
        };
        for (id, (family, proto, addr, port)) in [
            (4u8, 6u8, v4, 80u16),
            (4, 17, v4, 53),
            (6, 6, VIP6, 80),
            (6, 17, VIP6, 53),
        ]
        .into_iter()
        .enumerate()
        {
            let key = ServiceKey::new(family, proto, addr, port.to_be());
            lb.add_service(key, service(id as u32, family)).expect("service");
            vips.push((key.addr, family));
        }
        if mode.nat() {
            lb.mark_nat(&[&VIP4, &VIP6, &NAT_B4, &NAT_B6]).expect("filter");
        }
        // IPv4 UDP fragments hash to a backend (`fragments = "hash"`); the others pass. (Not
        // for NAT: a fragment has no ports to translate.)
        if !mode.nat() {
            let frag_key = ServiceKey::new(4, 17, v4, 0);
            lb.fragment_services
                .insert(frag_key, service(9, 4), 0)
                .expect("fragment service");
        }
        let filter = lb.vip_filter.get(&0, 0).expect("filter");
        Self {
            mode,
            lb,
            filter,
            vips,
        }
    }
}

/// What the program must do with a frame.
#[derive(Debug)]
struct Expect {
    /// A NAT translation of this flow: its checksum fields are checked by
    /// `checksums_follow`, not byte for byte.
    nat: Option<Flow>,
    action: u32,
    /// The counters that move by one; every other stays still.
    counters: Vec<Counter>,
    /// The frame out: the input unchanged, or with the MACs rewritten.
    output: Vec<u8>,
}

/// Whether `input` is a SYN whose tuple has an embryonic entry: if that entry is younger than
/// `SYN_RETRANSMIT_WINDOW`, the SYN is a retransmit and inserts nothing. Its age is the data
/// plane's coarse clock at the moment it runs, so the comparison takes either outcome.
fn retransmit_may_skip_insert(dp: &Subject, input: &[u8]) -> bool {
    let frame = Frame::new(input.as_ptr() as usize, input.as_ptr() as usize + input.len());
    match parse_flow(&frame, Some(&dp.filter)) {
        Ok(flow) => {
            matches!(flow.kind, FlowKind::Transport { syn: true, .. })
                && dp.lb.embryonic.get(&flow.key, 0).is_ok()
        }
        Err(_) => false,
    }
}

fn model(dp: &Subject, input: &[u8]) -> Expect {
    let frame = Frame::new(input.as_ptr() as usize, input.as_ptr() as usize + input.len());
    let same = input.to_vec();
    let pass = |c| Expect {
        nat: None,
        action: XDP_PASS,
        counters: vec![c],
        output: same.clone(),
    };
    let flow: Flow = match parse_flow(&frame, Some(&dp.filter)) {
        Ok(flow) => flow,
        Err(Verdict::Pass(c)) => return pass(c),
        Err(Verdict::Drop(c)) => {
            return Expect {
                nat: None,
                action: XDP_DROP,
                counters: vec![c],
                output: same,
            };
        }
        Err(v) => panic!("the parser decided {v:?} on its own"),
    };
    let key = &flow.key;
    if dp.mode.nat()
        && matches!(flow.kind, FlowKind::Transport { .. } | FlowKind::IcmpError)
        && (dp.filter.may_be_nat(VipFilter::bit(&key.dst_addr))
            || dp.filter.may_be_nat(VipFilter::bit(&key.src_addr)))
        && let Ok(e) = dp.lb.nat.get(key, 0)
    {
        let (dst_mac, src_mac) = if e.is_reply() {
            (e.dst_mac, e.src_mac)
        } else {
            (B1_MAC, LB_MAC)
        };
        if flow.kind == FlowKind::IcmpError {
            return Expect {
                nat: Some(flow),
                action: XDP_TX,
                counters: vec![Counter::IcmpErrorForwarded, Counter::Tx],
                output: translated_icmp(input, &flow, &e, dst_mac, src_mac),
            };
        }
        let counters = if e.is_reply() {
            vec![Counter::NatReply, Counter::Tx]
        } else {
            vec![Counter::Tx]
        };
        return Expect {
            nat: Some(flow),
            action: XDP_TX,
            counters,
            output: translated(input, &flow, &e, dst_mac, src_mac),
        };
    }
    let may_be_vip = dp.filter.may_be_vip(VipFilter::bit(&key.dst_addr));
    if !may_be_vip {
        return pass(Counter::PassNotVip);
    }
    match flow.kind {
        FlowKind::Echo => {
            let own = dp.vips.iter().any(|&(a, f)| a == key.dst_addr && f == key.family);
            pass(if own {
                Counter::PassNotTcpUdp
            } else {
                Counter::PassNotVip
            })
        }
        FlowKind::Fragment => {
            let fkey = ServiceKey::from_words(key.family, key.proto, key.dst_addr, 0);
            if dp.lb.fragment_services.get(&fkey, 0).is_err() {
                return pass(if key.family == 4 {
                    Counter::PassIpv4Fragment
                } else {
                    Counter::PassIpv6Fragment
                });
            }
            forward(dp.mode, &flow, same, vec![Counter::FragmentForwarded])
        }
        FlowKind::Transport { .. } | FlowKind::IcmpError => {
            let mut counters = Vec::new();
            let searched = !matches!(flow.kind, FlowKind::Transport { syn: true, .. });
            let icmp = flow.kind == FlowKind::IcmpError;
            let mut inserts = false;
            if searched && dp.lb.conntrack.get(key, 0).is_ok() {
                counters.push(Counter::ConntrackHit);
            } else if searched && dp.lb.embryonic.get(key, 0).is_ok() {
                // A flow of one packet: an ICMP error follows it; its next packet moves it.
                if !icmp {
                    counters.push(Counter::EmbryonicPromoted);
                }
                counters.push(Counter::ConntrackHit);
            } else {
                let skey = ServiceKey::from_words(key.family, key.proto, key.dst_addr, key.dst_port);
                if dp.lb.services.get(&skey, 0).is_err() {
                    return pass(Counter::PassNotVip);
                }
                counters.push(Counter::ConntrackMiss);
                // Its first packet is remembered (a SYN that retransmits one too fresh is not,
                // and counts as a retransmit: see `retransmit_may_skip_insert`).
                inserts = !icmp;
            }
            if dp.mode.nat() {
                return nat_open(dp, input, &flow, counters);
            }
            if inserts {
                counters.push(Counter::EmbryonicInsert);
            }
            if flow.kind == FlowKind::IcmpError {
                counters.push(Counter::IcmpErrorForwarded);
            }
            forward(dp.mode, &flow, same, counters)
        }
    }
}

/// Forwarded in `mode`. L2 DSR: sent back out to backend 1 with the MACs rewritten, nothing
/// else. IPIP/GUE: redirected to the router with the outer header in front of the IP packet
/// (any VLAN tags gone; trailing Ethernet padding kept, outside the outer lengths).
fn forward(mode: Mode, flow: &Flow, mut output: Vec<u8>, mut counters: Vec<Counter>) -> Expect {
    if mode == Mode::Dsr {
        output[..6].copy_from_slice(&B1_MAC);
        output[6..12].copy_from_slice(&LB_MAC);
        counters.push(Counter::Tx);
        return Expect {
            nat: None,
            action: XDP_TX,
            counters,
            output,
        };
    }
    let inner = &output[flow.l3()..];
    let key = &flow.key;
    let v4 = key.family == 4;
    // The inner packet's own length, as its header says (the parser checked it fits).
    let own = if v4 {
        u16::from_be_bytes([inner[2], inner[3]]) as usize
    } else {
        40 + u16::from_be_bytes([inner[4], inner[5]]) as usize
    };
    let variation = encap_variation(key.src_addr[0], key.src_port);
    let gue = mode == Mode::Gue;
    let tunnel = |proto: u8| {
        let mut h = Vec::new();
        if gue {
            let sport = 0xc000 | (variation as u16 & 0x3fff);
            h.extend_from_slice(&sport.to_be_bytes());
            h.extend_from_slice(&GUE_PORT.to_be_bytes());
            h.extend_from_slice(&((own + 12) as u16).to_be_bytes());
            h.extend_from_slice(&[0, 0, 0, proto, 0, 0]);
        }
        h
    };
    let outer = if v4 {
        let v = (variation as u16).to_be_bytes();
        let src = [ENCAP_SRC4[0], ENCAP_SRC4[1], v[0], v[1]];
        let t = tunnel(4);
        let proto = if gue { 17 } else { 4 };
        let mut h = ipv4(proto, src, BACKEND4, &vec![0u8; t.len() + own]);
        h.truncate(20);
        h[1] = inner[1];
        h[4..6].copy_from_slice(&[0, 0]);
        fix_ipv4_checksum(&mut h);
        [h, t].concat()
    } else {
        let mut src = ENCAP_SRC6;
        src[12..].copy_from_slice(&variation.to_be_bytes());
        let t = tunnel(41);
        let next = if gue { 17 } else { 41 };
        let mut h = ipv6(next, src, BACKEND6, &vec![0u8; t.len() + own]);
        h.truncate(40);
        let tc = (inner[0] & 0x0f) << 4 | inner[1] >> 4;
        let first = 6u32 << 28 | u32::from(tc) << 20 | (variation & 0xf_ffff);
        h[..4].copy_from_slice(&first.to_be_bytes());
        [h, t].concat()
    };
    let ethertype = if v4 { 0x0800 } else { 0x86dd };
    let output = [eth(ROUTER_MAC, LB_MAC, ethertype), outer, inner.to_vec()].concat();
    counters.push(Counter::Redirect);
    Expect {
        nat: None,
        action: XDP_REDIRECT,
        counters,
        output,
    }
}

/// Independent of the parser: whether a frame the program forwarded is well-formed by its own
/// length fields (IPv4: IHL ≥ 5, IHL × 4 ≤ total length ≤ what follows Ethernet; IPv6: 40 +
/// payload length ≤ that; the TCP header, with its data offset, or the UDP header within the
/// IP payload; an ICMP error's quote holds its IP header and 8 bytes).
fn well_formed(f: &[u8]) -> Result<(), String> {
    let mut l3 = 14;
    let mut ethertype = u16::from_be_bytes([f[12], f[13]]);
    if ethertype == 0x8100 || ethertype == 0x88a8 {
        ethertype = u16::from_be_bytes([*f.get(16).ok_or("cut tag")?, *f.get(17).ok_or("cut tag")?]);
        l3 = 18;
    }
    let ip = f.get(l3..).ok_or("no IP header")?;
    let (proto, l4) = match ethertype {
        0x0800 => {
            let ihl = (*ip.first().ok_or("no IPv4")? & 0xf) as usize * 4;
            let total = u16::from_be_bytes([*ip.get(2).ok_or("cut")?, *ip.get(3).ok_or("cut")?]) as usize;
            if ihl < 20 || total < ihl || total > ip.len() {
                return Err(format!("IPv4 ihl {ihl} total {total} in {} bytes", ip.len()));
            }
            // A fragment carries no transport header, or only part of one.
            if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
                return Ok(());
            }
            (ip[9], &ip[ihl..total])
        }
        0x86dd => {
            if ip.len() < 40 {
                return Err("IPv6 header cut".into());
            }
            let payload = u16::from_be_bytes([ip[4], ip[5]]) as usize;
            if 40 + payload > ip.len() {
                return Err(format!("IPv6 payload {payload} in {} bytes", ip.len() - 40));
            }
            (ip[6], &ip[40..40 + payload])
        }
        t => return Err(format!("ethertype {t:#06x} forwarded")),
    };
    match proto {
        44 => {}
        6 => {
            let doff = (*l4.get(12).ok_or("TCP header cut")? >> 4) as usize * 4;
            if l4.len() < 20 || doff < 20 || doff > l4.len() {
                return Err(format!("TCP data offset {doff} in a {}-byte segment", l4.len()));
            }
        }
        17 if l4.len() < 8 => return Err("UDP header cut".into()),
        17 => {}
        1 | 58 => {
            // An ICMP error: its quote must hold an IP header and the 8 bytes after it.
            let quote = l4.get(8..).ok_or("ICMP header cut")?;
            let needed = if proto == 1 {
                (*quote.first().ok_or("empty quote")? & 0xf) as usize * 4 + 8
            } else {
                48
            };
            if quote.len() < needed {
                return Err(format!("ICMP quote of {} bytes", quote.len()));
            }
        }
        p => return Err(format!("protocol {p} forwarded")),
    }
    Ok(())
}

/// The frame's own bytes, apart from the parser: a frame the balancer drops has no whole IP header
/// of its ethertype's version (nothing to ask the filter about), or is ICMP (an error is asked
/// about by the flow it quotes), or is from and to addresses the VIP filter may let through.
/// Anything else goes to the kernel, however malformed past the IP header.
fn dropped_only_if_ours(f: &[u8], filter: &VipFilter) -> Result<(), String> {
    let (mut l3, mut ethertype) = (14, u16::from_be_bytes([f[12], f[13]]));
    if ethertype == 0x8100 || ethertype == 0x88a8 {
        let Some(t) = f.get(16..18) else { return Ok(()) };
        (l3, ethertype) = (18, u16::from_be_bytes([t[0], t[1]]));
    }
    let ip = &f[l3.min(f.len())..];
    let addr = |at: usize, len: usize| {
        let mut a = [0u8; 16];
        a[..len].copy_from_slice(&ip[at..at + len]);
        addr_words(a)
    };
    let (src, dst) = match ethertype {
        0x0800 if ip.len() >= 20 && ip[0] >> 4 == 4 && ip[9] != 1 => (addr(12, 4), addr(16, 4)),
        0x86dd if ip.len() >= 40 && ip[0] >> 4 == 6 && ip[6] != 58 => (addr(8, 16), addr(24, 16)),
        _ => return Ok(()),
    };
    if filter.may_be_ours(&src, &dst) {
        return Ok(());
    }
    Err(format!(
        "{src:08x?} -> {dst:08x?}, addresses the VIP filter clears"
    ))
}

fn icmp4_error(quoted: &[u8]) -> Vec<u8> {
    let mut m = vec![3, 4, 0, 0, 0, 0, 0x05, 0xdc];
    m.extend_from_slice(quoted);
    m
}

fn icmp6_error(quoted: &[u8]) -> Vec<u8> {
    let mut m = vec![2, 0, 0, 0, 0, 0, 0x05, 0x00];
    m.extend_from_slice(quoted);
    m
}

/// A valid frame of one kind, before mutation.
fn template() -> impl Strategy<Value = Vec<u8>> {
    (
        0u8..13,
        any::<bool>(),
        prop_oneof![Just(80u16), Just(53), any::<u16>()],
        1024u16..65535,
        0u8..3,
        prop::collection::vec(any::<u8>(), 0..40),
    )
        .prop_map(|(kind, to_vip, dport, sport, tags, payload)| {
            let dst4 = if to_vip { VIP4 } else { OTHER4 };
            let dst6 = if to_vip { VIP6 } else { OTHER6 };
            let flags = [0x02u8, 0x10, 0x12, 0x11, 0x04][kind as usize % 5];
            let (ethertype, l3) = match kind {
                0 | 1 => (
                    0x0800,
                    ipv4(6, CLIENT4, dst4, &[tcp(sport, dport, flags), payload].concat()),
                ),
                2 => (0x0800, ipv4(17, CLIENT4, dst4, &udp(sport, dport, &payload))),
                3 | 4 => (
                    0x86dd,
                    ipv6(6, CLIENT6, dst6, &[tcp(sport, dport, flags), payload].concat()),
                ),
                5 => (0x86dd, ipv6(17, CLIENT6, dst6, &udp(sport, dport, &payload))),
                6 => (0x0800, ipv4(1, CLIENT4, dst4, &[8, 0, 0, 0, 0, 1, 0, 1])),
                7 => (0x86dd, ipv6(58, CLIENT6, dst6, &[128, 0, 0, 0, 0, 1, 0, 1])),
                8 => {
                    // The backend's reply as the client's stack quotes it.
                    let quoted = ipv4(6, dst4, CLIENT4, &tcp(dport, sport, 0x12));
                    (0x0800, ipv4(1, [192, 0, 2, 1], dst4, &icmp4_error(&quoted[..28])))
                }
                9 => {
                    let quoted = ipv6(17, dst6, CLIENT6, &udp(dport, sport, &payload));
                    let n = quoted.len().min(48);
                    (0x86dd, ipv6(58, CLIENT6, dst6, &icmp6_error(&quoted[..n])))
                }
                10 => {
                    // An IPv4 fragment (more fragments set).
                    let mut p = ipv4(17, CLIENT4, dst4, &udp(sport, dport, &payload));
                    p[6] = 0x20;
                    lb_tests::packets::fix_ipv4_checksum(&mut p);
                    (0x0800, p)
                }
                11 => {
                    // An IPv6 first fragment (fragment header, more fragments set) of UDP.
                    let frag = [&[17u8, 0, 0, 1, 0, 0, 0, 7][..], &udp(sport, dport, &payload)].concat();
                    (0x86dd, ipv6(44, CLIENT6, dst6, &frag))
                }
                _ => (0x0806, vec![0u8; 28]),
            };
            let mut f = eth(LB_MAC, CLIENT_MAC, if tags > 0 { 0x8100 } else { ethertype });
            for t in 0..tags {
                let next = if t + 1 < tags { 0x8100 } else { ethertype };
                f.extend_from_slice(&[0, 5]);
                f.extend_from_slice(&u16::to_be_bytes(next));
            }
            f.extend_from_slice(&l3);
            f
        })
}

#[derive(Clone, Debug)]
enum Mutation {
    Truncate(usize),
    Flip(usize, u8),
    /// A 16-bit field at an offset from the IP header, set to a boundary value.
    Field16(usize, u16),
    /// A byte at an offset from the IP header (IHL, data offset, flags, next header).
    Field8(usize, u8),
    /// A random frame in place of the template.
    Random(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let boundary16 = prop_oneof![
        Just(0u16),
        Just(1),
        Just(7),
        Just(8),
        Just(19),
        Just(20),
        Just(27),
        Just(28),
        Just(39),
        Just(40),
        Just(41),
        Just(60),
        Just(1500),
        Just(u16::MAX),
        any::<u16>()
    ];
    let boundary8 = prop_oneof![
        Just(0u8),
        Just(0x40),
        Just(0x44),
        Just(0x45),
        Just(0x46),
        Just(0x4f),
        Just(0x50),
        Just(0x60),
        Just(0xf0),
        Just(0x20),
        Just(0x3f),
        Just(0x1f),
        Just(44),
        Just(0),
        any::<u8>()
    ];
    prop_oneof![
        3 => (0usize..200).prop_map(Mutation::Truncate),
        3 => (0usize..200, any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        // Total length / payload length (2 or 4), fragment word (6), UDP length (IP + 24/44),
        // the L4 ports and checksums.
        3 => (prop_oneof![Just(2usize), Just(4), Just(6), Just(24), Just(44), Just(0)], boundary16)
            .prop_map(|(o, v)| Mutation::Field16(o, v)),
        // Version/IHL (0), next header (6), TTL/proto (9), TCP data offset (32 / 52).
        3 => (prop_oneof![Just(0usize), Just(6), Just(9), Just(32), Just(52), Just(20), Just(40)], boundary8)
            .prop_map(|(o, v)| Mutation::Field8(o, v)),
        1 => prop::collection::vec(any::<u8>(), 14..160).prop_map(Mutation::Random),
    ]
}

fn apply(mut f: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    let l3 = if f.len() >= 14 && f[12..14] == [0x81, 0x00] {
        18
    } else {
        14
    };
    for m in muts {
        match m {
            Mutation::Truncate(n) => f.truncate((*n).max(14)),
            Mutation::Flip(i, b) => {
                if let Some(x) = f.get_mut(*i) {
                    *x ^= b | 1;
                }
            }
            Mutation::Field16(o, v) => {
                if let Some(x) = f.get_mut(l3 + o..l3 + o + 2) {
                    x.copy_from_slice(&v.to_be_bytes());
                }
            }
            Mutation::Field8(o, v) => {
                if let Some(x) = f.get_mut(l3 + o) {
                    *x = *v;
                }
            }
            Mutation::Random(r) => f = r.clone(),
        }
    }
    f
}

fn verdict_counter(c: Counter) -> bool {
    let n = c.name();
    n == "tx" || n == "redirect" || n.starts_with("pass_") || n.starts_with("drop_")
}

#[test]
fn generated_frames_match_the_model_in_l2_dsr() {
    fuzz(Mode::Dsr, 100_000);
}

#[test]
fn generated_frames_match_the_model_in_ipip() {
    fuzz(Mode::Ipip, 25_000);
}

#[test]
fn generated_frames_match_the_model_in_gue() {
    fuzz(Mode::Gue, 25_000);
}

#[test]
fn generated_frames_match_the_model_in_nat() {
    fuzz(Mode::Nat, 25_000);
}

#[test]
fn generated_frames_match_the_model_in_snat() {
    fuzz(Mode::Snat, 25_000);
}

/// `LB_FUZZ_CASES`, or `default`.
fn fuzz_cases(default: u32) -> u32 {
    std::env::var("LB_FUZZ_CASES")
        .ok()
        .map(|v| v.parse().expect("LB_FUZZ_CASES: a number"))
        .unwrap_or(default)
}

/// `LB_FUZZ_SEED`, or one from the clock.
fn fuzz_seed() -> u64 {
    std::env::var("LB_FUZZ_SEED")
        .ok()
        .map(|v| v.parse().expect("LB_FUZZ_SEED: a number"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}

/// `shrink`: off where a case leaves state behind (NAT entries), as a shrunk case would then
/// meet what the failing one made and fail for another reason.
fn runner(cases: u32, seed: u64, shrink: bool) -> TestRunner {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: if shrink { 2000 } else { 0 },
        ..Config::default()
    };
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes))
}

fn fuzz(mode: Mode, default_cases: u32) {
    let ns = NetNs::new("fuzz").expect("netns");
    in_ns(&ns, || {
        let cases = fuzz_cases(default_cases);
        let seed = fuzz_seed();
        println!("fuzz {mode:?}: {cases} cases, LB_FUZZ_SEED={seed}");
        let dp = Subject::new(mode);
        let mut runner = runner(cases, seed, !mode.nat());
        let frames = if mode.nat() {
            prop_oneof![template(), nat_template()].boxed()
        } else {
            template().boxed()
        };
        let strategy = (frames, prop::collection::vec(mutation(), 0..3));
        let start_counters = dp.lb.counters();
        let before = std::cell::RefCell::new(start_counters.clone());
        let (ran, forwarded) = (std::cell::Cell::new(0u64), std::cell::Cell::new(0u64));
        let (opened, replies) = (std::cell::Cell::new(0u64), std::cell::Cell::new(0u64));
        let icmp_translated = std::cell::Cell::new(0u64);
        let result = runner.run(&strategy, |(template, muts)| {
            let input = apply(template, &muts);
            let mut want = model(&dp, &input);
            let maybe_retransmit = retransmit_may_skip_insert(&dp, &input);
            opened.set(opened.get() + u64::from(want.counters.contains(&Counter::NatCreated)));
            replies.set(replies.get() + u64::from(want.counters.contains(&Counter::NatReply)));
            icmp_translated.set(
                icmp_translated.get() + u64::from(want.nat.is_some_and(|f| f.kind == FlowKind::IcmpError)),
            );
            let (action, output) = dp.lb.run(&input);
            if let (Some(flow), XDP_TX) = (want.nat, action) {
                // The checksums as the program wrote them, checked for what they say.
                let icmp = flow.kind == FlowKind::IcmpError;
                let follow = if icmp {
                    icmp_checksums_follow(&input, &output, &flow)
                } else {
                    checksums_follow(&input, &output, &flow)
                };
                follow.map_err(|e| TestCaseError::fail(format!("NAT checksums: {e}; input {input:02x?}")))?;
                if icmp {
                    copy_icmp_checksums(&output, &mut want.output, &flow);
                } else {
                    copy_checksums(&output, &mut want.output, &flow);
                }
            }
            let after = dp.lb.counters();
            let moved: Vec<(Counter, u64)> = Counter::ALL
                .iter()
                .zip(after.iter().zip(before.borrow().iter()))
                .filter(|(_, (a, b))| a != b)
                .map(|(&c, (a, b))| (c, a - b))
                .collect();
            *before.borrow_mut() = after;
            ran.set(ran.get() + 1);
            prop_assert_eq!(action, want.action, "verdict; input {:02x?}", input);
            prop_assert_eq!(&output, &want.output, "output bytes; input {:02x?}", input);
            let mut want_moved: Vec<(Counter, u64)> = want.counters.iter().map(|&c| (c, 1)).collect();
            want_moved.sort_by_key(|(c, _)| *c as u32);
            // A retransmit inserts nothing and is counted as such instead of as a miss.
            let mut retransmitted: Vec<(Counter, u64)> = want_moved
                .iter()
                .copied()
                .filter(|&(c, _)| c != Counter::EmbryonicInsert)
                .map(|(c, n)| {
                    let c = if c == Counter::ConntrackMiss {
                        Counter::SynRetransmit
                    } else {
                        c
                    };
                    (c, n)
                })
                .collect();
            retransmitted.sort_by_key(|(c, _)| *c as u32);
            if !(maybe_retransmit && moved == retransmitted) {
                prop_assert_eq!(&moved, &want_moved, "counters; input {:02x?}", input);
            }
            if action == XDP_DROP {
                dropped_only_if_ours(&input, &dp.filter).map_err(|e| {
                    TestCaseError::fail(format!("dropped a frame not ours: {e}; input {input:02x?}"))
                })?;
            }
            if action == XDP_TX || action == XDP_REDIRECT {
                forwarded.set(forwarded.get() + 1);
                well_formed(&input).map_err(|e| {
                    TestCaseError::fail(format!("forwarded a malformed frame: {e}; input {input:02x?}"))
                })?;
            }
            Ok(())
        });
        if let Err(e) = result {
            panic!("{mode:?}: LB_FUZZ_SEED={seed}: {e}");
        }
        // Over the whole run, exactly one verdict per frame.
        let (ran, forwarded) = (ran.get(), forwarded.get());
        let end = dp.lb.counters();
        let verdicts: u64 = Counter::ALL
            .iter()
            .enumerate()
            .filter(|(_, c)| verdict_counter(**c))
            .map(|(i, _)| end[i] - start_counters[i])
            .sum();
        assert_eq!(verdicts, ran, "verdict counters over the run");
        println!("fuzz {mode:?}: {ran} frames, {forwarded} forwarded, every one as the model said");
        if mode.nat() {
            let (opened, replies) = (opened.get(), replies.get());
            let icmp = icmp_translated.get();
            println!(
                "fuzz {mode:?}: {opened} connections opened, {replies} replies and {icmp} ICMP errors translated"
            );
            // SNAT's 64 ports per backend and protocol bound the connections (entries do not
            // expire here): the rest of its new connections are drop_nat_no_port.
            assert!(
                opened >= (ran / 200).min(200) && replies > ran / 200,
                "the NAT paths were hardly reached"
            );
        }
        // The generator must reach both sides of the rule, or the run proves little.
        assert!(
            forwarded > ran / 50,
            "only {forwarded} of {ran} frames were forwarded"
        );
        assert!(forwarded < ran, "every frame was forwarded");
    });
}

/// What the decapsulator must do: pass a tunnel from outside the lab's encapsulation sources
/// or to another host unchanged (counter 2); strip a whole tunnel packet for a local VIP
/// (counter 0), pass one for another address unchanged (counter 1), pass anything else
/// unchanged (no counter).
fn decap_model(input: &[u8]) -> (Vec<u8>, Option<usize>) {
    let frame = Frame::new(input.as_ptr() as usize, input.as_ptr() as usize + input.len());
    let Some(t) = lb_ebpf::tunnel::tunnel(&frame, u32::from(GUE_PORT)) else {
        return (input.to_vec(), None);
    };
    // The outer addresses, read from the bytes (not from `tunnel`).
    let (src, dst) = if t.family == 4 {
        (input[26..28].to_vec(), input[30..34].to_vec())
    } else {
        (input[22..34].to_vec(), input[38..54].to_vec())
    };
    let trusted = if t.family == 4 {
        src[..] == ENCAP_SRC4[..2] && dst[..] == BACKEND4[..]
    } else {
        src[..] == ENCAP_SRC6[..12] && dst[..] == BACKEND6[..]
    };
    if !trusted {
        return (input.to_vec(), Some(2));
    }
    let mut v4 = [0u8; 16];
    v4[..4].copy_from_slice(&VIP4);
    let local = (t.family == 4 && t.inner_dst == addr_words(v4))
        || (t.family == 6 && t.inner_dst == addr_words(VIP6));
    if !local {
        return (input.to_vec(), Some(1));
    }
    let out = [
        &input[..12],
        &t.ethertype.to_ne_bytes()[..],
        &input[14 + t.outer_len..],
    ]
    .concat();
    (out, Some(0))
}

/// Independent of `tunnel`: whether a frame the decapsulator stripped was a whole, unfragmented
/// tunnel packet by its outer length fields, with an inner header of its family inside.
fn whole_tunnel(f: &[u8]) -> Result<(), String> {
    let ip = f.get(14..).ok_or("no IP header")?;
    let (outer_total, ip_len, proto) = match u16::from_be_bytes([f[12], f[13]]) {
        0x0800 => {
            let total = u16::from_be_bytes([*ip.get(2).ok_or("cut")?, *ip.get(3).ok_or("cut")?]) as usize;
            if ip[0] != 0x45 || u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
                return Err("outer IPv4 with options or fragmented".into());
            }
            (total, 20, ip[9])
        }
        0x86dd => {
            let payload = u16::from_be_bytes([*ip.get(4).ok_or("cut")?, *ip.get(5).ok_or("cut")?]) as usize;
            (40 + payload, 40, *ip.get(6).ok_or("cut")?)
        }
        t => return Err(format!("ethertype {t:#06x} stripped")),
    };
    if outer_total > ip.len() {
        return Err(format!("outer length {outer_total} in {} bytes", ip.len()));
    }
    let (inner_at, want) = match proto {
        4 | 41 => (ip_len, if proto == 4 { 4 } else { 6 }),
        17 => {
            let u = ip.get(ip_len..ip_len + 12).ok_or("GUE cut")?;
            let udp_len = u16::from_be_bytes([u[4], u[5]]) as usize;
            if udp_len < 12 || ip_len + udp_len > outer_total {
                return Err(format!("UDP length {udp_len}"));
            }
            (ip_len + 12, if u[9] == 4 { 4 } else { 6 })
        }
        p => return Err(format!("protocol {p} stripped")),
    };
    let inner_len = if want == 4 { 20 } else { 40 };
    if inner_at + inner_len > outer_total || ip[inner_at] >> 4 != want {
        return Err("inner header missing or of another family".into());
    }
    Ok(())
}

/// A template wrapped in an outer IPIP or GUE header of either family (or left as it is).
fn tunnel_template() -> impl Strategy<Value = Vec<u8>> {
    (template(), 0u8..5).prop_map(|(f, outer)| {
        let inner = f[14..].to_vec();
        let gue = |proto: u8| {
            let mut h = Vec::new();
            h.extend_from_slice(&0xc001u16.to_be_bytes());
            h.extend_from_slice(&GUE_PORT.to_be_bytes());
            h.extend_from_slice(&((inner.len() + 12) as u16).to_be_bytes());
            h.extend_from_slice(&[0, 0, 0, proto, 0, 0]);
            [h, inner.clone()].concat()
        };
        let from4 = [172, 16, 1, 2];
        let mut from6 = ENCAP_SRC6;
        from6[15] = 2;
        let (ethertype, l3) = match outer {
            0 => (0x0800, ipv4(4, from4, BACKEND4, &inner)),
            1 => (0x0800, ipv4(17, from4, BACKEND4, &gue(4))),
            2 => (0x86dd, ipv6(41, from6, BACKEND6, &inner)),
            3 => (0x86dd, ipv6(17, from6, BACKEND6, &gue(41))),
            _ => return f,
        };
        [eth(B1_MAC, ROUTER_MAC, ethertype), l3].concat()
    })
}

#[test]
fn generated_frames_match_the_model_in_the_decapsulator() {
    let ns = NetNs::new("fuzzd").expect("netns");
    in_ns(&ns, || {
        let cases = fuzz_cases(25_000);
        let seed = fuzz_seed();
        println!("fuzz decap: {cases} cases, LB_FUZZ_SEED={seed}");
        // VIP4 and VIP6 local, GUE on GUE_PORT, no MAC check.
        let mut decap = Decapsulator::load().expect("load decap");
        decap.gue_port.set(0, u32::from(GUE_PORT), 0).expect("gue port");
        let counts = || [0u32, 1, 2].map(|i| decap.count(i));
        let mut runner = runner(cases, seed, true);
        let start = counts();
        let before = std::cell::RefCell::new(start);
        let (ran, stripped, tunnels) = (
            std::cell::Cell::new(0u64),
            std::cell::Cell::new(0u64),
            std::cell::Cell::new(0u64),
        );
        let result = runner.run(
            &(tunnel_template(), prop::collection::vec(mutation(), 0..3)),
            |(t, muts)| {
                let input = apply(t, &muts);
                let (want, counter) = decap_model(&input);
                let (action, output) = decap.run(&input);
                let after = counts();
                let moved: [u64; 3] = std::array::from_fn(|i| after[i] - before.borrow()[i]);
                *before.borrow_mut() = after;
                ran.set(ran.get() + 1);
                prop_assert_eq!(action, XDP_PASS, "verdict; input {:02x?}", input);
                prop_assert_eq!(&output, &want, "output bytes; input {:02x?}", input);
                let mut want_moved = [0u64; 3];
                if let Some(c) = counter {
                    want_moved[c] = 1;
                    tunnels.set(tunnels.get() + 1);
                }
                prop_assert_eq!(moved, want_moved, "counters; input {:02x?}", input);
                if counter == Some(0) {
                    stripped.set(stripped.get() + 1);
                    whole_tunnel(&input).map_err(|e| {
                        TestCaseError::fail(format!(
                            "stripped a malformed tunnel packet: {e}; input {input:02x?}"
                        ))
                    })?;
                }
                Ok(())
            },
        );
        if let Err(e) = result {
            panic!("decap: LB_FUZZ_SEED={seed}: {e}");
        }
        let end = counts();
        let (ran, stripped) = (ran.get(), stripped.get());
        assert_eq!(
            end.iter().sum::<u64>() - start.iter().sum::<u64>(),
            tunnels.get(),
            "counters over the run"
        );
        println!("fuzz decap: {ran} frames, {stripped} stripped, every one as the model said");
        assert!(
            stripped > ran / 50,
            "only {stripped} of {ran} frames were stripped"
        );
        assert!(stripped < ran, "every frame was stripped");
    });
}

/// A new connection to a NAT service: TCP only with a SYN; its forward entry (client tuple to
/// the backend, from the SNAT address and the first free port of the probe sequence with
/// SNAT) and the reply entry must both be free; the packet goes to the backend translated.
fn nat_open(dp: &Subject, input: &[u8], flow: &Flow, mut counters: Vec<Counter>) -> Expect {
    let key = &flow.key;
    let drop = |mut counters: Vec<Counter>, c| {
        counters.push(c);
        Expect {
            nat: None,
            action: XDP_DROP,
            counters,
            output: input.to_vec(),
        }
    };
    let syn = match flow.kind {
        FlowKind::Transport { syn, .. } => syn,
        _ => return drop(counters, Counter::DropNatNoEntry),
    };
    if key.proto == 6 && !syn {
        return drop(counters, Counter::DropNatNoEntry);
    }
    let v4 = key.family == 4;
    let mut fwd = NatEntry {
        src_addr: key.src_addr,
        dst_addr: if v4 { words(&NAT_B4) } else { words(&NAT_B6) },
        src_port: key.src_port,
        dst_port: NAT_PORT.to_be(),
        ..Default::default()
    };
    if dp.mode == Mode::Snat {
        fwd.src_addr = if v4 { words(&SNAT4) } else { words(&SNAT6) };
        let hash = lb_common::hash::flow_hash(key);
        let free = (0..lb_common::nat::NAT_PORT_PROBES)
            .map(|probe| lb_common::nat::snat_port(hash, probe, SNAT_FIRST, SNAT_COUNT).to_be())
            .find(|&port| {
                fwd.src_port = port;
                dp.lb.nat.get(&fwd.twin_key(key.family, key.proto), 0).is_err()
            });
        let Some(port) = free else {
            return drop(counters, Counter::DropNatNoPort);
        };
        fwd.src_port = port;
    } else if dp.lb.nat.get(&fwd.twin_key(key.family, key.proto), 0).is_ok() {
        return drop(counters, Counter::DropNatCollision);
    }
    counters.push(Counter::NatCreated);
    counters.push(Counter::Tx);
    Expect {
        nat: Some(*flow),
        action: XDP_TX,
        counters,
        output: translated(input, flow, &fwd, B1_MAC, LB_MAC),
    }
}

/// `input` with its addresses and ports set to `to`'s tuple and the MACs given. The checksum
/// fields are left as they came: `checksums_follow` checks them.
fn translated(input: &[u8], flow: &Flow, to: &NatEntry, dst_mac: [u8; 6], src_mac: [u8; 6]) -> Vec<u8> {
    let mut out = input.to_vec();
    out[..6].copy_from_slice(&dst_mac);
    out[6..12].copy_from_slice(&src_mac);
    let l3 = flow.l3();
    let bytes =
        |w: &[u32; 4], n: usize| -> Vec<u8> { w.iter().flat_map(|x| x.to_ne_bytes()).take(n).collect() };
    let l4 = if flow.key.family == 4 {
        out[l3 + 12..l3 + 16].copy_from_slice(&bytes(&to.src_addr, 4));
        out[l3 + 16..l3 + 20].copy_from_slice(&bytes(&to.dst_addr, 4));
        l3 + (out[l3] & 0x0f) as usize * 4
    } else {
        out[l3 + 8..l3 + 24].copy_from_slice(&bytes(&to.src_addr, 16));
        out[l3 + 24..l3 + 40].copy_from_slice(&bytes(&to.dst_addr, 16));
        l3 + 40
    };
    out[l4..l4 + 2].copy_from_slice(&to.src_port.to_ne_bytes());
    out[l4 + 2..l4 + 4].copy_from_slice(&to.dst_port.to_ne_bytes());
    out
}

/// Whether a translated frame's checksums say what the input's said: the IPv4 header's and the
/// TCP/UDP one (with its pseudo-header) sum to what they summed to before (so a right checksum
/// stays right, a wrong one as wrong), and a UDP checksum of 0 stays 0.
fn checksums_follow(input: &[u8], output: &[u8], flow: &Flow) -> Result<(), String> {
    let l3 = flow.l3();
    let v4 = flow.key.family == 4;
    let proto = flow.key.proto;
    // Over the data as it stands, checksum fields included: 0 when the checksum is right.
    let sums = |f: &[u8]| -> (u16, u16, u16) {
        let ip = &f[l3..];
        let (ihl, end) = if v4 {
            (
                (ip[0] & 0x0f) as usize * 4,
                u16::from_be_bytes([ip[2], ip[3]]) as usize,
            )
        } else {
            (40, 40 + u16::from_be_bytes([ip[4], ip[5]]) as usize)
        };
        let seg = &ip[ihl..end];
        let csum_at = if proto == 6 { 16 } else { 6 };
        (
            if v4 { checksum(&ip[..ihl]) } else { 0 },
            pseudo_checksum(ip, proto, seg),
            u16::from_be_bytes([seg[csum_at], seg[csum_at + 1]]),
        )
    };
    let (ip_in, l4_in, field_in) = sums(input);
    let (ip_out, l4_out, field_out) = sums(output);
    if ip_in != ip_out {
        return Err(format!(
            "IPv4 header checksum result {ip_in:#06x} became {ip_out:#06x}"
        ));
    }
    // UDP checksum 0: none (IPv4), or invalid (IPv6, where receivers drop it): left as it is,
    // it says the same after translation.
    if proto == 17 && field_in == 0 {
        return if field_out == 0 {
            Ok(())
        } else {
            Err("a UDP checksum of 0 was filled in".into())
        };
    }
    if l4_in != l4_out {
        return Err(format!(
            "TCP/UDP checksum result {l4_in:#06x} became {l4_out:#06x}"
        ));
    }
    Ok(())
}

/// Requests from a few client ports, and the backends' replies to them (to the client, or to
/// the SNAT address and its ports), in both families.
fn nat_template() -> impl Strategy<Value = Vec<u8>> {
    (
        0u8..8,
        0..NAT_CLIENT_PORTS,
        0..SNAT_COUNT as u16,
        0usize..5,
        prop::collection::vec(any::<u8>(), 0..24),
    )
        .prop_map(|(kind, client_port, snat_port, flags, payload)| {
            let flags = [0x02u8, 0x10, 0x12, 0x11, 0x04][flags];
            let cport = 41000 + client_port;
            let sport = SNAT_FIRST + snat_port;
            let (ethertype, l3, src_mac) = match kind {
                0 => (
                    0x0800,
                    ipv4(6, CLIENT4, VIP4, &[tcp(cport, 80, flags), payload].concat()),
                    CLIENT_MAC,
                ),
                1 => (
                    0x0800,
                    ipv4(17, CLIENT4, VIP4, &udp(cport, 53, &payload)),
                    CLIENT_MAC,
                ),
                2 => (
                    0x86dd,
                    ipv6(6, CLIENT6, VIP6, &[tcp(cport, 80, flags), payload].concat()),
                    CLIENT_MAC,
                ),
                3 => (
                    0x86dd,
                    ipv6(17, CLIENT6, VIP6, &udp(cport, 53, &payload)),
                    CLIENT_MAC,
                ),
                // Replies: to the client (NAT) and to the SNAT address (SNAT).
                4 => (
                    0x0800,
                    ipv4(
                        6,
                        NAT_B4,
                        CLIENT4,
                        &[tcp(NAT_PORT, cport, flags), payload].concat(),
                    ),
                    B1_MAC,
                ),
                5 => (
                    0x0800,
                    ipv4(17, NAT_B4, SNAT4, &udp(NAT_PORT, sport, &payload)),
                    B1_MAC,
                ),
                6 => (
                    0x86dd,
                    ipv6(6, NAT_B6, SNAT6, &[tcp(NAT_PORT, sport, flags), payload].concat()),
                    B1_MAC,
                ),
                _ => (
                    0x86dd,
                    ipv6(17, NAT_B6, CLIENT6, &udp(NAT_PORT, cport, &payload)),
                    B1_MAC,
                ),
            };
            let mut l3 = l3;
            fix_l4_checksum(&mut l3);
            [eth(LB_MAC, src_mac, ethertype), l3].concat()
        })
}

/// Copies the IPv4 header checksum and the TCP/UDP checksum of `from` into `to`.
fn copy_checksums(from: &[u8], to: &mut [u8], flow: &Flow) {
    if from.len() != to.len() {
        return;
    }
    let l3 = flow.l3();
    let l4 = if flow.key.family == 4 {
        to[l3 + 10..l3 + 12].copy_from_slice(&from[l3 + 10..l3 + 12]);
        l3 + (from[l3] & 0x0f) as usize * 4
    } else {
        l3 + 40
    };
    let at = l4 + if flow.key.proto == 6 { 16 } else { 6 };
    to[at..at + 2].copy_from_slice(&from[at..at + 2]);
}

/// Where an ICMP error's parts are: (ICMP header, quoted IP header, quoted ports, end of the
/// ICMP message), as offsets in the frame.
fn icmp_parts(f: &[u8], flow: &Flow) -> (usize, usize, usize, usize) {
    let l3 = flow.l3();
    if flow.key.family == 4 {
        let icmp = l3 + (f[l3] & 0x0f) as usize * 4;
        let quoted = icmp + 8;
        let ports = quoted + (f[quoted] & 0x0f) as usize * 4;
        (
            icmp,
            quoted,
            ports,
            l3 + u16::from_be_bytes([f[l3 + 2], f[l3 + 3]]) as usize,
        )
    } else {
        (
            l3 + 40,
            l3 + 48,
            l3 + 88,
            l3 + 40 + u16::from_be_bytes([f[l3 + 4], f[l3 + 5]]) as usize,
        )
    }
}

/// An ICMP error about a NAT connection as its translation must leave it: the outer
/// destination takes the entry's, and its source too where the connection's source is
/// translated; the quoted packet takes the entry's tuple turned around. Checksum fields as they
/// came (`icmp_checksums_follow` checks them).
fn translated_icmp(input: &[u8], flow: &Flow, to: &NatEntry, dst_mac: [u8; 6], src_mac: [u8; 6]) -> Vec<u8> {
    let mut out = input.to_vec();
    out[..6].copy_from_slice(&dst_mac);
    out[6..12].copy_from_slice(&src_mac);
    let l3 = flow.l3();
    let key = &flow.key;
    let n = if key.family == 4 { 4 } else { 16 };
    let bytes = |w: &[u32; 4]| -> Vec<u8> { w.iter().flat_map(|x| x.to_ne_bytes()).take(n).collect() };
    let (src_at, dst_at) = if key.family == 4 {
        (l3 + 12, l3 + 16)
    } else {
        (l3 + 8, l3 + 24)
    };
    out[dst_at..dst_at + n].copy_from_slice(&bytes(&to.dst_addr));
    if key.src_addr != to.src_addr {
        out[src_at..src_at + n].copy_from_slice(&bytes(&to.src_addr));
    }
    let (_, quoted, ports, _) = icmp_parts(input, flow);
    let (qsrc, qdst) = if key.family == 4 {
        (quoted + 12, quoted + 16)
    } else {
        (quoted + 8, quoted + 24)
    };
    out[qsrc..qsrc + n].copy_from_slice(&bytes(&to.dst_addr));
    out[qdst..qdst + n].copy_from_slice(&bytes(&to.src_addr));
    out[ports..ports + 2].copy_from_slice(&to.dst_port.to_ne_bytes());
    out[ports + 2..ports + 4].copy_from_slice(&to.src_port.to_ne_bytes());
    out
}

/// An ICMP error's checksums after translation say what they said before: the outer and the
/// quoted IPv4 header's, and the ICMP message's (ICMPv6 with its pseudo-header).
fn icmp_checksums_follow(input: &[u8], output: &[u8], flow: &Flow) -> Result<(), String> {
    let l3 = flow.l3();
    let (icmp, quoted, _, end) = icmp_parts(input, flow);
    let sums = |f: &[u8]| -> Vec<u16> {
        if flow.key.family == 4 {
            let ihl = (f[l3] & 0x0f) as usize * 4;
            let qihl = (f[quoted] & 0x0f) as usize * 4;
            vec![
                checksum(&f[l3..l3 + ihl]),
                checksum(&f[quoted..quoted + qihl]),
                checksum(&f[icmp..end]),
            ]
        } else {
            vec![pseudo_checksum(&f[l3..], 58, &f[icmp..end])]
        }
    };
    let (before, after) = (sums(input), sums(output));
    if before != after {
        return Err(format!(
            "ICMP error checksum results {before:04x?} became {after:04x?}"
        ));
    }
    Ok(())
}

/// Copies an ICMP error's checksum fields (outer and quoted IPv4 header, ICMP) from `from`.
fn copy_icmp_checksums(from: &[u8], to: &mut [u8], flow: &Flow) {
    if from.len() != to.len() {
        return;
    }
    let l3 = flow.l3();
    let (icmp, quoted, _, _) = icmp_parts(from, flow);
    let mut at = vec![icmp + 2];
    if flow.key.family == 4 {
        at.extend([l3 + 10, quoted + 10]);
    }
    for a in at {
        to[a..a + 2].copy_from_slice(&from[a..a + 2]);
    }
}
