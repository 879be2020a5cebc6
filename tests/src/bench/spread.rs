//! How evenly the strategies spread long-lived connections: real TCP connections through the
//! balancer (the L2 DSR test topology, 4 backends), each held for a heavy-tailed number of
//! steps, under Maglev, least connections and power of two choices in the same run.
//!
//! One step opens one connection (connect, ask, read which backend answered) and closes the
//! ones whose lifetime ended; the lifetimes come from one seeded sequence, the same for every
//! strategy: `ceil(LIFETIME / u)` steps for u uniform in (0.01, 1], so most are short and a few
//! last hundreds of steps (about 35 open at once on average). After a warm-up, each step takes
//! the busiest backend's open connections over the mean across backends (1 = perfectly even);
//! the figures are the mean, the 95th percentile and the worst of that ratio. The backends'
//! own answers say where each connection went, not the balancer's counters.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::{Daemon, Topology, client::connect, in_ns, topology::VIP4, wait_until};

const BACKENDS: usize = 4;
const LIFETIME: f64 = 8.0;
const WARMUP: usize = 100;

#[derive(Clone, Debug, Serialize)]
pub struct SpreadResult {
    pub strategy: String,
    pub connections: usize,
    /// Mean open connections across the measured steps.
    pub mean_open: f64,
    /// Busiest backend's open connections ÷ the mean per backend, per step after warm-up.
    pub max_over_mean_avg: f64,
    pub max_over_mean_p95: f64,
    pub max_over_mean_worst: f64,
}

/// The seeded lifetimes, in steps.
fn lifetimes(n: usize) -> Vec<usize> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = 0.01 + 0.99 * ((x >> 11) as f64 / (1u64 << 53) as f64);
            (LIFETIME / u).ceil() as usize
        })
        .collect()
}

pub fn run(quick: bool) -> Result<Vec<SpreadResult>> {
    let steps = if quick { 600 } else { 3000 };
    let topo = Topology::new(BACKENDS).context("topology")?;
    let ids: Vec<String> = (1..=BACKENDS).map(|i| format!("b{i}")).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let (instance, run_dir) = Daemon::new_paths();
    let config = topo.config(&instance, &run_dir, &id_refs);
    let d = Daemon::start(&topo, &instance, &run_dir, &config)?;
    if !wait_until(Duration::from_secs(15), || d.all_in_tables()) {
        bail!("backends did not resolve: {}", d.log());
    }
    let life = lifetimes(steps);
    let mut out = Vec::new();
    for strategy in ["maglev", "least-connections", "power-of-two"] {
        let set = d.cli(&["service", "strategy", "web4", strategy]);
        if !set.status.success() {
            bail!(
                "lb service strategy web4 {strategy}: {}",
                String::from_utf8_lossy(&set.stderr)
            );
        }
        // Nothing left open from the previous strategy: every count back at 0.
        let clean = wait_until(Duration::from_secs(10), || {
            d.backends_of("web4")
                .iter()
                .all(|b| b["active_flows"].as_i64().unwrap_or(0) == 0)
        });
        if !clean {
            bail!("active flows did not return to 0 before {strategy}");
        }
        let life = life.clone();
        let ratios = in_ns(&topo.client, move || -> Result<(Vec<f64>, f64)> {
            let mut open: Vec<(usize, String, crate::client::Conn)> = Vec::new();
            let mut ratios = Vec::new();
            let mut total_open = 0usize;
            for (step, &l) in life.iter().enumerate() {
                open.retain(|(end, _, _)| *end > step);
                let mut c = connect(IpAddr::V4(VIP4));
                let id = c.ask().context("answer")?;
                open.push((step + l, id, c));
                if step >= WARMUP {
                    let mut per: HashMap<&str, usize> = HashMap::new();
                    for (_, id, _) in &open {
                        *per.entry(id.as_str()).or_default() += 1;
                    }
                    let max = per.values().copied().max().unwrap_or(0);
                    let mean = open.len() as f64 / BACKENDS as f64;
                    ratios.push(max as f64 / mean);
                    total_open += open.len();
                }
            }
            let measured = life.len().saturating_sub(WARMUP).max(1);
            Ok((ratios, total_open as f64 / measured as f64))
        })?;
        let (mut r, mean_open) = ratios;
        if r.is_empty() {
            bail!("no measured steps");
        }
        let avg = r.iter().sum::<f64>() / r.len() as f64;
        r.sort_by(f64::total_cmp);
        let p95 = r[(r.len() * 95 / 100).min(r.len() - 1)];
        let worst = *r.last().expect("not empty");
        eprintln!(
            "spread: {strategy}: busiest backend ÷ mean {avg:.3} (p95 {p95:.3}, worst {worst:.3}), {mean_open:.1} open on average"
        );
        out.push(SpreadResult {
            strategy: strategy.to_string(),
            connections: steps,
            mean_open,
            max_over_mean_avg: avg,
            max_over_mean_p95: p95,
            max_over_mean_worst: worst,
        });
    }
    Ok(out)
}
