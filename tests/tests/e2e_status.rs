//! The status page end to end: its HTTP surface (404 for an unknown service, tokens on the TCP
//! API, the Content-Security-Policy), then Debian's Chromium, driven by Selenium
//! (`python/tests/status_page.py`), against a live daemon under traffic: every backend shown,
//! markup from a label and an agent reply shown as text, a stopped server seen going down and
//! a backend `lb backend drain` drained shown drained by the operator, both without a reload,
//! sorting and filtering, one service's page, and a screenshot kept under the target directory.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr},
    os::unix::process::CommandExt,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lb_tests::{
    Daemon, Topology,
    client::http_get,
    in_ns,
    servers::{Reply, Responder},
    topology::{PORT, VIP4, VIP6},
};

const METRICS: &str = "127.0.0.1:9464";
const API: &str = "127.0.0.1:8443";
const ADMIN: &str = "admin-token-2b7e-91c0d4f6a3e85b1720";
const READER: &str = "read-token-6c1d-0e9f2a7b4d83c5e601";
const REPORTER: &str = "report-token-8f4a-3b6c1e0d9a72f5b418";
/// The backends' health and agent port, on their own addresses.
const HEALTH_PORT: u16 = 8081;
/// Markup a backend's operator controls: a label, and the agent's reply (`down #reason`).
const LABEL: &str = "<img src=x onerror=window.__pwned=1> &lt;b&gt;";
const AGENT: &str = "down #<img src=x onerror=window.__pwned=2><script>window.__pwned=3</script>";

const CHROMIUM: &str = "/usr/bin/chromium";
const DRIVER: &str = "/usr/bin/chromedriver";

/// The browser test's process group, killed on drop (the test failing or not).
struct Group(std::process::Child);

impl Drop for Group {
    fn drop(&mut self) {
        kill_group(&mut self.0);
    }
}

fn kill_group(child: &mut std::process::Child) {
    // SAFETY: a signal to the group the child leads (its pid), which it made at spawn.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let _ = child.wait();
}

/// What the browser test needs, or one line naming the fix.
fn browser_missing() -> Option<String> {
    let fix =
        "fix: cargo xtask setup installs Debian's chromium and chromium-driver, and selenium into target/py";
    for (path, package) in [(CHROMIUM, "chromium"), (DRIVER, "chromium-driver")] {
        if !std::path::Path::new(path).exists() {
            return Some(format!("{path} is missing (Debian package {package}; {fix})"));
        }
    }
    let python = lb_tests::python();
    let selenium = std::process::Command::new(&python)
        .args(["-c", "import selenium"])
        .output();
    if !selenium.is_ok_and(|o| o.status.success()) {
        return Some(format!("{} cannot import selenium ({fix})", python.display()));
    }
    None
}

/// web4 with a TCP check, web6 with an agent check, two UDP services without; b1 labelled
/// with markup; the API on TCP with admin, read and report tokens.
fn config(topo: &Topology, instance: &str, run_dir: &std::path::Path) -> String {
    for (file, token) in [("admin", ADMIN), ("read", READER), ("report", REPORTER)] {
        lb_tests::write_secret(&run_dir.join(format!("{file}.token")), &format!("{token}\n")).expect("token");
    }
    let mut text = format!(
        "[daemon]\ninstance = \"{instance}\"\ninterfaces = [\"eth0\"]\nxdp_mode = \"native\"\nrun_dir = \"{0}\"\nconntrack_size = 65536\ntable_pool_slots = 1048576\nneighbour_refresh_ms = 500\n\n[daemon.api]\nlisten = \"{API}\"\ntoken_file = \"{0}/admin.token\"\nread_token_file = \"{0}/read.token\"\nreport_token_file = \"{0}/report.token\"\n",
        run_dir.display()
    );
    let tcp = format!(
        "kind = \"tcp\"\nport = {HEALTH_PORT}\ninterval = 0.2\ntimeout = 0.2\nfast_interval = 0.2\nerror_threshold = 2\nrecovery_threshold = 2\n"
    );
    let agent = format!(
        "kind = \"agent\"\nagent_port = {HEALTH_PORT}\nagent_send = \"hello\"\ninterval = 0.3\ntimeout = 0.3\npanic_threshold = 0.0\n"
    );
    for (name, vip, proto, health) in [
        ("web4", IpAddr::V4(VIP4), "tcp", tcp.as_str()),
        ("dns4", IpAddr::V4(VIP4), "udp", ""),
        ("web6", IpAddr::V6(VIP6), "tcp", agent.as_str()),
        ("dns6", IpAddr::V6(VIP6), "udp", ""),
    ] {
        text.push_str(&format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {PORT}\nprotocol = \"{proto}\"\ntable_size = 1031\n"
        ));
        if !health.is_empty() {
            text.push_str(&format!("\n[service.health]\n{health}"));
        }
        for b in &topo.backends {
            let addr = if vip.is_ipv4() {
                IpAddr::V4(b.v4)
            } else {
                IpAddr::V6(b.v6)
            };
            // b1's label holds markup; the others' are plain.
            let note = if b.id == "b1" { LABEL } else { "rack 2" };
            text.push_str(&format!(
                "\n[[service.backend]]\nid = \"{}\"\naddress = \"{addr}\"\nweight = 100\n[service.backend.labels]\nnote = \"{note}\"\n",
                b.id
            ));
        }
    }
    text
}

