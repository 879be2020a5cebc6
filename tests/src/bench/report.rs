//! The bench's outputs: a table on stdout, `results.json`, and an SVG of ns per packet per case.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context, Result};
use serde::Serialize;

use super::{
    control::{MaglevResult, Rss},
    dataplane::{CaseResult, VsKatran},
    e2e::E2eResult,
    health::HealthResult,
};

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
}

impl Machine {
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Self {
            cpu,
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            kernel,
        }
    }
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
    pub scale: Option<super::scale::ScaleResult>,
    pub health: Option<HealthResult>,
    /// Busiest backend ÷ mean of long-lived connections, per strategy (`spread`).
    pub spread: Option<Vec<super::spread::SpreadResult>>,
    pub machine: Machine,
}

impl Results {
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let json = dir.join("results.json");
        std::fs::write(&json, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("write {}", json.display()))?;
        let md = dir.join("results.md");
        std::fs::write(&md, self.markdown()).with_context(|| format!("write {}", md.display()))?;
        if let Some(cases) = &self.dataplane {
            let svg = dir.join("dataplane.svg");
            std::fs::write(&svg, svg_chart(cases, &self.machine))
                .with_context(|| format!("write {}", svg.display()))?;
        }
        Ok(())
    }

    /// The same figures as Markdown tables, for BENCHMARKS.md.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(s, "Machine: {}, {} cores, kernel {}.\n", m.cpu, m.cores, m.kernel);
        if let Some(cases) = &self.dataplane {
            let _ = writeln!(s, "| case | ns/packet (median) | × floor | target | runs (ns) |");
            let _ = writeln!(s, "|---|---:|---:|---:|---|");
            for c in cases {
                let target = c
                    .target_ns
                    .map(|t| format!("≤ {t:.0} {}", if c.ns_per_packet <= t { "met" } else { "missed" }))
                    .unwrap_or_default();
                let runs: Vec<String> = c.runs.iter().map(|r| r.to_string()).collect();
                let _ = writeln!(
                    s,
                    "| `{}` | {:.0} | {:.2} | {target} | {} |",
                    c.case,
                    c.ns_per_packet,
                    c.ratio_to_floor,
                    runs.join(", ")
                );
            }
            s.push('\n');
        }
        if let Some(vs) = self.vs_katran.as_ref().filter(|v| !v.is_empty()) {
            let _ = writeln!(
                s,
                "| ours | Katran | work | ours ns | Katran ns | ours ÷ Katran | above floor | goal |"
            );
            let _ = writeln!(s, "|---|---|---|---:|---:|---:|---:|---|");
            for v in vs {
                let _ = writeln!(
                    s,
                    "| `{}` | `{}` | {} | {:.0} | {:.0} | {:.2} | {:.2} | {} |",
                    v.case,
                    v.katran_case,
                    if v.work == "same" {
                        "same (IPIP)"
                    } else {
                        "less (DSR)"
                    },
                    v.ours,
                    v.katran,
                    v.ratio,
                    v.ratio_above_floor,
                    goal_cell(v)
                );
            }
            s.push('\n');
        }
        if let Some(e2e) = &self.e2e {
            let _ = writeln!(
                s,
                "| case | unit | lb | lb NAT | nftables | HAProxy | lb / nftables | lb / HAProxy | lb NAT / nftables |"
            );
            let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
            for r in e2e {
                let [lb, nat, nft, hap, lb_nft, lb_hap, nat_nft] = e2e_cells(r, "n/a");
                let _ = writeln!(
                    s,
                    "| `{}` | {} | {lb} | {nat} | {nft} | {hap} | {lb_nft} | {lb_hap} | {nat_nft} |",
                    r.case, r.unit
                );
            }
            s.push('\n');
        }
        if let Some(maglev) = &self.maglev {
            let _ = writeln!(s, "| M | N | build (µs, median) | probing only (µs) | ratio |");
            let _ = writeln!(s, "|---:|---:|---:|---:|---:|");
            for r in maglev {
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.0} | {:.0} | {:.2} |",
                    r.m,
                    r.n,
                    r.build_us,
                    r.probing_us,
                    r.build_us / r.probing_us
                );
            }
            s.push('\n');
        }
        if let Some(us) = self.table_swap_us {
            let _ = writeln!(
                s,
                "- Write and swap a full table (M = 65537): {us:.0} µs (median)."
            );
        }
        if let Some(rss) = &self.rss {
            let _ = writeln!(
                s,
                "- Daemon RSS at idle, {} services × {} backends: {:.1} MiB, of which {:.1} MiB anonymous.\n- One scrape of `/metrics` there: {:.1} ms (median), {} samples.",
                rss.services,
                rss.backends_per_service,
                rss.rss_bytes as f64 / 1048576.0,
                rss.rss_anon_bytes as f64 / 1048576.0,
                rss.scrape_ms,
                rss.scrape_samples
            );
        }
        if let Some(sp) = &self.spread {
            let _ = writeln!(
                s,
                "\n| strategy | connections | open (mean) | busiest ÷ mean | p95 | worst |"
            );
            let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
            for r in sp {
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.1} | {:.3} | {:.3} | {:.3} |",
                    r.strategy,
                    r.connections,
                    r.mean_open,
                    r.max_over_mean_avg,
                    r.max_over_mean_p95,
                    r.max_over_mean_worst
                );
            }
        }
        if let Some(h) = &self.health {
            s.push_str(&health_lines(h, "- "));
        }
        s
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
            let _ = writeln!(s, "{:>8} {:>6} {:>12} {:>12}", "M", "N", "build µs", "probing µs");
            for r in maglev {
                let _ = writeln!(
                    s,
                    "{:>8} {:>6} {:>12.0} {:>12.0}",
                    r.m, r.n, r.build_us, r.probing_us
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
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="15">ns per packet (BPF_PROG_TEST_RUN, median); orange: Katran, same run; dashed line: floor</text>"#
    );
    let _ = writeln!(
        s,
        r##"<text x="10" y="38" fill="#555">{} ({} cores), kernel {}</text>"##,
        xml(&machine.cpu),
        machine.cores,
        xml(&machine.kernel)
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
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            left - 8.0,
            y + 16.0,
            xml(&c.case)
        );
        let _ = writeln!(
            s,
            r#"<rect x="{left}" y="{y}" width="{w:.1}" height="{bar_h}" fill="{fill}"/>"#
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}">{:.0} ns ({:.2}x)</text>"#,
            left + w + 6.0,
            y + 16.0,
            c.ns_per_packet,
            c.ratio_to_floor
        );
    }
    if let Some(floor) = cases.first().map(|c| c.floor_ns_per_packet) {
        let x = left + floor * scale;
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" stroke="#c53030" stroke-dasharray="4 3"/>"##,
            top - 6.0,
            height - 34.0
        );
    }
    s.push_str("</svg>\n");
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
