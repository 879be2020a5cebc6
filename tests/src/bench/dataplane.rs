//! Data-plane cost per packet through BPF_PROG_TEST_RUN.
//!
//! Every case runs through `bench_wrap` (lb-ebpf/src/bench.rs), which restores the original frame
//! before each iteration and tail-calls the balancer; the floor (parse Ethernet + IPv4, XDP_TX)
//! goes through the same wrapper. Each run checks the verdict and that the balancer's own
//! counters moved by exactly `repeat` on the intended path and nowhere else.
//!
//! Katran (`katran_*` cases, when `../shared/katran` is there) runs through the same wrapper on
//! the same frames, and its runs are checked the same way: its output once, its counters and its
//! LRU every run. Runs are interleaved across all cases, so a slow spell hits every contender.

use anyhow::{Context, Result, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, ProgramArray},
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_common::{
    Counter, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, ServiceKey, ServiceValue, addr_words,
    bench::{
        BENCH_TARGET_FLOOR, BENCH_TARGET_KATRAN, BENCH_TARGET_KATRAN_NO_GUARD, BENCH_TARGET_LB,
        BENCH_TARGET_SCALE, BenchFrame,
    },
    dpconfig::DataPlaneConfig,
    service::{FWD_DSR_L2, FWD_GUE, FWD_IPIP, FWD_NAT},
};
use lb_userspace::{
    maglev::{MaglevBackend, build_table},
    model::Strategy,
    reconcile::apply::build,
    snapshot::TableInput,
};
use serde::Serialize;

use super::{
    katran::{self, Katran},
    median,
    scale::{self, Scale, ScaleResult, ScaleVsSmall},
};
use crate::{
    NetNs,
    fixture::{Balancer, dsr_backend, nat_backend, routed_backend},
    in_ns,
    packets::{
        CLIENT_MAC, CLIENT4, CLIENT6, LB_MAC, VIP4, VIP6, XDP_PASS, XDP_REDIRECT, XDP_TX, eth, ipv4, ipv6,
        tcp, udp,
    },
};

pub const BACKENDS: u32 = 100;
pub const TABLE_SIZE: u32 = 65537;
/// Pool regions' stride: a table rounded up to whole pool elements, as the daemon allocates.
const REGION: u32 = lb_common::maps::pool_region(TABLE_SIZE);

/// The GUE services' port (same routed backends as IPIP).
const GUE_SERVICE_PORT: u16 = 8443;
/// The IPIP services' port; their backends are routed (crate::topology::ipip_routes).
const IPIP_PORT: u16 = 8080;
/// VIP4 TCP services on the other strategies, one port each from here, each on the same 100
/// backends as the Maglev cases (pool regions 4.. in STRATEGIES' order).
const STRATEGY_PORT: u16 = 81;
const STRATEGIES: [(Strategy, &str, &str); 4] = [
    (
        Strategy::RoundRobin,
        "tcp4_syn_round_robin",
        "tcp4_established_round_robin",
    ),
    (
        Strategy::WeightedRoundRobin,
        "tcp4_syn_weighted_round_robin",
        "tcp4_established_weighted_round_robin",
    ),
    (
        Strategy::LeastConnections,
        "tcp4_syn_least_connections",
        "tcp4_established_least_connections",
    ),
    (
        Strategy::PowerOfTwo,
        "tcp4_syn_power_of_two",
        "tcp4_established_power_of_two",
    ),
];

/// The geo case's service: after the strategies' ports, its main table in the region after
/// theirs and its clients' region table in the next; the trie holds GEO_PREFIXES prefixes.
const GEO_PORT: u16 = STRATEGY_PORT + STRATEGIES.len() as u16;
const GEO_PREFIXES: u32 = 10_000;

const OTHER4: [u8; 4] = [10, 200, 0, 1];
/// The NAT service: its own VIP (so the other cases' VIPs have no NAT bits), one backend.
const NAT_VIP4: [u8; 4] = [10, 100, 0, 9];
const NAT_BACKEND4: [u8; 4] = [10, 97, 0, 11];
const NAT_BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x97, 0x11];
const NAT_BACKEND_PORT: u16 = 8080;
const NAT_SLOT: u32 = 3 * BACKENDS + 1;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// Byte offset of the IPv4 source address in an untagged frame.
const IPV4_SRC: u32 = 14 + 12;

#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    pub case: String,
    /// Median of the runs, as the kernel reports it (whole nanoseconds per iteration).
    pub ns_per_packet: f64,
    pub floor_ns_per_packet: f64,
    pub ratio_to_floor: f64,
    /// Our target for this case, where the issue sets one.
    pub target_ns: Option<f64>,
    pub runs: Vec<u64>,
    pub repeat: u32,
}

struct Case {
    name: &'static str,
    /// The interface the frame arrives on (test_run's context).
    ingress: Ingress,
    /// Our flood guard engaged (a limit of one new flow per window) rather than off.
    guarded: bool,
    /// Run the program in `target` itself rather than through the wrapper: only for the
    /// `floor_unwrapped` case, which shows what the harness alone costs on this machine.
    unwrapped: bool,
    frame: Vec<u8>,
    /// Run once before the warm-up iteration (a NAT connection's SYN).
    setup: Option<Vec<u8>>,
    target: u32,
    vary_offset: u32,
    verdict: u32,
    check: Check,
    target_ns: Option<f64>,
}

