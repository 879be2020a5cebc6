//! `lb stats`: per-service and per-backend traffic and the global counters.

use serde_json::Value;

pub fn print(data: &Value) {
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
        nat["connections"], nat["half_open"], nat["entries"], nat["snat_ports_in_use"], nat["expired"]
    );
}
