//! The benchmark runner behind `cargo xtask bench`.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, ValueEnum};
use lb_tests::bench::{
    cluster, control, dataplane, discovery, e2e, health,
    report::{Machine, Results},
    spread,
};

/// Benchmarks the data plane, end-to-end forwarding and the control plane.
#[derive(Parser)]
#[command(name = "lb-bench")]
struct Args {
    /// Short runs for a smoke test (CI): fewer repeats, shorter windows, no thresholds
    #[arg(long)]
    quick: bool,
    /// Run only these parts (repeatable); all parts by default
    #[arg(long, value_enum)]
    only: Vec<Part>,
    /// Data plane: run only the cases whose name contains this (the floor always runs)
    #[arg(long)]
    case: Option<String>,
    /// Where results.json and dataplane.svg go
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    Dataplane,
    E2e,
    Control,
    Health,
    Spread,
    Cluster,
    /// Heartbeats of 10,000 instances and an etcd source of 10,000: not in `--quick` (about
    /// 2 minutes) unless named
    Discovery,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let wants = |p: Part| args.only.is_empty() || args.only.contains(&p);
    let mut results = Results {
        quick: args.quick,
        dataplane: None,
        vs_katran: None,
        e2e: None,
        maglev: None,
        table_swap_us: None,
        table_swap_runs_us: None,
        rss_bytes: None,
        rss: None,
        scale: None,
        health: None,
        spread: None,
        cluster: None,
        discovery: None,
        machine: Machine::detect(),
    };
    if wants(Part::Dataplane) {
        let (repeat, runs) = if args.quick { (100_000, 3) } else { (1_000_000, 5) };
        eprintln!("==> data plane: {runs} runs of {repeat} iterations per case");
        let (cases, scale) = dataplane::run(repeat, runs, args.case.as_deref())?;
        results.vs_katran = Some(dataplane::vs_katran(&cases));
        results.dataplane = Some(cases);
        results.scale = scale;
    }
    if wants(Part::Control) {
        let runs = if args.quick { 3 } else { 7 };
        eprintln!("==> control plane: Maglev builds, table swap, daemon RSS");
        results.maglev = Some(control::maglev(runs)?);
        let (swap, swap_runs) = control::table_swap(runs)?;
        results.table_swap_us = Some(swap);
        results.table_swap_runs_us = Some(swap_runs);
        let rss = control::daemon_rss(100, 100)?;
        results.rss_bytes = Some(rss.rss_bytes);
        results.rss = Some(rss);
    }
    if wants(Part::Health) {
        eprintln!("==> health: detection times, checks per second, cost of a flap");
        results.health = Some(health::run(args.quick)?);
    }
    if wants(Part::Spread) {
        eprintln!("==> spread of long-lived connections: maglev, least connections, power of two");
        results.spread = Some(spread::run(args.quick)?);
    }
    if wants(Part::Cluster) {
        eprintln!("==> cluster: a lost node, a change across nodes, a watch to a swap");
        results.cluster = Some(cluster::run(args.quick)?);
    }
    if wants(Part::Discovery) && (!args.quick || args.only.contains(&Part::Discovery)) {
        let (runs, window) = if args.quick { (1, 10) } else { (5, 30) };
        eprintln!(
            "==> discovery: {} instances heartbeating for {window} s, an etcd source's bulk change",
            discovery::INSTANCES
        );
        results.discovery = Some(discovery::run(runs, std::time::Duration::from_secs(window))?);
    }
    if wants(Part::E2e) {
        eprintln!("==> end to end through veth: lb, nftables, HAProxy");
        results.e2e = Some(e2e::run(args.quick)?);
    }
    print!("{}", results.table());
    results.write(&args.out)?;
    eprintln!("==> wrote {}", args.out.join("results.json").display());
    Ok(())
}
