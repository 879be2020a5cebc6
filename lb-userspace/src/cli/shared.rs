//! What the verbs share: one call to the daemon, reading a file they send, and printing.

use std::{path::Path, time::Duration};

use serde_json::Value;

use crate::api::{self, Request};

/// One request to the daemon; its warnings go to stderr, a refusal is the error.
pub fn call(socket: &Path, request: &Request) -> anyhow::Result<Value> {
    let response = api::call(socket, request, Duration::from_secs(30))?;
    for w in &response.warnings {
        eprintln!("warning: {w}");
    }
    if !response.ok {
        anyhow::bail!("{}", response.error.as_deref().unwrap_or("unknown error"));
    }
    Ok(response.data)
}

/// An answer no verb prints its own way: a message as it is, anything else as JSON.
pub fn print_plain(data: &Value) {
    match data {
        Value::String(s) => println!("{s}"),
        other => println!("{}", serde_json::to_string_pretty(other).unwrap_or_default()),
    }
}

pub fn read_file(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
}

/// A backend's labels as `k=v,k=v` (empty without any).
pub fn fmt_labels(labels: &Value) -> String {
    let pairs: Vec<String> = labels
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    pairs.join(",")
}

pub fn fmt_ip(v: &Value) -> String {
    v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())
}

/// A registration with a TTL, for the human listings: when the heartbeat is due (a late one
/// is a drain: `fmt_drain` says it). Empty without one, or when drained.
pub fn fmt_registration(r: &Value) -> String {
    if r.is_null() || r["drained"] == true {
        return String::new();
    }
    format!(
        "ttl={}s heartbeat due in {:.1} s; ",
        r["ttl_s"],
        r["heartbeat_due_in_s"].as_f64().unwrap_or(0.0)
    )
}

/// Why a backend takes no new flows though its health may be fine (the operator's drain, a
/// late heartbeat, gone from its source), for the human listings. Empty when it is not.
pub fn fmt_drain(d: &Value) -> String {
    match d["detail"].as_str() {
        Some(detail) => format!("drained: {detail}; "),
        None => String::new(),
    }
}

/// A duration for people: "0.4 s", "12 s", "5 min", "3 h", "2 d".
pub fn fmt_age(secs: f64) -> String {
    match secs.max(0.0) {
        s if s < 10.0 => format!("{s:.1} s"),
        s if s < 120.0 => format!("{s:.0} s"),
        s if s < 7_200.0 => format!("{:.0} min", s / 60.0),
        s if s < 172_800.0 => format!("{:.0} h", s / 3_600.0),
        s => format!("{:.0} d", s / 86_400.0),
    }
}

/// A backend's weight as `effective/configured`: what its table gives it now, of what it is
/// configured with.
pub fn fmt_weight(b: &Value) -> String {
    format!("{}/{}", b["effective_weight"], b["weight"])
}

#[cfg(test)]
mod tests {
    use super::fmt_age;

    #[test]
    fn ages_read_as_people_say_them() {
        assert_eq!(fmt_age(0.42), "0.4 s");
        assert_eq!(fmt_age(-3.0), "0.0 s");
        assert_eq!(fmt_age(42.0), "42 s");
        assert_eq!(fmt_age(600.0), "10 min");
        assert_eq!(fmt_age(10_800.0), "3 h");
        assert_eq!(fmt_age(3.0 * 86_400.0), "3 d");
    }
}
