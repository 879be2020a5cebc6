//! Health's speed: how long a failed backend stays in the tables (a refused server and a
//! blackhole, through the real daemon), how many checks per second the monitor keeps up with
//! and at what CPU (10,000 targets in a namespace), and what one flap costs the reconciler
//! against a rebuild of every table.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use lb_userspace::{
    health::monitor,
    model::{Backend, BackendRef, HealthSettings, Protocol, Service},
    neigh::NextHop,
    reconcile::{
        apply::{BUILD_BATCH, build_all},
        plan::{Desired, plan},
    },
    snapshot::{Assignments, TableInput},
    status::{BackendStatus, HealthState, ServiceWeights, checks::Board, effective_weights},
};
use serde::Serialize;

use super::median;
use crate::{
    NetNs, Topology,
    servers::{Reply, Responder},
    topology::{Daemon, PORT, VIP4},
    wait_until,
};

#[derive(Clone, Debug, Serialize)]
pub struct HealthResult {
    /// Milliseconds from stopping a backend's server to the first table without it (median).
    pub detect_refused_ms: f64,
    pub detect_refused_runs_ms: Vec<f64>,
    /// The same from taking its link down.
    pub detect_blackhole_ms: f64,
    pub detect_blackhole_runs_ms: Vec<f64>,
    pub checks: ChecksResult,
    pub flap: FlapResult,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChecksResult {
    pub targets: usize,
    pub interval_s: f64,
    pub window_s: f64,
    /// Checks completed per second in the window.
    pub checks_per_s: f64,
    /// What the schedule asks for: targets ÷ interval.
    pub scheduled_per_s: f64,
    /// CPU seconds per second of the monitor's threads (1.0 = one core).
    pub cpu_cores: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct FlapResult {
    pub services: usize,
    pub backends_per_service: usize,
    pub table_size: u32,
    /// Plan plus the table builds it asks for, after one backend goes down (median µs).
    pub one_flap_us: f64,
    pub tables_rebuilt: usize,
    /// Building every table, as the reconciler did before it compared inputs (median µs).
    pub full_rebuild_us: f64,
    pub ratio: f64,
}

pub fn run(quick: bool) -> Result<HealthResult> {
    let runs = if quick { 2 } else { 5 };
    let (refused, blackhole) = detection(runs)?;
    let checks = checks_per_second(if quick { 2.0 } else { 10.0 })?;
    let flap = flap_cost(if quick { 3 } else { 7 }, if quick { 20 } else { 100 })?;
    Ok(HealthResult {
        detect_refused_ms: median(refused.iter().copied()).unwrap_or(f64::NAN),
        detect_refused_runs_ms: refused,
        detect_blackhole_ms: median(blackhole.iter().copied()).unwrap_or(f64::NAN),
        detect_blackhole_runs_ms: blackhole,
        checks,
        flap,
    })
}

const HEALTH_PORT: u16 = 8081;

fn health_addrs(topo: &Topology, id: &str) -> [SocketAddr; 2] {
    let b = topo.backend(id);
    [
        SocketAddr::new(IpAddr::V4(b.v4), HEALTH_PORT),
        SocketAddr::new(IpAddr::V6(b.v6), HEALTH_PORT),
    ]
}

/// Table slots of `id` in service `web`.
fn slots_of(d: &Daemon, id: &str) -> u64 {
    let list = d.json(&["service", "list"]);
    list[0]["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["id"] == id)
        .and_then(|b| b["table_slots"].as_u64())
        .unwrap_or(0)
}

/// Stops a server (then a link) `runs` times and times each until its table slots are gone,
/// restoring it in between.
fn detection(runs: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut topo = Topology::new(3)?;
    let mut responders: BTreeMap<String, Responder> = BTreeMap::new();
    for id in ["b1", "b2", "b3"] {
        let r = Responder::start(
            &topo.backend(id).ns,
            &health_addrs(&topo, id),
            Reply::Http(200, "ok".into()),
            None,
        );
        responders.insert(id.into(), r);
    }
    let (instance, run_dir) = Daemon::new_paths();
    let mut text = format!(
        "[daemon]\ninstance = \"{instance}\"\ninterfaces = [\"eth0\"]\nxdp_mode = \"native\"\nrun_dir = \"{}\"\nneighbour_refresh_ms = 500\n\
         [[service]]\nname = \"web\"\nvip = \"{VIP4}\"\nport = {PORT}\nprotocol = \"tcp\"\ntable_size = 1031\n\
         [service.health]\nport = {HEALTH_PORT}\ninterval = 0.2\ntimeout = 0.2\nfast_interval = 0.2\nerror_threshold = 2\nrecovery_threshold = 2\njitter = 0.1\n",
        run_dir.display()
    );
    for id in ["b1", "b2", "b3"] {
        text.push_str(&format!(
            "[[service.backend]]\nid = \"{id}\"\naddress = \"{}\"\n",
            topo.backend(id).v4
        ));
    }
    let d = Daemon::start(&topo, &instance, &run_dir, &text)?;
    let all_in = |d: &Daemon| ["b1", "b2", "b3"].iter().all(|id| slots_of(d, id) > 0);
    ensure!(
        wait_until(Duration::from_secs(15), || all_in(&d)),
        "backends did not resolve: {}",
        d.log()
    );
    let measure = |d: &Daemon, id: &str| -> Result<f64> {
        let start = Instant::now();
        ensure!(
            wait_until(Duration::from_secs(10), || slots_of(d, id) == 0),
            "{id} stayed in the table: {}",
            d.log()
        );
        Ok(start.elapsed().as_secs_f64() * 1000.0)
    };
    let mut refused = Vec::new();
    for _ in 0..runs {
        topo.stop_servers("b2");
        responders.remove("b2");
        refused.push(measure(&d, "b2")?);
        topo.start_servers("b2");
        let r = Responder::start(
            &topo.backend("b2").ns,
            &health_addrs(&topo, "b2"),
            Reply::Http(200, "ok".into()),
            None,
        );
        responders.insert("b2".into(), r);
        ensure!(
            wait_until(Duration::from_secs(10), || all_in(&d)),
            "b2 did not recover"
        );
    }
    let mut blackhole = Vec::new();
    for _ in 0..runs {
        topo.backend("b3").ns.sh("ip link set eth0 down")?;
        blackhole.push(measure(&d, "b3")?);
        topo.backend("b3").ns.sh("ip link set eth0 up")?;
        ensure!(
            wait_until(Duration::from_secs(15), || all_in(&d)),
            "b3 did not recover: {}",
            d.log()
        );
    }
    Ok((refused, blackhole))
}

/// CPU seconds so far of this process's threads whose name starts with `prefix`.
fn thread_cpu(prefix: &str) -> f64 {
    let tick = 100.0; // USER_HZ
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the ")" of the name: state is field 3, utime 14, stime 15.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        total += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        total += f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    total as f64 / tick
}

/// 100 services × 100 backends, each checked over TCP at `interval`, against 127.0.0.1..100
/// × 100 ports in a fresh namespace; the listeners run on their own runtime and threads.
fn checks_per_second(window_s: f64) -> Result<ChecksResult> {
    const ADDRS: u16 = 100;
    const PORTS: u16 = 100;
    const BASE: u16 = 20000;
    let interval = 1.0;
    let ns = NetNs::new("hc")?;
    ns.sh("ip link set lo up")?;
    crate::in_ns(&ns, || -> Result<ChecksResult> {
        let server = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("hcsrv")
            .enable_all()
            .build()?;
        for p in 0..PORTS {
            let listener = server.block_on(tokio::net::TcpListener::bind(("0.0.0.0", BASE + p)))?;
            server.spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    drop(stream);
                }
            });
        }
        let services: Vec<Service> = (0..PORTS)
            .map(|p| Service {
                table_size: 1031,
                health: Some(HealthSettings {
                    interval: Some(interval),
                    timeout: Some(1.0),
                    ..Default::default()
                }),
                backends: (0..ADDRS)
                    .map(|a| Backend::new(format!("b{a}"), IpAddr::from([127, 0, 0, (a + 1) as u8])))
                    .collect(),
                ..Service::new(
                    format!("s{p}"),
                    IpAddr::from([10, 200, 0, 1]),
                    BASE + p,
                    Protocol::Tcp,
                )
            })
            .collect();
        let targets = services.iter().map(|s| s.backends.len()).sum::<usize>();
        let checker = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("hcmon")
            .enable_all()
            .build()?;
        let board = Board::default();
        let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
        let (_services_tx, services_rx) = tokio::sync::watch::channel(Arc::new(services));
        checker.spawn(async move { while rx.recv().await.is_some() {} });
        let durations = lb_userspace::metrics::Histograms::new().check;
        checker.spawn(monitor::run(
            services_rx,
            tx,
            board.clone(),
            1024,
            Some(durations),
            None,
            None,
        ));
        let checks = |board: &Board| -> (u64, u64) {
            let v = board.read().expect("board");
            let done = v.checks.values().map(|c| c.checks).sum();
            let failed = v.checks.values().map(|c| c.failed).sum();
            (done, failed)
        };
        // One interval spreads the first checks; one more settles the schedule.
        std::thread::sleep(Duration::from_secs_f64(2.0 * interval));
        let (c0, f0) = checks(&board);
        let cpu0 = thread_cpu("hcmon");
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(window_s));
        let (c1, f1) = checks(&board);
        let cpu1 = thread_cpu("hcmon");
        let elapsed = t0.elapsed().as_secs_f64();
        checker.shutdown_timeout(Duration::from_secs(1));
        server.shutdown_timeout(Duration::from_secs(1));
        ensure!(f1 == f0, "{} checks failed against live listeners", f1 - f0);
        Ok(ChecksResult {
            targets,
            interval_s: interval,
            window_s: elapsed,
            checks_per_s: (c1 - c0) as f64 / elapsed,
            scheduled_per_s: targets as f64 / interval,
            cpu_cores: (cpu1 - cpu0) / elapsed,
        })
    })
    .context("checks per second")
}

