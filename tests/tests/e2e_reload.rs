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
            .all(|s| d.table_slots(s).values().all(|&n| n > 0))
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
    let web4_before = d.table_slots("web4");

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
        d.table_slots("dns4").get("b4").is_some_and(|&n| n > 0) && d.table_slots("web4") != web4_before
    });
    assert!(applied, "the watched file was not applied: {}", d.log());
    let web4 = d.table_slots("web4");
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

/// The file with web4's backend b1 at `weight`.
fn with_b1_weight(text: &str, weight: u32) -> String {
    with_weight(text, "b1", weight)
}

/// The file with web4's backend `id` at `weight`.
fn with_weight(text: &str, id: &str, weight: u32) -> String {
    let mut out = String::new();
    let (mut service, mut backend) = (String::new(), String::new());
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("name = ") {
            service = name.trim_matches('"').to_string();
        }
        if let Some(id) = line.strip_prefix("id = ") {
            backend = id.trim_matches('"').to_string();
        }
        if line.starts_with("weight = ") && service == "web4" && backend == id {
            out.push_str(&format!("weight = {weight}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    assert!(out.contains(&format!("weight = {weight}\n")), "{out}");
    out
}

fn b1_weight(d: &Daemon) -> u64 {
    d.backends_of("web4")
        .into_iter()
        .find(|b| b["id"] == "b1")
        .and_then(|b| b["weight"].as_u64())
        .unwrap_or_else(|| panic!("web4/b1 has no weight: {:?}", d.backends_of("web4")))
}

/// Reloads one at a time, whoever asks: a SIGHUP reload that read the file and then stalled
/// (a failpoint: 2 s) finishes before an `lb reload` of a newer file starts, so the newer file
/// is applied last. Without the one-at-a-time lock, the stalled reload applied its older file
/// after the newer one.
#[test]
fn an_older_file_version_is_never_applied_last() {
    let topo = Topology::new(2).expect("topology");
    let (instance, run_dir) = Daemon::new_paths();
    let v1 = topo.config(&instance, &run_dir, &["b1", "b2"]);
    let d = Daemon::start_with_failpoints(
        &topo.lb,
        &instance,
        &run_dir,
        &v1,
        Some("reload-read=1*print(the first reload read the file);reload-apply=1*return(2000)"),
    )
    .expect("daemon starts");
    assert_eq!(b1_weight(&d), 100);

    std::fs::write(&d.config, with_b1_weight(&v1, 50)).expect("write v2");
    // SAFETY: kill with the daemon's pid and a constant signal.
    assert_eq!(unsafe { libc::kill(d.pid().unwrap() as i32, libc::SIGHUP) }, 0);
    assert!(
        // The `fail` crate logs the print (the start-up line naming the failpoints holds the
        // same words, after a '(').
        wait_until(Duration::from_secs(10), || d
            .log()
            .contains("fail] the first reload read the file")),
        "the SIGHUP reload did not read the file: {}",
        d.log_tail(20)
    );
    std::fs::write(&d.config, with_b1_weight(&v1, 20)).expect("write v3");
    let out = d.cli(&["reload"]);
    assert!(
        out.status.success(),
        "lb reload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(10), || d.log().contains("SIGHUP: reloaded")),
        "the SIGHUP reload did not finish: {}",
        d.log_tail(20)
    );
    assert_eq!(
        b1_weight(&d),
        20,
        "the older file was applied last: {}",
        d.log_tail(20)
    );
}

/// A restarted daemon adopts its pinned attachment as it runs: status says the kernel's mode
/// (it said "pinned"), and a file that now asks for another mode is told, in one line, that
/// the change takes a re-attach (it was ignored without a word).
#[test]
fn an_adopted_attachment_shows_its_real_mode_and_a_changed_mode_is_reported() {
    let topo = Topology::new(1).expect("topology");
    let (instance, run_dir) = Daemon::new_paths();
    let text = topo.config(&instance, &run_dir, &["b1"]);
    assert!(text.contains("xdp_mode = \"native\""), "{text}");
    let mut d = Daemon::start(&topo, &instance, &run_dir, &text).expect("daemon starts");
    let mode = |d: &Daemon| d.json(&["status"])["interfaces"][0].clone();
    assert_eq!(mode(&d)["mode"], "native", "{}", mode(&d));

    std::fs::write(
        &d.config,
        text.replace("xdp_mode = \"native\"", "xdp_mode = \"generic\""),
    )
    .expect("write");
    d.restart(&topo).expect("restart");
    let m = mode(&d);
    assert_eq!(
        (m["mode"].as_str(), m["adopted"].as_bool()),
        (Some("native"), Some(true)),
        "{m}"
    );
    assert!(
        d.log()
            .contains("the adopted program runs in native mode, the config file says xdp_mode = \"generic\""),
        "{}",
        d.log_tail(20)
    );
}

/// The file against what was changed at run time, on a reload and on a restart alike: a
/// backend registered through the API (no TTL) stays; a weight set through the API stays over
/// a reload of the same file and over a restart, and gives way, said in one line in the
/// reload's answer or the restart's log, once the file gives that backend a new weight; a
/// weight edited in the file while the daemon was down applies. Before: the reload dropped the
/// registration and reverted the weight without a word, and the restart restored the state
/// whole, the file's new weight ignored.
#[test]
fn run_time_changes_stay_and_a_new_value_in_the_file_wins() {
    let topo = Topology::new(3).expect("topology");
    let (instance, run_dir) = Daemon::new_paths();
    let text = topo.config(&instance, &run_dir, &["b1", "b2"]);
    let mut d = Daemon::start(&topo, &instance, &run_dir, &text).expect("daemon starts");
    let b3 = topo.backend("b3").v4.to_string();
    let ok = |out: std::process::Output| {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    ok(d.cli(&["backend", "add", "web4", "b3", "--address", &b3]));
    ok(d.cli(&["backend", "weight", "web4", "b1", "50"]));
    let ids = |d: &Daemon| -> Vec<String> {
        d.backends_of("web4")
            .iter()
            .filter_map(|b| b["id"].as_str().map(String::from))
            .collect()
    };
    let said = ok(d.cli(&["reload"]));
    assert_eq!(said, "", "the same file: nothing replaced");
    assert_eq!(
        (b1_weight(&d), ids(&d)),
        (50, vec!["b1".into(), "b2".into(), "b3".into()])
    );

    std::fs::write(&d.config, with_b1_weight(&text, 80)).expect("write");
    let said = ok(d.cli(&["reload"]));
    assert!(
        said.contains("backend web4/b1: weight 50 (set through the API) replaced by the file's new 80"),
        "the reload did not say what it replaced: {said:?}"
    );
    assert_eq!(b1_weight(&d), 80);
    assert_eq!(ids(&d), ["b1", "b2", "b3"], "the registration was dropped");

    // A crash keeps the API's weight; the file's new b2 weight, written meanwhile, applies.
    ok(d.cli(&["backend", "weight", "web4", "b1", "30"]));
    std::fs::write(&d.config, with_weight(&with_b1_weight(&text, 80), "b2", 60)).expect("write");
    d.restart(&topo).expect("restart");
    let weight = |id: &str| {
        d.backends_of("web4")
            .into_iter()
            .find(|b| b["id"] == id)
            .and_then(|b| b["weight"].as_u64())
    };
    assert_eq!(
        weight("b2"),
        Some(60),
        "the file's new weight, ignored on restart: {}",
        d.log_tail(20)
    );
    assert_eq!(weight("b1"), Some(30), "the API's weight, lost in a crash");
    assert_eq!(ids(&d), ["b1", "b2", "b3"]);
}
