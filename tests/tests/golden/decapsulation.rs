//! The backends' decapsulator: it strips IPIP and GUE from the balancers to this host for its
//! local VIPs, and passes every other packet untouched.

use lb_tests::{
    fixture::Decapsulator,
    packets::{
        BACKEND4, BACKEND6, CLIENT4, CLIENT6, ENCAP_SRC6, ROUTER_MAC, VIP4, VIP6, XDP_PASS, eth, ipv4, ipv6,
        tcp, udp,
    },
};

use super::{B1_MAC, GUE_PORT, in_fresh_ns};

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
