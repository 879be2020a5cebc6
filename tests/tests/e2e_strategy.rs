//! Strategies end to end, real traffic through the balancer in namespaces: round robin's and
//! weighted round robin's shares, least connections steering around a loaded backend, its
//! active-flow counts back to zero after 10,000 short connections, and power of two choices
//! against Maglev under a skewed load of long-lived connections.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use lb_tests::{
    Daemon, Topology,
    client::tcp_flows,
    in_ns,
    topology::{VIP4, VIP6},
    wait_until,
};

/// The topology's config with every service on `strategy`.
fn start(topo: &Topology, strategy: &str) -> Daemon {
    start_with(topo, strategy, "")
}

/// As `start`, with `extra` (keys of the service table) in every service.
fn start_with(topo: &Topology, strategy: &str, extra: &str) -> Daemon {
    let (instance, run_dir) = Daemon::new_paths();
    let mut text = String::new();
    for line in topo.config(&instance, &run_dir, &["b1", "b2", "b3"]).lines() {
        text.push_str(line);
        text.push('\n');
        if line.starts_with("forwarding = ") {
            text.push_str(&format!("strategy = \"{strategy}\"\n{extra}"));
        }
    }
    let d = Daemon::start(topo, &instance, &run_dir, &text).expect("daemon starts");
    d.wait_all_in_tables();
    d
}

