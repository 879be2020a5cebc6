//! End to end: real TCP and UDP through the XDP balancer in network namespaces joined by veth,
//! with the daemon and CLI as users run them.

use std::{collections::HashMap, net::IpAddr};

use lb_tests::{
    Daemon, Topology,
    client::{http_get, tcp_flows, udp_flows},
    topology::{PORT, VIP4, VIP6},
};

fn start(backends: &[&str], total: usize) -> (Topology, Daemon) {
    let topo = Topology::new(total).expect("topology");
    let (instance, run_dir) = Daemon::new_paths();
    let config = topo.config(&instance, &run_dir, backends);
    let daemon = Daemon::start(&topo, &instance, &run_dir, &config).expect("daemon starts");
    wait_resolved(&daemon);
    (topo, daemon)
}

/// Waits (bounded) until every backend of every service has a MAC and table slots.
fn wait_resolved(d: &Daemon) {
    d.wait_all_in_tables();
}

/// Each backend's share must be within 5 binomial standard deviations of fair (about ±25% at
/// 600 flows over 3 backends): random hashing strays further only once in millions of checks,
/// while a skewed table or a stuck backend fails it.
fn assert_fair(counts: &HashMap<String, usize>, backends: &[&str], flows: usize, what: &str) {
    let p = 1.0 / backends.len() as f64;
    let fair = flows as f64 * p;
    let bound = 5.0 * (flows as f64 * p * (1.0 - p)).sqrt();
    for b in backends {
        let got = *counts.get(*b).unwrap_or(&0) as f64;
        assert!(
            (got - fair).abs() <= bound,
            "{what}: {b} got {got} of {flows} flows (fair {fair:.0} ± {bound:.0}): {counts:?}"
        );
    }
    assert_eq!(
        counts.values().sum::<usize>(),
        flows,
        "{what}: every flow answered"
    );
    assert!(
        counts.keys().all(|k| backends.contains(&k.as_str())),
        "{what}: unexpected backend in {counts:?}"
    );
}

#[test]
fn tcp_and_udp_reach_all_backends_fairly_in_both_families() {
    let (topo, d) = start(&["b1", "b2", "b3"], 3);
    let all = ["b1", "b2", "b3"];
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        let (tcp, _) = tcp_flows(&topo, vip, 600, false);
        assert_fair(&tcp, &all, 600, &format!("tcp {vip}"));
        let udp = udp_flows(&topo, vip, 600);
        assert_fair(&udp, &all, 600, &format!("udp {vip}"));
    }
    let stats = d.json(&["stats"]);
    assert!(stats["counters"]["tx"].as_u64() > Some(2400), "{stats}");
    for s in stats["services"].as_array().expect("services") {
        // UDP sockets may get a recycled source port, which is the same flow again.
        let min = if s["name"].as_str().is_some_and(|n| n.starts_with("web")) {
            600
        } else {
            500
        };
        assert!(s["new_flows"].as_u64() >= Some(min), "every flow counted: {s}");
        let per_backend: u64 = s["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .map(|b| b["new_flows"].as_u64().unwrap_or(0))
            .sum();
        assert_eq!(Some(per_backend), s["new_flows"].as_u64(), "{s}");
    }
    // The CLI's lookup agrees with where a live connection landed.
    let (_, mut kept) = tcp_flows(&topo, IpAddr::V4(VIP4), 5, true);
    for (conn, id) in kept.iter_mut() {
        let local = conn.writer.local_addr().expect("local addr");
        let answer = d.json(&[
            "lookup",
            "--protocol",
            "tcp",
            "--src",
            &local.to_string(),
            "--dst",
            &format!("{VIP4}:{PORT}"),
        ]);
        assert_eq!(answer["backend"].as_str(), Some(id.as_str()), "{answer}");
    }
}

