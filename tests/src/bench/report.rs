//! The bench's outputs: a table on stdout, `results.json`, `results.md` (the page that
//! `cargo xtask bench --page` quotes in BENCHMARKS.md) and an SVG of ns per packet per case.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use serde::Serialize;

use super::{
    cluster::ClusterResult,
    control::{MaglevResult, Rss},
    dataplane::{CaseResult, VsKatran},
    discovery::{self, DiscoveryResult},
    e2e::E2eResult,
    health::HealthResult,
    scale::ScaleResult,
    spread::SpreadResult,
};
use crate::svg::Svg;

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    /// MemTotal.
    pub memory_bytes: u64,
    /// The CPU flags say a hypervisor runs this machine.
    pub virtual_machine: bool,
}

impl Machine {
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        };
        let cpu = field("model name").unwrap_or_else(|| "unknown".into());
        let virtual_machine = field("flags").is_some_and(|f| f.split_whitespace().any(|f| f == "hypervisor"));
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .map_or(0, |kib| kib * 1024);
        Self {
            cpu,
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            kernel,
            memory_bytes,
            virtual_machine,
        }
    }
}

/// What was measured when, at which commit: found when the results are written.
#[derive(Debug, Serialize)]
pub struct RunInfo {
    /// The checkout's commit (short hash), if git could tell.
    pub commit: Option<String>,
    /// Tracked files other than the page's own (BENCHMARKS.md, its chart) differ from the commit.
    pub dirty: bool,
    /// When the results were written, UTC: "2026-12-07 01:40".
    pub date_utc: String,
    /// How long the bench process ran, in seconds.
    pub duration_s: Option<f64>,
    /// Katran's commit (`KATRAN_COMMIT` beside its objects), when they were found.
    pub katran_commit: Option<String>,
}

/// The files `cargo xtask bench --page` writes: a change to them does not make a run dirty.
const PAGE_FILES: [&str; 2] = ["BENCHMARKS.md", "docs/bench-dataplane.svg"];

impl RunInfo {
    /// The commit and its state as `cargo xtask bench` found them before it built the bench
    /// (`LB_BENCH_COMMIT`, `LB_BENCH_DIRTY`), else as git finds them now.
    pub fn detect() -> Self {
        let (commit, dirty) = match std::env::var("LB_BENCH_COMMIT") {
            Ok(commit) if !commit.is_empty() => (
                Some(commit),
                std::env::var("LB_BENCH_DIRTY").is_ok_and(|d| d == "1"),
            ),
            _ => {
                let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
                let commit = git(&root, &["rev-parse", "--short=7", "HEAD"]);
                let dirty = git(&root, &["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| {
                    s.lines()
                        .filter_map(|l| l.get(3..))
                        .any(|path| !PAGE_FILES.contains(&path))
                });
                (commit, dirty)
            }
        };
        let katran_commit = super::katran::find_dir()
            .and_then(|dir| std::fs::read_to_string(dir.join("KATRAN_COMMIT")).ok())
            .map(|c| c.trim().chars().take(7).collect());
        Self {
            commit,
            dirty,
            date_utc: utc_minute(SystemTime::now()),
            duration_s: process_age().map(|d| d.as_secs_f64()),
            katran_commit,
        }
    }
}

/// A git command's trimmed stdout in `dir`, `None` if it failed. The bench runs as root in a
/// checkout that may be someone else's, so the directory is declared safe for this command.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let dir = dir.canonicalize().unwrap_or_else(|_| PathBuf::from(dir));
    let out = Command::new("git")
        .arg("-c")
        .arg(format!("safe.directory={}", dir.display()))
        .arg("-C")
        .arg(&dir)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim_end().to_string())
}

/// "YYYY-MM-DD HH:MM" in UTC.
fn utc_minute(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as libc::time_t;
    // SAFETY: gmtime_r writes only the tm it is given; a zeroed tm is a valid value.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::gmtime_r(&secs, &mut tm).is_null() {
            return "unknown".into();
        }
        tm
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min
    )
}

/// How long this process has run: /proc/uptime less its start time (in clock ticks since boot).
fn process_age() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command (which may hold spaces) start after its closing parenthesis;
    // starttime is field 22, the 20th after it.
    let start_ticks: f64 = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| Duration::from_secs_f64((uptime - start_ticks / hz as f64).max(0.0)))
}

/// Everything one run measured; parts that were not run are `None`.
#[derive(Debug, Serialize)]
pub struct Results {
    pub quick: bool,
    pub dataplane: Option<Vec<CaseResult>>,
    /// Our data-plane cases beside Katran's from the same run (empty without ../shared/katran).
    pub vs_katran: Option<Vec<VsKatran>>,
    pub e2e: Option<Vec<E2eResult>>,
    pub maglev: Option<Vec<MaglevResult>>,
    pub table_swap_us: Option<f64>,
    pub table_swap_runs_us: Option<Vec<f64>>,
    pub rss_bytes: Option<u64>,
    pub rss: Option<Rss>,
    /// The daemon at scale (1,024 VIPs, 16,384 backends, 8M connections): start-up, memory,
    /// a change, and per-packet cost beside the small configuration's.
    pub scale: Option<ScaleResult>,
    pub health: Option<HealthResult>,
    /// Busiest backend ÷ mean of long-lived connections, per strategy (`spread`).
    pub spread: Option<Vec<SpreadResult>>,
    /// The tier: a lost node, a change across nodes, a watch to a swap (`cluster`).
    pub cluster: Option<ClusterResult>,
    /// Service discovery at scale: 10,000 instances' heartbeats, an etcd source's bulk change
    /// (`discovery`).
    pub discovery: Option<DiscoveryResult>,
    pub machine: Machine,
}

/// results.json: the run's facts beside its figures.
#[derive(Serialize)]
struct Written<'a> {
    run: &'a RunInfo,
    #[serde(flatten)]
    results: &'a Results,
}

/// The first line of results.md: what made it, so that a copy is not edited by hand.
pub const GENERATED: &str = "<!-- Written by `cargo xtask bench` (tests/src/bench/report.rs) from the run's \
     results.json; `cargo xtask bench --page` copies it into BENCHMARKS.md. Do not edit by hand. -->";

/// The strategies with cases of their own (`tcp4_syn_<name>`, `tcp4_established_<name>`), and
/// how the page names them.
const STRATEGIES: [(&str, &str); 5] = [
    ("round_robin", "round robin"),
    ("weighted_round_robin", "weighted round robin"),
    ("least_connections", "least connections"),
    ("power_of_two", "power of two choices"),
    ("geo", "geo"),
];

