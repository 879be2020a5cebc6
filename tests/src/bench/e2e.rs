//! End-to-end forwarding through veth: the balancer against nftables DNAT and HAProxy.
//!
//! **Topology**, the same for every contender and built once: a client namespace, the balancer
//! namespace and 4 backend namespaces, one veth pair per link, routed by the balancer
//! namespace's kernel (client 10.98.1.2 — balancer 10.98.1.1; backend i at 10.98.(10+i).2 with
//! its default route via the balancer at 10.98.(10+i).1). The client routes the VIP
//! 10.100.0.1/32 via the balancer. Backends hold the VIP on loopback (for DSR), so replies of
//! every contender return through the balancer namespace's kernel.
//!
//! **Contenders**, switched one at a time between measurements, in the same run:
//! - `lb`: our daemon attached in native XDP mode to the balancer's client-facing veth only,
//!   L2 DSR (MAC rewrite + `XDP_REDIRECT` to the backend's veth). Each measurement checks that
//!   the balancer's `redirect` counter grew by at least the delivered count, so the figure is
//!   never the kernel's path in disguise.
//! - `lb-nat`: the same daemon in NAT mode (`forwarding = "nat"`), the job nftables does below:
//!   attached to the backend-facing veths too, since replies come back through it and are
//!   translated there, and redirected to the client's veth (which gets a pass program so that
//!   it takes them). Checked the same way.
//! - `nftables`: a prerouting DNAT rule (`numgen inc mod 4`, i.e. round robin per new flow) in
//!   the balancer namespace; conntrack un-NATs replies. Its TCP TIME_WAIT conntrack timeout is
//!   lowered to 1 s: with the default 120 s the measured connections would fill the table.
//! - `haproxy`: Debian's HAProxy in TCP mode, `nbthread 1`, round robin, with a config the bench
//!   writes, listening on the VIP (added to the balancer's loopback only while it runs).
//!   HAProxy does not proxy UDP, so it has no UDP figure.
//!
//! **UDP packets/s** (`udp4_pps`): 64-byte frames (60 + FCS) to VIP:8080 from 1024 flows
//! (random source ports 10000–11023), counted when they reach the backends.
//! - Generator: `e2e_gen` of the bench object (lb-ebpf/src/bench.rs), an XDP program that
//!   rewrites the headers and a random source port of each copy, run with `BPF_PROG_TEST_RUN` in
//!   live-frames mode (the mechanism of xdp-tools' xdp-trafficgen), transmitting from the
//!   client's veth with `XDP_TX`. Frames reach the balancer namespace as raw frames, as from a
//!   NIC: XDP gets them without an skb and the kernel path has to build one, as in production.
//!   (An AF_PACKET generator such as trafgen hands veth ready-made skbs, which XDP must copy
//!   back into pages while the kernel path gets them for free; trafgen 0.6.8 also exits on the
//!   EAGAIN that veth's backpressure causes.) Offered load exceeds what any contender forwards;
//!   the excess is dropped at the forwarder's receive ring, as a NIC would.
//! - Sink: each backend's veth runs `e2e_sink` (same object), which counts and drops UDP
//!   datagrams to the service port in a per-CPU array and passes everything else. The figure is
//!   the sum of these counts over the window. The bench fails if, with no contender, anything
//!   reaches the sinks, or if any datagram reaches a backend's UDP stack (it would have bypassed
//!   a sink).
//!
//! **TCP connections/s** (`tcp4_conn_per_s`): an epoll client keeps 128 exchanges in flight,
//! each connect to VIP:8080, send one line, read the answer to EOF, close; exchanges completed
//! in the window count. One epoll server thread serves all 4 backends' listeners (0.0.0.0:8080):
//! it answers the backend id and closes first, so TIME_WAIT lands on the backends and the
//! client's ports come back at once (its port range is 1024–65535 too). Any failed exchange
//! (warm-up included) is an error; more than 1% of the completed count, client and server
//! errors together, fails the bench, as does a contender that completes or delivers nothing.
//!
//! **CPU split** (2 cores): CPU 1 is the forwarder's, CPU 0 everything else's. Pinning
//! processes is not enough on veth: a veth's receive work runs in softirq on the *sending*
//! CPU, so the forwarder's work would land on the generator's core. Every veth therefore has
//! NAPI (GRO on, which a veth without XDP needs for NAPI) in threaded mode, and the
//! `napi/<dev>-<id>` kthreads are pinned: those of the balancer namespace's 5 veths (client-
//! and backend-facing, carrying both directions of the forwarder's work) to CPU 1; those of
//! the client's and backends' veths (the endpoints' receive work) to CPU 0. Checksum offload is
//! off on every veth (else veth passes a TSO-capable sender's forwarded skbs through netif_rx,
//! i.e. softirq on the sender's CPU, skipping the peer's NAPI and XDP). HAProxy runs on CPU 1
//! (`taskset`). The generator, the TCP client and servers, the daemon's control plane and the
//! bench itself run on CPU 0. During UDP runs the CPU-0 NAPI threads are SCHED_FIFO, i.e. they
//! keep the precedence softirq has over processes, so the backends' receive keeps up although
//! the generator saturates CPU 0; otherwise all are SCHED_OTHER. Each measurement logs both
//! CPUs' busy time, the NET_RX softirqs per CPU (zero: receive work runs in the kthreads), the
//! CPU share of the forwarder's threads (CPU-1 NAPI threads, plus HAProxy) and the rate per
//! forwarder CPU-second, and warns when other processes took CPU 1.
//!
//! For TCP, the load CPU is the limit for `lb` and `nftables` (the client's and backends' TCP
//! stacks cost more per connection than either forwarder): compare their forwarder CPU per
//! connection (logged) rather than the absolute rates, which come out close.
//!
//! Windows: warm-up 1 s then 4 s measured, 3 rounds with the contenders in turn, median
//! reported (quick: 0.2 s + 0.8 s, one round).

