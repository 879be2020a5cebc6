//! Command line: `lb daemon` runs the daemon; every other verb talks to it over its socket.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::{
    api::{self, Request},
    config::{self, BackendSpec, Forwarding, FragmentPolicy, HashMode, Protocol, ServiceSpec},
};

#[derive(Parser, Debug)]
#[command(
    name = "lb",
    version,
    about = "XDP layer-4 load balancer: daemon and control CLI"
)]
pub struct Cli {
    /// Daemon instance to talk to (names its socket and its pins under /sys/fs/bpf).
    #[arg(long, global = true, default_value = "default", value_parser = parse_instance)]
    pub instance: String,
    /// Directory of the daemon's control socket.
    #[arg(long, global = true, default_value = "/run/lb")]
    pub run_dir: PathBuf,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Checked at parse time: `lb detach` removes files at paths made from the name.
fn parse_instance(name: &str) -> crate::error::Result<String> {
    config::validate_instance(name).map(|()| name.to_string())
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: load or adopt the data plane, apply the config, serve the CLI.
    Daemon {
        /// TOML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Log lines as text (leveled, one event per line) or as one JSON object per line.
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        log_format: String,
    },
    /// Detach XDP from every interface and remove the instance's pins and state.
    Detach,
    /// Show the daemon's instance, interfaces and attach modes.
    Status,
    /// List, add and remove services.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Add, remove and reweight backends.
    #[command(subcommand)]
    Backend(BackendCmd),
    /// Show per-service and per-backend traffic and the global counters.
    Stats,
    /// A live view refreshed every second: per backend packets/s, new flows/s, state, score,
    /// weight, breaker, sorted by rate; drops/s by reason. `q` quits.
    Top {
        /// Print one frame (two samples a second apart) as plain text and exit.
        #[arg(long)]
        once: bool,
    },
    /// Show each backend's health: state, score and its inputs, last check, since when.
    Health {
        /// Only this service.
        service: Option<String>,
    },
    /// Show which backend a flow gets.
    Lookup {
        #[arg(long, short = 'p', default_value = "tcp")]
        protocol: Protocol,
        /// Client address and port, e.g. 10.0.0.1:40000 or [fd00::1]:40000.
        #[arg(long)]
        src: SocketAddr,
        /// VIP and port.
        #[arg(long)]
        dst: SocketAddr,
    },
    /// Re-read the config file and replace the running services with it.
    Reload,
    /// Geographic routing: the data in use, and which region serves each region's clients.
    #[command(subcommand)]
    Geo(GeoCmd),
    /// Stop the daemon (the data plane keeps forwarding).
    Shutdown,
    /// This node in a tier of balancers: withdraw its VIPs from the routers, or announce them
    /// again (`[daemon.bgp]`).
    #[command(subcommand)]
    Node(NodeCmd),
    /// The tier's shared state in etcd (`[cluster]`).
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Show what a change would do before applying it: per service, the table entries that
    /// would change owner and the live flows that would change backend if their entry were lost.
    #[command(subcommand)]
    Plan(PlanCmd),
    /// On a backend: set up, check or undo what IPIP forwarding needs (no daemon involved).
    #[command(subcommand)]
    BackendHost(BackendHostCmd),
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// The nodes (each while its lease lives), the revision each applied, and each service's
    /// table digest per node: equal digests, equal tables.
    Status,
    /// Check a config file whole and make its services the cluster's state.
    Push { file: PathBuf },
}

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

#[derive(Subcommand, Debug)]
pub enum GeoCmd {
    /// The data set in use (prefixes per region) and, per geo service and region, the region
    /// whose backends serve it.
    Show,
    /// Read `[daemon.geo] data` again and swap it in whole; a bad file is refused (naming its
    /// line) and the running data stays.
    Reload,
}

#[derive(Subcommand, Debug)]
pub enum BackendHostCmd {
    /// Attach the decapsulator to an interface, put the VIPs on lo, set arp_ignore=1,
    /// arp_announce=2 and a non-strict rp_filter. Idempotent.
    Setup(BackendHostArgs),
    /// Say which of those settings is wrong on a backend that receives traffic but does not
    /// answer. Exits 1 if any is.
    Check(BackendHostArgs),
    /// Detach the decapsulator and remove its pins (VIPs and sysctls are left as they are).
    Teardown {
        /// The interface encapsulated traffic arrives on.
        #[arg(long)]
        interface: String,
    },
}

#[derive(Args, Debug)]
pub struct BackendHostArgs {
    /// The interface encapsulated traffic arrives on.
    #[arg(long)]
    pub interface: String,
    /// A VIP this backend serves (repeatable).
    #[arg(long = "vip", required = true)]
    pub vips: Vec<IpAddr>,
    /// UDP port of GUE encapsulation (the balancer's `gue_port`); 0 accepts IPIP only.
    #[arg(long, default_value_t = config::DEFAULT_GUE_PORT)]
    pub gue_port: u16,
    /// A prefix the balancers' outer sources lie in (repeatable; their `encap_source4/6` with
    /// the per-flow part: /16 and /96). Default: the balancer's defaults, 172.16.0.0/16 and
    /// fd00:4c42::/96. Tunnels from anywhere else are never stripped.
    #[arg(long = "source")]
    pub sources: Vec<crate::backend_host::Prefix>,
    /// This host's outer address the balancers send to (repeatable). Default: the interface's
    /// addresses. Tunnels to any other address are never stripped.
    #[arg(long = "address")]
    pub addresses: Vec<IpAddr>,
}

#[derive(Subcommand, Debug)]
pub enum ServiceCmd {
    /// List services and their backends.
    List,
    /// Add a service.
    Add(ServiceArgs),
    /// Remove a service and its backends.
    Remove { name: String },
    /// Set a service's strategy (new flows only: established ones stay where they are).
    Strategy {
        name: String,
        strategy: crate::model::Strategy,
    },
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
    /// least-connections, power-of-two, resource-aware or adaptive.
    #[arg(long, default_value = "maglev")]
    pub strategy: crate::model::Strategy,
}

#[derive(Subcommand, Debug)]
pub enum BackendCmd {
    /// Register a backend with a service; with --ttl it must heartbeat
    /// (`lb backend heartbeat`) within that many seconds, or it is drained, then removed.
    Add {
        #[command(flatten)]
        backend: BackendArgs,
        /// Seconds (1..=86400) within which the backend must heartbeat.
        #[arg(long)]
        ttl: Option<f64>,
        /// Seconds (1..=86400) a drained registration is kept before it is removed (default:
        /// the daemon's deregister_after, 60). Needs --ttl.
        #[arg(long, requires = "ttl")]
        deregister_after: Option<f64>,
    },
    /// Renew the TTL of a backend registered with --ttl (a drained one takes new flows again).
    Heartbeat { service: String, id: String },
    /// Deregister a backend.
    Remove { service: String, id: String },
    /// Change a backend's weight (0 drains it: no new flows).
    Weight {
        service: String,
        id: String,
        weight: u32,
    },
    /// Set a backend's external health score, 0..1 (0 excludes it); it multiplies the score
    /// of the active checks.
    Health {
        service: String,
        id: String,
        #[arg(value_parser = parse_score)]
        score: f64,
        /// Seconds until the score expires (default: never).
        #[arg(long)]
        ttl: Option<f64>,
    },
    /// Report a backend's own load (resource-aware services weigh by it): CPU and memory in
    /// use (0..1), open connections (against its maxconn).
    Load {
        service: String,
        id: String,
        #[arg(long, value_parser = parse_score)]
        cpu: Option<f64>,
        #[arg(long, value_parser = parse_score)]
        memory: Option<f64>,
        #[arg(long)]
        connections: Option<u64>,
        /// Seconds the report holds (default 30, at most 3600).
        #[arg(long)]
        ttl: Option<f64>,
    },
}

#[derive(Args, Debug)]
pub struct BackendArgs {
    pub service: String,
    pub id: String,
    #[arg(long)]
    pub address: IpAddr,
    /// Defaults to the service port.
    #[arg(long)]
    pub port: Option<u16>,
    #[arg(long, default_value_t = config::DEFAULT_WEIGHT)]
    pub weight: u32,
    #[arg(long)]
    pub region: Option<String>,
    #[arg(long)]
    pub zone: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum PlanCmd {
    /// A backend's new weight.
    Weight {
        service: String,
        id: String,
        weight: u32,
    },
    /// A new backend.
    AddBackend(BackendArgs),
    RemoveBackend {
        service: String,
        id: String,
    },
    /// A service's new strategy.
    Strategy {
        service: String,
        strategy: crate::model::Strategy,
    },
    /// A whole config file (its services; [daemon] is not previewed).
    Config {
        file: std::path::PathBuf,
    },
}

fn backend_spec(a: &BackendArgs) -> BackendSpec {
    BackendSpec {
        id: a.id.clone(),
        address: a.address,
        port: a.port,
        weight: a.weight,
        region: a.region.clone(),
        zone: a.zone.clone(),
        labels: Default::default(),
        health: None,
        max_new_flows_per_s: None,
        maxconn: None,
        allow_link_local: false,
    }
}

/// A health score: a number in 0..=1 (JSON has no NaN, so it is refused here).
fn parse_score(text: &str) -> Result<f64, String> {
    let v: f64 = text.parse().map_err(|_| format!("{text:?} is not a number"))?;
    if !(v.is_finite() && (0.0..=1.0).contains(&v)) {
        return Err(format!("{text} is out of range 0..=1"));
    }
    Ok(v)
}

/// Runs a client verb. Returns the process exit code.
pub fn run_client(cli: &Cli) -> anyhow::Result<i32> {
    let request = match &cli.command {
        Command::Daemon { .. } | Command::Detach | Command::BackendHost(_) => unreachable!("handled by main"),
        Command::Top { once } => {
            let socket = config::socket_path(&cli.run_dir, &cli.instance);
            if *once {
                print!("{}", crate::top::once(&socket)?);
            } else {
                crate::top::live(&socket)?;
            }
            return Ok(0);
        }
        Command::Status => Request::Status,
        Command::Service(ServiceCmd::List) => Request::ListServices,
        Command::Service(ServiceCmd::Add(a)) => Request::AddService {
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
                health: None,
                max_new_flows_per_s: None,
                on_shed: Default::default(),
                resource: None,
                adaptive: None,
                announce: Default::default(),
                strategy: a.strategy,
                backends: Vec::new(),
            },
        },
        Command::Service(ServiceCmd::Remove { name }) => Request::RemoveService { name: name.clone() },
        Command::Service(ServiceCmd::Strategy { name, strategy }) => Request::SetStrategy {
            service: name.clone(),
            strategy: *strategy,
        },
        Command::Backend(BackendCmd::Add {
            backend: a,
            ttl,
            deregister_after,
        }) => Request::AddBackend {
            service: a.service.clone(),
            backend: backend_spec(a),
            ttl: *ttl,
            deregister_after: *deregister_after,
        },
        Command::Backend(BackendCmd::Heartbeat { service, id }) => Request::Heartbeat {
            service: service.clone(),
            id: id.clone(),
        },
        Command::Backend(BackendCmd::Remove { service, id }) => Request::RemoveBackend {
            service: service.clone(),
            id: id.clone(),
        },
        Command::Backend(BackendCmd::Weight { service, id, weight }) => Request::SetWeight {
            service: service.clone(),
            id: id.clone(),
            weight: *weight,
        },
        Command::Backend(BackendCmd::Health {
            service,
            id,
            score,
            ttl,
        }) => Request::SetHealth {
            service: service.clone(),
            id: id.clone(),
            score: *score,
            ttl: *ttl,
        },
        Command::Backend(BackendCmd::Load {
            service,
            id,
            cpu,
            memory,
            connections,
            ttl,
        }) => Request::ReportLoad {
            service: service.clone(),
            id: id.clone(),
            report: crate::status::load::LoadReport {
                cpu: *cpu,
                memory: *memory,
                connections: *connections,
            },
            ttl: *ttl,
        },
        Command::Stats => Request::Stats,
        Command::Health { service } => Request::Health {
            service: service.clone(),
        },
        Command::Lookup { protocol, src, dst } => Request::Lookup {
            protocol: *protocol,
            src: *src,
            dst: *dst,
        },
        Command::Reload => Request::Reload,
        Command::Geo(GeoCmd::Show) => Request::Geo,
        Command::Geo(GeoCmd::Reload) => Request::GeoReload,
        Command::Shutdown => Request::Shutdown,
        Command::Node(NodeCmd::Drain { wait }) => return drain(cli, *wait),
        Command::Node(NodeCmd::Undrain) => Request::Undrain,
        Command::Node(NodeCmd::Status) => Request::Node,
        Command::Cluster(ClusterCmd::Status) => Request::Cluster,
        Command::Cluster(ClusterCmd::Push { file }) => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            // Checked here first, so a bad file says where without a daemon.
            config::Config::parse(&text)?;
            Request::ClusterPush { text }
        }
        Command::Plan(p) => {
            use crate::control::preview::PlanChange;
            Request::Plan {
                change: match p {
                    PlanCmd::Weight { service, id, weight } => PlanChange::Weight {
                        service: service.clone(),
                        id: id.clone(),
                        weight: *weight,
                    },
                    PlanCmd::AddBackend(a) => PlanChange::AddBackend {
                        service: a.service.clone(),
                        backend: Box::new(backend_spec(a)),
                    },
                    PlanCmd::RemoveBackend { service, id } => PlanChange::RemoveBackend {
                        service: service.clone(),
                        id: id.clone(),
                    },
                    PlanCmd::Strategy { service, strategy } => PlanChange::Strategy {
                        service: service.clone(),
                        strategy: *strategy,
                    },
                    PlanCmd::Config { file } => PlanChange::Config {
                        text: std::fs::read_to_string(file)
                            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?,
                    },
                },
            }
        }
    };
    let socket = config::socket_path(&cli.run_dir, &cli.instance);
    let response = api::call(&socket, &request, Duration::from_secs(30))?;
    for w in &response.warnings {
        eprintln!("warning: {w}");
    }
    if !response.ok {
        eprintln!("error: {}", response.error.as_deref().unwrap_or("unknown error"));
        return Ok(1);
    }
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&response.data)?);
    } else {
        print_human(&cli.command, &response.data);
    }
    Ok(0)
}

