//! Golden packets through BPF_PROG_TEST_RUN: exact output bytes and verdict for each case, on
//! the real kernel with real maps. Each test runs in a fresh network namespace.

use lb_common::{
    Counter, FlowKey, NatEntry, ServiceKey, ServiceValue,
    backend::BACKEND_F_ACTIVE,
    dpconfig::encap_variation,
    service::{FWD_DSR_L2, FWD_GUE, FWD_IPIP, FWD_NAT, FWD_SNAT},
};
use lb_tests::{
    NetNs,
    fixture::{Balancer, Decapsulator, dsr_backend, nat_backend, routed_backend},
    in_ns,
    packets::{
        BACKEND4, BACKEND6, CLIENT_MAC, CLIENT4, CLIENT6, ENCAP_SRC4, ENCAP_SRC6, LB_MAC, NAT_B4, NAT_B6,
        ROUTER_MAC, SNAT4, SNAT6, VIP4, VIP6, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, eth, fix_l4_checksum,
        ipv4, ipv6, tcp, udp,
    },
};

const B1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb1];
const B2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb2];
const GUE_PORT: u16 = lb_userspace::config::DEFAULT_GUE_PORT;

/// The golden tests' shorthand for filling the fixture's maps (a failed write panics).
trait Golden {
    /// An L2 DSR backend in `slot`, reached through `ifindex`.
    fn backend(&mut self, slot: u32, mac: [u8; 6], ifindex: u32);
    /// A service whose 13-slot table at `offset` names `slot` everywhere.
    fn service(&mut self, family: u8, proto: u8, addr: &[u8], port: u16, offset: u32, slot: u32);
    #[allow(clippy::too_many_arguments)]
    fn service_mode(
        &mut self,
        family: u8,
        proto: u8,
        addr: &[u8],
        port: u16,
        offset: u32,
        slot: u32,
        forward: u32,
    );
    /// A routed backend (IPIP, GUE) in `slot`.
    fn encap_backend(&mut self, slot: u32, addr: &[u8]);
    /// A NAT backend in `slot` on NAT_BACKEND_PORT, reached through lo.
    fn nat_backend(&mut self, slot: u32, addr: &[u8], generation: u32);
    fn nat_entries(&self) -> Vec<(FlowKey, NatEntry)>;
}

impl Golden for Balancer {
    fn backend(&mut self, slot: u32, mac: [u8; 6], ifindex: u32) {
        self.backends
            .set(slot, dsr_backend(mac, ifindex), 0)
            .expect("set backend");
    }

    fn service(&mut self, family: u8, proto: u8, addr: &[u8], port: u16, offset: u32, slot: u32) {
        self.service_mode(family, proto, addr, port, offset, slot, FWD_DSR_L2);
    }

    fn service_mode(
        &mut self,
        family: u8,
        proto: u8,
        addr: &[u8],
        port: u16,
        offset: u32,
        slot: u32,
        forward: u32,
    ) {
        let mut a = [0u8; 16];
        a[..addr.len()].copy_from_slice(addr);
        self.pool.write(offset, &[slot as u16; 13]).expect("pool");
        let v = ServiceValue {
            id: offset / 13,
            flags: 0,
            table_offset: offset,
            table_size: 13,
            forward,
            ..Default::default()
        };
        self.add_service(ServiceKey::new(family, proto, a, port.to_be()), v)
            .expect("service");
    }

    fn encap_backend(&mut self, slot: u32, addr: &[u8]) {
        self.backends
            .set(slot, routed_backend(addr), 0)
            .expect("set backend");
    }

    fn nat_backend(&mut self, slot: u32, addr: &[u8], generation: u32) {
        let b = nat_backend(addr, NAT_BACKEND_PORT, generation, B1_MAC);
        self.backends.set(slot, b, 0).expect("set backend");
    }

    fn nat_entries(&self) -> Vec<(FlowKey, NatEntry)> {
        self.nat.iter().map(|r| r.expect("entry")).collect()
    }
}

/// The balancer with backend slot 1 -> b1, slot 2 -> b2, both reached through ifindex 1 (lo:
/// test_run's ingress).
fn with_two_backends() -> Balancer {
    let mut dp = Balancer::load().expect("load lb");
    dp.backend(1, B1_MAC, 1);
    dp.backend(2, B2_MAC, 1);
    dp
}

/// The expected DSR output: the same bytes with the MACs rewritten.
fn rewritten(input: &[u8], dst: [u8; 6]) -> Vec<u8> {
    let mut out = input.to_vec();
    out[0..6].copy_from_slice(&dst);
    out[6..12].copy_from_slice(&LB_MAC);
    out
}

fn in_fresh_ns(f: impl FnOnce() + Send + 'static) {
    let ns = NetNs::new("golden").expect("netns");
    in_ns(&ns, f);
}

fn standard() -> Balancer {
    let mut dp = with_two_backends();
    dp.service(4, 6, &VIP4, 80, 0, 1);
    dp.service(4, 17, &VIP4, 53, 13, 1);
    dp.service(6, 6, &VIP6, 80, 26, 1);
    dp.service(6, 17, &VIP6, 53, 39, 1);
    dp
}

#[test]
fn vip_traffic_is_rewritten_and_sent_back_out() {
    in_fresh_ns(|| {
        let dp = standard();
        let cases = [
            (
                "tcp4",
                [
                    eth(LB_MAC, CLIENT_MAC, 0x0800),
                    ipv4(6, CLIENT4, VIP4, &tcp(40000, 80, 0x02)),
                ]
                .concat(),
            ),
            (
                "udp4",
                [
                    eth(LB_MAC, CLIENT_MAC, 0x0800),
                    ipv4(17, CLIENT4, VIP4, &udp(40000, 53, b"hello")),
                ]
                .concat(),
            ),
            (
                "tcp6",
                [
                    eth(LB_MAC, CLIENT_MAC, 0x86dd),
                    ipv6(6, CLIENT6, VIP6, &tcp(40000, 80, 0x02)),
                ]
                .concat(),
            ),
            (
                "udp6",
                [
                    eth(LB_MAC, CLIENT_MAC, 0x86dd),
                    ipv6(17, CLIENT6, VIP6, &udp(40000, 53, b"hello")),
                ]
                .concat(),
            ),
        ];
        for (name, input) in cases {
            let (verdict, out) = dp.run(&input);
            assert_eq!(verdict, XDP_TX, "{name}");
            assert_eq!(out, rewritten(&input, B1_MAC), "{name}: exact output bytes");
        }
        assert_eq!(dp.counter(Counter::Tx), 4);
        assert_eq!(dp.counter(Counter::ConntrackMiss), 4);
    });
}

#[test]
fn vlan_tagged_packet_keeps_its_tag() {
    in_fresh_ns(|| {
        let dp = standard();
        let mut input = eth(LB_MAC, CLIENT_MAC, 0x8100);
        input.extend_from_slice(&[0x00, 0x64, 0x08, 0x00]);
        input.extend_from_slice(&ipv4(6, CLIENT4, VIP4, &tcp(40001, 80, 0x02)));
        let (verdict, out) = dp.run(&input);
        assert_eq!(verdict, XDP_TX);
        assert_eq!(out, rewritten(&input, B1_MAC));
    });
}

#[test]
fn non_vip_traffic_passes_byte_for_byte() {
    in_fresh_ns(|| {
        let dp = standard();
        let cases = [
            (
                "other address",
                [
                    eth(LB_MAC, CLIENT_MAC, 0x0800),
                    ipv4(6, CLIENT4, [10, 100, 0, 2], &tcp(1, 80, 2)),
                ]
                .concat(),
                Counter::PassNotVip,
            ),
            (
                "other port",
                [
                    eth(LB_MAC, CLIENT_MAC, 0x0800),
                    ipv4(6, CLIENT4, VIP4, &tcp(1, 81, 2)),
                ]
                .concat(),
                Counter::PassNotVip,
            ),
            (
                "other protocol on the port",
                [
                    eth(LB_MAC, CLIENT_MAC, 0x0800),
                    ipv4(17, CLIENT4, VIP4, &udp(1, 80, b"")),
                ]
                .concat(),
                Counter::PassNotVip,
            ),
            (
                "icmp",
                [
                    eth(LB_MAC, CLIENT_MAC, 0x0800),
                    ipv4(1, CLIENT4, VIP4, &[8, 0, 0, 0, 0, 0, 0, 0]),
                ]
                .concat(),
                Counter::PassNotTcpUdp,
            ),
            (
                "arp",
                [eth([0xff; 6], CLIENT_MAC, 0x0806), vec![0u8; 28]].concat(),
                Counter::PassNotIp,
            ),
            (
                "ipv6 hop-by-hop",
                [
                    eth(LB_MAC, CLIENT_MAC, 0x86dd),
                    ipv6(0, CLIENT6, VIP6, &[6, 0, 0, 0, 0, 0, 0, 0]),
                ]
                .concat(),
                Counter::PassIpv6ExtHeader,
            ),
            (
                "ipv6 fragment",
                [
                    eth(LB_MAC, CLIENT_MAC, 0x86dd),
                    ipv6(44, CLIENT6, VIP6, &[6, 0, 0, 0, 0, 0, 0, 0]),
                ]
                .concat(),
                Counter::PassIpv6Fragment,
            ),
        ];
        for (name, input, counter) in cases {
            let before = dp.counter(counter);
            let (verdict, out) = dp.run(&input);
            assert_eq!(verdict, XDP_PASS, "{name}");
            assert_eq!(out, input, "{name}: unchanged");
            assert_eq!(
                dp.counter(counter),
                before + 1,
                "{name}: counted as {}",
                counter.name()
            );
        }
        // A fragment of a VIP datagram: MF set.
        let mut frag = [
            eth(LB_MAC, CLIENT_MAC, 0x0800),
            ipv4(17, CLIENT4, VIP4, &udp(1, 53, b"x")),
        ]
        .concat();
        frag[14 + 6] = 0x20;
        let (verdict, out) = dp.run(&frag);
        assert_eq!((verdict, out), (XDP_PASS, frag.clone()));
        assert_eq!(dp.counter(Counter::PassIpv4Fragment), 1);
    });
}

