//! A crash at any step of a change: with 60 TCP connections open, the daemon is killed at each
//! crash point of the writer's apply and of the state file's save (a failpoint armed just
//! before the change, `abort()` there), then restarted. The change is an API call, or a reload
//! of an edited file (after which the restart must apply the file). Each time: the daemon adopts what it
//! finds, no established connection is reset or moved, no pool region leaks (the pool's free
//! space is what a clean start of the same set has), and the tables hold what a clean pass of
//! the set the daemon reports writes (each backend's share of the table, compared with the
//! shares a clean pass gave the same set), and new connections reach only that set.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::IpAddr,
    time::Duration,
};

use lb_tests::{Daemon, Topology, client::tcp_flows, topology::VIP4, wait_until};

/// Every crash point a backend added to or removed from a service passes.
const POINTS: &[&str] = &[
    "apply-backends-written",
    "apply-table-written",
    "apply-services-written",
    "apply-retired",
    "file-written-before-rename",
];

/// Arms failpoint `name` with `actions` over the daemon's control socket.
fn arm(d: &Daemon, name: &str, actions: &str) {
    let socket = d.run_dir.join(format!("{}.sock", d.instance));
    let mut s = std::os::unix::net::UnixStream::connect(&socket).expect("control socket");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "PUT /v1/failpoints/{name} HTTP/1.1\r\nHost: lb\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{actions}",
        actions.len()
    )
    .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "arming {name}: {answer}");
}

/// web4's backends and their table slots, as the daemon reports them.
fn shares(d: &Daemon) -> HashMap<String, u64> {
    d.table_slots("web4")
}

/// The pool's free slots, counting those previous tables hold for second chance (a clean start
/// has none; a pass after a restart may keep one).
fn pool_free(d: &Daemon) -> u64 {
    let status = d.json(&["status", "--json"]);
    let pool = &status["table_pool"];
    match (pool["free"].as_u64(), pool["second_chance"].as_u64()) {
        (Some(free), Some(held)) => free + held,
        _ => panic!("no table_pool.free and .second_chance: {status}"),
    }
}

#[test]
fn a_crash_at_any_step_of_a_change_loses_no_flow_and_leaks_nothing() {
    let topo = Topology::new(4).expect("topology");
    let (instance, run_dir) = Daemon::new_paths();
    let text = topo.config(&instance, &run_dir, &["b1", "b2", "b3"]);
    let mut d = Daemon::start(&topo, &instance, &run_dir, &text).expect("daemon starts");
    d.wait_all_in_tables();
    let b4 = topo.backend("b4").v4.to_string();

    // The clean references: each set's shares, and the pool's free space after a clean start.
    let free = pool_free(&d);
    let without = shares(&d);
    let out = d.cli(&["backend", "add", "web4", "b4", "--address", &b4]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(wait_until(Duration::from_secs(10), || shares(&d).len() == 4));
    let with = shares(&d);
    let out = d.cli(&["backend", "remove", "web4", "b4"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(wait_until(Duration::from_secs(10), || shares(&d).len() == 3));
    assert_eq!(
        shares(&d),
        without,
        "a clean pass of the same set gives the same shares"
    );

    let (_, mut open) = tcp_flows(&topo, IpAddr::V4(VIP4), 60, true);
    let files = [
        topo.config(&instance, &run_dir, &["b1", "b2", "b3"]),
        topo.config(&instance, &run_dir, &["b1", "b2", "b3", "b4"]),
    ];
    // Each point: a backend added and removed through the API, and one change (adding at the
    // even points, removing at the odd ones) through a reload of an edited file.
    let cases = POINTS.iter().enumerate().flat_map(|(i, point)| {
        [
            (point, true, false),
            (point, false, false),
            (point, i % 2 == 0, true),
        ]
    });
    for (point, adding, reload) in cases {
        {
            // The change needs b4 out (adding) or in (removing), and the file loaded saying
            // so: made so cleanly first (the API mends a run-time change the reload keeps).
            std::fs::write(&d.config, &files[usize::from(!adding)]).expect("config");
            let out = d.cli(&["reload"]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            if shares(&d).contains_key("b4") == adding {
                let out = if adding {
                    d.cli(&["backend", "remove", "web4", "b4"])
                } else {
                    d.cli(&["backend", "add", "web4", "b4", "--address", &b4])
                };
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            }
            let n = if adding { 3 } else { 4 };
            assert!(wait_until(Duration::from_secs(10), || shares(&d).len() == n));
            arm(&d, point, "return");
            // The change dies with the daemon: its answer is not awaited.
            let _ = if reload {
                std::fs::write(&d.config, &files[usize::from(adding)]).expect("config");
                d.cli(&["reload"])
            } else if adding {
                d.cli(&["backend", "add", "web4", "b4", "--address", &b4])
            } else {
                d.cli(&["backend", "remove", "web4", "b4"])
            };
            let status = d
                .wait_exit(Duration::from_secs(10))
                .unwrap_or_else(|| panic!("{point}: the daemon did not crash there: {}", d.log_tail(10)));
            assert!(!status.success(), "{point}: {status}");
            d.restart(&topo)
                .unwrap_or_else(|e| panic!("{point}: restart: {e}"));
            d.wait_all_in_tables();
            if reload {
                // The restart reads the edited file: its set, whatever the crash left.
                assert_eq!(
                    shares(&d).contains_key("b4"),
                    adding,
                    "{point}: after a crash in a reload, the restart did not apply the file"
                );
            }

            for (conn, id) in open.iter_mut() {
                let answer = conn
                    .ask()
                    .unwrap_or_else(|e| panic!("{point}: a connection to {id} was reset: {e}"));
                assert_eq!(&answer, id, "{point}: a connection moved");
            }
            let now = shares(&d);
            let want = if now.contains_key("b4") { &with } else { &without };
            assert_eq!(
                &now, want,
                "{point}: the tables differ from a clean pass of the same set"
            );
            assert_eq!(pool_free(&d), free, "{point}: a pool region leaked");
            let (counts, _) = tcp_flows(&topo, IpAddr::V4(VIP4), 20, false);
            assert!(
                counts.keys().all(|b| now.contains_key(b)),
                "{point}: new connections reached {counts:?}, the set is {now:?}"
            );
            println!(
                "{point} ({} {}): restarted with {} backends, 60 connections kept",
                if adding { "adding b4" } else { "removing b4" },
                if reload { "by a reload" } else { "through the API" },
                now.len()
            );
        }
    }
}
