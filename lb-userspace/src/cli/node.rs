//! `lb node`: this node in a tier of balancers: drain, undrain, and its BGP sessions.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use clap::Subcommand;
use serde_json::Value;

use super::shared::fmt_ip;
use crate::api::Request;

#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// Withdraw every VIP; flows that still arrive are forwarded as before. Reports the
    /// traffic still arriving; with --wait, waits until none arrives for a second (or the
    /// bound passes: exit status 1).
    Drain {
        #[arg(long, value_name = "SECONDS")]
        wait: Option<u64>,
    },
    /// Announce the VIPs again.
    Undrain,
    /// The BGP sessions, which VIPs are announced and why not the others.
    Status,
}

/// The request of a verb that makes one (`drain` makes several: see `drain`).
pub fn request(cmd: &NodeCmd) -> Request {
    match cmd {
        NodeCmd::Drain { .. } => Request::Drain,
        NodeCmd::Undrain => Request::Undrain,
        NodeCmd::Status => Request::Node,
    }
}

/// `lb node drain`: withdraws, then (with `wait`) watches the VIPs' packet counters until a
/// second passes with none, or the bound.
pub fn drain(socket: &Path, json: bool, wait: Option<u64>) -> anyhow::Result<i32> {
    let call = |r: &Request| super::shared::call(socket, r);
    let data = call(&Request::Drain)?;
    let packets = |d: &Value| d["vip_packets"].as_u64().unwrap_or(0);
    let mut last = packets(&data);
    let mut arriving = None;
    if let Some(bound) = wait {
        let until = Instant::now() + Duration::from_secs(bound);
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let now = packets(&call(&Request::Node)?);
            let per_s = now.saturating_sub(last);
            last = now;
            arriving = Some(per_s);
            if per_s == 0 || Instant::now() >= until {
                break;
            }
        }
    }
    let announced = data["bgp"]["announced"].as_array().map_or(0, Vec::len);
    if json {
        println!(
            "{}",
            serde_json::json!({ "draining": true, "announced": announced, "packets_per_s": arriving, "node": data })
        );
    } else {
        println!("draining: {announced} VIPs still announced");
        if let Some(p) = arriving {
            println!("{p} packets/s still arriving for the VIPs");
        }
    }
    Ok(i32::from(arriving.is_some_and(|p| p > 0)))
}

pub fn print(data: &Value) {
    let bgp = &data["bgp"];
    if bgp["enabled"] != true {
        println!("bgp: off (no [daemon.bgp])");
        return;
    }
    println!(
        "bgp: bird {}{}{}",
        if bgp["bird_running"] == true {
            "running"
        } else {
            "not running"
        },
        if bgp["draining"] == true {
            ", node draining"
        } else {
            ""
        },
        bgp["error"]
            .as_str()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    );
    for s in bgp["sessions"].as_array().into_iter().flatten() {
        println!(
            "  peer {:<24} {:<6} {}",
            fmt_ip(&s["peer"]),
            if s["up"] == true { "up" } else { "down" },
            s["info"].as_str().unwrap_or_default()
        );
    }
    if let Some(services) = bgp["services"].as_object() {
        for (name, a) in services {
            println!(
                "  {name:<16} {:<24} {}",
                fmt_ip(&a["vip"]),
                if a["announced"] == true {
                    "announced".to_string()
                } else {
                    format!("withdrawn: {}", a["reason"].as_str().unwrap_or_default())
                }
            );
        }
    }
}