impl Case {
    /// A case of ours: `frame` through the wrapper into the balancer, arriving on loopback, the
    /// same frame every iteration; each run must end in `verdict` and move `counters` (and no
    /// other) by its repeat count.
    fn ours(name: &'static str, frame: Vec<u8>, verdict: u32, counters: &'static [Counter]) -> Self {
        Self {
            name,
            ingress: Ingress::Lo,
            guarded: false,
            unwrapped: false,
            frame,
            setup: None,
            target: BENCH_TARGET_LB,
            vary_offset: 0,
            verdict,
            check: Check::Ours(counters),
            target_ns: None,
        }
    }

    /// Arriving on the router's interface (`Ingress::Router`).
    fn on_router(self) -> Self {
        Self {
            ingress: Ingress::Router,
            ..self
        }
    }

    /// Every iteration a new flow: the wrapper stamps a sequence number as the source address.
    fn new_flows(self) -> Self {
        Self {
            vary_offset: IPV4_SRC,
            ..self
        }
    }

    fn target_ns(self, ns: f64) -> Self {
        Self {
            target_ns: Some(ns),
            ..self
        }
    }

    /// Sent once before each warm-up (a NAT connection's SYN).
    fn setup(self, frame: Vec<u8>) -> Self {
        Self {
            setup: Some(frame),
            ..self
        }
    }
}

/// Where a case's frame arrives.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ingress {
    /// Loopback, test_run's default: an encapsulated packet leaves by another interface
    /// (XDP_REDIRECT).
    Lo,
    /// The router's interface (`lbt-e`), by which the encapsulated packets leave again: one
    /// NIC, XDP_TX, as Katran always forwards.
    Router,
}

