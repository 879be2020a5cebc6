//! IPIP and GUE end to end: backends in their own subnets behind a router, the balancer encapsulating
//! to them, each backend stripping the outer header with the shipped decapsulator (set up with
//! `lb backend-host setup`) and answering the client directly, not through the balancer.
//!
//! ```text
//!  client 10.81.0.2 ──┐            ┌── b1 10.83.1.2 (VIPs on lo, decap on eth0)
//!                     router ──────┤
//!  lb 10.82.0.2 ──────┘            └── b2 10.83.2.2
//! ```
//! The client routes to the VIPs via the router, the router via the balancer. Replies go from
//! the backends to the router to the client.

use std::{
    collections::HashMap,
    io::{BufRead, Write},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::Result;
use lb_tests::{
    NetNs, client, in_ns, lb_bin,
    servers::Servers,
    topology::{Daemon, PORT, VIP4, VIP6, attach_pass, four_services},
};

const BACKENDS: u8 = 2;

/// The namespaces, with the backends' decapsulators torn down before the namespaces go.
struct Routed {
    servers: Vec<Servers>,
    backends: Vec<NetNs>,
    _pass: aya::Ebpf,
    client: NetNs,
    lb: NetNs,
    _router: NetNs,
}

impl Drop for Routed {
    fn drop(&mut self) {
        self.servers.clear();
        for b in &self.backends {
            let _ = b
                .command(lb_bin())
                .args(["backend-host", "teardown", "--interface", "eth0"])
                .output();
        }
    }
}

impl Routed {
    fn new() -> Result<Self> {
        let router = NetNs::new("rt")?;
        let client = NetNs::new("cl")?;
        let lb = NetNs::new("lb")?;
        router.sh("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1")?;
        router.veth("c0", &client, "eth0")?;
        router.veth("l0", &lb, "eth0")?;
        router.sh(
            "ip addr add 10.81.0.1/24 dev c0 && ip addr add fd81::1/64 dev c0 nodad && \
             ip addr add 10.82.0.1/24 dev l0 && ip addr add fd82::1/64 dev l0 nodad && \
             ip link set l0 mtu 1600 && ethtool -K c0 tx off >/dev/null && ethtool -K l0 tx off >/dev/null",
        )?;
        router.sh(&format!(
            "ip route add {VIP4}/32 via 10.82.0.2 && ip -6 route add {VIP6}/128 via fd82::2"
        ))?;
        client.sh(
            "ip addr add 10.81.0.2/24 dev eth0 && ip addr add fd81::2/64 dev eth0 nodad && \
             ip route add default via 10.81.0.1 && ip -6 route add default via fd81::1 && \
             ethtool -K eth0 tx off >/dev/null",
        )?;
        // The balancer forwards (bpf_fib_lookup answers only for forwarding interfaces).
        lb.sh(
            "ip addr add 10.82.0.2/24 dev eth0 && ip addr add fd82::2/64 dev eth0 nodad && ip link set eth0 mtu 1600 && \
             ip route add default via 10.82.0.1 && ip -6 route add default via fd82::1 && \
             ip route add 10.83.0.0/16 via 10.82.0.1 mtu lock 1500 && \
             ip -6 route add fd83::/16 via fd82::1 mtu lock 1500 && \
             sysctl -qw net.ipv4.conf.all.forwarding=1 net.ipv4.conf.eth0.forwarding=1 net.ipv6.conf.all.forwarding=1",
        )?;
        // The router's side of the balancer's link receives XDP_TX frames only with XDP on it.
        let pass = attach_pass(&router, "l0")?;
        let mut routed = Self {
            servers: Vec::new(),
            backends: Vec::new(),
            _pass: pass,
            client,
            lb,
            _router: router,
        };
        for i in 1..=BACKENDS {
            let b = NetNs::new(&format!("b{i}"))?;
            routed._router.veth(&format!("b{i}"), &b, "eth0")?;
            routed._router.sh(&format!(
                "ip addr add 10.83.{i}.1/24 dev b{i} && ip addr add fd83:{i}::1/64 dev b{i} nodad && \
                 ip link set b{i} mtu 1600"
            ))?;
            b.sh(&format!(
                "ip addr add 10.83.{i}.2/24 dev eth0 && ip addr add fd83:{i}::2/64 dev eth0 nodad && \
                 ip link set eth0 mtu 1600 && ip route add default via 10.83.{i}.1 && \
                 ip -6 route add default via fd83:{i}::1 && ethtool -K eth0 tx off >/dev/null"
            ))?;
            routed.backends.push(b);
        }
        Ok(routed)
    }

    /// Waits for every namespace's fresh addresses to leave duplicate address detection.
    fn wait_dad(&self) {
        for ns in [&self.client, &self.lb, &self._router]
            .into_iter()
            .chain(self.backends.iter())
        {
            assert!(
                ns.wait_dad(Duration::from_secs(15)),
                "DAD did not finish in {}",
                ns.name
            );
        }
    }

    /// `lb [--json] backend-host VERB --interface eth0 --vip ...` on backend `i`.
    fn backend_host(&self, i: usize, json: bool, verb: &str, vips: &[IpAddr]) -> std::process::Output {
        let mut cmd = self.backends[i].command(lb_bin());
        if json {
            cmd.arg("--json");
        }
        cmd.args(["backend-host", verb, "--interface", "eth0"]);
        for vip in vips {
            cmd.arg("--vip").arg(vip.to_string());
        }
        cmd.output().expect("run lb backend-host")
    }

    fn start_servers(&mut self) {
        for (i, b) in self.backends.iter().enumerate() {
            let addrs = [
                SocketAddr::new(IpAddr::V4(VIP4), PORT),
                SocketAddr::new(IpAddr::V6(VIP6), PORT),
            ];
            self.servers
                .push(Servers::start(b, &format!("b{}", i + 1), &addrs));
        }
    }

    fn config(&self, instance: &str, run_dir: &std::path::Path, mode: &str) -> String {
        let mut text = format!(
            "[daemon]\ninstance = \"{instance}\"\ninterfaces = [\"eth0\"]\nxdp_mode = \"native\"\nrun_dir = \"{}\"\n",
            run_dir.display()
        );
        let backends: Vec<_> = (1..=BACKENDS)
            .map(|i| {
                let v4: IpAddr = format!("10.83.{i}.2").parse().expect("address");
                let v6: IpAddr = format!("fd83:{i}::2").parse().expect("address");
                (format!("b{i}"), v4, v6)
            })
            .collect();
        text.push_str(&four_services(mode, &backends));
        text
    }
}

/// `n` TCP connections and `n` UDP flows to `vip` from the client; returns answers per backend.
fn traffic(client_ns: &NetNs, vip: IpAddr, n: usize) -> (HashMap<String, usize>, HashMap<String, usize>) {
    in_ns(client_ns, move || {
        let mut tcp = HashMap::new();
        for _ in 0..n {
            let mut c = client::connect(vip);
            let first = c.ask().expect("TCP answer through IPIP");
            assert_eq!(
                c.ask().expect("second answer"),
                first,
                "a TCP flow changed backend"
            );
            *tcp.entry(first).or_insert(0) += 1;
        }
        let mut udp = HashMap::new();
        for _ in 0..n {
            let target = SocketAddr::new(vip, PORT);
            let s = client::udp_socket(target, Duration::from_secs(3)).expect("UDP socket");
            let answer = client::udp_ask(&s);
            *udp.entry(answer.expect("UDP answer through IPIP")).or_insert(0) += 1;
        }
        (tcp, udp)
    })
}

#[test]
fn ipip_reaches_routed_backends_that_answer_directly() {
    let mut net = Routed::new().expect("topology");

    // A backend that is not set up: check names what is missing and fails.
    let out = net.backend_host(0, false, "check", &[IpAddr::V4(VIP4)]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("FAIL decapsulator attached to eth0"), "{text}");
    assert!(text.contains(&format!("FAIL {VIP4} is on lo")), "{text}");
    assert!(text.contains("arp_ignore"), "{text}");

    let both = [IpAddr::V4(VIP4), IpAddr::V6(VIP6)];
    for i in 0..BACKENDS as usize {
        let out = net.backend_host(i, false, "setup", &both);
        assert!(
            out.status.success(),
            "setup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = net.backend_host(i, false, "check", &both);
        assert!(
            out.status.success(),
            "check after setup: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        // Idempotent.
        let out = net.backend_host(i, true, "setup", &both);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(
            v["changed"],
            serde_json::json!([]),
            "second setup changed something"
        );
    }
    // The list is the whole truth: a VIP dropped from it is no longer decapsulated and comes
    // off lo (setup put it there); listing it again restores it.
    let changed = |out: std::process::Output| {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        v["changed"].clone()
    };
    assert_eq!(
        changed(net.backend_host(0, true, "setup", &[IpAddr::V4(VIP4)])),
        serde_json::json!([
            format!("stopped decapsulating for {VIP6}"),
            format!("removed {VIP6} from lo")
        ])
    );
    let out = net.backend_host(0, false, "check", &both);
    assert_eq!(out.status.code(), Some(1), "check must miss {VIP6}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("FAIL {VIP6} is on lo")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        changed(net.backend_host(0, true, "setup", &both)),
        serde_json::json!([format!("added {VIP6} to lo"), format!("decapsulating for {VIP6}")])
    );
    net.start_servers();

    // IPv6 neighbour discovery needs the fresh links' addresses out of duplicate address
    // detection first.
    net.wait_dad();
    // The same backends, set up once, take IPIP and GUE alike: one daemon per mode.
    let mut decapped_before = vec![0u64; BACKENDS as usize];
    for mode in ["ipip", "gue"] {
        let (instance, run_dir) = Daemon::new_paths();
        let config = net.config(&instance, &run_dir, mode);
        let daemon = Daemon::start_in(&net.lb, &instance, &run_dir, &config).expect("daemon");
        // The route to the backends takes 1500 bytes (its MTU metric; the link takes 1600, as
        // does the clients'): the daemon says that full-size packets will not fit once
        // encapsulated.
        let log = daemon.log();
        for service in ["web4", "dns4", "web6", "dns6"] {
            let warning = format!("service {service}: the routes to 2 of its 2 backends take less than");
            let line = log.lines().find(|l| l.contains(&warning));
            assert!(
                line.is_some_and(|l| l.contains("MTU 1600") && l.contains(", 1500);")),
                "{mode}: no MTU warning for {service} naming the route's 1500 bytes: {log}"
            );
        }
        for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
            let (tcp, udp) = traffic(&net.client, vip, 40);
            for (what, counts) in [("tcp", &tcp), ("udp", &udp)] {
                assert_eq!(
                    counts.values().sum::<usize>(),
                    40,
                    "{mode} {vip} {what}: {counts:?}"
                );
                assert_eq!(
                    counts.len(),
                    BACKENDS as usize,
                    "{vip} {what}: every backend serves: {counts:?}"
                );
            }
        }
        // The route to the backends takes 1500 bytes, as does the client's link: full-sized
        // client packets no longer fit once encapsulated. The balancer answers "too big" with
        // the MTU that fits, the client's path MTU discovery shrinks its segments, and a
        // transfer much larger than the MTU completes.
        for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
            let answer = in_ns(&net.client, move || {
                let mut c = client::connect(vip);
                let mut line = vec![b'x'; 200_000];
                line.push(b'\n');
                c.writer.write_all(&line).expect("upload");
                let mut answer = String::new();
                c.reader.read_line(&mut answer).expect("answer after the upload");
                answer
            });
            assert!(answer.trim().starts_with('b'), "{mode} {vip}: {answer:?}");
        }
        if mode == "ipip" {
            neighbour_change_moves_the_epoch(&net, &instance);
        }
        let too_big = daemon.json(&["stats"])["counters"]["icmp_too_big_sent"]
            .as_u64()
            .unwrap_or(0);
        assert!(too_big > 0, "{mode}: no packet-too-big answers were needed");
        // Forwarded by XDP (the router's side got XDP_TX frames), decapsulated on the backends.
        let stats = daemon.json(&["stats"]);
        let tx = stats["counters"]["tx"].as_u64().unwrap_or(0);
        assert!(tx >= 160, "tx counter {tx}: {stats}");
        for (i, before) in decapped_before.iter_mut().enumerate() {
            let out = net.backend_host(i, true, "check", &[IpAddr::V4(VIP4)]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
            let line = v["findings"]
                .as_array()
                .and_then(|f| {
                    f.iter().find(|f| {
                        f["what"]
                            .as_str()
                            .is_some_and(|w| w.contains("packets decapsulated"))
                    })
                })
                .cloned()
                .unwrap_or_default();
            let decapped: u64 = line["what"]
                .as_str()
                .and_then(|w| w.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            assert!(decapped > *before, "{mode}: backend {i}: {line}");
            *before = decapped;
        }
        drop(daemon);
    }
}

/// The router's MAC in the balancer's neighbour table goes wrong and comes back: the daemon
/// moves the data plane's next-hop epoch at each (the kernel's notification), so the cached
/// next hops follow within a moment (without it, only after 4,096 packets per CPU), and
/// traffic flows again once the entry is right.
fn neighbour_change_moves_the_epoch(net: &Routed, instance: &str) {
    let readers = lb_userspace::dataplane::Readers::open(instance).expect("pins");
    let epoch = || readers.dp_config.get(&0, 0).expect("DP_CONFIG").hop_epoch;
    let wait_past = |before: u32| {
        let start = std::time::Instant::now();
        while epoch() == before {
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "a neighbour change did not move the next-hop epoch"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let router_mac = net
        ._router
        .sh("ip -br link show dev l0 | awk '{print $3}'")
        .expect("l0's MAC");
    let before = epoch();
    net.lb
        .sh("ip neigh replace 10.82.0.1 lladdr 02:00:00:00:0b:ad dev eth0 nud permanent")
        .expect("neigh replace");
    wait_past(before);
    let before = epoch();
    net.lb
        .sh(&format!(
            "ip neigh replace 10.82.0.1 lladdr {} dev eth0 nud reachable",
            router_mac.trim()
        ))
        .expect("neigh replace");
    wait_past(before);
    let (tcp, udp) = traffic(&net.client, IpAddr::V4(VIP4), 20);
    assert_eq!(
        tcp.values().sum::<usize>() + udp.values().sum::<usize>(),
        40,
        "{tcp:?} {udp:?}"
    );
}

/// Tears the decapsulator down when the test ends, also when it fails.
struct Decap<'a>(&'a NetNs, &'static str);

impl Drop for Decap<'_> {
    fn drop(&mut self) {
        let _ = self
            .0
            .command(lb_bin())
            .args(["backend-host", "teardown", "--interface", self.1])
            .output();
    }
}

#[test]
fn backend_host_replaces_an_attachment_to_a_removed_interface() {
    let ns = NetNs::new("bh").expect("namespace");
    let link = "ip link add d0 type veth peer name d1 && ip link set d0 up && ip link set d1 up";
    ns.sh(link).expect("veth");
    let _decap = Decap(&ns, "d0");
    let host = |verb: &str| {
        ns.command(lb_bin())
            // d0 has no address of its own: the one tunnels arrive at is named.
            .args([
                "--json",
                "backend-host",
                verb,
                "--interface",
                "d0",
                "--address",
                "10.250.0.2",
                "--vip",
            ])
            .arg(VIP4.to_string())
            .output()
            .expect("run lb backend-host")
    };
    let out = host("setup");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(host("check").status.success());
    // The interface goes and comes back under the same name: the pinned link is defunct.
    ns.sh(&format!("ip link del d0 && {link}")).expect("recreate");
    let out = host("check");
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("attachment is to a removed interface"), "{text}");
    let out = host("setup");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        v["changed"][0]
            .as_str()
            .is_some_and(|c| c.starts_with("re-attached the decapsulator to d0")),
        "{v}"
    );
    assert!(host("check").status.success(), "check after setup");
    // Once is enough: a second setup changes nothing.
    let v: serde_json::Value = serde_json::from_slice(&host("setup").stdout).expect("json");
    assert_eq!(v["changed"], serde_json::json!([]));
}

/// `through = "vip"` checks on IPIP and GUE services: web4/web6 check through the VIP (the
/// check is encapsulated to its backend as client traffic is), plain4 checks each backend's own
/// address. Without its decapsulator b2 fails the first two and passes the third; with it back
/// it recovers.
#[test]
fn a_check_through_the_vip_fails_without_the_decapsulator_while_a_plain_check_passes() {
    use lb_tests::{
        servers::{Reply, Responder},
        wait_until,
    };
    const PLAIN_PORT: u16 = 8081;
    let mut net = Routed::new().expect("topology");
    let both = [IpAddr::V4(VIP4), IpAddr::V6(VIP6)];
    for i in 0..BACKENDS as usize {
        let out = net.backend_host(i, false, "setup", &both);
        assert!(
            out.status.success(),
            "setup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    net.start_servers();
    let _plain: Vec<Responder> = (1..=BACKENDS)
        .map(|i| {
            let own: IpAddr = format!("10.83.{i}.2").parse().expect("address");
            Responder::start(
                &net.backends[i as usize - 1],
                &[SocketAddr::new(own, PLAIN_PORT)],
                Reply::Http(200, "ok".into()),
                None,
            )
        })
        .collect();
    net.wait_dad();
    let checks = "kind = \"tcp\"\ninterval = 0.2\ntimeout = 0.2\nfast_interval = 0.2\nerror_threshold = 2\nrecovery_threshold = 2\n";
    for mode in ["ipip", "gue"] {
        let (instance, run_dir) = Daemon::new_paths();
        let mut text = format!(
            "[daemon]\ninstance = \"{instance}\"\ninterfaces = [\"eth0\"]\nxdp_mode = \"native\"\nrun_dir = \"{}\"\n",
            run_dir.display()
        );
        for (name, vip, port, through) in [
            ("web4", IpAddr::V4(VIP4), PORT, true),
            ("web6", IpAddr::V6(VIP6), PORT, true),
            ("plain4", IpAddr::V4(VIP4), PLAIN_PORT, false),
        ] {
            text.push_str(&format!(
                "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {port}\nprotocol = \"tcp\"\nforwarding = \"{mode}\"\n\n[service.health]\n{checks}{}",
                if through { "through = \"vip\"\n" } else { "" }
            ));
            for i in 1..=BACKENDS {
                let addr = if vip.is_ipv4() {
                    format!("10.83.{i}.2")
                } else {
                    format!("fd83:{i}::2")
                };
                text.push_str(&format!(
                    "\n[[service.backend]]\nid = \"b{i}\"\naddress = \"{addr}\"\nweight = 100\n"
                ));
            }
        }
        let d = Daemon::start_in(&net.lb, &instance, &run_dir, &text).expect("daemon");
        let health = |s: &str, id: &str| d.health_of(s, id);
        let up = |s: &str, id: &str| health(s, id)["state"] == "up";
        let passing =
            |s: &str, id: &str| up(s, id) && health(s, id)["check"]["consecutive_ok"].as_u64() >= Some(5);
        let services = ["web4", "web6", "plain4"];
        assert!(
            wait_until(Duration::from_secs(15), || services
                .iter()
                .all(|s| ["b1", "b2"].iter().all(|id| passing(s, id)))),
            "{mode}: checks did not all pass: {}\n{}\n{}",
            d.json(&["health"]),
            d.json(&["stats"])["counters"],
            d.log()
        );
        let plain_failed = health("plain4", "b2")["check"]["failed"].clone();
        let out = net.backends[1]
            .command(lb_bin())
            .args(["backend-host", "teardown", "--interface", "eth0"])
            .output()
            .expect("teardown");
        assert!(
            out.status.success(),
            "teardown: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let start = std::time::Instant::now();
        assert!(
            wait_until(Duration::from_secs(3), || !up("web4", "b2") && !up("web6", "b2")),
            "{mode}: b2 without its decapsulator stayed up through the VIP: {}",
            d.json(&["health"])
        );
        println!(
            "{mode}: b2 without its decapsulator down after {} ms",
            start.elapsed().as_millis()
        );
        assert!(
            up("web4", "b1") && up("web6", "b1"),
            "{mode}: {}",
            d.json(&["health"])
        );
        assert!(up("plain4", "b2"), "{mode}: {}", health("plain4", "b2"));
        assert_eq!(
            health("plain4", "b2")["check"]["failed"],
            plain_failed,
            "{mode}: the plain check kept passing"
        );
        let out = net.backend_host(1, false, "setup", &both);
        assert!(
            out.status.success(),
            "setup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            wait_until(Duration::from_secs(3), || up("web4", "b2") && up("web6", "b2")),
            "{mode}: b2 did not come back: {}",
            d.json(&["health"])
        );
        drop(d);
    }
}
