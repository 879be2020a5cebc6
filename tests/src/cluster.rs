//! The tier lab: a client namespace with many source addresses, a router namespace running
//! BIRD 2 with ECMP over the balancer nodes it learns by BGP, the nodes (each an `lb daemon`
//! announcing the VIP through its own BIRD), and backends on the nodes' L2 segment answering
//! the client directly (DSR). Everything it starts (namespaces, BIRDs, daemons) goes on drop.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{
    netns::NetNs,
    servers::Servers,
    topology::{Daemon, PORT, VIP4, VIP6, attach_pass, join},
    wait_until,
};

pub const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
pub const ROUTER_AS: u32 = 65000;
pub const NODE_AS: u32 = 65001;
/// Each backend also listens on its own address at this port, for health checks that one node
/// alone can be kept from (`Lab::block_checks`).
pub const CHECK_PORT: u16 = 8081;
/// Client sources are 10.97.x.y, routed to the client by the router.
const CLIENT_LINK: &str = "10.98.0";

pub struct Node {
    pub name: String,
    pub addr: Ipv4Addr,
    pub ns: NetNs,
    pub daemon: Option<Daemon>,
    /// The bridge port's pass program (so XDP_TX frames reach the bridge).
    _pass: aya::Ebpf,
}

pub struct Lab {
    // Drop order: daemons (their BIRDs), the router's BIRD, servers, then the namespaces.
    pub nodes: Vec<Node>,
    router_bird: RouterBird,
    _servers: Vec<Servers>,
    pub backends: Vec<(String, Ipv4Addr, NetNs)>,
    pub client: NetNs,
    pub router: NetNs,
    pub switch: NetNs,
    pub sources: Vec<Ipv4Addr>,
    next_port: u32,
    /// The sessions run BFD.
    bfd: bool,
    /// Nodes started from here on also peer with the router over IPv6 (`ROUTER6`) and serve
    /// `web6` on VIP6, announced over that session.
    pub v6: bool,
}

/// The router's address on the fabric for IPv6 sessions; node `i` is fd99::{2 + i}.
pub const ROUTER6: &str = "fd99::1";

/// The router's BIRD: its files in a directory of their own; stopped on drop.
struct RouterBird {
    dir: PathBuf,
}

impl RouterBird {
    fn sock(&self) -> PathBuf {
        self.dir.join("bird.ctl")
    }
}