/// What a run must have done besides returning the verdict.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Our counters that must move by `repeat` per run; every other counter must stay still.
    Ours(&'static [Counter]),
    /// Katran's: the warm-up's output is IPIP (or ip6ip6) of the input to one of the reals, and
    /// each run moved Katran's counters as this path does.
    Katran(KatranPath),
    /// The scale daemon's counters that must move by `repeat` per run (its own traffic may
    /// move others).
    Scale(&'static [Counter]),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum KatranPath {
    /// A flow in the LRU: no miss.
    Established,
    /// A new flow per iteration; `inserted`: whether the flood guard lets it into the LRU.
    Syn { inserted: bool },
    /// Not a VIP: XDP_PASS, nothing rewritten.
    Pass,
}

/// Our cases beside their scale counterparts (the same frames on the daemon at scale).
const SCALE_PAIRS: [(&str, &str); 2] = [
    ("tcp4_established_ipip", "scale_tcp4_established_ipip"),
    ("tcp4_syn_ipip", "scale_tcp4_syn_ipip"),
];

fn cases(katran: bool, scale: bool) -> Vec<Case> {
    let v4 =
        |proto, l4: Vec<u8>, dst| [eth(LB_MAC, CLIENT_MAC, 0x0800), ipv4(proto, CLIENT4, dst, &l4)].concat();
    let v6 = |proto, l4: Vec<u8>| [eth(LB_MAC, CLIENT_MAC, 0x86dd), ipv6(proto, CLIENT6, VIP6, &l4)].concat();
    let payload = [0x5au8; 18];
    let hit: &[Counter] = &[Counter::ConntrackHit, Counter::Tx];
    let syn4 = |port| v4(PROTO_TCP, tcp(40000, port, TCP_SYN), VIP4);
    let ack4 = |port| v4(PROTO_TCP, tcp(40000, port, TCP_ACK), VIP4);
    let ours = |name, frame, verdict, counters| Case::ours(name, frame, verdict, counters);
    // A new flow: its first packet is remembered in the embryonic table.
    let miss: &[Counter] = &[Counter::ConntrackMiss, Counter::EmbryonicInsert, Counter::Tx];
    let mut ours = vec![
        Case {
            unwrapped: true,
            target: BENCH_TARGET_FLOOR,
            ..ours("floor_unwrapped", ack4(80), XDP_TX, &[])
        },
        Case {
            target: BENCH_TARGET_FLOOR,
            ..ours("floor", ack4(80), XDP_TX, &[])
        },
        ours("tcp4_syn", syn4(80), XDP_TX, miss)
            .new_flows()
            .target_ns(100.0),
        Case {
            guarded: true,
            ..ours(
                "tcp4_syn_guarded",
                syn4(80),
                XDP_TX,
                &[
                    Counter::ConntrackMiss,
                    Counter::ConntrackFloodSkipped,
                    Counter::Tx,
                ],
            )
            .new_flows()
        },
        ours("tcp4_established", ack4(80), XDP_TX, hit).target_ns(45.0),
        ours("udp4", v4(PROTO_UDP, udp(40000, 53, &payload), VIP4), XDP_TX, hit).target_ns(50.0),
        ours(
            "tcp6_established",
            v6(PROTO_TCP, tcp(40000, 80, TCP_ACK)),
            XDP_TX,
            hit,
        ),
        ours("udp6", v6(PROTO_UDP, udp(40000, 53, &payload)), XDP_TX, hit),
        ours("tcp4_established_ipip", ack4(IPIP_PORT), XDP_TX, hit).on_router(),
        ours(
            "tcp4_established_ipip_redirect",
            ack4(IPIP_PORT),
            XDP_REDIRECT,
            &[Counter::ConntrackHit, Counter::Redirect],
        ),
        ours("tcp4_syn_ipip", syn4(IPIP_PORT), XDP_TX, miss)
            .new_flows()
            .on_router(),
        ours(
            "tcp6_established_ipip",
            v6(PROTO_TCP, tcp(40000, IPIP_PORT, TCP_ACK)),
            XDP_TX,
            hit,
        )
        .on_router(),
        ours("tcp4_established_gue", ack4(GUE_SERVICE_PORT), XDP_TX, hit).on_router(),
        ours(
            "tcp6_established_gue",
            v6(PROTO_TCP, tcp(40000, GUE_SERVICE_PORT, TCP_ACK)),
            XDP_TX,
            hit,
        )
        .on_router(),
        ours(
            "nonvip_pass",
            v4(PROTO_TCP, tcp(40000, 80, TCP_ACK), OTHER4),
            XDP_PASS,
            &[Counter::PassNotVip],
        )
        .target_ns(15.0),
        ours(
            "tcp4_established_nat",
            v4(PROTO_TCP, tcp(40000, 80, TCP_ACK), NAT_VIP4),
            XDP_TX,
            &[Counter::Tx],
        )
        .setup(v4(PROTO_TCP, tcp(40000, 80, TCP_SYN), NAT_VIP4)),
        ours(
            "tcp4_nat_reply",
            [
                eth(LB_MAC, NAT_BACKEND_MAC, 0x0800),
                ipv4(
                    PROTO_TCP,
                    NAT_BACKEND4,
                    CLIENT4,
                    &tcp(NAT_BACKEND_PORT, 40000, TCP_ACK),
                ),
            ]
            .concat(),
            XDP_TX,
            &[Counter::NatReply, Counter::Tx],
        )
        .setup(v4(PROTO_TCP, tcp(40000, 80, TCP_SYN), NAT_VIP4)),
    ];
    // Each strategy's new-flow and established cost, on the same frames as tcp4_syn and
    // tcp4_established but for its own port; geo's after theirs.
    let ports = STRATEGIES
        .iter()
        .enumerate()
        .map(|(k, (_, syn, established))| (STRATEGY_PORT + k as u16, *syn, *established))
        .chain([(GEO_PORT, "tcp4_syn_geo", "tcp4_established_geo")]);
    for (port, syn, established) in ports {
        ours.push(Case::ours(syn, syn4(port), XDP_TX, miss).new_flows());
        ours.push(Case::ours(established, ack4(port), XDP_TX, hit));
    }
    if scale {
        // The middle VIP of the 1,024, on the daemon's program and maps.
        let at = scale::VIPS / 2;
        let on_scale = |case: Case, counters| Case {
            target: BENCH_TARGET_SCALE,
            check: Check::Scale(counters),
            ..case.on_router()
        };
        ours.push(on_scale(
            Case::ours(
                "scale_tcp4_established_ipip",
                scale::frame(at, TCP_ACK),
                XDP_TX,
                &[],
            ),
            hit,
        ));
        ours.push(on_scale(
            Case::ours("scale_tcp4_syn_ipip", scale::frame(at, TCP_SYN), XDP_TX, &[]).new_flows(),
            miss,
        ));
    }
    if !katran {
        return ours;
    }
    // Katran, on the same frames: its VIPs are ours (TCP 80, UDP 53 on VIP4 and VIP6).
    let k = |name, frame, target, vary_offset, verdict, path| Case {
        target,
        vary_offset,
        check: Check::Katran(path),
        ..Case::ours(name, frame, verdict, &[])
    };
    let established = KatranPath::Established;
    ours.extend([
        k(
            "katran_tcp4_established",
            v4(PROTO_TCP, tcp(40000, 80, TCP_ACK), VIP4),
            BENCH_TARGET_KATRAN,
            0,
            XDP_TX,
            established,
        ),
        k(
            "katran_udp4",
            v4(PROTO_UDP, udp(40000, 53, &payload), VIP4),
            BENCH_TARGET_KATRAN,
            0,
            XDP_TX,
            established,
        ),
        k(
            "katran_tcp4_syn",
            v4(PROTO_TCP, tcp(40000, 80, TCP_SYN), VIP4),
            BENCH_TARGET_KATRAN_NO_GUARD,
            IPV4_SRC,
            XDP_TX,
            KatranPath::Syn { inserted: true },
        ),
        k(
            "katran_tcp4_syn_guarded",
            v4(PROTO_TCP, tcp(40000, 80, TCP_SYN), VIP4),
            BENCH_TARGET_KATRAN,
            IPV4_SRC,
            XDP_TX,
            KatranPath::Syn { inserted: false },
        ),
        k(
            "katran_tcp6_established",
            v6(PROTO_TCP, tcp(40000, 80, TCP_ACK)),
            BENCH_TARGET_KATRAN,
            0,
            XDP_TX,
            established,
        ),
        k(
            "katran_udp6",
            v6(PROTO_UDP, udp(40000, 53, &payload)),
            BENCH_TARGET_KATRAN,
            0,
            XDP_TX,
            established,
        ),
        k(
            "katran_nonvip_pass",
            v4(PROTO_TCP, tcp(40000, 80, TCP_ACK), OTHER4),
            BENCH_TARGET_KATRAN,
            0,
            XDP_PASS,
            KatranPath::Pass,
        ),
    ]);
    ours
}

/// The balancer loaded with one service per family and protocol, each on the same 100-backend
/// Maglev table of 65537 slots, and the wrapper pointing at it.
struct Bench {
    /// The balancer and its maps (the service tables stay mapped while it is held).
    lb: Balancer,
    // The kernel clears a program array when its last user-space fd closes: keep it open.
    _progs: ProgramArray<MapData>,
    wrapper: Ebpf,
    frame: Array<MapData, BenchFrame>,
    seq: Array<MapData, u32>,
    /// The data-plane settings `warm` starts each case from.
    cfg: DataPlaneConfig,
    /// Katran's default build and its build with the flood guard held open.
    katran: Option<(Katran, Katran)>,
    /// The daemon at scale, when its cases run.
    scale: Option<Scale>,
    /// The router's interface (`Ingress::Router`).
    router: u32,
    /// The CPU this thread is pinned to (Katran's LRU is per CPU).
    cpu: usize,
}

impl Bench {
    /// `scale`: the namespace this thread is in, to start the daemon at scale there.
    fn new(cpu: usize, scale: Option<&NetNs>) -> Result<Self> {
        let mut lb = Balancer::load().context("load the balancer")?;
        let ids: Vec<String> = (1..=BACKENDS).map(|i| format!("b{i}")).collect();
        let members: Vec<MaglevBackend<'_>> =
            ids.iter().map(|id| MaglevBackend { id, weight: 100 }).collect();
        // Slot 0 stays unused, as in the daemon; backend i lives in slot i + 1.
        let table: Vec<u16> = build_table(&members, TABLE_SIZE)
            .iter()
            .map(|&i| i as u16 + 1)
            .collect();
        ensure!(
            table.len() == TABLE_SIZE as usize,
            "Maglev table has {} slots",
            table.len()
        );
        lb.pool.write(0, &table)?;
        // IPIP: 100 routed backends per family, each family on its own table.
        for (region, family) in [(1u32, FAMILY_V4), (2, FAMILY_V6)] {
            let first = region * BACKENDS + 1;
            let table: Vec<u16> = build_table(&members, TABLE_SIZE)
                .iter()
                .map(|&i| (i + first) as u16)
                .collect();
            lb.pool.write(region * REGION, &table)?;
            for i in 0..BACKENDS {
                let addr = if family == FAMILY_V4 {
                    vec![10, 60, (i >> 8) as u8, i as u8 + 1]
                } else {
                    let mut a = vec![0u8; 16];
                    a[..2].copy_from_slice(&[0xfd, 0x60]);
                    a[15] = i as u8 + 1;
                    a
                };
                lb.backends.set(first + i, routed_backend(&addr), 0)?;
            }
        }
        // NAT: one on-link backend (slot NAT_SLOT), its table in region 3; replies from it and
        // requests to its VIP may have NAT entries.
        lb.pool
            .write(3 * REGION, &vec![NAT_SLOT as u16; TABLE_SIZE as usize])?;
        let nat = nat_backend(&NAT_BACKEND4, NAT_BACKEND_PORT, 1, NAT_BACKEND_MAC);
        lb.backends.set(NAT_SLOT, nat, 0)?;
        lb.mark_nat(&[&NAT_BACKEND4, &NAT_VIP4])?;
        for slot in 1..=BACKENDS {
            // lo: test_run's ingress interface, so the verdict is XDP_TX.
            let b = dsr_backend([0x02, 0, 0, 0, (slot >> 8) as u8, slot as u8], 1);
            lb.backends.set(slot, b, 0)?;
        }
        for (id, (family, proto, port, region, forward)) in [
            (FAMILY_V4, PROTO_TCP, 80u16, 0u32, FWD_DSR_L2),
            (FAMILY_V4, PROTO_UDP, 53, 0, FWD_DSR_L2),
            (FAMILY_V6, PROTO_TCP, 80, 0, FWD_DSR_L2),
            (FAMILY_V6, PROTO_UDP, 53, 0, FWD_DSR_L2),
            (FAMILY_V4, PROTO_TCP, IPIP_PORT, 1, FWD_IPIP),
            (FAMILY_V6, PROTO_TCP, IPIP_PORT, 2, FWD_IPIP),
            (FAMILY_V4, PROTO_TCP, GUE_SERVICE_PORT, 1, FWD_GUE),
            (FAMILY_V6, PROTO_TCP, GUE_SERVICE_PORT, 2, FWD_GUE),
            (FAMILY_V4, PROTO_TCP, 80, 3, FWD_NAT),
        ]
        .into_iter()
        .enumerate()
        {
            let mut addr = [0u8; 16];
            if forward == FWD_NAT {
                addr[..4].copy_from_slice(&NAT_VIP4);
            } else if family == FAMILY_V4 {
                addr[..4].copy_from_slice(&VIP4);
            } else {
                addr = VIP6;
            }
            let value = ServiceValue {
                id: id as u32,
                flags: 0,
                table_offset: region * REGION,
                table_size: TABLE_SIZE,
                forward,
                ..Default::default()
            };
            lb.add_service(ServiceKey::new(family, proto, addr, port.to_be()), value)?;
        }
        // The other strategies' regions, built as the daemon builds them: uneven weights
        // (1..=4 × 25) so weighted round robin has a real period.
        for (k, (strategy, _, _)) in STRATEGIES.iter().enumerate() {
            let region = 4 + k as u32;
            let input = TableInput {
                size: TABLE_SIZE,
                members: (1..=BACKENDS)
                    .map(|i| (format!("b{i:03}"), 25 * (1 + i % 4), i))
                    .collect(),
                strategy: *strategy,
                caps: vec![0; BACKENDS as usize],
            };
            let table = build(&input);
            lb.pool.write(region * REGION, &table)?;
            let mut vip = [0u8; 16];
            vip[..4].copy_from_slice(&VIP4);
            let key = ServiceKey::new(FAMILY_V4, PROTO_TCP, vip, (STRATEGY_PORT + k as u16).to_be());
            lb.add_service(
                key,
                ServiceValue {
                    id: 16 + k as u32,
                    flags: 0,
                    table_offset: region * REGION,
                    table_size: table.len() as u32,
                    forward: FWD_DSR_L2,
                    strategy: strategy.id(),
                    ..Default::default()
                },
            )?;
        }
        // Geo: every client matches a region (0.0.0.0/0 → region 0, beside 10,000 /24s of
        // region 1 spread over the space, so lookups walk a real trie); region 0's value has a
        // table of half the backends, region 1's the service's own.
        {
            let main = 4 + STRATEGIES.len() as u32;
            let half: Vec<MaglevBackend<'_>> = members[..BACKENDS as usize / 2].to_vec();
            let region_table: Vec<u16> = build_table(&half, TABLE_SIZE)
                .iter()
                .map(|&i| i as u16 + 1)
                .collect();
            lb.pool.write(main * REGION, &table)?;
            lb.pool.write((main + 1) * REGION, &region_table)?;
            let mut vip = [0u8; 16];
            vip[..4].copy_from_slice(&VIP4);
            let key = ServiceKey::new(FAMILY_V4, PROTO_TCP, vip, GEO_PORT.to_be());
            let value = ServiceValue {
                id: 16 + STRATEGIES.len() as u32,
                table_offset: main * REGION,
                table_size: TABLE_SIZE,
                forward: FWD_DSR_L2,
                strategy: lb_common::strategy::STRATEGY_GEO,
                ..Default::default()
            };
            lb.add_service(key, value)?;
            let entry = |addr: [u8; 4], len: u32| {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&addr);
                let (len, data) = lb_common::geo::key(FAMILY_V4, addr_words(b), len);
                aya::maps::lpm_trie::Key::new(len, data)
            };
            lb.geo_a.insert(&entry([0; 4], 0), 0, 0)?;
            for i in 0..GEO_PREFIXES {
                let x = i.wrapping_mul(2_654_435_761);
                lb.geo_a.insert(
                    &entry([(x >> 24) as u8, (x >> 16) as u8, (x >> 8) as u8, 0], 24),
                    1,
                    0,
                )?;
            }
            for (region, offset) in [(0, (main + 1) * REGION), (1, main * REGION)] {
                let v = ServiceValue {
                    table_offset: offset,
                    strategy: lb_common::strategy::STRATEGY_MAGLEV,
                    ..value
                };
                lb.geo_services.insert(
                    lb_common::geo::GeoKey {
                        service: value.id,
                        region,
                    },
                    v,
                    0,
                )?;
            }
        }
        let egress = lb.route_tunnels()?;
        // No flood guard, so every SYN of `tcp4_syn` inserts; `warm` engages it per case.
        let cfg = lb.dp_config.get(&0, 0)?;

        let mut wrapper = EbpfLoader::new()
            .load(lb_userspace::BENCH_OBJECT)
            .context("load the bench object")?;
        for name in ["bench_wrap", "bench_floor"] {
            let p: &mut Xdp = wrapper.program_mut(name).context(name)?.try_into()?;
            p.load().with_context(|| format!("verifier rejected {name}"))?;
        }
        let mut progs: ProgramArray<MapData> = wrapper
            .take_map("BENCH_PROGS")
            .context("BENCH_PROGS")?
            .try_into()?;
        progs.set(BENCH_TARGET_LB, lb.program()?.fd()?, 0)?;
        let floor: &Xdp = wrapper.program("bench_floor").context("floor")?.try_into()?;
        progs.set(BENCH_TARGET_FLOOR, floor.fd()?, 0)?;
        let katran = match katran::find_dir() {
            Some(dir) => {
                let default = Katran::load(&dir.join("balancer.bpf.o"))?;
                let open = Katran::load(&dir.join("balancer_no_flood_guard.bpf.o"))?;
                progs.set(BENCH_TARGET_KATRAN, default.program()?.fd()?, 0)?;
                progs.set(BENCH_TARGET_KATRAN_NO_GUARD, open.program()?.fd()?, 0)?;
                Some((default, open))
            }
            None => {
                eprintln!(
                    "    Katran not found (../shared/katran beside the checkout, or LB_KATRAN_DIR): skipping the katran_* cases"
                );
                None
            }
        };
        let frame = wrapper
            .take_map("BENCH_FRAME")
            .context("BENCH_FRAME")?
            .try_into()?;
        let seq = wrapper.take_map("BENCH_SEQ").context("BENCH_SEQ")?.try_into()?;
        let scale = match scale {
            Some(ns) => {
                eprintln!(
                    "    starting the daemon at scale: {} VIPs, {} backends, {} connection entries",
                    scale::VIPS,
                    scale::VIPS * scale::PER_VIP,
                    scale::CONNTRACK
                );
                let s = Scale::start(ns, cpu)?;
                progs.set(BENCH_TARGET_SCALE, s.program.fd()?, 0)?;
                Some(s)
            }
            None => None,
        };
        Ok(Self {
            lb,
            _progs: progs,
            wrapper,
            frame,
            seq,
            cfg,
            katran,
            scale,
            router: egress,
            cpu,
        })
    }

    /// Fills the scale daemon's connection table: a new flow every two iterations (its first
    /// packet into the embryonic table, its second moves it to the connection table), as many
    /// as it holds (this CPU's share of its per-CPU LRU is then full, and every later insert
    /// evicts).
    fn fill_scale(&mut self) -> Result<()> {
        let mut frame = BenchFrame::new(&scale::frame(0, TCP_ACK), BENCH_TARGET_SCALE, IPV4_SRC)
            .context("scale frame")?;
        frame.twice = 1;
        self.frame.set(0, frame, 0)?;
        let input = frame_bytes(&frame)[..frame.len as usize].to_vec();
        let (verdict, _, _) = self.run(&input, 2 * scale::CONNTRACK, false, Ingress::Router)?;
        ensure!(verdict == XDP_TX, "filling the scale table: verdict {verdict}");
        Ok(())
    }

    fn katran_mut(&mut self, target: u32) -> Result<&mut Katran> {
        let (default, open) = self.katran.as_mut().context("Katran is not loaded")?;
        Ok(if target == BENCH_TARGET_KATRAN_NO_GUARD {
            open
        } else {
            default
        })
    }

    fn katran(&self, target: u32) -> Result<&Katran> {
        let (default, open) = self.katran.as_ref().context("Katran is not loaded")?;
        Ok(if target == BENCH_TARGET_KATRAN_NO_GUARD {
            open
        } else {
            default
        })
    }

    fn counters(&self) -> Result<Vec<u64>> {
        Counter::ALL
            .iter()
            .map(|&c| Ok(self.lb.global.get(&(c as u32), 0)?.iter().sum()))
            .collect()
    }

    /// One test_run of the wrapper (or of the floor alone); returns (verdict, kernel ns per
    /// iteration, the last iteration's frame).
    fn run(
        &self,
        input: &[u8],
        repeat: u32,
        unwrapped: bool,
        ingress: Ingress,
    ) -> Result<(u32, u64, Vec<u8>)> {
        let name = if unwrapped { "bench_floor" } else { "bench_wrap" };
        let prog: &Xdp = self.wrapper.program(name).context(name)?.try_into()?;
        let mut out = vec![0u8; 256];
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex.
        let ctx: Vec<u8> = [0, input.len() as u32, 0, self.router, 0, 0]
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .collect();
        let r = prog.test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ctx_in: (ingress == Ingress::Router).then_some(&ctx[..]),
            repeat,
            ..Default::default()
        })?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, r.duration.as_nanos() as u64, out))
    }

    /// Before each timed run: the case's frame in place, its setup sent, and one iteration, so
    /// established cases find their flow (an interleaved SYN case may have evicted it).
    fn warm(&mut self, case: &Case) -> Result<Vec<u8>> {
        let cfg = DataPlaneConfig {
            flood_limit: u32::from(case.guarded),
            ..self.cfg
        };
        self.lb.dp_config.set(0, cfg, 0)?;
        if let Check::Katran(_) = case.check {
            self.katran_mut(case.target)?.set_flood_guard(false)?;
        }
        let frame = BenchFrame::new(&case.frame, case.target, case.vary_offset)
            .with_context(|| format!("{}: frame too long", case.name))?;
        if let Some(setup) = &case.setup {
            let f = BenchFrame::new(setup, case.target, 0)
                .with_context(|| format!("{}: setup frame", case.name))?;
            self.frame.set(0, f, 0)?;
            self.run(&frame_bytes(&f)[..f.len as usize], 1, false, case.ingress)?;
        }
        self.frame.set(0, frame, 0)?;
        let input = frame_bytes(&frame)[..frame.len as usize].to_vec();
        if case.vary_offset == 0 {
            // A flow's first packet is remembered in the embryonic table and its second moves it
            // to the connection table: the timed run's packets are a known flow's.
            self.run(&input, 1, case.unwrapped, case.ingress)?;
        }
        let (verdict, _, out) = self.run(&input, 1, case.unwrapped, case.ingress)?;
        ensure!(
            verdict == case.verdict,
            "{}: warm-up verdict {verdict}",
            case.name
        );
        if let Check::Katran(path) = case.check {
            check_katran_output(case.name, &input, &out, path, case.vary_offset as usize)?;
        }
        Ok(input)
    }

    /// One timed run of `repeat` iterations, checked; returns the kernel's ns per iteration.
    fn run_once(&mut self, case: &Case, repeat: u32) -> Result<u64> {
        let input = self.warm(case)?;
        match case.check {
            Check::Ours(counters) => {
                let before = self.counters()?;
                let (verdict, ns, _) = self.run(&input, repeat, case.unwrapped, case.ingress)?;
                let after = self.counters()?;
                check_verdict(case, verdict)?;
                for (i, c) in Counter::ALL.iter().enumerate() {
                    let moved = after[i] - before[i];
                    let want = if counters.contains(c) { repeat as u64 } else { 0 };
                    // The guard lets one new flow in per 100 ms window.
                    let window_starts = repeat as u64 / 1000;
                    if *c == Counter::ConntrackFloodSkipped
                        && case.guarded
                        && moved <= want
                        && moved + window_starts >= want
                    {
                        continue;
                    }
                    // ... and each flow let in is inserted (in the embryonic table).
                    if *c == Counter::EmbryonicInsert && case.guarded && moved <= window_starts {
                        continue;
                    }
                    if moved != want {
                        bail!(
                            "{}: counter {} moved by {moved} in {repeat} iterations, expected {want}",
                            case.name,
                            c.name()
                        );
                    }
                }
                Ok(ns)
            }
            Check::Scale(counters) => {
                let scale = self.scale.as_ref().context("the scale daemon is not running")?;
                let before = scale.counters()?;
                let (verdict, ns, _) = self.run(&input, repeat, false, case.ingress)?;
                let after = scale.counters()?;
                check_verdict(case, verdict)?;
                for (i, c) in Counter::ALL.iter().enumerate() {
                    let moved = after[i] - before[i];
                    if counters.contains(c) && moved != repeat as u64 {
                        bail!(
                            "{}: counter {} moved by {moved} in {repeat} iterations, expected {repeat}: {}",
                            case.name,
                            c.name(),
                            scale.log()
                        );
                    }
                }
                Ok(ns)
            }
            Check::Katran(path) => {
                // `warm` put the guard at rest; the guarded case holds it tripped.
                if path == (KatranPath::Syn { inserted: false }) {
                    self.katran_mut(case.target)?.set_flood_guard(true)?;
                }
                let before = self.katran(case.target)?.counters()?;
                let (verdict, ns, _) = self.run(&input, repeat, false, case.ingress)?;
                let katran = self.katran(case.target)?;
                let moved = katran.counters()?.since(&before);
                check_verdict(case, verdict)?;
                let r = repeat as u64;
                let want = match path {
                    KatranPath::Pass => katran::Counters {
                        pass: r,
                        ..Default::default()
                    },
                    KatranPath::Established => katran::Counters {
                        tx: r,
                        ..Default::default()
                    },
                    KatranPath::Syn { .. } => katran::Counters {
                        tx: r,
                        lru_miss: r,
                        syn_miss: r,
                        ..Default::default()
                    },
                };
                ensure!(
                    moved == want,
                    "{}: Katran's counters moved by {moved:?} in {repeat} iterations, expected {want:?}",
                    case.name
                );
                if let KatranPath::Syn { inserted } = path {
                    // The last 1000 stamped flows: all in this CPU's LRU, or none of them.
                    let last = self.seq.get(&0, 0)?;
                    let mut found = 0;
                    for seq in last.saturating_sub(999)..=last {
                        let mut src = [0u8; 16];
                        src[..4].copy_from_slice(&seq.to_ne_bytes());
                        let mut dst = [0u8; 16];
                        dst[..4].copy_from_slice(&VIP4);
                        let key = katran::FlowKey {
                            src,
                            dst,
                            sport_be: 40000u16.to_be(),
                            dport_be: 80u16.to_be(),
                            proto: PROTO_TCP,
                            pad: [0; 3],
                        };
                        found += katran.has_flow(self.cpu, &key)? as u32;
                    }
                    let ok = if inserted { found >= 990 } else { found == 0 };
                    ensure!(
                        ok,
                        "{}: {found} of the last 1000 new flows are in Katran's LRU",
                        case.name
                    );
                }
                Ok(ns)
            }
        }
    }
}

