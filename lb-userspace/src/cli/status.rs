//! `lb status`: one line for each thing an operator checks first (`--json` for the whole answer).

use serde_json::Value;

/// The lines `lb status` prints for the daemon's status answer.
pub fn lines(data: &Value) -> Vec<String> {
    let mut out = vec![format!(
        "instance   {} (pins {}{})",
        data["instance"].as_str().unwrap_or_default(),
        data["pin_dir"].as_str().unwrap_or_default(),
        if data["adopted"] == true { ", adopted" } else { "" }
    )];
    let attached: Vec<String> = data["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            format!(
                "{} {}{}",
                a["interface"].as_str().unwrap_or_default(),
                a["mode"].as_str().unwrap_or_default(),
                if a["adopted"] == true { " (adopted)" } else { "" }
            )
        })
        .collect();
    out.push(format!(
        "attached   {}",
        if attached.is_empty() {
            "nothing".to_string()
        } else {
            attached.join(", ")
        }
    ));
    out.push(format!(
        "services   {}, backends {}",
        data["services"], data["backends"]
    ));
    let (capacity, free) = (
        data["table_pool"]["capacity"].as_u64().unwrap_or(0),
        data["table_pool"]["free"].as_u64().unwrap_or(0),
    );
    let share = if capacity == 0 {
        0.0
    } else {
        100.0 * free as f64 / capacity as f64
    };
    out.push(format!(
        "table pool {free} of {capacity} slots free ({share:.1} %)"
    ));
    let bgp = &data["bgp"];
    out.push(if bgp["enabled"] == true {
        let sessions = bgp["sessions"].as_array().map_or(0, Vec::len);
        let up = bgp["sessions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["up"] == true)
            .count();
        format!(
            "bgp        {up} of {sessions} sessions up{}",
            if bgp["draining"] == true { ", draining" } else { "" }
        )
    } else {
        format!(
            "bgp        off{}",
            if bgp["draining"] == true { ", draining" } else { "" }
        )
    });
    out
}

pub fn print(data: &Value) {
    for line in lines(data) {
        println!("{line}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn status_is_one_line_a_thing() {
        let data = serde_json::json!({
            "instance": "edge1", "pin_dir": "/sys/fs/bpf/edge1", "adopted": true,
            "interfaces": [{"interface": "eth0", "mode": "native", "adopted": true}],
            "services": 4, "backends": 12,
            "table_pool": {"capacity": 1000, "free": 250},
            "bgp": {"enabled": false, "draining": false},
        });
        assert_eq!(
            super::lines(&data),
            [
                "instance   edge1 (pins /sys/fs/bpf/edge1, adopted)",
                "attached   eth0 native (adopted)",
                "services   4, backends 12",
                "table pool 250 of 1000 slots free (25.0 %)",
                "bgp        off",
            ]
        );
    }
}