fn flap_services(n: usize, per: usize) -> Vec<Service> {
    (0..n)
        .map(|i| Service {
            backends: (0..per)
                .map(|j| {
                    Backend::new(
                        format!("b{j}"),
                        IpAddr::from([10, 2, (j / 250) as u8, (j % 250 + 1) as u8]),
                    )
                })
                .collect(),
            ..Service::new(
                format!("svc{i}"),
                IpAddr::from([10, 1, (i / 250) as u8, (i % 250 + 1) as u8]),
                80,
                Protocol::Tcp,
            )
        })
        .collect()
}

/// The reconciler's CPU work for one flap (plan + the tables it rebuilds) against building
/// every table, with 100 services × 100 backends at M = 65537. No maps: both sides would
/// write the same one service value; what differs is the builds (and, before, their writes).
fn flap_cost(runs: usize, services: usize) -> Result<FlapResult> {
    let per = 100;
    let svcs = flap_services(services, per);
    let hop = NextHop {
        ifindex: 2,
        ifname: "eth0".into(),
        src_mac: [2; 6],
        dst_mac: [4; 6],
        mtu: 0,
    };
    let hops: std::collections::HashMap<IpAddr, NextHop> = svcs
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| (b.address, hop.clone())))
        .collect();
    let weights_of = |status: &BTreeMap<BackendRef, BackendStatus>| -> BTreeMap<String, ServiceWeights> {
        let now = Instant::now();
        svcs.iter()
            .map(|s| {
                (
                    s.name.clone(),
                    effective_weights(s, s.strategy, status, |a| hops.contains_key(&a), now),
                )
            })
            .collect()
    };
    // One reconciler pass's CPU work against `current`: plan, then build what it asks for.
    let pass =
        |status: &BTreeMap<BackendRef, BackendStatus>, current: &Assignments| -> Result<(f64, usize)> {
            let t = Instant::now();
            let weights = weights_of(status);
            let p = plan(
                &Desired {
                    services: &svcs,
                    weights: &weights,
                    hops: &hops,
                    geo: None,
                },
                current,
            )?;
            // As the reconciler builds them: batches spread over the CPUs.
            let batch: Vec<(&str, &TableInput)> = p.rebuild.iter().map(|(n, i)| (n.as_str(), i)).collect();
            for chunk in batch.chunks(BUILD_BATCH) {
                std::hint::black_box(build_all(chunk));
            }
            Ok((t.elapsed().as_secs_f64() * 1e6, p.rebuild.len()))
        };
    // The state after everything was built once.
    let weights = weights_of(&BTreeMap::new());
    let first = plan(
        &Desired {
            services: &svcs,
            weights: &weights,
            hops: &hops,
            geo: None,
        },
        &Assignments::default(),
    )?;
    let mut built = first.assignments.clone();
    for (name, input) in first.rebuild {
        built.services.get_mut(&name).expect("planned").built = Some(input);
    }
    let mut flapped = BTreeMap::new();
    flapped.insert(
        BackendRef::new(&format!("svc{}", services / 2), "b7"),
        BackendStatus {
            health: HealthState::Down,
            score: 0.0,
            ..Default::default()
        },
    );
    let mut one = Vec::new();
    let mut rebuilt = 0;
    for _ in 0..runs {
        let (us, n) = pass(&flapped, &built)?;
        one.push(us);
        rebuilt = n;
    }
    ensure!(rebuilt == 1, "one flap rebuilt {rebuilt} tables");
    // As the reconciler did before it compared inputs: every table built again.
    let mut full = Vec::new();
    for _ in 0..runs.min(3) {
        full.push(pass(&flapped, &Assignments::default())?.0);
    }
    let one_us = median(one).unwrap_or(f64::NAN);
    let full_us = median(full).unwrap_or(f64::NAN);
    Ok(FlapResult {
        services,
        backends_per_service: per,
        table_size: lb_common::maps::DEFAULT_TABLE_SIZE,
        one_flap_us: one_us,
        tables_rebuilt: rebuilt,
        full_rebuild_us: full_us,
        ratio: full_us / one_us,
    })
}
