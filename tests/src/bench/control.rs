//! Control-plane speed: Maglev table builds, writing and swapping a table into the live maps,
//! and the daemon's memory at idle with 100 services of 100 backends.

use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use aya::maps::{HashMap, Map, MapData};
use lb_common::{FAMILY_V4, PROTO_TCP, ServiceKey, ServiceValue, maps};
use lb_userspace::{
    dataplane::Pool,
    maglev::{MaglevBackend, build_table, build_table_probing},
};
use serde::Serialize;

use super::median;
use crate::{NetNs, topology::Daemon, topology::empty_ebpf, wait_until};

#[derive(Clone, Debug, Serialize)]
pub struct MaglevResult {
    pub m: u32,
    pub n: u32,
    /// Equal weights; median over `runs`.
    pub build_us: f64,
    pub runs: Vec<f64>,
    /// The same builds probing every turn to the end (no tail search), interleaved with the
    /// others in this process: the before of the A/B. The tables are compared slot for slot.
    pub probing_us: f64,
    pub probing_runs: Vec<f64>,
    /// The same backends with weights spread 1..=100 (seeded, `WEIGHT_SEED`), built
    /// interleaved with the equal ones; median over `weighted_runs`.
    pub weighted_us: f64,
    pub weighted_runs: Vec<f64>,
    /// Its reference build (probing to the end, turns from a heap), checked equal slot for slot.
    pub weighted_probing_us: f64,
    pub weighted_probing_runs: Vec<f64>,
    /// `weighted_us / build_us`; the goal is at most 1.5.
    pub weighted_ratio: f64,
}

/// Seeds the weights of the weighted Maglev builds (one weight set per M and N).
pub const WEIGHT_SEED: u64 = 0x6d61_676c_6576;

#[derive(Clone, Debug, Serialize)]
pub struct Rss {
    pub services: u32,
    pub backends_per_service: u32,
    /// VmRSS of the daemon.
    pub rss_bytes: u64,
    /// The part of it that is the daemon's own heap and stacks (RssAnon); the rest is mostly
    /// the mmap-ed table pool, which is kernel memory shared with the data plane.
    pub rss_anon_bytes: u64,
    /// One `GET /metrics` of this daemon, median ms over `scrape_runs_ms`.
    pub scrape_ms: f64,
    pub scrape_runs_ms: Vec<f64>,
    /// Samples in one scrape.
    pub scrape_samples: usize,
}

fn ids(n: u32) -> Vec<String> {
    (1..=n).map(|i| format!("backend-{i}")).collect()
}

pub fn maglev(runs: usize) -> Result<Vec<MaglevResult>> {
    let mut out = Vec::new();
    let mut rng = fastrand::Rng::with_seed(WEIGHT_SEED);
    for m in [65537u32, 655373] {
        for n in [10u32, 100, 1000] {
            let ids = ids(n);
            let equal: Vec<_> = ids.iter().map(|id| MaglevBackend { id, weight: 100 }).collect();
            let weighted: Vec<_> = ids
                .iter()
                .map(|id| MaglevBackend {
                    id,
                    weight: rng.u32(1..=100),
                })
                .collect();
            // [equal, its reference, weighted, its reference], each run in that order.
            let mut times: [Vec<f64>; 4] = Default::default();
            for _ in 0..runs {
                for (members, what, at) in [(&equal, "equal", 0), (&weighted, "weighted", 2)] {
                    let t = Instant::now();
                    let table = std::hint::black_box(build_table(std::hint::black_box(members), m));
                    times[at].push(t.elapsed().as_secs_f64() * 1e6);
                    ensure!(
                        table.len() == m as usize,
                        "M={m} N={n} {what}: table has {} slots",
                        table.len()
                    );
                    let t = Instant::now();
                    let reference =
                        std::hint::black_box(build_table_probing(std::hint::black_box(members), m));
                    times[at + 1].push(t.elapsed().as_secs_f64() * 1e6);
                    ensure!(
                        table == reference,
                        "M={m} N={n} {what}: the build's table differs from the reference's"
                    );
                }
            }
            let [runs, probing_runs, weighted_runs, weighted_probing_runs] = times;
            let med = |runs: &[f64]| median(runs.iter().copied()).unwrap_or(f64::NAN);
            out.push(MaglevResult {
                m,
                n,
                build_us: med(&runs),
                probing_us: med(&probing_runs),
                weighted_us: med(&weighted_runs),
                weighted_probing_us: med(&weighted_probing_runs),
                weighted_ratio: med(&weighted_runs) / med(&runs),
                runs,
                probing_runs,
                weighted_runs,
                weighted_probing_runs,
            });
        }
    }
    Ok(out)
}