fn check_verdict(case: &Case, verdict: u32) -> Result<()> {
    ensure!(
        verdict == case.verdict,
        "{}: verdict {verdict}, expected {}",
        case.name,
        case.verdict
    );
    Ok(())
}

/// Katran's output for one iteration: for a VIP, the input behind a new Ethernet header to the
/// next hop and an outer IPIP (IPv4) or ip6ip6 header to one of the family's reals; for a
/// non-VIP, the input unchanged. `vary`: the offset of the source the wrapper stamped, if any.
fn check_katran_output(name: &str, input: &[u8], out: &[u8], path: KatranPath, vary: usize) -> Result<()> {
    if path == KatranPath::Pass {
        ensure!(out == input, "{name}: Katran rewrote a non-VIP packet");
        return Ok(());
    }
    let v6 = input[12..14] == [0x86, 0xdd];
    let outer = if v6 { 40 } else { 20 };
    ensure!(
        out.len() == input.len() + outer,
        "{name}: Katran's output is {} bytes for {} in",
        out.len(),
        input.len()
    );
    ensure!(
        out[..6] == katran::NEXT_HOP_MAC,
        "{name}: dst MAC is not the next hop's"
    );
    let mut inner = input[14..].to_vec();
    if vary != 0 {
        let at = vary - 14;
        inner[at..at + 4].copy_from_slice(&out[outer + vary..outer + vary + 4]);
    }
    ensure!(out[14 + outer..] == inner[..], "{name}: the inner packet changed");
    let (ethertype, proto, dst) = if v6 {
        ([0x86, 0xdd], out[14 + 6], &out[14 + 24..14 + 40])
    } else {
        ([0x08, 0x00], out[14 + 9], &out[14 + 16..14 + 20])
    };
    ensure!(
        out[12..14] == ethertype,
        "{name}: outer ethertype {:02x?}",
        &out[12..14]
    );
    ensure!(proto == if v6 { 41 } else { 4 }, "{name}: outer protocol {proto}");
    let real = (1..=katran::REALS).any(|i| &katran::real_addr(v6, i)[..dst.len()] == dst);
    ensure!(real, "{name}: outer destination {dst:02x?} is not a real");
    Ok(())
}