#[test]
fn backend_changes_keep_unaffected_connections_and_move_new_flows() {
    let (mut topo, d) = start(&["b1", "b2", "b3"], 3);
    let (_, mut open) = tcp_flows(&topo, IpAddr::V4(VIP4), 60, true);
    assert!(
        open.iter().filter(|(_, id)| id != "b1").count() >= 30,
        "enough connections on b2/b3"
    );

    let b4 = topo.add_backend("b4").expect("b4").v4;
    let out = d.cli(&["backend", "add", "web4", "b4", "--address", &b4.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = d.cli(&["backend", "remove", "web4", "b1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_resolved(&d);

    for (conn, id) in open.iter_mut().filter(|(_, id)| id != "b1") {
        let answer = conn
            .ask()
            .unwrap_or_else(|e| panic!("connection on {id} broke after the change: {e}"));
        assert_eq!(&answer, id, "an unaffected connection moved");
    }
    let (counts, _) = tcp_flows(&topo, IpAddr::V4(VIP4), 300, false);
    assert!(
        !counts.contains_key("b1"),
        "new flows still reach the removed backend: {counts:?}"
    );
    assert_fair(&counts, &["b2", "b3", "b4"], 300, "after the change");
}

#[test]
fn sigkill_restart_keeps_connections_and_state() {
    let (topo, mut d) = start(&["b1", "b2", "b3"], 3);
    let out = d.cli(&["backend", "weight", "web4", "b2", "50"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, mut open) = tcp_flows(&topo, IpAddr::V4(VIP4), 50, true);
    let before = d.json(&["service", "list"]);

    d.kill9();
    for (conn, id) in open.iter_mut() {
        assert_eq!(&conn.ask().expect("forwarding goes on without the daemon"), id);
    }
    d.restart(&topo).expect("restart");
    let status = d.json(&["status"]);
    assert_eq!(status["adopted"], true, "{status}");
    assert!(status["interfaces"][0]["adopted"] == true, "{status}");
    // The census counts the open connections (its first count is at start): the fill.
    let counted = lb_tests::wait_until(std::time::Duration::from_secs(12), || {
        d.json(&["status"])["conntrack"]["entries"].as_u64() >= Some(50)
    });
    let status = d.json(&["status"]);
    assert!(counted, "{status}");
    assert_eq!(status["conntrack"]["size"], 65536, "{status}");
    assert!(status["conntrack"]["embryonic_entries"].is_u64(), "{status}");
    assert_eq!(status["backends_unhealthy"], 0, "{status}");
    // The same, as text: one line a thing.
    let text = String::from_utf8_lossy(&d.cli(&["status"]).stdout).to_string();
    assert!(
        text.lines()
            .any(|l| l.starts_with("attached") && l.contains("eth0") && l.contains("(adopted)")),
        "{text}"
    );
    let entries = status["conntrack"]["entries"].as_u64().unwrap_or(0);
    assert!(
        text.lines().any(|l| l.starts_with(&format!("conntrack  {entries} of 65536 ("))
            && l.contains(", embryonic ")),
        "{text}"
    );
    assert!(text.lines().any(|l| l == "unhealthy  none"), "{text}");
    assert_eq!(
        d.json(&["service", "list"]),
        before,
        "the CLI sees the same state"
    );
    for (conn, id) in open.iter_mut() {
        assert_eq!(&conn.ask().expect("connection survives the restart"), id);
    }
    let (counts, _) = tcp_flows(&topo, IpAddr::V4(VIP4), 30, false);
    assert_eq!(counts.values().sum::<usize>(), 30);
}

/// `lb backend drain`: b2 takes no new connection while the ones it has go on, its configured
/// weight stays, and every reader says why. A reload of the unchanged file and a restart keep
/// the drain (operator intent); `undrain` brings b2 back at its weight.
#[test]
fn a_drained_backend_keeps_its_connections_and_weight_over_a_reload_and_a_restart() {
    let (topo, mut d) = start(&["b1", "b2", "b3"], 3);
    let (_, mut open) = tcp_flows(&topo, IpAddr::V4(VIP4), 60, true);
    assert!(
        open.iter().filter(|(_, id)| id == "b2").count() >= 5,
        "enough connections on b2"
    );
    let ok = |out: std::process::Output| {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    ok(d.cli(&["backend", "drain", "web4", "b2"]));
    // Drained again: no change, no error.
    ok(d.cli(&["backend", "drain", "web4", "b2"]));
    let drained = |d: &Daemon, what: &str| {
        let h = d.health_of("web4", "b2");
        assert_eq!(h["state"], "drained", "{what}: {h}");
        assert_eq!(h["drain"]["reason"], "operator", "{what}: {h}");
        assert_eq!(
            (&h["weight"], &h["effective_weight"]),
            (&100.into(), &0.into()),
            "{what}: {h}"
        );
        assert_eq!(d.health_of("web6", "b2")["state"], "up", "{what}: only web4's b2");
    };
    drained(&d, "drained");
    // No new connection reaches b2; each established one still answers from where it was.
    let new_flows = |d: &Daemon, what: &str| {
        let (counts, _) = tcp_flows(&topo, IpAddr::V4(VIP4), 150, false);
        assert!(
            !counts.contains_key("b2"),
            "{what}: new flows reach b2: {counts:?}\n{}",
            d.log_tail(20)
        );
        assert_eq!(counts.values().sum::<usize>(), 150, "{what}");
    };
    let established = |open: &mut Vec<(lb_tests::client::Conn, String)>, what: &str| {
        for (conn, id) in open.iter_mut() {
            let answer = conn
                .ask()
                .unwrap_or_else(|e| panic!("{what}: a connection on {id} broke: {e}"));
            assert_eq!(&answer, id, "{what}: a connection moved");
        }
    };
    new_flows(&d, "drained");
    established(&mut open, "drained");

    // Every reader says it: lb health, lb service list, lb backend list, the metrics.
    // b2's line in web4's part of a listing (a service's line, then its backends indented).
    let line_of = |text: &str| {
        let mut in_web4 = false;
        for l in text.lines() {
            if !l.starts_with(' ') {
                in_web4 = l.split_whitespace().next() == Some("web4");
            }
            let b2 = l.trim_start().starts_with("b2 ") || (l.starts_with("web4 ") && l.contains(" b2 "));
            if b2 && (in_web4 || l.starts_with("web4 ")) {
                return l.to_string();
            }
        }
        panic!("no line for web4's b2 in {text}");
    };
    let health = ok(d.cli(&["health", "web4"]));
    let line = line_of(&health);
    assert!(
        line.contains("drained") && line.contains("weight=0/100") && line.contains("by the operator"),
        "{health}"
    );
    let listed = ok(d.cli(&["service", "list"]));
    let line = line_of(&listed);
    assert!(
        line.contains(" drained ") && line.contains("weight=0/100") && line.contains("by the operator"),
        "{listed}"
    );
    let line = line_of(&ok(d.cli(&["backend", "list", "web4"])));
    assert!(
        line.contains(" drained ") && line.contains("weight=0/100"),
        "{line}"
    );
    let (_, metrics) =
        http_get(&topo.lb, "127.0.0.1:9464".parse().unwrap(), "/metrics", None).expect("scrape");
    assert!(
        metrics.contains("lb_backend_drained{service=\"web4\",backend=\"b2\",reason=\"operator\"} 1"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("drained"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        metrics.matches("lb_backend_drained{").count(),
        1,
        "only b2 of web4"
    );

    // A reload of the unchanged file keeps the drain.
    ok(d.cli(&["reload"]));
    drained(&d, "after a reload");
    new_flows(&d, "after a reload");

    // So does a restart (the state file has it); the connections go on through both.
    d.restart(&topo).expect("restart");
    // Restored: every backend resolved, and in its tables but for the drained one.
    let restored = lb_tests::wait_until(std::time::Duration::from_secs(15), || {
        let list = d.json(&["service", "list"]);
        list.as_array().into_iter().flatten().all(|s| {
            s["backends"].as_array().into_iter().flatten().all(|b| {
                let held = s["name"] == "web4" && b["id"] == "b2";
                b["resolved"] == true && held == (b["table_slots"] == 0)
            })
        })
    });
    assert!(restored, "{}\n{}", d.json(&["service", "list"]), d.log_tail(20));
    drained(&d, "after a restart");
    new_flows(&d, "after a restart");
    established(&mut open, "after a restart");

    // Undrained: b2 takes new flows at its weight again.
    ok(d.cli(&["backend", "undrain", "web4", "b2"]));
    let h = d.health_of("web4", "b2");
    assert_eq!(
        (&h["state"], &h["drain"]),
        (&"up".into(), &serde_json::Value::Null),
        "{h}"
    );
    assert_eq!(h["effective_weight"], 100, "{h}");
    let (counts, _) = tcp_flows(&topo, IpAddr::V4(VIP4), 300, false);
    assert_fair(&counts, &["b1", "b2", "b3"], 300, "after undrain");
    established(&mut open, "after undrain");
    let (_, metrics) =
        http_get(&topo.lb, "127.0.0.1:9464".parse().unwrap(), "/metrics", None).expect("scrape");
    assert!(!metrics.contains("lb_backend_drained{"), "undrained: no series");

    // Bad input: one line, nothing changed.
    for (args, needle) in [
        (
            ["backend", "drain", "web4", "b9"],
            "service web4 has no backend b9",
        ),
        (["backend", "drain", "nope", "b2"], "unknown service nope"),
    ] {
        assert_one_line_error(&d.cli(&args), needle, "drain of an unknown backend");
    }
    assert_eq!(d.health_of("web4", "b2")["state"], "up");
}

fn assert_one_line_error(out: &std::process::Output, needle: &str, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what}: must fail");
    assert_eq!(err.trim_end().lines().count(), 1, "{what}: one line, got {err:?}");
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "{what}: {err:?} should mention {needle:?}"
    );
}

#[test]
fn bad_input_gets_one_line_errors_and_changes_nothing() {
    let (topo, d) = start(&["b1", "b2"], 2);
    let before = d.json(&["service", "list"]);
    let cases: &[(&[&str], &str)] = &[
        (
            &["backend", "add", "nosuch", "x", "--address", "10.99.0.50"],
            "unknown service",
        ),
        (
            &["backend", "add", "web4", "b1", "--address", "10.99.0.60"],
            "already has a backend b1",
        ),
        (
            &["backend", "add", "web4", "b9", "--address", "10.99.0.300"],
            "invalid value",
        ),
        (
            &["backend", "add", "web4", "b9", "--address", "fd99::11"],
            "same IP family",
        ),
        (
            &["backend", "add", "web4", "b9", "--address", "10.98.0.1"],
            "10.98.0.1",
        ),
        (
            &["backend", "add", "web4", "b 9", "--address", "10.99.0.61"],
            "invalid backend id",
        ),
        (&["backend", "weight", "web4", "b1", "100000"], "out of range"),
        (&["backend", "weight", "web4", "nosuch", "10"], "has no backend"),
        (&["backend", "remove", "web4", "nosuch"], "has no backend"),
        (
            &[
                "service",
                "add",
                "new",
                "--vip",
                "10.100.0.5",
                "--port",
                "80",
                "--table-size",
                "65536",
            ],
            "prime",
        ),
        (
            &["service", "add", "web4", "--vip", "10.100.0.5", "--port", "80"],
            "already exists",
        ),
        (
            &["service", "add", "dup", "--vip", "10.100.0.1", "--port", "8080"],
            "duplicates VIP",
        ),
        (
            &[
                "service",
                "add",
                "x",
                "--vip",
                "10.100.0.5",
                "--port",
                "80",
                "--protocol",
                "sctp",
            ],
            "invalid value",
        ),
        (&["service", "remove", "nosuch"], "unknown service"),
        (
            &["lookup", "--src", "10.99.0.1:1000", "--dst", "10.100.0.77:80"],
            "no service",
        ),
    ];
    for (args, needle) in cases {
        assert_one_line_error(&d.cli(args), needle, &format!("lb {args:?}"));
    }
    assert_eq!(
        d.json(&["service", "list"]),
        before,
        "bad input changed the services"
    );

    // A reload with a broken config is rejected whole.
    let good = std::fs::read_to_string(&d.config).expect("config");
    std::fs::write(&d.config, good.replace("weight = 100", "weight = 100000")).expect("write");
    assert_one_line_error(&d.cli(&["reload"]), "out of range", "reload of a bad config");
    std::fs::write(&d.config, &good).expect("restore");
    assert_eq!(
        d.json(&["service", "list"]),
        before,
        "a bad reload changed the services"
    );

    // No daemon behind the socket.
    let out = std::process::Command::new(lb_tests::lb_bin())
        .args(["--instance", "lbt-none", "--run-dir", "/nonexistent", "status"])
        .output()
        .expect("lb");
    assert_one_line_error(&out, "is the daemon running", "daemon not running");

    // Bad config files make the daemon refuse to start, and leave nothing behind.
    let (instance, run_dir) = Daemon::new_paths();
    let base = topo.config(&instance, &run_dir, &["b1"]);
    for (text, needle) in [
        (
            base.replace(
                "table_pool_slots = 1048576",
                "table_pool_slots = 1048576\nbogus = 1",
            ),
            "unknown field",
        ),
        (
            base.replace("interfaces = [\"eth0\"]", "interfaces = [\"nosuch0\"]"),
            "unknown interface nosuch0",
        ),
        (
            base.replace("protocol = \"udp\"", "protocol = \"udp\"\ntable_size = 100"),
            "prime",
        ),
        // The balancer's own address as a VIP (10.99.0.2 is its eth0's).
        (
            base.replace("vip = \"10.100.0.1\"", "vip = \"10.99.0.2\""),
            "allow_own_address = true",
        ),
    ] {
        let err = Daemon::start(&topo, &instance, &run_dir, &text)
            .err()
            .expect("daemon must refuse");
        let log = err.to_string();
        assert!(log.contains(needle), "{log}");
        // The harness error is "daemon exited with <status>: <daemon stderr>".
        let stderr = log
            .split_once("exit status: 1: ")
            .map(|(_, e)| e)
            .unwrap_or_default();
        let last = stderr.trim_end().lines().last().unwrap_or_default().to_string();
        assert!(
            last.starts_with("error:") && last.contains(needle),
            "the daemon ends with a one-line error: {last:?}"
        );
        assert!(
            !std::path::Path::new("/sys/fs/bpf").join(&instance).exists(),
            "no pins left after a refused start"
        );
        // `lb config check` says what the daemon said, without starting one (the file again
        // where the daemon read it: the message names it).
        std::fs::create_dir_all(&run_dir).expect("run dir");
        std::fs::write(run_dir.join("lb.toml"), &text).expect("config");
        let check = topo
            .lb
            .command(lb_tests::lb_bin())
            .args(["config", "check"])
            .arg(run_dir.join("lb.toml"))
            .output()
            .expect("lb config check");
        assert_eq!(check.status.code(), Some(1), "{check:?}");
        assert_eq!(
            String::from_utf8_lossy(&check.stderr).trim_end(),
            last,
            "config check"
        );
    }
    let _ = std::fs::remove_dir_all(&run_dir);
}

fn stderr(out: &std::process::Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Changes an operator rarely means: a VIP that is the balancer's own address is refused
/// (one line naming the flag) unless the flag is given, by the API and by a reload; every
/// backend at weight 0, a service's last backend removed and a port-0 service over a VIP in
/// use are applied, with a warning in the answer and the log.
#[test]
fn dangerous_changes_are_refused_or_warned_about() {
    let (_topo, d) = start(&["b1", "b2"], 2);
    let before = d.json(&["service", "list"]);
    // `lb service add ssh --vip <balancer address> --port 22`: refused, nothing changed.
    let ssh = ["service", "add", "ssh", "--vip", "10.99.0.2", "--port", "22"];
    assert_one_line_error(&d.cli(&ssh), "--allow-own-address", "an own address as VIP");
    assert_eq!(d.json(&["service", "list"]), before);
    // A reload that brings one: refused whole.
    let good = std::fs::read_to_string(&d.config).expect("config");
    let own =
        format!("{good}\n[[service]]\nname = \"ssh\"\nvip = \"10.99.0.2\"\nport = 22\nprotocol = \"tcp\"\n");
    std::fs::write(&d.config, &own).expect("write");
    assert_one_line_error(&d.cli(&["reload"]), "allow_own_address = true", "reload");
    assert_eq!(d.json(&["service", "list"]), before);
    // Allowed when asked, in the file or by the flag.
    std::fs::write(
        &d.config,
        own.replace("port = 22\n", "port = 22\nallow_own_address = true\n"),
    )
    .expect("write");
    assert_eq!(stderr(&d.cli(&["reload"])), "");
    std::fs::write(&d.config, &good).expect("restore");
    assert_eq!(stderr(&d.cli(&["reload"])), "");
    let mut allowed = ssh.to_vec();
    allowed.push("--allow-own-address");
    assert_eq!(stderr(&d.cli(&allowed)), "");
    assert_eq!(stderr(&d.cli(&["service", "remove", "ssh"])), "");

    // The first backend at weight 0: nothing to say; the last: said.
    assert_eq!(stderr(&d.cli(&["backend", "weight", "web4", "b1", "0"])), "");
    let said = stderr(&d.cli(&["backend", "weight", "web4", "b2", "0"]));
    assert!(
        said.starts_with("warning: service web4: every backend has weight 0: its new flows are dropped"),
        "{said}"
    );
    assert_eq!(said.lines().count(), 1, "{said}");
    // The last backend removed.
    assert_eq!(stderr(&d.cli(&["backend", "remove", "dns4", "b1"])), "");
    let said = stderr(&d.cli(&["backend", "remove", "dns4", "b2"]));
    assert!(
        said.starts_with("warning: service dns4: its last backend was removed"),
        "{said}"
    );
    // Port 0 on a VIP web4 uses.
    let said = stderr(&d.cli(&["service", "add", "all4", "--vip", "10.100.0.1", "--port", "0"]));
    assert!(
        said.starts_with(
            "warning: service all4: port 0 takes every other tcp port of 10.100.0.1, which web4 (port 8080) also uses"
        ),
        "{said}"
    );
    // A reload that leaves web6 without backends: said in its answer too.
    let (head, rest) = good.split_once("name = \"web6\"").expect("web6");
    let (web6, tail) = rest.split_once("\n[[service]]").expect("dns6 after web6");
    let web6 = web6.split_once("\n[[service.backend]]").expect("a backend").0;
    let bare = format!("{head}name = \"web6\"{web6}\n\n[[service]]{tail}");
    std::fs::write(&d.config, &bare).expect("write");
    let said = stderr(&d.cli(&["reload"]));
    assert!(
        said.starts_with("warning: service web6: its last backend was removed"),
        "{said}"
    );
    // Each in the daemon's log too, once.
    let log = d.log();
    for needle in [
        "service web4: every backend has weight 0",
        "service dns4: its last backend was removed",
        "service all4: port 0 takes every other tcp port",
        "service web6: its last backend was removed",
    ] {
        assert_eq!(log.matches(needle).count(), 1, "{needle}: {log}");
    }
}

/// A backend whose MAC changes (its host replaced, its address kept) is followed: the
/// neighbour refresh reads the new entry (one dump of the table per family, not a query per
/// backend) and new connections reach the backend at its new MAC.
#[test]
fn a_backend_whose_mac_changes_is_followed_by_the_refresh() {
    let (topo, d) = start(&["b1", "b2"], 2);
    let b1 = topo.backend("b1");
    let new = "02:00:00:00:99:01";
    let macs = || -> Vec<serde_json::Value> {
        ["web4", "web6"]
            .iter()
            .flat_map(|s| d.backends_of(s))
            .filter(|b| b["id"] == "b1")
            .map(|b| b["mac"].clone())
            .collect()
    };
    assert!(macs().iter().all(|m| m != new), "{:?}", macs());
    b1.ns
        .sh(&format!("ip link set dev eth0 address {new}"))
        .expect("new MAC");
    topo.lb
        .sh(&format!(
            "ip neigh replace {} lladdr {new} dev eth0 nud reachable && ip -6 neigh replace {} lladdr {new} dev eth0 nud reachable",
            b1.v4, b1.v6
        ))
        .expect("neighbour entries");
    let followed = lb_tests::wait_until(std::time::Duration::from_secs(10), || {
        let m = macs();
        m.len() == 2 && m.iter().all(|m| m == new)
    });
    assert!(followed, "{:?}\n{}", macs(), d.log_tail(10));
    // The batched lookup itself, in the balancer's namespace: each on-link address from the
    // one dump, and an address with no entry unresolved (the refresh then resolves it).
    let b2 = topo.backend("b2");
    let addrs = [
        IpAddr::V4(b1.v4),
        IpAddr::V6(b1.v6),
        IpAddr::V4(b2.v4),
        "10.99.0.250".parse().unwrap(),
    ];
    let b2_mac = b2
        .ns
        .sh("ip -br link show dev eth0 | awk '{print $3}'")
        .expect("b2's MAC");
    let looked = lb_tests::netns::spawn_in(&topo.lb, "lookup-all", move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let r = lb_userspace::neigh::Resolver::new().expect("resolver");
            r.lookup_all(&addrs)
                .await
                .into_iter()
                .map(|h| {
                    h.map(|h| lb_userspace::control::queries::mac_string(&h.dst_mac))
                        .map_err(|e| e.to_string())
                })
                .collect::<Vec<_>>()
        })
    })
    .join()
    .expect("lookup thread");
    assert_eq!(looked[0].as_deref(), Ok(new), "{looked:?}");
    assert_eq!(looked[1].as_deref(), Ok(new), "{looked:?}");
    assert_eq!(looked[2].as_deref(), Ok(b2_mac.trim()), "{looked:?}");
    assert!(looked[3].is_err(), "{looked:?}");
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        let (counts, _) = tcp_flows(&topo, vip, 40, false);
        assert!(
            counts.get("b1").copied().unwrap_or(0) > 0,
            "{vip}: no new connection reached b1 at its new MAC: {counts:?}"
        );
    }
}
