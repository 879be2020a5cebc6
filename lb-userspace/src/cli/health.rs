//! `lb health`: each backend's state, score and its inputs, last check, since when.

use clap::Args;
use serde_json::Value;

use super::shared::{fmt_age, fmt_drain, fmt_registration, fmt_weight};
use crate::api::Request;

#[derive(Args, Debug)]
pub struct HealthArgs {
    /// Only this service.
    pub service: Option<String>,
}

pub fn request(args: &HealthArgs) -> Request {
    Request::Health {
        service: args.service.clone(),
    }
}

pub fn print(data: &Value) {
    for s in data.as_array().into_iter().flatten() {
        println!(
            "{}{}",
            s["service"].as_str().unwrap_or_default(),
            if s["panic"] == true { " PANIC" } else { "" }
        );
        for b in s["backends"].as_array().into_iter().flatten() {
            print_backend(b);
        }
    }
}

fn print_backend(b: &Value) {
    let check = &b["check"];
    let last = if check.is_null() {
        "not checked".to_string()
    } else {
        let l = &check["last"];
        // The daemon's wall clock, read on the same host.
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let age = check["since_ms"]
            .as_u64()
            .map(|since| fmt_age(now_ms.saturating_sub(since) as f64 / 1000.0))
            .unwrap_or_else(|| "?".to_string());
        // Until a first change, `since_ms` is when checking started, and the reason says only
        // that it checks.
        let reason = check["reason"].as_str().unwrap_or_default();
        let state = match (check["transitions"].as_u64().unwrap_or(0), reason) {
            (0, "checked") => format!("checked for {age}"),
            (0, _) => format!("checked for {age}: {reason}"),
            (_, _) => format!("in this state for {age}: {reason}"),
        };
        format!(
            "{} {}: {} ({:.1} ms), {state}",
            check["kind"].as_str().unwrap_or_default(),
            check["target"].as_str().unwrap_or_default(),
            l["detail"].as_str().unwrap_or("no result yet"),
            l["latency_ms"].as_f64().unwrap_or(0.0),
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
        "  {:<16} {:<7} score={:<4} weight={}{external}{breaker}{agent} {}{}{last}",
        b["id"].as_str().unwrap_or_default(),
        b["state"].as_str().unwrap_or_default(),
        b["health_score"],
        fmt_weight(b),
        fmt_registration(&b["registration"]),
        fmt_drain(&b["drain"]),
    );
}
