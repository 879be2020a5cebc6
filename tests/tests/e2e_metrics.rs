//! Metrics end to end: the daemon's exposition passes `promtool check metrics`, a real
//! Prometheus server scrapes it in the balancer's namespace while UDP flows, and PromQL gives
//! each backend's packet rate within 20% of what the test sent. A token keeps scrapes (and the
//! status page's data) out.

use std::{
    collections::HashMap,
    io::Write,
    net::{IpAddr, SocketAddr},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use lb_tests::{
    Daemon, NetNs, Topology,
    client::{http_get, udp_ask, udp_socket},
    in_ns,
    topology::{PORT, VIP4},
    wait_until,
};

const METRICS: &str = "127.0.0.1:9464";
const PROMETHEUS: &str = "127.0.0.1:9090";

fn start(topo: &Topology, extra: &str) -> Daemon {
    let (instance, run_dir) = Daemon::new_paths();
    let text = topo.config(&instance, &run_dir, &["b1", "b2", "b3"]).replacen(
        "neighbour_refresh_ms = 500\n",
        &format!("neighbour_refresh_ms = 500\n{extra}"),
        1,
    );
    let d = Daemon::start(topo, &instance, &run_dir, &text).expect("daemon starts");
    d.wait_all_in_tables();
    d
}

fn scrape(ns: &NetNs, token: Option<&str>) -> (u16, String) {
    http_get(ns, METRICS.parse().unwrap(), "/metrics", token).expect("scrape")
}

/// A Prometheus server in `ns`, killed on drop.
struct Prometheus {
    child: Child,
    dir: std::path::PathBuf,
}

impl Prometheus {
    fn start(ns: &NetNs) -> Self {
        let dir = std::env::temp_dir().join(format!("lbt-prom-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: lb\n    static_configs:\n      - targets: ['{METRICS}']\n"
            ),
        )
        .expect("config");
        let child = ns
            .command("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log")).expect("log"))
            .spawn()
            .expect("start prometheus (cargo xtask setup installs it)");
        let p = Self { child, dir };
        let ready = wait_until(Duration::from_secs(30), || {
            http_get(ns, PROMETHEUS.parse().unwrap(), "/-/ready", None).is_ok_and(|(s, _)| s == 200)
        });
        assert!(ready, "prometheus did not get ready: {}", p.log());
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// An instant PromQL query now; the result vector as (labels, value).
    fn query(&self, ns: &NetNs, promql: &str) -> Vec<(serde_json::Value, f64)> {
        self.query_inner(ns, promql, None)
    }

    /// The same, evaluated at `at` (Unix seconds).
    fn query_at(&self, ns: &NetNs, promql: &str, at: f64) -> Vec<(serde_json::Value, f64)> {
        self.query_inner(ns, promql, Some(at))
    }

    fn query_inner(&self, ns: &NetNs, promql: &str, at: Option<f64>) -> Vec<(serde_json::Value, f64)> {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (status, body) = http_get(
            ns,
            PROMETHEUS.parse().unwrap(),
            &format!(
                "/api/v1/query?query={encoded}{}",
                at.map(|t| format!("&time={t:.3}")).unwrap_or_default()
            ),
            None,
        )
        .expect("query");
        assert_eq!(status, 200, "{promql}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        v["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let value = r["value"][1]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(f64::NAN);
                (r["metric"].clone(), value)
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn exposition_passes_promtool_and_prometheus_sees_each_backends_rate() {
    let topo = Topology::new(3).expect("topology");
    let d = start(&topo, "");

    let (status, text) = scrape(&topo.lb, None);
    assert_eq!(status, 200, "{text}");
    for family in [
        "lb_backend_packets_total{",
        "lb_dataplane_packets_total{reason=\"pass_not_vip\"}",
        "lb_backend_up{",
        "lb_backend_effective_weight{",
        "lb_service_table_generation{",
        "lb_xdp_attached{interface=\"eth0\",mode=\"native\"} 1",
        "lb_conntrack_capacity_entries 65536",
        "lb_build_info{version=",
        "process_resident_memory_bytes",
    ] {
        assert!(text.contains(family), "no {family} in the exposition:\n{text}");
    }
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask setup installs it)");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = promtool.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let prom = Prometheus::start(&topo.lb);
    // Its first scrape comes a few seconds after it is ready; a rate over a window that starts
    // before the series does is extrapolated short, so wait for it.
    let scraping = wait_until(Duration::from_secs(30), || {
        prom.query(&topo.lb, "up{job=\"lb\"}").first().map(|(_, v)| *v) == Some(1.0)
    });
    assert!(scraping, "prometheus never scraped the daemon: {}", prom.log());
    // 24 UDP flows, each pinned to one backend, each sending one datagram every 10 ms.
    let flows: Vec<(std::net::UdpSocket, String)> = in_ns(&topo.client, || {
        (0..24)
            .map(|_| {
                let s =
                    udp_socket(SocketAddr::new(IpAddr::V4(VIP4), PORT), Duration::from_secs(1)).expect("udp");
                let id = udp_ask(&s).expect("an answer");
                s.set_nonblocking(true).expect("nonblocking");
                (s, id)
            })
            .collect()
    });
    let run_for = Duration::from_secs(16);
    let started = Instant::now();
    let sender = std::thread::spawn(move || {
        let mut sent: HashMap<String, u64> = HashMap::new();
        let mut buf = [0u8; 64];
        let mut next = Instant::now();
        while started.elapsed() < run_for {
            for (s, id) in &flows {
                if s.send(b"who").is_ok() {
                    *sent.entry(id.clone()).or_default() += 1;
                }
                while s.recv(&mut buf).is_ok() {}
            }
            next += Duration::from_millis(10);
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        (sent, started.elapsed())
    });
    // Query while the traffic still flows, over 10 s of it, evaluated 2 s back so the last
    // scrapes are in.
    let ok = wait_until(Duration::from_secs(15), || {
        started.elapsed() >= Duration::from_secs(14)
    });
    assert!(ok);
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
        - 2.0;
    let rates = prom.query_at(
        &topo.lb,
        "rate(lb_backend_packets_total{service=\"dns4\"}[10s])",
        at,
    );
    let scrape_s = prom.query(
        &topo.lb,
        "max_over_time(scrape_duration_seconds{job=\"lb\"}[15s])",
    );
    println!(
        "longest scrape in the last 15 s: {:?} s",
        scrape_s.first().map(|(_, v)| *v)
    );
    let up = prom.query(&topo.lb, "up{job=\"lb\"}");
    let (sent, elapsed) = sender.join().expect("sender");
    assert_eq!(
        up.first().map(|(_, v)| *v),
        Some(1.0),
        "prometheus scrapes the daemon: {}",
        prom.log()
    );
    assert_eq!(rates.len(), 3, "one rate per backend: {rates:?}");
    for (labels, rate) in &rates {
        let id = labels["backend"].as_str().unwrap_or_default();
        let want = *sent.get(id).unwrap_or(&0) as f64 / elapsed.as_secs_f64();
        println!("{id}: prometheus says {rate:.1} packets/s, the test sent {want:.1}/s");
        assert!(want > 0.0, "{id} got flows: {sent:?}");
        assert!(
            (rate - want).abs() <= 0.2 * want,
            "{id}: {rate:.1}/s against {want:.1}/s"
        );
    }
    drop(d);
}

#[test]
fn a_token_keeps_scrapes_out() {
    let topo = Topology::new(3).expect("topology");
    let token_file = std::env::temp_dir().join(format!("lbt-token-{}", std::process::id()));
    lb_tests::write_secret(&token_file, "s3cret-token-0123456789abcdef01234\n").expect("token");
    let d = start(
        &topo,
        &format!("[daemon.metrics]\ntoken_file = \"{}\"\n", token_file.display()),
    );
    assert_eq!(scrape(&topo.lb, None).0, 401);
    assert_eq!(scrape(&topo.lb, Some("wrong")).0, 401);
    let (status, text) = scrape(&topo.lb, Some("s3cret-token-0123456789abcdef01234"));
    assert_eq!(status, 200);
    assert!(text.contains("lb_backend_packets_total"));
    // The status page's data takes the same token; the page itself holds none, and a service's
    // page does not say without a token whether the service exists.
    let get = |path: &str, token: Option<&str>| {
        http_get(&topo.lb, METRICS.parse().unwrap(), path, token)
            .expect("status page")
            .0
    };
    let token = Some("s3cret-token-0123456789abcdef01234");
    assert_eq!(get("/status/data", None), 401);
    assert_eq!(get("/status/data", Some("wrong")), 401);
    assert_eq!(get("/status/data", token), 200);
    assert_eq!(get("/status", None), 200);
    assert_eq!(get("/status/service/nope", None), 200);
    assert_eq!(get("/status/service/nope", token), 404);
    drop(d);
    let _ = std::fs::remove_file(&token_file);
}

/// Every `expr` in the dashboard.
fn dashboard_queries() -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/grafana-dashboard.json");
    let text = std::fs::read_to_string(path).expect("dashboard");
    let json: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is valid JSON");
    let mut out = Vec::new();
    walk(&json, &mut out);
    out
}

/// The metric names a PromQL expression refers to (ours and the process collector's).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            if (word.starts_with("lb_") || word.starts_with("process_")) && !names.contains(&word) {
                names.push(word.clone());
            }
            word.clear();
        }
    }
    names
}