/// `GET path` with an optional token: the status, the head (lower-cased) and the body.
fn get(topo: &Topology, at: &str, path: &str, token: Option<&str>) -> (u16, String, String) {
    let addr: SocketAddr = at.parse().expect("addr");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{}\r\n",
        token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default()
    );
    let text = in_ns(&topo.lb, move || {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(request.as_bytes()).expect("send");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).expect("read");
        String::from_utf8_lossy(&raw).into_owned()
    });
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_lowercase(), body.to_string())
}

/// The detail of an API error body (chunked or not: the JSON object in it).
fn detail(body: &str) -> String {
    let json = &body[body.find('{').unwrap_or(0)..=body.rfind('}').unwrap_or(body.len() - 1)];
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"));
    v["detail"].as_str().unwrap_or_default().to_string()
}

#[test]
fn the_status_page_shows_every_backend_and_a_stopped_one_going_down_live() {
    // Before anything is built: a host without the browser fails here, in one line.
    if let Some(why) = browser_missing() {
        panic!("{why}");
    }
    let begun = Instant::now();
    let mut topo = Topology::new(3).expect("topology");
    let ids: Vec<String> = topo.backends.iter().map(|b| b.id.clone()).collect();
    let mut responders: HashMap<String, Responder> = ids
        .iter()
        .map(|id| {
            let b = topo.backend(id);
            let reply = if id == "b3" { AGENT } else { "up" };
            let addrs = [
                SocketAddr::new(IpAddr::V4(b.v4), HEALTH_PORT),
                SocketAddr::new(IpAddr::V6(b.v6), HEALTH_PORT),
            ];
            let r = Responder::start(&b.ns, &addrs, Reply::Agent(reply.into()), None);
            (id.clone(), r)
        })
        .collect();
    let (instance, run_dir) = Daemon::new_paths();
    std::fs::create_dir_all(&run_dir).expect("run dir");
    let text = config(&topo, &instance, &run_dir);
    let d = Daemon::start(&topo, &instance, &run_dir, &text).expect("daemon starts");
    d.wait_all_in_tables();

    // The HTTP surface. The metrics listener has no token here: page and data are open.
    let (status, head, body) = get(&topo, METRICS, "/status", None);
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'none'; script-src 'self'"),
        "{head}"
    );
    assert!(body.contains("/status/app.js"), "{body}");
    for (path, want) in [
        ("/status/app.js", 200),
        ("/status/app.css", 200),
        ("/status/service/web4", 200),
        ("/status/service/nope", 404),
        ("/status/data", 200),
        ("/status/data?service=web6", 200),
        ("/status/data?service=nope", 404),
        ("/status/data?servce=web6", 400),
    ] {
        let (status, head, body) = get(&topo, METRICS, path, None);
        assert_eq!(status, want, "{path}: {head}\n{body}");
        if want == 404 {
            assert_eq!(detail(&body), "unknown service nope", "{path}");
        }
    }
    let (_, data) = http_get(&topo.lb, METRICS.parse().unwrap(), "/status/data", None).expect("data");
    let data: serde_json::Value = serde_json::from_str(&data).expect("json");
    assert_eq!(data["services"].as_array().map(Vec::len), Some(4), "{data}");
    assert_eq!(data["health"].as_array().map(Vec::len), Some(4), "{data}");
    assert!(data["counters"]["drop_no_backend"].is_u64(), "{data}");
    assert!(data["services"][0]["backends"][0]["packets"].is_u64(), "{data}");
    assert_eq!(data["interfaces"][0]["interface"], "eth0", "{data}");
    assert!(
        data["interfaces"][0]["xdp_tx_errors"].is_u64(),
        "veth counts them: {data}"
    );
    // The TCP API: the page for anyone (it holds no data), the data for a token that may read.
    for (path, token, want) in [
        ("/status", None, 200),
        ("/status/data", None, 401),
        ("/status/data", Some("not-a-token"), 401),
        ("/status/data", Some(REPORTER), 403),
        ("/status/data", Some(READER), 200),
        ("/status/data", Some(ADMIN), 200),
        // Without a token the service's page does not say whether the service exists.
        ("/status/service/nope", None, 200),
        ("/status/service/nope", Some(READER), 404),
        ("/status/service/nope", Some("not-a-token"), 401),
        ("/status/service/web4", Some(READER), 200),
    ] {
        let (status, head, body) = get(&topo, API, path, token);
        assert_eq!(status, want, "{path} with {token:?}: {head}\n{body}");
    }
    // Refused as the API's own calls are: in the audit log.
    let log = d.log();
    for line in [
        "GET /status/data 401 transport=tcp scope=none",
        "GET /status/data 403 transport=tcp scope=report",
    ] {
        assert!(log.contains(line), "no audit line {line:?} in:\n{log}");
    }

    // Traffic: UDP to dns4 from the client, paced, until the browser is done (2 minutes at
    // most).
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        let ns = std::fs::File::open(topo.client.path()).expect("netns");
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on this thread only.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let target = SocketAddr::new(IpAddr::V4(VIP4), PORT);
            let s = lb_tests::client::udp_socket(target, Duration::from_millis(50)).expect("udp");
            let until = Instant::now() + Duration::from_secs(120);
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                let _ = s.send(b"who");
                let _ = s.recv(&mut buf);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    let shots = lb_tests::target_dir().join("status-page");
    std::fs::create_dir_all(&shots).expect("artifact dir");
    let screenshot = shots.join("status-page.png");
    let _ = std::fs::remove_file(&screenshot);
    let mut rows = Vec::new();
    for s in ["web4", "dns4", "web6", "dns6"] {
        for id in &ids {
            rows.push([s.to_string(), id.clone()]);
        }
    }
    let args = serde_json::json!({
        "metrics": format!("http://{METRICS}"),
        "api": format!("http://{API}"),
        "read_token": READER,
        "backends": rows,
        "markup": {"label": LABEL, "agent": AGENT.trim_start_matches("down #")},
        "interfaces": [["eth0", "native"]],
        "busy": "dns4",
        "stop": ["web4", "b2"],
        "drain": ["web6", "b1"],
        "screenshot": screenshot,
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../python/tests/status_page.py");
    let browser_started = Instant::now();
    let mut child = Group(
        topo.lb
            .command(lb_tests::python())
            .arg(script)
            .arg(args.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: chromedriver and Chromium go with it, whatever happens.
            .process_group(0)
            .spawn()
            .expect("run python"),
    );
    let child = &mut child.0;
    let mut to_script = child.stdin.take().expect("stdin");
    let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    // The script's lines as they come; the stop is answered when it asks for it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut output = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                println!("{line}");
                if line == "READY TO STOP" {
                    // As a crashed process: the service's port and its health port close.
                    topo.stop_servers("b2");
                    drop(responders.remove("b2"));
                    writeln!(to_script, "stopped").expect("tell the script");
                }
                if line == "READY TO DRAIN" {
                    let out = d.cli(&["backend", "drain", "web6", "b1"]);
                    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                    writeln!(to_script, "drained").expect("tell the script");
                }
                output.push(line);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                output.push("(the browser test took more than 90 s: stopped)".into());
                kill_group(child);
                break;
            }
        }
    }
    let status = child.wait().expect("python exits");
    stop.store(true, Ordering::Relaxed);
    sender.join().expect("sender");
    let mut stderr = String::new();
    let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut stderr));
    let browser_took = browser_started.elapsed();
    assert!(
        status.success(),
        "the browser test failed ({status}):\n{}\n{stderr}\nthe daemon's log ends:\n{}",
        output.join("\n"),
        d.log_tail(30)
    );
    assert!(
        output.last().is_some_and(|l| l.ends_with(" passed, 0 failed")),
        "{}",
        output.join("\n")
    );
    assert!(screenshot.exists(), "no screenshot at {}", screenshot.display());
    println!(
        "status page test: {:.1} s in all, {:.1} s in the browser; screenshot at {}",
        begun.elapsed().as_secs_f64(),
        browser_took.as_secs_f64(),
        screenshot.display()
    );
}
