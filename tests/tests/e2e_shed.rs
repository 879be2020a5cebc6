//! Load shedding end to end: a backend limited to 200 new flows/s, offered about 1,000/s of
//! new UDP flows, gets 200/s (±20%); the rest is spilled to the other backends (dns4,
//! `on_shed = "spill"`) or dropped (dns6, `"drop"`), and counted. Established flows are never
//! shed. A service limited to 500 new flows/s, offered about 3,000/s, takes 500/s (±20%) and
//! drops the rest.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use lb_tests::{
    Daemon, Topology,
    client::{udp_ask, udp_socket},
    in_ns,
    topology::{PORT, VIP4, VIP6},
    wait_until,
};

fn new_flows(d: &Daemon) -> (HashMap<(String, String), u64>, HashMap<String, u64>) {
    let stats = d.json(&["stats"]);
    let mut per = HashMap::new();
    for s in stats["services"].as_array().into_iter().flatten() {
        for b in s["backends"].as_array().into_iter().flatten() {
            per.insert(
                (
                    s["name"].as_str().unwrap_or_default().to_string(),
                    b["id"].as_str().unwrap_or_default().to_string(),
                ),
                b["new_flows"].as_u64().unwrap_or(0),
            );
        }
    }
    let counters = stats["counters"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
        .collect();
    (per, counters)
}

/// About 3,000 new UDP flows a second to `target` for 3 s, each from a fresh socket: (sent,
/// seconds).
fn offer(topo: &Topology, target: SocketAddr) -> (u64, f64) {
    in_ns(&topo.client, move || {
        let local: SocketAddr = if target.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let start = Instant::now();
        let mut sent = 0u64;
        let mut next = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            for _ in 0..30 {
                let s = UdpSocket::bind(local).expect("bind");
                if s.send_to(b"who", target).is_ok() {
                    sent += 1;
                }
            }
            next += Duration::from_millis(10);
            if let Some(w) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(w);
            }
        }
        (sent, start.elapsed().as_secs_f64())
    })
}

#[test]
fn a_limited_service_takes_its_rate_and_drops_the_rest() {
    let topo = Topology::new(3).expect("topology");
    let (instance, run_dir) = Daemon::new_paths();
    let mut text = String::new();
    for line in topo.config(&instance, &run_dir, &["b1", "b2", "b3"]).lines() {
        text.push_str(line);
        text.push('\n');
        if line == "name = \"dns4\"" {
            text.push_str("max_new_flows_per_s = 500\n");
        }
    }
    let d = Daemon::start(&topo, &instance, &run_dir, &text).expect("daemon starts");
    d.wait_all_in_tables();
    let (before, counters_before) = new_flows(&d);
    let (sent, secs) = offer(&topo, SocketAddr::new(IpAddr::V4(VIP4), PORT));
    let settled = wait_until(Duration::from_secs(2), || {
        let c = new_flows(&d).1;
        (c["tx"] - counters_before["tx"]) + (c["drop_shed"] - counters_before["drop_shed"]) >= sent * 95 / 100
    });
    assert!(
        settled,
        "{sent} sent, counters {}",
        d.json(&["stats"])["counters"]
    );
    let (after, counters) = new_flows(&d);
    let took: u64 = ["b1", "b2", "b3"]
        .iter()
        .map(|b| after[&("dns4".to_string(), b.to_string())] - before[&("dns4".to_string(), b.to_string())])
        .sum();
    let rate = took as f64 / secs;
    let dropped = counters["drop_shed"] - counters_before["drop_shed"];
    println!("dns4 limited to 500/s: {sent} new flows in {secs:.1} s, {rate:.0}/s taken, {dropped} dropped");
    assert!((400.0..=600.0).contains(&rate), "the service took {rate:.0}/s");
    assert!(dropped > sent / 2, "dropped {dropped} of {sent}");
    assert_eq!(counters["shed_spilled"] - counters_before["shed_spilled"], 0);
}

