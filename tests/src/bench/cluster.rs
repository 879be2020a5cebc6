//! The tier's speed, in the cluster lab (a router running BIRD with ECMP, nodes each running
//! `lb daemon` and its BIRD, a real etcd): how soon the router drops a lost node (its daemon
//! killed and its program detached, as a dead host; its link pulled, without and with BFD),
//! how soon an API change made on one node is in every node's tables, and how long a node
//! takes from etcd's watch answer to its swapped tables. Times are read by polling every 20 ms
//! (the router's routes, the nodes' status), so each figure is good to about ±25 ms.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use serde::Serialize;

use super::median;
use crate::{
    cluster::{Etcd, Lab},
    wait_until,
};

#[derive(Clone, Debug, Serialize)]
pub struct ClusterResult {
    /// ms from a node's daemon SIGKILLed (then `lb detach`: BIRD stopped, program detached, as a
    /// dead host looks) to the router's route without it.
    pub kill_ms: f64,
    pub kill_runs_ms: Vec<f64>,
    /// ms from a node's pulled link to the route without it: BGP's hold time alone (3 s).
    pub link_hold_ms: f64,
    pub link_hold_runs_ms: Vec<f64>,
    /// The same with BFD (100 ms × 3).
    pub link_bfd_ms: f64,
    pub link_bfd_runs_ms: Vec<f64>,
    /// ms from an API change on one node to identical tables holding it on all three.
    pub change_ms: f64,
    pub change_runs_ms: Vec<f64>,
    /// ms from a node's etcd watch answer to its writer's answer (tables swapped), every node.
    pub watch_swap_ms: f64,
    pub watch_swap_runs_ms: Vec<f64>,
}

/// Polls until `cond`, bounded; the time it took.
fn time_until(bound: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    wait_until(bound, &mut cond).then(|| started.elapsed())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn agreed(lab: &Lab, from: usize, n: usize, not: &str) -> bool {
    let d = lab.web_digests(from);
    d.len() == n && d.iter().all(|x| x != "none" && x != not && *x == d[0])
}

pub fn run(quick: bool) -> Result<ClusterResult> {
    let runs = if quick { 1 } else { 5 };
    let bound = Duration::from_secs(20);

    // Three nodes in cluster mode, without BFD.
    let mut lab = Lab::new(3, 3, 0, false)?;
    let _etcd = Etcd::start(&lab)?;
    for (i, name) in ["n1", "n2", "n3"].into_iter().enumerate() {
        lab.start_cluster_node(i, name)?;
    }
    lab.push(0, &lab.services_file())?;
    ensure!(
        wait_until(bound, || agreed(&lab, 0, 3, "")),
        "the nodes never agreed"
    );
    let all: Vec<Ipv4Addr> = lab.nodes.iter().map(|n| n.addr).collect();
    ensure!(
        lab.wait_next_hops(&all, Duration::from_secs(30)),
        "the router never had all three nodes"
    );

    // An API change on one node (a weight, back and forth) to identical tables on all three.
    let (mut change, mut swap) = (Vec::new(), Vec::new());
    for r in 0..runs.max(3) {
        let before = lab.web_digests(0)[0].clone();
        let weight = if r % 2 == 0 { "50" } else { "100" };
        let node = r % 3;
        let started = Instant::now();
        let out = lab.daemon(node).cli(&["backend", "weight", "web", "b1", weight]);
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        ensure!(
            wait_until(bound, || agreed(&lab, node, 3, &before)),
            "a change never reached all three nodes"
        );
        change.push(ms(started.elapsed()));
        for i in 0..3 {
            let s = lab.daemon(i).json(&["cluster", "status"]);
            swap.extend(s["last_apply_ms"].as_f64());
        }
    }

    // A node's loss: killed and detached (a dead host: its BIRD's sessions close), then its
    // link pulled (no session closes: the hold time tells). Each run brings it back.
    // n3 is killed (and brought back between runs); then n2's link is pulled.
    let mut kill = Vec::new();
    for r in 0..runs {
        let started = Instant::now();
        drop(lab.nodes[2].daemon.take());
        time_until(bound, || lab.next_hops() == all[..2]).context("a killed node stayed a next hop")?;
        kill.push(ms(started.elapsed()));
        if r + 1 < runs {
            lab.start_cluster_node(2, "n3")?;
            ensure!(
                lab.wait_next_hops(&all, Duration::from_secs(60)),
                "n3 never came back"
            );
        }
    }
    let hold = link_pulls(&lab, &all[..2], runs)?;
    drop(lab);

    // With BFD: two nodes are enough for a link pull.
    let mut lab = Lab::new(2, 2, 0, true)?;
    for i in 0..2 {
        lab.start_node(i)?;
    }
    let all: Vec<Ipv4Addr> = lab.nodes.iter().map(|n| n.addr).collect();
    ensure!(
        lab.wait_next_hops(&all, Duration::from_secs(30)),
        "the BFD lab's router never had both nodes"
    );
    let bfd = link_pulls(&lab, &all, runs)?;

    let med = |v: &[f64]| median(v.iter().copied()).unwrap_or(f64::NAN);
    Ok(ClusterResult {
        kill_ms: med(&kill),
        kill_runs_ms: kill,
        link_hold_ms: med(&hold),
        link_hold_runs_ms: hold,
        link_bfd_ms: med(&bfd),
        link_bfd_runs_ms: bfd,
        change_ms: med(&change),
        change_runs_ms: change,
        watch_swap_ms: med(&swap),
        watch_swap_runs_ms: swap,
    })
}

/// Pulls the link of the last node of `live` (the router's next hops) `runs` times: ms until
/// the router drops it; back up between runs.
fn link_pulls(lab: &Lab, live: &[Ipv4Addr], runs: usize) -> Result<Vec<f64>> {
    let last = live.len() - 1;
    let mut out = Vec::new();
    for r in 0..runs {
        lab.nodes[last].ns.sh("ip link set eth0 down")?;
        let t = time_until(Duration::from_secs(20), || lab.next_hops() == live[..last]);
        lab.nodes[last].ns.sh("ip link set eth0 up")?;
        out.push(ms(t.context("a node whose link was pulled stayed a next hop")?));
        if r + 1 < runs {
            ensure!(
                lab.wait_next_hops(live, Duration::from_secs(60)),
                "a node did not come back after its link did"
            );
        }
    }
    Ok(out)
}