impl Results {
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let run = RunInfo::detect();
        let json = dir.join("results.json");
        let written = Written {
            run: &run,
            results: self,
        };
        std::fs::write(&json, serde_json::to_string_pretty(&written)? + "\n")
            .with_context(|| format!("write {}", json.display()))?;
        let md = dir.join("results.md");
        std::fs::write(&md, self.markdown(&run)).with_context(|| format!("write {}", md.display()))?;
        if let Some(cases) = &self.dataplane {
            let svg = dir.join("dataplane.svg");
            std::fs::write(&svg, svg_chart(cases, &self.machine))
                .with_context(|| format!("write {}", svg.display()))?;
        }
        Ok(())
    }

    /// The whole run as Markdown: the run's facts, then a section per part. BENCHMARKS.md quotes
    /// it verbatim (`cargo xtask bench --page`).
    pub fn markdown(&self, run: &RunInfo) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{GENERATED}\n");
        self.md_run(&mut s, run);
        self.md_dataplane(&mut s);
        self.md_e2e(&mut s);
        self.md_control(&mut s);
        self.md_health(&mut s);
        self.md_spread(&mut s);
        self.md_cluster(&mut s);
        self.md_discovery(&mut s);
        while s.ends_with("\n\n") {
            s.pop();
        }
        s
    }

    /// The parts this run left out.
    fn missing_parts(&self) -> Vec<&'static str> {
        [
            ("dataplane", self.dataplane.is_none()),
            ("e2e", self.e2e.is_none()),
            ("control", self.maglev.is_none()),
            ("health", self.health.is_none()),
            ("spread", self.spread.is_none()),
            ("cluster", self.cluster.is_none()),
            ("discovery", self.discovery.is_none()),
        ]
        .into_iter()
        .filter_map(|(part, missing)| missing.then_some(part))
        .collect()
    }

    fn md_run(&self, s: &mut String, run: &RunInfo) {
        let m = &self.machine;
        let _ = writeln!(s, "## This run\n");
        let _ = writeln!(s, "| | |\n|---|---|");
        let _ = writeln!(
            s,
            "| machine | {}, {} {}{}, {:.1} GiB |",
            m.cpu,
            m.cores,
            if m.virtual_machine { "vCPUs" } else { "cores" },
            if m.virtual_machine {
                " (a virtual machine)"
            } else {
                ""
            },
            m.memory_bytes as f64 / GIB
        );
        let _ = writeln!(s, "| kernel | {} |", m.kernel);
        let commit = match (&run.commit, run.dirty) {
            (Some(c), false) => format!("`{c}`"),
            (Some(c), true) => format!("`{c}` with uncommitted changes"),
            (None, _) => "unknown (not a git checkout)".into(),
        };
        let _ = writeln!(s, "| commit | {commit} |");
        let _ = writeln!(s, "| date | {} UTC |", run.date_utc);
        let missing = self.missing_parts();
        let mut how = String::from("`cargo xtask bench");
        if self.quick {
            how.push_str(" --quick");
        }
        how.push('`');
        if self.quick {
            how.push_str(" (short runs, no thresholds)");
        }
        if !missing.is_empty() {
            let _ = write!(how, ", without {}", missing.join(", "));
        }
        if let Some(d) = run.duration_s {
            let _ = write!(
                how,
                "; the bench ran {:.0} min {:02.0} s (the build before it not counted)",
                (d / 60.0).floor(),
                d.floor() % 60.0
            );
        }
        let _ = writeln!(s, "| run | {how} |");
        let _ = writeln!(s, "| medians of | {} |", self.run_counts().join("; "));
        if self.dataplane.is_some() {
            let katran = match (
                &run.katran_commit,
                self.vs_katran.as_ref().is_some_and(|v| !v.is_empty()),
            ) {
                (Some(c), true) => format!("its XDP balancer at commit `{c}`, in this run"),
                (None, true) => "its XDP balancer, in this run".into(),
                (_, false) => "not found (`../shared/katran` or `LB_KATRAN_DIR`): no side-by-side".into(),
            };
            let _ = writeln!(s, "| Katran | {katran} |");
        }
        s.push('\n');
    }

    /// How many runs each part's medians are of.
    fn run_counts(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(c) = self.dataplane.as_ref().and_then(|c| c.first()) {
            out.push(format!(
                "data plane {} runs of {} iterations per case",
                c.runs.len(),
                int(c.repeat as f64)
            ));
        }
        if self.e2e.is_some() {
            // As e2e::run chooses them: 3 rounds of 4 s, one of 0.8 s when quick.
            let (rounds, window) = if self.quick { (1, "0.8 s") } else { (3, "4 s") };
            out.push(format!("end to end {rounds} rounds of {window} per contender"));
        }
        if let Some(r) = self.maglev.as_ref().and_then(|m| m.first()) {
            out.push(format!("control plane {} runs", r.runs.len()));
        }
        if let Some(h) = &self.health {
            out.push(format!(
                "health detection {} runs, a flap {} runs",
                h.detect_refused_runs_ms.len(),
                // As health::run chooses it.
                if self.quick { 3 } else { 7 }
            ));
        }
        if let Some(sc) = &self.scale {
            out.push(format!("a change at scale {} runs", sc.change_runs_ms.len()));
        }
        if let Some(c) = &self.cluster {
            out.push(format!(
                "cluster {} runs per node loss, {} changes",
                c.kill_runs_ms.len(),
                c.change_runs_ms.len()
            ));
        }
        if let Some(d) = &self.discovery {
            out.push(format!(
                "discovery heartbeats over {:.0} s, {} bulk changes in etcd",
                d.heartbeat.window_s,
                d.etcd.converge_runs_ms.len()
            ));
        }
        out
    }

    fn md_dataplane(&self, s: &mut String) {
        let Some(cases) = &self.dataplane else {
            return;
        };
        let _ = writeln!(s, "## 1. Data plane: ns per packet (BPF_PROG_TEST_RUN)\n");
        let floor = cases.first().map_or(0.0, |c| c.floor_ns_per_packet);
        let _ = writeln!(
            s,
            "Median of each case's runs; × floor is the case ÷ this run's `floor` ({floor:.0} ns). \
             A target is the issue's, where it sets one.\n"
        );
        let _ = writeln!(s, "| case | ns/packet (median) | × floor | target | runs (ns) |");
        let _ = writeln!(s, "|---|---:|---:|---:|---|");
        for c in cases {
            let target = c
                .target_ns
                .map(|t| format!("≤ {t:.0} {}", if c.ns_per_packet <= t { "met" } else { "missed" }))
                .unwrap_or_default();
            let runs: Vec<String> = c.runs.iter().map(|&r| int(r as f64)).collect();
            let _ = writeln!(
                s,
                "| `{}` | {} | {:.2} | {target} | {} |",
                c.case,
                int(c.ns_per_packet),
                c.ratio_to_floor,
                runs.join(", ")
            );
        }
        s.push('\n');
        if let Some(vs) = self.vs_katran.as_ref().filter(|v| !v.is_empty()) {
            let _ = writeln!(s, "### Against Katran, same run\n");
            let _ = writeln!(
                s,
                "Ours ÷ Katran's ns per packet (below 1: ours is faster); \"above floor\" takes this \
                 run's floor off both. \"Same\" work: our IPIP against Katran's IPIP; \"less\": our \
                 L2 DSR (a MAC rewrite) against Katran's IPIP.\n"
            );
            let _ = writeln!(
                s,
                "| ours | Katran | work | ours ns | Katran ns | ours ÷ Katran | above floor | goal |"
            );
            let _ = writeln!(s, "|---|---|---|---:|---:|---:|---:|---|");
            for v in vs {
                let _ = writeln!(
                    s,
                    "| `{}` | `{}` | {} | {} | {} | {:.2} | {:.2} | {} |",
                    v.case,
                    v.katran_case,
                    if v.work == "same" {
                        "same (IPIP)"
                    } else {
                        "less (DSR)"
                    },
                    int(v.ours),
                    int(v.katran),
                    v.ratio,
                    v.ratio_above_floor,
                    goal_cell(v)
                );
            }
            s.push('\n');
        }
        self.md_strategies(s, cases);
        self.md_scale(s);
    }

    /// Each strategy's new-flow and established cases beside Maglev's, from the same run.
    fn md_strategies(&self, s: &mut String, cases: &[CaseResult]) {
        let ns = |name: &str| cases.iter().find(|c| c.case == name).map(|c| c.ns_per_packet);
        let (Some(syn), Some(est)) = (ns("tcp4_syn"), ns("tcp4_established")) else {
            return;
        };
        let rows: Vec<_> = STRATEGIES
            .iter()
            .filter_map(|(key, name)| {
                Some((
                    name,
                    ns(&format!("tcp4_syn_{key}"))?,
                    ns(&format!("tcp4_established_{key}"))?,
                ))
            })
            .collect();
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(s, "### Strategies, same run\n");
        let _ = writeln!(
            s,
            "Each strategy's own service (the same 100 backends) beside Maglev's cases: a new flow \
             (a SYN, a real insert into the full connection table) and an established one.\n"
        );
        let _ = writeln!(
            s,
            "| strategy | new flow ns | ÷ Maglev's (`tcp4_syn` {syn:.0}) | established ns | ÷ Maglev's (`tcp4_established` {est:.0}) |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|");
        for (name, new, established) in rows {
            let _ = writeln!(
                s,
                "| {name} | {} | {:.2} | {} | {:.2} |",
                int(new),
                new / syn,
                int(established),
                established / est
            );
        }
        s.push('\n');
    }

    fn md_scale(&self, s: &mut String) {
        let Some(sc) = &self.scale else {
            return;
        };
        let _ = writeln!(
            s,
            "### Scale: {} VIPs, {} backends, a connection table of {}\n",
            int(sc.vips as f64),
            int(sc.backends as f64),
            int(sc.conntrack_entries as f64)
        );
        let _ = writeln!(
            s,
            "The real daemon, IPIP to routed backends; its pinned program joins the data-plane run \
             once its connection table is full.\n"
        );
        let _ = writeln!(s, "| what | figure |\n|---|---|");
        let _ = writeln!(
            s,
            "| start to the first packet forwarded (to the last VIP) | {:.2} s |",
            sc.startup_ms / 1000.0
        );
        let largest: Vec<String> = sc
            .maps
            .iter()
            .take(4)
            .map(|m| format!("`{}` {}", m.map, mb(m.bytes)))
            .collect();
        let _ = writeln!(
            s,
            "| kernel memory of the maps (fdinfo `memlock`) | {}; the largest {} |",
            mb(sc.maps_bytes),
            largest.join(", ")
        );
        let _ = writeln!(
            s,
            "| table pool per VIP (its spares shared out) | {} KiB |",
            int(sc.pool_bytes_per_vip as f64 / 1024.0)
        );
        let _ = writeln!(
            s,
            "| daemon RSS | {:.0} MiB, {:.0} MiB of it anonymous |",
            sc.rss_bytes as f64 / MIB,
            sc.rss_anon_bytes as f64 / MIB
        );
        let _ = writeln!(
            s,
            "| one backend weight change, CLI call to applied | {:.0} ms ({}), of which the reconciler's plan and map writes {:.0} ms |",
            sc.change_ms,
            span(&sc.change_runs_ms, 0),
            sc.change_map_write_ms
        );
        let _ = writeln!(
            s,
            "| daemon CPU at idle | {:.0} % of one CPU |",
            100.0 * sc.idle_cpu
        );
        for p in &sc.per_packet {
            let _ = writeln!(
                s,
                "| `{}`, scale ÷ small, same run | {:.2} ({} against {} ns) |",
                p.case,
                p.ratio,
                int(p.scale_ns),
                int(p.small_ns)
            );
        }
        s.push('\n');
    }

    fn md_e2e(&self, s: &mut String) {
        let Some(e2e) = &self.e2e else {
            return;
        };
        let _ = writeln!(
            s,
            "## 2. End to end through veth: lb against nftables and HAProxy\n"
        );
        let _ = writeln!(
            s,
            "Each contender in turn on the same topology; CPU 1 forwards, CPU 0 runs the load and \
             the backends. \"Busy\" is the forwarder's share of CPU 1: well below 100 %, the load \
             side set the rate, and the rate per forwarder CPU-second is the fairer ratio.\n"
        );
        let header = "| lb (DSR) | lb NAT | nftables DNAT | HAProxy | lb / nftables | lb NAT / nftables | lb / HAProxy |";
        let _ = writeln!(s, "| case | unit {header}");
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
        let rate = |v: Option<f64>| v.map_or_else(|| "n/a".into(), int);
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "n/a".into(),
        };
        for r in e2e {
            let _ = writeln!(
                s,
                "| `{}` | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.case,
                r.unit,
                rate(r.lb),
                rate(r.lb_nat),
                rate(r.nftables),
                rate(r.haproxy),
                ratio(r.lb, r.nftables),
                ratio(r.lb_nat, r.nftables),
                ratio(r.lb, r.haproxy)
            );
        }
        s.push('\n');
        let _ = writeln!(s, "| per forwarder CPU-second (busy) {header}");
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|");
        for r in e2e {
            let (p, b) = (&r.per_forwarder_cpu_s, &r.forwarder_busy);
            let cell = |v: Option<f64>, busy: Option<f64>| match (v, busy) {
                (Some(v), Some(b)) => format!("{} ({:.0} %)", int(v), 100.0 * b),
                (Some(v), None) => int(v),
                _ => "n/a".into(),
            };
            let _ = writeln!(
                s,
                "| `{}` | {} | {} | {} | {} | {} | {} | {} |",
                r.case,
                cell(p.lb, b.lb),
                cell(p.lb_nat, b.lb_nat),
                cell(p.nftables, b.nftables),
                cell(p.haproxy, b.haproxy),
                ratio(p.lb, p.nftables),
                ratio(p.lb_nat, p.nftables),
                ratio(p.lb, p.haproxy)
            );
        }
        s.push('\n');
        if !e2e.iter().any(|r| r.case == "udp4_pps") {
            let _ = writeln!(
                s,
                "`udp4_pps` was not measured: the kernel refused the UDP generator's live-frames test \
                 runs (root without CAP_SYS_RESOURCE); the bench logs the reason and runs the TCP case.\n"
            );
        }
    }

    fn md_control(&self, s: &mut String) {
        let Some(maglev) = &self.maglev else {
            return;
        };
        let _ = writeln!(s, "## 3. Control plane\n");
        let _ = writeln!(
            s,
            "Maglev table builds (M slots, N backends), median of {} runs: of equal weight, and of \
             weights spread 1..100 (seeded), each beside its reference build (probing every turn \
             to the end; weighted, its turns from a heap), all interleaved; each table is checked \
             equal to its reference's. The issue's goal for weighted ÷ equal: at most 1.5.\n",
            maglev.first().map_or(0, |r| r.runs.len())
        );
        let _ = writeln!(
            s,
            "| M | N | equal weights (µs) | probing only (µs) | ratio | weighted (µs) | probing only, heap (µs) | weighted ÷ equal |"
        );
        let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in maglev {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.2} | {} | {} | {:.2} |",
                r.m,
                r.n,
                int(r.build_us),
                int(r.probing_us),
                r.build_us / r.probing_us,
                int(r.weighted_us),
                int(r.weighted_probing_us),
                r.weighted_ratio
            );
        }
        s.push('\n');
        let _ = writeln!(s, "| what | figure |\n|---|---|");
        if let Some(us) = self.table_swap_us {
            let runs = self.table_swap_runs_us.as_deref().unwrap_or_default();
            let _ = writeln!(
                s,
                "| write and swap a full table (M = 65537) into the live maps | {us:.1} µs ({}) |",
                span(runs, 1)
            );
        }
        if let Some(rss) = &self.rss {
            let _ = writeln!(
                s,
                "| daemon RSS at idle, {} services × {} backends | {:.1} MiB, {:.1} MiB of it anonymous |",
                rss.services,
                rss.backends_per_service,
                rss.rss_bytes as f64 / MIB,
                rss.rss_anon_bytes as f64 / MIB
            );
            let _ = writeln!(
                s,
                "| one scrape of `/metrics` of that daemon | {:.1} ms ({}) for {} samples |",
                rss.scrape_ms,
                span(&rss.scrape_runs_ms, 1),
                int(rss.scrape_samples as f64)
            );
        }
        s.push('\n');
    }

    fn md_health(&self, s: &mut String) {
        let Some(h) = &self.health else {
            return;
        };
        let (c, f) = (&h.checks, &h.flap);
        let _ = writeln!(s, "## 4. Health\n");
        let _ = writeln!(s, "| what | figure |\n|---|---|");
        let _ = writeln!(
            s,
            "| stopped server → first table without it (through the real daemon) | {:.0} ms ({}) |",
            h.detect_refused_ms,
            span(&h.detect_refused_runs_ms, 0)
        );
        let _ = writeln!(
            s,
            "| pulled link (blackhole) → first table without it | {:.0} ms ({}) |",
            h.detect_blackhole_ms,
            span(&h.detect_blackhole_runs_ms, 0)
        );
        let _ = writeln!(
            s,
            "| checks per second, {} TCP targets at a {} s interval, over {:.0} s | {} /s of {} scheduled ({:.1} %) on {:.2} of one core |",
            int(c.targets as f64),
            c.interval_s,
            c.window_s,
            int(c.checks_per_s),
            int(c.scheduled_per_s),
            100.0 * c.checks_per_s / c.scheduled_per_s,
            c.cpu_cores
        );
        let _ = writeln!(
            s,
            "| one flap, {} services × {} backends, M = {}: plan + the table{} it rebuilds | {:.1} ms |",
            f.services,
            f.backends_per_service,
            f.table_size,
            if f.tables_rebuilt == 1 { "" } else { "s" },
            f.one_flap_us / 1000.0
        );
        let _ = writeln!(
            s,
            "| the same change with every table rebuilt | {:.1} ms: one flap costs {:.0}× less |",
            f.full_rebuild_us / 1000.0,
            f.ratio
        );
        s.push('\n');
    }

    fn md_spread(&self, s: &mut String) {
        let Some(sp) = &self.spread else {
            return;
        };
        let _ = writeln!(s, "## 5. Spread of long-lived connections\n");
        let _ = writeln!(
            s,
            "Real TCP connections with seeded heavy-tailed lifetimes (the same for each strategy) \
             through the balancer to 4 backends; at each step, the busiest backend's open \
             connections ÷ the mean per backend (1 is even).\n"
        );
        let _ = writeln!(
            s,
            "| strategy | connections | open (mean) | busiest ÷ mean (mean over steps) | p95 | worst |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
        for r in sp {
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} | {:.3} | {:.3} | {:.3} |",
                r.strategy,
                int(r.connections as f64),
                r.mean_open,
                r.max_over_mean_avg,
                r.max_over_mean_p95,
                r.max_over_mean_worst
            );
        }
        s.push('\n');
    }

    fn md_cluster(&self, s: &mut String) {
        let Some(c) = &self.cluster else {
            return;
        };
        let _ = writeln!(
            s,
            "## 6. A tier of nodes
"
        );
        let _ = writeln!(
            s,
            "The cluster lab: a router running BIRD 2 with ECMP, three nodes each running `lb \
             daemon` and its BIRD, a real etcd (see docs/cluster.md). Times are read by polling \
             every 20 ms, so each is good to about ±25 ms.\n"
        );
        let _ = writeln!(s, "| what | median | runs (ms) |\n|---|---:|---|");
        for (what, m, runs) in [
            (
                "a node's daemon SIGKILLed, then `lb detach` (BIRD stopped: a dead host) → the router's route without it",
                c.kill_ms,
                &c.kill_runs_ms,
            ),
            (
                "a node's link pulled → route gone, BGP hold time 3 s, no BFD",
                c.link_hold_ms,
                &c.link_hold_runs_ms,
            ),
            (
                "a node's link pulled → route gone, with BFD (100 ms × 3)",
                c.link_bfd_ms,
                &c.link_bfd_runs_ms,
            ),
            (
                "an API change on one node → identical tables holding it on all three",
                c.change_ms,
                &c.change_runs_ms,
            ),
            (
                "etcd's watch answer → the node's tables swapped (every node, every change)",
                c.watch_swap_ms,
                &c.watch_swap_runs_ms,
            ),
        ] {
            let list: Vec<String> = runs.iter().map(|v| format!("{v:.0}")).collect();
            let _ = writeln!(s, "| {what} | {m:.0} ms | {} |", list.join(", "));
        }
        s.push('\n');
    }

    fn md_discovery(&self, s: &mut String) {
        let Some(d) = &self.discovery else {
            return;
        };
        let (h, e) = (&d.heartbeat, &d.etcd);
        let _ = writeln!(s, "## 7. Service discovery at scale\n");
        let _ = writeln!(
            s,
            "The real daemon with {} instances in {} services (a service takes at most 4,096). \
             Heartbeats: each instance registered over the TCP API with a ttl of {} s, then \
             heartbeating every {:.0} s over {} kept-alive connections; CPU is the daemon's, \
             from /proc, per second of wall time (1.0 is one core). The etcd source: the same \
             instances as keys in a real etcd; a bulk change is {} weights in {} transactions, \
             timed from the last transaction's answer to every service's instance watch showing \
             it.\n",
            int(h.instances as f64),
            h.services,
            h.ttl_s,
            h.interval_s,
            h.connections,
            int(e.changed as f64),
            e.txns
        );
        let _ = writeln!(s, "| what | figure | target |\n|---|---|---|");
        let met = |ok: bool| if ok { "met" } else { "missed" };
        let rows = [
            (
                format!("registering {} instances with a ttl", int(h.instances as f64)),
                format!("{:.1} s", h.register_s),
                String::new(),
            ),
            (
                format!("heartbeats answered, over {:.0} s", h.window_s),
                format!(
                    "{} /s of {} scheduled",
                    int(h.heartbeats_per_s),
                    int(h.scheduled_per_s)
                ),
                String::new(),
            ),
            (
                "a heartbeat's latency, p50 / p99 / worst".into(),
                format!(
                    "{:.2} / {:.2} / {:.1} ms",
                    h.latency_p50_ms, h.latency_p99_ms, h.latency_max_ms
                ),
                String::new(),
            ),
            (
                "the daemon's CPU while they heartbeat".into(),
                format!("{:.1} % of one core", h.cpu_cores * 100.0),
                format!(
                    "< {:.0} % {}",
                    discovery::CPU_GOAL * 100.0,
                    met(h.cpu_cores < discovery::CPU_GOAL)
                ),
            ),
            (
                "the same daemon at rest (no heartbeat, 5 s)".into(),
                format!("{:.1} % of one core", h.rest_cpu_cores * 100.0),
                String::new(),
            ),
            (
                format!("etcd source: start to all {} serving", int(e.instances as f64)),
                format!("{:.2} s", e.first_read_ms / 1e3),
                String::new(),
            ),
            (
                "etcd source: the bulk change's last write → every service shows it".into(),
                format!("{} ms ({})", int(e.converge_ms), span(&e.converge_runs_ms, 0)),
                format!(
                    "< {} ms {}",
                    int(discovery::CONVERGE_GOAL_MS),
                    met(e.converge_ms < discovery::CONVERGE_GOAL_MS)
                ),
            ),
        ];
        for (what, figure, target) in rows {
            let _ = writeln!(s, "| {what} | {figure} | {target} |");
        }
        s.push('\n');
    }

    pub fn table(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(s, "machine: {} ({} cores), kernel {}", m.cpu, m.cores, m.kernel);
        if let Some(cases) = &self.dataplane {
            let _ = writeln!(
                s,
                "\ndata plane, BPF_PROG_TEST_RUN through the restoring wrapper (median)"
            );
            let _ = writeln!(
                s,
                "{:<37} {:>8} {:>9} {:>8}  runs (ns)",
                "case", "ns/pkt", "x floor", "target"
            );
            for c in cases {
                let target = c.target_ns.map(|t| {
                    let mark = if c.ns_per_packet <= t { "met" } else { "MISSED" };
                    format!("{t:.0} {mark}")
                });
                let _ = writeln!(
                    s,
                    "{:<37} {:>8.1} {:>9.2} {:>8}  {:?}",
                    c.case,
                    c.ns_per_packet,
                    c.ratio_to_floor,
                    target.unwrap_or_default(),
                    c.runs
                );
            }
        }
        if let Some(vs) = self.vs_katran.as_ref().filter(|v| !v.is_empty()) {
            let _ = writeln!(s, "\nagainst Katran, same run (ns per packet, median)");
            let _ = writeln!(
                s,
                "{:<22} {:<24} {:<5} {:>8} {:>8} {:>7} {:>11}  goal",
                "ours", "katran", "work", "ours", "katran", "ratio", "above floor"
            );
            for v in vs {
                let _ = writeln!(
                    s,
                    "{:<22} {:<24} {:<5} {:>8.1} {:>8.1} {:>7.2} {:>11.2}  {}",
                    v.case,
                    v.katran_case,
                    v.work,
                    v.ours,
                    v.katran,
                    v.ratio,
                    v.ratio_above_floor,
                    goal_cell(v)
                );
            }
        }
        if let Some(e2e) = &self.e2e {
            let _ = writeln!(s, "\nend to end through veth");
            let _ = writeln!(
                s,
                "{:<18} {:<15} {:>12} {:>12} {:>12} {:>12} {:>9} {:>9} {:>11}",
                "case", "unit", "lb", "lb-nat", "nftables", "haproxy", "lb/nft", "lb/hap", "lb-nat/nft"
            );
            for r in e2e {
                let [lb, nat, nft, hap, lb_nft, lb_hap, nat_nft] = e2e_cells(r, "-");
                let _ = writeln!(
                    s,
                    "{:<18} {:<15} {lb:>12} {nat:>12} {nft:>12} {hap:>12} {lb_nft:>9} {lb_hap:>9} {nat_nft:>11}",
                    r.case, r.unit
                );
            }
        }
        if let Some(maglev) = &self.maglev {
            let _ = writeln!(s, "\nMaglev table build (median)");
            let _ = writeln!(
                s,
                "{:>8} {:>6} {:>12} {:>12} {:>12} {:>12} {:>9}",
                "M", "N", "equal µs", "probing µs", "weighted µs", "probing µs", "w ÷ eq"
            );
            for r in maglev {
                let _ = writeln!(
                    s,
                    "{:>8} {:>6} {:>12.0} {:>12.0} {:>12.0} {:>12.0} {:>9.2}",
                    r.m,
                    r.n,
                    r.build_us,
                    r.probing_us,
                    r.weighted_us,
                    r.weighted_probing_us,
                    r.weighted_ratio
                );
            }
        }
        if let Some(us) = self.table_swap_us {
            let _ = writeln!(s, "\ntable write + atomic swap, M = 65537: {us:.0} µs (median)");
        }
        if let Some(rss) = &self.rss {
            let _ = writeln!(
                s,
                "daemon RSS at idle, {} services x {} backends: {:.1} MiB ({:.1} MiB anonymous)\nscrape of /metrics there: {:.1} ms (median of {:?}), {} samples",
                rss.services,
                rss.backends_per_service,
                rss.rss_bytes as f64 / 1048576.0,
                rss.rss_anon_bytes as f64 / 1048576.0,
                rss.scrape_ms,
                rss.scrape_runs_ms
                    .iter()
                    .map(|v| (v * 10.0).round() / 10.0)
                    .collect::<Vec<_>>(),
                rss.scrape_samples
            );
        }
        if let Some(sp) = &self.spread {
            let _ = writeln!(s, "\nspread of long-lived connections (busiest backend ÷ mean)");
            for r in sp {
                let _ = writeln!(
                    s,
                    "{:<20} {:>6.3} (p95 {:.3}, worst {:.3}) over {} connections, {:.1} open on average",
                    r.strategy,
                    r.max_over_mean_avg,
                    r.max_over_mean_p95,
                    r.max_over_mean_worst,
                    r.connections,
                    r.mean_open
                );
            }
        }
        if let Some(h) = &self.health {
            s.push_str("\nhealth\n");
            s.push_str(&health_lines(h, ""));
        }
        if let Some(c) = &self.cluster {
            let _ = writeln!(
                s,
                "\ncluster (median ms): node killed -> route gone {:.0}, link pulled {:.0} (BFD {:.0}), \
                 API change -> identical tables {:.0}, watch -> swap {:.1}",
                c.kill_ms, c.link_hold_ms, c.link_bfd_ms, c.change_ms, c.watch_swap_ms
            );
        }
        if let Some(d) = &self.discovery {
            let (h, e) = (&d.heartbeat, &d.etcd);
            let _ = writeln!(
                s,
                "\ndiscovery: {} instances, registered in {:.1} s; {:.0} heartbeats/s of {:.0} (p50 {:.2} ms, p99 {:.2} ms) \
                 on {:.1}% of a core ({:.1}% at rest); etcd: start -> all serving {:.0} ms, \
                 {} weights -> shown {:.0} ms (median of {:?})",
                h.instances,
                h.register_s,
                h.heartbeats_per_s,
                h.scheduled_per_s,
                h.latency_p50_ms,
                h.latency_p99_ms,
                h.cpu_cores * 100.0,
                h.rest_cpu_cores * 100.0,
                e.first_read_ms,
                e.changed,
                e.converge_ms,
                e.converge_runs_ms.iter().map(|v| v.round()).collect::<Vec<_>>()
            );
        }
        s
    }
}