/// `lb node drain`: withdraws, then (with `wait`) watches the VIPs' packet counters until a
/// second passes with none, or the bound.
fn drain(cli: &Cli, wait: Option<u64>) -> anyhow::Result<i32> {
    let socket = config::socket_path(&cli.run_dir, &cli.instance);
    let call = |r: &Request| -> anyhow::Result<Value> {
        let response = api::call(&socket, r, Duration::from_secs(30))?;
        for w in &response.warnings {
            eprintln!("warning: {w}");
        }
        if !response.ok {
            anyhow::bail!("{}", response.error.as_deref().unwrap_or("unknown error"));
        }
        Ok(response.data)
    };
    let data = call(&Request::Drain)?;
    let packets = |d: &Value| d["vip_packets"].as_u64().unwrap_or(0);
    let mut last = packets(&data);
    let mut arriving = None;
    if let Some(bound) = wait {
        let until = std::time::Instant::now() + Duration::from_secs(bound);
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let now = packets(&call(&Request::Node)?);
            let per_s = now.saturating_sub(last);
            last = now;
            arriving = Some(per_s);
            if per_s == 0 || std::time::Instant::now() >= until {
                break;
            }
        }
    }
    let announced = data["bgp"]["announced"].as_array().map_or(0, Vec::len);
    if cli.json {
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

fn print_bgp(bgp: &Value) {
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

fn print_cluster(data: &Value) {
    println!(
        "cluster {} node {}: etcd {}, applied revision {}{}",
        data["name"].as_str().unwrap_or_default(),
        data["node"].as_str().unwrap_or_default(),
        if data["connected"] == true {
            "connected"
        } else {
            "unreachable"
        },
        data["applied_revision"],
        data["error"]
            .as_str()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    );
    for n in data["nodes"].as_array().into_iter().flatten() {
        let digests: Vec<String> = n["digests"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(s, d)| format!("{s}={}", d.as_str().unwrap_or_default()))
            .collect();
        println!(
            "  {:<16} revision {:<8} {}",
            n["node"].as_str().unwrap_or_default(),
            n["applied_revision"],
            digests.join(" ")
        );
    }
}

fn print_human(command: &Command, data: &Value) {
    match command {
        Command::Cluster(ClusterCmd::Status) => print_cluster(data),
        Command::Node(_) => print_bgp(&data["bgp"]),
        Command::Service(ServiceCmd::List) => {
            for s in data.as_array().into_iter().flatten() {
                let strategy = s["strategy"].as_str().unwrap_or("maglev");
                let in_effect = s["in_effect"].as_str().unwrap_or(strategy);
                let counting =
                    matches!(in_effect, "least-connections" | "power-of-two") || strategy == "adaptive";
                println!(
                    "{} {}:{}/{} table={} hash={} forwarding={}{}{}",
                    s["name"].as_str().unwrap_or_default(),
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
                for b in s["backends"].as_array().into_iter().flatten() {
                    println!(
                        "  {:<16} {:<24} port={:<5} weight={:<5} slots={:<6} {}{}{}",
                        b["id"].as_str().unwrap_or_default(),
                        fmt_ip(&b["address"]),
                        b["port"],
                        b["weight"],
                        b["table_slots"],
                        fmt_registration(&b["registration"]),
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
        Command::Plan(_) => {
            for s in data["services"].as_array().into_iter().flatten() {
                let name = s["service"].as_str().unwrap_or_default();
                if s["removed"] == true {
                    println!(
                        "{name}: removed; {} live flows lose their backend",
                        s["live_flows"]
                    );
                    continue;
                }
                let moved = match (s["entries_moved"].as_u64(), s["share_moved"].as_f64()) {
                    (Some(m), Some(f)) => format!("{m} moved ({:.1}%)", f * 100.0),
                    _ => "new".to_string(),
                };
                println!(
                    "{name}: {} {} entries, {moved}; {} live flows, {} would change backend if their entry were lost",
                    s["strategy"].as_str().unwrap_or_default(),
                    s["entries"],
                    s["live_flows"],
                    s["flows_moving_if_lost"],
                );
            }
        }
        Command::Stats => {
            for s in data["services"].as_array().into_iter().flatten() {
                println!(
                    "{:<20} packets={:<10} bytes={:<12} new_flows={}",
                    s["name"].as_str().unwrap_or_default(),
                    s["packets"],
                    s["bytes"],
                    s["new_flows"]
                );
                for b in s["backends"].as_array().into_iter().flatten() {
                    println!(
                        "  {:<18} packets={:<10} bytes={:<12} new_flows={}",
                        b["id"].as_str().unwrap_or_default(),
                        b["packets"],
                        b["bytes"],
                        b["new_flows"]
                    );
                }
            }
            println!("counters:");
            for (name, value) in data["counters"].as_object().into_iter().flatten() {
                if value.as_u64() != Some(0) {
                    println!("  {name:<24} {value}");
                }
            }
            let nat = &data["nat"];
            println!(
                "nat: connections={} half_open={} entries={} snat_ports_in_use={} expired={}",
                nat["connections"],
                nat["half_open"],
                nat["entries"],
                nat["snat_ports_in_use"],
                nat["expired"]
            );
        }
        Command::Health { .. } => {
            for s in data.as_array().into_iter().flatten() {
                println!(
                    "{}{}",
                    s["service"].as_str().unwrap_or_default(),
                    if s["panic"] == true { " PANIC" } else { "" }
                );
                for b in s["backends"].as_array().into_iter().flatten() {
                    let check = &b["check"];
                    let last = if check.is_null() {
                        "not checked".to_string()
                    } else {
                        let l = &check["last"];
                        format!(
                            "{} {}: {} ({:.1} ms) since {}",
                            check["kind"].as_str().unwrap_or_default(),
                            check["target"].as_str().unwrap_or_default(),
                            l["detail"].as_str().unwrap_or("no result yet"),
                            l["latency_ms"].as_f64().unwrap_or(0.0),
                            check["reason"].as_str().unwrap_or_default(),
                        )
                    };
                    let breaker = check["breaker"]
                        .as_str()
                        .map(|x| format!(" breaker={x}"))
                        .unwrap_or_default();
                    let agent = &b["agent"];
                    let agent = if agent.is_null() {
                        String::new()
                    } else {
                        format!(" agent=\"{}\"", agent["last"].as_str().unwrap_or_default())
                    };
                    let external = b["external"]["score"]
                        .as_f64()
                        .map(|x| format!(" external={x}"))
                        .unwrap_or_default();
                    let load = &b["load"];
                    let external = if load.is_null() {
                        external
                    } else {
                        format!(
                            "{external} load={:.2} factor={:.2}",
                            load["smoothed"].as_f64().unwrap_or(0.0),
                            load["factor"].as_f64().unwrap_or(1.0)
                        )
                    };
                    println!(
                        "  {:<16} {:<5} score={:<4} weight={}/{}{external}{breaker}{agent} {}{last}",
                        b["id"].as_str().unwrap_or_default(),
                        b["state"].as_str().unwrap_or_default(),
                        b["health_score"],
                        b["effective_weight"],
                        b["weight"],
                        fmt_registration(&b["registration"]),
                    );
                }
            }
        }
        Command::Lookup { .. } => println!(
            "{} -> {} ({}) via {}",
            data["service"].as_str().unwrap_or_default(),
            data["backend"].as_str().unwrap_or_default(),
            fmt_ip(&data["address"]),
            data["source"].as_str().unwrap_or_default()
        ),
        _ => match data {
            Value::String(s) => println!("{s}"),
            other => println!("{}", serde_json::to_string_pretty(other).unwrap_or_default()),
        },
    }
}

/// A registration with a TTL, for the human listings: when the heartbeat is due, or why the
/// backend is drained. Empty without one.
fn fmt_registration(r: &Value) -> String {
    if r.is_null() {
        return String::new();
    }
    match r["reason"].as_str() {
        Some(reason) => format!("drained: {reason}; "),
        None => format!(
            "ttl={}s heartbeat due in {:.1} s; ",
            r["ttl_s"],
            r["heartbeat_due_in_s"].as_f64().unwrap_or(0.0)
        ),
    }
}

fn fmt_ip(v: &Value) -> String {
    v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn instance_is_checked_at_parse_time() {
        let parse = |instance: &str| Cli::try_parse_from(["lb", "--instance", instance, "detach"]);
        for good in ["default", "edge-1", "a_b", &"x".repeat(32)] {
            assert_eq!(parse(good).expect(good).instance, good);
        }
        assert_eq!(Cli::try_parse_from(["lb", "detach"]).unwrap().instance, "default");
        for bad in [
            "/some/dir",
            "..",
            ".",
            "",
            "a.b",
            "a b",
            "a\u{1b}[2J",
            &"x".repeat(33),
        ] {
            let e = parse(bad).expect_err(bad).to_string();
            let first = e.lines().next().unwrap_or_default();
            assert!(first.contains("invalid instance"), "{bad:?}: {first}");
        }
    }
}
