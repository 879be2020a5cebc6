//! Health end to end: real checks against real servers in backend namespaces, real failures
//! (a stopped server, a link pulled, a wrong answer), and the data plane's tables read back
//! through the CLI. Every wait is on a condition, with a bound; detection times are measured.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use lb_tests::{
    Daemon, Topology,
    client::tcp_flows,
    servers::{Reply, Responder},
    topology::{PORT, VIP4, VIP6},
    wait_until,
};

/// The backends' health endpoint (on their own addresses, not the VIP).
const HEALTH_PORT: u16 = 8081;

/// Fast checks, as the detection goal sets them.
const FAST_TCP: &str = "kind = \"tcp\"\ninterval = 0.2\ntimeout = 0.2\nfast_interval = 0.2\nerror_threshold = 2\nrecovery_threshold = 2\njitter = 0.1\n";

/// A config with one TCP and one UDP service per family, `tcp_health` under each TCP service
/// and `udp_health` under each UDP one (empty = no checks), the port set to HEALTH_PORT.
fn config(
    topo: &Topology,
    d: (&str, &std::path::Path),
    backends: &[&str],
    tcp_health: &str,
    udp_health: &str,
) -> String {
    let (instance, run_dir) = d;
    let mut text = format!(
        "[daemon]\ninstance = \"{instance}\"\ninterfaces = [\"eth0\"]\nxdp_mode = \"native\"\nrun_dir = \"{}\"\nconntrack_size = 65536\ntable_pool_slots = 1048576\nneighbour_refresh_ms = 500\n",
        run_dir.display()
    );
    for (name, vip, proto) in [
        ("web4", IpAddr::V4(VIP4), "tcp"),
        ("dns4", IpAddr::V4(VIP4), "udp"),
        ("web6", IpAddr::V6(VIP6), "tcp"),
        ("dns6", IpAddr::V6(VIP6), "udp"),
    ] {
        text.push_str(&format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {PORT}\nprotocol = \"{proto}\"\ntable_size = 1031\n"
        ));
        let health = if proto == "tcp" { tcp_health } else { udp_health };
        if !health.is_empty() {
            text.push_str(&format!("\n[service.health]\nport = {HEALTH_PORT}\n{health}"));
        }
        for id in backends {
            let b = topo.backend(id);
            let addr = if vip.is_ipv4() {
                IpAddr::V4(b.v4)
            } else {
                IpAddr::V6(b.v6)
            };
            text.push_str(&format!(
                "\n[[service.backend]]\nid = \"{id}\"\naddress = \"{addr}\"\nweight = 100\n"
            ));
        }
    }
    text
}

/// A health responder on each backend's own addresses.
fn responders(
    topo: &Topology,
    backends: &[&str],
    reply: Reply,
    udp: Option<&str>,
) -> HashMap<String, Responder> {
    backends
        .iter()
        .map(|id| {
            let b = topo.backend(id);
            let addrs = [
                SocketAddr::new(IpAddr::V4(b.v4), HEALTH_PORT),
                SocketAddr::new(IpAddr::V6(b.v6), HEALTH_PORT),
            ];
            (
                id.to_string(),
                Responder::start(&b.ns, &addrs, reply.clone(), udp),
            )
        })
        .collect()
}

fn start(topo: &Topology, backends: &[&str], tcp_health: &str, udp_health: &str) -> Daemon {
    let (instance, run_dir) = Daemon::new_paths();
    let text = config(topo, (&instance, &run_dir), backends, tcp_health, udp_health);
    let d = Daemon::start(topo, &instance, &run_dir, &text).expect("daemon starts");
    let ok = wait_until(Duration::from_secs(15), || {
        slots(&d).values().all(|per| per.values().all(|&n| n > 0))
    });
    assert!(
        ok,
        "backends did not resolve: {}\n{}",
        d.json(&["service", "list"]),
        d.log()
    );
    d
}

/// Table slots per backend, per service, as the data plane's active tables hold them.
fn slots(d: &Daemon) -> HashMap<String, HashMap<String, u64>> {
    let list = d.json(&["service", "list"]);
    list.as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let per = s["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| {
                    (
                        b["id"].as_str().unwrap_or_default().to_string(),
                        b["table_slots"].as_u64().unwrap_or(0),
                    )
                })
                .collect();
            (s["name"].as_str().unwrap_or_default().to_string(), per)
        })
        .collect()
}

/// One backend's entry in `lb health`.
fn health_of(d: &Daemon, service: &str, id: &str) -> serde_json::Value {
    d.health_of(service, id)
}

