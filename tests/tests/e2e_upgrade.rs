//! Program upgrades that keep every flow: 200 long-lived connections to a round-robin service
//! (which re-picks, and so breaks, a flow whose entry is lost) are asked every 50 ms while the
//! daemon is replaced by a build whose connection-table value has one more field (`lb-flow-v2`,
//! feature `flow-v2`: the table is migrated, the program replaced under the pinned links), then
//! by the first build again (migrated back), then refused an upgrade whose layout it cannot
//! read (nothing changes). Cilium's bar: not one connection broken.

use std::{net::IpAddr, path::Path, time::Duration};

use aya::maps::{HashMap, Map, MapData};
use lb_tests::{
    Daemon, Topology,
    client::{Conn, Held, Steady, tcp_flows},
    in_ns, lb_bin, lb_flow_v2_bin,
    topology::VIP4,
};

const CONNECTIONS: usize = 200;

/// Sets map `name`'s version in the instance's layout record.
fn record_version(instance: &str, name: &str, version: u64) {
    let path = Path::new("/sys/fs/bpf").join(instance).join("LAYOUT");
    let data = MapData::from_pin(&path).expect("layout record");
    let mut record: HashMap<MapData, [u8; 32], u64> =
        Map::from_map_data(data).expect("map").try_into().expect("record");
    let mut key = [0u8; 32];
    key[..name.len()].copy_from_slice(name.as_bytes());
    record.insert(key, version, 0).expect("write record");
}

/// The pinned program's kernel id.
fn program_id(instance: &str) -> u32 {
    let path = Path::new("/sys/fs/bpf").join(instance).join("prog_lb");
    aya::programs::Xdp::from_pin(path, aya_obj::programs::XdpAttachType::Interface)
        .expect("pinned program")
        .info()
        .expect("info")
        .id()
}

fn upgrade_line(d: &Daemon) -> String {
    d.json(&["status"])["upgrade"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The entries a summary says it migrated for `map` ("migrated CONNTRACK v1→v2 (212 entries)").
fn migrated(summary: &str, map: &str, from: u32, to: u32) -> Option<u64> {
    let head = format!("migrated {map} v{from}→v{to} (");
    let rest = &summary[summary.find(&head)? + head.len()..];
    rest.split(' ').next()?.parse().ok()
}

#[test]
fn an_upgrade_and_a_downgrade_keep_every_connection_and_an_unknown_layout_changes_nothing() {
    let v2 = lb_flow_v2_bin();
    assert!(
        v2.is_file(),
        "{} is missing: `cargo xtask test` builds it (cargo build -p lb-userspace --bin lb \
         --features flow-v2, copied as lb-flow-v2)",
        v2.display()
    );
    let topo = Topology::new(3).expect("topology");
    let (instance, run_dir) = Daemon::new_paths();
    let config = topo.config(&instance, &run_dir, &["b1", "b2", "b3"]).replace(
        "name = \"web4\"\n",
        "name = \"web4\"\nstrategy = \"round-robin\"\n",
    );
    let mut d = Daemon::start(&topo, &instance, &run_dir, &config).expect("daemon");
    d.wait_all_in_tables();
    let held = in_ns(&topo.client, || {
        let conns = (0..CONNECTIONS)
            .map(|_| {
                let mut c: Conn = lb_tests::client::connect(IpAddr::V4(VIP4));
                let id = c.ask().expect("first answer");
                (c, id)
            })
            .collect();
        Held { conns }
    });
    let spread: std::collections::BTreeSet<_> = held.conns.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(spread.len(), 3, "round robin uses every backend: {spread:?}");
    let steady = Steady::start(held);

    // Upgrade: the connection table is migrated to the new value, the program replaced.
    let before = program_id(&instance);
    d.restart_as(&topo.lb, &v2).expect("upgraded daemon");
    let line = upgrade_line(&d);
    eprintln!("upgrade: {line}");
    assert!(
        migrated(&line, "CONNTRACK", 1, 2).is_some_and(|n| n >= CONNECTIONS as u64),
        "{line}\n{}",
        d.log_tail(20)
    );
    assert!(
        line.contains(&format!("program replaced (id {before} → ")),
        "{line}"
    );
    assert!(
        line.starts_with("reused 17 maps"),
        "NAT table, counts and the rest kept: {line}"
    );
    assert!(
        d.log().contains("upgraded the pinned data plane"),
        "{}",
        d.log_tail(20)
    );
    // New connections work through the new program.
    let (fresh, _) = tcp_flows(&topo, IpAddr::V4(VIP4), 30, false);
    assert_eq!(fresh.values().sum::<usize>(), 30, "{fresh:?}");

    // Downgrade: back to the first layout.
    d.restart_as(&topo.lb, &lb_bin()).expect("downgraded daemon");
    let line = upgrade_line(&d);
    eprintln!("downgrade: {line}");
    assert!(
        migrated(&line, "CONNTRACK", 2, 1).is_some_and(|n| n >= CONNECTIONS as u64),
        "{line}"
    );

    // A layout this build cannot read: refused in one line, nothing changed.
    let pinned = program_id(&instance);
    let pins = |dir: &Path| {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("pin dir")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        names
    };
    let dir = Path::new("/sys/fs/bpf").join(&instance);
    let listed = pins(&dir);
    record_version(&instance, "CONNTRACK", 99);
    let err = d
        .restart_as(&topo.lb, &v2)
        .expect_err("an unknown layout is refused");
    let err = format!("{err:#}");
    assert!(
        err.contains("cannot upgrade the pinned data plane")
            && err.contains("CONNTRACK is at layout version 99")
            && err.contains("nothing was changed"),
        "{err}"
    );
    assert_eq!(program_id(&instance), pinned, "the pinned program still runs");
    assert_eq!(pins(&dir), listed, "no pin added or removed");
    // Put right, the same build adopts its pins as they are.
    record_version(&instance, "CONNTRACK", 1);
    d.restart_as(&topo.lb, &lb_bin()).expect("daemon");
    assert_eq!(upgrade_line(&d), "", "the same build adopts");
    assert_eq!(program_id(&instance), pinned);

    // Every connection asked again through the program that runs now.
    assert!(
        steady.wait_rounds(3, Duration::from_secs(10)),
        "the rounds stalled"
    );
    let seen = steady.finish();
    eprintln!(
        "{} connections, {} rounds, {} broken",
        seen.connections,
        seen.rounds,
        seen.broken.len()
    );
    assert!(seen.rounds > 10, "{seen:?}");
    assert_eq!(seen.connections, CONNECTIONS);
    assert!(seen.broken.is_empty(), "broken connections: {:?}", seen.broken);
}