/// Writes a full M = 65537 table into a free pool region and swaps the service to it, as the
/// daemon does on every change; alternates between two regions. Returns (median µs, runs).
pub fn table_swap(runs: usize) -> Result<(f64, Vec<f64>)> {
    const M: u32 = 65537;
    let mut lb = empty_ebpf()?;
    let mut services: HashMap<MapData, ServiceKey, ServiceValue> =
        lb.take_map(maps::SERVICES).context("SERVICES")?.try_into()?;
    let mut pool = match lb.take_map(maps::MAGLEV_POOL).context("MAGLEV_POOL")? {
        Map::Array(data) => Pool::new(data)?,
        _ => bail!("MAGLEV_POOL is not an array"),
    };
    ensure!(
        pool.slots() >= maps::pool_region(M) + M,
        "pool has only {} slots",
        pool.slots()
    );
    let ids = ids(100);
    let members: Vec<_> = ids.iter().map(|id| MaglevBackend { id, weight: 100 }).collect();
    let table: Vec<u16> = build_table(&members, M).iter().map(|&i| i as u16 + 1).collect();
    let key = ServiceKey::new(
        FAMILY_V4,
        PROTO_TCP,
        [10, 100, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        80u16.to_be(),
    );
    let mut times = Vec::with_capacity(runs);
    for run in 0..runs {
        let offset = (run as u32 % 2) * maps::pool_region(M);
        let t = Instant::now();
        pool.write(offset, &table)?;
        let value = ServiceValue {
            id: 0,
            flags: 0,
            table_offset: offset,
            table_size: M,
            forward: 0,
            ..Default::default()
        };
        services.insert(key, value, 0)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
        ensure!(
            pool.read(offset, M).as_deref() == Some(&table[..]),
            "table readback differs"
        );
    }
    Ok((median(times.iter().copied()).unwrap_or(f64::NAN), times))
}

/// Starts the real daemon with `services` services of `per_service` backends each (backends
/// resolved through permanent neighbour entries), waits until every table is built, then reads
/// its memory once it has settled.
pub fn daemon_rss(services: u32, per_service: u32) -> Result<Rss> {
    let (instance, run_dir) = Daemon::new_paths();
    let ns = neighbours("rss", per_service, &run_dir)?;

    let mut config = format!(
        "[daemon]\ninstance = \"{instance}\"\ninterfaces = [\"eth0\"]\nxdp_mode = \"native\"\nrun_dir = \"{}\"\n\
         conntrack_size = 65536\ntable_pool_slots = {}\nneighbour_refresh_ms = 1000\n",
        run_dir.display(),
        // A table per service and one spare for swaps, in whole pool elements.
        (services + 1) * maps::pool_region(65537)
    );
    for s in 0..services {
        config.push_str(&format!(
            "\n[[service]]\nname = \"svc{s}\"\nvip = \"10.100.0.1\"\nport = {}\nprotocol = \"tcp\"\n",
            1000 + s
        ));
        for i in 1..=per_service {
            config.push_str(&format!(
                "[[service.backend]]\nid = \"b{i}\"\naddress = \"{}\"\n",
                neighbour(i)
            ));
        }
    }
    let daemon = Daemon::start_in(&ns, &instance, &run_dir, &config)?;
    let ready = wait_until(Duration::from_secs(60), || {
        let out = daemon.cli(&["--json", "service", "list"]);
        let Ok(list) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
            return false;
        };
        let Some(list) = list.as_array() else { return false };
        list.len() == services as usize
            && list.iter().all(|s| {
                s["backends"].as_array().is_some_and(|b| {
                    b.len() == per_service as usize
                        && b.iter().all(|b| b["table_slots"].as_u64().unwrap_or(0) > 0)
                })
            })
    });
    ensure!(
        ready,
        "the daemon did not build every table within 60 s: {}",
        daemon.log()
    );
    let pid = daemon.pid().context("daemon pid")?;
    let last = settled_rss(pid)?;
    let mut scrapes = Vec::new();
    let mut samples = 0;
    for _ in 0..7 {
        let t = Instant::now();
        let (status, body) = crate::client::http_get(&ns, "127.0.0.1:9464".parse()?, "/metrics", None)?;
        scrapes.push(t.elapsed().as_secs_f64() * 1000.0);
        ensure!(status == 200, "scrape answered {status}");
        samples = body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .count();
    }
    Ok(Rss {
        services,
        backends_per_service: per_service,
        rss_bytes: last.0,
        rss_anon_bytes: last.1,
        scrape_ms: median(scrapes.iter().copied()).unwrap_or(f64::NAN),
        scrape_runs_ms: scrapes,
        scrape_samples: samples,
    })
}

/// Address `i` (1..=65535) of a `neighbours` namespace: 10.97.0.0/16, 250 to a /24.
pub fn neighbour(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 97, (1 + i / 250) as u8, (1 + i % 250) as u8)
}

/// A namespace whose `eth0` (10.97.0.1/16, a veth with its peer up) holds permanent neighbour
/// entries for `neighbour(1..=n)`: backends that resolve with no host behind them. The
/// `ip -batch` file goes in `dir`.
pub fn neighbours(tag: &str, n: u32, dir: &Path) -> Result<NetNs> {
    let ns = NetNs::new(tag)?;
    ns.sh(
        "ip link add eth0 type veth peer name peer0 && ip link set peer0 up && ip link set eth0 up && \
           ip addr add 10.97.0.1/16 dev eth0",
    )?;
    let mut neigh = String::new();
    for i in 1..=n {
        neigh.push_str(&format!(
            "neigh add {} lladdr 02:00:00:00:{:02x}:{:02x} dev eth0 nud permanent\n",
            neighbour(i),
            i >> 8,
            i & 0xff
        ));
    }
    std::fs::create_dir_all(dir)?;
    let batch = dir.join("neigh.batch");
    std::fs::write(&batch, neigh)?;
    ns.sh(&format!("ip -batch {}", batch.display()))?;
    Ok(ns)
}

/// (VmRSS, RssAnon) in bytes once the process is idle: two readings a second apart agree
/// within 64 KiB (bounded at 10 s).
pub fn settled_rss(pid: u32) -> Result<(u64, u64)> {
    let mut last = read_rss(pid)?;
    for _ in 0..10 {
        std::thread::sleep(Duration::from_secs(1));
        let now = read_rss(pid)?;
        if now.0.abs_diff(last.0) <= 64 << 10 {
            return Ok(now);
        }
        last = now;
    }
    bail!("memory of process {pid} kept changing for 10 s")
}

/// (VmRSS, RssAnon) in bytes.
fn read_rss(pid: u32) -> Result<(u64, u64)> {
    Ok((
        crate::proc_status(pid, "VmRSS")?,
        crate::proc_status(pid, "RssAnon")?,
    ))
}
