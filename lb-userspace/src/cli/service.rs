//! `lb service`: list, add and remove services, set a service's strategy.

use std::net::IpAddr;

use clap::{Args, Subcommand};
use serde_json::Value;

use super::shared::{fmt_drain, fmt_ip, fmt_labels, fmt_registration, fmt_weight};
use crate::{
    api::Request,
    config::{Forwarding, FragmentPolicy, HashMode, Protocol, ServiceSpec},
    model::Strategy,
};

#[derive(Subcommand, Debug)]
pub enum ServiceCmd {
    /// List services and their backends.
    List,
    /// Add a service.
    Add(ServiceArgs),
    /// Remove a service and its backends.
    Remove { name: String },
    /// Set a service's strategy (new flows only: established ones stay where they are).
    Strategy { name: String, strategy: Strategy },
}

#[derive(Args, Debug)]
pub struct ServiceArgs {
    pub name: String,
    #[arg(long)]
    pub vip: IpAddr,
    /// 0 = every port of the VIP.
    #[arg(long)]
    pub port: u16,
    #[arg(long, short = 'p', default_value = "tcp")]
    pub protocol: Protocol,
    /// Maglev table size; must be prime.
    #[arg(long, default_value_t = lb_common::maps::DEFAULT_TABLE_SIZE)]
    pub table_size: u32,
    /// Hash the source address only (client affinity) instead of the 5-tuple.
    #[arg(long)]
    pub source_hash: bool,
    /// How packets reach the backends: dsr (same segment, MACs rewritten), ipip or gue (routed
    /// backends that strip the outer header: `lb backend-host setup`), or nat (unmodified
    /// backends; replies come back through the balancer).
    #[arg(long, default_value = "dsr")]
    pub forwarding: Forwarding,
    /// With --forwarding nat: also rewrite the source to the balancer's daemon.nat address.
    #[arg(long)]
    pub snat: bool,
    /// IP fragments to the VIP: pass (to the kernel) or hash (by source, destination and
    /// protocol into this service's table).
    #[arg(long, default_value = "pass")]
    pub fragments: FragmentPolicy,
    /// How a new flow picks its backend: maglev, round-robin, weighted-round-robin,
    /// least-connections, power-of-two, resource-aware, adaptive or geo (by the client's
    /// region, `[daemon.geo]`: each backend then needs `lb backend add --region`).
    #[arg(long, default_value = "maglev")]
    pub strategy: Strategy,
    /// Allow a VIP that is one of the balancer host's own addresses: its port (every port, for
    /// port 0) then goes to the backends, not to the host's own services (SSH, the API).
    #[arg(long)]
    pub allow_own_address: bool,
}

pub fn request(cmd: &ServiceCmd) -> Request {
    match cmd {
        ServiceCmd::List => Request::ListServices,
        ServiceCmd::Add(a) => Request::AddService {
            service: ServiceSpec {
                name: a.name.clone(),
                vip: a.vip,
                port: a.port,
                protocol: a.protocol,
                table_size: a.table_size,
                hash: if a.source_hash {
                    HashMode::Source
                } else {
                    HashMode::FiveTuple
                },
                forwarding: a.forwarding,
                fragments: a.fragments,
                snat: a.snat,
                allow_own_address: a.allow_own_address,
                health: None,
                max_new_flows_per_s: None,
                on_shed: Default::default(),
                resource: None,
                adaptive: None,
                announce: Default::default(),
                discovery: None,
                strategy: a.strategy,
                backends: Vec::new(),
            },
        },
        ServiceCmd::Remove { name } => Request::RemoveService { name: name.clone() },
        ServiceCmd::Strategy { name, strategy } => Request::SetStrategy {
            service: name.clone(),
            strategy: *strategy,
        },
    }
}

pub fn print(cmd: &ServiceCmd, data: &Value) {
    match cmd {
        ServiceCmd::List => print_list(data),
        _ => super::shared::print_plain(data),
    }
}

