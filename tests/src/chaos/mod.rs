//! Chaos under continuous traffic (issue 27 §2): steady traffic through the daemon while a
//! seeded schedule of faults runs, and invariants checked as it goes and at the end.
//!
//! - Traffic (`traffic`): long-lived TCP connections asking every 50 ms (a miss past 1 s is a
//!   failure), new TCP connections at a steady rate, UDP flows.
//! - Faults (`schedule`): servers stopped and started, links down and up, backends removed and
//!   added, weights, strategies, reloads, the daemon SIGKILLed and restarted.
//! - Invariants: no failure of a connection or flow whose backend stayed healthy and in its
//!   service; new connections ≥ 99.9 % successful, leaving out those to a backend within its
//!   detection window; no active-flow count negative, and each equal to the flows the tables
//!   count once the traffic stops; the table pool's free space back to a clean start's; every
//!   UDP datagram sent counted once by its service, TCP packets and new flows at least what was
//!   sent, and no drop counter moved.
//!
//! A failure prints the seed and the fault timeline; the same seed replays the schedule.

pub mod schedule;
pub mod traffic;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use self::{
    schedule::{Fault, Lab, Model, Step},
    traffic::{Shared, Target, target},
};
use crate::{
    Daemon, Topology,
    netns::spawn_in,
    topology::{VIP4, VIP6},
    wait_until,
};

/// The services: a TCP and a UDP one per family, DSR, with checks through the VIP.
pub const SERVICES: [&str; 4] = ["web4", "dns4", "web6", "dns6"];
/// Backends in every service at the start; `SPARE` joins and leaves services.
pub const MEMBERS: [&str; 4] = ["b1", "b2", "b3", "b4"];
pub const SPARE: &str = "b5";
/// The lab's client (`Topology::new` puts it there).
const CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 1);

/// The health checks every service runs, through the VIP (the backends' servers listen on the
/// VIPs only), and the detection window they give (docs/health.md, "Detection window").
const INTERVAL: f64 = 0.2;
const TIMEOUT: f64 = 0.1;
const JITTER: f64 = 0.1;
const THRESHOLD: u32 = 2;
/// One reconciler pass after the deciding check, bounded.
const PASS: f64 = 0.25;

/// How long after a failure starts (or ends) the checks may take to take the backend out of
/// (or put it back into) the tables: the next check, up to one interval with jitter, then
/// `THRESHOLD - 1` more at the fast interval, the last one's timeout, and a pass.
pub fn detection_window() -> Duration {
    Duration::from_secs_f64(
        INTERVAL * (1.0 + JITTER) + f64::from(THRESHOLD - 1) * INTERVAL * (1.0 + JITTER) + TIMEOUT + PASS,
    )
}

/// A run's settings.
#[derive(Clone, Debug)]
pub struct Options {
    pub seed: u64,
    pub length: Duration,
    /// Long-lived TCP connections per TCP service (two services).
    pub long_lived: usize,
    /// New TCP connections a second, over both TCP services.
    pub new_per_s: f64,
    /// UDP flows per UDP service (two services).
    pub udp_flows: usize,
    /// A fault kind (`Fault::kind`) whose disturbances the judge is not told of, so the
    /// failures it causes count as failures: the proof that the invariants catch one.
    pub unexcused: Option<&'static str>,
}

impl Options {
    pub fn new(seed: u64, length: Duration) -> Self {
        Self {
            seed,
            length,
            long_lived: 120,
            new_per_s: 50.0,
            udp_flows: 20,
            unexcused: None,
        }
    }
}

/// When a backend was out of a service, or out of all of them, and how long after it came back
/// failures it caused may still show.
#[derive(Clone, Debug)]
struct Disturbance {
    backend: String,
    /// `None`: every service (a stopped server, a downed link).
    service: Option<String>,
    /// What a new connection to it sees: refused (a stopped server), no answer (a downed
    /// link), or nothing (out of the service: no new flow goes there).
    cause: Cause,
    from: Duration,
    until: Option<Duration>,
    grace: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Cause {
    Stopped,
    Link,
    Out,
}

/// One fault as it ran.
#[derive(Clone, Debug)]
pub struct Done {
    pub at: Duration,
    pub took: Duration,
    pub fault: Fault,
    pub error: Option<String>,
}

/// What a run saw and what it found wrong.
#[derive(Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub length: Duration,
    pub timeline: Vec<Done>,
    pub figures: Vec<String>,
    pub violations: Vec<String>,
}

impl Report {
    /// Ok, or the violations, the seed and the timeline to replay them, as one message.
    pub fn verdict(&self) -> std::result::Result<(), String> {
        if self.violations.is_empty() {
            return Ok(());
        }
        let mut text = format!(
            "chaos run failed: seed={} length={}s ({} violations; replay: cargo xtask chaos --minutes N --seed {}, or LB_CHAOS_SEED={} LB_CHAOS_SECONDS={})\n",
            self.seed,
            self.length.as_secs(),
            self.violations.len(),
            self.seed,
            self.seed,
            self.length.as_secs()
        );
        for v in self.violations.iter().take(40) {
            let _ = writeln!(text, "  violation: {v}");
        }
        text.push_str(&self.summary());
        text.push_str("fault timeline:\n");
        for d in &self.timeline {
            let _ = writeln!(
                text,
                "  {:>7.2}s {:<55} took {:>5} ms{}",
                d.at.as_secs_f64(),
                d.fault.to_string(),
                d.took.as_millis(),
                d.error
                    .as_ref()
                    .map(|e| format!("  ERROR: {e}"))
                    .unwrap_or_default()
            );
        }
        Err(text)
    }

