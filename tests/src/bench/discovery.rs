//! Service discovery at scale (issue 26 §5), through the real daemon:
//! - heartbeats: 10,000 instances registered with a ttl over the TCP API, then each heartbeating
//!   every 10 s (1,000 a second) over kept-alive connections. Measured: the daemon's CPU from /proc (utime +
//!   stime over wall time) while they run and at rest after, the heartbeats per second it
//!   answered, and their latency;
//! - an etcd source (a real etcd) with the same 10,000 instances: the time from a bulk change
//!   (1,000 weights in 10 transactions) written to every service's instances showing it, read
//!   through the API's instance watch (a long poll answered by the pass that published it, after
//!   its map writes).
//!
//! 10,000 instances are 4 services of 2,500: a service takes at most 4,096 backends
//! (`MAX_BACKENDS_PER_SERVICE`) and the data plane 16,384 in all (`MAX_BACKENDS`). Instance `i`
//! is `b{i}` of service `s{i % 4}`, at `control::neighbour(i + 1)`: a permanent neighbour entry,
//! so every one has a next hop and table slots without a host behind it.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

use super::{
    control::{neighbour, neighbours},
    median,
};
use crate::{NetNs, client::KeepAlive, cluster::Etcd, in_ns, topology::Daemon};

pub const INSTANCES: u32 = 10_000;
pub const SERVICES: u32 = 4;
/// Each instance heartbeats every `INTERVAL`. Its ttl is long enough for the registration of
/// all 10,000 (minutes at this scale: every registration is a writer pass over every backend),
/// so that none is late before its first heartbeat; a renewal costs the same under any ttl.
const INTERVAL: Duration = Duration::from_secs(10);
const TTL_S: u32 = 600;
/// Kept-alive connections the instances' heartbeats share (a per-peer cap is 32).
const CONNECTIONS: usize = 8;
/// The same for the registrations: the writer takes what queued during a pass in one pass.
const REGISTERING: usize = 24;
const API: &str = "127.0.0.1:8480";
const REPORT_TOKEN: &str = "bench-report-token-of-32-bytes-or-more";
const ADMIN_TOKEN: &str = "bench-admin-token-of-32-bytes-or-more";
/// The bounds.
pub const CPU_GOAL: f64 = 0.10;
pub const CONVERGE_GOAL_MS: f64 = 2000.0;

#[derive(Clone, Debug, Serialize)]
pub struct DiscoveryResult {
    pub heartbeat: HeartbeatResult,
    pub etcd: EtcdResult,
}

#[derive(Clone, Debug, Serialize)]
pub struct HeartbeatResult {
    pub instances: u32,
    pub services: u32,
    pub ttl_s: u32,
    pub interval_s: f64,
    pub connections: usize,
    /// Registering them all (POST with a ttl, `CONNECTIONS` at a time), seconds.
    pub register_s: f64,
    pub window_s: f64,
    /// What the schedule asks for: instances ÷ interval.
    pub scheduled_per_s: f64,
    /// Heartbeats answered 200 per second of the window.
    pub heartbeats_per_s: f64,
    /// Send to answer, over every heartbeat of the window.
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    /// The daemon's CPU (its threads, user and system) per second of the window: 1.0 is one core.
    pub cpu_cores: f64,
    /// The same in the 5 s after, no heartbeat coming (its neighbour refresh and census).
    pub rest_cpu_cores: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct EtcdResult {
    pub instances: u32,
    pub services: u32,
    /// Daemon start to every instance serving (the source's first read of 10,000 keys).
    pub first_read_ms: f64,
    pub changed: u32,
    pub txns: u32,
    /// The last transaction's answer to every service's instances showing the change (median
    /// of `converge_runs_ms`).
    pub converge_ms: f64,
    pub converge_runs_ms: Vec<f64>,
    /// Writing the change: the first transaction sent to the last one answered.
    pub write_runs_ms: Vec<f64>,
}

pub fn run(runs: usize, window: Duration) -> Result<DiscoveryResult> {
    Ok(DiscoveryResult {
        heartbeat: heartbeats(window).context("heartbeats")?,
        etcd: etcd(runs).context("etcd source")?,
    })
}

fn service_of(i: u32) -> u32 {
    i % SERVICES
}

/// The daemon's head: one interface, room for two tables per service (a pass that changes
/// every service writes each one's new table before it frees the old).
fn daemon_head(instance: &str, run_dir: &std::path::Path) -> String {
    format!(
        "[daemon]\ninstance = \"{instance}\"\ninterfaces = [\"eth0\"]\nxdp_mode = \"native\"\nrun_dir = \"{}\"\n\
         conntrack_size = 65536\ntable_pool_slots = {}\n",
        run_dir.display(),
        2 * SERVICES * lb_common::maps::pool_region(lb_common::maps::DEFAULT_TABLE_SIZE)
    )
}

fn service_head(k: u32) -> String {
    format!(
        "\n[[service]]\nname = \"s{k}\"\nvip = \"10.100.0.1\"\nport = {}\nprotocol = \"tcp\"\n",
        1000 + k
    )
}

/// `n` kept-alive connections to the daemon's TCP API, made in `ns`.
fn connect(ns: &NetNs, n: usize, token: &str) -> Result<Vec<KeepAlive>> {
    let addr: SocketAddr = API.parse()?;
    in_ns(ns, || {
        (0..n)
            .map(|_| KeepAlive::connect(addr, Some(token)))
            .collect::<std::io::Result<Vec<_>>>()
    })
    .context("connect to the API")
}

/// Runs `work(connection, t)` on each connection in a thread of its own; the first error.
fn on_each<T: Send>(
    conns: Vec<KeepAlive>,
    work: impl Fn(KeepAlive, usize) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(t, c)| {
                let work = &work;
                s.spawn(move || work(c, t))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| -> Result<T> {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a client thread panicked"))?
            })
            .collect()
    })
}