fn ok(d: &Daemon, args: &[&str]) {
    let out = d.cli(args);
    assert!(
        out.status.success(),
        "lb {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (table entries, active flows) of each backend of a service, as `service list` shows them.
fn backends(d: &Daemon, service: &str) -> HashMap<String, (u64, i64)> {
    d.backends_of(service)
        .into_iter()
        .map(|b| {
            (
                b["id"].as_str().unwrap_or_default().to_string(),
                (
                    b["table_slots"].as_u64().unwrap_or(0),
                    b["active_flows"].as_i64().unwrap_or(0),
                ),
            )
        })
        .collect()
}

/// Sets weights and waits (bounded) until the service's table has exactly the backends with a
/// weight above 0.
fn set_weights(d: &Daemon, service: &str, weights: &[(&str, u32)]) {
    for (id, w) in weights {
        ok(d, &["backend", "weight", service, id, &w.to_string()]);
    }
    let settled = wait_until(Duration::from_secs(10), || {
        let b = backends(d, service);
        weights
            .iter()
            .all(|(id, w)| (b.get(*id).map_or(0, |x| x.0) > 0) == (*w > 0))
    });
    assert!(
        settled,
        "{service}: weights not in the table: {:?}",
        backends(d, service)
    );
}

/// `n` new UDP flows, each socket held until all are done: a freed source port could come back
/// as the same 5-tuple, a flow the connection table already knows.
fn udp_new_flows(topo: &Topology, vip: IpAddr, n: usize) -> HashMap<String, usize> {
    udp_flows_from(&topo.client, vip, n)
}

fn share(counts: &HashMap<String, usize>, id: &str) -> usize {
    counts.get(id).copied().unwrap_or(0)
}

#[test]
fn round_robin_and_weighted_round_robin_give_their_shares() {
    let topo = Topology::new(3).expect("topology");
    let d = start(&topo, "round-robin");
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    // Round robin: each CPU's cursor gives each backend its turn, so 600 flows are 200 each,
    // within one per CPU.
    for (vip, service) in [(IpAddr::V4(VIP4), "dns4"), (IpAddr::V6(VIP6), "dns6")] {
        let counts = udp_new_flows(&topo, vip, 600);
        println!("{service} round-robin: {counts:?}");
        for id in ["b1", "b2", "b3"] {
            let n = share(&counts, id);
            assert!(n.abs_diff(200) <= cpus, "{service} {id}: {n} of 600 ({counts:?})");
        }
    }
    let (tcp, _) = tcp_flows(&topo, IpAddr::V4(VIP4), 300, false);
    println!("web4 round-robin: {tcp:?}");
    for id in ["b1", "b2", "b3"] {
        assert!(share(&tcp, id).abs_diff(100) <= cpus, "web4 {id}: {tcp:?}");
    }

    // A flow opened now stays on its backend through the switch to weighted round robin.
    let kept = in_ns(&topo.client, || {
        let s = lb_tests::client::udp_socket(
            std::net::SocketAddr::new(IpAddr::V4(VIP4), lb_tests::topology::PORT),
            Duration::from_secs(1),
        )
        .expect("udp");
        let id = lb_tests::client::udp_ask(&s).expect("answer");
        (s, id)
    });
    ok(&d, &["service", "strategy", "dns4", "weighted-round-robin"]);
    set_weights(&d, "dns4", &[("b1", 100), ("b2", 200), ("b3", 300)]);
    let counts = udp_new_flows(&topo, IpAddr::V4(VIP4), 1000);
    println!("dns4 weighted-round-robin 1:2:3: {counts:?}");
    for (id, want) in [("b1", 1.0 / 6.0), ("b2", 2.0 / 6.0), ("b3", 3.0 / 6.0)] {
        let got = share(&counts, id) as f64 / 1000.0;
        assert!((got - want).abs() <= 0.02, "{id}: share {got:.3}, want {want:.3}");
    }
    let again = in_ns(&topo.client, || lb_tests::client::udp_ask(&kept.0));
    assert_eq!(
        again.as_deref(),
        Some(kept.1.as_str()),
        "the strategy change moved a flow"
    );

    // Bad input changes nothing.
    let out = d.cli(&["service", "strategy", "dns4", "fastest"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fastest") && err.lines().count() <= 3, "{err}");
    let out = d.cli(&["service", "strategy", "nosuch", "round-robin"]);
    assert!(!out.status.success());
    let list = d.json(&["service", "list"]);
    let strategy_of = |name: &str| {
        list.as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == name)
            .map(|s| s["strategy"].clone())
    };
    assert_eq!(
        strategy_of("dns4"),
        Some(serde_json::json!("weighted-round-robin"))
    );
    assert_eq!(strategy_of("web4"), Some(serde_json::json!("round-robin")));
}

#[test]
fn least_connections_steers_around_a_loaded_backend_and_its_counts_do_not_drift() {
    let topo = Topology::new(3).expect("topology");
    let d = start(&topo, "least-connections");
    // 50 long-lived connections on b1 alone.
    set_weights(&d, "web4", &[("b1", 100), ("b2", 0), ("b3", 0)]);
    let (loaded, held) = tcp_flows(&topo, IpAddr::V4(VIP4), 50, true);
    assert_eq!(share(&loaded, "b1"), 50, "{loaded:?}");
    set_weights(&d, "web4", &[("b2", 100), ("b3", 100)]);
    let counted = wait_until(Duration::from_secs(5), || backends(&d, "web4")["b1"].1 == 50);
    assert!(counted, "b1's active flows: {:?}", backends(&d, "web4"));
    // The next 100 go to b2 and b3 until they catch up with b1's 50.
    let (next, held2) = tcp_flows(&topo, IpAddr::V4(VIP4), 100, true);
    println!("web4 least-connections, 100 new flows after 50 on b1: {next:?}");
    assert_eq!(share(&next, "b1"), 0, "{next:?}");
    assert!(share(&next, "b2").abs_diff(50) <= 1, "{next:?}");
    let counts = backends(&d, "web4");
    println!("active flows: {counts:?}");
    let active: i64 = counts.values().map(|c| c.1).sum();
    assert_eq!(active, 150, "{counts:?}");
    // Closing them takes each off its backend's count (the client's FIN).
    drop(held);
    drop(held2);
    let closed = wait_until(Duration::from_secs(5), || {
        backends(&d, "web4").values().all(|c| c.1 == 0)
    });
    assert!(closed, "after closing: {:?}", backends(&d, "web4"));

    // 10,000 short connections: the counts come back to 0 (±1% of them).
    let done = in_ns(&topo.client, || {
        let mut done = 0;
        for _ in 0..10_000 {
            let mut c = lb_tests::client::connect(IpAddr::V4(VIP4));
            if c.ask().is_ok() {
                done += 1;
            }
        }
        done
    });
    assert_eq!(done, 10_000);
    let mut left = 0;
    let settled = wait_until(Duration::from_secs(5), || {
        left = backends(&d, "web4").values().map(|c| c.1.abs()).sum::<i64>();
        left <= 100
    });
    println!("after 10,000 short connections: {left} active flows counted");
    assert!(settled, "drift: {left} ({:?})", backends(&d, "web4"));
    let stats = d.json(&["stats"]);
    assert_eq!(stats["counters"]["drop_maxconn"], 0, "{}", stats["counters"]);
}

#[test]
fn power_of_two_choices_keeps_the_most_loaded_backend_lower_than_maglev() {
    let topo = Topology::new(3).expect("topology");
    let d = start(&topo, "maglev");
    // The same skew for both: 40 long-lived connections on b1, then 120 more for all three.
    let mut max = HashMap::new();
    for strategy in ["maglev", "power-of-two"] {
        ok(&d, &["service", "strategy", "web4", strategy]);
        set_weights(&d, "web4", &[("b1", 100), ("b2", 0), ("b3", 0)]);
        let (first, held) = tcp_flows(&topo, IpAddr::V4(VIP4), 40, true);
        assert_eq!(share(&first, "b1"), 40);
        set_weights(&d, "web4", &[("b2", 100), ("b3", 100)]);
        let (next, held2) = tcp_flows(&topo, IpAddr::V4(VIP4), 120, true);
        let per: Vec<usize> = ["b1", "b2", "b3"]
            .iter()
            .map(|id| share(&first, id) + share(&next, id))
            .collect();
        println!("web4 {strategy}: open connections per backend {per:?}");
        max.insert(strategy, per.iter().copied().max().unwrap_or(0));
        drop(held);
        drop(held2);
    }
    assert!(
        max["power-of-two"] < max["maglev"],
        "most loaded backend: power-of-two {} against maglev {}",
        max["power-of-two"],
        max["maglev"]
    );
}

type FlowTable = aya::maps::HashMap<aya::maps::MapData, lb_common::FlowKey, lb_common::FlowState>;

/// The daemon's pinned flow table `name` (CONNTRACK or EMBRYONIC).
fn flow_table(d: &Daemon, name: &str) -> FlowTable {
    let path = std::path::Path::new("/sys/fs/bpf").join(&d.instance).join(name);
    let data = aya::maps::MapData::from_pin(&path).unwrap_or_else(|e| panic!("open {name}: {e}"));
    aya::maps::Map::LruHashMap(data).try_into().expect("typed")
}

/// Empties the daemon's connection table (as an eviction storm or a lost pin would).
fn flush_conntrack(d: &Daemon) -> usize {
    let mut map = flow_table(d, lb_common::maps::CONNTRACK);
    let keys: Vec<_> = map.keys().filter_map(Result::ok).collect();
    // Packets in flight may add an entry meanwhile; each of these is gone.
    keys.iter().filter(|k| map.remove(k).is_ok()).count()
}

#[test]
fn second_chance_keeps_connections_whose_entries_were_lost_across_a_table_change() {
    let (mut topo, d) = {
        let topo = Topology::new(3).expect("topology");
        let d = start(&topo, "maglev");
        (topo, d)
    };
    let (_, mut open) = tcp_flows(&topo, IpAddr::V4(VIP4), 100, true);
    let b4 = topo.add_backend("b4").expect("b4").v4;
    ok(
        &d,
        &["backend", "add", "web4", "b4", "--address", &b4.to_string()],
    );
    let ready = wait_until(Duration::from_secs(10), || {
        backends(&d, "web4").get("b4").is_some_and(|b| b.0 > 0)
    });
    assert!(ready, "b4 not in the table: {:?}", backends(&d, "web4"));
    let before = d.json(&["stats"])["counters"]["second_chance_hit"]
        .as_u64()
        .unwrap_or(0);
    let flushed = flush_conntrack(&d);
    assert!(flushed >= 100, "{flushed} entries flushed");
    // Every connection keeps its backend: those the new table moved to b4 by hash go to their
    // old owner, the previous table's.
    for (conn, id) in open.iter_mut() {
        let answer = conn
            .ask()
            .unwrap_or_else(|e| panic!("a connection on {id} broke after its entry was lost: {e}"));
        assert_eq!(&answer, id, "a connection moved");
    }
    let hits = d.json(&["stats"])["counters"]["second_chance_hit"]
        .as_u64()
        .unwrap_or(0)
        - before;
    println!("second chance: {hits} of 100 connections sent to their previous owner after the flush");
    // About a quarter of the hashes moved to b4 (the rest never needed a second chance).
    assert!(hits >= 5, "second_chance_hit moved by {hits}");
    // New flows follow the new table.
    let (counts, _) = tcp_flows(&topo, IpAddr::V4(VIP4), 200, false);
    assert!(share(&counts, "b4") >= 20, "new flows: {counts:?}");

    // Round robin cannot recompute a lost choice (docs/strategies.md): a connection whose
    // entry is lost is picked again by the cursor, as a new flow would be, with no second
    // chance; whether it lands on its own backend again is the cursor's luck.
    drop(open);
    ok(&d, &["service", "strategy", "web4", "round-robin"]);
    let (_, mut open) = tcp_flows(&topo, IpAddr::V4(VIP4), 40, true);
    let counter = |name: &str| d.json(&["stats"])["counters"][name].as_u64().unwrap_or(0);
    // Counted from before the flush: a client's delayed ACK may be the first packet to miss.
    let (miss, second) = (counter("conntrack_miss"), counter("second_chance_hit"));
    flush_conntrack(&d);
    let mut kept = 0;
    for (conn, id) in open.iter_mut() {
        kept += usize::from(conn.ask().is_ok_and(|a| &a == id));
    }
    println!("round robin after a flush: {kept} of 40 connections kept their backend");
    let misses = counter("conntrack_miss") - miss;
    // (An LRU walk racing inserts may skip an entry or two: most, not all, are flushed.)
    assert!(misses >= 30, "the lost entries are picked again: {misses} misses");
    assert_eq!(
        counter("second_chance_hit"),
        second,
        "no second chance off Maglev"
    );
}

/// (family, protocol) -> whether that service's value names a previous table, read from the
/// pinned SERVICES map.
fn previous_tables(d: &Daemon) -> HashMap<(u8, u8), bool> {
    let path = std::path::Path::new("/sys/fs/bpf")
        .join(&d.instance)
        .join(lb_common::maps::SERVICES);
    let data = aya::maps::MapData::from_pin(&path).expect("open SERVICES");
    let map: aya::maps::HashMap<aya::maps::MapData, lb_common::ServiceKey, lb_common::ServiceValue> =
        aya::maps::Map::HashMap(data).try_into().expect("typed");
    map.iter()
        .filter_map(Result::ok)
        .map(|(k, v)| ((k.family, k.proto), v.prev_size != 0))
        .collect()
}

#[test]
fn swaps_share_the_spare_room_of_the_pool() {
    // Room for five tables: the four services' and one spare. Each swap takes the spare; the
    // table it replaced stays for second chance until another service's swap needs the room.
    let mut topo = Topology::new(3).expect("topology");
    let (instance, run_dir) = Daemon::new_paths();
    let region = lb_common::maps::pool_region(lb_common::maps::DEFAULT_TABLE_SIZE);
    let config = topo.config(&instance, &run_dir, &["b1", "b2", "b3"]).replace(
        "table_pool_slots = 1048576",
        &format!("table_pool_slots = {}", 5 * region),
    );
    let d = Daemon::start(&topo, &instance, &run_dir, &config).expect("daemon starts");
    d.wait_all_in_tables();
    assert!(previous_tables(&d).values().all(|&p| !p), "no swap yet");
    let b4 = topo.add_backend("b4").expect("b4");
    let (v4, v6) = (b4.v4.to_string(), b4.v6.to_string());
    for (service, key, address) in [
        ("web4", (4, 6), &v4),
        ("dns4", (4, 17), &v4),
        ("web6", (6, 6), &v6),
        ("dns6", (6, 17), &v6),
    ] {
        ok(&d, &["backend", "add", service, "b4", "--address", address]);
        let swapped = wait_until(Duration::from_secs(10), || {
            backends(&d, service).get("b4").is_some_and(|b| b.0 > 0)
        });
        assert!(swapped, "{service}: b4 not in its table: {}", d.log());
        // Only the service that swapped last holds a previous table: the one before gave its
        // up for this swap.
        let previous = previous_tables(&d);
        let holding: Vec<_> = previous.iter().filter(|&(_, &p)| p).map(|(k, _)| *k).collect();
        assert_eq!(holding, vec![key], "after {service}'s swap");
    }
    // Every service still forwards, on its new table.
    for service in ["web4", "dns4", "web6", "dns6"] {
        let b = backends(&d, service);
        assert!(
            ["b1", "b2", "b3", "b4"]
                .iter()
                .all(|id| b.get(*id).is_some_and(|b| b.0 > 0)),
            "{service}: {b:?}"
        );
    }
}

#[test]
fn the_disruption_preview_matches_the_change_when_it_is_applied() {
    let mut topo = Topology::new(3).expect("topology");
    let d = start(&topo, "maglev");
    let (_, mut open) = tcp_flows(&topo, IpAddr::V4(VIP4), 100, true);
    let b4 = topo.add_backend("b4").expect("b4").v4;
    let before = d.json(&["service", "list"]);
    let plan = d.json(&["plan", "add-backend", "web4", "b4", "--address", &b4.to_string()]);
    let web4 = plan["services"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["service"] == "web4")
        .cloned()
        .expect("web4 in the plan");
    println!("plan: {web4}");
    assert_eq!(d.json(&["service", "list"]), before, "a plan changes nothing");
    let share = web4["share_moved"].as_f64().expect("share_moved");
    assert!(
        (0.2..=0.3).contains(&share),
        "a fourth backend takes about a quarter: {share}"
    );
    assert!(web4["live_flows"].as_u64() >= Some(100), "{web4}");
    let moving = web4["flows_moving_if_lost"]
        .as_u64()
        .expect("flows_moving_if_lost");
    // Bad input gets one line and changes nothing.
    for args in [
        &["plan", "weight", "web4", "nosuch", "5"][..],
        &["plan", "weight", "web4", "b1", "100000"],
        &["plan", "strategy", "nosuch", "round-robin"],
    ] {
        let out = d.cli(args);
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).trim().lines().count(),
            1,
            "{args:?}"
        );
    }

    // Applied for real: the table is the one the plan showed...
    ok(
        &d,
        &["backend", "add", "web4", "b4", "--address", &b4.to_string()],
    );
    let ready = wait_until(Duration::from_secs(10), || {
        backends(&d, "web4").get("b4").is_some_and(|b| b.0 > 0)
    });
    assert!(ready, "b4 not in the table");
    let now = backends(&d, "web4");
    for (id, n) in web4["entries_per_backend"]
        .as_object()
        .expect("entries_per_backend")
    {
        assert_eq!(
            Some(now[id].0),
            n.as_u64(),
            "{id}: table entries against the plan"
        );
    }
    // ...and the flows it said would move if their entries were lost are those second chance
    // takes back to their old backend once the entries are gone.
    let hits0 = d.json(&["stats"])["counters"]["second_chance_hit"]
        .as_u64()
        .unwrap_or(0);
    flush_conntrack(&d);
    for (conn, id) in open.iter_mut() {
        assert_eq!(conn.ask().expect("answer").as_str(), id.as_str());
    }
    let hits = d.json(&["stats"])["counters"]["second_chance_hit"]
        .as_u64()
        .unwrap_or(0)
        - hits0;
    println!("plan said {moving} of the live flows would move; second chance took {hits} back");
    assert!(
        hits <= moving && hits + 3 >= moving,
        "plan {moving}, second chance {hits}"
    );
}

/// b1's share of a service's table slots, as the daemon reads them from the pool map.
fn slot_share(d: &Daemon, service: &str, id: &str) -> f64 {
    let b = backends(d, service);
    let total: u64 = b.values().map(|x| x.0).sum();
    b.get(id).map_or(0, |x| x.0) as f64 / total.max(1) as f64
}

#[test]
fn resource_aware_follows_load_reports_in_bounded_steps() {
    let topo = Topology::new(3).expect("topology");
    let d = start(&topo, "resource-aware");
    let start = slot_share(&d, "dns4", "b1");
    assert!((start - 1.0 / 3.0).abs() < 0.01, "{start}");
    // b1 reports 90% CPU once a second (the default update interval); the table is sampled
    // between reports. Each update may move at most 10% of the slots: b1's share can change by
    // no more than that from one table to the next.
    let t0 = std::time::Instant::now();
    let mut shares = vec![(0.0, start)];
    let mut first_drop = None;
    for _ in 0..8 {
        ok(
            &d,
            &["backend", "load", "dns4", "b1", "--cpu", "0.9", "--ttl", "3"],
        );
        let report = std::time::Instant::now();
        while report.elapsed() < Duration::from_secs(1) {
            let s = slot_share(&d, "dns4", "b1");
            if (s - shares.last().unwrap().1).abs() > 1e-9 {
                shares.push((t0.elapsed().as_secs_f64(), s));
                first_drop.get_or_insert(t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    println!("b1's slot share over time (s, share): {shares:?}");
    let first_drop = first_drop.expect("b1's share never dropped");
    assert!(
        first_drop < Duration::from_secs(2),
        "first drop after {first_drop:?}"
    );
    for w in shares.windows(2) {
        assert!(
            w[1].1 < w[0].1,
            "b1's share rose while it reported 90% CPU: {shares:?}"
        );
        assert!(
            w[0].1 - w[1].1 <= 0.10 + 1e-3,
            "one update moved more than 10%: {shares:?}"
        );
    }
    // Converged: factor 0.1 against two at 1, a share of 0.1/2.1.
    let last = shares.last().unwrap().1;
    assert!((last - 0.1 / 2.1).abs() < 0.01, "b1 ended at {last}");
    // New flows follow the table.
    let counts = udp_new_flows(&topo, IpAddr::V4(VIP4), 300);
    println!("300 new flows with b1 at 90% CPU: {counts:?}");
    assert!(share(&counts, "b1") <= 30, "{counts:?}");
    let h = d.json(&["health", "dns4"]);
    let b1 = h[0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == "b1")
        .unwrap()
        .clone();
    assert_eq!(b1["load"]["report"]["cpu"], 0.9, "{b1}");
    // The reports stop and the last expires (ttl 3 s): b1 climbs back to a third, in steps.
    let back = wait_until(Duration::from_secs(20), || {
        (slot_share(&d, "dns4", "b1") - 1.0 / 3.0).abs() < 0.01
    });
    assert!(back, "b1 did not come back: {}", slot_share(&d, "dns4", "b1"));
    // Bad reports change nothing.
    for (args, needle) in [
        (vec!["--cpu", "1.5"], "out of range 0..=1"),
        (vec!["--memory=-0.1"], "out of range"),
        (vec!["--ttl", "5"], "needs cpu, memory or connections"),
        (
            vec!["--cpu", "0.5", "--ttl", "99999"],
            "ttl 99999 s is out of range",
        ),
    ] {
        let mut a = vec!["backend", "load", "dns4", "b1"];
        a.extend(args);
        let out = d.cli(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(needle), "{a:?}: {err}");
    }
    let out = d.cli(&["backend", "load", "dns4", "nope", "--cpu", "0.5"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no backend nope"));
}

#[test]
fn adaptive_switches_on_imbalance_and_load_and_back_when_calm() {
    let topo = Topology::new(3).expect("topology");
    let dwell = 2.0;
    let d = start_with(
        &topo,
        "adaptive",
        &format!("adaptive = {{ dwell = {dwell}, interval = 0.2, min_flows = 20 }}\n"),
    );
    // (strategy in effect, switches so far, seconds since the last switch)
    let current = |d: &Daemon| -> (String, u64, f64) {
        let list = d.json(&["service", "list"]);
        let s = list
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "web4")
            .unwrap()
            .clone();
        (
            s["in_effect"].as_str().unwrap_or_default().to_string(),
            s["adaptive"]["switches"].as_u64().unwrap_or(0),
            s["adaptive"]["for_s"].as_f64().unwrap_or(0.0),
        )
    };
    let t0 = std::time::Instant::now();
    // When each switch happened (by the daemon's own clock of it), and to what.
    let mut switches: Vec<(f64, String)> = Vec::new();
    let mut wait_for = |d: &Daemon, want: &str, within: u64| {
        let mut seen = None;
        let ok = wait_until(Duration::from_secs(within), || {
            let c = current(d);
            let hit = c.0 == want;
            if hit {
                seen = Some(t0.elapsed().as_secs_f64() - c.2);
            }
            hit
        });
        assert!(ok, "never switched to {want}: {:?}", current(d));
        switches.push((seen.unwrap(), want.to_string()));
    };
    assert_eq!(current(&d).0, "maglev");
    // Imbalance: 40 long-lived connections on b1 alone, then all three take flows again.
    set_weights(&d, "web4", &[("b1", 100), ("b2", 0), ("b3", 0)]);
    let (_, held) = tcp_flows(&topo, IpAddr::V4(VIP4), 40, true);
    set_weights(&d, "web4", &[("b2", 100), ("b3", 100)]);
    wait_for(&d, "least-connections", 10);
    // Least connections now steers the next flows around b1.
    let (next, held2) = tcp_flows(&topo, IpAddr::V4(VIP4), 40, true);
    assert_eq!(share(&next, "b1"), 0, "{next:?}");
    // Load reports: resource-aware, once the dwell since the last switch is over.
    ok(
        &d,
        &["backend", "load", "web4", "b2", "--cpu", "0.5", "--ttl", "3"],
    );
    wait_for(&d, "resource-aware", 10);
    // The report expires and the connections close: calm, back to Maglev.
    drop(held);
    drop(held2);
    wait_for(&d, "maglev", 15);
    println!("adaptive switches (s, to): {switches:?}");
    for w in switches.windows(2) {
        assert!(
            w[1].0 - w[0].0 >= dwell - 0.1,
            "a switch within the dwell: {switches:?}"
        );
    }
    assert_eq!(current(&d).1, 3, "exactly three switches");
    // The established flows were never moved: no connection failed above (each asks thrice).
}

/// As `udp_new_flows`, from any client namespace.
fn udp_flows_from(ns: &lb_tests::netns::NetNs, vip: IpAddr, n: usize) -> HashMap<String, usize> {
    in_ns(ns, move || {
        let target = std::net::SocketAddr::new(vip, lb_tests::topology::PORT);
        let mut held = Vec::new();
        let mut counts = HashMap::new();
        for _ in 0..n {
            let s = lb_tests::client::udp_socket(target, Duration::from_millis(500)).expect("UDP socket");
            let id = lb_tests::client::udp_ask(&s).expect("UDP answer within 5 tries");
            *counts.entry(id).or_insert(0) += 1;
            held.push(s);
        }
        counts
    })
}

/// A daemon with every service on geo: eu = b1, b2 (the default region), us = b3 (checked on
/// port 8081 by TCP; the responder returned answers until dropped), each failing over to the
/// other. The geo data is `contents` in the daemon's run directory as `file` (its path comes
/// back); `mapping` holds any more keys of `[daemon.geo]`. Waits until each region is served
/// by its own backends.
fn start_geo(
    topo: &Topology,
    file: &str,
    contents: &[u8],
    mapping: &str,
) -> (Daemon, lb_tests::servers::Responder, std::path::PathBuf) {
    let (instance, run_dir) = Daemon::new_paths();
    std::fs::create_dir_all(&run_dir).expect("run dir");
    let data = run_dir.join(file);
    std::fs::write(&data, contents).expect("geo data");
    let geo = format!("data = \"{}\"\n{mapping}", data.display());
    let health = lb_tests::servers::Responder::start(
        &topo.backend("b3").ns,
        &[
            std::net::SocketAddr::new(IpAddr::V4(topo.backend("b3").v4), 8081),
            std::net::SocketAddr::new(IpAddr::V6(topo.backend("b3").v6), 8081),
        ],
        lb_tests::servers::Reply::Http(200, "ok".into()),
        None,
    );
    let region = |id: &str| if id == "b3" { "us" } else { "eu" };
    let mut text = String::new();
    // Each geo service has its own table and, for us (served by other backends than the
    // default region), a second one; each kept with its previous for second chance.
    let config = topo
        .config(&instance, &run_dir, &["b1", "b2", "b3"])
        .replace("table_pool_slots = 1048576", "table_pool_slots = 2097152");
    for line in config.lines() {
        if line == "[[service]]" && !text.contains("[daemon.geo]") {
            text.push_str(&format!(
                "[daemon.geo]\ndefault_region = \"eu\"\nfailover = {{ eu = [\"us\"], us = [\"eu\"] }}\n{geo}\n"
            ));
        }
        text.push_str(line);
        text.push('\n');
        if line.starts_with("forwarding = ") {
            text.push_str("strategy = \"geo\"\n");
        }
        if let Some(id) = line.strip_prefix("id = \"").and_then(|r| r.strip_suffix('"')) {
            text.push_str(&format!("region = \"{}\"\n", region(id)));
            if id == "b3" {
                // Only b3 is checked: its region fails over when it fails.
                text.push_str("health = { kind = \"tcp\", port = 8081, interval = 0.2, timeout = 0.2, fast_interval = 0.2, error_threshold = 2 }\n");
            }
        }
    }
    let d = Daemon::start(topo, &instance, &run_dir, &text).expect("daemon starts");
    // Each region served by its own backends: eu by b1 and b2 (the default region, so the
    // services' own tables too), us by b3.
    let ready = wait_until(Duration::from_secs(15), || {
        let g = d.json(&["geo", "show"]);
        g["services"].as_array().is_some_and(|v| v.len() == 4)
            && g["services"].as_array().into_iter().flatten().all(|s| {
                s["regions"].as_array().into_iter().flatten().all(|r| {
                    let want: &[&str] = if r["region"] == "us" {
                        &["b3"]
                    } else {
                        &["b1", "b2"]
                    };
                    r["serving"] == r["region"] && r["backends"] == serde_json::json!(want)
                })
            })
    });
    assert!(ready, "{}", d.json(&["geo", "show"]));
    (d, health, data)
}

#[test]
fn geo_sends_each_region_to_its_backends_and_fails_over() {
    let mut topo = Topology::new(3).expect("topology");
    let far = topo
        .add_client("cl2", "10.99.0.5", "fd99::5")
        .expect("second client");
    let (d, health, data) = start_geo(
        &topo,
        "geo.csv",
        b"# client prefix,region\n10.99.0.0/30,eu\nfd99::/126,eu\n10.99.0.4/30,us\nfd99::4/126,us\n",
        "",
    );
    let geo = d.json(&["geo", "show"]);
    println!("lb geo show: {geo}");
    assert_eq!(geo["data"]["prefixes"], 4, "{geo}");
    assert_eq!(geo["data"]["prefixes_per_region"]["us"], 2, "{geo}");
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        let near = udp_flows_from(&topo.client, vip, 60);
        let farc = udp_flows_from(&far, vip, 60);
        println!("{vip}: eu client {near:?}, us client {farc:?}");
        assert_eq!(share(&near, "b1") + share(&near, "b2"), 60, "{near:?}");
        assert!(share(&near, "b1") > 0 && share(&near, "b2") > 0, "{near:?}");
        assert_eq!(share(&farc, "b3"), 60, "{farc:?}");
    }
    // lb lookup answers as the data plane picks: by the client's region.
    let port = lb_tests::topology::PORT;
    for (src, want, region) in [
        ("10.99.0.5:7", &["b3"][..], "us"),
        ("10.99.0.1:7", &["b1", "b2"][..], "eu"),
    ] {
        let l = d.json(&[
            "lookup",
            "-p",
            "udp",
            "--src",
            src,
            "--dst",
            &format!("{VIP4}:{port}"),
        ]);
        assert!(
            want.iter().any(|w| l["backend"] == *w) && l["region"] == region,
            "lookup from {src}: {l}"
        );
    }
    // A malformed data file is refused, naming its line; the running data stays.
    std::fs::write(&data, "10.99.0.0/30,eu\n10.99.0.4/33,us\n").expect("bad data");
    let out = d.cli(&["geo", "reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("line 2"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(share(&udp_flows_from(&far, IpAddr::V4(VIP4), 20), "b3"), 20);
    // b3 fails its checks: the us clients fail over to eu.
    drop(health);
    let failed_over = wait_until(Duration::from_secs(10), || {
        let g = d.json(&["geo", "show"]);
        g["services"].as_array().into_iter().flatten().all(|s| {
            s["regions"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|r| r["serving"] == "eu")
        })
    });
    assert!(
        failed_over,
        "{}\n{}\n{}",
        d.json(&["geo", "show"]),
        d.json(&["health"]),
        d.log()
    );
    let farc = udp_flows_from(&far, IpAddr::V4(VIP4), 40);
    println!("us client after b3 failed: {farc:?}");
    assert_eq!(share(&farc, "b3"), 0, "{farc:?}");
    // A good reload swaps the data whole: everyone is eu now.
    std::fs::write(&data, "10.99.0.0/29,eu\n").expect("data");
    let out = d.cli(&["geo", "reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(d.json(&["geo", "show"])["data"]["prefixes"], 1);
}

/// Geo from the CLI as the other strategies: `lb service add --strategy geo` and `lb backend
/// add --region R --zone Z` make a service whose regions are each served by their own
/// backends; a backend without a region of `[daemon.geo]` is refused in one line and changes
/// nothing.
#[test]
fn geo_services_and_backends_are_added_from_the_cli() {
    let topo = Topology::new(3).expect("topology");
    let (d, _health, _data) = start_geo(&topo, "geo.csv", b"10.99.0.0/30,eu\n10.99.0.4/30,us\n", "");
    let vip = VIP4.to_string();
    let address = |id: &str| topo.backend(id).v4.to_string();
    ok(
        &d,
        &[
            "service",
            "add",
            "geo-cli",
            "--vip",
            &vip,
            "--port",
            "9090",
            "-p",
            "udp",
            "--strategy",
            "geo",
        ],
    );
    for (id, region, zone) in [("b1", "eu", "eu-1"), ("b3", "us", "us-1")] {
        ok(
            &d,
            &[
                "backend",
                "add",
                "geo-cli",
                id,
                "--address",
                &address(id),
                "--region",
                region,
                "--zone",
                zone,
            ],
        );
    }
    let listed = d.cli(&["service", "list"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("geo-cli ") && l.ends_with(" strategy=geo")),
        "{listed}"
    );
    let backends = d.backends_of("geo-cli");
    let zones: Vec<_> = backends
        .iter()
        .map(|b| (&b["id"], &b["region"], &b["zone"]))
        .collect();
    assert_eq!(
        format!("{zones:?}"),
        r#"[(String("b1"), String("eu"), String("eu-1")), (String("b3"), String("us"), String("us-1"))]"#
    );
    // Each region served by its own backend.
    let served = wait_until(Duration::from_secs(10), || {
        let g = d.json(&["geo", "show"]);
        g["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["service"] == "geo-cli")
            .is_some_and(|s| {
                let regions = s["regions"].as_array().cloned().unwrap_or_default();
                regions.len() == 2
                    && regions.iter().all(|r| {
                        let want = if r["region"] == "us" { "b3" } else { "b1" };
                        r["serving"] == r["region"] && r["backends"] == serde_json::json!([want])
                    })
            })
    });
    assert!(served, "{}", d.json(&["geo", "show"]));
    // A backend of no region of [daemon.geo]: refused, nothing changed.
    let before = d.json(&["service", "list"]);
    for extra in [&[][..], &["--region", "mars"][..]] {
        let mut args = vec!["backend", "add", "geo-cli", "b2", "--address"];
        let b2 = address("b2");
        args.push(&b2);
        args.extend_from_slice(extra);
        let out = d.cli(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            err.contains("needs a region (or zone) of [daemon.geo]"),
            "{args:?}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    assert_eq!(d.json(&["service", "list"]), before);
    // A region geo does not know, and a zone it does (its regions may name zones): placed by
    // the zone, us served by b2 and b3.
    ok(
        &d,
        &[
            "backend",
            "add",
            "geo-cli",
            "b2",
            "--address",
            &address("b2"),
            "--region",
            "mars",
            "--zone",
            "us",
        ],
    );
    let by_zone = wait_until(Duration::from_secs(10), || {
        let g = d.json(&["geo", "show"]);
        g["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["service"] == "geo-cli")
            .flat_map(|s| s["regions"].as_array().cloned().unwrap_or_default())
            .any(|r| r["region"] == "us" && r["backends"] == serde_json::json!(["b2", "b3"]))
    });
    assert!(by_zone, "{}", d.json(&["geo", "show"]));
}

#[test]
fn geo_reads_a_maxmind_database_through_countries_and_continents() {
    let mut topo = Topology::new(3).expect("topology");
    let far = topo
        .add_client("cl2", "10.99.0.5", "fd99::5")
        .expect("second client");
    // A MaxMind country database, made by mmdb-writer: the near client's prefixes in DE (EU),
    // the far client's in US, and its IPv6 prefix in CA, which only its continent (NA) maps.
    let script = r#"
import sys
from mmdb_writer import MMDBWriter
from netaddr import IPSet
w = MMDBWriter(ip_version=6, database_type="GeoIP2-Country", ipv4_compatible=True)
w.insert_network(IPSet(["10.99.0.0/30", "fd99::/126"]), {"country": {"iso_code": "DE"}, "continent": {"code": "EU"}})
w.insert_network(IPSet(["10.99.0.4/30"]), {"country": {"iso_code": "US"}, "continent": {"code": "NA"}})
w.insert_network(IPSet(["fd99::4/126"]), {"country": {"iso_code": "CA"}, "continent": {"code": "NA"}})
w.insert_network(IPSet(["192.0.2.0/24"]), {"country": {"iso_code": "JP"}, "continent": {"code": "AS"}})
w.to_db_file(sys.argv[1])
"#;
    let python = lb_tests::python();
    let tmp = std::env::temp_dir().join(format!("lb-geo-{}.mmdb", std::process::id()));
    let made = std::process::Command::new(&python)
        .args(["-c", script])
        .arg(&tmp)
        .output()
        .expect("python");
    let bytes = std::fs::read(&tmp);
    let _ = std::fs::remove_file(&tmp);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let (d, _health, data) = start_geo(
        &topo,
        "geo.mmdb",
        &bytes.expect("mmdb written"),
        "countries = { DE = \"eu\", US = \"us\" }\ncontinents = { NA = \"us\" }",
    );
    let geo = d.json(&["geo", "show"]);
    println!("lb geo show: {}", geo["data"]);
    // JP (AS) maps to no region: left out, its clients get the default region.
    assert_eq!(geo["data"]["prefixes"], 4, "{geo}\n{}", d.log());
    assert_eq!(geo["data"]["prefixes_per_region"]["us"], 2, "{geo}");
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        let near = udp_flows_from(&topo.client, vip, 40);
        let farc = udp_flows_from(&far, vip, 40);
        println!("{vip}: DE client {near:?}, US/CA client {farc:?}");
        assert_eq!(share(&near, "b1") + share(&near, "b2"), 40, "{near:?}");
        assert_eq!(share(&farc, "b3"), 40, "{farc:?}");
    }
    // A file that is no MaxMind database is refused in one line; the running data stays.
    std::fs::write(&data, b"garbage").expect("bad data");
    let out = d.cli(&["geo", "reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not a MaxMind database"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(share(&udp_flows_from(&far, IpAddr::V4(VIP4), 20), "b3"), 20);
}

/// SYNs from the client to web4 (VIP4, PORT) through the balancer, at `rate` a second for
/// `duration`.
fn syn_flood(topo: &Topology, rate: u64, duration: Duration) -> lb_tests::flood::SynFlood {
    lb_tests::flood::SynFlood {
        dst_mac: lb_tests::flood::mac_of(&topo.lb, "eth0").expect("balancer MAC"),
        src_mac: lb_tests::flood::mac_of(&topo.client, "eth0").expect("client MAC"),
        dst: VIP4.octets(),
        dport: lb_tests::topology::PORT,
        rate,
        duration,
    }
}

/// A SYN flood of fresh tuples, ten times what the connection table holds, resets no
/// established connection, whatever the strategy: a flow's first packet goes to the embryonic
/// table, and only its client's next packet moves it to the connection table, so the flood
/// evicts only its own kind. Before that table, the same flood into a table of 4,096 entries
/// reset most connections of the strategies that pick a flow's backend by anything but its hash
/// (their evicted flows were picked again, onto another backend); Maglev kept them.
#[test]
fn a_syn_flood_resets_no_established_connection_whatever_the_strategy() {
    const HELD: usize = 60;
    const SYNS: u64 = 40_000;
    let topo = Topology::new(3).expect("topology");
    let (instance, run_dir) = Daemon::new_paths();
    let mut text = String::new();
    for line in topo.config(&instance, &run_dir, &["b1", "b2", "b3"]).lines() {
        text.push_str(&line.replace("conntrack_size = 65536", "conntrack_size = 4096"));
        text.push('\n');
    }
    let d = Daemon::start(&topo, &instance, &run_dir, &text).expect("daemon starts");
    d.wait_all_in_tables();
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get()).min(8);
    let flood = &syn_flood(&topo, SYNS / cpus as u64, Duration::from_secs(1));
    let strategies = [
        "round-robin",
        "weighted-round-robin",
        "least-connections",
        "power-of-two",
        "maglev",
    ];
    let mut held: Vec<(&str, Vec<(lb_tests::client::Conn, String)>)> = Vec::new();
    for (round, strategy) in strategies.into_iter().enumerate() {
        ok(&d, &["service", "strategy", "web4", strategy]);
        let (_, conns) = tcp_flows(&topo, IpAddr::V4(VIP4), HELD, true);
        held.push((strategy, conns));
        // From every CPU, as a flood arrives on every receive queue: each CPU's part of the
        // table (its own LRU list) sees its share.
        let sent = in_ns(&topo.client, move || {
            std::thread::scope(|scope| {
                let floods: Vec<_> = (0..cpus)
                    .map(|cpu| {
                        scope.spawn(move || {
                            lb_tests::flood::pin_to_cpu(cpu).expect("pin the flood thread");
                            let sender = lb_tests::flood::RawSender::open("eth0").expect("packet socket");
                            // Addresses the client does not have: no RST ever answers the
                            // SYN-ACKs. Each round and CPU its own, so every SYN is a fresh tuple.
                            let net = 16 + round as u8 * 8 + cpu as u8;
                            flood
                                .run(&sender, |i| [10, net, (i >> 8) as u8, i as u8])
                                .expect("flood")
                        })
                    })
                    .collect();
                floods
                    .into_iter()
                    .map(|f| f.join().expect("flood thread"))
                    .sum::<u64>()
            })
        });
        assert!(sent >= SYNS * 9 / 10, "{strategy}: {sent} SYNs sent");
        // Every connection held so far (this strategy's and the earlier ones') still answers,
        // from its own backend.
        for (s, conns) in &mut held {
            let lost = in_ns(&topo.client, || {
                let mut lost = 0;
                for (c, id) in conns.iter_mut() {
                    if c.ask().ok().as_deref() != Some(id.as_str()) {
                        lost += 1;
                    }
                }
                lost
            });
            println!("after {strategy}'s flood of {sent} SYNs: {s} lost {lost} of {HELD}");
            assert_eq!(
                lost, 0,
                "{s}: {lost} of {HELD} connections reset by {strategy}'s flood"
            );
        }
    }
    let counters = &d.json(&["stats"])["counters"];
    println!("{counters}");
    // The floods went to the embryonic table; the held connections' second packets moved them.
    let inserted = counters["embryonic_insert"].as_u64().unwrap_or(0);
    assert!(inserted >= 5 * SYNS * 9 / 10, "embryonic inserts: {inserted}");
    let promoted = counters["embryonic_promoted"].as_u64().unwrap_or(0);
    assert!(promoted >= (5 * HELD) as u64, "promotions: {promoted}");
}

/// SYNs that never complete count toward least connections only until the census removes
/// their embryonic entries, about 32 s after the first packet; aged here by rewriting their
/// `opened` in the pinned map, so the test waits one census (every 10 s), not 32 s.
#[test]
fn syns_that_never_complete_stop_counting_once_the_census_ages_them() {
    const SYNS: u64 = 50;
    let topo = Topology::new(3).expect("topology");
    let d = start(&topo, "least-connections");
    let active = |d: &Daemon| backends(d, "web4").values().map(|c| c.1).sum::<i64>();
    assert_eq!(active(&d), 0, "{:?}", backends(&d, "web4"));
    let flood = syn_flood(&topo, 1000, Duration::from_millis(SYNS));
    let sent = in_ns(&topo.client, move || {
        let sender = lb_tests::flood::RawSender::open("eth0").expect("packet socket");
        flood.run(&sender, |i| [10, 77, 0, 1 + i as u8]).expect("SYNs")
    });
    let counted = wait_until(Duration::from_secs(5), || active(&d) == sent as i64);
    assert!(
        counted,
        "{sent} SYNs sent, active flows {:?}",
        backends(&d, "web4")
    );

    // Each SYN's entry, aged past the TTL in place.
    let mut map = flow_table(&d, lb_common::maps::EMBRYONIC);
    let entries: Vec<_> = map.iter().filter_map(Result::ok).collect();
    assert_eq!(entries.len() as u64, sent, "one embryonic entry per SYN");
    for (k, mut v) in entries {
        v.opened = v.opened.wrapping_sub(lb_common::flow::EMBRYONIC_TTL + 2);
        map.insert(k, v, 0).expect("age the entry");
    }
    // The next census (at most 10 s away) removes them and corrects the counts to 0.
    let mut left = (0, 0);
    let aged = wait_until(Duration::from_secs(15), || {
        left = (map.keys().count(), active(&d));
        left == (0, 0)
    });
    assert!(aged, "(embryonic entries, active flows) left: {left:?}");
}
