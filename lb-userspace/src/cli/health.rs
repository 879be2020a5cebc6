//! `lb health`: each backend's state, score and its inputs, last check, since when.

use clap::Args;
use serde_json::Value;

use super::shared::{fmt_drain, fmt_registration, fmt_weight};
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
        "  {:<16} {:<7} score={:<4} weight={}{external}{breaker}{agent} {}{}{last}",
        b["id"].as_str().unwrap_or_default(),
        b["state"].as_str().unwrap_or_default(),
        b["health_score"],
        fmt_weight(b),
        fmt_registration(&b["registration"]),
        fmt_drain(&b["drain"]),
    );
}