#[test]
fn the_dashboard_queries_only_what_the_daemon_exports_and_prometheus_accepts_them() {
    let topo = Topology::new(3).expect("topology");
    let _health: Vec<_> = ["b1", "b2", "b3"]
        .iter()
        .map(|id| {
            let b = topo.backend(id);
            lb_tests::servers::Responder::start(
                &b.ns,
                &[SocketAddr::new(IpAddr::V4(b.v4), 8081)],
                lb_tests::servers::Reply::Http(200, "ok".into()),
                None,
            )
        })
        .collect();
    let d = start(&topo, "");
    // Checks (and a breaker) on web4, so the check-latency histogram and the breaker have series.
    let text = std::fs::read_to_string(&d.config).expect("config").replacen(
        "forwarding = \"dsr\"\n",
        "forwarding = \"dsr\"\n[service.health]\nport = 8081\ninterval = 0.2\ntimeout = 0.2\nfast_interval = 0.2\nbreaker_failures = 5\n",
        1,
    );
    std::fs::write(&d.config, text).expect("config");
    let out = d.cli(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(wait_until(Duration::from_secs(5), || {
        scrape(&topo.lb, None)
            .1
            .contains("lb_health_check_duration_seconds_bucket")
    }));
    let (_, exposition) = scrape(&topo.lb, None);
    let exported: std::collections::HashSet<&str> = exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let queries = dashboard_queries();
    assert!(queries.len() >= 10, "{queries:?}");
    let mut names = Vec::new();
    for q in &queries {
        for n in metric_names(q) {
            assert!(
                exported.contains(n.as_str()),
                "the dashboard's {q:?} names {n}, which the daemon does not export"
            );
            names.push(n);
        }
    }
    for needed in [
        "lb_backend_packets_total",
        "lb_backend_health_score",
        "lb_dataplane_packets_total",
        "lb_conntrack_entries",
        "lb_health_check_duration_seconds_bucket",
    ] {
        assert!(names.iter().any(|n| n == needed), "the dashboard shows {needed}");
    }
    // Prometheus parses and evaluates each one.
    let prom = Prometheus::start(&topo.lb);
    for q in &queries {
        let q = q.replace("$service", ".*");
        let _ = prom.query(&topo.lb, &q);
    }
}

/// `lb_interface_xdp_tx_errors_total` for `iface` in an exposition (None: no such series).
fn tx_errors(text: &str, iface: &str) -> Option<f64> {
    let prefix = format!("lb_interface_xdp_tx_errors_total{{interface=\"{iface}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
}

/// UDP flows from the client, each asking up to 5 times (100 ms apart); how many were answered.
fn udp_answered(topo: &Topology, flows: usize) -> usize {
    in_ns(&topo.client, move || {
        (0..flows)
            .filter(|_| {
                let s = udp_socket(
                    SocketAddr::new(IpAddr::V4(VIP4), PORT),
                    Duration::from_millis(100),
                )
                .expect("UDP socket");
                udp_ask(&s).is_some()
            })
            .count()
    })
}

/// The loss a new operator hit: in native mode, a veth whose peer runs no XDP program drops
/// every frame the balancer sends back out (XDP_TX). With the lab's pass program on the peer:
/// no warning, traffic answered, the driver's transmit errors at 0. Without it (the daemon
/// restarted, adopting its pins): the warning at start with the fix, no answer, and the loss
/// counted in the metric and in `lb status`.
#[test]
fn a_veth_whose_peer_runs_no_xdp_is_warned_about_and_its_losses_counted() {
    let mut topo = Topology::new(1).expect("topology");
    let (instance, run_dir) = Daemon::new_paths();
    let text = topo.config(&instance, &run_dir, &["b1"]);
    let mut d = Daemon::start(&topo, &instance, &run_dir, &text).expect("daemon starts");
    d.wait_all_in_tables();
    const WARNING: &str =
        "eth0: a veth in native XDP mode whose peer p1 in another network namespace runs no XDP program";
    assert_eq!(udp_answered(&topo, 5), 5);
    assert!(!d.log().contains("runs no XDP program"), "{}", d.log());
    let (_, text) = scrape(&topo.lb, None);
    assert_eq!(tx_errors(&text, "eth0"), Some(0.0), "{text}");
    let status = d.json(&["status"]);
    assert_eq!(status["interfaces"][0]["xdp_tx_errors"], 0, "{status}");

    topo.detach_pass().expect("detach the pass program");
    d.restart(&topo).expect("restart");
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains(WARNING))
        .unwrap_or_else(|| panic!("no warning: {log}"));
    assert!(
        line.ends_with(
            "(fix: attach an XDP program to p1 (a pass program will do), or set xdp_mode = \"generic\")"
        ),
        "{line}"
    );
    d.wait_all_in_tables();
    assert_eq!(udp_answered(&topo, 5), 0, "the kernel drops what XDP sends out");
    let (_, text) = scrape(&topo.lb, None);
    let lost = tx_errors(&text, "eth0").unwrap_or(0.0);
    // Each flow asked 5 times, each ask one frame sent back out.
    assert!(lost >= 25.0, "lb_interface_xdp_tx_errors_total {lost}: {text}");
    let status = d.json(&["status"]);
    assert!(
        status["interfaces"][0]["xdp_tx_errors"].as_u64() >= Some(25),
        "{status}"
    );
    let out = d.cli(&["status"]);
    let lines = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        lines.lines().any(|l| l.starts_with("tx errors  eth0 ")),
        "{lines}"
    );
}