#[test]
fn a_limited_backend_gets_its_rate_and_the_rest_is_spilled_or_dropped() {
    let topo = Topology::new(3).expect("topology");
    let (instance, run_dir) = Daemon::new_paths();
    let mut text = String::new();
    let mut service = String::new();
    for line in topo.config(&instance, &run_dir, &["b1", "b2", "b3"]).lines() {
        if let Some(name) = line.strip_prefix("name = ") {
            service = name.trim_matches('"').to_string();
        }
        text.push_str(line);
        text.push('\n');
        if service == "dns6" && line.starts_with("forwarding = ") {
            text.push_str("on_shed = \"drop\"\n");
        }
        if (service == "dns4" || service == "dns6") && line == "id = \"b1\"" {
            text.push_str("max_new_flows_per_s = 200\n");
        }
    }
    let d = Daemon::start(&topo, &instance, &run_dir, &text).expect("daemon starts");
    d.wait_all_in_tables();
    // An established flow on b1 before the load: it must never be shed.
    let kept: Vec<(UdpSocket, String)> = in_ns(&topo.client, || {
        let mut kept = Vec::new();
        while kept.len() < 2 {
            let s = udp_socket(SocketAddr::new(IpAddr::V4(VIP4), PORT), Duration::from_secs(1)).expect("udp");
            if let Some(id) = udp_ask(&s)
                && id == "b1"
            {
                kept.push((s, id));
            }
        }
        kept
    });

    for (vip, service, mode) in [
        (IpAddr::V4(VIP4), "dns4", "spill"),
        (IpAddr::V6(VIP6), "dns6", "drop"),
    ] {
        let (before, counters_before) = new_flows(&d);
        // About 3,000 new flows a second over the three backends: 1,000/s hash to b1.
        let target = SocketAddr::new(vip, PORT);
        let (sent, secs) = offer(&topo, target);
        // Counters settle as soon as the last datagram passed the balancer (sent on, or shed).
        let settled = wait_until(Duration::from_secs(2), || {
            let c = new_flows(&d).1;
            (c["tx"] - counters_before["tx"]) + (c["drop_shed"] - counters_before["drop_shed"])
                >= sent * 95 / 100
        });
        assert!(
            settled,
            "{service}: {sent} sent, counters {}",
            d.json(&["stats"])["counters"]
        );
        let (after, counters) = new_flows(&d);
        let got = |b: &str| {
            after[&(service.to_string(), b.to_string())] - before[&(service.to_string(), b.to_string())]
        };
        let b1_rate = got("b1") as f64 / secs;
        let spilled = counters["shed_spilled"] - counters_before["shed_spilled"];
        let dropped = counters["drop_shed"] - counters_before["drop_shed"];
        println!(
            "{service} ({mode}): {sent} new flows in {secs:.1} s; b1 took {b1_rate:.0}/s (limit 200), b2 {}, b3 {}; spilled {spilled}, dropped {dropped}",
            got("b2"),
            got("b3")
        );
        assert!(
            (160.0..=240.0).contains(&b1_rate),
            "{service}: b1 at {b1_rate:.0}/s"
        );
        match mode {
            "spill" => {
                assert!(spilled > 1000, "spilled {spilled}");
                assert!(dropped < spilled / 10, "a few may find no room: {dropped}");
            }
            _ => {
                assert_eq!(spilled, 0);
                assert!(dropped > 1000, "dropped {dropped}");
            }
        }
    }
    // The data plane said so itself, through aya-log, rate-limited (one a second per CPU).
    assert!(
        wait_until(Duration::from_secs(3), || d
            .log()
            .contains("shedding: new flows over the limit")),
        "no data-plane log record: {}",
        d.log()
    );
    let records = d.log().matches("shedding: new flows over the limit").count();
    println!("data-plane log records about shedding: {records}");
    assert!(
        records <= 2 * 2 * 8,
        "rate-limited to one a second per CPU: {records}"
    );
    // The established flows on b1 were never shed.
    in_ns(&topo.client, || {
        for (s, id) in &kept {
            assert_eq!(
                udp_ask(s).as_deref(),
                Some(id.as_str()),
                "an established flow was shed"
            );
        }
    });
}
