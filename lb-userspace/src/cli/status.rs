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
    // Another build's pins, taken over at start.
    if let Some(upgrade) = data["upgrade"].as_str() {
        out.push(format!("upgrade    {upgrade}"));
    }
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
    // Frames the program sent out that the driver dropped (a veth whose peer runs no XDP).
    let lost: Vec<String> = data["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| {
            let n = a["xdp_tx_errors"].as_u64().filter(|&n| n > 0)?;
            Some(format!("{} {n}", a["interface"].as_str().unwrap_or_default()))
        })
        .collect();
    if !lost.is_empty() {
        out.push(format!(
            "tx errors  {} (frames XDP sent out that the driver dropped; see the daemon's log)",
            lost.join(", ")
        ));
    }
    out.push(format!(
        "services   {}, backends {}",
        data["services"], data["backends"]
    ));
    out.push(match data["backends_unhealthy"].as_u64().unwrap_or(0) {
        0 => "unhealthy  none".to_string(),
        1 => "unhealthy  1 backend down".to_string(),
        n => format!("unhealthy  {n} backends down"),
    });
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
    let ct = &data["conntrack"];
    out.push(match (ct["entries"].as_u64(), ct["embryonic_entries"].as_u64()) {
        (Some(entries), Some(embryonic)) => format!(
            "conntrack  {}, embryonic {}, counted {:.0} s ago",
            fill(entries, ct["size"].as_u64().unwrap_or(0)),
            fill(embryonic, ct["embryonic_size"].as_u64().unwrap_or(0)),
            ct["age_s"].as_f64().unwrap_or(0.0)
        ),
        _ => format!(
            "conntrack  not counted yet (size {}, embryonic {})",
            ct["size"], ct["embryonic_size"]
        ),
    });
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

/// `entries of size (share %)`.
fn fill(entries: u64, size: u64) -> String {
    let share = if size == 0 {
        0.0
    } else {
        100.0 * entries as f64 / size as f64
    };
    format!("{entries} of {size} ({share:.1} %)")
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
            "upgrade": "reused 17 maps, migrated CONNTRACK v1→v2 (200 entries), program replaced (id 41 → 57)",
            "interfaces": [
                {"interface": "eth0", "mode": "native", "adopted": true, "xdp_tx_errors": 12},
                {"interface": "eth1", "mode": "native", "adopted": false, "xdp_tx_errors": 0},
                {"interface": "eth2", "mode": "native", "adopted": false, "xdp_tx_errors": null},
            ],
            "services": 4, "backends": 12, "backends_unhealthy": 2,
            "table_pool": {"capacity": 1000, "free": 250},
            "conntrack": {"entries": 1200, "size": 65536, "embryonic_entries": 3,
                          "embryonic_size": 4096, "age_s": 4.2},
            "bgp": {"enabled": false, "draining": false},
        });
        assert_eq!(
            super::lines(&data),
            [
                "instance   edge1 (pins /sys/fs/bpf/edge1, adopted)",
                "upgrade    reused 17 maps, migrated CONNTRACK v1→v2 (200 entries), program replaced (id 41 → 57)",
                "attached   eth0 native (adopted), eth1 native, eth2 native",
                "tx errors  eth0 12 (frames XDP sent out that the driver dropped; see the daemon's log)",
                "services   4, backends 12",
                "unhealthy  2 backends down",
                "table pool 250 of 1000 slots free (25.0 %)",
                "conntrack  1200 of 65536 (1.8 %), embryonic 3 of 4096 (0.1 %), counted 4 s ago",
                "bgp        off",
            ]
        );
    }

    #[test]
    fn status_says_when_nothing_is_counted_or_lost_yet() {
        let data = serde_json::json!({
            "instance": "edge1", "pin_dir": "/sys/fs/bpf/edge1", "adopted": false,
            "interfaces": [{"interface": "eth0", "mode": "generic", "adopted": false, "xdp_tx_errors": 0}],
            "services": 1, "backends": 1, "backends_unhealthy": 0,
            "table_pool": {"capacity": 1000, "free": 1000},
            "conntrack": {"entries": null, "size": 65536, "embryonic_entries": null,
                          "embryonic_size": 65536, "age_s": null},
            "bgp": {"enabled": false, "draining": false},
        });
        let lines = super::lines(&data);
        assert!(!lines.iter().any(|l| l.starts_with("tx errors")), "{lines:?}");
        assert!(lines.contains(&"unhealthy  none".to_string()), "{lines:?}");
        assert!(
            lines.contains(&"conntrack  not counted yet (size 65536, embryonic 65536)".to_string()),
            "{lines:?}"
        );
    }
}
