//! The other inputs, fuzzed with proptest: config files (TOML), CLI arguments, the control
//! protocol's service bodies, agent-check replies and geo data files (CSV and MaxMind). For
//! each: never a panic, and either a valid result or a one-line error.
//!
//! Inputs are mutations of valid ones (bytes inserted, deleted and replaced, lines dropped and
//! repeated) and token soups, so most reach deep into the parsers rather than failing on the
//! first byte. The test command runs `LB_FUZZ_INPUT_CASES` (default 2,000) cases per target;
//! `cargo xtask fuzz` runs each target for `LB_FUZZ_INPUT_SECONDS` (60).

use std::time::{Duration, Instant};

use proptest::{
    prelude::*,
    test_runner::{Config, RngAlgorithm, TestRng, TestRunner},
};

const CONFIG: &str = r#"[daemon]
instance = "fz"
interfaces = ["eth0"]
conntrack_size = 65536

[daemon.geo]
data = "/nonexistent/geo.csv"
default_region = "eu"
failover = { eu = ["us"], us = ["eu"] }

[[service]]
name = "web"
vip = "10.0.0.1"
port = 80
protocol = "tcp"
strategy = "least-connections"
max_new_flows_per_s = 1000
resource = { smoothing = 0.5, max_move = 0.1 }

[service.health]
kind = "http"
path = "/health"
https = true
interval = 1.0
timeout = 0.5
error_threshold = 3
agent_port = 9000

[[service.backend]]
id = "a"
address = "10.0.1.1"
weight = 100
region = "eu"
maxconn = 500

[[service.backend]]
id = "b"
address = "fd00::2"
port = 8080
weight = 0
"#;

const SERVICE_JSON: &str = r#"{"name":"api","vip":"10.0.0.2","port":443,"protocol":"tcp","strategy":"adaptive","adaptive":{"dwell":5.0},"forwarding":"nat","snat":true,"backend":[{"id":"x","address":"10.0.2.1","port":8443,"weight":50}]}"#;

const CSV: &str = "# prefix,region\n10.0.0.0/8,eu\n2001:db8::/32,us\n192.0.2.7,eu\n";

/// A mutation of `seed`: up to 8 edits of bytes or whole lines.
fn mutated(seed: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let edit = prop_oneof![
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| (0u8, i, b)),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| (1u8, i, b)),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| (2u8, i, b)),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| (3u8, i, b)),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| (4u8, i, b)),
    ];
    prop::collection::vec(edit, 0..8).prop_map(move |edits| {
        let mut bytes = seed.as_bytes().to_vec();
        for (kind, at, b) in edits {
            if bytes.is_empty() {
                bytes.push(b);
                continue;
            }
            let i = at.index(bytes.len());
            match kind {
                0 => bytes[i] = b,
                1 => bytes.insert(i, b),
                2 => {
                    bytes.remove(i);
                }
                3 => {
                    // A digit or sign for a number, or a quote: the edits that reach validation.
                    bytes[i] = b"-09.e\"[]{}=,#\n"[usize::from(b) % 14];
                }
                _ => {
                    // Drop or repeat the line holding byte i.
                    let start = bytes[..i].iter().rposition(|&c| c == b'\n').map_or(0, |p| p + 1);
                    let end = bytes[i..]
                        .iter()
                        .position(|&c| c == b'\n')
                        .map_or(bytes.len(), |p| i + p + 1);
                    let line: Vec<u8> = bytes[start..end].to_vec();
                    if b % 2 == 0 {
                        bytes.drain(start..end);
                    } else {
                        bytes.splice(start..start, line);
                    }
                }
            }
        }
        bytes
    })
}

/// Runs `property` on `strategy`'s values: `LB_FUZZ_INPUT_CASES` cases, or for
/// `LB_FUZZ_INPUT_SECONDS` when set. Returns the cases run.
fn fuzz<S: Strategy>(name: &str, strategy: S, property: impl Fn(S::Value) -> Result<(), String>) -> u64
where
    S::Value: std::fmt::Debug,
{
    let seconds: Option<u64> = std::env::var("LB_FUZZ_INPUT_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok());
    let cases: u32 = std::env::var("LB_FUZZ_INPUT_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let seed: u64 = std::env::var("LB_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand_seed(name));
    println!("fuzz {name}: LB_FUZZ_SEED={seed}");
    let started = Instant::now();
    let mut total = 0u64;
    let mut round = 0u64;
    loop {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.wrapping_add(round).to_le_bytes());
        let mut runner = TestRunner::new_with_rng(
            Config {
                cases: if seconds.is_some() { 5_000 } else { cases },
                failure_persistence: None,
                ..Config::default()
            },
            TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
        );
        let result = runner.run(&strategy, |v| {
            property(v).map_err(proptest::test_runner::TestCaseError::fail)
        });
        if let Err(e) = result {
            panic!("fuzz {name}: LB_FUZZ_SEED={seed} round {round}: {e}");
        }
        total += u64::from(runner.config().cases);
        round += 1;
        match seconds {
            Some(s) if started.elapsed() < Duration::from_secs(s) => continue,
            _ => break,
        }
    }
    println!(
        "fuzz {name}: {total} cases in {:.1} s, no panic, every error one line",
        started.elapsed().as_secs_f64()
    );
    total
}

fn fastrand_seed(name: &str) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    name.bytes().fold(now, |h, b| h.rotate_left(5) ^ u64::from(b))
}

