//! IPIP and GUE to routed backends: the outer headers byte for byte, the counted failures (no
//! route, no neighbour, too big) and the ICMP answer with the MTU to use.

use lb_common::{
    Counter,
    dpconfig::encap_variation,
    service::{FWD_GUE, FWD_IPIP},
};
use lb_tests::packets::{
    BACKEND4, BACKEND6, CLIENT_MAC, CLIENT4, CLIENT6, ENCAP_SRC4, ENCAP_SRC6, LB_MAC, ROUTER_MAC, VIP4, VIP6,
    XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, eth, ipv4, ipv6, tcp, udp,
};

use super::{GUE_PORT, Golden, encap_dp, icmp6_checksum, in_fresh_ns};

/// The outer source a flow gets: the prefix with the flow's variation in the last 16 bits.
pub(super) fn outer_src4(client: [u8; 4], sport: u16) -> [u8; 4] {
    let v = encap_variation(u32::from_ne_bytes(client), sport.to_be()) as u16;
    [ENCAP_SRC4[0], ENCAP_SRC4[1], (v >> 8) as u8, v as u8]
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

/// Packets a CPU sends by a cached next hop before it asks the FIB again (`NEXT_HOP_USES` in
/// lb-ebpf's encap.rs).
const NEXT_HOP_USES: usize = 4096;

#[test]
fn a_cached_next_hop_holds_until_the_epoch_moves_or_its_uses_run_out() {
    in_fresh_ns(|| {
        // Every run on one CPU: the cache is per CPU, and a thread may move between runs.
        // SAFETY: a zeroed cpu_set_t with one CPU set, for this thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            assert_eq!(libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set), 0);
        }
        let mut dp = encap_dp();
        dp.encap_backend(5, &BACKEND4);
        dp.service_mode(4, 6, &VIP4, 8080, 91, 5, FWD_IPIP);
        let input = [
            eth(LB_MAC, CLIENT_MAC, 0x0800),
            ipv4(6, CLIENT4, VIP4, &tcp(40000, 8080, 2)),
        ]
        .concat();
        let dst = |dp: &lb_tests::fixture::Balancer| {
            let (verdict, out) = dp.run(&input);
            assert_eq!(verdict, XDP_REDIRECT);
            <[u8; 6]>::try_from(&out[..6]).expect("a MAC")
        };
        assert_eq!(dst(&dp), ROUTER_MAC);
        // The router's MAC changes: the kernel knows at once, the cached hop does not, and no
        // clock expires it (it held for 100 ms before).
        let moved = [0x02, 0, 0, 0, 0, 0x51];
        let replace = |mac: &str| {
            lb_tests::netns::run(std::process::Command::new("ip").args([
                "neigh",
                "replace",
                "10.50.0.2",
                "lladdr",
                mac,
                "dev",
                "lbt-e",
                "nud",
                "permanent",
            ]))
            .expect("neigh replace")
        };
        replace("02:00:00:00:00:51");
        std::thread::sleep(std::time::Duration::from_millis(150));
        assert_eq!(
            dst(&dp),
            ROUTER_MAC,
            "the cached hop is used until the epoch moves"
        );
        // The daemon's bump after the kernel's notification.
        dp.edit_config(|c| c.hop_epoch = c.hop_epoch.wrapping_add(1))
            .expect("bump");
        assert_eq!(dst(&dp), moved, "a new epoch looks the hop up again");
        // With no bump (no daemon), the hop is looked up again after its uses: the first
        // packet above filled it and used none, so NEXT_HOP_USES more go the old way. All run
        // on this thread's CPU (test runs are per CPU, the cache too).
        replace("02:00:00:00:00:50");
        for i in 0..NEXT_HOP_USES {
            assert_eq!(dst(&dp), moved, "packet {i} of the cached hop's uses");
        }
        assert_eq!(dst(&dp), ROUTER_MAC, "looked up again once its uses ran out");
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