#[test]
fn malformed_packets_are_dropped_unchanged_and_counted() {
    in_fresh_ns(|| {
        let dp = standard();
        let good = [
            eth(LB_MAC, CLIENT_MAC, 0x0800),
            ipv4(6, CLIENT4, VIP4, &tcp(40000, 80, 0x02)),
        ]
        .concat();
        let mut bad_ihl = good.clone();
        bad_ihl[14] = 0x44;
        let mut bad_version = good.clone();
        bad_version[14] = 0x55;
        let mut bad_doff = good.clone();
        bad_doff[14 + 20 + 12] = 0x30;
        let mut options_missing = good.clone();
        options_missing[14] = 0x4f; // claims 60 bytes of header
        // The total length leaves room for 10 bytes of TCP header; the frame holds all 20.
        let mut tcp_past_total = good.clone();
        tcp_past_total[16..18].copy_from_slice(&30u16.to_be_bytes());
        // The total length runs past the frame.
        let mut total_past_frame = good.clone();
        total_past_frame[16..18].copy_from_slice(&((good.len() - 14 + 1) as u16).to_be_bytes());
        let cases = [
            (
                "truncated ipv4",
                good[..14 + 10].to_vec(),
                Counter::DropTruncatedL3,
            ),
            (
                "truncated tcp (the packet shorter than its total length)",
                good[..14 + 20 + 10].to_vec(),
                Counter::DropTruncatedL3,
            ),
            (
                "tcp header past the total length",
                tcp_past_total,
                Counter::DropTruncatedL4,
            ),
            (
                "total length past the frame",
                total_past_frame,
                Counter::DropTruncatedL3,
            ),
            ("ihl below 5", bad_ihl, Counter::DropBadIpHeader),
            ("version 5", bad_version, Counter::DropBadIpHeader),
            ("tcp data offset below 5", bad_doff, Counter::DropBadL4Header),
            ("options past the end", options_missing, Counter::DropBadIpHeader),
            (
                "truncated ipv6",
                [eth(LB_MAC, CLIENT_MAC, 0x86dd), vec![0x60, 0, 0, 0]].concat(),
                Counter::DropTruncatedL3,
            ),
            (
                "truncated udp6",
                [
                    eth(LB_MAC, CLIENT_MAC, 0x86dd),
                    ipv6(17, CLIENT6, VIP6, &[0, 1, 0]),
                ]
                .concat(),
                Counter::DropTruncatedL4,
            ),
        ];
        for (name, input, counter) in cases {
            let before = dp.counter(counter);
            let (verdict, out) = dp.run(&input);
            assert_eq!(verdict, XDP_DROP, "{name}");
            assert_eq!(out, input, "{name}: never rewritten");
            assert_eq!(
                dp.counter(counter),
                before + 1,
                "{name}: counted as {}",
                counter.name()
            );
        }
    });
}

#[test]
fn connection_table_keeps_flows_after_the_table_changes() {
    in_fresh_ns(|| {
        let mut dp = standard();
        let syn = [
            eth(LB_MAC, CLIENT_MAC, 0x0800),
            ipv4(6, CLIENT4, VIP4, &tcp(40000, 80, 0x02)),
        ]
        .concat();
        let flow = [
            eth(LB_MAC, CLIENT_MAC, 0x0800),
            ipv4(6, CLIENT4, VIP4, &tcp(40000, 80, 0x10)),
        ]
        .concat();
        assert_eq!(dp.run(&syn).1, rewritten(&syn, B1_MAC));
        // Swap the table to b2: the existing flow stays on b1, a new one goes to b2.
        dp.service(4, 6, &VIP4, 80, 52, 2);
        let (verdict, out) = dp.run(&flow);
        assert_eq!((verdict, out), (XDP_TX, rewritten(&flow, B1_MAC)));
        assert_eq!(dp.counter(Counter::ConntrackHit), 1);
        let other = [
            eth(LB_MAC, CLIENT_MAC, 0x0800),
            ipv4(6, CLIENT4, VIP4, &tcp(40001, 80, 0x02)),
        ]
        .concat();
        assert_eq!(dp.run(&other).1, rewritten(&other, B2_MAC));
        assert_eq!(dp.conntrack.keys().count(), 2);
        // b1 is retired: its flow is picked again from the current table.
        let mut b1 = dp.backends.get(&1, 0).expect("b1");
        b1.flags = 0;
        dp.backends.set(1, b1, 0).expect("retire b1");
        assert_eq!(dp.run(&flow).1, rewritten(&flow, B2_MAC));
        assert_eq!(dp.counter(Counter::ConntrackStale), 1);

        // A SYN opens a flow: it is not searched for, it picks from the current table and its
        // entry replaces the old one. Bring b1 back and point the table at it again.
        b1.flags = BACKEND_F_ACTIVE;
        dp.backends.set(1, b1, 0).expect("revive b1");
        dp.service(4, 6, &VIP4, 80, 52, 1);
        let misses = dp.counter(Counter::ConntrackMiss);
        assert_eq!(dp.run(&syn).1, rewritten(&syn, B1_MAC));
        assert_eq!(dp.counter(Counter::ConntrackMiss), misses + 1);
        assert_eq!(dp.run(&flow).1, rewritten(&flow, B1_MAC));
        assert_eq!(dp.conntrack.keys().count(), 2);
    });
}

#[test]
fn flood_guard_forwards_new_flows_past_its_limit_without_remembering_them() {
    in_fresh_ns(|| {
        let mut dp = standard();
        let syn = |port: u16| {
            [
                eth(LB_MAC, CLIENT_MAC, 0x0800),
                ipv4(6, CLIENT4, VIP4, &tcp(port, 80, 0x02)),
            ]
            .concat()
        };
        let set_limit = |dp: &mut Balancer, flood_limit| {
            let mut cfg = dp.dp_config.get(&0, 0).expect("dp config");
            cfg.flood_limit = flood_limit;
            dp.dp_config.set(0, cfg, 0).expect("set dp config");
        };
        // Two new flows per 100 ms window on this CPU. The five SYNs must fall in one window;
        // a machine slow enough to cross a window boundary gets another try (bounded).
        set_limit(&mut dp, 2);
        let mut done = false;
        for attempt in 0..5u16 {
            let skipped = dp.counter(Counter::ConntrackFloodSkipped);
            let entries = dp.conntrack.keys().count();
            let start = std::time::Instant::now();
            for i in 0..5 {
                let input = syn(41000 + attempt * 10 + i);
                let (verdict, out) = dp.run(&input);
                // Every one still goes to its Maglev table's backend.
                assert_eq!((verdict, out), (XDP_TX, rewritten(&input, B1_MAC)));
            }
            if start.elapsed() > std::time::Duration::from_millis(80) {
                continue;
            }
            let now_skipped = dp.counter(Counter::ConntrackFloodSkipped) - skipped;
            let now_entries = dp.conntrack.keys().count() - entries;
            assert_eq!(now_skipped + now_entries as u64, 5);
            if now_entries == 2 {
                assert_eq!(now_skipped, 3);
                done = true;
                break;
            }
            // The window may have turned between two SYNs: at most one more got in.
            assert!(
                now_entries <= 4,
                "{now_entries} of 5 new flows remembered past a limit of 2"
            );
        }
        assert!(done, "five SYNs never fell within one window");
        // Off (0): every new flow is remembered.
        set_limit(&mut dp, 0);
        let skipped = dp.counter(Counter::ConntrackFloodSkipped);
        let entries = dp.conntrack.keys().count();
        for i in 0..5 {
            dp.run(&syn(42000 + i));
        }
        assert_eq!(dp.counter(Counter::ConntrackFloodSkipped), skipped);
        assert_eq!(dp.conntrack.keys().count(), entries + 5);
    });
}

#[test]
fn wildcard_port_service_and_empty_table() {
    in_fresh_ns(|| {
        let mut dp = standard();
        dp.service(4, 17, &[10, 100, 0, 9], 0, 65, 2);
        let any_port = [
            eth(LB_MAC, CLIENT_MAC, 0x0800),
            ipv4(17, CLIENT4, [10, 100, 0, 9], &udp(5000, 9999, b"x")),
        ]
        .concat();
        assert_eq!(dp.run(&any_port), (XDP_TX, rewritten(&any_port, B2_MAC)));

        let mut key = [0u8; 16];
        key[..4].copy_from_slice(&[10, 100, 0, 7]);
        let empty = ServiceValue {
            id: 9,
            flags: 0,
            table_offset: 0,
            table_size: 0,
            forward: 0,
            ..Default::default()
        };
        dp.add_service(ServiceKey::new(4, 6, key, 80u16.to_be()), empty)
            .expect("service");
        let input = [
            eth(LB_MAC, CLIENT_MAC, 0x0800),
            ipv4(6, CLIENT4, [10, 100, 0, 7], &tcp(1, 80, 2)),
        ]
        .concat();
        assert_eq!(dp.run(&input), (XDP_DROP, input.clone()));
        assert_eq!(dp.counter(Counter::DropNoBackend), 1);
    });
}

#[test]
fn backend_behind_another_interface_is_redirected() {
    in_fresh_ns(|| {
        let out = std::process::Command::new("ip")
            .args(["link", "add", "lbt-a", "type", "veth", "peer", "name", "lbt-b"])
            .output()
            .expect("ip");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let name = std::ffi::CString::new("lbt-a").expect("name");
        // SAFETY: valid C string; resolved in this thread's namespace.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(ifindex > 1);
        let mut dp = standard();
        dp.backend(3, B2_MAC, ifindex);
        dp.service(4, 6, &VIP4, 443, 78, 3);
        let input = [
            eth(LB_MAC, CLIENT_MAC, 0x0800),
            ipv4(6, CLIENT4, VIP4, &tcp(1, 443, 2)),
        ]
        .concat();
        // Not in TX_PORTS yet: counted drop, not a blind redirect.
        assert_eq!(dp.run(&input).0, XDP_DROP);
        assert_eq!(dp.counter(Counter::DropRedirectFailed), 1);
        dp.tx_ports.insert(ifindex, ifindex, None, 0).expect("tx port");
        let (verdict, out) = dp.run(&input);
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(out, rewritten(&input, B2_MAC));
        assert_eq!(dp.counter(Counter::Redirect), 1);
    });
}

/// The outer source a flow gets: the prefix with the flow's variation in the last 16 bits.
fn outer_src4(client: [u8; 4], sport: u16) -> [u8; 4] {
    let v = encap_variation(u32::from_ne_bytes(client), sport.to_be()) as u16;
    [ENCAP_SRC4[0], ENCAP_SRC4[1], (v >> 8) as u8, v as u8]
}

/// The standard services plus what encapsulation needs: routed backends (`ipip_routes`), the
/// encapsulation sources, and the egress in TX_PORTS.
fn encap_dp() -> Balancer {
    let mut dp = standard();
    dp.route_tunnels().expect("tunnels");
    dp
}

/// The per-flow variation of a flow from CLIENT6 port 40000.
fn variation6() -> u32 {
    encap_variation(
        u32::from_ne_bytes([CLIENT6[0], CLIENT6[1], CLIENT6[2], CLIENT6[3]]),
        40000u16.to_be(),
    )
}

/// The outer IPv4 header the balancer writes for a flow from CLIENT4 port 40000 to BACKEND4:
/// TOS from the inner packet, id 0, DF set (the decapsulator cannot reassemble), TTL 64.
fn outer4(proto: u8, tos: u8, payload: &[u8]) -> Vec<u8> {
    let mut outer = ipv4(proto, outer_src4(CLIENT4, 40000), BACKEND4, payload);
    outer[1] = tos;
    outer[4..6].copy_from_slice(&[0, 0]);
    lb_tests::packets::fix_ipv4_checksum(&mut outer);
    outer
}

/// The outer IPv6 header for a flow from CLIENT6 port 40000 to BACKEND6: the variation in the
/// last source word and in the flow label, so receivers hash flows apart.
fn outer6(next: u8, payload: &[u8]) -> Vec<u8> {
    let v = variation6();
    let mut src = ENCAP_SRC6;
    src[12..].copy_from_slice(&v.to_be_bytes());
    let mut outer = ipv6(next, src, BACKEND6, payload);
    outer[1] = (v >> 16) as u8 & 0x0f;
    outer[2] = (v >> 8) as u8;
    outer[3] = v as u8;
    outer
}