/// The health figures, one per line.
fn health_lines(h: &HealthResult, bullet: &str) -> String {
    let c = &h.checks;
    let f = &h.flap;
    format!(
        "{bullet}Failed backend to the first table without it (median): refused server {:.0} ms {:?}, blackhole {:.0} ms {:?}.\n\
         {bullet}Checks: {} targets at {} s: {:.0} checks/s of {:.0} scheduled ({:.1}%), {:.2} CPU cores.\n\
         {bullet}One flap, {} services × {} backends, M = {}: {:.0} µs ({} table rebuilt) against {:.0} µs for every table: {:.0}× less.\n",
        h.detect_refused_ms,
        h.detect_refused_runs_ms
            .iter()
            .map(|v| v.round())
            .collect::<Vec<_>>(),
        h.detect_blackhole_ms,
        h.detect_blackhole_runs_ms
            .iter()
            .map(|v| v.round())
            .collect::<Vec<_>>(),
        c.targets,
        c.interval_s,
        c.checks_per_s,
        c.scheduled_per_s,
        100.0 * c.checks_per_s / c.scheduled_per_s,
        c.cpu_cores,
        f.services,
        f.backends_per_service,
        f.table_size,
        f.one_flap_us,
        f.tables_rebuilt,
        f.full_rebuild_us,
        f.ratio,
    )
}

