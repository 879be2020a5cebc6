//! Golden packets through BPF_PROG_TEST_RUN: exact output bytes and verdict for each case, on
//! the real kernel with real maps. Each test runs in a fresh network namespace.

use aya::{
    maps::{Array, DevMapHash, HashMap, MapData, PerCpuArray},
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_common::{
    Backend, Counter, FlowKey, FlowState, ServiceKey, ServiceValue, VipFilter, backend::BACKEND_F_ACTIVE,
    maps,
};
use lb_tests::{
    NetNs, in_ns,
    packets::{eth, ipv4, ipv6, tcp, udp},
    topology::empty_ebpf,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x1b];
const B1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb1];
const B2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb2];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc1];
const VIP4: [u8; 4] = [10, 100, 0, 1];
const VIP6: [u8; 16] = [0xfd, 0x99, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const CLIENT4: [u8; 4] = [10, 99, 0, 1];
const CLIENT6: [u8; 16] = [0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

struct Dp {
    ebpf: aya::Ebpf,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    vip_filter: Array<MapData, VipFilter>,
    backends: Array<MapData, Backend>,
    pool: Array<MapData, u32>,
    global: PerCpuArray<MapData, u64>,
    conntrack: HashMap<MapData, FlowKey, FlowState>,
    tx_ports: DevMapHash<MapData>,
}

impl Dp {
    fn new() -> Self {
        let mut ebpf = empty_ebpf().expect("load object");
        let prog: &mut Xdp = ebpf
            .program_mut(maps::PROG_LB)
            .expect("lb")
            .try_into()
            .expect("xdp");
        prog.load().expect("verifier accepts lb");
        let mut take = |n: &str| ebpf.take_map(n).expect(n);
        let services = take(maps::SERVICES).try_into().expect("services");
        let vip_filter = take(maps::VIP_FILTER).try_into().expect("vip filter");
        let backends = take(maps::BACKENDS).try_into().expect("backends");
        let pool = take(maps::MAGLEV_POOL).try_into().expect("pool");
        let global = take(maps::GLOBAL_STATS).try_into().expect("global");
        let conntrack = take(maps::CONNTRACK).try_into().expect("conntrack");
        let tx_ports = take(maps::TX_PORTS).try_into().expect("tx ports");
        let mut dp = Self {
            ebpf,
            services,
            vip_filter,
            backends,
            pool,
            global,
            conntrack,
            tx_ports,
        };
        // Backend slot 1 -> b1, slot 2 -> b2, both reached through ifindex 1 (lo: test_run's ingress).
        dp.backend(1, B1_MAC, 1);
        dp.backend(2, B2_MAC, 1);
        dp
    }

    fn backend(&mut self, slot: u32, mac: [u8; 6], ifindex: u32) {
        let b = Backend {
            addr: [0; 16],
            family: 4,
            flags: BACKEND_F_ACTIVE,
            port: 0,
            generation: 1,
            ifindex,
            dst_mac: mac,
            src_mac: LB_MAC,
        };
        self.backends.set(slot, b, 0).expect("set backend");
    }

    /// A service whose 13-slot table at `offset` names `slot` everywhere.
    fn service(&mut self, family: u8, proto: u8, addr: &[u8], port: u16, offset: u32, slot: u32) {
        let mut a = [0u8; 16];
        a[..addr.len()].copy_from_slice(addr);
        for i in 0..13 {
            self.pool.set(offset + i, slot, 0).expect("pool");
        }
        let v = ServiceValue {
            id: offset / 13,
            flags: 0,
            table_offset: offset,
            table_size: 13,
            forward: 0,
            _reserved: 0,
        };
        self.insert_service(ServiceKey::new(family, proto, a, port.to_be()), v);
    }

    /// As the daemon does it: the VIP filter learns the address, then the service appears.
    fn insert_service(&mut self, key: ServiceKey, value: ServiceValue) {
        let mut filter = self.vip_filter.get(&0, 0).expect("filter");
        filter.add(&key);
        self.vip_filter.set(0, filter, 0).expect("filter");
        self.services.insert(key, value, 0).expect("service");
    }

    fn run(&self, input: &[u8]) -> (u32, Vec<u8>) {
        let prog: &Xdp = self
            .ebpf
            .program(maps::PROG_LB)
            .expect("lb")
            .try_into()
            .expect("xdp");
        let mut out = vec![0u8; input.len() + 64];
        let opts = TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        };
        let r = prog.test_run(opts).expect("test_run");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn counter(&self, c: Counter) -> u64 {
        self.global.get(&(c as u32), 0).expect("counter").iter().sum()
    }
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

fn standard() -> Dp {
    let mut dp = Dp::new();
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
        let cases = [
            (
                "truncated ipv4",
                good[..14 + 10].to_vec(),
                Counter::DropTruncatedL3,
            ),
            (
                "truncated tcp",
                good[..14 + 20 + 10].to_vec(),
                Counter::DropTruncatedL4,
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
            _reserved: 0,
        };
        dp.insert_service(ServiceKey::new(4, 6, key, 80u16.to_be()), empty);
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