fn one_line(what: &str, e: &str) -> Result<(), String> {
    if e.contains('\n') || e.trim().is_empty() {
        return Err(format!("{what}: not one line: {e:?}"));
    }
    Ok(())
}

/// Catches a panic as a failure of the case (proptest would too, but say what panicked).
fn no_panic<T>(what: &str, f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Result<T, String> {
    std::panic::catch_unwind(f).map_err(|_| format!("{what} panicked"))
}

#[test]
fn config_files() {
    fuzz("config", mutated(CONFIG), |bytes| {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        match no_panic("Config::parse", || lb_userspace::config::Config::parse(&text))? {
            Ok(_) => Ok(()),
            Err(e) => one_line("config error", &e.to_string()),
        }
    });
}

#[test]
fn control_protocol_service_bodies() {
    fuzz("service body", mutated(SERVICE_JSON), |bytes| {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        no_panic("service body", || {
            match serde_json::from_str::<lb_userspace::config::ServiceSpec>(&text) {
                Ok(spec) => {
                    let s = lb_userspace::model::Service::from(spec);
                    match s.validate() {
                        Ok(()) => Ok(()),
                        Err(e) => one_line("service error", &e.to_string()),
                    }
                }
                // As the API answers a body it cannot read (serde quotes the field names it
                // did not expect, control characters and all).
                Err(e) => one_line(
                    "json error",
                    &lb_userspace::api::failure::one_line(&e.to_string()),
                ),
            }
        })?
    });
}

#[test]
fn cli_arguments() {
    const TOKENS: &[&str] = &[
        "service",
        "backend",
        "add",
        "remove",
        "weight",
        "health",
        "load",
        "strategy",
        "list",
        "plan",
        "geo",
        "show",
        "reload",
        "lookup",
        "stats",
        "top",
        "--once",
        "--cpu",
        "--memory",
        "--connections",
        "--ttl",
        "--strategy",
        "--vip",
        "--port",
        "--protocol",
        "--forwarding",
        "--address",
        "--weight",
        "-p",
        "--src",
        "--dst",
        "web",
        "b1",
        "0.5",
        "1.5",
        "-1",
        "nan",
        "10.0.0.1:80",
        "[fd00::1]:80",
        "tcp",
        "udp",
        "geo",
        "maglev",
        "adaptive",
        "resource-aware",
        "99999999999",
        "",
        "--json",
        "--instance",
        "x y",
    ];
    let args = prop::collection::vec(prop::sample::select(TOKENS), 0..8);
    fuzz("cli", args, |args| {
        no_panic("CLI parse", || {
            use clap::Parser;
            match lb_userspace::cli::Cli::try_parse_from(std::iter::once("lb").chain(args.iter().copied())) {
                // What main prints: the first line of clap's message.
                Err(e) => one_line("cli error", e.render().to_string().lines().next().unwrap_or("")),
                Ok(_) => Ok(()),
            }
        })?
    });
}

#[test]
fn agent_replies() {
    const WORDS: &[&str] = &[
        "up",
        "down",
        "fail",
        "stopped",
        "maint",
        "drain",
        "ready",
        "50%",
        "weight:10%",
        "weight:7",
        "maxconn:30",
        "#reason",
        "100%",
        "101%",
        "-5%",
        "weight:",
        "maxconn:",
        "maxconn:0",
        "maxconn:99999999999",
        "%",
        ",",
        " ",
        "\t",
        "weight:100000",
        "é",
        "\u{0}",
    ];
    let line = prop_oneof![
        prop::collection::vec(prop::sample::select(WORDS), 0..6).prop_map(|w| w.join(" ")),
        ".{0,40}",
    ];
    fuzz("agent", line, |line| {
        let state = lb_userspace::status::AgentState::default();
        match no_panic("agent::apply", || {
            lb_userspace::health::agent::apply(&state, &line)
        })? {
            Ok(next) => {
                let w = next.weight(100);
                if w > lb_userspace::model::MAX_WEIGHT {
                    return Err(format!("{line:?} gave weight {w}"));
                }
                Ok(())
            }
            Err(e) => one_line("agent error", &e),
        }
    });
}

#[test]
fn geo_data_files() {
    let geo = lb_userspace::model::geo_settings::GeoSettings {
        data: None,
        default_region: "eu".into(),
        failover: [("eu".to_string(), vec!["us".to_string()])].into_iter().collect(),
        countries: [("DE".to_string(), "eu".to_string())].into_iter().collect(),
        continents: Default::default(),
    };
    let g = geo.clone();
    fuzz("geo csv", mutated(CSV), move |bytes| {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        match no_panic("parse_csv", || lb_userspace::strategy::geo::parse_csv(&text, &g))? {
            Ok(prefixes) => {
                if prefixes
                    .iter()
                    .any(|p| p.len > if p.addr.is_ipv4() { 32 } else { 128 })
                {
                    return Err(format!("{text:?}: a prefix longer than its address"));
                }
                Ok(())
            }
            Err(e) => one_line("geo csv error", &e),
        }
    });
    fuzz(
        "geo mmdb",
        prop::collection::vec(any::<u8>(), 0..512),
        move |bytes| match no_panic("parse_mmdb", || {
            lb_userspace::strategy::geo::parse_mmdb(bytes, &geo)
        })? {
            Ok(_) => Ok(()),
            Err(e) => one_line("geo mmdb error", &e),
        },
    );
}