    /// The figures and faults per kind, a line each.
    pub fn summary(&self) -> String {
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for d in &self.timeline {
            *kinds.entry(d.fault.kind()).or_default() += 1;
        }
        let mut text = format!(
            "chaos: seed={} length={}s faults={} ({})\n",
            self.seed,
            self.length.as_secs(),
            self.timeline.len(),
            kinds
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for f in &self.figures {
            let _ = writeln!(text, "  {f}");
        }
        text
    }
}

/// The lab, the daemon and the run's own state.
struct Run<'a> {
    topo: &'a mut Topology,
    daemon: &'a mut Daemon,
    opts: Options,
    start: Instant,
    model: Model,
    /// (service, backend) pairs out of a service or at weight 0, as the model has them.
    out: BTreeSet<(String, String)>,
    disturbances: Vec<Disturbance>,
    /// When the daemon was down: from its SIGKILL to its socket answering again.
    restarts: Vec<(Duration, Duration)>,
    /// The build `UpgradeProgram` switches to and from (`lb-flow-v2`), if there is one.
    second_build: Option<std::path::PathBuf>,
    timeline: Vec<Done>,
    violations: Vec<String>,
    /// The pool's free space (with second chance) after a clean start.
    pool_free: u64,
    /// The same, as first seen for each set of services (strategies, members, weights): a
    /// table's size depends on them, so the same set must find the same free space again.
    pool_seen: BTreeMap<String, u64>,
}

/// Runs the chaos schedule of `opts` in a fresh lab; the report says what held and what did not.
/// The faults a run of `length` with `seed` meets (`upgrades`: a second build is there).
pub fn faults(seed: u64, length: Duration, upgrades: bool) -> Vec<Step> {
    let lab = Lab {
        services: &SERVICES,
        members: &MEMBERS,
        spare: SPARE,
        upgrades,
    };
    schedule::schedule(seed, length, Duration::from_secs(5), &lab)
}

/// The build `UpgradeProgram` switches to and from, if it was built.
pub fn second_build() -> Option<std::path::PathBuf> {
    let second = crate::lb_flow_v2_bin();
    second.exists().then_some(second)
}

pub fn run(opts: Options) -> Result<Report> {
    let mut topo = Topology::new(MEMBERS.len() + 1).context("topology")?;
    let (instance, run_dir) = Daemon::new_paths();
    let model = Model::new(&SERVICES, &MEMBERS);
    let text = config(&topo, &instance, &run_dir, &model);
    // A link taken down would lose its IPv6 addresses (and their routes) for good, which a
    // link that comes back up on a real host keeps.
    for b in MEMBERS.iter().chain([&SPARE]) {
        topo.backend(b)
            .ns
            .sh("sysctl -qw net.ipv6.conf.eth0.keep_addr_on_down=1")?;
    }
    let mut daemon = Daemon::start(&topo, &instance, &run_dir, &text).context("daemon starts")?;
    daemon.wait_all_in_tables();
    let second_build = second_build();
    if second_build.is_none() {
        println!(
            "chaos: no second build at {} (`cargo xtask test` and `cargo xtask chaos` make it): program upgrades not scheduled",
            crate::lb_flow_v2_bin().display()
        );
    }
    let mut run = Run {
        second_build,
        pool_free: pool_free(&daemon)?,
        topo: &mut topo,
        daemon: &mut daemon,
        out: out_of(&model),
        model,
        opts,
        start: Instant::now(),
        disturbances: Vec::new(),
        restarts: Vec::new(),
        timeline: Vec::new(),
        violations: Vec::new(),
        pool_seen: BTreeMap::new(),
    };
    run.go()
}