#[test]
fn ipip_wraps_the_packet_for_a_routed_backend() {
    in_fresh_ns(|| {
        let mut dp = encap_dp();
        dp.encap_backend(5, &BACKEND4);
        dp.encap_backend(6, &BACKEND6);
        dp.service_mode(4, 6, &VIP4, 8080, 91, 5, FWD_IPIP);
        dp.service_mode(4, 17, &VIP4, 8080, 104, 5, FWD_IPIP);
        dp.service_mode(6, 6, &VIP6, 8080, 117, 6, FWD_IPIP);
        dp.service_mode(6, 17, &VIP6, 8080, 130, 6, FWD_IPIP);

        for (name, proto, l4) in [
            ("tcp4", 6u8, tcp(40000, 8080, 2)),
            ("udp4", 17, udp(40000, 8080, b"hello")),
        ] {
            let mut inner = ipv4(proto, CLIENT4, VIP4, &l4);
            inner[1] = 0x28; // a DSCP, copied to the outer header
            let input = [eth(LB_MAC, CLIENT_MAC, 0x0800), inner.clone()].concat();
            let want = [eth(ROUTER_MAC, LB_MAC, 0x0800), outer4(4, 0x28, &inner)].concat();
            assert_eq!(dp.run(&input), (XDP_REDIRECT, want), "{name}");
        }
        for (name, proto, l4) in [
            ("tcp6", 6u8, tcp(40000, 8080, 2)),
            ("udp6", 17, udp(40000, 8080, b"hello")),
        ] {
            let inner = ipv6(proto, CLIENT6, VIP6, &l4);
            let input = [eth(LB_MAC, CLIENT_MAC, 0x86dd), inner.clone()].concat();
            let want = [eth(ROUTER_MAC, LB_MAC, 0x86dd), outer6(41, &inner)].concat();
            assert_eq!(dp.run(&input), (XDP_REDIRECT, want), "{name}");
        }
        assert_eq!(dp.counter(Counter::Redirect), 4);
        // Flows from other ports get other outer sources.
        assert_ne!(outer_src4(CLIENT4, 40000), outer_src4(CLIENT4, 40001));
    });
}

#[test]
fn ipip_without_route_neighbour_or_mtu_is_counted() {
    in_fresh_ns(|| {
        let mut dp = encap_dp();
        dp.encap_backend(5, &[10, 70, 0, 5]); // no route
        dp.encap_backend(6, &[10, 50, 0, 7]); // on link, no neighbour entry
        dp.encap_backend(7, &[10, 61, 0, 5]); // route MTU 100
        dp.service_mode(4, 6, &VIP4, 1000, 91, 5, FWD_IPIP);
        dp.service_mode(4, 6, &VIP4, 1001, 104, 6, FWD_IPIP);
        dp.service_mode(4, 6, &VIP4, 1002, 117, 7, FWD_IPIP);
        let packet = |port: u16, payload: usize| {
            let mut l4 = tcp(40000, port, 2);
            l4.extend(std::iter::repeat_n(0u8, payload));
            [eth(LB_MAC, CLIENT_MAC, 0x0800), ipv4(6, CLIENT4, VIP4, &l4)].concat()
        };
        let input = packet(1000, 0);
        assert_eq!(dp.run(&input), (XDP_PASS, input.clone()));
        assert_eq!(dp.counter(Counter::PassNoRoute), 1);

        // Passed encapsulated: the kernel forwards it and resolves the neighbour.
        let input = packet(1001, 0);
        let (verdict, out) = dp.run(&input);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(out.len(), input.len() + 20);
        assert_eq!(&out[..12], &input[..12], "addressed to this host, as it came");
        assert_eq!(&out[14 + 9..14 + 10], &[4], "outer protocol IPIP");
        assert_eq!(&out[14 + 16..14 + 20], &[10, 50, 0, 7]);
        assert_eq!(&out[34..], &input[14..]);
        assert_eq!(dp.counter(Counter::PassEncapNoNeigh), 1);

        // 40 + 20 bytes fit in 100; 80 more do not once encapsulated.
        assert_eq!(dp.run(&packet(1002, 0)).0, XDP_REDIRECT);
        let big = packet(1002, 50);
        assert_eq!(dp.run(&big), (XDP_DROP, big.clone()));
        assert_eq!(dp.counter(Counter::DropEncapTooBig), 1);
    });
}

