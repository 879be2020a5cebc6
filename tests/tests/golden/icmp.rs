//! ICMP: errors about a flow reach the backend that owns it (encapsulated when the flow is);
//! echo requests to a VIP are answered or passed, as configured.

use lb_common::{Counter, service::FWD_IPIP};
use lb_tests::packets::{
    BACKEND4, CLIENT_MAC, CLIENT4, CLIENT6, LB_MAC, VIP4, VIP6, XDP_PASS, XDP_REDIRECT, XDP_TX, eth, ipv4,
    ipv6, tcp, udp,
};

use super::{
    B1_MAC, B2_MAC, Golden, encap_dp, golden_encapsulation::outer_src4, icmp6_checksum, in_fresh_ns,
    rewritten, standard,
};

#[test]
fn icmp_errors_reach_the_backend_that_owns_the_flow() {
    in_fresh_ns(|| {
        let mut dp = standard();
        const ROUTER4: [u8; 4] = [192, 0, 2, 1];
        const ROUTER6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        // Flows pinned to b1 by their first packet, then both tables moved to b2: only the
        // embryonic table knows.
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
        let entries = (dp.conntrack.keys().count(), dp.embryonic.keys().count());
        assert_eq!(dp.run(&fresh), (XDP_TX, rewritten(&fresh, B2_MAC)));
        // ... without creating an entry: spoofed errors must not fill the tables.
        assert_eq!(
            (dp.conntrack.keys().count(), dp.embryonic.keys().count()),
            entries
        );
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