fn goal_cell(v: &VsKatran) -> String {
    v.goal
        .map(|g| format!("≤ {g} {}", if v.ratio <= g { "met" } else { "missed" }))
        .unwrap_or_default()
}

/// An end-to-end row's rates and ratios as text; `none` stands where a figure does not exist.
fn e2e_cells(r: &E2eResult, none: &str) -> [String; 7] {
    let rate = |v: Option<f64>| v.map_or_else(|| none.to_string(), |v| format!("{v:.0}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => none.to_string(),
    };
    [
        rate(r.lb),
        rate(r.lb_nat),
        rate(r.nftables),
        rate(r.haproxy),
        ratio(r.lb, r.nftables),
        ratio(r.lb, r.haproxy),
        ratio(r.lb_nat, r.nftables),
    ]
}

/// A horizontal bar per case, with the floor drawn as a line across every bar.
fn svg_chart(cases: &[CaseResult], machine: &Machine) -> String {
    let (left, bar_h, gap, width) = (150.0, 22.0, 10.0, 720.0);
    let top = 50.0;
    let max = cases
        .iter()
        .map(|c| c.ns_per_packet)
        .fold(1.0, f64::max)
        .max(cases.first().map_or(1.0, |c| c.floor_ns_per_packet));
    let scale = (width - left - 80.0) / max;
    let height = top + cases.len() as f64 * (bar_h + gap) + 40.0;
    let mut s = Svg::new(width, height);
    s.text(
        10.0,
        20.0,
        r#"font-size="15""#,
        "ns per packet (BPF_PROG_TEST_RUN, median); orange: Katran, same run; dashed line: floor",
    );
    s.text(
        10.0,
        38.0,
        r##"fill="#555""##,
        &format!(
            "{} ({} cores), kernel {}",
            machine.cpu, machine.cores, machine.kernel
        ),
    );
    for (i, c) in cases.iter().enumerate() {
        let y = top + i as f64 * (bar_h + gap);
        let w = c.ns_per_packet * scale;
        let fill = if c.case.starts_with("floor") {
            "#999"
        } else if c.case.starts_with("katran_") {
            "#dd6b20"
        } else {
            "#2b6cb0"
        };
        s.text(left - 8.0, y + 16.0, r#"text-anchor="end""#, &c.case);
        s.rect(left, y, w, bar_h, fill);
        s.text(
            left + w + 6.0,
            y + 16.0,
            "",
            &format!("{:.0} ns ({:.2}x)", c.ns_per_packet, c.ratio_to_floor),
        );
    }
    if let Some(floor) = cases.first().map(|c| c.floor_ns_per_packet) {
        let x = left + floor * scale;
        s.line((x, top - 6.0), (x, height - 34.0), "#c53030", Some("4 3"));
    }
    s.finish()
}

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * MIB;

/// A whole number with thousands separators: 1234567.4 → "1,234,567".
fn int(v: f64) -> String {
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(d);
    }
    if v < 0.0 && digits != "0" {
        out.insert(0, '-');
    }
    out
}

/// Bytes as MB (10^6), as the kernel's memlock figures are usually quoted.
fn mb(bytes: u64) -> String {
    let mb = bytes as f64 / 1e6;
    if mb >= 10.0 {
        format!("{} MB", int(mb))
    } else {
        format!("{mb:.1} MB")
    }
}

/// The runs behind a median: "5 runs, 250–326", with `decimals` places.
fn span(runs: &[f64], decimals: usize) -> String {
    let lo = runs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = runs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    match runs.len() {
        0 => "no runs".into(),
        1 => "1 run".into(),
        n => format!("median of {n}, {lo:.decimals$}–{hi:.decimals$}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{
        dataplane::vs_katran,
        discovery::{EtcdResult, HeartbeatResult},
        e2e::PerContender,
        health::{ChecksResult, FlapResult},
        scale::{MapMemory, ScaleVsSmall},
    };

    fn case(name: &str, ns: u64) -> CaseResult {
        CaseResult {
            case: name.into(),
            ns_per_packet: ns as f64,
            floor_ns_per_packet: 40.0,
            ratio_to_floor: ns as f64 / 40.0,
            target_ns: (name == "udp4").then_some(50.0),
            runs: vec![ns, ns + 1, ns - 1, ns + 2, ns],
            repeat: 1_000_000,
        }
    }

    fn per(lb: f64, nat: f64, nft: f64, hap: Option<f64>) -> PerContender {
        PerContender {
            lb: Some(lb),
            lb_nat: Some(nat),
            nftables: Some(nft),
            haproxy: hap,
        }
    }

    fn full() -> Results {
        let cases: Vec<CaseResult> = [
            ("floor", 40),
            ("tcp4_syn", 800),
            ("tcp4_established", 100),
            ("udp4", 110),
            ("tcp4_syn_round_robin", 820),
            ("tcp4_established_round_robin", 101),
            ("tcp4_syn_geo", 1200),
            ("tcp4_established_geo", 105),
            ("katran_tcp4_established", 170),
            ("katran_udp4", 220),
            ("katran_tcp4_syn", 810),
        ]
        .into_iter()
        .map(|(n, ns)| case(n, ns))
        .collect();
        Results {
            quick: false,
            vs_katran: Some(vs_katran(&cases)),
            dataplane: Some(cases),
            e2e: Some(vec![E2eResult {
                case: "tcp4_conn_per_s".into(),
                unit: "connections/s".into(),
                lb: Some(9000.0),
                lb_nat: Some(8000.0),
                nftables: Some(7000.0),
                haproxy: Some(5000.0),
                per_forwarder_cpu_s: per(25000.0, 24000.0, 20000.0, Some(7000.0)),
                forwarder_busy: per(0.32, 0.30, 0.48, Some(0.97)),
            }]),
            maglev: Some(vec![MaglevResult {
                m: 65537,
                n: 100,
                build_us: 670.0,
                runs: vec![670.0; 7],
                probing_us: 917.0,
                probing_runs: vec![917.0; 7],
                weighted_us: 871.0,
                weighted_runs: vec![871.0; 7],
                weighted_probing_us: 2750.0,
                weighted_probing_runs: vec![2750.0; 7],
                weighted_ratio: 1.3,
            }]),
            table_swap_us: Some(2.5),
            table_swap_runs_us: Some(vec![2.4, 2.5, 2.6]),
            rss_bytes: Some(80 << 20),
            rss: Some(Rss {
                services: 100,
                backends_per_service: 100,
                rss_bytes: 80 << 20,
                rss_anon_bytes: 40 << 20,
                scrape_ms: 43.3,
                scrape_runs_ms: vec![43.0, 43.3, 44.0],
                scrape_samples: 80_695,
            }),
            scale: Some(ScaleResult {
                vips: 1024,
                backends: 16384,
                conntrack_entries: 8_388_608,
                startup_ms: 7250.0,
                maps: vec![MapMemory {
                    map: "CONNTRACK".into(),
                    bytes: 1_007_000_000,
                }],
                maps_bytes: 1_150_000_000,
                pool_bytes_per_vip: 132_112,
                rss_bytes: 362 << 20,
                rss_anon_bytes: 91 << 20,
                change_ms: 107.0,
                change_runs_ms: vec![95.0, 107.0, 118.0, 100.0, 110.0],
                change_map_write_ms: 35.0,
                idle_cpu: 0.16,
                per_packet: vec![ScaleVsSmall {
                    case: "tcp4_established_ipip".into(),
                    small_ns: 179.0,
                    scale_ns: 172.0,
                    ratio: 172.0 / 179.0,
                }],
            }),
            health: Some(HealthResult {
                detect_refused_ms: 311.0,
                detect_refused_runs_ms: vec![250.0, 326.0, 296.0, 311.0, 323.0],
                detect_blackhole_ms: 595.0,
                detect_blackhole_runs_ms: vec![499.0, 571.0, 617.0, 606.0, 595.0],
                checks: ChecksResult {
                    targets: 10_000,
                    interval_s: 1.0,
                    window_s: 10.000_752,
                    checks_per_s: 9977.0,
                    scheduled_per_s: 10_000.0,
                    cpu_cores: 0.53,
                },
                flap: FlapResult {
                    services: 100,
                    backends_per_service: 100,
                    table_size: 65537,
                    one_flap_us: 14_500.0,
                    tables_rebuilt: 1,
                    full_rebuild_us: 132_700.0,
                    ratio: 9.15,
                },
            }),
            spread: Some(vec![SpreadResult {
                strategy: "maglev".into(),
                connections: 3000,
                mean_open: 36.2,
                max_over_mean_avg: 1.34,
                max_over_mean_p95: 1.641,
                max_over_mean_worst: 1.939,
            }]),
            cluster: Some(ClusterResult {
                kill_ms: 48.0,
                kill_runs_ms: vec![48.0],
                link_hold_ms: 3050.0,
                link_hold_runs_ms: vec![3050.0],
                link_bfd_ms: 310.0,
                link_bfd_runs_ms: vec![310.0],
                change_ms: 130.0,
                change_runs_ms: vec![120.0, 130.0, 140.0],
                watch_swap_ms: 4.2,
                watch_swap_runs_ms: vec![4.2],
            }),
            discovery: Some(DiscoveryResult {
                heartbeat: HeartbeatResult {
                    instances: 10_000,
                    services: 4,
                    ttl_s: 30,
                    interval_s: 10.0,
                    connections: 8,
                    register_s: 12.3,
                    window_s: 30.0,
                    scheduled_per_s: 1000.0,
                    heartbeats_per_s: 999.6,
                    latency_p50_ms: 0.31,
                    latency_p99_ms: 2.5,
                    latency_max_ms: 40.0,
                    cpu_cores: 0.083,
                    rest_cpu_cores: 0.02,
                },
                etcd: EtcdResult {
                    instances: 10_000,
                    services: 4,
                    first_read_ms: 2500.0,
                    changed: 1000,
                    txns: 10,
                    converge_ms: 2400.0,
                    converge_runs_ms: vec![2300.0, 2400.0, 2500.0],
                    write_runs_ms: vec![30.0, 31.0, 29.0],
                },
            }),
            machine: Machine {
                cpu: "AMD EPYC".into(),
                cores: 2,
                kernel: "6.18.44".into(),
                memory_bytes: 24 << 30,
                virtual_machine: true,
            },
        }
    }

    fn run() -> RunInfo {
        RunInfo {
            commit: Some("abc1234".into()),
            dirty: false,
            date_utc: "2026-12-07 01:40".into(),
            duration_s: Some(545.0),
            katran_commit: Some("19f08fe".into()),
        }
    }

    /// Every table's rows have as many cells as its header.
    fn tables_are_well_formed(md: &str) {
        let mut columns = None;
        for line in md.lines() {
            if !line.starts_with('|') {
                columns = None;
                continue;
            }
            let cells = line.matches('|').count();
            match columns {
                None => columns = Some(cells),
                Some(n) => assert_eq!(cells, n, "row with another cell count: {line}"),
            }
        }
    }

    #[test]
    fn a_full_run_has_the_facts_and_a_section_per_part() {
        let md = full().markdown(&run());
        assert!(md.starts_with(GENERATED));
        for needle in [
            "| machine | AMD EPYC, 2 vCPUs (a virtual machine), 24.0 GiB |",
            "| kernel | 6.18.44 |",
            "| commit | `abc1234` |",
            "| date | 2026-12-07 01:40 UTC |",
            "| run | `cargo xtask bench`; the bench ran 9 min 05 s (the build before it not counted) |",
            "data plane 5 runs of 1,000,000 iterations per case; end to end 3 rounds",
            "| Katran | its XDP balancer at commit `19f08fe`, in this run |",
            "## 1. Data plane",
            "| `udp4` | 110 | 2.75 | ≤ 50 missed | 110, 111, 109, 112, 110 |",
            "### Against Katran, same run",
            "| `tcp4_established` | `katran_tcp4_established` | less (DSR) | 100 | 170 | 0.59 |",
            "| round robin | 820 | 1.02 | 101 | 1.01 |",
            "| geo | 1,200 | 1.50 | 105 | 1.05 |",
            "### Scale: 1,024 VIPs, 16,384 backends, a connection table of 8,388,608",
            "| start to the first packet forwarded (to the last VIP) | 7.25 s |",
            "107 ms (median of 5, 95–118)",
            "## 2. End to end",
            "| `tcp4_conn_per_s` | connections/s | 9,000 | 8,000 | 7,000 | 5,000 | 1.29 | 1.14 | 1.80 |",
            "| `tcp4_conn_per_s` | 25,000 (32 %) | 24,000 (30 %) | 20,000 (48 %) | 7,000 (97 %) | 1.25 | 1.20 | 3.57 |",
            "`udp4_pps` was not measured",
            "## 3. Control plane",
            "median of 7 runs: of equal weight",
            "| 65537 | 100 | 670 | 917 | 0.73 | 871 | 2,750 | 1.30 |",
            "| one scrape of `/metrics` of that daemon | 43.3 ms (median of 3, 43.0–44.0) for 80,695 samples |",
            "## 4. Health",
            "311 ms (median of 5, 250–326)",
            "| checks per second, 10,000 TCP targets at a 1 s interval, over 10 s | 9,977 /s of 10,000 scheduled (99.8 %) on 0.53 of one core |",
            "14.5 ms",
            "132.7 ms: one flap costs 9× less",
            "## 5. Spread",
            "| maglev | 3,000 | 36.2 | 1.340 | 1.641 | 1.939 |",
            "## 6. A tier of nodes",
            "| an API change on one node → identical tables holding it on all three | 130 ms | 120, 130, 140 |",
            "cluster 1 runs per node loss, 3 changes; discovery heartbeats over 30 s, 3 bulk changes in etcd |",
            "## 7. Service discovery at scale",
            "| heartbeats answered, over 30 s | 1,000 /s of 1,000 scheduled |  |",
            "| the daemon's CPU while they heartbeat | 8.3 % of one core | < 10 % met |",
            "| etcd source: the bulk change's last write → every service shows it | 2,400 ms (median of 3, 2300–2500) | < 2,000 ms missed |",
        ] {
            assert!(md.contains(needle), "missing {needle:?} in\n{md}");
        }
        assert!(md.ends_with("|\n"), "one newline at the end");
        if std::env::var_os("LB_PRINT_PAGE").is_some() {
            print!("{md}");
        }
        tables_are_well_formed(&md);
    }

    #[test]
    fn a_partial_or_quick_run_says_so() {
        let mut r = full();
        r.quick = true;
        r.e2e = None;
        r.spread = None;
        r.discovery = None;
        r.vs_katran = Some(Vec::new());
        let mut info = run();
        info.dirty = true;
        info.katran_commit = None;
        let md = r.markdown(&info);
        assert!(
            md.contains("| commit | `abc1234` with uncommitted changes |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| run | `cargo xtask bench --quick` (short runs, no thresholds), without e2e, spread, discovery;"
            ),
            "{md}"
        );
        assert!(md.contains("| Katran | not found"), "{md}");
        assert!(
            !md.contains("## 2. End to end") && !md.contains("## 5. Spread") && !md.contains("## 7."),
            "{md}"
        );
        assert!(!md.contains("### Against Katran"), "{md}");
        tables_are_well_formed(&md);
    }

    #[test]
    fn numbers_read_as_on_the_page() {
        assert_eq!(int(0.4), "0");
        assert_eq!(int(999.0), "999");
        assert_eq!(int(1000.0), "1,000");
        assert_eq!(int(2_443_401.2), "2,443,401");
        assert_eq!(mb(4_200_000), "4.2 MB");
        assert_eq!(mb(1_007_000_000), "1,007 MB");
        assert_eq!(span(&[2.0, 1.0, 3.0], 0), "median of 3, 1–3");
        assert_eq!(
            utc_minute(UNIX_EPOCH + Duration::from_secs(1_796_607_600)),
            "2026-12-07 01:40"
        );
    }

    #[test]
    fn the_run_is_found() {
        let run = RunInfo::detect();
        assert!(run.commit.as_deref().is_some_and(|c| c.len() == 7), "{run:?}");
        assert!(run.duration_s.is_some_and(|d| d >= 0.0), "{run:?}");
        assert_eq!(run.date_utc.len(), "2026-12-07 01:40".len(), "{run:?}");
    }
}
