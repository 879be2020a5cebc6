//! The scale case: the real daemon with 1,024 IPIP VIPs of 16 routed backends each (16,384
//! backends, no neighbour entry per backend: one router), and an 8M-entry connection table.
//! Measured here: the time from starting the daemon to the first packet forwarded (a SYN to the
//! last VIP through its pinned program and live maps), the kernel memory of every map (fdinfo's
//! `memlock`), the daemon's RSS, and the time to apply one backend change (the CLI returns once
//! the writer has applied it). Its program then joins the data-plane bench as a contender
//! (`scale_*` cases), beside the small configuration's same cases, in the same run.

use std::{
    os::fd::{AsFd, AsRawFd},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use aya::{
    maps::{Map, MapData, PerCpuArray},
    programs::Xdp,
};
use aya_obj::programs::XdpAttachType;
use lb_common::{Counter, maps};
use serde::Serialize;

use super::median;
use crate::{
    NetNs,
    fixture::run_xdp,
    packets::{CLIENT_MAC, CLIENT4, LB_MAC, XDP_REDIRECT, eth, ipv4, tcp},
    topology::Daemon,
};

pub const VIPS: u32 = 1024;
pub const PER_VIP: u32 = 16;
pub const CONNTRACK: u32 = 8 * 1024 * 1024;
/// The scale services' port.
pub const PORT: u16 = 80;
/// Tables in the pool: one per VIP and 8 spares for swaps.
const POOL_TABLES: u32 = VIPS + 8;

/// VIP `i` (10.101.0.0/22).
pub fn vip(i: u32) -> [u8; 4] {
    [10, 101, (i >> 8) as u8, i as u8]
}

/// Backend `j` of VIP `i` (10.62.0.0/18, behind the bench namespace's router 10.50.0.2).
fn backend(i: u32, j: u32) -> [u8; 4] {
    let k = i * PER_VIP + j;
    [10, 62, (k >> 8) as u8, k as u8]
}

/// A TCP segment from the bench client to VIP `i`.
pub fn frame(i: u32, flags: u8) -> Vec<u8> {
    [
        eth(LB_MAC, CLIENT_MAC, 0x0800),
        ipv4(lb_common::PROTO_TCP, CLIENT4, vip(i), &tcp(40000, PORT, flags)),
    ]
    .concat()
}

#[derive(Clone, Debug, Serialize)]
pub struct MapMemory {
    pub map: String,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ScaleResult {
    pub vips: u32,
    pub backends: u32,
    pub conntrack_entries: u32,
    /// Daemon start to the first SYN forwarded (IPIP to one of its backends) to the last VIP.
    pub startup_ms: f64,
    /// Kernel memory of each pinned map (fdinfo memlock), largest first, and their sum.
    pub maps: Vec<MapMemory>,
    pub maps_bytes: u64,
    /// The table pool's kernel memory per VIP (its spares shared out).
    pub pool_bytes_per_vip: u64,
    pub rss_bytes: u64,
    pub rss_anon_bytes: u64,
    /// One backend weight change, CLI call to applied: median ms over `change_runs_ms`.
    pub change_ms: f64,
    pub change_runs_ms: Vec<f64>,
    /// Of which the reconciler's plan and map writes (`lb_map_write_duration_seconds`), mean
    /// ms per pass over those changes.
    pub change_map_write_ms: f64,
    /// The daemon's CPU use at idle (its threads' share of one CPU, over 5 s).
    pub idle_cpu: f64,
    /// The same cases on this configuration and on the small one, same run (filled by the
    /// data-plane bench).
    pub per_packet: Vec<ScaleVsSmall>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ScaleVsSmall {
    pub case: String,
    pub small_ns: f64,
    pub scale_ns: f64,
    /// scale ÷ small.
    pub ratio: f64,
}

/// The running daemon at scale: its pinned program and its counters, for the bench.
pub struct Scale {
    daemon: Daemon,
    pub program: Xdp,
    global: PerCpuArray<MapData, u64>,
    pub result: ScaleResult,
}

impl Scale {
    /// Starts the daemon in `ns`, which the calling thread is in and where `ipip_routes` has
    /// set up the router, and measures it. The daemon runs on CPU 0, away from the bench's
    /// `bench_cpu` (it inherits the spawning thread's CPUs).
    pub fn start(ns: &NetNs, bench_cpu: usize) -> Result<Self> {
        crate::netns::run(
            std::process::Command::new("sh").args(["-c", "ip route add 10.62.0.0/18 via 10.50.0.2"]),
        )?;
        let (instance, run_dir) = Daemon::new_paths();
        let mut config = format!(
            "[daemon]\ninstance = \"{instance}\"\ninterfaces = [\"lbt-e\"]\nxdp_mode = \"native\"\nrun_dir = \"{}\"\n\
             conntrack_size = {CONNTRACK}\ntable_pool_slots = {}\nflood_guard_per_cpu = 0\nneighbour_refresh_ms = 1000\n",
            run_dir.display(),
            POOL_TABLES * maps::pool_region(maps::DEFAULT_TABLE_SIZE),
        );
        for i in 0..VIPS {
            let [a, b, c, d] = vip(i);
            config.push_str(&format!(
                "\n[[service]]\nname = \"s{i}\"\nvip = \"{a}.{b}.{c}.{d}\"\nport = {PORT}\nprotocol = \"tcp\"\nforwarding = \"ipip\"\n"
            ));
            for j in 0..PER_VIP {
                let [a, b, c, d] = backend(i, j);
                config.push_str(&format!(
                    "[[service.backend]]\nid = \"b{j}\"\naddress = \"{a}.{b}.{c}.{d}\"\n"
                ));
            }
        }
        super::dataplane::pin_to_cpu(0)?;
        let started = Instant::now();
        let daemon = Daemon::start_in(ns, &instance, &run_dir, &config);
        super::dataplane::pin_to_cpu(bench_cpu)?;
        let daemon = daemon?;
        let pin = PathBuf::from("/sys/fs/bpf").join(&instance);
        // The last VIP's SYN, through the pinned program and the live maps, until it leaves
        // encapsulated to one of that VIP's backends (bounded).
        let syn = frame(VIPS - 1, 0x02);
        let deadline = started + Duration::from_secs(180);
        let program = loop {
            if let Ok(prog) = Xdp::from_pin(pin.join("prog_lb"), XdpAttachType::Interface)
                && let Ok((verdict, out)) = run_xdp(&prog, &syn)
                && verdict == XDP_REDIRECT
            {
                check_ipip(&syn, &out)?;
                break prog;
            }
            if Instant::now() > deadline {
                bail!("no packet forwarded within 180 s of the start: {}", daemon.log());
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let startup_ms = started.elapsed().as_secs_f64() * 1e3;

        let mut memory = Vec::new();
        for name in maps::PINNED {
            let data = MapData::from_pin(pin.join(name)).with_context(|| format!("open {name}"))?;
            memory.push(MapMemory {
                map: name.to_string(),
                bytes: memlock(&data)?,
            });
        }
        memory.sort_by_key(|m| std::cmp::Reverse(m.bytes));
        let maps_bytes = memory.iter().map(|m| m.bytes).sum();
        let pool = memory
            .iter()
            .find(|m| m.map == maps::MAGLEV_POOL)
            .map_or(0, |m| m.bytes);

        let pid = daemon.pid().context("daemon pid")?;
        let (rss_bytes, rss_anon_bytes) = super::control::settled_rss(pid)?;

        let write_before = map_writes(ns)?;
        let mut change_runs_ms = Vec::new();
        for run in 0..5 {
            let weight = if run % 2 == 0 { "50" } else { "100" };
            let t = Instant::now();
            let out = daemon.cli(&["backend", "weight", "s0", "b0", weight]);
            change_runs_ms.push(t.elapsed().as_secs_f64() * 1e3);
            ensure!(
                out.status.success(),
                "backend weight: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let write_after = map_writes(ns)?;
        // Idle: its neighbour refresh (every routed backend's route, each second) and the
        // connection-table census are what it does then.
        let window = Duration::from_secs(5);
        let cpu_before = crate::cpu_seconds(pid)?;
        std::thread::sleep(window);
        let idle_cpu = (crate::cpu_seconds(pid)? - cpu_before) / window.as_secs_f64();
        let passes = write_after.1 - write_before.1;
        ensure!(passes >= 5.0, "{passes} reconciler passes for 5 changes");
        let change_map_write_ms = (write_after.0 - write_before.0) / passes * 1e3;
        let global = match MapData::from_pin(pin.join(maps::GLOBAL_STATS)) {
            Ok(data) => PerCpuArray::try_from(Map::PerCpuArray(data))?,
            Err(e) => bail!("open GLOBAL_STATS: {e}"),
        };
        Ok(Self {
            daemon,
            program,
            global,
            result: ScaleResult {
                vips: VIPS,
                backends: VIPS * PER_VIP,
                conntrack_entries: CONNTRACK,
                startup_ms,
                maps: memory,
                maps_bytes,
                pool_bytes_per_vip: pool / u64::from(VIPS),
                rss_bytes,
                rss_anon_bytes,
                change_ms: median(change_runs_ms.iter().copied()).unwrap_or(f64::NAN),
                change_runs_ms,
                change_map_write_ms,
                idle_cpu,
                per_packet: Vec::new(),
            },
        })
    }

    /// The daemon's global counters, summed over CPUs, in `Counter::ALL` order.
    pub fn counters(&self) -> Result<Vec<u64>> {
        Counter::ALL
            .iter()
            .map(|&c| Ok(self.global.get(&(c as u32), 0)?.iter().sum()))
            .collect()
    }

    pub fn log(&self) -> String {
        self.daemon.log()
    }
}

/// A forwarded SYN: the input behind an outer IPv4 header (protocol 4) to one of the last
/// VIP's backends.
fn check_ipip(input: &[u8], out: &[u8]) -> Result<()> {
    ensure!(out.len() == input.len() + 20, "output is {} bytes", out.len());
    ensure!(out[14 + 9] == 4, "outer protocol {}", out[14 + 9]);
    ensure!(out[34..] == input[14..], "the inner packet changed");
    let dst = &out[14 + 16..14 + 20];
    ensure!(
        (0..PER_VIP).any(|j| backend(VIPS - 1, j) == dst),
        "outer destination {dst:?} is not a backend of the VIP"
    );
    Ok(())
}

/// The daemon's `lb_map_write_duration_seconds` (sum, count).
fn map_writes(ns: &NetNs) -> Result<(f64, f64)> {
    let (status, body) = crate::client::http_get(ns, "127.0.0.1:9464".parse()?, "/metrics", None)?;
    ensure!(status == 200, "scrape answered {status}");
    let value = |name: &str| -> Result<f64> {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .with_context(|| format!("{name} not in the scrape"))?
            .trim()
            .parse()
            .with_context(|| format!("parse {name}"))
    };
    Ok((
        value("lb_map_write_duration_seconds_sum")?,
        value("lb_map_write_duration_seconds_count")?,
    ))
}

/// A map's kernel memory as its fdinfo reports it.
fn memlock(map: &MapData) -> Result<u64> {
    let fd = map.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .context("no memlock in fdinfo")?
        .trim()
        .parse()
        .context("memlock")
}