fn frame_bytes(frame: &BenchFrame) -> Vec<u8> {
    frame.words.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

/// Runs every case (`repeat` iterations, `runs` times) in the current thread, which it pins to
/// one CPU so runs don't migrate mid-measurement.
pub fn run(repeat: u32, runs: usize, only: Option<&str>) -> Result<(Vec<CaseResult>, Option<ScaleResult>)> {
    // A private namespace: the IPIP cases need routes and neighbours of their own.
    let ns = NetNs::new("bench")?;
    let only = only.map(str::to_string);
    in_ns(&ns, || run_here(&ns, repeat, runs, only.as_deref()))
}

fn run_here(
    ns: &NetNs,
    repeat: u32,
    runs: usize,
    only: Option<&str>,
) -> Result<(Vec<CaseResult>, Option<ScaleResult>)> {
    let cpu = pin_to_cpu(1)?;
    let wanted = |name: &str| only.is_none_or(|o| name.contains(o));
    // The daemon at scale takes a minute to set up: with a filter, only when it names it.
    let scale = only.is_none_or(|o| o.contains("scale")) && SCALE_PAIRS.iter().any(|(_, s)| wanted(s));
    let mut bench = Bench::new(cpu, scale.then_some(ns))?;
    if scale {
        bench.fill_scale()?;
    }
    let cases: Vec<Case> = cases(bench.katran.is_some(), scale)
        .into_iter()
        .filter(|c| c.target == BENCH_TARGET_FLOOR || wanted(c.name))
        .collect();
    // Interleaved: run r of every case, then run r + 1, so that a slow spell of the machine
    // falls on all contenders alike.
    let mut measured: Vec<Vec<u64>> = vec![Vec::with_capacity(runs); cases.len()];
    for _ in 0..runs {
        for (case, ns) in cases.iter().zip(&mut measured) {
            ns.push(bench.run_once(case, repeat)?);
        }
    }
    let floor = cases
        .iter()
        .zip(&measured)
        .find(|(c, _)| c.target == BENCH_TARGET_FLOOR && !c.unwrapped)
        .and_then(|(_, ns)| median(ns.iter().map(|&v| v as f64)))
        .context("no floor case")?;
    let results: Vec<CaseResult> = cases
        .into_iter()
        .zip(measured)
        .map(|(case, runs_ns)| {
            let ns = median(runs_ns.iter().map(|&v| v as f64)).unwrap_or(f64::NAN);
            CaseResult {
                case: case.name.to_string(),
                ns_per_packet: ns,
                floor_ns_per_packet: floor,
                ratio_to_floor: if floor > 0.0 { ns / floor } else { f64::NAN },
                target_ns: case.target_ns,
                runs: runs_ns,
                repeat,
            }
        })
        .collect();
    let scale = bench.scale.take().map(|s| {
        let mut r = s.result.clone();
        let ns_of = |name: &str| results.iter().find(|c| c.case == name).map(|c| c.ns_per_packet);
        for (small, big) in SCALE_PAIRS {
            if let (Some(small_ns), Some(scale_ns)) = (ns_of(small), ns_of(big)) {
                r.per_packet.push(ScaleVsSmall {
                    case: small.to_string(),
                    small_ns,
                    scale_ns,
                    ratio: scale_ns / small_ns,
                });
            }
        }
        r
    });
    Ok((results, scale))
}

/// One of our cases beside Katran's, from the same run.
#[derive(Clone, Debug, Serialize)]
pub struct VsKatran {
    pub case: String,
    pub katran_case: String,
    /// ns per packet, medians.
    pub ours: f64,
    pub katran: f64,
    /// ours ÷ Katran.
    pub ratio: f64,
    /// The same with the wrapper's floor taken off both.
    pub ratio_above_floor: f64,
    /// "same" when ours does Katran's work (IPIP out), "less" when ours is DSR (a MAC rewrite
    /// where Katran builds an outer header).
    pub work: &'static str,
    /// The goal for the ratio, where it sets one.
    pub goal: Option<f64>,
}

/// Our cases paired with Katran's: (ours, Katran's, same work, goal).
const PAIRS: &[(&str, &str, bool, Option<f64>)] = &[
    ("tcp4_established", "katran_tcp4_established", false, Some(0.5)),
    (
        "tcp4_established_ipip",
        "katran_tcp4_established",
        true,
        Some(0.6),
    ),
    ("tcp6_established", "katran_tcp6_established", false, None),
    (
        "tcp6_established_ipip",
        "katran_tcp6_established",
        true,
        Some(0.8),
    ),
    ("udp4", "katran_udp4", false, Some(0.4)),
    ("udp6", "katran_udp6", false, None),
    ("tcp4_syn", "katran_tcp4_syn", false, Some(0.5)),
    ("tcp4_syn_guarded", "katran_tcp4_syn_guarded", false, Some(0.8)),
    ("nonvip_pass", "katran_nonvip_pass", true, Some(0.6)),
];

/// The pairs that both ran.
pub fn vs_katran(results: &[CaseResult]) -> Vec<VsKatran> {
    let get = |name: &str| results.iter().find(|r| r.case == name);
    PAIRS
        .iter()
        .filter_map(|&(ours, theirs, same, goal)| {
            let (o, k) = (get(ours)?, get(theirs)?);
            let floor = o.floor_ns_per_packet;
            Some(VsKatran {
                case: ours.to_string(),
                katran_case: theirs.to_string(),
                ours: o.ns_per_packet,
                katran: k.ns_per_packet,
                ratio: o.ns_per_packet / k.ns_per_packet,
                ratio_above_floor: (o.ns_per_packet - floor) / (k.ns_per_packet - floor),
                work: if same { "same" } else { "less" },
                goal,
            })
        })
        .collect()
}

/// Pins the calling thread to `cpu` (the last CPU if there are fewer); returns the CPU.
pub fn pin_to_cpu(cpu: usize) -> Result<usize> {
    // Online CPUs, not available_parallelism (which is this thread's current mask: after a
    // pin to CPU 0 it would say 1).
    // SAFETY: sysconf has no memory effects.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    let cpu = cpu.min(cpus - 1);
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
    }
    Ok(cpu)
}
