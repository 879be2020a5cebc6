//! NAT and full NAT (SNAT): both directions translated with exact checksums; connections
//! opened, established, closed, expired and limited; ICMP errors about them; the corners.

use lb_common::{
    Counter, FlowKey, NatEntry,
    service::{FWD_NAT, FWD_SNAT},
};
use lb_tests::{
    fixture::{Balancer, nat_backend},
    packets::{
        CLIENT_MAC, CLIENT4, CLIENT6, LB_MAC, NAT_B4, NAT_B6, SNAT4, SNAT6, VIP4, VIP6, XDP_DROP, XDP_PASS,
        XDP_TX, eth, fix_l4_checksum, ipv4, ipv6, tcp, udp,
    },
};

use super::{B1_MAC, Golden, icmp6_checksum, in_fresh_ns, with_two_backends};

// NAT: backends that know nothing of the VIP. Slot 7 is the IPv4 backend, slot 8 the IPv6 one,
// both listening on port 8080; SNAT has a one-port range, so its port is known in advance.
const SNAT_PORT: u16 = 40000;
const NAT_BACKEND_PORT: u16 = 8080;
const SYN: u8 = 0x02;
const SYN_ACK: u8 = 0x12;
const ACK: u8 = 0x10;
const FIN_ACK: u8 = 0x11;

/// The NAT tests' shorthand on the fixture (a failed map access panics).
trait NatShorthand {
    /// A NAT backend in `slot` on NAT_BACKEND_PORT, reached through lo.
    fn nat_backend(&mut self, slot: u32, addr: &[u8], generation: u32);
    fn nat_entries(&self) -> Vec<(FlowKey, NatEntry)>;
}

impl NatShorthand for Balancer {
    fn nat_backend(&mut self, slot: u32, addr: &[u8], generation: u32) {
        let b = nat_backend(addr, NAT_BACKEND_PORT, generation, B1_MAC);
        self.backends.set(slot, b, 0).expect("set backend");
    }

    fn nat_entries(&self) -> Vec<(FlowKey, NatEntry)> {
        self.nat.iter().map(|r| r.expect("entry")).collect()
    }
}

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
