//! Service discovery end to end: instances registered with a lifetime (`ttl`) that heartbeat,
//! are drained when they stop (established connections kept), come back with a heartbeat and
//! are removed `deregister_after` later; real daemon, real sockets, every wait bounded.

use std::{
    net::IpAddr,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lb_tests::{
    Daemon, Topology,
    client::{http_get, tcp_flows},
    lb_bin,
    topology::VIP4,
    wait_until,
};

/// Three backends, b1 and b2 in the file's services; b3 is left to register.
fn start() -> (Topology, Daemon) {
    let topo = Topology::new(3).expect("topology");
    let (instance, run_dir) = Daemon::new_paths();
    let text = topo.config(&instance, &run_dir, &["b1", "b2"]);
    let d = Daemon::start(&topo, &instance, &run_dir, &text).expect("daemon starts");
    d.wait_all_in_tables();
    (topo, d)
}

/// b3's table slots in web4 (0 when it takes no new flows, or is gone).
fn slots_of(d: &Daemon, id: &str) -> u64 {
    d.backends_of("web4")
        .iter()
        .find(|b| b["id"] == id)
        .and_then(|b| b["table_slots"].as_u64())
        .unwrap_or(0)
}

fn registered(d: &Daemon, id: &str) -> bool {
    d.backends_of("web4").iter().any(|b| b["id"] == id)
}

/// Heartbeats `web4/b3` every `every` from a thread, as an instance would, until dropped;
/// keeps when the last accepted heartbeat was sent and when it was answered (the daemon
/// renewed the lease between the two).
struct Heart {
    stop: Arc<AtomicBool>,
    last: Arc<Mutex<Option<(Instant, Instant)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heart {
    fn start(d: &Daemon, every: Duration) -> Self {
        let (stop, last) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(None)));
        let (instance, run_dir) = (d.instance.clone(), d.run_dir.clone());
        let thread = {
            let (stop, last) = (stop.clone(), last.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let out = Command::new(lb_bin())
                        .args(["--instance", &instance, "--run-dir"])
                        .arg(&run_dir)
                        .args(["backend", "heartbeat", "web4", "b3"])
                        .output()
                        .expect("run lb");
                    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                    *last.lock().unwrap() = Some((sent, Instant::now()));
                    std::thread::sleep(every);
                }
            })
        };
        Self {
            stop,
            last,
            thread: Some(thread),
        }
    }

    /// Stops, and returns when the last heartbeat was sent and answered.
    fn stop(mut self) -> (Instant, Instant) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("heartbeat thread");
        }
        self.last.lock().unwrap().expect("at least one heartbeat")
    }
}