fn print_list(data: &Value) {
    for s in data.as_array().into_iter().flatten() {
        let strategy = s["strategy"].as_str().unwrap_or("maglev");
        let in_effect = s["in_effect"].as_str().unwrap_or(strategy);
        let counting = matches!(in_effect, "least-connections" | "power-of-two") || strategy == "adaptive";
        println!(
            "{}{} {}:{}/{} table={} hash={} forwarding={}{}{}",
            s["name"].as_str().unwrap_or_default(),
            if s["panic"] == true { " PANIC" } else { "" },
            fmt_ip(&s["vip"]),
            s["port"],
            s["protocol"].as_str().unwrap_or_default(),
            s["table_size"],
            s["hash"].as_str().unwrap_or_default(),
            s["forwarding"].as_str().unwrap_or_default(),
            if s["snat"] == true { " snat" } else { "" },
            match (strategy, s["adaptive"].as_object()) {
                ("maglev", _) => String::new(),
                (_, Some(a)) => format!(
                    " strategy=adaptive now={in_effect} ({}, for {:.0} s, {} switches)",
                    a["reason"].as_str().unwrap_or_default(),
                    a["for_s"].as_f64().unwrap_or(0.0),
                    a["switches"]
                ),
                _ => format!(" strategy={strategy}"),
            },
        );
        if let Some(d) = s["discovery"].as_object() {
            println!("  {}", fmt_discovery(d));
        }
        for b in s["backends"].as_array().into_iter().flatten() {
            let labels = fmt_labels(&b["labels"]);
            println!(
                "  {:<16} {:<24} port={:<5} {:<7} weight={:<11} slots={:<6} source={} {}{}{}{}{}",
                b["id"].as_str().unwrap_or_default(),
                fmt_ip(&b["address"]),
                b["port"],
                b["health"].as_str().unwrap_or_default(),
                fmt_weight(b),
                b["table_slots"],
                b["source"].as_str().unwrap_or_default(),
                if labels.is_empty() {
                    String::new()
                } else {
                    format!("labels={labels} ")
                },
                fmt_registration(&b["registration"]),
                fmt_drain(&b["drain"]),
                if counting {
                    format!("active={:<6} ", b["active_flows"])
                } else {
                    String::new()
                },
                if b["resolved"].as_bool() == Some(true) {
                    format!(
                        "mac={} dev={}",
                        b["mac"].as_str().unwrap_or_default(),
                        b["interface"].as_str().unwrap_or_default()
                    )
                } else {
                    "unresolved".to_string()
                }
            );
        }
    }
}

/// A service's source on one line: kind, backends, updates, and what is wrong if anything.
fn fmt_discovery(d: &serde_json::Map<String, Value>) -> String {
    let mut line = format!(
        "discovery={} backends={} updates={}",
        d["kind"].as_str().unwrap_or_default(),
        d["backends"],
        d["updates"]
    );
    if let Some(e) = d["error"].as_object() {
        line.push_str(&format!(
            " error ({}): {}",
            e["reason"].as_str().unwrap_or_default(),
            e["message"].as_str().unwrap_or_default()
        ));
    }
    if let Some(h) = d["held"].as_object() {
        line.push_str(&format!(
            " held: {} of {} backends, applied in {:.1} s unless it recovers",
            h["wanted"],
            h["live"],
            h["applies_in_s"].as_f64().unwrap_or(0.0)
        ));
    }
    if let Some(skipped) = d["skipped"].as_array().filter(|s| !s.is_empty()) {
        let list: Vec<String> = skipped
            .iter()
            .map(|x| {
                format!(
                    "{} ({})",
                    x["entry"].as_str().unwrap_or_default(),
                    x["reason"].as_str().unwrap_or_default()
                )
            })
            .collect();
        line.push_str(&format!(" skipped: {}", list.join(", ")));
    }
    line
}
