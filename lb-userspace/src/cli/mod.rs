//! Command line: `lb daemon` runs the daemon; every other verb talks to it over its socket,
//! but for `detach` and `backend-host`, which act on this host. One file per verb: its
//! arguments, the request it makes, and how it prints the answer.

mod backend;
mod backend_host;
mod cluster;
mod config;
mod detach;
mod generate;
mod geo;
mod health;
mod lookup;
mod node;
mod plan;
mod service;
mod shared;
mod stats;
mod status;

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};

use self::shared::{call, print_plain};
pub use self::{
    backend::{BackendArgs, BackendCmd},
    backend_host::{BackendHostArgs, BackendHostCmd},
    cluster::ClusterCmd,
    config::ConfigCmd,
    generate::{GenerateArgs, Generated},
    geo::GeoCmd,
    health::HealthArgs,
    lookup::LookupArgs,
    node::NodeCmd,
    plan::PlanCmd,
    service::{ServiceArgs, ServiceCmd},
};
use crate::api::Request;

#[derive(Parser, Debug)]
#[command(
    name = "lb",
    version,
    about = "XDP layer-4 load balancer: daemon and control CLI",
    after_long_help = "Files: /etc/lb/lb.toml, the config (`lb config check` validates it); \
        /run/lb/INSTANCE.sock and INSTANCE.state.json, the daemon's socket and state; \
        /sys/fs/bpf/INSTANCE, its pins. \
        Each verb has a man page, lb-VERB(8). Documentation: /usr/share/doc/lb, docs/ in the source."
)]
pub struct Cli {
    /// Daemon instance to talk to (names its socket and its pins under /sys/fs/bpf).
    #[arg(long, global = true, env = "LB_INSTANCE", default_value = "default", value_parser = parse_instance)]
    pub instance: String,
    /// Directory of the daemon's control socket.
    #[arg(long, global = true, env = "LB_RUN_DIR", default_value = "/run/lb")]
    pub run_dir: PathBuf,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// The CLI's definition as `lb` runs it, with its version (built at run time: the commit and the
/// eBPF object's hash); the man pages and completions are made from this too.
pub fn command() -> clap::Command {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    Cli::command().version(VERSION.get_or_init(crate::version).as_str())
}

/// Checked at parse time: `lb detach` removes files at paths made from the name.
fn parse_instance(name: &str) -> crate::error::Result<String> {
    crate::config::validate_instance(name).map(|()| name.to_string())
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
    /// Check a config file as the daemon would (no daemon needed), or show the running
    /// daemon's effective config.
    #[command(subcommand)]
    Config(ConfigCmd),
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
    Health(HealthArgs),
    /// Show which backend a flow gets.
    Lookup(LookupArgs),
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
    /// Write the man pages (section 8) or the bash, zsh and fish completions into a directory,
    /// made from this CLI's own definition (the Debian package ships them).
    Generate(GenerateArgs),
}

/// Runs every verb but `daemon`. Returns the process exit code.
pub fn run(cli: &Cli) -> anyhow::Result<i32> {
    let socket = crate::config::socket_path(&cli.run_dir, &cli.instance);
    let request = match &cli.command {
        Command::Daemon { .. } => unreachable!("handled by main"),
        Command::Detach => return detach::run(&cli.run_dir, &cli.instance, cli.json),
        Command::BackendHost(cmd) => return backend_host::run(cmd, cli.json),
        Command::Generate(args) => return generate::run(args, command()),
        Command::Top { once } => {
            if *once {
                print!("{}", crate::top::once(&socket)?);
            } else {
                crate::top::live(&socket)?;
            }
            return Ok(0);
        }
        Command::Node(NodeCmd::Drain { wait }) => return node::drain(&socket, cli.json, *wait),
        Command::Config(ConfigCmd::Check { file }) => return config::check(file, cli.json),
        Command::Config(ConfigCmd::Show) => Request::Config,
        Command::Status => Request::Status,
        Command::Service(cmd) => service::request(cmd),
        Command::Backend(cmd) => backend::request(cmd),
        Command::Stats => Request::Stats,
        Command::Health(args) => health::request(args),
        Command::Lookup(args) => lookup::request(args),
        Command::Reload => Request::Reload,
        Command::Geo(cmd) => geo::request(cmd),
        Command::Shutdown => Request::Shutdown,
        Command::Node(cmd) => node::request(cmd),
        Command::Cluster(cmd) => cluster::request(cmd)?,
        Command::Plan(cmd) => plan::request(cmd)?,
    };
    let mut data = call(&socket, &request)?;
    if let Command::Backend(BackendCmd::List { service, labels }) = &cli.command {
        data = backend::list(service.as_deref(), labels, &data)?;
    }
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&data)?);
        return Ok(0);
    }
    match &cli.command {
        Command::Service(cmd) => service::print(cmd, &data),
        Command::Stats => stats::print(&data),
        Command::Status => status::print(&data),
        Command::Health(_) => health::print(&data),
        Command::Lookup(_) => lookup::print(&data),
        Command::Node(_) => node::print(&data),
        Command::Cluster(cmd) => cluster::print(cmd, &data),
        Command::Plan(_) => plan::print(&data),
        Command::Config(_) => config::print(&data)?,
        Command::Backend(BackendCmd::List { .. }) => backend::print_list(&data),
        _ => print_plain(&data),
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;
    use crate::model::Strategy;

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

    /// `--strategy` takes every strategy, geo included, and its help names each; a geo
    /// service's backends take a region and a zone.
    #[test]
    fn service_add_takes_and_names_every_strategy() {
        let mut cli = Cli::command();
        let add = cli
            .find_subcommand_mut("service")
            .and_then(|s| s.find_subcommand_mut("add"))
            .expect("service add");
        let help = add.render_long_help().to_string();
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        for s in Strategy::ALL {
            assert!(help.contains(s.name()), "{}: {help}", s.name());
            let parsed = Cli::try_parse_from([
                "lb",
                "service",
                "add",
                "g",
                "--vip",
                "10.0.0.1",
                "--port",
                "80",
                "--strategy",
                s.name(),
            ])
            .unwrap_or_else(|e| panic!("{}: {e}", s.name()));
            assert!(
                matches!(&parsed.command, Command::Service(ServiceCmd::Add(a)) if a.strategy == s),
                "{}",
                s.name()
            );
        }
        let parsed = Cli::try_parse_from([
            "lb",
            "backend",
            "add",
            "g",
            "b1",
            "--address",
            "10.0.1.1",
            "--region",
            "eu",
            "--zone",
            "eu-1a",
        ])
        .expect("backend add");
        let Command::Backend(BackendCmd::Add { backend: b, .. }) = parsed.command else {
            panic!("backend add");
        };
        let spec = b.spec();
        assert_eq!(
            (spec.region.as_deref(), spec.zone.as_deref()),
            (Some("eu"), Some("eu-1a"))
        );
    }
}