impl Run<'_> {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn go(&mut self) -> Result<Report> {
        let steps = faults(self.opts.seed, self.opts.length, self.second_build.is_some());
        // The spare starts in no service: out of each, since the start.
        for (service, backend) in self.out.clone() {
            self.disturb(&service, &backend);
        }
        let stats_before = self.daemon.json(&["stats"]);
        let shared = Shared::new(self.start);
        let tcp = vec![target("web4", IpAddr::V4(VIP4)), target("web6", IpAddr::V6(VIP6))];
        let udp = vec![target("dns4", IpAddr::V4(VIP4)), target("dns6", IpAddr::V6(VIP6))];
        let mut threads = Vec::new();
        {
            let (s, t, n) = (shared.clone(), tcp.clone(), self.opts.long_lived);
            threads.push(spawn_in(&self.topo.client, "chaos-long", move || {
                traffic::long_lived(s, t, n)
            }));
        }
        for i in 0..2 {
            let (s, t, rate) = (shared.clone(), tcp.clone(), self.opts.new_per_s / 2.0);
            let t: Vec<Target> = t.into_iter().cycle().skip(i).take(2).collect();
            threads.push(spawn_in(&self.topo.client, "chaos-new", move || {
                traffic::new_connections(s, t, rate)
            }));
        }
        {
            let (s, t, n) = (shared.clone(), udp.clone(), self.opts.udp_flows);
            threads.push(spawn_in(&self.topo.client, "chaos-udp", move || {
                traffic::udp_flows(s, t, n)
            }));
        }

        let end = self.opts.length;
        let mut next_check = Duration::from_secs(2);
        let mut pending = steps.into_iter().peekable();
        while self.now() < end {
            let now = self.now();
            if let Some(step) = pending.next_if(|s| s.at <= now) {
                self.fault(step.fault);
            } else if now >= next_check {
                self.check(&shared);
                next_check = self.now() + Duration::from_secs(2);
            } else {
                let next = pending.peek().map_or(end, |s| s.at).min(next_check).min(end);
                std::thread::sleep(next.saturating_sub(now).min(Duration::from_millis(50)));
            }
        }
        shared.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in threads {
            t.join()
                .map_err(|_| anyhow::anyhow!("a traffic thread panicked"))?;
        }
        let run_end = self.now();
        self.close_disturbances(run_end);
        // The checks read the flow tables with this build's layout: back from the second build.
        if self.daemon.bin() != crate::lb_bin() {
            self.daemon.restart_as(&self.topo.lb, &crate::lb_bin())?;
        }
        // The remaining failed connections' backends, while the tables still hold their tuples.
        self.look_up(&shared);
        self.final_checks(&shared, &stats_before)?;
        Ok(self.report(&shared, run_end))
    }

    /// Runs one fault and records it (a fault that fails is a violation: it says why).
    fn fault(&mut self, fault: Fault) {
        let at = self.now();
        let known = self.disturbances.len();
        let result = self.apply(&fault);
        if self.opts.unexcused == Some(fault.kind()) {
            self.disturbances.truncate(known);
        }
        let took = self.now() - at;
        if let Fault::KillDaemon | Fault::UpgradeProgram = fault {
            self.restarts.push((at, at + took));
        }
        if let Err(e) = &result {
            self.violations
                .push(format!("{:.2}s: {fault} failed: {e:#}", at.as_secs_f64()));
        }
        self.timeline.push(Done {
            at,
            took,
            fault,
            error: result.err().map(|e| format!("{e:#}")),
        });
    }

    fn apply(&mut self, fault: &Fault) -> Result<()> {
        let grace = detection_window();
        match fault {
            Fault::StopServer(b) => {
                self.open(b, None, Cause::Stopped);
                self.topo.stop_servers(b);
            }
            Fault::StartServer(b) => {
                self.topo.start_servers(b);
                self.close(b, None, grace);
            }
            Fault::LinkDown(b) => {
                self.open(b, None, Cause::Link);
                self.topo.backend(b).ns.sh("ip link set eth0 down")?;
            }
            Fault::LinkUp(b) => {
                self.topo.backend(b).ns.sh("ip link set eth0 up")?;
                self.close(b, None, grace);
            }
            Fault::Remove { service, backend } => {
                self.model_change(fault);
                cli(self.daemon, &["backend", "remove", service, backend])?;
            }
            Fault::Add { service, backend } => {
                let address = self.address(service, backend);
                cli(
                    self.daemon,
                    &[
                        "backend",
                        "add",
                        service,
                        backend,
                        "--address",
                        &address,
                        "--weight",
                        "100",
                    ],
                )?;
                self.model_change(fault);
            }
            Fault::Weight {
                service,
                backend,
                weight,
            } => {
                // Out before the change lands; back in after it has.
                if *weight == 0 {
                    self.model_change(fault);
                }
                cli(
                    self.daemon,
                    &["backend", "weight", service, backend, &weight.to_string()],
                )?;
                self.model_change(fault);
            }
            Fault::Strategy { service, strategy } => {
                cli(self.daemon, &["service", "strategy", service, strategy])?;
                self.model_change(fault);
            }
            Fault::Reload { .. } => {
                let mut model = self.model.clone();
                model.apply(fault);
                let text = config(self.topo, &self.daemon.instance, &self.daemon.run_dir, &model);
                std::fs::write(&self.daemon.config, text)?;
                cli(self.daemon, &["reload"])?;
                self.model_change(fault);
            }
            Fault::KillDaemon => {
                self.daemon.restart(self.topo)?;
            }
            Fault::UpgradeProgram => {
                // To the other build and back, in turn: each start migrates the flow tables
                // and replaces the program under the pinned links, with traffic running.
                let plain = crate::lb_bin();
                let other = self.second_build.clone().context("no second build")?;
                let to = if self.daemon.bin() == plain { other } else { plain };
                self.daemon.restart_as(&self.topo.lb, &to)?;
                let status = self.daemon.try_cli(&["--json", "status"])?;
                let status: serde_json::Value = serde_json::from_str(&status)?;
                if status["upgrade"].is_null() {
                    bail!("the start from {} says no upgrade: {status}", to.display());
                }
            }
        }
        Ok(())
    }

    /// Applies a change to the model and opens or closes the disturbances it makes: a backend
    /// out of a service (removed, weight 0) is disturbed there until it is back in.
    fn model_change(&mut self, fault: &Fault) {
        self.model.apply(fault);
        let now_out = out_of(&self.model);
        for (s, b) in now_out.difference(&self.out).cloned().collect::<Vec<_>>() {
            self.disturb(&s, &b);
        }
        for (s, b) in self.out.difference(&now_out).cloned().collect::<Vec<_>>() {
            self.close(&b, Some(&s), Duration::from_secs_f64(PASS));
        }
        self.out = now_out;
    }

    fn disturb(&mut self, service: &str, backend: &str) {
        self.open(backend, Some(service), Cause::Out);
    }

    fn open(&mut self, backend: &str, service: Option<&str>, cause: Cause) {
        let from = self.now();
        self.disturbances.push(Disturbance {
            backend: backend.into(),
            service: service.map(str::to_string),
            cause,
            from,
            until: None,
            grace: Duration::ZERO,
        });
    }

    fn close(&mut self, backend: &str, service: Option<&str>, grace: Duration) {
        let now = self.now();
        for d in self
            .disturbances
            .iter_mut()
            .filter(|d| d.until.is_none() && d.backend == backend && d.service.as_deref() == service)
        {
            d.until = Some(now);
            d.grace = grace;
        }
    }

    fn close_disturbances(&mut self, end: Duration) {
        for d in self.disturbances.iter_mut().filter(|d| d.until.is_none()) {
            d.until = Some(end);
        }
    }

    fn excused(&self, service: &str, backend: &str, from: Duration, to: Duration) -> bool {
        excused(
            &self.disturbances,
            &self.restarts,
            service,
            Backend::Known(backend),
            from,
            to,
        )
    }

    fn address(&self, service: &str, backend: &str) -> String {
        let b = self.topo.backend(backend);
        if service.ends_with('4') {
            b.v4.to_string()
        } else {
            b.v6.to_string()
        }
    }

    /// The checks while the faults run: the pool's free space, active-flow counts not
    /// negative, and the backends of new connections that failed (while their tuples are in
    /// the tables).
    fn check(&mut self, shared: &Arc<Shared>) {
        let at = self.now().as_secs_f64();
        match pool_reading(self.daemon) {
            Ok(Some((key, free))) => match self.pool_seen.get(&key).copied() {
                Some(seen) if free != seen => {
                    // A change may be in flight, or a released region cooling: let it settle.
                    // The services changing meanwhile (a health verdict) ends the comparison.
                    let settled = wait_until(
                        Duration::from_secs(3),
                        || matches!(pool_reading(self.daemon), Ok(Some((k, f))) if k != key || f == seen),
                    );
                    if !settled {
                        self.violations.push(format!(
                            "{at:.2}s: the table pool's free space (and second chance) is {free}, {seen} when the services were the same before"
                        ));
                    }
                }
                None => {
                    // The first time: kept once two readings half a second apart agree.
                    std::thread::sleep(Duration::from_millis(500));
                    if pool_reading(self.daemon).is_ok_and(|r| r == Some((key.clone(), free))) {
                        self.pool_seen.insert(key, free);
                    }
                }
                Some(_) => {}
            },
            // The services changed while they were read: nothing to compare.
            Ok(None) => {}
            Err(e) => self.violations.push(format!("{at:.2}s: status: {e:#}")),
        }
        for (service, backend, n) in active_flows(self.daemon) {
            if n < 0 {
                self.violations
                    .push(format!("{at:.2}s: {service}/{backend} has {n} active flows"));
            }
        }
        self.look_up(shared);
    }

    /// Asks the daemon which backend each failed new connection's tuple was pinned to (its
    /// connection or embryonic table's entry), while the tables still hold them.
    fn look_up(&mut self, shared: &Arc<Shared>) {
        let todo: Vec<(usize, traffic::Refused)> = {
            let t = shared.tally.lock().unwrap_or_else(|p| p.into_inner());
            t.new_failed
                .iter()
                .enumerate()
                .filter(|(_, r)| r.backend.is_none())
                .map(|(i, r)| (i, r.clone()))
                .collect()
        };
        for (i, r) in todo {
            let mut src = r.src;
            if src.ip().is_unspecified() {
                src.set_ip(if src.is_ipv4() {
                    IpAddr::V4(CLIENT4)
                } else {
                    IpAddr::V6(CLIENT6)
                });
            }
            let out = cli_json(
                self.daemon,
                &[
                    "lookup",
                    "--protocol",
                    "tcp",
                    "--src",
                    &src.to_string(),
                    "--dst",
                    &r.dst.to_string(),
                ],
            );
            let backend = out.ok().and_then(|v| {
                matches!(v["source"].as_str(), Some("connection-table" | "embryonic-table"))
                    .then(|| v["backend"].as_str().map(str::to_string))
                    .flatten()
            });
            shared.tally.lock().unwrap_or_else(|p| p.into_inner()).new_failed[i].backend = Some(backend);
        }
    }

    /// After the traffic stopped and every connection closed: the pool back to a clean start's,
    /// each active-flow count what the tables count, and the counters against what was sent.
    fn final_checks(&mut self, shared: &Arc<Shared>, before: &serde_json::Value) -> Result<()> {
        // The FINs of the closed connections take them off their counts: the counts settle
        // on what the tables hold. A count that drifted under the churn (a flow gone without a
        // FIN: an eviction, a flow that closed while a restart or upgrade copied the tables)
        // is the census's to correct, and it corrects a count only in a walk it stays still
        // through (docs/strategies.md): so within a census interval and a walk of the quiet.
        let mut last = String::new();
        let ok = wait_until(Duration::from_secs(25), || {
            match active_against_tables(self.daemon) {
                Ok(diff) if diff.is_empty() => true,
                Ok(diff) => {
                    last = diff.join("; ");
                    false
                }
                Err(e) => {
                    last = format!("{e:#}");
                    false
                }
            }
        });
        if !ok {
            self.violations
                .push(format!("end: active-flow counts differ from the tables: {last}"));
        }
        for (service, backend, n) in active_flows(self.daemon) {
            if n < 0 {
                self.violations
                    .push(format!("end: {service}/{backend} has {n} active flows"));
            }
        }
        let after = self.daemon.json(&["stats"]);
        let t = shared.tally.lock().unwrap_or_else(|p| p.into_inner());
        let svc = |stats: &serde_json::Value, name: &str, key: &str| -> u64 {
            stats["services"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["name"] == name)
                .and_then(|s| s[key].as_u64())
                .unwrap_or(0)
        };
        for service in ["dns4", "dns6"] {
            let counted = svc(&after, service, "packets") - svc(before, service, "packets");
            let sent = t.udp_sent.get(service).copied().unwrap_or(0);
            if counted != sent {
                self.violations.push(format!(
                    "end: {service} counted {counted} packets, the flows sent {sent} datagrams"
                ));
            }
        }
        for service in ["web4", "web6"] {
            let packets = svc(&after, service, "packets") - svc(before, service, "packets");
            let flows = svc(&after, service, "new_flows") - svc(before, service, "new_flows");
            let opened = t.new_ok.get(service).copied().unwrap_or(0)
                + t.new_failed.iter().filter(|r| r.service == service).count() as u64;
            let asks = t.long_asks.get(service).copied().unwrap_or(0);
            // Each connection sent at least a SYN, an ACK and its question; each ask a segment.
            if packets < asks + 3 * t.new_ok.get(service).copied().unwrap_or(0) || flows < opened {
                self.violations.push(format!(
                    "end: {service} counted {packets} packets and {flows} new flows; the clients sent {asks} asks on long-lived connections and opened {opened} connections"
                ));
            }
        }
        drop(t);
        // Back to the first file: the pool must be as a clean start of it left it.
        let first = Model::new(&SERVICES, &MEMBERS);
        std::fs::write(
            &self.daemon.config,
            config(self.topo, &self.daemon.instance, &self.daemon.run_dir, &first),
        )?;
        cli(self.daemon, &["reload"])?;
        // A change made through the API since the last reload stays over a reload of a file
        // that says what it said (docs/config.md): put those back through the API.
        for s in cli_json(self.daemon, &["service", "list"])?
            .as_array()
            .into_iter()
            .flatten()
        {
            let name = s["name"].as_str().unwrap_or_default();
            if s["strategy"] != "maglev" {
                cli(self.daemon, &["service", "strategy", name, "maglev"])?;
            }
            for b in s["backends"].as_array().into_iter().flatten() {
                if b["weight"] != 100 {
                    let id = b["id"].as_str().unwrap_or_default();
                    cli(self.daemon, &["backend", "weight", name, id, "100"])?;
                }
            }
        }
        let settled = wait_until(Duration::from_secs(10), || {
            pool_free(self.daemon).is_ok_and(|f| f == self.pool_free)
        });
        if !settled {
            self.violations.push(format!(
                "end: back to the first file, the table pool's free space (and second chance) is {}, a clean start's {}",
                pool_free(self.daemon)?,
                self.pool_free
            ));
        }
        for (name, value) in after["counters"].as_object().into_iter().flatten() {
            let moved = value.as_u64().unwrap_or(0) - before["counters"][name].as_u64().unwrap_or(0);
            // A health check through the data path to a slot just removed, or whose next hop
            // a downed link took, is dropped as drop_check_no_target: the check's failure, not
            // the traffic's (seed 31, 30 minutes: once in 825 faults).
            if name.starts_with("drop_") && name != "drop_check_no_target" && moved > 0 {
                self.violations.push(format!(
                    "end: {name} moved by {moved} (nothing this traffic sends is to be dropped)"
                ));
            }
        }
        Ok(())
    }

    fn report(&mut self, shared: &Arc<Shared>, run_end: Duration) -> Report {
        let t = shared.tally.lock().unwrap_or_else(|p| p.into_inner());
        let mut v = std::mem::take(&mut self.violations);
        let judge = |broken: &[traffic::Broken], what: &str, v: &mut Vec<String>| -> usize {
            let mut excused = 0;
            for b in broken {
                if self.excused(b.service, &b.backend, b.since, b.at) {
                    excused += 1;
                } else {
                    v.push(format!(
                        "{:.2}s: a {what} of {} on {} (since {:.2}s) failed, its backend healthy and in the service: {}",
                        b.at.as_secs_f64(),
                        b.service,
                        b.backend,
                        b.since.as_secs_f64(),
                        b.why
                    ));
                }
            }
            excused
        };
        let long_excused = judge(&t.long_broken, "long-lived connection", &mut v);
        let udp_excused = judge(&t.udp_broken, "UDP flow", &mut v);
        let ok: u64 = t.new_ok.values().sum();
        let (mut n_excused, mut unattributed, mut failed) = (0u64, 0u64, Vec::new());
        for r in &t.new_failed {
            let backend = match &r.backend {
                Some(Some(b)) => Backend::Known(b),
                _ => {
                    unattributed += 1;
                    // The error says which outage it could be: a refusal a stopped server's
                    // (and a reset: the connections in its accept queue when it closed its
                    // listener, whose table entries the reset took), a timeout a downed link's.
                    if r.why.contains("refused") || r.why.contains("reset by peer") {
                        Backend::Unknown(Cause::Stopped)
                    } else if r.why.contains("timed out") || r.why.contains("Resource temporarily") {
                        Backend::Unknown(Cause::Link)
                    } else {
                        failed.push(r);
                        continue;
                    }
                }
            };
            if excused(
                &self.disturbances,
                &self.restarts,
                r.service,
                backend,
                r.started,
                r.at,
            ) {
                n_excused += 1;
            } else {
                failed.push(r);
            }
        }
        let judged = ok + failed.len() as u64;
        let rate = ok as f64 / judged.max(1) as f64;
        if rate < 0.999 {
            v.push(format!(
                "new connections {:.3}% successful ({ok} of {judged}), under 99.9%; failed: {}",
                rate * 100.0,
                failed
                    .iter()
                    .take(40)
                    .map(|r| format!(
                        "{:.2}s {} {} -> {} ({}): {}",
                        r.at.as_secs_f64(),
                        r.service,
                        r.src,
                        r.dst,
                        r.backend.clone().flatten().unwrap_or_else(|| "no entry".into()),
                        r.why
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
        let sum = |m: &BTreeMap<&'static str, u64>| m.values().sum::<u64>();
        let figures = vec![
            format!(
                "long-lived TCP: {} per service on 2 services, at least {} open at any time after the first {} were; {} opened in all; {} asks, {} answered; {} failed ({} excused)",
                self.opts.long_lived,
                t.long_open_min_after_start.unwrap_or(0),
                2 * self.opts.long_lived,
                t.long_opened,
                sum(&t.long_asks),
                sum(&t.long_answers),
                t.long_broken.len(),
                long_excused
            ),
            format!(
                "new TCP connections: {ok} succeeded, {} failed ({n_excused} excused: their backend within its detection window; {unattributed} with no live table entry left, judged by their error); {:.3}% of {judged} successful",
                t.new_failed.len(),
                rate * 100.0
            ),
            format!(
                "UDP: {} flows per service on 2 services, {} datagrams sent, {} answered; {} failures ({} excused)",
                self.opts.udp_flows,
                sum(&t.udp_sent),
                sum(&t.udp_answers),
                t.udp_broken.len(),
                udp_excused
            ),
            format!(
                "served per backend: {}; run {:.1}s, detection window {} ms",
                t.served
                    .iter()
                    .map(|(b, n)| format!("{b} {n}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                run_end.as_secs_f64(),
                detection_window().as_millis()
            ),
        ];
        Report {
            seed: self.opts.seed,
            length: self.opts.length,
            timeline: std::mem::take(&mut self.timeline),
            figures,
            violations: v,
        }
    }
}

/// The backend a failed flow had: known, or for a new connection whose tuple the tables no
/// longer pin to a live backend, only what the client saw (refused: a stopped server; no
/// answer: a downed link).
#[derive(Clone, Copy)]
enum Backend<'a> {
    Known(&'a str),
    Unknown(Cause),
}

/// Whether a failure of a flow of `service` on `backend`, alive from `from` to `to`, is
/// excused: the backend was out of that service, or down, during that time, or within its grace
/// after (the detection window after an outage; longer if the daemon was down meanwhile, since
/// its checks were too).
fn excused(
    disturbances: &[Disturbance],
    restarts: &[(Duration, Duration)],
    service: &str,
    backend: Backend,
    from: Duration,
    to: Duration,
) -> bool {
    disturbances.iter().any(|d| {
        let mine = match backend {
            Backend::Known(b) => d.backend == b,
            Backend::Unknown(cause) => d.cause == cause,
        };
        if !mine || d.service.as_deref().is_some_and(|s| s != service) {
            return false;
        }
        let mut until = d.until.unwrap_or(Duration::MAX).saturating_add(d.grace);
        for &(down, up) in restarts {
            if down <= until && up >= d.from {
                until = until.max(up + detection_window());
            }
        }
        d.from <= to && from <= until
    })
}

/// (service, backend) pairs out of their service, or at weight 0, of every backend the lab has.
fn out_of(model: &Model) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (service, (_, members)) in &model.services {
        for b in MEMBERS.iter().chain([&SPARE]) {
            if members.get(*b).is_none_or(|&w| w == 0) {
                out.insert((service.clone(), b.to_string()));
            }
        }
    }
    out
}

/// The config file for `model`: the four services, DSR, checks through the VIP.
pub fn config(topo: &Topology, instance: &str, run_dir: &std::path::Path, model: &Model) -> String {
    let mut text = format!(
        "[daemon]\ninstance = \"{instance}\"\ninterfaces = [\"eth0\"]\nxdp_mode = \"native\"\nrun_dir = \"{}\"\nconntrack_size = 65536\ntable_pool_slots = 1048576\nneighbour_refresh_ms = 500\n",
        run_dir.display()
    );
    for (name, (strategy, members)) in &model.services {
        let (vip, proto) = match name.as_str() {
            "web4" => (IpAddr::V4(VIP4), "tcp"),
            "dns4" => (IpAddr::V4(VIP4), "udp"),
            "web6" => (IpAddr::V6(VIP6), "tcp"),
            _ => (IpAddr::V6(VIP6), "udp"),
        };
        let kind = if proto == "tcp" {
            "kind = \"tcp\"\n"
        } else {
            "kind = \"udp\"\nsend = \"who\"\n"
        };
        let _ = write!(
            text,
            "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {}\nprotocol = \"{proto}\"\nforwarding = \"dsr\"\nstrategy = \"{strategy}\"\n\n[service.health]\n{kind}through = \"vip\"\ninterval = {INTERVAL}\nfast_interval = {INTERVAL}\ntimeout = {TIMEOUT}\njitter = {JITTER}\nerror_threshold = {THRESHOLD}\nrecovery_threshold = {THRESHOLD}\n",
            crate::topology::PORT
        );
        for (id, weight) in members {
            let b = topo.backend(id);
            let addr = if vip.is_ipv4() {
                IpAddr::V4(b.v4)
            } else {
                IpAddr::V6(b.v6)
            };
            let _ = write!(
                text,
                "\n[[service.backend]]\nid = \"{id}\"\naddress = \"{addr}\"\nweight = {weight}\n"
            );
        }
    }
    text
}

/// `lb <args>`, which must succeed.
fn cli(d: &Daemon, args: &[&str]) -> Result<()> {
    d.try_cli(args).map(drop)
}

/// `lb --json <args>`, parsed.
fn cli_json(d: &Daemon, args: &[&str]) -> Result<serde_json::Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    Ok(serde_json::from_str(&d.try_cli(&all)?)?)
}

/// The pool's free slots, counting those previous tables hold for second chance.
pub fn pool_free(d: &Daemon) -> Result<u64> {
    pool_free_of(&cli_json(d, &["status"])?)
}

/// The same, from a status answer (`lb --json status`, `GET /v1/status`'s data).
pub fn pool_free_of(status: &serde_json::Value) -> Result<u64> {
    let pool = &status["table_pool"];
    match (pool["free"].as_u64(), pool["second_chance"].as_u64()) {
        (Some(free), Some(held)) => Ok(free + held),
        _ => bail!("no table_pool.free and .second_chance in {status}"),
    }
}

/// The services' key (`pool_key`) and the pool's free space as one reading: `None` when the
/// key changed between its two reads around the free space (the two come from separate
/// answers, and a health verdict between them would pair one state's space with another's key).
fn pool_reading(d: &Daemon) -> Result<Option<(String, u64)>> {
    let before = pool_key(d);
    let free = pool_free(d)?;
    Ok((pool_key(d) == before).then_some((before, free)))
}

/// What the tables' sizes follow, as `lb service list` shows it: each service's strategy and
/// table size, and its backends' effective weights (round robin's table holds a backend per
/// weight share, so a backend down shrinks it).
fn pool_key(d: &Daemon) -> String {
    let Ok(list) = cli_json(d, &["service", "list"]) else {
        return String::new();
    };
    let mut key = String::new();
    for s in list.as_array().into_iter().flatten() {
        let _ = write!(key, "{} {} {}:", s["name"], s["strategy"], s["table_size"]);
        for b in s["backends"].as_array().into_iter().flatten() {
            let _ = write!(key, " {}={}", b["id"], b["effective_weight"]);
        }
        key.push('\n');
    }
    key
}

/// Every backend's active-flow count, as `lb service list` shows it.
pub fn active_flows(d: &Daemon) -> Vec<(String, String, i64)> {
    let Ok(list) = cli_json(d, &["service", "list"]) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for s in list.as_array().into_iter().flatten() {
        for b in s["backends"].as_array().into_iter().flatten() {
            if let Some(n) = b["active_flows"].as_i64() {
                out.push((
                    s["name"].as_str().unwrap_or_default().to_string(),
                    b["id"].as_str().unwrap_or_default().to_string(),
                    n,
                ));
            }
        }
    }
    out
}

/// Each backend slot whose active-flow count (`ACTIVE`) differs from the flows the tables count
/// for it (connection-table entries still counted, and embryonic ones not yet expired), read
/// from the daemon's pinned maps.
pub fn active_against_tables(d: &Daemon) -> Result<Vec<String>> {
    use aya::maps::{HashMap, MapData};
    use lb_common::{FlowKey, FlowState, flow};
    let pins = lb_userspace::dataplane::pin_dir(&d.instance);
    let open = |name: &str| -> Result<HashMap<MapData, FlowKey, FlowState>> {
        Ok(lb_userspace::dataplane::open_pinned(&pins.join(name))?.try_into()?)
    };
    let (conntrack, embryonic) = (
        open(lb_common::maps::CONNTRACK)?,
        open(lb_common::maps::EMBRYONIC)?,
    );
    let active = match lb_userspace::dataplane::open_pinned(&pins.join(lb_common::maps::ACTIVE))? {
        aya::maps::Map::Array(data) => lb_userspace::dataplane::active::ActiveCounts::new(data)?,
        _ => bail!("ACTIVE is not an array"),
    };
    // A flow pinned at an earlier generation of its slot belongs to a backend removed since,
    // whose count went with it: it is no one's now (the data plane's and the census's rule).
    let backends: aya::maps::Array<MapData, lb_common::Backend> =
        lb_userspace::dataplane::open_pinned(&pins.join(lb_common::maps::BACKENDS))?.try_into()?;
    let current = |s: &FlowState| {
        backends
            .get(&s.backend, 0)
            .is_ok_and(|b| b.generation == s.generation)
    };
    let mut truth: BTreeMap<u32, i64> = BTreeMap::new();
    for (_, s) in conntrack.iter().flatten() {
        if s.forward & flow::FLOW_COUNTED != 0 && current(&s) {
            *truth.entry(s.backend).or_default() += 1;
        }
    }
    let now = flow::coarse_seconds(lb_userspace::dataplane::clock_ns(libc::CLOCK_MONOTONIC_COARSE));
    for (_, s) in embryonic.iter().flatten() {
        if s.forward & flow::FLOW_COUNTED != 0 && !flow::embryonic_expired(s.opened, now) && current(&s) {
            *truth.entry(s.backend).or_default() += 1;
        }
    }
    Ok((0..active.slots())
        .filter_map(|slot| {
            let (have, want) = (active.get(slot), truth.get(&slot).copied().unwrap_or(0));
            (have != want).then(|| format!("slot {slot}: {have} counted, the tables hold {want}"))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    fn outage(service: Option<&str>, from: f64, until: f64, grace: f64) -> Disturbance {
        Disturbance {
            backend: "b2".into(),
            service: service.map(str::to_string),
            cause: Cause::Stopped,
            from: s(from),
            until: Some(s(until)),
            grace: s(grace),
        }
    }

    #[test]
    fn a_failure_is_excused_only_by_its_own_backends_disturbance_in_its_life() {
        let d = [
            outage(None, 10.0, 12.0, 0.8),
            outage(Some("web4"), 20.0, 25.0, 0.25),
        ];
        // b2 stopped from 10 s to 12 s (+0.8 s): its flows alive then are excused, in any service.
        assert!(excused(&d, &[], "web6", Backend::Known("b2"), s(5.0), s(10.5)));
        assert!(excused(&d, &[], "web4", Backend::Known("b2"), s(12.5), s(13.0)));
        // Another backend's flows, or b2's before or well after, are not.
        assert!(!excused(&d, &[], "web4", Backend::Known("b1"), s(5.0), s(11.0)));
        assert!(!excused(&d, &[], "web4", Backend::Known("b2"), s(1.0), s(9.0)));
        assert!(!excused(&d, &[], "web4", Backend::Known("b2"), s(13.0), s(14.0)));
        // Out of web4 only: web6's b2 flows are not excused.
        assert!(excused(&d, &[], "web4", Backend::Known("b2"), s(21.0), s(22.0)));
        assert!(!excused(&d, &[], "web6", Backend::Known("b2"), s(21.0), s(22.0)));
        // A daemon down during the outage (11–14 s) stretches it: its checks were down too.
        let restarts = [(s(11.0), s(14.0))];
        assert!(excused(
            &d,
            &restarts,
            "web4",
            Backend::Known("b2"),
            s(14.5),
            s(14.6)
        ));
        assert!(!excused(
            &d,
            &restarts,
            "web4",
            Backend::Known("b2"),
            s(16.0),
            s(17.0)
        ));
        // Still open: excused from its start on.
        let open = [Disturbance {
            until: None,
            ..outage(None, 30.0, 0.0, 0.0)
        }];
        assert!(excused(
            &open,
            &[],
            "dns4",
            Backend::Known("b2"),
            s(40.0),
            s(41.0)
        ));
    }
}
