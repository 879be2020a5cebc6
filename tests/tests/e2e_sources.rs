//! Registries as sources end to end (`[service.discovery]`): a service's backends come from a
//! watched file, and nobody calls the API. Real daemon, real sockets, every wait bounded; the
//! drain and the shrink hold are set short (1 s and 1.5 s) to keep the test to seconds.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lb_tests::{
    Daemon, Topology,
    client::{http_get, tcp_flows},
    topology::{PORT, VIP4},
    wait_until,
};

const DRAIN: Duration = Duration::from_secs(1);
const CONFIRM: Duration = Duration::from_millis(1500);

/// A daemon with one TCP service on VIP4 whose backends come from `source` (the lines of its
/// `[service.discovery]`).
fn start(topo: &Topology, source: &str) -> Daemon {
    let (instance, run_dir) = Daemon::new_paths();
    let text = format!(
        "[daemon]\ninstance = \"{instance}\"\ninterfaces = [\"eth0\"]\nxdp_mode = \"native\"\nrun_dir = \"{}\"\nconntrack_size = 65536\ntable_pool_slots = 1048576\nneighbour_refresh_ms = 500\n\n\
         [[service]]\nname = \"web4\"\nvip = \"{VIP4}\"\nport = {PORT}\nprotocol = \"tcp\"\n\
         [service.discovery]\n{source}\ndrain_before_remove = {}\nconfirm_shrink = {}\n",
        run_dir.display(),
        DRAIN.as_secs_f64(),
        CONFIRM.as_secs_f64(),
    );
    Daemon::start(topo, &instance, &run_dir, &text).expect("daemon starts")
}

/// Each backend of web4 as `lb service list --json` has it, by id.
fn backends(d: &Daemon) -> Vec<serde_json::Value> {
    d.backends_of("web4")
}

fn backend(d: &Daemon, id: &str) -> serde_json::Value {
    backends(d)
        .into_iter()
        .find(|b| b["id"] == id)
        .unwrap_or_default()
}

/// The ids in web4 that take new flows (table slots above 0), sorted.
fn serving(d: &Daemon) -> Vec<String> {
    let mut ids: Vec<String> = backends(d)
        .iter()
        .filter(|b| b["resolved"] == true && b["table_slots"].as_u64() > Some(0))
        .filter_map(|b| b["id"].as_str().map(str::to_string))
        .collect();
    ids.sort();
    ids
}

fn listed(d: &Daemon) -> Vec<String> {
    let mut ids: Vec<String> = backends(d)
        .iter()
        .filter_map(|b| b["id"].as_str().map(str::to_string))
        .collect();
    ids.sort();
    ids
}

/// The entries web4's source skipped, as `entry:reason`, and the whole list for messages.
fn skipped(d: &Daemon) -> (Vec<String>, serde_json::Value) {
    let skipped = discovery(d)["skipped"].clone();
    let reasons = skipped
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| Some(format!("{}:{}", s["entry"].as_str()?, s["reason"].as_str()?)))
        .collect();
    (reasons, skipped)
}

fn discovery(d: &Daemon) -> serde_json::Value {
    d.json(&["service", "list"])
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == "web4")
        .map(|s| s["discovery"].clone())
        .unwrap_or_default()
}

