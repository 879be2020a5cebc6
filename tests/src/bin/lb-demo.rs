//! `cargo xtask demo`: a client, the balancer and 3 backends in network namespaces; the daemon
//! runs with scripts/demo.toml, the CLI changes the backends, real TCP and UDP flows go to the
//! VIPs, and the per-backend flow counts and the balancer's counters are printed. Everything is
//! torn down at the end, also on failure.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use anyhow::{Context, Result, bail};
use lb_tests::{
    Daemon, Topology,
    client::{tcp_flows, udp_flows},
    topology::{VIP4, VIP6},
    wait_until,
};

const CONFIG: &str = include_str!("../../../scripts/demo.toml");

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn lb(d: &Daemon, args: &[&str]) -> Result<String> {
    d.try_cli(args)
}

fn show(title: &str, counts: &std::collections::HashMap<String, usize>) {
    let sorted: BTreeMap<_, _> = counts.iter().collect();
    let line: Vec<String> = sorted.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("  {title:<28} {}", line.join("  "));
}

fn run() -> Result<()> {
    let started = std::time::Instant::now();
    println!("== topology: client, balancer, backends b1 b2 b3 on one L2 segment (network namespaces)");
    let topo = Topology::new(3).context("build topology")?;
    let run_dir = std::path::PathBuf::from("/run/lb-demo");
    println!("== daemon: lb daemon --config scripts/demo.toml (in the balancer namespace)");
    let d = Daemon::start(&topo, "lb-demo", &run_dir, CONFIG).context("start daemon")?;
    let resolved = wait_until(Duration::from_secs(15), || {
        lb(&d, &["--json", "service", "list"]).is_ok_and(|s| !s.contains("\"resolved\": false"))
    });
    if !resolved {
        bail!("backends did not resolve: {}", d.log());
    }
    print!("{}", lb(&d, &["status"])?);

    println!("\n== traffic with b1, b2");
    let (tcp, _) = tcp_flows(&topo, IpAddr::V4(VIP4), 300, false);
    show("tcp 10.100.0.1:8080", &tcp);

    println!("\n== CLI: add b3 to web and dns, give b1 twice the weight in web");
    let b3 = topo.backend("b3").v4.to_string();
    lb(
        &d,
        &[
            "backend",
            "add",
            "web",
            "b3",
            "--address",
            &b3,
            "--region",
            "eu-west",
            "--zone",
            "c",
        ],
    )?;
    lb(&d, &["backend", "add", "dns", "b3", "--address", &b3])?;
    lb(&d, &["backend", "weight", "web", "b1", "200"])?;
    print!("{}", lb(&d, &["service", "list"])?);

    println!("\n== traffic: per-backend flows as the client saw them");
    let (tcp, _) = tcp_flows(&topo, IpAddr::V4(VIP4), 400, false);
    show("tcp 10.100.0.1:8080 (2:1:1)", &tcp);
    let udp = udp_flows(&topo, IpAddr::V4(VIP4), 300);
    show("udp 10.100.0.1:8080", &udp);
    let (tcp6, _) = tcp_flows(&topo, IpAddr::V6(VIP6), 200, false);
    show("tcp [fd99:100::1]:8080", &tcp6);

    println!("\n== which backend gets a flow");
    print!(
        "{}",
        lb(
            &d,
            &[
                "lookup",
                "--protocol",
                "tcp",
                "--src",
                "10.99.0.1:40000",
                "--dst",
                "10.100.0.1:8080"
            ]
        )?
    );

    println!("\n== balancer counters (lb stats)");
    print!("{}", lb(&d, &["stats"])?);
    println!(
        "\n== teardown (daemon stopped, XDP detached, pins and namespaces removed) after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