/// Waits until every checked backend has been checked at least `n` times.
fn wait_checked(d: &Daemon, services: &[&str], n: u64) {
    let ok = wait_until(Duration::from_secs(10), || {
        services.iter().all(|s| {
            d.json(&["health", s])[0]["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|b| b["check"]["checks"].as_u64() >= Some(n))
        })
    });
    assert!(ok, "checks did not run: {}", d.json(&["health"]));
}

/// Time until `cond` holds, polled; panics after `bound`.
fn time_until(bound: Duration, what: &str, d: &Daemon, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    let ok = wait_until(bound, &mut cond);
    let took = start.elapsed();
    assert!(
        ok,
        "{what} did not happen within {bound:?}: {}\n{}",
        d.json(&["health"]),
        d.log()
    );
    took
}

#[test]
fn a_stopped_server_is_out_within_a_second_and_back_after_recovery() {
    let mut topo = Topology::new(3).expect("topology");
    let all = ["b1", "b2", "b3"];
    let health = responders(&topo, &all, Reply::Http(200, "ok".into()), None);
    let d = start(&topo, &all, &format!("{FAST_TCP}slow_start = 2.0\n"), "");
    wait_checked(&d, &["web4", "web6"], 3);
    let (_, mut open) = tcp_flows(&topo, IpAddr::V4(VIP4), 60, true);
    assert!(open.iter().filter(|(_, id)| id != "b2").count() >= 30);

    // Stop b2's servers, the service and its health endpoint, as a crashed process would.
    let mut health = health;
    let stopping = Instant::now();
    topo.stop_servers("b2");
    drop(health.remove("b2"));
    // From when the servers are stopped: joining their threads (60 connections open) takes a
    // varying moment, during which the listeners are already closed or closing.
    let stopped = Instant::now();
    println!(
        "b2's servers took {} ms to stop",
        (stopped - stopping).as_millis()
    );
    let ok = wait_until(Duration::from_secs(3), || {
        let s = slots(&d);
        s["web4"]["b2"] == 0 && s["web6"]["b2"] == 0
    });
    let took = stopped.elapsed();
    assert!(ok, "b2 still in the tables: {}\n{}", d.json(&["health"]), d.log());
    println!(
        "refused server: out of both tables {} ms after it stopped",
        took.as_millis()
    );
    assert!(took <= Duration::from_secs(1), "took {took:?}");
    let h = health_of(&d, "web4", "b2");
    assert_eq!(h["state"], "down", "{h}");
    assert!(
        h["check"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("connection refused"),
        "the reason names what the check saw: {h}"
    );
    assert!(
        d.log().contains("backend web4/b2 is down"),
        "logged once with its reason"
    );
    // `lb status` counts it, once per service it serves (web4, web6).
    let status = d.json(&["status"]);
    assert_eq!(status["backends_unhealthy"], 2, "{status}");
    let text = String::from_utf8_lossy(&d.cli(&["status"]).stdout).into_owned();
    assert!(text.lines().any(|l| l == "unhealthy  2 backends down"), "{text}");
    // `lb health` says how long each backend has been in its state, and why.
    let text = String::from_utf8_lossy(&d.cli(&["health", "web4"]).stdout).into_owned();
    let b2 = text
        .lines()
        .find(|l| l.trim_start().starts_with("b2 "))
        .unwrap_or_else(|| panic!("no b2 in {text}"));
    assert!(
        b2.contains("in this state for ") && b2.contains("connection refused") && !b2.contains("since"),
        "{b2}"
    );
    let b1 = text
        .lines()
        .find(|l| l.trim_start().starts_with("b1 "))
        .unwrap_or_else(|| panic!("no b1 in {text}"));
    assert!(b1.contains("checked for ") && !b1.contains("since"), "{b1}");

    // The other backends' open connections are untouched, and new flows all succeed.
    for (conn, id) in open.iter_mut().filter(|(_, id)| id != "b2") {
        let answer = conn
            .ask()
            .unwrap_or_else(|e| panic!("connection on {id} broke while b2 went out: {e}"));
        assert_eq!(&answer, id);
    }
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        let (counts, _) = tcp_flows(&topo, vip, 200, false);
        assert!(!counts.contains_key("b2"), "{counts:?}");
        assert_eq!(counts.values().sum::<usize>(), 200);
    }

    // Recovery: back after recovery_threshold passed checks, its weight ramping over 2 s.
    topo.start_servers("b2");
    let b2 = topo.backend("b2");
    health.insert(
        "b2".into(),
        Responder::start(
            &b2.ns,
            &[
                SocketAddr::new(IpAddr::V4(b2.v4), HEALTH_PORT),
                SocketAddr::new(IpAddr::V6(b2.v6), HEALTH_PORT),
            ],
            Reply::Http(200, "ok".into()),
            None,
        ),
    );
    let mut seen = Vec::new();
    // Full weight needs the 2 s ramp and a score whose window has no failures left: about
    // 2.4 s, bounded generously (a loaded CI machine stretches the checks' timers).
    let back = time_until(Duration::from_secs(8), "full weight after slow start", &d, || {
        let w = health_of(&d, "web4", "b2")["effective_weight"]
            .as_u64()
            .unwrap_or(0);
        if seen.last() != Some(&w) {
            seen.push(w);
        }
        w == 100
    });
    println!(
        "recovered and ramped to full weight in {} ms, weights seen {seen:?}",
        back.as_millis()
    );
    let ramp: Vec<u64> = seen.iter().copied().filter(|&w| w > 0).collect();
    assert!(ramp.len() >= 3, "the weight ramps in steps: {seen:?}");
    assert!(ramp.windows(2).all(|w| w[0] < w[1]), "and only up: {seen:?}");
    assert!(slots(&d)["web4"]["b2"] > 0);
    assert_eq!(d.json(&["status"])["backends_unhealthy"], 0);
}

#[test]
fn a_pulled_link_is_out_within_two_seconds() {
    let topo = Topology::new(3).expect("topology");
    let all = ["b1", "b2", "b3"];
    let _health = responders(&topo, &all, Reply::Http(200, "ok".into()), None);
    let d = start(&topo, &all, FAST_TCP, "");
    wait_checked(&d, &["web4"], 3);
    topo.backend("b3")
        .ns
        .sh("ip link set eth0 down")
        .expect("link down");
    let took = time_until(
        Duration::from_secs(5),
        "b3 out after its link went down",
        &d,
        || {
            let s = slots(&d);
            s["web4"]["b3"] == 0 && s["web6"]["b3"] == 0
        },
    );
    println!(
        "blackholed backend: out of both tables {} ms after its link went down",
        took.as_millis()
    );
    assert!(took <= Duration::from_secs(2), "took {took:?}");
    let (counts, _) = tcp_flows(&topo, IpAddr::V4(VIP4), 100, false);
    assert!(
        !counts.contains_key("b3") && counts.values().sum::<usize>() == 100,
        "{counts:?}"
    );
}

#[test]
fn http_and_udp_checks_take_out_wrong_answers() {
    let topo = Topology::new(3).expect("topology");
    let all = ["b1", "b2", "b3"];
    let health = responders(&topo, &all, Reply::Http(200, "healthy".into()), Some("pong"));
    // One of three up is under the default panic threshold (0.5), which would spread flows over
    // all three: this test is about exclusion, so it allows a third.
    let http = "panic_threshold = 0.3\nkind = \"http\"\npath = \"/health\"\nexpect_status = \"200-299\"\nexpect_body = \"healthy\"\ninterval = 0.2\ntimeout = 0.2\nfast_interval = 0.2\nerror_threshold = 2\n";
    let udp = "kind = \"udp\"\nsend = \"ping\"\nexpect = \"pong\"\ninterval = 0.2\ntimeout = 0.2\nfast_interval = 0.2\nerror_threshold = 2\n";
    let d = start(&topo, &all, http, udp);
    wait_checked(&d, &["web4", "dns4", "web6", "dns6"], 3);
    assert!(
        slots(&d).values().all(|per| per.values().all(|&n| n > 0)),
        "all up first"
    );

    health["b1"].set(Reply::Http(503, "healthy".into()));
    health["b2"].set(Reply::Http(200, "sick".into()));
    *health["b3"].udp_reply.lock().expect("udp") = None;
    let took = time_until(Duration::from_secs(5), "wrong answers taken out", &d, || {
        let s = slots(&d);
        ["web4", "web6"]
            .iter()
            .all(|w| s[*w]["b1"] == 0 && s[*w]["b2"] == 0 && s[*w]["b3"] > 0)
            && ["dns4", "dns6"]
                .iter()
                .all(|u| s[*u]["b3"] == 0 && s[*u]["b1"] > 0 && s[*u]["b2"] > 0)
    });
    println!("http status/body and silent udp: out in {} ms", took.as_millis());
    let h = health_of(&d, "web4", "b1");
    assert!(
        h["check"]["last"]["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("status 503"),
        "{h}"
    );
    let h = health_of(&d, "web4", "b2");
    assert!(
        h["check"]["last"]["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("lacks \"healthy\""),
        "{h}"
    );
    let h = health_of(&d, "dns4", "b3");
    assert!(
        h["check"]["last"]["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("no answer"),
        "{h}"
    );
}

/// A backend's share of its service's table.
fn share(d: &Daemon, service: &str, id: &str) -> f64 {
    let s = slots(d);
    let per = &s[service];
    per[id] as f64 / per.values().sum::<u64>() as f64
}

#[test]
fn the_agent_drains_weighs_and_takes_down_and_an_unreachable_agent_changes_nothing() {
    let topo = Topology::new(3).expect("topology");
    let all = ["b1", "b2", "b3"];
    let agents = responders(&topo, &all, Reply::Agent("up ready".into()), None);
    let agent = format!(
        "kind = \"agent\"\nagent_port = {HEALTH_PORT}\nagent_send = \"hello\"\ninterval = 0.2\ntimeout = 0.2\npanic_threshold = 0.0\n"
    );
    let d = start(&topo, &all, &agent, "");
    let asked =
        |n: u64| move |d: &Daemon, id: &str| health_of(d, "web4", id)["agent"]["asked"].as_u64() >= Some(n);
    assert!(wait_until(Duration::from_secs(10), || all
        .iter()
        .all(|id| asked(2)(&d, id))));
    let (_, mut open) = tcp_flows(&topo, IpAddr::V4(VIP4), 40, true);

    // drain: no new flows, open connections keep working.
    agents["b1"].set(Reply::Agent("drain".into()));
    time_until(Duration::from_secs(3), "b1 drained", &d, || {
        slots(&d)["web4"]["b1"] == 0
    });
    for (conn, id) in open.iter_mut() {
        assert_eq!(&conn.ask().expect("open connections survive a drain"), id);
    }
    let (counts, _) = tcp_flows(&topo, IpAddr::V4(VIP4), 100, false);
    assert!(!counts.contains_key("b1"), "{counts:?}");
    agents["b1"].set(Reply::Agent("ready".into()));
    time_until(Duration::from_secs(3), "b1 ready again", &d, || {
        slots(&d)["web4"]["b1"] > 0
    });

    // 50%: its share halves (1/3 -> 50/250 = 1/5), within 15%.
    agents["b2"].set(Reply::Agent("weight:50%".into()));
    time_until(Duration::from_secs(3), "b2 at half weight", &d, || {
        health_of(&d, "web4", "b2")["effective_weight"] == 50
    });
    let got = share(&d, "web4", "b2");
    println!("agent 50%: b2 holds {:.3} of the table (goal 0.200)", got);
    assert!((got - 0.2).abs() <= 0.2 * 0.15, "share {got}");
    agents["b2"].set(Reply::Agent("100%".into()));

    // maint, down, and only the agent's own word undoing them.
    for (word, undo, not_undo) in [("maint", "ready", "up"), ("down #disk full", "up", "ready")] {
        agents["b3"].set(Reply::Agent(word.into()));
        time_until(Duration::from_secs(3), word, &d, || slots(&d)["web4"]["b3"] == 0);
        agents["b3"].set(Reply::Agent(not_undo.into()));
        let before = health_of(&d, "web4", "b3")["agent"]["asked"]
            .as_u64()
            .unwrap_or(0);
        assert!(wait_until(Duration::from_secs(3), || asked(before + 3)(&d, "b3")));
        assert_eq!(slots(&d)["web4"]["b3"], 0, "{not_undo:?} does not undo {word:?}");
        agents["b3"].set(Reply::Agent(undo.into()));
        time_until(Duration::from_secs(3), undo, &d, || {
            let s = slots(&d);
            s["web4"]["b3"] > 0 && s["web6"]["b3"] > 0
        });
    }
    let h = d.json(&["health", "web4"]);
    assert!(d.log().contains("disk full"), "the agent's reason is logged: {h}");

    // Malformed replies and an unreachable agent change nothing. First let both families'
    // services settle on the same agent words (their checks run on separate schedules).
    assert!(wait_until(Duration::from_secs(5), || {
        let s = slots(&d);
        s["web4"] == s["web6"] && s["web4"].values().all(|&n| n > 0)
    }));
    let before = slots(&d);
    agents["b1"].set(Reply::Agent("sleepy".into()));
    assert!(wait_until(Duration::from_secs(3), || {
        health_of(&d, "web4", "b1")["agent"]["malformed"].as_u64() >= Some(3)
    }));
    let mut agents = agents;
    drop(agents.remove("b2"));
    assert!(wait_until(Duration::from_secs(3), || {
        health_of(&d, "web4", "b2")["agent"]["unreachable"].as_u64() >= Some(3)
    }));
    assert_eq!(
        slots(&d),
        before,
        "nothing moved: {}",
        d.json(&["health", "web4"])
    );
    assert_eq!(health_of(&d, "web4", "b2")["state"], "up");
}

#[test]
fn external_scores_weigh_expire_and_bad_ones_change_nothing() {
    let topo = Topology::new(3).expect("topology");
    let all = ["b1", "b2", "b3"];
    let d = start(&topo, &all, "", "");
    let out = d.cli(&["backend", "health", "web4", "b2", "0.2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = 0.2 / 2.2;
    let got = share(&d, "web4", "b2");
    println!("external 0.2: b2 holds {got:.4} of the table (goal {want:.4})");
    assert!((got - want).abs() <= want * 0.2, "share {got}");
    // Flows follow the table: 1100 new connections, b2 within 5 binomial deviations.
    let (counts, _) = tcp_flows(&topo, IpAddr::V4(VIP4), 1100, false);
    let n = *counts.get("b2").unwrap_or(&0) as f64;
    let sd = (1100.0 * want * (1.0 - want)).sqrt();
    assert!((n - 1100.0 * want).abs() <= 5.0 * sd, "{counts:?}");

    // Bad scores and unknown names: one line, nothing changed.
    let before = slots(&d);
    for (args, needle) in [
        (vec!["backend", "health", "web4", "b2", "1.5"], "out of range"),
        (
            vec!["backend", "health", "web4", "b2", "--", "-0.1"],
            "out of range",
        ),
        (vec!["backend", "health", "web4", "b2", "NaN"], "out of range"),
        (
            vec!["backend", "health", "web4", "nope", "0.5"],
            "has no backend nope",
        ),
        (vec!["backend", "health", "nosvc", "b2", "0.5"], "unknown service"),
        (
            vec!["backend", "health", "web4", "b2", "0.5", "--ttl", "0"],
            "ttl",
        ),
        (vec!["backend", "health", "web4", "b2", "zero"], "invalid"),
        (vec!["health", "nosvc"], "unknown service"),
    ] {
        let out = d.cli(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    assert_eq!(slots(&d), before);

    // 0 excludes; with a TTL the score expires by itself.
    let out = d.cli(&["backend", "health", "web4", "b2", "0", "--ttl", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(slots(&d)["web4"]["b2"], 0);
    let took = time_until(Duration::from_secs(4), "the TTL expired", &d, || {
        health_of(&d, "web4", "b2")["effective_weight"] == 100
    });
    println!(
        "ttl 1 s: weight back {} ms after the call returned",
        took.as_millis()
    );
    assert!(
        took >= Duration::from_millis(800),
        "not before its time: {took:?}"
    );
    assert!(health_of(&d, "web4", "b2")["external"].is_null());
}

#[test]
fn panic_spreads_over_all_backends_when_too_few_are_up() {
    let topo = Topology::new(3).expect("topology");
    let all = ["b1", "b2", "b3"];
    let health = responders(&topo, &all, Reply::Http(200, "ok".into()), None);
    let d = start(&topo, &all, &format!("{FAST_TCP}panic_threshold = 0.8\n"), "");
    wait_checked(&d, &["web4"], 3);
    // b1 down alone: 2 of 3 up is under 0.8, so panic already.
    let mut health = health;
    drop(health.remove("b1"));
    time_until(Duration::from_secs(3), "b1 down", &d, || {
        health_of(&d, "web4", "b1")["state"] == "down"
    });
    drop(health.remove("b2"));
    time_until(Duration::from_secs(3), "b2 down", &d, || {
        health_of(&d, "web4", "b2")["state"] == "down"
    });
    let h = d.json(&["health", "web4"]);
    assert_eq!(h[0]["panic"], true, "{h}");
    assert!(slots(&d)["web4"].values().all(|&n| n > 0), "{:?}", slots(&d));
    assert!(d.log().contains("service web4: panic"));
    // The VIP servers still run: flows spread over all three.
    let (counts, _) = tcp_flows(&topo, IpAddr::V4(VIP4), 150, false);
    assert!(
        all.iter().all(|id| counts.get(*id).copied().unwrap_or(0) > 20),
        "{counts:?}"
    );
}

#[test]
fn the_breaker_opens_half_opens_and_closes_as_configured() {
    let topo = Topology::new(3).expect("topology");
    let all = ["b1", "b2", "b3"];
    let health = responders(&topo, &all, Reply::Http(200, "ok".into()), None);
    // The checks alone never take b1 down here (error_threshold 100, min_score 0): what moves
    // it is the breaker.
    let settings = "kind = \"http\"\npath = \"/\"\ninterval = 0.2\ntimeout = 0.2\nfast_interval = 0.2\nerror_threshold = 100\nmin_score = 0.0\nrecovery_threshold = 5\nbreaker_failures = 2\nbreaker_cooldown = 1.0\nhalf_open_share = 0.1\npanic_threshold = 0.0\n";
    let d = start(&topo, &all, settings, "");
    wait_checked(&d, &["web4"], 3);
    let breaker = |d: &Daemon| {
        health_of(d, "web4", "b1")["check"]["breaker"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(breaker(&d), "closed");

    health["b1"].set(Reply::Http(500, "".into()));
    let opened = time_until(Duration::from_secs(3), "breaker open", &d, || {
        breaker(&d) == "open"
    });
    // The check's view opens first; the writer's pass that takes b1 out of the tables follows.
    time_until(
        Duration::from_secs(1),
        "open in the tables: no new flows",
        &d,
        || health_of(&d, "web4", "b1")["breaker"] == "open" && slots(&d)["web4"]["b1"] == 0,
    );
    assert_eq!(
        health_of(&d, "web4", "b1")["state"],
        "up",
        "the breaker, not the checks"
    );
    // After its cooldown it half-opens; the next failure opens it again.
    let reopened = time_until(Duration::from_secs(4), "half-open, then open again", &d, || {
        let log = d.log();
        log.matches("web4/b1: circuit breaker HalfOpen after its cooldown")
            .count()
            >= 1
            && log.matches("web4/b1: circuit breaker Open after").count() >= 2
    });
    assert!(
        reopened >= Duration::from_millis(800),
        "not before the cooldown: {reopened:?}"
    );
    println!(
        "breaker: open {} ms after the first 500, half-open and open again {} ms later",
        opened.as_millis(),
        reopened.as_millis()
    );

    health["b1"].set(Reply::Http(200, "ok".into()));
    let mut half_open_weights = Vec::new();
    time_until(
        Duration::from_secs(6),
        "closed after recovery_threshold successes",
        &d,
        || {
            let h = health_of(&d, "web4", "b1");
            // The backend's breaker and weight as the tables have them, from one snapshot.
            if h["breaker"] == "half-open" {
                half_open_weights.push(h["effective_weight"].as_u64().unwrap_or(0));
            }
            h["breaker"] == "closed"
        },
    );
    assert!(!half_open_weights.is_empty(), "half-open was seen");
    assert!(
        half_open_weights.iter().all(|&w| (1..=10).contains(&w)),
        "half-open: at most half_open_share of its weight: {half_open_weights:?}"
    );
    time_until(
        Duration::from_secs(5),
        "full weight once the window is clean",
        &d,
        || health_of(&d, "web4", "b1")["effective_weight"] == 100,
    );
}

#[test]
fn with_the_default_checks_passive_signals_take_a_blackholed_backend_out_within_three_seconds() {
    let topo = Topology::new(3).expect("topology");
    let all = ["b1", "b2", "b3"];
    let _health = responders(&topo, &all, Reply::Http(200, "ok".into()), None);
    // The seed's defaults: a 5 s interval, 1 s timeout, 3 failures; passive health on.
    let d = start(&topo, &all, "kind = \"tcp\"\n", "");
    // Clients opening a connection every 5 ms whatever became of the earlier ones (open loop,
    // as independent clients do), each waiting up to 2.5 s: SYN retransmits come after 1 s.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let target = SocketAddr::new(IpAddr::V4(VIP4), PORT);
    let clients: Vec<_> = {
        let (stop, done) = (stop.clone(), done.clone());
        let ns = std::fs::File::open(topo.client.path()).expect("netns");
        vec![std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on this thread only; the runtime's threads start from it.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(5));
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    tick.tick().await;
                    let done = done.clone();
                    tokio::spawn(async move {
                        let attempt = tokio::time::timeout(
                            Duration::from_millis(2500),
                            tokio::net::TcpStream::connect(target),
                        );
                        if let Ok(Ok(_)) = attempt.await {
                            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    });
                }
            });
        })]
    };
    assert!(wait_until(Duration::from_secs(10), || done
        .load(std::sync::atomic::Ordering::Relaxed)
        > 300));
    let pulled = Instant::now();
    topo.backend("b3")
        .ns
        .sh("ip link set eth0 down")
        .expect("link down");
    let ok = wait_until(Duration::from_secs(10), || slots(&d)["web4"]["b3"] == 0);
    let took = pulled.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    let h = health_of(&d, "web4", "b3");
    assert!(ok, "b3 stayed in: {h}\n{}", d.log());
    println!(
        "blackhole, default checks: out {} ms after the link went down; {} passive failures, {} active checks",
        took.as_millis(),
        h["check"]["passive_failures"],
        h["check"]["checks"]
    );
    assert_eq!(h["state"], "down", "health took it out: {h}");
    assert!(
        h["check"]["passive_failures"].as_u64() >= Some(2),
        "passive signals counted: {h}"
    );
    assert!(took <= Duration::from_secs(3), "took {took:?}: {h}");
    let m = lb_tests::client::http_get(&topo.lb, "127.0.0.1:9464".parse().unwrap(), "/metrics", None)
        .expect("scrape")
        .1;
    assert!(
        m.lines().any(
            |l| l.starts_with("lb_backend_syn_retransmits_total{service=\"web4\",backend=\"b3\"}")
                && !l.ends_with(" 0")
        ),
        "the retransmits are exported: {:?}",
        m.lines()
            .filter(|l| l.contains("syn_retransmits"))
            .collect::<Vec<_>>()
    );
}

/// `openssl s_server -www` in a backend's namespace (stopped on drop), with a fresh
/// self-signed certificate for `name` written to `dir`.
struct TlsServer(std::process::Child);

impl TlsServer {
    fn start(
        ns: &lb_tests::NetNs,
        dir: &std::path::Path,
        name: &str,
        port: u16,
    ) -> (Self, std::path::PathBuf) {
        let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        lb_tests::self_signed(
            &cert,
            &key,
            name,
            &[
                &format!("subjectAltName=DNS:{name}"),
                "basicConstraints=critical,CA:FALSE",
                "extendedKeyUsage=serverAuth",
            ],
        );
        let child = ns
            .command("openssl")
            .args(["s_server", "-quiet", "-www", "-accept", &port.to_string()])
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl s_server");
        (Self(child), cert)
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn https_checks_pass_verify_and_fail_as_configured() {
    const TLS_PORT: u16 = 8443;
    let topo = Topology::new(3).expect("topology");
    let (instance, run_dir) = Daemon::new_paths();
    std::fs::create_dir_all(&run_dir).expect("run dir");
    let mut servers = HashMap::new();
    let mut certs = HashMap::new();
    for id in ["b1", "b2", "b3"] {
        let (server, cert) =
            TlsServer::start(&topo.backend(id).ns, &run_dir, &format!("{id}.test"), TLS_PORT);
        servers.insert(id, server);
        certs.insert(id, cert);
    }
    // b1: HTTPS, not verified; b2: verified against its own certificate as the CA; b3:
    // verified against b2's, which did not sign b3's: it must fail.
    let per_backend = |id: &str| match id {
        "b1" => String::new(),
        "b2" => format!("host = \"b2.test\"\ntls_ca = \"{}\"\n", certs["b2"].display()),
        _ => format!("host = \"b3.test\"\ntls_ca = \"{}\"\n", certs["b2"].display()),
    };
    let mut text = format!(
        "[daemon]\ninstance = \"{instance}\"\ninterfaces = [\"eth0\"]\nxdp_mode = \"native\"\nrun_dir = \"{}\"\nneighbour_refresh_ms = 500\n\n[[service]]\nname = \"web4\"\nvip = \"{VIP4}\"\nport = {PORT}\nprotocol = \"tcp\"\ntable_size = 1031\n\n[service.health]\npanic_threshold = 0.3\nkind = \"http\"\nhttps = true\npath = \"/\"\nport = {TLS_PORT}\ninterval = 0.5\ntimeout = 0.5\nfast_interval = 0.5\nerror_threshold = 2\n",
        run_dir.display()
    );
    for id in ["b1", "b2", "b3"] {
        text.push_str(&format!(
            "\n[[service.backend]]\nid = \"{id}\"\naddress = \"{}\"\nweight = 100\n[service.backend.health]\n{}",
            topo.backend(id).v4,
            per_backend(id)
        ));
    }
    let d = Daemon::start(&topo, &instance, &run_dir, &text).expect("daemon starts");
    let settled = wait_until(Duration::from_secs(15), || {
        let s = slots(&d);
        s["web4"]["b1"] > 0 && s["web4"]["b2"] > 0 && s["web4"]["b3"] == 0
    });
    let h3 = health_of(&d, "web4", "b3");
    assert!(settled, "{:?}\n{h3}\n{}", slots(&d), d.log());
    for id in ["b1", "b2"] {
        let h = health_of(&d, "web4", id);
        assert_eq!(h["state"], "up", "{h}");
        assert_eq!(h["check"]["kind"], "https", "{h}");
        assert!(
            h["check"]["last"]["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("status 200"),
            "{h}"
        );
    }
    let detail = h3["check"]["last"]["detail"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    println!("b3 with the wrong CA: {detail}");
    assert!(
        detail.starts_with("tls:") && detail.contains("certificate"),
        "{h3}"
    );
    // b1's TLS server stops: b1 goes out too.
    servers.remove("b1");
    let out = wait_until(Duration::from_secs(5), || slots(&d)["web4"]["b1"] == 0);
    assert!(out, "{}", health_of(&d, "web4", "b1"));
}

/// `through = "vip"` checks on a DSR service: web4/web6 check through the VIP, plain4 checks
/// each backend's own address. Without the VIPs on its loopback, b2 fails the first two and
/// passes the third; with them back it recovers.
#[test]
fn a_check_through_the_vip_fails_without_the_vip_on_lo_while_a_plain_check_passes() {
    let topo = Topology::new(2).expect("topology");
    checks_through_the_vip(topo, "native");
}

/// The same in generic mode, on a host whose interface's peer runs no XDP (as a new operator's
/// namespaces were, generic mode being the way around that for client traffic): the checks'
/// steering program runs in the data plane's mode, so its packets leave through the device's
/// ordinary transmit as the clients' do. Steered natively they were lost at the peer, and every
/// backend went down ("no answer within 200 ms").
#[test]
fn checks_through_the_vip_pass_in_generic_mode_without_xdp_on_the_peer() {
    let mut topo = Topology::new(2).expect("topology");
    topo.detach_pass().expect("detach the peer's pass program");
    checks_through_the_vip(topo, "generic");
}

fn checks_through_the_vip(topo: Topology, mode: &str) {
    let all = ["b1", "b2"];
    let _health = responders(&topo, &all, Reply::Http(200, "ok".into()), None);
    let (instance, run_dir) = Daemon::new_paths();
    let mut text = format!(
        "[daemon]\ninstance = \"{instance}\"\ninterfaces = [\"eth0\"]\nxdp_mode = \"{mode}\"\nrun_dir = \"{}\"\nneighbour_refresh_ms = 500\n",
        run_dir.display()
    );
    for (name, vip, port, through) in [
        ("web4", IpAddr::V4(VIP4), PORT, true),
        ("web6", IpAddr::V6(VIP6), PORT, true),
        ("plain4", IpAddr::V4(VIP4), HEALTH_PORT, false),
    ] {
        text.push_str(&format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {port}\nprotocol = \"tcp\"\ntable_size = 1031\n\n[service.health]\n{FAST_TCP}{}",
            if through { "through = \"vip\"\n" } else { "" }
        ));
        for id in all {
            let b = topo.backend(id);
            let addr = if vip.is_ipv4() {
                IpAddr::V4(b.v4)
            } else {
                IpAddr::V6(b.v6)
            };
            text.push_str(&format!(
                "\n[[service.backend]]\nid = \"{id}\"\naddress = \"{addr}\"\nweight = 100\n"
            ));
        }
    }
    let d = Daemon::start(&topo, &instance, &run_dir, &text).expect("daemon starts");
    let services = ["web4", "web6", "plain4"];
    let state = |s: &str, id: &str| {
        health_of(&d, s, id)["state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let passing = |s: &str, id: &str| health_of(&d, s, id)["check"]["consecutive_ok"].as_u64() >= Some(5);
    // Once the next hops are resolved, every check passes, through the VIP too (both
    // families): the path steers them.
    time_until(Duration::from_secs(10), "every check passing", &d, || {
        services
            .iter()
            .all(|s| all.iter().all(|id| passing(s, id) && state(s, id) == "up"))
    });
    assert!(
        d.log().contains(&format!("checks through the VIP, {mode} mode")),
        "the steering program runs in the data plane's mode:\n{}",
        d.log_tail(20)
    );
    // And the clients' connections get through, in this mode, to both.
    let (counts, _) = tcp_flows(&topo, IpAddr::V4(VIP4), 20, false);
    assert_eq!(counts.values().sum::<usize>(), 20, "{counts:?}");
    let failed = |s: &str, id: &str| health_of(&d, s, id)["check"]["failed"].as_u64().unwrap_or(0);
    let plain_failed = failed("plain4", "b2");
    assert_eq!(
        health_of(&d, "web4", "b1")["check"]["target"],
        format!("{VIP4}:{PORT}")
    );
    let steered = d.json(&["stats"])["counters"]["check_steered"]
        .as_u64()
        .unwrap_or(0);
    assert!(steered >= 20, "check_steered {steered}");

    let b2 = &topo.backend("b2").ns;
    b2.sh(&format!(
        "ip addr del {VIP4}/32 dev lo && ip addr del {VIP6}/128 dev lo"
    ))
    .expect("remove the VIPs");
    let took = time_until(Duration::from_secs(3), "b2 down through the VIP", &d, || {
        state("web4", "b2") == "down" && state("web6", "b2") == "down"
    });
    println!(
        "through the VIP: b2 without its VIPs down after {} ms",
        took.as_millis()
    );
    assert_eq!(slots(&d)["web4"]["b2"], 0);
    // Steered to b2 alone: b1 (which has the VIP) never answered for it.
    assert_eq!(state("web4", "b1"), "up");
    assert_eq!(state("plain4", "b2"), "up", "{}", health_of(&d, "plain4", "b2"));
    assert_eq!(
        failed("plain4", "b2"),
        plain_failed,
        "the plain check kept passing: {}",
        health_of(&d, "plain4", "b2")
    );
    let reason = health_of(&d, "web4", "b2")["check"]["last"]["detail"].to_string();
    assert!(reason.contains("no answer"), "{reason}");

    b2.sh(&format!(
        "ip addr add {VIP4}/32 dev lo && ip addr add {VIP6}/128 dev lo nodad"
    ))
    .expect("restore the VIPs");
    time_until(Duration::from_secs(3), "b2 back through the VIP", &d, || {
        state("web4", "b2") == "up" && state("web6", "b2") == "up"
    });
    let links = topo.lb.sh("ip -o link show").expect("links");
    assert!(links.contains("lbck-"), "no check path: {links}");
    // A graceful stop removes the check path, its routes and rules.
    let out = d.cli(&["detach"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let links = topo.lb.sh("ip -o link show").expect("links");
    assert!(
        !links.contains("lbck-"),
        "check path left behind: {links}\n{}",
        d.log()
    );
    let rules = topo.lb.sh("ip rule show; ip -6 rule show").expect("rules");
    assert!(!rules.contains("0x4c42"), "rules left behind: {rules}");
}