mod bpf;
mod contenders;
mod load;
mod net;
mod tcp;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use self::{
    contenders::{Balancer, Haproxy, Nftables},
    load::{Measured, Windows},
    net::{PinnedSelf, Topology},
    tcp::Servers,
};
use super::median;
use crate::lb_bin;

/// One measured case: absolute rates for each contender (`None` where it does not apply).
#[derive(Clone, Debug, serde::Serialize)]
pub struct E2eResult {
    pub case: String,
    pub unit: String,
    pub lb: Option<f64>,
    /// lb in NAT mode: the same job as nftables DNAT.
    pub lb_nat: Option<f64>,
    pub nftables: Option<f64>,
    pub haproxy: Option<f64>,
    /// The same per second of forwarder CPU (CPU 1 busy time of the forwarder's threads): the
    /// honest ratio, since the load generator shares CPU 0 with the servers.
    pub per_forwarder_cpu_s: PerContender,
    /// The forwarder's CPU share while measured (0..1): below about 0.95 the load side set
    /// the rate.
    pub forwarder_busy: PerContender,
}

/// One figure per contender (`None` where it does not apply).
#[derive(Clone, Debug, serde::Serialize)]
pub struct PerContender {
    pub lb: Option<f64>,
    pub lb_nat: Option<f64>,
    pub nftables: Option<f64>,
    pub haproxy: Option<f64>,
}

impl PerContender {
    fn of(value: impl Fn(usize) -> Option<f64>) -> Self {
        Self {
            lb: value(LB),
            lb_nat: value(LB_NAT),
            nftables: value(NFT),
            haproxy: value(HAPROXY),
        }
    }
}

const LB: usize = 0;
const LB_NAT: usize = 1;
const NFT: usize = 2;
const HAPROXY: usize = 3;
const NAMES: [&str; 4] = ["lb", "lb-nat", "nftables", "haproxy"];