impl Drop for RouterBird {
    fn drop(&mut self) {
        let paths = lb_userspace::bgp::bird::Paths {
            config: self.dir.join("bird.conf"),
            socket: self.sock(),
            pid: self.dir.join("bird.pid"),
            log: self.dir.join("bird.log"),
        };
        let _ = lb_userspace::bgp::bird::stop(&paths);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The router's config: a session to each node, ECMP over the routes they announce into the
/// kernel, BFD where `bfd` is set.
fn router_config(nodes: &[Ipv4Addr], bfd: bool) -> String {
    let mut c = format!(
        "router id {ROUTER};\nprotocol device {{ scan time 10; }}\n\
         protocol kernel k4 {{ ipv4 {{ import none; export all; }}; merge paths on; }}\n\
         protocol kernel k6 {{ ipv6 {{ import none; export all; }}; merge paths on; }}\n"
    );
    // A session over IPv6 to every node too; it comes up only for a node that peers back
    // (`Lab::v6`).
    for i in 0..nodes.len() {
        c.push_str(&format!(
            "protocol bgp node{i}v6 {{ local {ROUTER6} as {ROUTER_AS}; neighbor fd99::{} as {NODE_AS}; \
             hold time 3; keepalive time 1; connect retry time 1; error wait time 1, 5; \
             ipv6 {{ import all; export none; }}; }}\n",
            2 + i
        ));
    }
    if bfd {
        c.push_str("protocol bfd { interface \"*\" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }; }\n");
    }
    for (i, n) in nodes.iter().enumerate() {
        c.push_str(&format!(
            "protocol bgp node{i} {{ local {ROUTER} as {ROUTER_AS}; neighbor {n} as {NODE_AS}; \
             hold time 3; keepalive time 1; connect retry time 1; error wait time 1, 5;{} \
             ipv4 {{ import all; export none; }}; }}\n",
            if bfd { " bfd on;" } else { "" }
        ));
    }
    c
}

impl Lab {
    /// The lab with `nodes` balancer nodes (their daemons not started) and `backends`
    /// backends, and `sources` client addresses.
    pub fn new(nodes: usize, backends: usize, sources: usize, bfd: bool) -> Result<Self> {
        let switch = NetNs::new("csw")?;
        switch.sh("ip link add br0 type bridge && ip link set br0 up")?;
        let client = NetNs::new("ccl")?;
        let router = NetNs::new("crt")?;
        let mut next_port = 0;
        // The router: on the fabric, and on its own link to the client.
        join(&switch, &mut next_port, &router, &ROUTER.to_string(), "fd99::1")?;
        client.veth("eth0", &router, "cl0")?;
        router.sh(&format!(
            "ip addr add {CLIENT_LINK}.1/24 dev cl0 && ip route add 10.97.0.0/16 via {CLIENT_LINK}.2 && \
             sysctl -qw net.ipv4.ip_forward=1 net.ipv4.fib_multipath_hash_policy=1 \
             net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 net.ipv4.conf.eth0.rp_filter=0"
        ))?;
        let sources: Vec<Ipv4Addr> = (0..sources)
            .map(|i| Ipv4Addr::new(10, 97, (i / 250) as u8, (i % 250 + 1) as u8))
            .collect();
        let mut script = format!(
            "ip addr add {CLIENT_LINK}.2/24 dev eth0 && ip route add default via {CLIENT_LINK}.1 && \
             ethtool -K eth0 tx off >/dev/null"
        );
        for s in &sources {
            script.push_str(&format!(" && ip addr add {s}/32 dev lo"));
        }
        client.sh(&script)?;
        let mut lab_backends = Vec::new();
        let mut servers = Vec::new();
        for i in 0..backends {
            let id = format!("b{}", i + 1);
            let addr = Ipv4Addr::new(10, 99, 0, 11 + i as u8);
            let ns = NetNs::new(&id)?;
            join(
                &switch,
                &mut next_port,
                &ns,
                &addr.to_string(),
                &format!("fd99::{}", 11 + i),
            )?;
            ns.sh(&format!(
                "ip addr add {VIP4}/32 dev lo && ip route add default via {ROUTER} && \
                 sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2 && \
                 ethtool -K eth0 tx off >/dev/null"
            ))?;
            servers.push(Servers::start(
                &ns,
                &id,
                &[
                    SocketAddr::new(IpAddr::V4(VIP4), PORT),
                    SocketAddr::new(IpAddr::V4(addr), CHECK_PORT),
                ],
            ));
            lab_backends.push((id, addr, ns));
        }
        let mut lab_nodes = Vec::new();
        for i in 0..nodes {
            let name = format!("n{}", i + 1);
            let addr = Ipv4Addr::new(10, 99, 0, 2 + i as u8);
            let ns = NetNs::new(&name)?;
            join(
                &switch,
                &mut next_port,
                &ns,
                &addr.to_string(),
                &format!("fd99::{}", 2 + i),
            )?;
            ns.sh("sysctl -qw net.ipv4.ip_forward=0 && ethtool -K eth0 tx off >/dev/null")?;
            let pass = attach_pass(&switch, &format!("p{}", next_port - 1))?;
            lab_nodes.push(Node {
                name,
                addr,
                ns,
                daemon: None,
                _pass: pass,
            });
        }
        let dir = std::env::temp_dir().join(format!("{}-router", router.name));
        std::fs::create_dir_all(&dir)?;
        let router_bird = RouterBird { dir };
        let node_addrs: Vec<Ipv4Addr> = lab_nodes.iter().map(|n| n.addr).collect();
        std::fs::write(router_bird.dir.join("bird.conf"), router_config(&node_addrs, bfd))?;
        let out = router
            .command("bird")
            .arg("-c")
            .arg(router_bird.dir.join("bird.conf"))
            .arg("-s")
            .arg(router_bird.sock())
            .arg("-P")
            .arg(router_bird.dir.join("bird.pid"))
            .output()
            .context("start the router's BIRD (apt install bird2)")?;
        if !out.status.success() {
            bail!("router BIRD: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Self {
            nodes: lab_nodes,
            router_bird,
            _servers: servers,
            backends: lab_backends,
            client,
            router,
            switch,
            sources,
            next_port,
            bfd,
            v6: false,
        })
    }

    /// A node's daemon config: the VIP on every backend, by DSR, announced to the router.
    pub fn node_config(&self, instance: &str, run_dir: &std::path::Path, extra_bgp: &str) -> String {
        let peer6 = if self.v6 {
            format!("[[daemon.bgp.peer]]\naddress = \"{ROUTER6}\"\nas = {ROUTER_AS}\n")
        } else {
            String::new()
        };
        let mut c = format!(
            "[daemon]\ninstance = \"{instance}\"\ninterfaces = [\"eth0\"]\nxdp_mode = \"native\"\n\
             run_dir = \"{}\"\nconntrack_size = 65536\ntable_pool_slots = 1048576\nneighbour_refresh_ms = 500\n\
             [daemon.bgp]\nlocal_as = {NODE_AS}\nhold_time = 3\n{extra_bgp}\n\
             [[daemon.bgp.peer]]\naddress = \"{ROUTER}\"\nas = {ROUTER_AS}\nbfd = {}\n{peer6}\n\
             [[service]]\nname = \"web\"\nvip = \"{VIP4}\"\nport = {PORT}\nprotocol = \"tcp\"\ntable_size = 4093\n",
            run_dir.display(),
            self.bfd
        );
        for (id, addr, _) in &self.backends {
            c.push_str(&format!(
                "[[service.backend]]\nid = \"{id}\"\naddress = \"{addr}\"\n"
            ));
        }
        if self.v6 {
            c.push_str(&format!(
                "\n[[service]]\nname = \"web6\"\nvip = \"{VIP6}\"\nport = {PORT}\nprotocol = \"tcp\"\ntable_size = 4093\n"
            ));
            for (i, (id, _, _)) in self.backends.iter().enumerate() {
                c.push_str(&format!(
                    "[[service.backend]]\nid = \"{id}\"\naddress = \"fd99::{}\"\n",
                    11 + i
                ));
            }
        }
        c
    }

    /// Starts node `i`'s daemon with `node_config`; waits until its backends are in its tables.
    pub fn start_node(&mut self, i: usize) -> Result<()> {
        let (instance, run_dir) = Daemon::new_paths();
        let config = self.node_config(&instance, &run_dir, "");
        let d = Daemon::start_in(&self.nodes[i].ns, &instance, &run_dir, &config)?;
        d.wait_all_in_tables();
        self.nodes[i].daemon = Some(d);
        Ok(())
    }

    pub fn daemon(&self, i: usize) -> &Daemon {
        self.nodes[i].daemon.as_ref().expect("node started")
    }

    /// The router's next hops for the VIP, as its kernel has them.
    pub fn next_hops(&self) -> Vec<Ipv4Addr> {
        let mut hops: Vec<Ipv4Addr> = self
            .vias(&format!("-4 route show {VIP4}/32"))
            .iter()
            .filter_map(|v| v.parse().ok())
            .collect();
        hops.sort();
        hops
    }

    /// How many next hops the router's kernel has for VIP6 (learnt over the IPv6 sessions;
    /// the addresses may be the nodes' link-local ones, so only counted).
    pub fn next_hops6(&self) -> usize {
        self.vias(&format!("-6 route show {VIP6}/128")).len()
    }

    /// The distinct `via` addresses of `ip ARGS` in the router.
    fn vias(&self, args: &str) -> Vec<String> {
        let out = self.router.sh(&format!("ip {args}")).unwrap_or_default();
        let mut hops: Vec<String> = out
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "via")
            .map(|w| w[1].to_string())
            .collect();
        hops.sort();
        hops.dedup();
        hops
    }

    /// Waits (bounded) until the router's next hops for the VIP are exactly `want`.
    pub fn wait_next_hops(&self, want: &[Ipv4Addr], bound: Duration) -> bool {
        let mut want = want.to_vec();
        want.sort();
        wait_until(bound, || self.next_hops() == want)
    }

    /// `birdc show protocols` on the router, for failure messages.
    pub fn router_protocols(&self) -> String {
        Command::new("birdc")
            .arg("-s")
            .arg(self.router_bird.sock())
            .args(["show", "protocols"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// How many ports of the fabric bridge this lab uses (for a node added later).
    pub fn ports(&self) -> u32 {
        self.next_port
    }
}

/// A real etcd server in the lab's router namespace, answering on the fabric at
/// `ROUTER:2379` (or in any namespace, `start_in`); its data in a directory of its own.
/// Stopped (and its data removed) on drop.
pub struct Etcd {
    child: Option<std::process::Child>,
    dir: PathBuf,
    /// Its client URL.
    pub url: String,
    addr: Ipv4Addr,
    tls: Option<EtcdTls>,
}

/// etcd's side of TLS: its certificate and key (PEM), and the CA its clients' certificates
/// must chain to (`--client-cert-auth`).
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

pub const ETCD: &str = "http://10.99.0.1:2379";

impl Etcd {
    pub fn start(lab: &Lab) -> Result<Self> {
        Self::start_in(&lab.router, ROUTER)
    }

    /// An etcd in `ns`, answering on `addr`:2379.
    pub fn start_in(ns: &NetNs, addr: Ipv4Addr) -> Result<Self> {
        Self::start_with(ns, addr, None)
    }

    /// An etcd in `ns` answering on `https://addr:2379` only to clients with a certificate
    /// of `tls.client_ca`.
    pub fn start_tls_in(ns: &NetNs, addr: Ipv4Addr, tls: EtcdTls) -> Result<Self> {
        Self::start_with(ns, addr, Some(tls))
    }

    fn start_with(ns: &NetNs, addr: Ipv4Addr, tls: Option<EtcdTls>) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{}-etcd", ns.name));
        std::fs::create_dir_all(&dir)?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut e = Self {
            child: None,
            dir,
            url: format!("{scheme}://{addr}:2379"),
            addr,
            tls,
        };
        e.spawn(ns)?;
        Ok(e)
    }

    fn spawn(&mut self, ns: &NetNs) -> Result<()> {
        let log = std::fs::File::create(self.dir.join("etcd.log"))?;
        let mut etcd = ns.command("etcd");
        if let Some(tls) = &self.tls {
            etcd.arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(&tls.client_ca);
        }
        let child = etcd
            .args(["--name", "lbt", "--data-dir"])
            .arg(self.dir.join("data"))
            .args([
                "--listen-client-urls",
                &self.url,
                "--advertise-client-urls",
                &self.url,
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "lbt=http://127.0.0.1:2380",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .context("start etcd (apt install etcd-server)")?;
        self.child = Some(child);
        let addr = self.addr;
        let up = wait_until(Duration::from_secs(20), || {
            crate::in_ns(ns, || std::net::TcpStream::connect((addr, 2379)).is_ok())
        });
        if !up {
            bail!("etcd did not answer within 20 s: {}", self.log());
        }
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    /// Stops it (its data stays, for `restart`).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self, lab: &Lab) -> Result<()> {
        self.stop();
        self.spawn(&lab.router)
    }

    /// Writes `value` at `key` directly, as a tool other than lb would.
    pub fn put(&self, lab: &Lab, key: &str, value: &[u8]) -> Result<()> {
        self.put_in(&lab.router, key, value, None).map(drop)
    }

    /// Writes `value` at `key` from `ns`, under a fresh lease of `lease_ttl` seconds if given
    /// (never renewed: the key goes when it ends); returns the lease.
    pub fn put_in(&self, ns: &NetNs, key: &str, value: &[u8], lease_ttl: Option<i64>) -> Result<Option<i64>> {
        let url = self.url.clone();
        crate::in_ns(ns, || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| {
                    rt.block_on(async {
                        let mut c = etcd_client::Client::connect([url], None).await?;
                        let lease = match lease_ttl {
                            Some(ttl) => Some(c.lease_grant(ttl, None).await?.id()),
                            None => None,
                        };
                        let options = lease.map(|l| etcd_client::PutOptions::new().with_lease(l));
                        c.put(key, value, options).await?;
                        Ok::<Option<i64>, etcd_client::Error>(lease)
                    })
                    .map_err(anyhow::Error::from)
                })
        })
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Lab {
    /// A node's config in cluster mode: no services of its own, the cluster's from etcd.
    pub fn cluster_node_config(&self, instance: &str, run_dir: &std::path::Path, node: &str) -> String {
        let full = self.node_config(instance, run_dir, "");
        let daemon = full.split("\n[[service]]").next().unwrap_or_default();
        format!("{daemon}\n[cluster]\netcd = [\"{ETCD}\"]\nname = \"edge\"\nnode = \"{node}\"\n")
    }

    /// Starts node `i` in cluster mode as `node`.
    pub fn start_cluster_node(&mut self, i: usize, node: &str) -> Result<()> {
        let (instance, run_dir) = Daemon::new_paths();
        let config = self.cluster_node_config(&instance, &run_dir, node);
        let d = Daemon::start_in(&self.nodes[i].ns, &instance, &run_dir, &config)?;
        self.nodes[i].daemon = Some(d);
        Ok(())
    }

    /// Each registered node's digest of service `web`, as node `from` reads the node keys
    /// ("none" for a node without one).
    pub fn web_digests(&self, from: usize) -> Vec<String> {
        let v = self.daemon(from).json(&["cluster", "status"]);
        v["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| n["digests"]["web"].as_str().unwrap_or("none").to_string())
            .collect()
    }

    /// Node `i`'s BIRD pid, as its pid file says.
    pub fn bird_pid(&self, i: usize) -> String {
        let d = self.daemon(i);
        std::fs::read_to_string(d.run_dir.join(format!("{}.bird.pid", d.instance))).expect("BIRD's pid file")
    }

    /// `lb cluster push` of `text` (a config file) through node `from`: an error with the CLI's
    /// line if refused.
    pub fn push(&self, from: usize, text: &str) -> Result<()> {
        let file = std::env::temp_dir().join(format!("{}-push-{from}.toml", self.router.name));
        std::fs::write(&file, text)?;
        let out = self
            .daemon(from)
            .cli(&["cluster", "push", file.to_str().unwrap_or_default()]);
        let _ = std::fs::remove_file(&file);
        if !out.status.success() {
            bail!("cluster push: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// The lab's services as a config file for `lb cluster push`.
    pub fn services_file(&self) -> String {
        let full = self.node_config("x", std::path::Path::new("/tmp"), "");
        let services = full.split("\n[[service]]").nth(1).unwrap_or_default();
        format!("[daemon]\ninterfaces = [\"eth0\"]\n\n[[service]]{services}")
    }

    /// As `services_file` with only the first `backends` backends, and `health` (the lines of
    /// a `[service.health]` table) appended.
    pub fn services_file_with(&self, backends: usize, health: &str) -> String {
        let file = self.services_file();
        let mut parts = file.split("[[service.backend]]");
        let mut out = parts.next().unwrap_or_default().to_string();
        for b in parts.take(backends) {
            out.push_str("[[service.backend]]");
            out.push_str(b);
        }
        format!("{out}\n[service.health]\n{health}\n")
    }

    /// Node `node`'s health checks to backend `backend` (index) are dropped on the node's way
    /// out, or let through again: that node alone sees the backend down.
    pub fn block_checks(&self, node: usize, backend: usize, blocked: bool) -> Result<()> {
        let addr = self.backends[backend].1;
        let ns = &self.nodes[node].ns;
        if blocked {
            ns.sh(&format!(
                "nft add table inet lbtest && \
                 nft 'add chain inet lbtest out {{ type filter hook output priority 0; }}' && \
                 nft add rule inet lbtest out ip daddr {addr} tcp dport {CHECK_PORT} drop"
            ))
            .map(drop)
        } else {
            ns.sh("nft delete table inet lbtest").map(drop)
        }
    }
}