#[test]
fn decap_strips_ipip_for_local_vips_only() {
    in_fresh_ns(|| {
        let mut decap = Decapsulator::load().expect("load decap");
        let inner4 = ipv4(6, CLIENT4, VIP4, &tcp(40000, 8080, 2));
        let outer4 = ipv4(4, [172, 16, 1, 2], [10, 60, 0, 5], &inner4);
        let input = [eth(B1_MAC, ROUTER_MAC, 0x0800), outer4].concat();
        assert_eq!(
            decap.run(&input),
            (XDP_PASS, [eth(B1_MAC, ROUTER_MAC, 0x0800), inner4].concat())
        );

        let inner6 = ipv6(17, CLIENT6, VIP6, &udp(40000, 8080, b"hi"));
        let outer6 = ipv6(41, ENCAP_SRC6, BACKEND6, &inner6);
        let input = [eth(B1_MAC, ROUTER_MAC, 0x86dd), outer6].concat();
        assert_eq!(
            decap.run(&input),
            (XDP_PASS, [eth(B1_MAC, ROUTER_MAC, 0x86dd), inner6].concat())
        );
        assert_eq!(decap.count(0), 2);

        // Frames to another host's MAC (a bridge or hypervisor port): not ours.
        decap.mac.set(0, [0x02, 0, 0, 0, 0, 0xb2, 0, 0], 0).expect("mac");
        let to_b1 = [
            eth(B1_MAC, ROUTER_MAC, 0x0800),
            ipv4(
                4,
                [172, 16, 1, 2],
                [10, 60, 0, 5],
                &ipv4(6, CLIENT4, VIP4, &tcp(1, 8080, 2)),
            ),
        ]
        .concat();
        assert_eq!(decap.run(&to_b1), (XDP_PASS, to_b1.clone()));
        assert_eq!(decap.count(0), 2);
        decap.mac.set(0, [0x02, 0, 0, 0, 0, 0xb1, 0, 0], 0).expect("mac");
        assert_eq!(
            decap.run(&to_b1).1.len(),
            to_b1.len() - 20,
            "to our own MAC: decapsulated"
        );
        assert_eq!(decap.count(0), 3);
        // An outer fragment holds no whole inner packet: untouched.
        let inner4b = ipv4(6, CLIENT4, VIP4, &tcp(40000, 8080, 2));
        let mut fragment = ipv4(4, [172, 16, 1, 2], [10, 60, 0, 5], &inner4b);
        fragment[6] = 0x20;
        let input = [eth(B1_MAC, ROUTER_MAC, 0x0800), fragment].concat();
        assert_eq!(decap.run(&input), (XDP_PASS, input.clone()));
        assert_eq!(decap.count(0), 3);
        // Not a local VIP, or not IPIP at all: untouched.
        let other = ipv4(6, CLIENT4, [10, 100, 0, 99], &tcp(1, 80, 2));
        let input = [
            eth(B1_MAC, ROUTER_MAC, 0x0800),
            ipv4(4, [172, 16, 1, 2], [10, 60, 0, 5], &other),
        ]
        .concat();
        assert_eq!(decap.run(&input), (XDP_PASS, input.clone()));
        assert_eq!(decap.count(1), 1);
        let plain = [
            eth(B1_MAC, ROUTER_MAC, 0x0800),
            ipv4(6, CLIENT4, VIP4, &tcp(1, 80, 2)),
        ]
        .concat();
        assert_eq!(decap.run(&plain), (XDP_PASS, plain.clone()));
        assert_eq!(decap.count(0), 3);
        // Before the decapsulator read lengths (with the fuzzer's decapsulator model), it
        // stripped tunnel packets whose own lengths disagree with the frame: an outer total
        // length past the frame, one too short for the inner header, and an inner header of
        // the other family. All are passed untouched now, uncounted.
        let inner = ipv4(6, CLIENT4, VIP4, &tcp(40000, 8080, 2));
        let outer = ipv4(4, [172, 16, 1, 2], [10, 60, 0, 5], &inner);
        for (what, total, version) in [
            ("past the frame", outer.len() + 1, 0x45),
            ("short", 30, 0x45),
            ("family", outer.len(), 0x65),
        ] {
            let mut o = outer.clone();
            o[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            o[20] = version;
            lb_tests::packets::fix_ipv4_checksum(&mut o);
            let input = [eth(B1_MAC, ROUTER_MAC, 0x0800), o].concat();
            assert_eq!(decap.run(&input), (XDP_PASS, input.clone()), "{what}");
        }
        assert_eq!((decap.count(0), decap.count(1)), (3, 1));
    });
}

#[test]
fn icmp_errors_reach_the_backend_that_owns_the_flow() {
    in_fresh_ns(|| {
        let mut dp = standard();
        const ROUTER4: [u8; 4] = [192, 0, 2, 1];
        const ROUTER6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        // Flows pinned to b1, then both tables moved to b2: only the connection table knows.
        let tcp4 = [
            eth(LB_MAC, CLIENT_MAC, 0x0800),
            ipv4(6, CLIENT4, VIP4, &tcp(40000, 80, 2)),
        ]
        .concat();
        let udp4 = [
            eth(LB_MAC, CLIENT_MAC, 0x0800),
            ipv4(17, CLIENT4, VIP4, &udp(40000, 53, b"q")),
        ]
        .concat();
        let tcp6 = [
            eth(LB_MAC, CLIENT_MAC, 0x86dd),
            ipv6(6, CLIENT6, VIP6, &tcp(40000, 80, 2)),
        ]
        .concat();
        for p in [&tcp4, &udp4, &tcp6] {
            assert_eq!(dp.run(p).1, rewritten(p, B1_MAC));
        }
        dp.service(4, 6, &VIP4, 80, 143, 2);
        dp.service(4, 17, &VIP4, 53, 156, 2);
        dp.service(6, 6, &VIP6, 80, 169, 2);

        // What the backend sent (VIP -> client), quoted by a router's error to the VIP.
        let quote4 = |proto: u8, l4: Vec<u8>| ipv4(proto, VIP4, CLIENT4, &l4)[..28].to_vec();
        let error4 = |kind: u8, code: u8, quote: Vec<u8>| {
            let mut icmp = vec![kind, code, 0, 0, 0, 0, 0x05, 0x00];
            icmp.extend_from_slice(&quote);
            let sum = lb_tests::packets::checksum(&icmp);
            icmp[2..4].copy_from_slice(&sum.to_be_bytes());
            [eth(LB_MAC, CLIENT_MAC, 0x0800), ipv4(1, ROUTER4, VIP4, &icmp)].concat()
        };
        let frag_needed = error4(3, 4, quote4(6, tcp(80, 40000, 0x12)));
        let port_unreachable = error4(3, 3, quote4(17, udp(53, 40000, b"answer")));
        let mut icmp6 = vec![2, 0, 0, 0, 0, 0, 0x05, 0x00];
        icmp6.extend_from_slice(&ipv6(6, VIP6, CLIENT6, &tcp(80, 40000, 0x12))[..48]);
        let too_big = [eth(LB_MAC, CLIENT_MAC, 0x86dd), ipv6(58, ROUTER6, VIP6, &icmp6)].concat();
        for (name, p) in [
            ("frag needed", &frag_needed),
            ("port unreachable", &port_unreachable),
            ("packet too big", &too_big),
        ] {
            assert_eq!(dp.run(p), (XDP_TX, rewritten(p, B1_MAC)), "{name}");
        }
        assert_eq!(dp.counter(Counter::IcmpErrorForwarded), 3);

        // An error about a flow nobody has seen goes where the flow would go: the table (b2).
        let fresh = error4(3, 4, quote4(6, tcp(80, 40999, 0x12)));
        let entries = dp.conntrack.keys().count();
        assert_eq!(dp.run(&fresh), (XDP_TX, rewritten(&fresh, B2_MAC)));
        // ... without creating an entry: spoofed errors must not fill the table.
        assert_eq!(dp.conntrack.keys().count(), entries);
        // Errors not about a VIP flow pass untouched.
        let unrelated = error4(
            3,
            4,
            ipv4(6, [10, 1, 1, 1], CLIENT4, &tcp(80, 40000, 0x12))[..28].to_vec(),
        );
        assert_eq!(dp.run(&unrelated), (XDP_PASS, unrelated.clone()));
        assert_eq!(dp.counter(Counter::IcmpErrorForwarded), 4);
    });
}

#[test]
fn icmp_error_for_an_ipip_flow_is_encapsulated_to_its_backend() {
    in_fresh_ns(|| {
        let mut dp = encap_dp();
        dp.encap_backend(5, &BACKEND4);
        dp.service_mode(4, 6, &VIP4, 8080, 91, 5, FWD_IPIP);
        let mut icmp = vec![3, 4, 0, 0, 0, 0, 0x05, 0x00];
        icmp.extend_from_slice(&ipv4(6, VIP4, CLIENT4, &tcp(8080, 40000, 0x12))[..28]);
        let inner = ipv4(1, [192, 0, 2, 1], VIP4, &icmp);
        let input = [eth(LB_MAC, CLIENT_MAC, 0x0800), inner.clone()].concat();
        let (verdict, out) = dp.run(&input);
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(&out[14 + 9], &4, "outer protocol IPIP");
        assert_eq!(
            &out[14 + 12..14 + 16],
            &outer_src4(CLIENT4, 40000),
            "the flow's outer source"
        );
        assert_eq!(&out[14 + 16..14 + 20], &BACKEND4);
        assert_eq!(&out[34..], &inner[..]);
        assert_eq!(dp.counter(Counter::IcmpErrorForwarded), 1);
    });
}

/// ICMPv6 checksum: the pseudo-header (addresses, length, next header 58) and the message.
fn icmp6_checksum(src: [u8; 16], dst: [u8; 16], msg: &[u8]) -> u16 {
    let mut data = src.to_vec();
    data.extend_from_slice(&dst);
    data.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    data.extend_from_slice(&[0, 0, 0, 58]);
    data.extend_from_slice(msg);
    lb_tests::packets::checksum(&data)
}

#[test]
fn echo_requests_to_a_vip_are_answered_or_passed() {
    in_fresh_ns(|| {
        let mut dp = standard();
        let echo4 = |kind: u8| {
            let mut m = vec![kind, 0, 0, 0, 0x12, 0x34, 0, 1];
            m.extend_from_slice(b"ping payload");
            let sum = lb_tests::packets::checksum(&m);
            m[2..4].copy_from_slice(&sum.to_be_bytes());
            m
        };
        let echo6 = |kind: u8, src: [u8; 16], dst: [u8; 16]| {
            let mut m = vec![kind, 0, 0, 0, 0x12, 0x34, 0, 1];
            m.extend_from_slice(b"ping payload");
            let sum = icmp6_checksum(src, dst, &m);
            m[2..4].copy_from_slice(&sum.to_be_bytes());
            m
        };
        let request4 = [eth(LB_MAC, CLIENT_MAC, 0x0800), ipv4(1, CLIENT4, VIP4, &echo4(8))].concat();
        let reply4 = [eth(CLIENT_MAC, LB_MAC, 0x0800), ipv4(1, VIP4, CLIENT4, &echo4(0))].concat();
        let request6 = [
            eth(LB_MAC, CLIENT_MAC, 0x86dd),
            ipv6(58, CLIENT6, VIP6, &echo6(128, CLIENT6, VIP6)),
        ]
        .concat();
        let reply6 = [
            eth(CLIENT_MAC, LB_MAC, 0x86dd),
            ipv6(58, VIP6, CLIENT6, &echo6(129, VIP6, CLIENT6)),
        ]
        .concat();

        // Policy "pass" (the config flag unset): the kernel gets them.
        assert_eq!(dp.run(&request4), (XDP_PASS, request4.clone()));
        let mut cfg = dp.dp_config.get(&0, 0).expect("cfg");
        cfg.flags = lb_common::dpconfig::DP_F_ECHO_REPLY;
        dp.dp_config.set(0, cfg, 0).expect("cfg");
        // Policy "reply": turned around with correct checksums (built independently above).
        assert_eq!(dp.run(&request4), (XDP_TX, reply4));
        assert_eq!(dp.run(&request6), (XDP_TX, reply6));
        assert_eq!(dp.counter(Counter::EchoReplied), 2);
        // Not a VIP: not ours to answer.
        let other = [
            eth(LB_MAC, CLIENT_MAC, 0x0800),
            ipv4(1, CLIENT4, [10, 100, 0, 99], &echo4(8)),
        ]
        .concat();
        assert_eq!(dp.run(&other), (XDP_PASS, other.clone()));
        assert_eq!(dp.counter(Counter::EchoReplied), 2);
    });
}

#[test]
fn fragments_of_a_datagram_reach_one_backend_when_the_vip_hashes_them() {
    in_fresh_ns(|| {
        let mut dp = standard();
        // A 13-slot table alternating b1 and b2, for UDP port 5353.
        let offset = 195;
        let table: Vec<u16> = (0..13).map(|i| 1 + i % 2).collect();
        dp.pool.write(offset, &table).expect("pool");
        let mut vip = [0u8; 16];
        vip[..4].copy_from_slice(&VIP4);
        let value = ServiceValue {
            id: 15,
            flags: 0,
            table_offset: offset,
            table_size: 13,
            forward: FWD_DSR_L2,
            ..Default::default()
        };
        dp.add_service(ServiceKey::new(4, 17, vip, 5353u16.to_be()), value)
            .expect("service");
        let datagram = |client: [u8; 4]| {
            let mut l4 = udp(40000, 5353, &[7u8; 40]);
            let first = ipv4(17, client, VIP4, &l4[..24]);
            let mut first = first;
            first[6] = 0x20; // more fragments
            let later_payload = l4.split_off(24);
            let mut later = ipv4(17, client, VIP4, &later_payload);
            later[6] = 0;
            later[7] = 2; // offset 16 bytes (2 units of 8)
            // The builders computed the checksums before the flag edits; fix them up.
            lb_tests::packets::fix_ipv4_checksum(&mut first);
            lb_tests::packets::fix_ipv4_checksum(&mut later);
            (
                [eth(LB_MAC, CLIENT_MAC, 0x0800), first].concat(),
                [eth(LB_MAC, CLIENT_MAC, 0x0800), later].concat(),
            )
        };
        let (first, _) = datagram(CLIENT4);
        // No fragment service yet: the kernel reassembles.
        assert_eq!(dp.run(&first), (XDP_PASS, first.clone()));
        assert_eq!(dp.counter(Counter::PassIpv4Fragment), 1);

        dp.fragment_services
            .insert(ServiceKey::new(4, 17, vip, 0), value, 0)
            .expect("fragment service");
        let conntrack_before = dp.conntrack.keys().count();
        let mut seen = std::collections::BTreeSet::new();
        for c in 1..=8u8 {
            let client = [10, 99, 0, c];
            let (first, later) = datagram(client);
            // Where the 3-tuple hashes to, independently of the data plane.
            let k = FlowKey::new(
                4,
                17,
                {
                    let mut a = [0u8; 16];
                    a[..4].copy_from_slice(&client);
                    a
                },
                vip,
                0,
                0,
            );
            let slot = 1 + (lb_common::hash::flow_hash(&k) % 13) % 2;
            let mac = if slot == 1 { B1_MAC } else { B2_MAC };
            assert_eq!(
                dp.run(&first),
                (XDP_TX, rewritten(&first, mac)),
                "client {c} first"
            );
            assert_eq!(
                dp.run(&later),
                (XDP_TX, rewritten(&later, mac)),
                "client {c} later"
            );
            seen.insert(slot);
        }
        assert_eq!(
            seen.len(),
            2,
            "datagrams of different clients spread over both backends"
        );
        assert_eq!(dp.counter(Counter::FragmentForwarded), 16);
        assert_eq!(
            dp.conntrack.keys().count(),
            conntrack_before,
            "fragments are not remembered"
        );
    });
}

#[test]
fn gue_wraps_the_packet_in_udp_to_the_configured_port() {
    in_fresh_ns(|| {
        let mut dp = encap_dp();
        dp.encap_backend(5, &BACKEND4);
        dp.encap_backend(6, &BACKEND6);
        dp.service_mode(4, 6, &VIP4, 8443, 91, 5, FWD_GUE);
        dp.service_mode(6, 17, &VIP6, 8443, 104, 6, FWD_GUE);

        let inner4 = ipv4(6, CLIENT4, VIP4, &tcp(40000, 8443, 2));
        let input = [eth(LB_MAC, CLIENT_MAC, 0x0800), inner4.clone()].concat();
        let v = encap_variation(u32::from_ne_bytes(CLIENT4), 40000u16.to_be());
        let sport = 0xc000 | (v as u16 & 0x3fff);
        let gue4 = udp(sport, GUE_PORT, &[&[0u8, 4, 0, 0][..], &inner4].concat());
        let want = [eth(ROUTER_MAC, LB_MAC, 0x0800), outer4(17, 0, &gue4)].concat();
        assert_eq!(dp.run(&input), (XDP_REDIRECT, want));

        let inner6 = ipv6(17, CLIENT6, VIP6, &udp(40000, 8443, b"hello"));
        let input = [eth(LB_MAC, CLIENT_MAC, 0x86dd), inner6.clone()].concat();
        let v = variation6();
        let gue6 = udp(
            0xc000 | (v as u16 & 0x3fff),
            GUE_PORT,
            &[&[0u8, 41, 0, 0][..], &inner6].concat(),
        );
        let want = [eth(ROUTER_MAC, LB_MAC, 0x86dd), outer6(17, &gue6)].concat();
        assert_eq!(dp.run(&input), (XDP_REDIRECT, want));
    });
}

/// Only a balancer's tunnels to this host are stripped: one from another source, or to
/// another host's address, would hand the stack a packet "from" any client to a VIP. Both are
/// passed as they came and counted; before, the decapsulator stripped any source's.
#[test]
fn decap_strips_only_tunnels_from_the_balancers_to_this_host() {
    in_fresh_ns(|| {
        let decap = Decapsulator::load().expect("load decap");
        let inner4 = ipv4(6, CLIENT4, VIP4, &tcp(40000, 8080, 2));
        let inner6 = ipv6(6, CLIENT6, VIP6, &tcp(40000, 8080, 2));
        let mut stranger6 = ENCAP_SRC6;
        stranger6[8] = 0xee;
        let mut elsewhere6 = BACKEND6;
        elsewhere6[15] = 0x99;
        for (what, outer) in [
            (
                "IPv4 from outside 172.16.0.0/16",
                ipv4(4, [192, 0, 2, 7], BACKEND4, &inner4),
            ),
            (
                "IPv4 to another host",
                ipv4(4, [172, 16, 9, 9], [10, 60, 0, 99], &inner4),
            ),
            (
                "IPv6 from outside the source prefix",
                ipv6(41, stranger6, BACKEND6, &inner6),
            ),
            ("IPv6 to another host", ipv6(41, ENCAP_SRC6, elsewhere6, &inner6)),
        ] {
            let ethertype = if outer[0] >> 4 == 4 { 0x0800 } else { 0x86dd };
            let input = [eth(B1_MAC, ROUTER_MAC, ethertype), outer].concat();
            assert_eq!(decap.run(&input), (XDP_PASS, input.clone()), "{what}");
        }
        assert_eq!(decap.count(2), 4);
        assert_eq!(decap.count(0), 0);
        // The same inner packets from a balancer's source to this host: stripped.
        let input = [
            eth(B1_MAC, ROUTER_MAC, 0x0800),
            ipv4(4, [172, 16, 200, 1], BACKEND4, &inner4),
        ]
        .concat();
        assert_eq!(
            decap.run(&input),
            (XDP_PASS, [eth(B1_MAC, ROUTER_MAC, 0x0800), inner4].concat())
        );
        assert_eq!(decap.count(0), 1);
    });
}

#[test]
fn decap_strips_gue_on_its_port_only() {
    in_fresh_ns(|| {
        let mut decap = Decapsulator::load().expect("load decap");
        let inner = ipv4(6, CLIENT4, VIP4, &tcp(40000, 8443, 2));
        let gue = udp(0xc123, GUE_PORT, &[&[0u8, 4, 0, 0][..], &inner].concat());
        let input = [
            eth(B1_MAC, ROUTER_MAC, 0x0800),
            ipv4(17, [172, 16, 1, 2], [10, 60, 0, 5], &gue),
        ]
        .concat();
        // GUE off: an ordinary UDP packet for the stack.
        assert_eq!(decap.run(&input), (XDP_PASS, input.clone()));
        decap.gue_port.set(0, GUE_PORT as u32, 0).expect("port");
        assert_eq!(
            decap.run(&input),
            (XDP_PASS, [eth(B1_MAC, ROUTER_MAC, 0x0800), inner].concat())
        );
        // Another UDP port: untouched.
        let other = udp(
            0xc123,
            4789,
            &[&[0u8, 4, 0, 0][..], &ipv4(6, CLIENT4, VIP4, &tcp(1, 2, 2))].concat(),
        );
        let input = [
            eth(B1_MAC, ROUTER_MAC, 0x0800),
            ipv4(17, [172, 16, 1, 2], [10, 60, 0, 5], &other),
        ]
        .concat();
        assert_eq!(decap.run(&input), (XDP_PASS, input.clone()));
    });
}

#[test]
fn too_big_for_the_tunnel_is_answered_with_the_mtu_to_use() {
    in_fresh_ns(|| {
        let mut dp = encap_dp();
        let mut cfg = dp.dp_config.get(&0, 0).expect("cfg");
        cfg.flags = lb_common::dpconfig::DP_F_TOO_BIG_ICMP;
        dp.dp_config.set(0, cfg, 0).expect("cfg");
        dp.encap_backend(5, &[10, 61, 0, 5]); // route MTU 100
        dp.encap_backend(6, &[0xfd, 0x61, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5]); // 1280
        dp.service_mode(4, 6, &VIP4, 9000, 91, 5, FWD_IPIP);
        dp.service_mode(6, 6, &VIP6, 9000, 104, 6, FWD_IPIP);

        // IPv4 with DF, 110 bytes once encapsulated: "fragmentation needed, MTU 80" from the VIP.
        let mut l4 = tcp(40000, 9000, 0x10);
        l4.extend_from_slice(&[9u8; 50]);
        let inner = ipv4(6, CLIENT4, VIP4, &l4);
        let input = [eth(LB_MAC, CLIENT_MAC, 0x0800), inner.clone()].concat();
        let mut icmp = vec![3, 4, 0, 0, 0, 0, 0, 80];
        icmp.extend_from_slice(&inner[..28]);
        let sum = lb_tests::packets::checksum(&icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        let mut ip = ipv4(1, VIP4, CLIENT4, &icmp);
        ip[4..8].copy_from_slice(&[0, 0, 0, 0]);
        lb_tests::packets::fix_ipv4_checksum(&mut ip);
        let want = [eth(CLIENT_MAC, LB_MAC, 0x0800), ip].concat();
        assert_eq!(dp.run(&input), (XDP_TX, want));
        // Without DF a router would fragment; we cannot, so it is a counted drop.
        let mut no_df = input.clone();
        no_df[14 + 6] = 0;
        assert_eq!(dp.run(&no_df).0, XDP_DROP);
        assert_eq!(dp.counter(Counter::DropEncapTooBig), 1);

        // IPv6, 1400 bytes once encapsulated on a 1280 route: "packet too big, MTU 1240".
        let mut l4 = tcp(40000, 9000, 0x10);
        l4.extend_from_slice(&[9u8; 1300]);
        let inner = ipv6(6, CLIENT6, VIP6, &l4);
        let input = [eth(LB_MAC, CLIENT_MAC, 0x86dd), inner.clone()].concat();
        let mut msg = vec![2, 0, 0, 0, 0, 0, 0x04, 0xd8];
        msg.extend_from_slice(&inner[..48]);
        let sum = icmp6_checksum(VIP6, CLIENT6, &msg);
        msg[2..4].copy_from_slice(&sum.to_be_bytes());
        let want = [eth(CLIENT_MAC, LB_MAC, 0x86dd), ipv6(58, VIP6, CLIENT6, &msg)].concat();
        assert_eq!(dp.run(&input), (XDP_TX, want));
        assert_eq!(dp.counter(Counter::IcmpTooBigSent), 2);
    });
}

// NAT: backends that know nothing of the VIP. Slot 7 is the IPv4 backend, slot 8 the IPv6 one,
// both listening on port 8080; SNAT has a one-port range, so its port is known in advance.
const SNAT_PORT: u16 = 40000;
const NAT_BACKEND_PORT: u16 = 8080;
const SYN: u8 = 0x02;
const SYN_ACK: u8 = 0x12;
const ACK: u8 = 0x10;
const FIN_ACK: u8 = 0x11;

/// TCP and UDP services on both VIPs, forwarded by NAT (`snat`: full NAT).
fn nat_dp(snat: bool) -> Balancer {
    let mut dp = with_two_backends();
    dp.nat_backend(7, &NAT_B4, 1);
    dp.nat_backend(8, &NAT_B6, 1);
    let mode = if snat { FWD_SNAT } else { FWD_NAT };
    dp.service_mode(4, 6, &VIP4, 80, 0, 7, mode);
    dp.service_mode(4, 17, &VIP4, 53, 13, 7, mode);
    dp.service_mode(6, 6, &VIP6, 80, 26, 8, mode);
    dp.service_mode(6, 17, &VIP6, 53, 39, 8, mode);
    dp.mark_nat(&[&VIP4, &VIP6, &NAT_B4, &NAT_B6]).expect("filter");
    dp.snat_ports(SNAT_PORT, 1).expect("dp config");
    dp
}

/// An Ethernet frame carrying a TCP segment (`flags`) or a UDP datagram, with every checksum right.
fn nat_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    proto: u8,
    src: &[u8],
    dst: &[u8],
    ports: (u16, u16),
    flags: u8,
) -> Vec<u8> {
    let l4 = if proto == 6 {
        tcp(ports.0, ports.1, flags)
    } else {
        udp(ports.0, ports.1, b"query")
    };
    let (ethertype, mut ip) = if src.len() == 4 {
        (
            0x0800,
            ipv4(
                proto,
                src.try_into().expect("v4"),
                dst.try_into().expect("v4"),
                &l4,
            ),
        )
    } else {
        (
            0x86dd,
            ipv6(
                proto,
                src.try_into().expect("v6"),
                dst.try_into().expect("v6"),
                &l4,
            ),
        )
    };
    fix_l4_checksum(&mut ip);
    [eth(dst_mac, src_mac, ethertype), ip].concat()
}

#[test]
fn nat_translates_both_directions_with_exact_checksums() {
    in_fresh_ns(|| {
        for snat in [false, true] {
            let dp = nat_dp(snat);
            for (client, vip, backend, snat_addr) in [
                (&CLIENT4[..], &VIP4[..], &NAT_B4[..], &SNAT4[..]),
                (&CLIENT6[..], &VIP6[..], &NAT_B6[..], &SNAT6[..]),
            ] {
                for (proto, vport, opening) in [(6, 80, SYN), (17, 53, 0)] {
                    let what = format!("snat={snat} {}-byte addresses proto {proto}", client.len());
                    let cport = 40001;
                    // What the backend sees the connection come from.
                    let (src, sport) = if snat {
                        (snat_addr, SNAT_PORT)
                    } else {
                        (client, cport)
                    };
                    let request = nat_frame(LB_MAC, CLIENT_MAC, proto, client, vip, (cport, vport), opening);
                    let (verdict, out) = dp.run(&request);
                    assert_eq!(verdict, XDP_TX, "{what}: request");
                    let expected = nat_frame(
                        B1_MAC,
                        LB_MAC,
                        proto,
                        src,
                        backend,
                        (sport, NAT_BACKEND_PORT),
                        opening,
                    );
                    assert_eq!(out, expected, "{what}: request rewritten to the backend");

                    let reply_flags = if proto == 6 { SYN_ACK } else { 0 };
                    let reply = nat_frame(
                        LB_MAC,
                        B1_MAC,
                        proto,
                        backend,
                        src,
                        (NAT_BACKEND_PORT, sport),
                        reply_flags,
                    );
                    let (verdict, out) = dp.run(&reply);
                    assert_eq!(verdict, XDP_TX, "{what}: reply");
                    let expected = nat_frame(
                        CLIENT_MAC,
                        LB_MAC,
                        proto,
                        vip,
                        client,
                        (vport, cport),
                        reply_flags,
                    );
                    assert_eq!(out, expected, "{what}: reply rewritten to come from the VIP");

                    // The connection goes on: the next request takes the same translation.
                    let next_flags = if proto == 6 { ACK } else { 0 };
                    let next = nat_frame(LB_MAC, CLIENT_MAC, proto, client, vip, (cport, vport), next_flags);
                    let expected = nat_frame(
                        B1_MAC,
                        LB_MAC,
                        proto,
                        src,
                        backend,
                        (sport, NAT_BACKEND_PORT),
                        next_flags,
                    );
                    assert_eq!(dp.run(&next), (XDP_TX, expected), "{what}: established");
                }
            }
            assert_eq!(dp.counter(Counter::NatCreated), 4);
            assert_eq!(dp.counter(Counter::NatReply), 4);
            assert_eq!(dp.counter(Counter::Tx), 12);
            // One pair per connection; NAT flows stay out of the connection table.
            let entries = dp.nat_entries();
            assert_eq!(entries.len(), 8);
            assert_eq!(entries.iter().filter(|(_, e)| e.is_reply()).count(), 4);
            assert_eq!(dp.conntrack.keys().count(), 0);
        }
    });
}

/// Sets a TCP frame's sequence and acknowledgement numbers, its checksum made right again.
fn with_seq_ack(mut frame: Vec<u8>, seq: u32, ack: u32) -> Vec<u8> {
    let l4 = 14 + if frame[12..14] == [0x08, 0x00] { 20 } else { 40 };
    frame[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
    frame[l4 + 8..l4 + 12].copy_from_slice(&ack.to_be_bytes());
    fix_l4_checksum(&mut frame[14..]);
    frame
}

#[test]
fn nat_connection_is_established_only_by_the_clients_ack_of_the_syn_ack() {
    use lb_common::nat::NAT_F_ESTABLISHED;
    in_fresh_ns(|| {
        let dp = nat_dp(true);
        for (client, vip, backend, snat_addr) in [
            (&CLIENT4[..], &VIP4[..], &NAT_B4[..], &SNAT4[..]),
            (&CLIENT6[..], &VIP6[..], &NAT_B6[..], &SNAT6[..]),
        ] {
            let what = format!("{}-byte addresses", client.len());
            let forward = || {
                let entries = dp.nat_entries();
                let (_, e) = entries
                    .iter()
                    .find(|(k, e)| !e.is_reply() && k.family == if client.len() == 4 { 4 } else { 6 })
                    .expect("forward entry");
                *e
            };
            let syn = nat_frame(LB_MAC, CLIENT_MAC, 6, client, vip, (40001, 80), SYN);
            assert_eq!(dp.run(&syn).0, XDP_TX, "{what}: SYN");
            let syn_ack = with_seq_ack(
                nat_frame(
                    LB_MAC,
                    B1_MAC,
                    6,
                    backend,
                    snat_addr,
                    (NAT_BACKEND_PORT, SNAT_PORT),
                    SYN_ACK,
                ),
                0x1234_5678,
                2,
            );
            assert_eq!(dp.run(&syn_ack).0, XDP_TX, "{what}: SYN-ACK");
            // Answered, but half-open: the backend's answer alone establishes nothing.
            assert_eq!(
                forward().flags & NAT_F_ESTABLISHED,
                0,
                "{what}: after the SYN-ACK"
            );
            assert_eq!(forward().ack_expect, 0x1234_5679, "{what}");
            // A blind ACK with a guessed number is forwarded (the backend judges it) but does
            // not establish the connection; the ACK of the SYN-ACK does.
            for (ack, established) in [(0x1234_0000, false), (0x1234_5679, true)] {
                let frame = nat_frame(LB_MAC, CLIENT_MAC, 6, client, vip, (40001, 80), ACK);
                assert_eq!(
                    dp.run(&with_seq_ack(frame, 2, ack)).0,
                    XDP_TX,
                    "{what}: ACK {ack:#x}"
                );
                assert_eq!(
                    forward().flags & NAT_F_ESTABLISHED != 0,
                    established,
                    "{what}: after an ACK of {ack:#x}"
                );
            }
        }
    });
}

#[test]
fn nat_limits_new_connections_per_source_address() {
    in_fresh_ns(|| {
        let mut dp = nat_dp(false);
        let mut cfg = dp.dp_config.get(&0, 0).expect("dp config");
        cfg.nat_source_limit = 2;
        dp.dp_config.set(0, cfg, 0).expect("dp config");
        let syn = |src: &[u8; 4], port: u16| nat_frame(LB_MAC, CLIENT_MAC, 6, src, &VIP4, (port, 80), SYN);
        assert_eq!(dp.run(&syn(&CLIENT4, 40001)).0, XDP_TX);
        assert_eq!(dp.run(&syn(&CLIENT4, 40002)).0, XDP_TX);
        // The third new connection this second from the same address: dropped and counted.
        assert_eq!(dp.run(&syn(&CLIENT4, 40003)).0, XDP_DROP);
        assert_eq!(dp.counter(Counter::DropNatSourceLimit), 1);
        // Its open connections go on, and another address is not held back.
        let ack = nat_frame(LB_MAC, CLIENT_MAC, 6, &CLIENT4, &VIP4, (40001, 80), ACK);
        assert_eq!(dp.run(&ack).0, XDP_TX);
        assert_eq!(dp.run(&syn(&[10, 99, 0, 2], 40001)).0, XDP_TX);
        assert_eq!(dp.counter(Counter::DropNatSourceLimit), 1);
        assert_eq!(dp.counter(Counter::NatCreated), 3);
    });
}

#[test]
fn nat_drops_what_it_cannot_translate_and_never_reuses_a_port_in_use() {
    in_fresh_ns(|| {
        let dp = nat_dp(true);
        // A segment of a connection the balancer never saw open: dropped as it came.
        let stray = nat_frame(LB_MAC, CLIENT_MAC, 6, &CLIENT4, &VIP4, (40001, 80), ACK);
        assert_eq!(dp.run(&stray).0, XDP_DROP);
        assert_eq!(dp.counter(Counter::DropNatNoEntry), 1);
        assert!(dp.nat_entries().is_empty());

        // The one SNAT port goes to the first connection; a second one to the same backend
        // finds no free port and is dropped, rather than sharing it.
        let first = nat_frame(LB_MAC, CLIENT_MAC, 6, &CLIENT4, &VIP4, (40001, 80), SYN);
        assert_eq!(dp.run(&first).0, XDP_TX);
        let second = nat_frame(LB_MAC, CLIENT_MAC, 6, &CLIENT4, &VIP4, (40002, 80), SYN);
        assert_eq!(dp.run(&second).0, XDP_DROP);
        assert_eq!(dp.counter(Counter::DropNatNoPort), 1);
        assert_eq!(dp.nat_entries().len(), 2);

        // A reply for a port no connection holds is not ours: the kernel gets it unchanged.
        let unknown = nat_frame(LB_MAC, B1_MAC, 6, &NAT_B4, &SNAT4, (NAT_BACKEND_PORT, 40001), ACK);
        assert_eq!(dp.run(&unknown), (XDP_PASS, unknown.clone()));

        // IPv4 UDP without a checksum (0) keeps none; everything else is as usual.
        let mut bare = nat_frame(LB_MAC, CLIENT_MAC, 17, &CLIENT4, &VIP4, (5000, 53), 0);
        bare[14 + 26..14 + 28].copy_from_slice(&[0, 0]);
        let (verdict, out) = dp.run(&bare);
        assert_eq!(verdict, XDP_TX);
        let mut expected = nat_frame(
            B1_MAC,
            LB_MAC,
            17,
            &SNAT4,
            &NAT_B4,
            (SNAT_PORT, NAT_BACKEND_PORT),
            0,
        );
        expected[14 + 26..14 + 28].copy_from_slice(&[0, 0]);
        assert_eq!(out, expected);

        // Without SNAT, two VIPs sharing a backend collide when one client port talks to both:
        // the backend could not tell the replies apart, so the second is a counted drop.
        let mut dp = nat_dp(false);
        let vip2 = [10, 100, 0, 2];
        dp.service_mode(4, 6, &vip2, 80, 52, 7, FWD_NAT);
        dp.mark_nat(&[&vip2]).expect("filter");
        let to_vip1 = nat_frame(LB_MAC, CLIENT_MAC, 6, &CLIENT4, &VIP4, (40001, 80), SYN);
        assert_eq!(dp.run(&to_vip1).0, XDP_TX);
        let to_vip2 = nat_frame(LB_MAC, CLIENT_MAC, 6, &CLIENT4, &vip2, (40001, 80), SYN);
        assert_eq!(dp.run(&to_vip2).0, XDP_DROP);
        assert_eq!(dp.counter(Counter::DropNatCollision), 1);
        assert_eq!(dp.nat_entries().len(), 2);
    });
}

#[test]
fn nat_entries_close_expire_and_follow_backend_changes() {
    use lb_userspace::{
        config::NatConfig,
        nat::{census, monotonic_ns, sweep},
    };
    const SEC: u64 = 1_000_000_000;
    in_fresh_ns(|| {
        let mut dp = nat_dp(false);
        let cfg = NatConfig::default();
        let syn = nat_frame(LB_MAC, CLIENT_MAC, 6, &CLIENT4, &VIP4, (40001, 80), SYN);
        let syn_ack = nat_frame(
            LB_MAC,
            B1_MAC,
            6,
            &NAT_B4,
            &CLIENT4,
            (NAT_BACKEND_PORT, 40001),
            SYN_ACK,
        );
        let client = |flags| nat_frame(LB_MAC, CLIENT_MAC, 6, &CLIENT4, &VIP4, (40001, 80), flags);
        let backend = |flags| {
            nat_frame(
                LB_MAC,
                B1_MAC,
                6,
                &NAT_B4,
                &CLIENT4,
                (NAT_BACKEND_PORT, 40001),
                flags,
            )
        };
        let closing = |dp: &Balancer| {
            dp.nat_entries()
                .iter()
                .find(|(_, e)| !e.is_reply())
                .map(|(_, e)| e.is_closing())
                .expect("forward entry")
        };
        // The three-way handshake: the SYN-ACK's sequence number is 1, the client ACKs 2.
        let open = |dp: &Balancer| {
            assert_eq!(dp.run(&syn).0, XDP_TX);
            assert_eq!(dp.run(&syn_ack).0, XDP_TX);
            assert_eq!(dp.run(&with_seq_ack(client(ACK), 2, 2)).0, XDP_TX);
        };
        open(&dp);
        assert!(!closing(&dp));
        // The backend closes its side: a half-close, still open for the client's data.
        assert_eq!(dp.run(&backend(FIN_ACK)).0, XDP_TX);
        assert!(!closing(&dp), "one FIN is a half-close");
        // The client's FIN too: closing.
        assert_eq!(dp.run(&client(FIN_ACK)).0, XDP_TX);
        assert!(closing(&dp));
        // The client opens the same tuple again: it lives anew.
        assert_eq!(dp.run(&syn).0, XDP_TX);
        assert!(!closing(&dp));
        // A RST from either side closes at once.
        assert_eq!(dp.run(&backend(0x04)).0, XDP_TX);
        assert!(closing(&dp));
        assert_eq!(dp.run(&syn).0, XDP_TX);
        assert_eq!(dp.run(&client(0x14)).0, XDP_TX);
        assert!(closing(&dp));
        assert_eq!(dp.run(&syn).0, XDP_TX);
        // The reopened connection's handshake completes: the backend's SYN-ACK (sequence 1),
        // the client's ACK of it (2). Until then it would be half-open, with the SYN timeout.
        assert_eq!(dp.run(&syn_ack).0, XDP_TX);
        assert_eq!(dp.run(&with_seq_ack(client(ACK), 2, 2)).0, XDP_TX);

        // Expiry on the real table: idle pairs go after their timeout, not before.
        let now = monotonic_ns();
        let swept = sweep(&mut dp.nat, &cfg, now).expect("sweep");
        assert_eq!(swept.expired, 0);
        assert_eq!(census(&dp.nat).connections, 1);
        // What the collector reports (for `lb stats`) is what the table holds.
        assert_eq!(swept.left, census(&dp.nat));
        let tcp_idle = cfg.tcp_timeout_s * SEC;
        assert_eq!(
            sweep(&mut dp.nat, &cfg, now + tcp_idle - SEC)
                .expect("sweep")
                .expired,
            0
        );
        assert_eq!(
            sweep(&mut dp.nat, &cfg, now + tcp_idle + SEC)
                .expect("sweep")
                .expired,
            1
        );
        assert_eq!(census(&dp.nat).entries, 0);
        // A SYN the backend never answered goes after the short SYN timeout: a SYN flood
        // cannot hold the table for the established one.
        assert_eq!(dp.run(&syn).0, XDP_TX);
        let now = monotonic_ns();
        let syn_idle = cfg.tcp_syn_timeout_s * SEC;
        assert_eq!(
            sweep(&mut dp.nat, &cfg, now + syn_idle - SEC)
                .expect("sweep")
                .expired,
            0
        );
        assert_eq!(
            sweep(&mut dp.nat, &cfg, now + syn_idle + SEC)
                .expect("sweep")
                .expired,
            1
        );
        // So does one the backend answered but the client never acknowledged, however often
        // the backend retransmits its SYN-ACK (the attack that held entries for 900 s).
        assert_eq!(dp.run(&syn).0, XDP_TX);
        assert_eq!(dp.run(&syn_ack).0, XDP_TX);
        let now = monotonic_ns();
        assert_eq!(
            sweep(&mut dp.nat, &cfg, now + syn_idle - SEC)
                .expect("sweep")
                .expired,
            0
        );
        // A SYN-ACK retransmitted 1.5 s later stamps the reply entry; it must not count.
        std::thread::sleep(std::time::Duration::from_millis(1500));
        assert_eq!(dp.run(&syn_ack).0, XDP_TX, "a retransmitted SYN-ACK");
        assert_eq!(
            sweep(&mut dp.nat, &cfg, now + syn_idle + SEC)
                .expect("sweep")
                .expired,
            1
        );
        assert_eq!(census(&dp.nat).entries, 0);
        // Closing connections go after the closing timeout.
        open(&dp);
        assert_eq!(dp.run(&backend(FIN_ACK)).0, XDP_TX);
        assert_eq!(dp.run(&client(FIN_ACK)).0, XDP_TX);
        let now = monotonic_ns();
        let closing_idle = cfg.tcp_closing_timeout_s * SEC;
        assert_eq!(
            sweep(&mut dp.nat, &cfg, now + closing_idle - SEC)
                .expect("sweep")
                .expired,
            0
        );
        assert_eq!(
            sweep(&mut dp.nat, &cfg, now + closing_idle + SEC)
                .expect("sweep")
                .expired,
            1
        );
        assert_eq!(census(&dp.nat).entries, 0);
        // UDP after its idle timeout.
        let udp = nat_frame(LB_MAC, CLIENT_MAC, 17, &CLIENT6, &VIP6, (5000, 53), 0);
        assert_eq!(dp.run(&udp).0, XDP_TX);
        let udp_idle = cfg.udp_timeout_s * SEC;
        let now = monotonic_ns();
        assert_eq!(
            sweep(&mut dp.nat, &cfg, now + udp_idle - SEC)
                .expect("sweep")
                .expired,
            0
        );
        assert_eq!(
            sweep(&mut dp.nat, &cfg, now + udp_idle + SEC)
                .expect("sweep")
                .expired,
            1
        );
        // A half pair (its twin lost) is removed once past the grace period.
        assert_eq!(dp.run(&syn).0, XDP_TX);
        let (fwd_key, _) = dp
            .nat_entries()
            .into_iter()
            .find(|(_, e)| !e.is_reply())
            .expect("forward");
        dp.nat.remove(&fwd_key).expect("remove forward");
        assert_eq!(
            sweep(&mut dp.nat, &cfg, monotonic_ns()).expect("sweep").expired,
            0
        );
        assert_eq!(census(&dp.nat).entries, 1, "within the grace period");
        sweep(&mut dp.nat, &cfg, monotonic_ns() + 3 * SEC).expect("sweep");
        assert_eq!(census(&dp.nat).entries, 0);

        // The backend's slot is given to another backend: the old pair is removed and the
        // connection cannot continue; a new one is translated afresh.
        assert_eq!(dp.run(&syn).0, XDP_TX);
        dp.nat_backend(7, &NAT_B4, 2);
        let drops = dp.counter(Counter::DropNatNoEntry);
        assert_eq!(dp.run(&client(ACK)).0, XDP_DROP);
        assert_eq!(dp.counter(Counter::DropNatNoEntry), drops + 1);
        assert!(dp.nat_entries().is_empty());
        assert_eq!(dp.run(&syn).0, XDP_TX);
        assert!(dp.nat_entries().iter().all(|(_, e)| e.generation == 2));
    });
}

#[test]
fn icmp_errors_about_nat_connections_are_translated_both_ways() {
    const ROUTER4: [u8; 4] = [192, 0, 2, 1];
    const ROUTER6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    /// The first bytes of a packet (IP header and 8 bytes of TCP/UDP), as an error quotes it.
    fn quote(proto: u8, src: &[u8], dst: &[u8], ports: (u16, u16), flags: u8) -> Vec<u8> {
        let ip_len = if src.len() == 4 { 20 } else { 40 };
        nat_frame(LB_MAC, LB_MAC, proto, src, dst, ports, flags)[14..14 + ip_len + 8].to_vec()
    }
    fn error4(
        macs: ([u8; 6], [u8; 6]),
        src: [u8; 4],
        dst: [u8; 4],
        kind: u8,
        code: u8,
        quoted: &[u8],
    ) -> Vec<u8> {
        let mut icmp = vec![kind, code, 0, 0, 0, 0, 0x05, 0x00];
        icmp.extend_from_slice(quoted);
        let sum = lb_tests::packets::checksum(&icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        [eth(macs.0, macs.1, 0x0800), ipv4(1, src, dst, &icmp)].concat()
    }
    fn error6(
        macs: ([u8; 6], [u8; 6]),
        src: [u8; 16],
        dst: [u8; 16],
        kind: u8,
        code: u8,
        quoted: &[u8],
    ) -> Vec<u8> {
        let mut icmp = vec![kind, code, 0, 0, 0, 0, 0x05, 0x00];
        icmp.extend_from_slice(quoted);
        let sum = icmp6_checksum(src, dst, &icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        [eth(macs.0, macs.1, 0x86dd), ipv6(58, src, dst, &icmp)].concat()
    }
    in_fresh_ns(|| {
        // SNAT: a router on the client's path says "fragmentation needed" about the reply it
        // got from the VIP; the backend gets it about the reply it sent, from the SNAT address.
        let dp = nat_dp(true);
        let syn = nat_frame(LB_MAC, CLIENT_MAC, 6, &CLIENT4, &VIP4, (40001, 80), SYN);
        assert_eq!(dp.run(&syn).0, XDP_TX);
        let input = error4(
            (LB_MAC, CLIENT_MAC),
            ROUTER4,
            VIP4,
            3,
            4,
            &quote(6, &VIP4, &CLIENT4, (80, 40001), SYN_ACK),
        );
        let expected = error4(
            (B1_MAC, LB_MAC),
            SNAT4,
            NAT_B4,
            3,
            4,
            &quote(6, &NAT_B4, &SNAT4, (NAT_BACKEND_PORT, SNAT_PORT), SYN_ACK),
        );
        assert_eq!(dp.run(&input), (XDP_TX, expected), "client-side error, SNAT");
        // The same over IPv6: "packet too big".
        let syn6 = nat_frame(LB_MAC, CLIENT_MAC, 6, &CLIENT6, &VIP6, (40001, 80), SYN);
        assert_eq!(dp.run(&syn6).0, XDP_TX);
        let input = error6(
            (LB_MAC, CLIENT_MAC),
            ROUTER6,
            VIP6,
            2,
            0,
            &quote(6, &VIP6, &CLIENT6, (80, 40001), SYN_ACK),
        );
        let expected = error6(
            (B1_MAC, LB_MAC),
            SNAT6,
            NAT_B6,
            2,
            0,
            &quote(6, &NAT_B6, &SNAT6, (NAT_BACKEND_PORT, SNAT_PORT), SYN_ACK),
        );
        assert_eq!(
            dp.run(&input),
            (XDP_TX, expected),
            "client-side error, SNAT, IPv6"
        );

        // Plain NAT, the other way: the backend has no socket for a UDP request and says "port
        // unreachable" to the client it saw; the client gets it from the VIP, about the packet
        // it sent to the VIP. The quoted UDP checksum is left as it was.
        let dp = nat_dp(false);
        for (client, vip, backend) in [
            (&CLIENT4[..], &VIP4[..], &NAT_B4[..]),
            (&CLIENT6[..], &VIP6[..], &NAT_B6[..]),
        ] {
            let request = nat_frame(LB_MAC, CLIENT_MAC, 17, client, vip, (5000, 53), 0);
            assert_eq!(dp.run(&request).0, XDP_TX);
            let seen = quote(17, client, backend, (5000, NAT_BACKEND_PORT), 0);
            let mut meant = quote(17, client, vip, (5000, 53), 0);
            let csum_at = meant.len() - 2;
            meant[csum_at..].copy_from_slice(&seen[csum_at..]);
            let (input, expected) = if client.len() == 4 {
                let (c, v, b) = (CLIENT4, VIP4, NAT_B4);
                (
                    error4((LB_MAC, B1_MAC), b, c, 3, 3, &seen),
                    error4((CLIENT_MAC, LB_MAC), v, c, 3, 3, &meant),
                )
            } else {
                let (c, v, b) = (CLIENT6, VIP6, NAT_B6);
                (
                    error6((LB_MAC, B1_MAC), b, c, 1, 4, &seen),
                    error6((CLIENT_MAC, LB_MAC), v, c, 1, 4, &meant),
                )
            };
            assert_eq!(
                dp.run(&input),
                (XDP_TX, expected),
                "backend-side error, {}-byte addresses",
                client.len()
            );
        }
        assert_eq!(dp.counter(Counter::IcmpErrorForwarded), 2);

        // Errors about connections the table does not hold: from the client side a counted
        // drop, from the backend side not ours (the kernel gets it).
        let unknown = error4(
            (LB_MAC, CLIENT_MAC),
            ROUTER4,
            VIP4,
            3,
            4,
            &quote(6, &VIP4, &CLIENT4, (80, 40999), SYN_ACK),
        );
        assert_eq!(dp.run(&unknown).0, XDP_DROP);
        assert_eq!(dp.counter(Counter::DropNatNoEntry), 1);
        assert_eq!(
            dp.counter(Counter::IcmpErrorForwarded),
            2,
            "a dropped error is not counted as forwarded"
        );
        let unknown = error4(
            (LB_MAC, B1_MAC),
            NAT_B4,
            CLIENT4,
            3,
            3,
            &quote(17, &CLIENT4, &NAT_B4, (5999, NAT_BACKEND_PORT), 0),
        );
        assert_eq!(dp.run(&unknown), (XDP_PASS, unknown.clone()));
        // Errors create nothing.
        assert_eq!(dp.nat_entries().len(), 4);

        // Plain NAT, client side: the router's address stays the source (the backend sees
        // the client's own address on the connection, so nothing else needs hiding).
        let syn = nat_frame(LB_MAC, CLIENT_MAC, 6, &CLIENT4, &VIP4, (40001, 80), SYN);
        assert_eq!(dp.run(&syn).0, XDP_TX);
        let input = error4(
            (LB_MAC, CLIENT_MAC),
            ROUTER4,
            VIP4,
            3,
            4,
            &quote(6, &VIP4, &CLIENT4, (80, 40001), SYN_ACK),
        );
        let expected = error4(
            (B1_MAC, LB_MAC),
            ROUTER4,
            NAT_B4,
            3,
            4,
            &quote(6, &NAT_B4, &CLIENT4, (NAT_BACKEND_PORT, 40001), SYN_ACK),
        );
        assert_eq!(dp.run(&input), (XDP_TX, expected), "client-side error, plain NAT");

        // SNAT, backend side, from a router on the backends' network: to the client, from the
        // VIP, about the datagram the client sent.
        let dp = nat_dp(true);
        let request = nat_frame(LB_MAC, CLIENT_MAC, 17, &CLIENT4, &VIP4, (5000, 53), 0);
        assert_eq!(dp.run(&request).0, XDP_TX);
        let seen = quote(17, &SNAT4, &NAT_B4, (SNAT_PORT, NAT_BACKEND_PORT), 0);
        let mut meant = quote(17, &CLIENT4, &VIP4, (5000, 53), 0);
        let csum_at = meant.len() - 2;
        meant[csum_at..].copy_from_slice(&seen[csum_at..]);
        let input = error4((LB_MAC, B1_MAC), [10, 97, 0, 254], SNAT4, 3, 4, &seen);
        let expected = error4((CLIENT_MAC, LB_MAC), VIP4, CLIENT4, 3, 4, &meant);
        assert_eq!(dp.run(&input), (XDP_TX, expected), "backend-side error, SNAT");
    });
}

#[test]
fn nat_replies_ports_and_checksums_in_the_corners() {
    in_fresh_ns(|| {
        // A reply whose destination is also a VIP address (here the client's own address is a
        // DSR VIP too): the NAT table is asked first, so the reply is still translated.
        let mut dp = nat_dp(false);
        dp.service(4, 6, &CLIENT4, 9999, 52, 1);
        let syn = nat_frame(LB_MAC, CLIENT_MAC, 6, &CLIENT4, &VIP4, (40001, 80), SYN);
        assert_eq!(dp.run(&syn).0, XDP_TX);
        let reply = nat_frame(
            LB_MAC,
            B1_MAC,
            6,
            &NAT_B4,
            &CLIENT4,
            (NAT_BACKEND_PORT, 40001),
            SYN_ACK,
        );
        let expected = nat_frame(CLIENT_MAC, LB_MAC, 6, &VIP4, &CLIENT4, (80, 40001), SYN_ACK);
        assert_eq!(dp.run(&reply), (XDP_TX, expected));

        // A UDP checksum that comes out 0 after translation is sent as 0xffff (0 would mean
        // "no checksum"). The payload is chosen so the translated datagram sums to exactly that.
        let dp = nat_dp(false);
        let with_payload = |src: &[u8], dst: &[u8], ports: (u16, u16), payload: &[u8]| {
            let mut ip = ipv4(
                17,
                src.try_into().expect("v4"),
                dst.try_into().expect("v4"),
                &udp(ports.0, ports.1, payload),
            );
            fix_l4_checksum(&mut ip);
            ip
        };
        let probe = with_payload(&CLIENT4, &NAT_B4, (5000, NAT_BACKEND_PORT), &[0, 0]);
        // The payload word that makes the translated datagram's sum 0xffff: its checksum then.
        let word = u16::from_be_bytes([probe[26], probe[27]]);
        let out_ip = with_payload(&CLIENT4, &NAT_B4, (5000, NAT_BACKEND_PORT), &word.to_be_bytes());
        assert_eq!(
            &out_ip[26..28],
            &[0xff, 0xff],
            "the translated datagram needs 0xffff"
        );
        let input = [
            eth(LB_MAC, CLIENT_MAC, 0x0800),
            with_payload(&CLIENT4, &VIP4, (5000, 53), &word.to_be_bytes()),
        ]
        .concat();
        let expected = [eth(B1_MAC, LB_MAC, 0x0800), out_ip].concat();
        assert_eq!(dp.run(&input), (XDP_TX, expected));

        // Four SNAT ports: four connections to one backend get four different ones, a fifth
        // none.
        let dp = nat_dp(true);
        let mut cfg = dp.dp_config.get(&0, 0).expect("config");
        cfg.nat_port_count = 4;
        let mut dp = dp;
        dp.dp_config.set(0, cfg, 0).expect("config");
        for cport in 40001..=40005 {
            let syn = nat_frame(LB_MAC, CLIENT_MAC, 6, &CLIENT4, &VIP4, (cport, 80), SYN);
            let (verdict, _) = dp.run(&syn);
            assert_eq!(
                verdict,
                if cport <= 40004 { XDP_TX } else { XDP_DROP },
                "client port {cport}"
            );
        }
        let mut ports: Vec<u16> = dp
            .nat_entries()
            .iter()
            .filter(|(_, e)| !e.is_reply())
            .map(|(_, e)| u16::from_be(e.src_port))
            .collect();
        ports.sort();
        assert_eq!(ports, [SNAT_PORT, SNAT_PORT + 1, SNAT_PORT + 2, SNAT_PORT + 3]);
        assert_eq!(dp.counter(Counter::DropNatNoPort), 1);
        assert_eq!(dp.counter(Counter::NatCreated), 4);
    });
}

/// The counting strategies pick by the active-flow counts and skip members at their cap (the
/// counts move +1 at a pinned flow, −1 once at the client's FIN); second chance sends a
/// segment whose entry is lost to the previous table's live owner.
#[test]
fn strategies_pick_by_counts_and_caps_and_second_chance_takes_the_previous_table() {
    use lb_common::strategy::{STRATEGY_LEAST_CONNECTIONS, STRATEGY_MAGLEV, member_words};
    in_fresh_ns(|| {
        let mut dp = with_two_backends();
        let key = |port: u16| {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&VIP4);
            ServiceKey::new(4, 6, a, port.to_be())
        };
        let frame = |sport: u16, dport: u16, flags: u8| {
            [
                eth(LB_MAC, CLIENT_MAC, 0x0800),
                ipv4(6, CLIENT4, VIP4, &tcp(sport, dport, flags)),
            ]
            .concat()
        };
        let set_region = |dp: &mut Balancer, offset: u32, words: &[u16]| {
            dp.pool.write(offset, words).expect("pool");
        };
        // Least connections over b1 and b2, an element (slot, weight, cap) each.
        let members =
            |caps: [u32; 2]| [member_words(1, 100, caps[0]), member_words(2, 100, caps[1])].concat();
        set_region(&mut dp, 100, &members([0, 0]));
        let lc = ServiceValue {
            id: 20,
            flags: 0,
            table_offset: 100,
            table_size: 8,
            forward: FWD_DSR_L2,
            strategy: STRATEGY_LEAST_CONNECTIONS,
            ..Default::default()
        };
        dp.add_service(key(90), lc).expect("service");
        dp.active.set(1, 5, 0).unwrap();
        dp.active.set(2, 3, 0).unwrap();
        let syn = frame(41000, 90, 0x02);
        assert_eq!(
            dp.run(&syn),
            (XDP_TX, rewritten(&syn, B2_MAC)),
            "the less loaded b2"
        );
        assert_eq!(dp.active.get(&2, 0).unwrap(), 4, "+1 for the pinned flow");
        dp.active.set(2, 10, 0).unwrap();
        let syn = frame(41001, 90, 0x02);
        assert_eq!(dp.run(&syn), (XDP_TX, rewritten(&syn, B1_MAC)), "now b1 is");
        assert_eq!(dp.active.get(&1, 0).unwrap(), 6);
        // Its client's FIN takes it off b1's count, once.
        let fin = frame(41001, 90, 0x11);
        assert_eq!(dp.run(&fin).0, XDP_TX);
        assert_eq!(dp.run(&fin).0, XDP_TX);
        assert_eq!(dp.active.get(&1, 0).unwrap(), 5, "−1 once");
        // Both at their caps (5 and 10): the new flow is dropped and counted.
        set_region(&mut dp, 100, &members([5, 10]));
        let dropped = dp.counter(Counter::DropMaxconn);
        let syn = frame(41002, 90, 0x02);
        assert_eq!(dp.run(&syn).0, XDP_DROP);
        assert_eq!(dp.counter(Counter::DropMaxconn), dropped + 1);

        // Second chance: the current table gives every hash to b1, the previous one to b2.
        set_region(&mut dp, 200, &[1; 13]);
        set_region(&mut dp, 213, &[2; 13]);
        let maglev = ServiceValue {
            id: 21,
            flags: 0,
            table_offset: 200,
            table_size: 13,
            forward: FWD_DSR_L2,
            strategy: STRATEGY_MAGLEV,
            prev_offset: 213,
            prev_size: 13,
        };
        dp.add_service(key(91), maglev).expect("service");
        let hits = dp.counter(Counter::SecondChanceHit);
        let lost = frame(42000, 91, 0x10);
        assert_eq!(
            dp.run(&lost),
            (XDP_TX, rewritten(&lost, B2_MAC)),
            "a lost entry's segment"
        );
        assert_eq!(dp.counter(Counter::SecondChanceHit), hits + 1);
        let syn = frame(42001, 91, 0x02);
        assert_eq!(
            dp.run(&syn),
            (XDP_TX, rewritten(&syn, B1_MAC)),
            "a SYN takes the current table"
        );
        // The previous owner gone: the current table's.
        let mut b2 = dp.backends.get(&2, 0).unwrap();
        b2.flags = 0;
        dp.backends.set(2, b2, 0).unwrap();
        let lost = frame(42002, 91, 0x10);
        assert_eq!(dp.run(&lost), (XDP_TX, rewritten(&lost, B1_MAC)));
        assert_eq!(dp.counter(Counter::SecondChanceHit), hits + 1);
    });
}