pub fn run(quick: bool) -> Result<Vec<E2eResult>> {
    let started = Instant::now();
    net::require_tools()?;
    if !lb_bin().is_file() {
        bail!(
            "{} not found: build it with `cargo build --release -p lb-userspace --bin lb` or set LB_BIN",
            lb_bin().display()
        );
    }
    let (w, rounds) = if quick {
        (
            Windows {
                warmup: Duration::from_millis(200),
                measure: Duration::from_millis(800),
            },
            1,
        )
    } else {
        (
            Windows {
                warmup: Duration::from_secs(1),
                measure: Duration::from_secs(4),
            },
            3,
        )
    };
    let _pinned = PinnedSelf::to_load_cpu()?;
    let topo = Topology::new().context("build the e2e topology")?;
    let generator = Arc::new(topo.generator(load::udp_frame())?);

    let idle = Windows {
        warmup: Duration::from_millis(100),
        measure: Duration::from_millis(300),
    };
    // The UDP load needs live-frames test runs; where the kernel refuses them, the UDP cases
    // are skipped with the reason and the TCP cases still run.
    let udp_load = match load::udp(&topo, &generator, idle, &|| Ok(0), &[]) {
        Ok(none) if none.count > 0 => bail!(
            "{} UDP datagrams reached the backends with no forwarder running",
            none.count
        ),
        Ok(_) => true,
        Err(e) if e.chain().any(|c| c.is::<bpf::LiveFramesRefused>()) => {
            eprintln!("e2e: udp4_pps skipped: {e:#} (root without CAP_SYS_RESOURCE); the TCP cases run");
            false
        }
        Err(e) => return Err(e.context("UDP without a forwarder")),
    };

    let servers = Servers::start(&topo.backends)?;
    // Per contender: each round's measurement.
    let mut udp: [Vec<Measured>; 4] = Default::default();
    let mut tcp: [Vec<Measured>; 4] = Default::default();
    for round in 1..=rounds {
        let tag = |case: &str, who: usize, m: &Measured, unit: &str| {
            eprintln!(
                "e2e: round {round}/{rounds} {case} {}: {:.0} {unit}, {:.0} per forwarder CPU-second ({})",
                NAMES[who],
                m.rate,
                m.rate / m.forwarder_cpu.max(1e-3),
                m.detail
            );
        };
        for (who, nat) in [(LB, false), (LB_NAT, true)] {
            let name = NAMES[who];
            let lb = Balancer::start(&topo, nat).with_context(|| format!("start {name}"))?;
            let probe = || lb.redirects();
            if udp_load {
                let threads = topo.pin_napi(true)?;
                let m = load::udp(&topo, &generator, w, &probe, &threads)
                    .with_context(|| format!("{name}: UDP"))?;
                expect_delivered(&topo, name, &m)?;
                if m.extra < m.count {
                    bail!(
                        "{name}: the backends received {} datagrams but the balancer redirected only {}: \
                         traffic bypassed XDP",
                        m.count,
                        m.extra
                    );
                }
                tag("udp4_pps", who, &m, "packets/s");
                udp[who].push(m);
            }
            tcp::ready(&topo.client).with_context(|| format!("{name}: TCP"))?;
            let threads = topo.pin_napi(false)?;
            let m =
                tcp::measure(&topo, &servers, w, &probe, &threads).with_context(|| format!("{name}: TCP"))?;
            // Each connection sends at least SYN, ACK+data and FIN through the balancer (and in
            // NAT mode the replies too).
            if m.extra < 3 * m.count {
                bail!(
                    "{name}: {} connections completed but the balancer redirected only {} frames",
                    m.count,
                    m.extra
                );
            }
            tag("tcp4_conn_per_s", who, &m, "connections/s");
            tcp[who].push(m);
        }
        {
            let _nft = Nftables::start(&topo).context("set up nftables DNAT")?;
            if udp_load {
                let threads = topo.pin_napi(true)?;
                let m = load::udp(&topo, &generator, w, &|| Ok(0), &threads).context("nftables: UDP")?;
                expect_delivered(&topo, "nftables", &m)?;
                tag("udp4_pps", NFT, &m, "packets/s");
                udp[NFT].push(m);
            }
            tcp::ready(&topo.client).context("nftables: TCP")?;
            let threads = topo.pin_napi(false)?;
            let m = tcp::measure(&topo, &servers, w, &|| Ok(0), &threads).context("nftables: TCP")?;
            tag("tcp4_conn_per_s", NFT, &m, "connections/s");
            tcp[NFT].push(m);
        }
        {
            let haproxy = Haproxy::start(&topo).context("start haproxy")?;
            let mut threads = topo.pin_napi(false)?;
            threads.extend(haproxy.pid());
            tcp::ready(&topo.client).context("haproxy: TCP")?;
            let m = tcp::measure(&topo, &servers, w, &|| Ok(0), &threads).context("haproxy: TCP")?;
            tag("tcp4_conn_per_s", HAPROXY, &m, "connections/s");
            tcp[HAPROXY].push(m);
        }
    }

    let mut results = Vec::new();
    for (case, unit, series) in [
        ("udp4_pps", "packets/s", &udp),
        ("tcp4_conn_per_s", "connections/s", &tcp),
    ] {
        if series.iter().all(Vec::is_empty) {
            continue; // skipped above, with the reason
        }
        let rate = |who: usize| median(series[who].iter().map(|m| m.rate));
        let per_cpu = |who: usize| median(series[who].iter().map(|m| m.rate / m.forwarder_cpu.max(1e-3)));
        let busy = |who: usize| median(series[who].iter().map(|m| m.forwarder_cpu));
        let line = |value: &dyn Fn(usize) -> Option<f64>| {
            let mut parts: Vec<String> = (0..NAMES.len())
                .filter_map(|who| value(who).map(|v| format!("{} {v:.0}", NAMES[who])))
                .collect();
            for (mine, other) in [(LB, NFT), (LB, HAPROXY), (LB_NAT, NFT)] {
                if let (Some(a), Some(b)) = (value(mine), value(other)) {
                    parts.push(format!(
                        "{}/{} {:.2}x",
                        NAMES[mine],
                        NAMES[other],
                        a / b.max(1e-9)
                    ));
                }
            }
            parts.join(", ")
        };
        eprintln!("e2e: {case} (median of {rounds}) in {unit}: {}", line(&rate));
        eprintln!(
            "e2e: {case} (median of {rounds}) per forwarder CPU-second: {}",
            line(&per_cpu)
        );
        let busy: Vec<String> = (0..NAMES.len())
            .filter_map(|who| busy(who).map(|b| format!("{} {:.0}%", NAMES[who], 100.0 * b)))
            .collect();
        eprintln!(
            "e2e: {case} forwarder busy: {} (below ~95%, the load side, not the forwarder, set the rate)",
            busy.join(", ")
        );
        results.push(E2eResult {
            case: case.into(),
            unit: unit.into(),
            lb: rate(LB),
            lb_nat: rate(LB_NAT),
            nftables: rate(NFT),
            // HAProxy does not proxy UDP: no series, None.
            haproxy: rate(HAPROXY),
            per_forwarder_cpu_s: PerContender::of(per_cpu),
            forwarder_busy: PerContender::of(|who| median(series[who].iter().map(|m| m.forwarder_cpu))),
        });
    }
    drop(servers);
    drop(topo);
    eprintln!("e2e: done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(results)
}

fn expect_delivered(topo: &Topology, who: &str, m: &Measured) -> Result<()> {
    if m.count == 0 {
        bail!("{who} delivered no UDP datagrams to the backends ({})", m.detail);
    }
    let missed = topo.udp_past_sinks()?;
    if missed > 0 {
        bail!("{who}: {missed} UDP datagrams reached the backends' stacks without passing their sinks");
    }
    Ok(())
}
