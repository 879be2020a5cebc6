//! L2 DSR: VIP traffic rewritten to its backend's MAC and sent back out (or redirected), the
//! rest passed or dropped unchanged and counted; the connection table and its flood guard, and
//! fragments hashed to one backend.

use lb_common::{Counter, FlowKey, ServiceKey, ServiceValue, backend::BACKEND_F_ACTIVE, service::FWD_DSR_L2};
use lb_tests::{
    fixture::Balancer,
    packets::{
        CLIENT_MAC, CLIENT4, CLIENT6, LB_MAC, VIP4, VIP6, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, eth,
        ipv4, ipv6, tcp, udp,
    },
};

use super::{B1_MAC, B2_MAC, Golden, in_fresh_ns, rewritten, standard};

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

/// The VIP filter is asked right after the IP header: a malformed packet to another address is
/// the kernel's to judge (passed unchanged, `pass_not_vip`, no drop counted); the same packet to a
/// VIP is still a counted drop.
#[test]
fn malformed_packets_to_other_addresses_pass_to_the_kernel() {
    in_fresh_ns(|| {
        let dp = standard();
        const OTHER4: [u8; 4] = [10, 100, 0, 2];
        const OTHER6: [u8; 16] = [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
        // A TCP header cut by the total length (the frame holds all of it), a data offset below
        // 5, a UDP header cut by the IPv6 payload length, and a total length past the frame.
        let cut_tcp4 = |dst| {
            let mut f = [
                eth(LB_MAC, CLIENT_MAC, 0x0800),
                ipv4(6, CLIENT4, dst, &tcp(40000, 80, 0x10)),
            ]
            .concat();
            f[16..18].copy_from_slice(&30u16.to_be_bytes());
            f
        };
        let bad_doff4 = |dst| {
            let mut f = [
                eth(LB_MAC, CLIENT_MAC, 0x0800),
                ipv4(6, CLIENT4, dst, &tcp(40000, 80, 0x10)),
            ]
            .concat();
            f[14 + 20 + 12] = 0x30;
            f
        };
        let cut_udp6 = |dst| {
            [
                eth(LB_MAC, CLIENT_MAC, 0x86dd),
                ipv6(17, CLIENT6, dst, &[0, 1, 0]),
            ]
            .concat()
        };
        let long6 = |dst| {
            let mut f = [
                eth(LB_MAC, CLIENT_MAC, 0x86dd),
                ipv6(6, CLIENT6, dst, &tcp(40000, 80, 0x10)),
            ]
            .concat();
            f[14 + 4..14 + 6].copy_from_slice(&21u16.to_be_bytes());
            f
        };
        let cases = [
            (
                "cut tcp header",
                cut_tcp4(VIP4),
                cut_tcp4(OTHER4),
                Counter::DropTruncatedL4,
            ),
            (
                "tcp data offset below 5",
                bad_doff4(VIP4),
                bad_doff4(OTHER4),
                Counter::DropBadL4Header,
            ),
            (
                "cut udp header, ipv6",
                cut_udp6(VIP6),
                cut_udp6(OTHER6),
                Counter::DropTruncatedL4,
            ),
            (
                "payload length past the frame, ipv6",
                long6(VIP6),
                long6(OTHER6),
                Counter::DropTruncatedL3,
            ),
        ];
        for (name, to_vip, to_other, drop) in cases {
            let (before, dropped) = (dp.counters(), dp.counter(drop));
            assert_eq!(
                dp.run(&to_other),
                (XDP_PASS, to_other.clone()),
                "{name}, to another address"
            );
            let after = dp.counters();
            let moved: Vec<&str> = Counter::ALL
                .iter()
                .zip(after.iter().zip(&before))
                .filter(|(_, (a, b))| a != b)
                .map(|(c, _)| c.name())
                .collect();
            assert_eq!(moved, ["pass_not_vip"], "{name}, to another address: counted as");
            assert_eq!(dp.run(&to_vip), (XDP_DROP, to_vip.clone()), "{name}, to a VIP");
            assert_eq!(dp.counter(drop), dropped + 1, "{name}, to a VIP: {}", drop.name());
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
        // The established flow in the connection table; the SYN, a flow of one packet, apart.
        assert_eq!(dp.conntrack.keys().count(), 1);
        assert_eq!(dp.embryonic.keys().count(), 1);
        // b1 is retired: its flow is picked again from the current table.
        let mut b1 = dp.backends.get(&1, 0).expect("b1");
        b1.flags = 0;
        dp.backends.set(1, b1, 0).expect("retire b1");
        assert_eq!(dp.run(&flow).1, rewritten(&flow, B2_MAC));
        assert_eq!(dp.counter(Counter::ConntrackStale), 1);

        // Picked again as a flow of one packet: out of the connection table.
        assert_eq!(dp.conntrack.keys().count(), 0);
        assert_eq!(dp.embryonic.keys().count(), 2);

        // A SYN opens a flow: it is not searched for, it picks from the current table and its
        // entry replaces the old one. Bring b1 back and point the table at it again.
        b1.flags = BACKEND_F_ACTIVE;
        dp.backends.set(1, b1, 0).expect("revive b1");
        dp.service(4, 6, &VIP4, 80, 52, 1);
        let misses = dp.counter(Counter::ConntrackMiss);
        assert_eq!(dp.run(&syn).1, rewritten(&syn, B1_MAC));
        assert_eq!(dp.counter(Counter::ConntrackMiss), misses + 1);
        // The client's next packet moves it to the connection table.
        let promoted = dp.counter(Counter::EmbryonicPromoted);
        assert_eq!(dp.run(&flow).1, rewritten(&flow, B1_MAC));
        assert_eq!(dp.counter(Counter::EmbryonicPromoted), promoted + 1);
        assert_eq!(dp.conntrack.keys().count(), 1);
        assert_eq!(dp.embryonic.keys().count(), 1);

        // A new connection on the same tuple (the client reused its port) after the table moved
        // to b2: its SYN takes the old connection's entry out, so its ACK follows the SYN.
        dp.service(4, 6, &VIP4, 80, 52, 2);
        assert_eq!(dp.run(&syn).1, rewritten(&syn, B2_MAC));
        assert_eq!(dp.conntrack.keys().count(), 0);
        assert_eq!(dp.run(&flow).1, rewritten(&flow, B2_MAC));
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
            let entries = dp.embryonic.keys().count();
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
            let now_entries = dp.embryonic.keys().count() - entries;
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
        let entries = dp.embryonic.keys().count();
        for i in 0..5 {
            dp.run(&syn(42000 + i));
        }
        assert_eq!(dp.counter(Counter::ConntrackFloodSkipped), skipped);
        assert_eq!(dp.embryonic.keys().count(), entries + 5);
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

/// A client's SYN retransmit (the same tuple again within `SYN_RETRANSMIT_WINDOW`, to the
/// backend its first SYN was given) goes to that backend and is counted as a retransmit: not a
/// new flow and not a connection-table miss, so new flows/s means new flows.
#[test]
fn a_syn_retransmit_is_no_new_flow() {
    in_fresh_ns(|| {
        let dp = standard();
        let syn = [
            eth(LB_MAC, CLIENT_MAC, 0x0800),
            ipv4(6, CLIENT4, VIP4, &tcp(40000, 80, 0x02)),
        ]
        .concat();
        for _ in 0..3 {
            assert_eq!(dp.run(&syn).1, rewritten(&syn, B1_MAC));
        }
        assert_eq!(dp.counter(Counter::ConntrackMiss), 1);
        assert_eq!(dp.counter(Counter::EmbryonicInsert), 1);
        assert_eq!(dp.counter(Counter::SynRetransmit), 2);
        let t = dp.backend_traffic(1);
        assert_eq!((t.packets, t.new_flows, t.syn_retransmits), (3, 1, 2));
    });
}
