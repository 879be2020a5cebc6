//! Hot reload end to end: with 100 TCP connections open and UDP flowing, an edited config file
//! (watched) that changes one service's weights and adds a backend to another is applied with
//! no connection reset, no lost UDP answer and no drop counter moved; an invalid file is
//! refused whole and changes nothing.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use lb_tests::{
    Daemon, Topology,
    client::{tcp_flows, udp_ask, udp_socket},
    in_ns,
    topology::{PORT, VIP4},
    wait_until,
};

fn drops(d: &Daemon) -> HashMap<String, u64> {
    let stats = d.json(&["stats"]);
    stats["counters"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.starts_with("drop_"))
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
        .collect()
}

fn slots(d: &Daemon, service: &str) -> HashMap<String, u64> {
    d.backends_of(service)
        .into_iter()
        .map(|b| {
            (
                b["id"].as_str().unwrap_or_default().to_string(),
                b["table_slots"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn a_watched_reload_keeps_every_connection_and_an_invalid_file_changes_nothing() {
    let topo = Topology::new(4).expect("topology");
    let (instance, run_dir) = Daemon::new_paths();
    let text = topo.config(&instance, &run_dir, &["b1", "b2", "b3"]).replacen(
        "neighbour_refresh_ms = 500\n",
        "neighbour_refresh_ms = 500\nwatch_config = true\n",
        1,
    );
    let d = Daemon::start(&topo, &instance, &run_dir, &text).expect("daemon starts");
    assert!(wait_until(Duration::from_secs(15), || {
        ["web4", "dns4"]
            .iter()
            .all(|s| slots(&d, s).values().all(|&n| n > 0))
    }));
    let (_, mut open) = tcp_flows(&topo, IpAddr::V4(VIP4), 100, true);

    // UDP flowing: 20 flows, each asked in turn; every answer must come, from the same backend.
    let stop = Arc::new(AtomicBool::new(false));
    let (asked, lost, moved) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let flows: Vec<(std::net::UdpSocket, String)> = in_ns(&topo.client, || {
        (0..20)
            .map(|_| {
                let s =
                    udp_socket(SocketAddr::new(IpAddr::V4(VIP4), PORT), Duration::from_secs(1)).expect("udp");
                let id = udp_ask(&s).expect("first answer");
                (s, id)
            })
            .collect()
    });
    let udp = {
        let (stop, asked, lost, moved) = (stop.clone(), asked.clone(), lost.clone(), moved.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                for (s, id) in &flows {
                    asked.fetch_add(1, Ordering::Relaxed);
                    let _ = s.send(b"who");
                    match s.recv(&mut buf) {
                        Ok(n) if std::str::from_utf8(&buf[..n]).is_ok_and(|a| a == id) => {}
                        Ok(_) => {
                            moved.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            lost.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        })
    };
    let drops_before = drops(&d);
    let web4_before = slots(&d, "web4");

    // The edit: web4's b1 to half weight, b4 into dns4.
    let b4 = topo.backend("b4").v4;
    let mut edited = String::new();
    let mut service = String::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("name = ") {
            service = name.trim_matches('"').to_string();
        }
        if line.starts_with("address = \"10.99.0.11\"") && service == "web4" {
            edited.push_str(line);
            edited.push_str("\nweight = 50\n");
            continue;
        }
        if line == "weight = 100" && edited.ends_with("weight = 50\n") {
            continue;
        }
        edited.push_str(line);
        edited.push('\n');
        if line.starts_with("forwarding = ") && service == "dns4" {
            edited.push_str(&format!(
                "\n[[service.backend]]\nid = \"b4\"\naddress = \"{b4}\"\nweight = 100\n"
            ));
        }
    }
    assert!(
        edited.contains("weight = 50") && edited.contains(&b4.to_string()),
        "{edited}"
    );
    std::fs::write(&d.config, &edited).expect("write config");
    let applied = wait_until(Duration::from_secs(10), || {
        slots(&d, "dns4").get("b4").is_some_and(|&n| n > 0) && slots(&d, "web4") != web4_before
    });
    assert!(applied, "the watched file was not applied: {}", d.log());
    let web4 = slots(&d, "web4");
    assert!(web4["b1"] < web4["b2"], "b1 at half weight: {web4:?}");
    // Let UDP flow a little past the change.
    let seen = asked.load(Ordering::Relaxed);
    assert!(wait_until(Duration::from_secs(5), || asked
        .load(Ordering::Relaxed)
        > seen + 200));
    stop.store(true, Ordering::Relaxed);
    udp.join().expect("udp thread");

    for (conn, id) in open.iter_mut() {
        let answer = conn
            .ask()
            .unwrap_or_else(|e| panic!("a connection to {id} was reset by the reload: {e}"));
        assert_eq!(&answer, id, "a connection moved");
    }
    println!(
        "reload under load: 100 TCP connections kept, {} UDP asks, {} lost, {} moved",
        asked.load(Ordering::Relaxed),
        lost.load(Ordering::Relaxed),
        moved.load(Ordering::Relaxed)
    );
    assert_eq!(lost.load(Ordering::Relaxed), 0, "UDP answers lost");
    assert_eq!(moved.load(Ordering::Relaxed), 0, "UDP flows moved");
    assert_eq!(drops(&d), drops_before, "a drop counter moved");

    // An invalid file: refused whole, nothing changes.
    let before = d.json(&["service", "list"]);
    std::fs::write(&d.config, edited.replace("weight = 50", "weight = 50000")).expect("write config");
    assert!(wait_until(Duration::from_secs(5), || d
        .log()
        .contains("reload refused, nothing changed")));
    assert_eq!(d.json(&["service", "list"]), before);
}