/// A service's instances as the API shows them: (index, [(id, weight, serving)]).
type Listed = (u64, Vec<(String, u64, bool)>);

fn list_instances(c: &mut KeepAlive, service: u32, watch: Option<u64>) -> Result<Listed> {
    let path = match watch {
        Some(i) => format!("/v1/services/s{service}/instances?index={i}&wait=10"),
        None => format!("/v1/services/s{service}/instances"),
    };
    let (status, body) = c.request("GET", &path, None)?;
    ensure!(status == 200, "GET {path}: {status} {body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let data = &v["data"];
    let index = data["index"].as_u64().context("no index")?;
    let list = data["instances"]
        .as_array()
        .context("no instances")?
        .iter()
        .map(|x| {
            (
                x["id"].as_str().unwrap_or_default().to_string(),
                x["weight"].as_u64().unwrap_or(0),
                x["serving"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    Ok((index, list))
}

/// Every service lists its share of the instances, each serving.
fn all_serving(c: &mut KeepAlive) -> Result<bool> {
    let mut n = 0;
    for k in 0..SERVICES {
        let (_, list) = list_instances(c, k, None)?;
        if list.iter().any(|(_, _, serving)| !serving) {
            return Ok(false);
        }
        n += list.len();
    }
    Ok(n == INSTANCES as usize)
}

/// A counter's sum over its series in the daemon's scrape (0 when it has none yet).
fn counter(ns: &NetNs, name: &str) -> Result<f64> {
    let (status, body) = crate::client::http_get(ns, "127.0.0.1:9464".parse()?, "/metrics", None)?;
    ensure!(status == 200, "scrape answered {status}");
    Ok(body
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum())
}

fn heartbeats(window: Duration) -> Result<HeartbeatResult> {
    let (instance, run_dir) = Daemon::new_paths();
    let ns = neighbours("hb", INSTANCES, &run_dir)?;
    let (admin, report) = (run_dir.join("admin.token"), run_dir.join("report.token"));
    crate::write_secret(&admin, ADMIN_TOKEN)?;
    crate::write_secret(&report, REPORT_TOKEN)?;
    let mut config = daemon_head(&instance, &run_dir);
    config.push_str(&format!(
        "[daemon.api]\nlisten = \"{API}\"\ntoken_file = \"{}\"\nreport_token_file = \"{}\"\n",
        admin.display(),
        report.display()
    ));
    for k in 0..SERVICES {
        config.push_str(&service_head(k));
    }
    let daemon = Daemon::start_in(&ns, &instance, &run_dir, &config)?;
    let pid = daemon.pid().context("daemon pid")?;

    // Registration, each connection its share in order: instance i's first heartbeat then
    // comes about as long after its registration as the registering took (under the ttl).
    let started = Instant::now();
    on_each(connect(&ns, REGISTERING, REPORT_TOKEN)?, |mut c, t| {
        for i in (t as u32..INSTANCES).step_by(REGISTERING) {
            let body = format!(
                "{{\"id\": \"b{i}\", \"address\": \"{}\", \"ttl\": {TTL_S}}}",
                neighbour(i + 1)
            );
            let path = format!("/v1/services/s{}/instances", service_of(i));
            let (status, answer) = c.request("POST", &path, Some(&body))?;
            ensure!(status == 200, "POST {path} {body}: {status} {answer}");
        }
        Ok(())
    })
    .with_context(|| format!("registering: {}", daemon.log_tail(20)))?;
    let register_s = started.elapsed().as_secs_f64();
    ensure!(
        register_s < f64::from(TTL_S) - INTERVAL.as_secs_f64(),
        "registering took {register_s:.1} s: the first instances would be late before their first heartbeat"
    );
    // A connection for each read, as a monitoring client makes one.
    let reader = || -> Result<KeepAlive> { connect(&ns, 1, ADMIN_TOKEN)?.pop().context("a connection") };
    ensure!(
        all_serving(&mut reader()?)?,
        "not every registered instance serves: {}",
        daemon.log_tail(20)
    );

    // Heartbeats: number k of the window is instance k mod N's, due at k ÷ rate; connection t
    // sends those with k mod CONNECTIONS = t, each when due (at once if it is behind).
    let rate = f64::from(INSTANCES) / INTERVAL.as_secs_f64();
    let total = (rate * window.as_secs_f64()) as usize;
    let accepted_before = counter(&ns, "lb_registration_heartbeats_total")?;
    let conns = connect(&ns, CONNECTIONS, REPORT_TOKEN)?;
    let (wall, cpu_before) = (Instant::now(), crate::cpu_seconds(pid)?);
    let t0 = Instant::now();
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(total)));
    on_each(conns, |mut c, t| {
        let mut mine = Vec::with_capacity(total / CONNECTIONS + 1);
        for k in (t..total).step_by(CONNECTIONS) {
            let due = t0 + Duration::from_secs_f64(k as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let i = k as u32 % INSTANCES;
            let path = format!("/v1/services/s{}/instances/b{i}/heartbeat", service_of(i));
            let sent = Instant::now();
            let (status, answer) = c.request("PUT", &path, None)?;
            ensure!(status == 200, "PUT {path}: {status} {answer}");
            mine.push(sent.elapsed().as_secs_f64() * 1e3);
        }
        latencies.lock().expect("latencies").extend(mine);
        Ok(())
    })
    .with_context(|| format!("heartbeating: {}", daemon.log_tail(20)))?;
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = (crate::cpu_seconds(pid)? - cpu_before) / wall.elapsed().as_secs_f64();
    let accepted = counter(&ns, "lb_registration_heartbeats_total")? - accepted_before;
    ensure!(
        accepted as usize == total,
        "the daemon counted {accepted} heartbeats of {total} answered"
    );
    let late = counter(&ns, "lb_registration_expiries_total")?;
    ensure!(late == 0.0, "{late} instances were late: {}", daemon.log_tail(20));

    // At rest: the same instances (their leases good for 20 s more), no heartbeat coming.
    let rest = Duration::from_secs(5);
    let before = crate::cpu_seconds(pid)?;
    std::thread::sleep(rest);
    let rest_cpu_cores = (crate::cpu_seconds(pid)? - before) / rest.as_secs_f64();
    ensure!(
        all_serving(&mut reader()?)?,
        "an instance stopped serving: {}",
        daemon.log_tail(20)
    );

    let mut l = std::mem::take(&mut *latencies.lock().expect("latencies"));
    l.sort_by(f64::total_cmp);
    let at = |q: f64| l[((l.len() as f64 * q) as usize).min(l.len() - 1)];
    Ok(HeartbeatResult {
        instances: INSTANCES,
        services: SERVICES,
        ttl_s: TTL_S,
        interval_s: INTERVAL.as_secs_f64(),
        connections: CONNECTIONS,
        register_s,
        window_s: elapsed,
        scheduled_per_s: rate,
        heartbeats_per_s: total as f64 / elapsed,
        latency_p50_ms: at(0.5),
        latency_p99_ms: at(0.99),
        latency_max_ms: l.last().copied().unwrap_or(f64::NAN),
        cpu_cores: cpu,
        rest_cpu_cores,
    })
}

const CLUSTER: &str = "bench";
/// Puts per transaction (etcd allows 128 operations in one by default).
const PER_TXN: u32 = 100;
/// Instances whose weight a bulk change sets.
const CHANGED: u32 = 1000;

fn key(i: u32) -> String {
    format!(
        "{}b{i}",
        lb_userspace::discovery::etcd::dir(CLUSTER, &format!("s{}", service_of(i)))
    )
}

fn value(i: u32, weight: u64) -> String {
    format!("{{\"address\": \"{}\", \"weight\": {weight}}}", neighbour(i + 1))
}

/// Puts `(instance, weight)` in transactions of `PER_TXN`; the time of the last answer.
async fn put_all(c: &mut etcd_client::Client, puts: &[(u32, u64)]) -> Result<Instant> {
    for chunk in puts.chunks(PER_TXN as usize) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|&(i, w)| etcd_client::TxnOp::put(key(i), value(i, w), None))
            .collect();
        let r = c.txn(etcd_client::Txn::new().and_then(ops)).await?;
        ensure!(r.succeeded(), "a transaction failed");
    }
    Ok(Instant::now())
}

fn etcd(runs: usize) -> Result<EtcdResult> {
    let (instance, run_dir) = Daemon::new_paths();
    let ns = neighbours("etcd", INSTANCES, &run_dir)?;
    let etcd = Etcd::start_in(&ns, std::net::Ipv4Addr::LOCALHOST)?;
    // A runtime of one thread, run only from threads in the namespace: the client's
    // connections (and any reconnection) are made there.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut client = in_ns(&ns, || {
        rt.block_on(etcd_client::Client::connect([etcd.url.clone()], None))
    })
    .context("connect to etcd")?;
    let all: Vec<(u32, u64)> = (0..INSTANCES).map(|i| (i, 100)).collect();
    in_ns(&ns, || rt.block_on(put_all(&mut client, &all)))?;

    let token = run_dir.join("admin.token");
    crate::write_secret(&token, ADMIN_TOKEN)?;
    let mut config = daemon_head(&instance, &run_dir);
    config.push_str(&format!(
        "[daemon.api]\nlisten = \"{API}\"\ntoken_file = \"{}\"\n",
        token.display()
    ));
    for k in 0..SERVICES {
        config.push_str(&service_head(k));
        config.push_str(&format!(
            "[service.discovery]\nkind = \"etcd\"\netcd = [\"{}\"]\ncluster = \"{CLUSTER}\"\n",
            etcd.url
        ));
    }
    let started = Instant::now();
    let daemon = Daemon::start_in(&ns, &instance, &run_dir, &config)?;
    let bound = Duration::from_secs(120);
    loop {
        if all_serving(&mut connect(&ns, 1, ADMIN_TOKEN)?[0])? {
            break;
        }
        if started.elapsed() > bound {
            bail!(
                "not every instance served within {bound:?} of the start: {}",
                daemon.log_tail(20)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let first_read_ms = started.elapsed().as_secs_f64() * 1e3;

    let (mut converge, mut write) = (Vec::new(), Vec::new());
    // One connection per service, kept alive through the runs.
    let mut conns = connect(&ns, SERVICES as usize, ADMIN_TOKEN)?;
    for r in 0..runs {
        // A weight none of them has yet (they start at 100), on 250 instances of each service
        // spread over its list: a tenth of each, another tenth each round; 10 transactions of 100.
        let weight = 50 + r as u64 % 10;
        let changed: Vec<(u32, u64)> = (0..INSTANCES)
            .filter(|i| (i / SERVICES) % (INSTANCES / CHANGED) == r as u32 % (INSTANCES / CHANGED))
            .map(|i| (i, weight))
            .collect();
        ensure!(changed.len() == CHANGED as usize, "{} changed", changed.len());
        let wanted = |k: u32| -> Vec<String> {
            changed
                .iter()
                .filter(|(i, _)| service_of(*i) == k)
                .map(|(i, _)| format!("b{i}"))
                .collect()
        };
        // Each service's watch, from its index before the change, until it shows every weight.
        let indexes: Vec<u64> = (0..SERVICES)
            .map(|k| Ok(list_instances(&mut conns[0], k, None)?.0))
            .collect::<Result<_>>()?;
        let watches = std::thread::scope(|s| -> Result<(Instant, Instant, Vec<Instant>)> {
            let watchers: Vec<_> = conns
                .iter_mut()
                .enumerate()
                .map(|(k, c)| {
                    let (ids, mut index) = (wanted(k as u32), indexes[k]);
                    s.spawn(move || -> Result<Instant> {
                        let deadline = Instant::now() + Duration::from_secs(30);
                        while Instant::now() < deadline {
                            let (next, list) = list_instances(c, k as u32, Some(index))?;
                            index = next;
                            let shows = ids.iter().all(|id| {
                                list.iter()
                                    .any(|(x, w, serving)| x == id && *w == weight && *serving)
                            });
                            if shows {
                                return Ok(Instant::now());
                            }
                        }
                        bail!("service s{k} did not show the change within 30 s")
                    })
                })
                .collect();
            let first = Instant::now();
            let last = in_ns(&ns, || rt.block_on(put_all(&mut client, &changed)))?;
            let seen = watchers
                .into_iter()
                .map(|w| -> Result<Instant> { w.join().map_err(|_| anyhow::anyhow!("a watch panicked"))? })
                .collect::<Result<Vec<_>>>()?;
            Ok((first, last, seen))
        })
        .with_context(|| daemon.log_tail(20))?;
        let (first, last, seen) = watches;
        let done = seen.into_iter().max().context("no service")?;
        converge.push(done.saturating_duration_since(last).as_secs_f64() * 1e3);
        write.push((last - first).as_secs_f64() * 1e3);
    }
    drop(daemon);
    drop(etcd);
    Ok(EtcdResult {
        instances: INSTANCES,
        services: SERVICES,
        first_read_ms,
        changed: CHANGED,
        txns: CHANGED / PER_TXN,
        converge_ms: median(converge.iter().copied()).unwrap_or(f64::NAN),
        converge_runs_ms: converge,
        write_runs_ms: write,
    })
}