impl Drop for Heart {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn metric(d: &Daemon, topo: &Topology, line_start: &str) -> f64 {
    let (status, body) =
        http_get(&topo.lb, "127.0.0.1:9464".parse().unwrap(), "/metrics", None).expect("scrape");
    assert_eq!(status, 200);
    body.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in the metrics: {}", d.log()))
}

#[test]
fn a_registration_that_stops_heartbeating_is_drained_then_removed() {
    const TTL: Duration = Duration::from_secs(2);
    const DEREGISTER_AFTER: Duration = Duration::from_secs(3);
    let (topo, d) = start();
    let b3 = topo.backend("b3").v4.to_string();

    // Bad input: one line each, nothing changed.
    let before = d.json(&["service", "list"]);
    for (args, needle) in [
        (
            vec!["backend", "add", "web4", "b3", "--address", &b3, "--ttl", "0"],
            "ttl 0 s is out of range 1..=86400",
        ),
        (
            vec!["backend", "add", "web4", "b3", "--address", &b3, "--ttl", "1e9"],
            "out of range",
        ),
        (
            vec![
                "backend",
                "add",
                "web4",
                "b3",
                "--address",
                &b3,
                "--ttl",
                "5",
                "--deregister-after",
                "0",
            ],
            "deregister_after 0 s is out of range",
        ),
        (
            vec!["backend", "heartbeat", "web4", "nope"],
            "service web4 has no backend nope",
        ),
        (
            vec!["backend", "heartbeat", "nosvc", "b1"],
            "unknown service nosvc",
        ),
        (
            vec!["backend", "heartbeat", "web4", "b1"],
            "registered without a ttl",
        ),
    ] {
        let out = d.cli(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    assert_eq!(
        d.json(&["service", "list"]),
        before,
        "a refused call changed something"
    );

    // Registered with ttl = 2 s and kept alive by heartbeats every 0.5 s for longer than it.
    let out = d.cli(&[
        "backend",
        "add",
        "web4",
        "b3",
        "--address",
        &b3,
        "--ttl",
        "2",
        "--deregister-after",
        "3",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let heart = Heart::start(&d, Duration::from_millis(500));
    assert!(
        wait_until(Duration::from_secs(10), || slots_of(&d, "b3") > 0),
        "{}",
        d.log()
    );
    // A reload of the unchanged file keeps the registration and its lease.
    let out = d.cli(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, open) = tcp_flows(&topo, IpAddr::V4(VIP4), 60, true);
    let mut on_b3: Vec<_> = open.into_iter().filter(|(_, id)| id == "b3").collect();
    assert!(
        on_b3.len() >= 5,
        "b3 takes its share of new flows: {}",
        on_b3.len()
    );
    std::thread::sleep(TTL + Duration::from_millis(500));
    assert!(
        slots_of(&d, "b3") > 0,
        "heartbeats kept it in past its ttl: {}",
        d.log()
    );
    let h = d.health_of("web4", "b3");
    assert_eq!(h["state"], "up", "{h}");
    assert_eq!(h["registration"]["ttl_s"], 2.0, "{h}");
    // A heartbeat that only renews costs no writer pass (10,000 instances at a 10 s TTL send
    // 1,000 a second): 20 in a row take at most the pass a second that shows renewals.
    let passes = || d.json(&["status"])["reconciler"]["passes"].as_u64().unwrap_or(0);
    let (before, started) = (passes(), std::time::Instant::now());
    for _ in 0..20 {
        let out = d.cli(&["backend", "heartbeat", "web4", "b3"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let (taken, secs) = (passes() - before, started.elapsed().as_secs());
    println!("20 heartbeats in {secs} s: {taken} writer passes");
    assert!(taken <= secs + 3, "20 heartbeats took {taken} passes in {secs} s");

    // Silence: out of the table within ttl + 1 s of the last heartbeat, not before the ttl.
    let (sent, answered) = heart.stop();
    // Drained, not removed: still listed, with no table slots.
    let ok = wait_until(TTL + Duration::from_secs(2), || {
        registered(&d, "b3") && slots_of(&d, "b3") == 0
    });
    let (took, since_sent) = (answered.elapsed(), sent.elapsed());
    assert!(
        ok,
        "b3 still takes new flows: {}\n{}",
        d.json(&["health", "web4"]),
        d.log()
    );
    println!(
        "last heartbeat -> no new flows: {} ms (ttl {} ms)",
        took.as_millis(),
        TTL.as_millis()
    );
    for l in d
        .log()
        .lines()
        .filter(|l| l.contains("web4/b3") || l.contains("pass:"))
    {
        println!("  {l}");
    }
    assert!(took <= TTL + Duration::from_secs(1), "took {took:?}");
    assert!(since_sent >= TTL, "drained before its ttl: {since_sent:?}");
    let (counts, _) = tcp_flows(&topo, IpAddr::V4(VIP4), 200, false);
    assert!(!counts.contains_key("b3"), "new flows still reach b3: {counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 200);
    // Its established connections keep going, and its state says why.
    for (conn, id) in on_b3.iter_mut() {
        assert_eq!(&conn.ask().expect("established connection kept"), id);
    }
    let h = d.health_of("web4", "b3");
    assert_eq!(h["state"], "drained", "{h}");
    let reason = h["registration"]["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("heartbeat late by"), "{h}");
    let human = String::from_utf8_lossy(&d.cli(&["service", "list"]).stdout).to_string();
    assert!(human.contains("drained: heartbeat late by"), "{human}");

    // A heartbeat brings it back.
    let back_from = Instant::now();
    let heart = Heart::start(&d, Duration::from_millis(500));
    assert!(
        wait_until(Duration::from_secs(3), || slots_of(&d, "b3") > 0),
        "{}",
        d.log()
    );
    println!(
        "heartbeat -> back in the table: {} ms",
        back_from.elapsed().as_millis()
    );
    let (counts, _) = tcp_flows(&topo, IpAddr::V4(VIP4), 60, false);
    assert!(counts.contains_key("b3"), "{counts:?}");

    // Silent for good: drained after the ttl, removed deregister_after later.
    let (sent, answered) = heart.stop();
    let ok = wait_until(TTL + DEREGISTER_AFTER + Duration::from_secs(2), || {
        !registered(&d, "b3")
    });
    let (took, since_sent) = (answered.elapsed(), sent.elapsed());
    assert!(ok, "b3 not removed: {}", d.log());
    println!("last heartbeat -> removed: {} ms", took.as_millis());
    assert!(since_sent >= TTL + DEREGISTER_AFTER, "{since_sent:?}");
    assert!(d.log().contains("backend web4/b3: no heartbeat for"), "logged");
    assert_eq!(
        metric(
            &d,
            &topo,
            "lb_registration_expiries_total{outcome=\"drained\",service=\"web4\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &d,
            &topo,
            "lb_registration_expiries_total{outcome=\"removed\",service=\"web4\"}"
        ),
        1.0
    );
    let beats = metric(&d, &topo, "lb_registration_heartbeats_total{service=\"web4\"}");
    println!("heartbeats counted: {beats}");
    assert!(beats >= 5.0, "{beats}");
    // Gone: its heartbeat is refused now.
    let out = d.cli(&["backend", "heartbeat", "web4", "b3"]);
    assert!(!out.status.success());
}

/// The Python client from the package `cargo xtask setup` installed: `registration()` keeps an
/// instance registered past its TTL and deregisters it on exit, on cancellation and when a
/// heartbeat is refused (raised in the block); `watch_instances()` sees each change by long
/// polls; the synchronous wrapper does the same; bad terms are refused in one line.
#[test]
fn the_python_client_registers_with_heartbeats_and_watches() {
    let (topo, d) = start();
    let python = lb_tests::python();
    assert!(
        python.exists(),
        "{} is missing: `cargo xtask setup` makes it",
        python.display()
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../python/tests/test_discovery.py");
    let socket = d.run_dir.join(format!("{}.sock", d.instance));
    let out = topo
        .lb
        .command(&python)
        .arg(script)
        .arg(&socket)
        .arg("web4")
        .arg(topo.backend("b3").v4.to_string())
        // Not the source tree: the installed package.
        .current_dir(&d.run_dir)
        .output()
        .expect("run python");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        out.status.success(),
        "{text}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    assert!(
        text.lines().last().is_some_and(|l| l.ends_with(" 0 failed")),
        "{text}"
    );
    assert!(
        d.backends_of("web4")
            .iter()
            .all(|b| b["id"] != "auth-1" && b["id"] != "sync-1")
    );
}
