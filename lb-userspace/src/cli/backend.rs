//! `lb backend`: register, deregister and reweight backends; report their health score and
//! their own load.

use std::net::IpAddr;

use clap::{Args, Subcommand};
use serde_json::Value;

use super::shared::{fmt_drain, fmt_ip, fmt_labels, fmt_weight};
use crate::{
    api::Request,
    config::{self, BackendSpec},
    status::load::LoadReport,
};

#[derive(Subcommand, Debug)]
pub enum BackendCmd {
    /// List backends (of one service, or all), with where each comes from and its labels;
    /// --label keeps those whose labels have every pair given.
    List {
        service: Option<String>,
        /// A label the backend must have, `key=value` (repeatable: all must match).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
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
    /// Drain a backend: no new flows, its established flows go on, its weight is kept (a
    /// reload and a restart keep the drain too) until `lb backend undrain`.
    Drain { service: String, id: String },
    /// Lift `lb backend drain`: the backend takes new flows at its weight again, through its
    /// slow start as after a recovery.
    Undrain { service: String, id: String },
    /// Change a backend's weight (0: no new flows; `lb backend drain` keeps the weight).
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
    /// The backend's region: a geo service serves the region's clients from its backends
    /// (one of `[daemon.geo]`'s regions; required by geo services).
    #[arg(long)]
    pub region: Option<String>,
    /// The backend's zone within its region: kept and listed (`--json`), not used to pick.
    #[arg(long)]
    pub zone: Option<String>,
}

impl BackendArgs {
    pub fn spec(&self) -> BackendSpec {
        BackendSpec {
            id: self.id.clone(),
            address: self.address,
            port: self.port,
            weight: self.weight,
            region: self.region.clone(),
            zone: self.zone.clone(),
            labels: Default::default(),
            health: None,
            max_new_flows_per_s: None,
            maxconn: None,
            allow_link_local: false,
        }
    }
}

/// `key=value`, both non-empty.
fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{text:?} is not key=value")),
    }
}

/// `lb backend list`: every backend of the listed services, flattened with its service's
/// name, kept when it matches the service and every label asked for.
pub fn list(service: Option<&str>, labels: &[(String, String)], services: &Value) -> anyhow::Result<Value> {
    let all = services.as_array().cloned().unwrap_or_default();
    if let Some(name) = service
        && !all.iter().any(|s| s["name"] == name)
    {
        anyhow::bail!("unknown service {name}");
    }
    let mut out = Vec::new();
    for s in all.iter().filter(|s| service.is_none_or(|n| s["name"] == n)) {
        for b in s["backends"].as_array().into_iter().flatten() {
            if labels.iter().all(|(k, v)| b["labels"][k] == v.as_str()) {
                let mut b = b.clone();
                b["service"] = s["name"].clone();
                out.push(b);
            }
        }
    }
    Ok(Value::Array(out))
}

/// One line a backend: service, id, where it is, state, weight (effective/configured),
/// source, why it is drained, labels.
pub fn print_list(data: &Value) {
    for b in data.as_array().into_iter().flatten() {
        println!(
            "{:<16} {:<16} {:<24} port={:<5} {:<7} weight={:<11} source={:<12} {}{}",
            b["service"].as_str().unwrap_or_default(),
            b["id"].as_str().unwrap_or_default(),
            fmt_ip(&b["address"]),
            b["port"],
            b["health"].as_str().unwrap_or_default(),
            fmt_weight(b),
            b["source"].as_str().unwrap_or_default(),
            fmt_drain(&b["drain"]),
            fmt_labels(&b["labels"]),
        );
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

pub fn request(cmd: &BackendCmd) -> Request {
    match cmd {
        BackendCmd::List { .. } => Request::ListServices,
        BackendCmd::Add {
            backend: a,
            ttl,
            deregister_after,
        } => Request::AddBackend {
            service: a.service.clone(),
            backend: a.spec(),
            ttl: *ttl,
            deregister_after: *deregister_after,
        },
        BackendCmd::Heartbeat { service, id } => Request::Heartbeat {
            service: service.clone(),
            id: id.clone(),
        },
        BackendCmd::Remove { service, id } => Request::RemoveBackend {
            service: service.clone(),
            id: id.clone(),
        },
        BackendCmd::Drain { service, id } | BackendCmd::Undrain { service, id } => Request::DrainBackend {
            service: service.clone(),
            id: id.clone(),
            drained: matches!(cmd, BackendCmd::Drain { .. }),
        },
        BackendCmd::Weight { service, id, weight } => Request::SetWeight {
            service: service.clone(),
            id: id.clone(),
            weight: *weight,
        },
        BackendCmd::Health {
            service,
            id,
            score,
            ttl,
        } => Request::SetHealth {
            service: service.clone(),
            id: id.clone(),
            score: *score,
            ttl: *ttl,
        },
        BackendCmd::Load {
            service,
            id,
            cpu,
            memory,
            connections,
            ttl,
        } => Request::ReportLoad {
            service: service.clone(),
            id: id.clone(),
            report: LoadReport {
                cpu: *cpu,
                memory: *memory,
                connections: *connections,
            },
            ttl: *ttl,
        },
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn backend_list_keeps_a_service_and_every_label_asked_for() {
        let services = json!([
            {"name": "web", "backends": [
                {"id": "a", "labels": {"role": "canary", "zone": "z1"}},
                {"id": "b", "labels": {"role": "main"}},
                {"id": "c", "labels": {}},
            ]},
            {"name": "api", "backends": [{"id": "d", "labels": {"role": "canary"}}]},
        ]);
        let ids = |service: Option<&str>, labels: &[(&str, &str)]| -> Vec<String> {
            let labels: Vec<(String, String)> = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            list(service, &labels, &services)
                .unwrap()
                .as_array()
                .unwrap()
                .iter()
                .map(|b| format!("{}/{}", b["service"].as_str().unwrap(), b["id"].as_str().unwrap()))
                .collect()
        };
        assert_eq!(ids(None, &[]), ["web/a", "web/b", "web/c", "api/d"]);
        assert_eq!(ids(None, &[("role", "canary")]), ["web/a", "api/d"]);
        assert_eq!(ids(Some("web"), &[("role", "canary"), ("zone", "z1")]), ["web/a"]);
        assert!(ids(Some("web"), &[("role", "canary"), ("zone", "z2")]).is_empty());
        assert_eq!(
            list(Some("nope"), &[], &services).unwrap_err().to_string(),
            "unknown service nope"
        );
        assert_eq!(parse_label("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        for bad in ["a", "=b", "a="] {
            assert!(
                parse_label(bad).unwrap_err().contains("is not key=value"),
                "{bad}"
            );
        }
    }
}