/// A sample of the daemon's metrics (0 when the series is not there).
fn metric(topo: &Topology, series: &str) -> f64 {
    let (status, body) =
        http_get(&topo.lb, "127.0.0.1:9464".parse().unwrap(), "/metrics", None).expect("scrape");
    assert_eq!(status, 200);
    body.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn ids(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Writes the list through a fresh file renamed into place, as config management does.
fn write_list(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write the list");
    std::fs::rename(&tmp, path).expect("rename the list into place");
}

/// JSON entries for backends of the topology: (id, backend, weight, extra keys).
fn json_list(topo: &Topology, entries: &[(&str, &str, u32, &str)]) -> String {
    let items: Vec<String> = entries
        .iter()
        .map(|(id, b, weight, extra)| {
            format!(
                "{{\"id\": \"{id}\", \"address\": \"{}\", \"weight\": {weight}{extra}}}",
                topo.backend(b).v4
            )
        })
        .collect();
    format!("[{}]", items.join(",\n"))
}

#[test]
fn a_watched_file_adds_moves_drains_and_removes_backends() {
    let topo = Topology::new(3).expect("topology");
    let dir: PathBuf = std::env::temp_dir().join(format!("lbt-sources-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let _cleanup = Cleanup(dir.clone());
    let list = dir.join("web.json");
    let d = start(&topo, &format!("kind = \"file\"\npath = \"{}\"", list.display()));

    // No file yet: the source says why, counted; the service waits with no backend.
    assert!(
        wait_until(Duration::from_secs(5), || {
            discovery(&d)["error"]["reason"] == "unreadable"
        }),
        "{}\n{}",
        discovery(&d),
        d.log()
    );
    assert!(
        metric(
            &topo,
            "lb_discovery_errors_total{reason=\"unreadable\",service=\"web4\",source=\"file\"}"
        ) >= 1.0
    );
    assert!(listed(&d).is_empty());

    // Written: its instances appear, each with its source, labels and weight.
    let written = Instant::now();
    write_list(
        &list,
        &json_list(
            &topo,
            &[("b1", "b1", 100, ""), ("b2", "b2", 100, ", \"zone\": \"z1\"")],
        ),
    );
    assert!(
        wait_until(Duration::from_secs(10), || serving(&d) == ids(&["b1", "b2"])),
        "{}\n{}",
        d.json(&["service", "list"]),
        d.log()
    );
    println!(
        "file written -> backends in the table: {} ms",
        written.elapsed().as_millis()
    );
    let b2 = backend(&d, "b2");
    assert_eq!(
        (b2["source"].as_str(), b2["zone"].as_str()),
        (Some("file"), Some("z1")),
        "{b2}"
    );
    assert_eq!(discovery(&d)["error"], serde_json::Value::Null);
    let (counts, open) = tcp_flows(&topo, IpAddr::V4(VIP4), 40, true);
    assert_eq!(counts.keys().count(), 2, "{counts:?}");
    let mut on_b1: Vec<_> = open.into_iter().filter(|(_, id)| id == "b1").collect();
    assert!(!on_b1.is_empty());

    // By hand: refused in one line, nothing changed.
    let b3 = topo.backend("b3").v4.to_string();
    for args in [
        vec!["backend", "add", "web4", "b3", "--address", &b3],
        vec!["backend", "remove", "web4", "b1"],
        vec!["backend", "weight", "web4", "b1", "5"],
    ] {
        let out = d.cli(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(
            err.contains("service web4 takes its backends from its file source"),
            "{args:?}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    assert_eq!(listed(&d), ids(&["b1", "b2"]));

    // Edited: b3 added with labels, b2 reweighted; b1 is left as it was (its connections too).
    let updates = metric(
        &topo,
        "lb_discovery_updates_total{service=\"web4\",source=\"file\"}",
    );
    write_list(
        &list,
        &json_list(
            &topo,
            &[
                ("b1", "b1", 100, ""),
                ("b2", "b2", 50, ", \"zone\": \"z1\""),
                ("b3", "b3", 100, ", \"labels\": {\"role\": \"canary\"}"),
            ],
        ),
    );
    assert!(
        wait_until(Duration::from_secs(5), || serving(&d) == ids(&["b1", "b2", "b3"])),
        "{}",
        d.log()
    );
    assert_eq!(backend(&d, "b2")["weight"], 50);
    assert!(
        d.log()
            .contains("service web4: file source: 1 added, 1 changed, 0 back, 0 draining, 0 removed"),
        "{}",
        d.log()
    );
    assert_eq!(
        metric(
            &topo,
            "lb_discovery_updates_total{service=\"web4\",source=\"file\"}"
        ),
        updates + 1.0
    );
    assert_eq!(metric(&topo, "lb_discovery_backends{service=\"web4\"}"), 3.0);
    for (conn, id) in on_b1.iter_mut() {
        assert_eq!(&conn.ask().expect("b1's connection kept"), id);
    }
    // Labels filter the listing; they are never metric labels.
    let canary = d.json(&["backend", "list", "web4", "--label", "role=canary"]);
    let found: Vec<&str> = canary
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["id"].as_str())
        .collect();
    assert_eq!(found, ["b3"], "{canary}");
    let human =
        String::from_utf8_lossy(&d.cli(&["backend", "list", "--label", "role=canary"]).stdout).to_string();
    assert!(
        human.contains("b3") && human.contains("source=file") && human.contains("role=canary"),
        "{human}"
    );
    let (_, body) = http_get(&topo.lb, "127.0.0.1:9464".parse().unwrap(), "/metrics", None).expect("scrape");
    assert!(!body.contains("canary"), "a label reached the metrics");

    // b3 removed: drained (listed, no new flows, its connection kept), then gone.
    let (_, open) = tcp_flows(&topo, IpAddr::V4(VIP4), 60, true);
    let mut on_b3: Vec<_> = open.into_iter().filter(|(_, id)| id == "b3").collect();
    assert!(!on_b3.is_empty());
    let removed = Instant::now();
    write_list(
        &list,
        &json_list(
            &topo,
            &[("b1", "b1", 100, ""), ("b2", "b2", 50, ", \"zone\": \"z1\"")],
        ),
    );
    assert!(
        wait_until(Duration::from_secs(3), || {
            let b = backend(&d, "b3");
            b["health"] == "drained" && b["table_slots"] == 0
        }),
        "{}",
        d.log()
    );
    let b = backend(&d, "b3");
    assert!(
        b["departure"]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("gone from its file source")),
        "{b}"
    );
    for (conn, id) in on_b3.iter_mut() {
        assert_eq!(&conn.ask().expect("b3's connection kept while draining"), id);
    }
    assert!(
        wait_until(Duration::from_secs(5), || listed(&d) == ids(&["b1", "b2"])),
        "{}",
        d.log()
    );
    let took = removed.elapsed();
    println!(
        "removed from the file -> gone: {} ms (drain {} ms)",
        took.as_millis(),
        DRAIN.as_millis()
    );
    assert!(took >= DRAIN, "removed before its drain: {took:?}");

    // A bad entry is skipped and counted; the rest apply.
    write_list(
        &list,
        &format!(
            "[{{\"id\": \"b1\", \"address\": \"{}\"}}, {{\"id\": \"b2\", \"address\": \"{}\", \"weight\": 50, \"zone\": \"z1\"}}, \
             {{\"id\": \"b3\", \"address\": \"{}\"}}, {{\"id\": \"bad\", \"address\": \"10.99.0.300\"}}, {{\"id\": \"b1\", \"address\": \"{}\"}}]",
            topo.backend("b1").v4,
            topo.backend("b2").v4,
            topo.backend("b3").v4,
            topo.backend("b3").v4,
        ),
    );
    assert!(
        wait_until(Duration::from_secs(5), || serving(&d) == ids(&["b1", "b2", "b3"])),
        "{}",
        d.log()
    );
    let (reasons, skipped) = skipped(&d);
    assert_eq!(reasons, ["bad:bad-address", "b1:duplicate-id"], "{skipped}");
    assert_eq!(
        metric(
            &topo,
            "lb_discovery_errors_total{reason=\"bad-address\",service=\"web4\",source=\"file\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &topo,
            "lb_discovery_errors_total{reason=\"duplicate-id\",service=\"web4\",source=\"file\"}"
        ),
        1.0
    );
    assert!(d.log().contains(
        "service web4: file source: bad: address \"10.99.0.300\" is not an IP address: skipped (bad-address)"
    ));

    // A file that does not parse: refused whole, counted, the set kept.
    write_list(&list, "[{\"id\": ");
    assert!(
        wait_until(Duration::from_secs(5), || discovery(&d)["error"]["reason"]
            == "parse"),
        "{}",
        d.log()
    );
    assert!(
        metric(
            &topo,
            "lb_discovery_errors_total{reason=\"parse\",service=\"web4\",source=\"file\"}"
        ) >= 1.0
    );
    assert_eq!(serving(&d), ids(&["b1", "b2", "b3"]));

    // Down to one of three: held as suspect (all three keep serving), applied once it has
    // persisted confirm_shrink; the two left drain, then go.
    let shrunk = Instant::now();
    write_list(&list, &json_list(&topo, &[("b1", "b1", 100, "")]));
    assert!(
        wait_until(Duration::from_secs(3), || discovery(&d)["held"]["wanted"] == 1),
        "{}",
        d.log()
    );
    let held_at = shrunk.elapsed();
    assert_eq!(
        serving(&d),
        ids(&["b1", "b2", "b3"]),
        "a held shrink changed the tables"
    );
    assert!(
        wait_until(Duration::from_secs(5), || serving(&d) == ids(&["b1"])),
        "{}",
        d.log()
    );
    let applied = shrunk.elapsed();
    println!(
        "shrink to 1 of 3: held from {} ms, applied at {} ms (confirm_shrink {} ms)",
        held_at.as_millis(),
        applied.as_millis(),
        CONFIRM.as_millis()
    );
    assert!(
        applied >= CONFIRM,
        "a suspect shrink applied before confirm_shrink: {applied:?}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || listed(&d) == ids(&["b1"])),
        "{}",
        d.log()
    );
    assert_eq!(discovery(&d)["held"], serde_json::Value::Null);
}

/// Removes the test's directory, also when it fails.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// SRV records of a DNS server (dnsmasq) in a namespace on the switch, at 10.99.0.5.
const DNS: &str = "10.99.0.5";

/// b1 and b2 at priority 10 (weights 10 and 20), b3 at priority 20 (a fallback: not used).
const RECORDS_1: &str = "srv-host=_web._tcp.svc.example,b1.svc.example,8080,10,10\n\
    srv-host=_web._tcp.svc.example,b2.svc.example,8080,10,20\n\
    srv-host=_web._tcp.svc.example,b3.svc.example,8080,20,100\n\
    host-record=b1.svc.example,10.99.0.11\nhost-record=b2.svc.example,10.99.0.12\nhost-record=b3.svc.example,10.99.0.13\n";

/// b1 gone (but for a record of port 0), b2 reweighted, b3 now at priority 10, and a target
/// with no address.
const RECORDS_2: &str = "srv-host=_web._tcp.svc.example,b1.svc.example,0,10,10\n\
    srv-host=_web._tcp.svc.example,b2.svc.example,8080,10,30\n\
    srv-host=_web._tcp.svc.example,b3.svc.example,8080,10,100\n\
    srv-host=_web._tcp.svc.example,ghost.svc.example,8080,10,100\n\
    host-record=b1.svc.example,10.99.0.11\nhost-record=b2.svc.example,10.99.0.12\nhost-record=b3.svc.example,10.99.0.13\n";

#[test]
fn srv_records_from_a_real_dns_server_are_followed_and_kept_when_it_dies() {
    let mut topo = Topology::new(3).expect("topology");
    assert_eq!(
        topo.backend("b1").v4.to_string(),
        "10.99.0.11",
        "the records name the lab's backends"
    );
    let ns = topo.add_client("dns", DNS, "fd99::5").expect("dns namespace");
    let mut dnsmasq = lb_tests::dns::Dnsmasq::start(&ns, DNS.parse().unwrap(), RECORDS_1).expect("dnsmasq");
    let started = Instant::now();
    let d = start(
        &topo,
        &format!(
            "kind = \"dns\"\nname = \"_web._tcp.svc.example\"\nserver = \"{DNS}:53\"\nmin_interval = 0.5\nmax_interval = 5.0"
        ),
    );
    // The lowest priority's records, each at its record's weight, named by address and port.
    let (a, b, c) = ("10.99.0.11-8080", "10.99.0.12-8080", "10.99.0.13-8080");
    assert!(
        wait_until(Duration::from_secs(10), || serving(&d) == ids(&[a, b])),
        "{}\n{}\n{}",
        d.json(&["service", "list"]),
        d.log(),
        dnsmasq.log()
    );
    println!(
        "daemon start -> SRV backends in the table: {} ms",
        started.elapsed().as_millis()
    );
    let first = backend(&d, b);
    assert_eq!(
        (
            first["weight"].as_u64(),
            first["source"].as_str(),
            first["labels"]["target"].as_str()
        ),
        (Some(20), Some("dns"), Some("b2.svc.example")),
        "{first}"
    );
    assert_eq!(backend(&d, a)["weight"], 10);
    let (counts, _) = tcp_flows(&topo, IpAddr::V4(VIP4), 60, false);
    assert_eq!(
        counts
            .keys()
            .map(String::as_str)
            .collect::<std::collections::BTreeSet<_>>(),
        ["b1", "b2"].into_iter().collect(),
        "{counts:?}"
    );

    // New records: the set follows at the records' TTL (1 s); b1 drains, then goes.
    let changed = Instant::now();
    dnsmasq.serve(&ns, RECORDS_2).expect("dnsmasq with new records");
    assert!(
        wait_until(Duration::from_secs(10), || serving(&d) == ids(&[b, c])),
        "{}\n{}",
        d.json(&["service", "list"]),
        d.log()
    );
    println!(
        "records changed -> the new set in the table: {} ms",
        changed.elapsed().as_millis()
    );
    assert_eq!(backend(&d, b)["weight"], 30);
    assert!(
        wait_until(Duration::from_secs(5), || listed(&d) == ids(&[b, c])),
        "{}",
        d.log()
    );
    let (reasons, skipped) = skipped(&d);
    assert_eq!(
        reasons,
        ["10.99.0.11-0:bad-port", "ghost.svc.example:malformed"],
        "{skipped}"
    );
    for reason in ["bad-port", "malformed"] {
        assert_eq!(
            metric(
                &topo,
                &format!("lb_discovery_errors_total{{reason=\"{reason}\",service=\"web4\",source=\"dns\"}}")
            ),
            1.0,
            "{reason}: {}",
            d.log()
        );
    }

    // The server dies: the error is said and counted, the last set stays.
    dnsmasq.stop();
    let died = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || !discovery(&d)["error"].is_null()),
        "{}",
        d.log()
    );
    let error = discovery(&d)["error"].clone();
    let reason = error["reason"].as_str().unwrap_or_default().to_string();
    println!(
        "server killed -> error said: {} ms ({error})",
        died.elapsed().as_millis()
    );
    assert!(matches!(reason.as_str(), "resolve" | "timeout"), "{error}");
    // Failed again (each counted), and the set still there.
    let failures =
        format!("lb_discovery_errors_total{{reason=\"{reason}\",service=\"web4\",source=\"dns\"}}");
    assert!(
        wait_until(Duration::from_secs(10), || metric(&topo, &failures) >= 2.0),
        "{}",
        d.log()
    );
    assert_eq!(serving(&d), ids(&[b, c]), "a dead resolver emptied the service");
    let (counts, _) = tcp_flows(&topo, IpAddr::V4(VIP4), 40, false);
    assert_eq!(counts.values().sum::<usize>(), 40);
    assert!(
        d.log()
            .contains("service web4: dns source: _web._tcp.svc.example."),
        "{}",
        d.log()
    );
}

/// The instance's value in etcd, as a registrant writes it.
fn value_of(topo: &Topology, b: &str, extra: &str) -> Vec<u8> {
    format!("{{\"address\": \"{}\"{extra}}}", topo.backend(b).v4).into_bytes()
}

/// A daemon in cluster mode on the lab's etcd, its services pushed there: web4's instances are
/// keys in the same etcd, each under its registrant's lease. A lease that ends is a
/// deregistration: drained, then removed.
#[test]
fn instances_in_the_clusters_etcd_come_and_go_with_their_leases() {
    let mut topo = Topology::new(2).expect("topology");
    let ns = topo
        .add_client("etcd", "10.99.0.6", "fd99::6")
        .expect("etcd namespace");
    let etcd = lb_tests::cluster::Etcd::start_in(&ns, "10.99.0.6".parse().unwrap()).expect("etcd");
    let (instance, run_dir) = Daemon::new_paths();
    let text = format!(
        "[daemon]\ninstance = \"{instance}\"\ninterfaces = [\"eth0\"]\nxdp_mode = \"native\"\nrun_dir = \"{}\"\nconntrack_size = 65536\ntable_pool_slots = 1048576\nneighbour_refresh_ms = 500\n\n\
         [cluster]\netcd = [\"{}\"]\nname = \"edge\"\nnode = \"n1\"\n",
        run_dir.display(),
        etcd.url
    );
    let d = Daemon::start(&topo, &instance, &run_dir, &text).expect("daemon starts");
    let services = run_dir.join("services.toml");
    std::fs::write(
        &services,
        format!(
            "[daemon]\ninterfaces = [\"eth0\"]\n[[service]]\nname = \"web4\"\nvip = \"{VIP4}\"\nport = {PORT}\nprotocol = \"tcp\"\n\
             [service.discovery]\nkind = \"etcd\"\ndrain_before_remove = {}\nconfirm_shrink = {}\n",
            DRAIN.as_secs_f64(),
            CONFIRM.as_secs_f64()
        ),
    )
    .expect("services file");
    let out = d.cli(&["cluster", "push", services.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // b1 registers under a lease that outlives the test.
    let put = Instant::now();
    etcd.put_in(
        &ns,
        "/lb/edge/instances/web4/b1",
        &value_of(&topo, "b1", ", \"zone\": \"z1\""),
        Some(60),
    )
    .expect("put b1");
    assert!(
        wait_until(Duration::from_secs(10), || serving(&d) == ids(&["b1"])),
        "{}\n{}",
        d.json(&["service", "list"]),
        d.log()
    );
    println!(
        "key put -> backend in the table: {} ms",
        put.elapsed().as_millis()
    );
    let b1 = backend(&d, "b1");
    assert_eq!(
        (b1["source"].as_str(), b1["zone"].as_str()),
        (Some("etcd"), Some("z1")),
        "{b1}"
    );
    // By hand: refused (in a cluster too), in one line.
    let out = d.cli(&["backend", "remove", "web4", "b1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("takes its backends from its etcd source"),
        "{err}"
    );
    // A change of the service rewrites it in etcd (a new revision, applied whole): its
    // instances stay.
    let out = d.cli(&["service", "strategy", "web4", "round-robin"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let svc = d.json(&["service", "list"]);
    assert_eq!(svc[0]["strategy"], "round-robin", "{svc}");
    assert_eq!(
        serving(&d),
        ids(&["b1"]),
        "a cluster revision dropped the source's backends"
    );
    // A value that is no instance: skipped and counted once; the rest stays.
    etcd.put_in(&ns, "/lb/edge/instances/web4/junk", b"{not json", None)
        .expect("put junk");
    assert!(
        wait_until(Duration::from_secs(5), || discovery(&d)["skipped"][0]["entry"]
            == "junk"),
        "{}",
        d.log()
    );
    assert_eq!(discovery(&d)["skipped"][0]["reason"], "malformed");

    // b2 registers under a 2 s lease it never renews: in, then drained when etcd ends the
    // lease (its key deleted), then removed drain_before_remove later.
    let registered = Instant::now();
    etcd.put_in(
        &ns,
        "/lb/edge/instances/web4/b2",
        &value_of(&topo, "b2", ""),
        Some(2),
    )
    .expect("put b2");
    assert!(
        wait_until(Duration::from_secs(2), || serving(&d) == ids(&["b1", "b2"])),
        "{}",
        d.log()
    );
    assert!(
        wait_until(Duration::from_secs(6), || backend(&d, "b2")["health"]
            == "drained"),
        "{}",
        d.log()
    );
    let drained = registered.elapsed();
    assert!(
        wait_until(Duration::from_secs(5), || listed(&d) == ids(&["b1"])),
        "{}",
        d.log()
    );
    let gone = registered.elapsed();
    println!(
        "2 s lease not renewed -> drained at {} ms, removed at {} ms (drain {} ms)",
        drained.as_millis(),
        gone.as_millis(),
        DRAIN.as_millis()
    );
    assert!(
        drained >= Duration::from_secs(2),
        "drained before its lease ended: {drained:?}"
    );
    assert!(
        gone >= drained + DRAIN / 2,
        "removed without its drain: {drained:?} {gone:?}"
    );
    assert_eq!(
        metric(
            &topo,
            "lb_discovery_errors_total{reason=\"malformed\",service=\"web4\",source=\"etcd\"}"
        ),
        1.0
    );
    assert_eq!(serving(&d), ids(&["b1"]));
}
