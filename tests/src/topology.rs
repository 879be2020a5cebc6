//! The L2 DSR topology: a switch namespace with a bridge, and a client, the balancer and the
//! backends each joined to it by a veth pair. The client routes the VIPs via the balancer; the
//! backends hold the VIPs on loopback and answer the client directly.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use aya::{
    EbpfLoader,
    programs::{Xdp, XdpMode},
};

use crate::{
    lb_bin,
    netns::{NetNs, in_ns},
    servers::Servers,
    wait_until,
};

pub const VIP4: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0x100, 0, 0, 0, 0, 0, 1);
pub const PORT: u16 = 8080;
const LB4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const LB6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 2);

pub struct Backend {
    pub id: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    pub ns: NetNs,
}

pub struct Topology {
    // Field order is drop order: servers, the pass program, then the namespaces.
    servers: Vec<(String, Servers)>,
    _pass: aya::Ebpf,
    pub backends: Vec<Backend>,
    pub client: NetNs,
    pub lb: NetNs,
    pub switch: NetNs,
    next_port: u32,
    next_host: u8,
}

impl Topology {
    /// Builds the topology with backends `b1..=bN` running their servers.
    pub fn new(backends: usize) -> Result<Self> {
        let switch = NetNs::new("sw")?;
        switch.sh("ip link add br0 type bridge && ip link set br0 up")?;
        let client = NetNs::new("cl")?;
        let lb = NetNs::new("lb")?;
        let mut topo = Self {
            servers: Vec::new(),
            _pass: empty_ebpf()?,
            backends: Vec::new(),
            client,
            lb,
            switch,
            next_port: 0,
            next_host: 11,
        };
        join(
            &topo.switch,
            &mut topo.next_port,
            &topo.client,
            "10.99.0.1",
            "fd99::1",
        )?;
        join(
            &topo.switch,
            &mut topo.next_port,
            &topo.lb,
            "10.99.0.2",
            "fd99::2",
        )?;
        let lb_port = format!("p{}", topo.next_port - 1);
        // Senders use partial checksums on veth; XDP_TX frames would leave with them unfilled.
        topo.client.sh(&format!(
            "ethtool -K eth0 tx off >/dev/null && ip route add {VIP4}/32 via {LB4} && ip -6 route add {VIP6}/128 via {LB6}"
        ))?;
        topo.lb.sh("sysctl -qw net.ipv4.ip_forward=0")?;
        topo._pass = attach_pass(&topo.switch, &lb_port)?;
        for i in 1..=backends {
            topo.add_backend(&format!("b{i}"))?;
        }
        Ok(topo)
    }

    /// Takes the pass program off the balancer's switch port, as a new operator's lab would
    /// have it: the kernel then drops every frame the balancer sends back out (XDP_TX).
    pub fn detach_pass(&mut self) -> Result<()> {
        self._pass = empty_ebpf()?;
        Ok(())
    }

    /// Adds a backend namespace with the VIPs on loopback and its servers running.
    pub fn add_backend(&mut self, id: &str) -> Result<&Backend> {
        let host = self.next_host;
        self.next_host += 1;
        let ns = NetNs::new(id)?;
        let v4 = Ipv4Addr::new(10, 99, 0, host);
        let v6 = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, host as u16);
        join(
            &self.switch,
            &mut self.next_port,
            &ns,
            &v4.to_string(),
            &v6.to_string(),
        )?;
        ns.sh(&format!(
            "ip addr add {VIP4}/32 dev lo && ip addr add {VIP6}/128 dev lo nodad && \
             sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2 && \
             ethtool -K eth0 tx off >/dev/null"
        ))?;
        let servers = Servers::start(&ns, id, &vip_addrs());
        self.servers.push((id.to_string(), servers));
        self.backends.push(Backend {
            id: id.to_string(),
            v4,
            v6,
            ns,
        });
        Ok(self.backends.last().expect("just pushed"))
    }

    /// Another client namespace on the switch at `v4`/`v6` (host addresses of the switch's
    /// subnets, below the backends'), routing the VIPs via the balancer.
    pub fn add_client(&mut self, name: &str, v4: &str, v6: &str) -> Result<NetNs> {
        let ns = NetNs::new(name)?;
        join(&self.switch, &mut self.next_port, &ns, v4, v6)?;
        ns.sh(&format!(
            "ethtool -K eth0 tx off >/dev/null && ip route add {VIP4}/32 via {LB4} && ip -6 route add {VIP6}/128 via {LB6}"
        ))?;
        Ok(ns)
    }

    /// Stops a backend's servers: its sockets close, new connections are refused.
    pub fn stop_servers(&mut self, id: &str) {
        self.servers.retain(|(b, _)| b != id);
    }

    /// Starts a backend's servers again.
    pub fn start_servers(&mut self, id: &str) {
        let servers = Servers::start(&self.backend(id).ns, id, &vip_addrs());
        self.servers.push((id.to_string(), servers));
    }

    pub fn backend(&self, id: &str) -> &Backend {
        self.backends.iter().find(|b| b.id == id).expect("known backend")
    }

    /// A config for the daemon with one TCP and one UDP service per family on the given backends.
    pub fn config(&self, instance: &str, run_dir: &std::path::Path, backends: &[&str]) -> String {
        let mut text = format!(
            "[daemon]\ninstance = \"{instance}\"\ninterfaces = [\"eth0\"]\nxdp_mode = \"native\"\nrun_dir = \"{}\"\nconntrack_size = 65536\ntable_pool_slots = 1048576\nneighbour_refresh_ms = 500\n",
            run_dir.display()
        );
        let members: Vec<_> = backends
            .iter()
            .map(|id| {
                let b = self.backend(id);
                (id.to_string(), IpAddr::V4(b.v4), IpAddr::V6(b.v6))
            })
            .collect();
        text.push_str(&four_services("dsr", &members));
        text
    }
}

/// The `[[service]]` sections of one TCP and one UDP service per family on VIP4/VIP6 at PORT,
/// forwarded by `mode`, each with every backend of `backends` (id, IPv4 address, IPv6 address).
pub fn four_services(mode: &str, backends: &[(String, IpAddr, IpAddr)]) -> String {
    let mut text = String::new();
    for (name, vip, proto) in [
        ("web4", IpAddr::V4(VIP4), "tcp"),
        ("dns4", IpAddr::V4(VIP4), "udp"),
        ("web6", IpAddr::V6(VIP6), "tcp"),
        ("dns6", IpAddr::V6(VIP6), "udp"),
    ] {
        text.push_str(&format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {PORT}\nprotocol = \"{proto}\"\nforwarding = \"{mode}\"\n"
        ));
        for (id, v4, v6) in backends {
            let addr = if vip.is_ipv4() { v4 } else { v6 };
            text.push_str(&format!(
                "\n[[service.backend]]\nid = \"{id}\"\naddress = \"{addr}\"\nweight = 100\n"
            ));
        }
    }
    text
}

/// Where the backends' servers listen: the VIPs at PORT.
fn vip_addrs() -> [SocketAddr; 2] {
    [
        SocketAddr::new(IpAddr::V4(VIP4), PORT),
        SocketAddr::new(IpAddr::V6(VIP6), PORT),
    ]
}

/// Joins `ns` to the switch: `eth0` inside, port `p<N>` on the bridge.
pub fn join(switch: &NetNs, next_port: &mut u32, ns: &NetNs, v4: &str, v6: &str) -> Result<()> {
    let port = format!("p{next_port}");
    *next_port += 1;
    switch.sh(&format!(
        "ip link add {port} type veth peer name eth0 netns {} && ip link set {port} master br0 up",
        ns.name
    ))?;
    ns.sh(&format!(
        "ip addr add {v4}/24 dev eth0 && ip addr add {v6}/64 dev eth0 nodad && ip link set eth0 up"
    ))?;
    Ok(())
}

/// Attaches the pass program in `ns` to a veth so it receives the frames the balancer sends it
/// (a veth takes XDP_TX/redirected frames only when it runs XDP itself). Detached on drop.
pub fn attach_pass(ns: &NetNs, port: &str) -> Result<aya::Ebpf> {
    let port = port.to_string();
    in_ns(ns, move || -> Result<aya::Ebpf> {
        let mut ebpf = empty_ebpf()?;
        let prog: &mut Xdp = ebpf
            .program_mut(lb_common::maps::PROG_PASS)
            .context("xdp_pass missing")?
            .try_into()?;
        prog.load()?;
        prog.attach(&port, XdpMode::Driver)
            .with_context(|| format!("attach xdp_pass to {port}"))?;
        Ok(ebpf)
    })
}

/// Routed backends for IPIP: 10.60.0.0/24 and fd60::/64 behind a router (10.50.0.2, fd50::2)
/// on `lbt-e`, a route with a 100-byte MTU to 10.61.0.0/24, and an on-link address (10.50.0.7)
/// with no neighbour entry, in the calling thread's namespace. Returns lbt-e's ifindex.
pub fn ipip_routes() -> Result<u32> {
    let script = "ip link add lbt-e type veth peer name lbt-f && ip link set lbt-e address 02:00:00:00:00:1b && \
        ip link set lbt-e up && ip link set lbt-f up && \
        ip addr add 10.50.0.1/24 dev lbt-e && ip addr add fd50::1/64 dev lbt-e nodad && \
        ip neigh add 10.50.0.2 lladdr 02:00:00:00:00:50 dev lbt-e nud permanent && \
        ip neigh add fd50::2 lladdr 02:00:00:00:00:50 dev lbt-e nud permanent && \
        ip route add 10.60.0.0/24 via 10.50.0.2 && ip -6 route add fd60::/64 via fd50::2 && \
        ip route add 10.61.0.0/24 via 10.50.0.2 mtu lock 100 && \
        ip -6 route add fd61::/64 via fd50::2 mtu lock 1280 && \
        sysctl -qw net.ipv4.conf.all.forwarding=1 net.ipv4.conf.lo.forwarding=1 net.ipv6.conf.all.forwarding=1";
    crate::netns::run(std::process::Command::new("sh").args(["-c", script]))?;
    let name = std::ffi::CString::new("lbt-e")?;
    // SAFETY: valid C string; resolved in this thread's namespace.
    Ok(unsafe { libc::if_nametoindex(name.as_ptr()) })
}

static PIN_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Loads the object with its maps pinned in a private directory that is removed at once, so
/// nothing is left in /sys/fs/bpf.
pub fn empty_ebpf() -> Result<aya::Ebpf> {
    load_object(lb_userspace::EBPF_OBJECT)
}

/// Loads any of our objects with its pinned maps in a private directory removed at once.
pub fn load_object(object: &[u8]) -> Result<aya::Ebpf> {
    let dir = PathBuf::from(format!(
        "/sys/fs/bpf/lbt-{}-{}",
        std::process::id(),
        PIN_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    let loaded = EbpfLoader::new().default_map_pin_directory(&dir).load(object);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(loaded?)
}

static DAEMON_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The unit file the daemon ships with.
pub fn unit_file() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/lb.service")
}

/// The capabilities the unit grants (its `CapabilityBoundingSet=`), as setpriv names them.
pub fn unit_capabilities() -> Result<Vec<String>> {
    let text = std::fs::read_to_string(unit_file())?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .context("no CapabilityBoundingSet= in the unit")?;
    Ok(line
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect())
}

/// A command line, to which the daemon's own is appended, that runs it in `ns` as the unit
/// does: only the unit's capabilities (its bounding set; none inheritable or ambient), with
/// no_new_privs, and /proc/sys read-only but for /proc/sys/net (ProtectKernelTunables with
/// ReadWritePaths=/proc/sys/net), in a mount namespace of its own. The daemon's pid stays the
/// one spawned: unshare, sh and setpriv each exec the next.
fn as_the_unit_runs_it(ns: &NetNs) -> Result<std::process::Command> {
    let caps = unit_capabilities()?;
    let bounding = format!(
        "-all,{}",
        caps.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(",")
    );
    let mut cmd = ns.command("unshare");
    cmd.args([
        "--mount",
        "sh",
        "-c",
        "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys /proc/sys && \
         mount --bind /proc/sys/net /proc/sys/net && mount -o remount,bind,rw /proc/sys/net /proc/sys/net && \
         exec setpriv --bounding-set=\"$0\" --inh-caps=-all --ambient-caps=-all --no-new-privs -- \"$@\"",
        &bounding,
    ]);
    Ok(cmd)
}

/// The daemon running in the balancer namespace. Drop stops it and detaches its instance.
pub struct Daemon {
    child: Option<Child>,
    pub instance: String,
    pub run_dir: PathBuf,
    pub config: PathBuf,
    /// `FAILPOINTS` for every start of this daemon (restarts included), if set.
    failpoints: Option<String>,
    /// The `lb` binary it runs (and `cli` runs): `lb_bin()` unless an upgrade test changed it.
    bin: PathBuf,
}

impl Daemon {
    pub fn new_paths() -> (String, PathBuf) {
        let n = DAEMON_COUNTER.fetch_add(1, Ordering::Relaxed);
        let instance = format!("lbt{}n{n}", std::process::id());
        let run_dir = std::env::temp_dir().join(format!("{instance}-run"));
        (instance, run_dir)
    }

    /// Writes `config` and starts the daemon; waits (bounded) until its socket answers.
    pub fn start(topo: &Topology, instance: &str, run_dir: &std::path::Path, config: &str) -> Result<Self> {
        Self::start_in(&topo.lb, instance, run_dir, config)
    }

    /// As `start`, in any namespace.
    pub fn start_in(ns: &NetNs, instance: &str, run_dir: &std::path::Path, config: &str) -> Result<Self> {
        Self::start_with_failpoints(ns, instance, run_dir, config, None)
    }

    /// As `start_in`, with the daemon's failpoints set (`FAILPOINTS`, the `fail` crate's syntax:
    /// `name=actions;...`; see `lb_userspace::failpoints`).
    pub fn start_with_failpoints(
        ns: &NetNs,
        instance: &str,
        run_dir: &std::path::Path,
        config: &str,
        failpoints: Option<&str>,
    ) -> Result<Self> {
        std::fs::create_dir_all(run_dir)?;
        let path = run_dir.join("lb.toml");
        std::fs::write(&path, config)?;
        let mut d = Self {
            child: None,
            instance: instance.into(),
            run_dir: run_dir.into(),
            config: path,
            failpoints: failpoints.map(str::to_string),
            bin: lb_bin(),
        };
        d.spawn(ns)?;
        Ok(d)
    }

    fn spawn(&mut self, ns: &NetNs) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.run_dir.join("daemon.log"))?;
        let mut command = as_the_unit_runs_it(ns)?;
        if let Some(failpoints) = &self.failpoints {
            command.env("FAILPOINTS", failpoints);
        }
        let child = command
            .arg(&self.bin)
            .args(["daemon", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawn lb daemon")?;
        self.child = Some(child);
        let socket = self.run_dir.join(format!("{}.sock", self.instance));
        let ready = wait_until(Duration::from_secs(30), || {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return true;
            }
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
            bail!("daemon exited with {status}: {}", self.log());
        }
        if !ready {
            bail!("daemon did not open its socket within 30 s: {}", self.log());
        }
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.run_dir.join("daemon.log")).unwrap_or_default()
    }

    /// The last `n` lines of the daemon's log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Runs `lb <args>` against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .args(["--instance", &self.instance, "--run-dir"])
            .arg(&self.run_dir)
            .args(args)
            .output()
            .expect("run lb")
    }

    /// `lb <args>`, which must succeed: its output, or one line with what it said.
    pub fn try_cli(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args);
        if !out.status.success() {
            bail!(
                "lb {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// One backend's entry in `lb health SERVICE` (null when it is not there).
    pub fn health_of(&self, service: &str, id: &str) -> serde_json::Value {
        self.json(&["health", service])[0]["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["id"] == id)
            .cloned()
            .unwrap_or_default()
    }

    /// `lb --json <args>`, which must succeed; returns the parsed output.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "lb {args:?} failed: {}\nthe daemon's log ends:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail(30)
        );
        serde_json::from_slice(&out.stdout).expect("json output")
    }

    /// Whether every backend of every service has a next hop and table slots now.
    /// One service's backends as `service list --json` shows them (none if no such service).
    pub fn backends_of(&self, service: &str) -> Vec<serde_json::Value> {
        self.json(&["service", "list"])
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["name"] == service)
            .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// Each backend of `service` and the table slots it owns.
    pub fn table_slots(&self, service: &str) -> std::collections::HashMap<String, u64> {
        self.backends_of(service)
            .into_iter()
            .map(|b| {
                (
                    b["id"].as_str().unwrap_or_default().to_string(),
                    b["table_slots"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    }

    pub fn all_in_tables(&self) -> bool {
        self.json(&["service", "list"])
            .as_array()
            .into_iter()
            .flatten()
            .all(|s| {
                s["backends"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .all(|b| b["resolved"] == true && b["table_slots"].as_u64() > Some(0))
            })
    }

    /// Waits (bounded) until every backend is in its service's table; panics with the daemon's
    /// view and log if not.
    pub fn wait_all_in_tables(&self) {
        let ok = wait_until(Duration::from_secs(15), || self.all_in_tables());
        assert!(
            ok,
            "backends did not resolve: {}\n{}",
            self.json(&["service", "list"]),
            self.log()
        );
    }

    /// SIGKILL, no cleanup: what a crash looks like.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self, topo: &Topology) -> Result<()> {
        self.restart_in(&topo.lb)
    }

    /// SIGKILL, then the same instance started again in `ns` (it adopts its pins).
    /// Waits, at most `timeout`, for the daemon to exit by itself (a crash point, say): its
    /// status, or `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let mut status = None;
        wait_until(timeout, || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        if status.is_some() {
            self.child = None;
        }
        status
    }

    pub fn restart_in(&mut self, ns: &NetNs) -> Result<()> {
        self.kill9();
        self.spawn(ns)
    }

    /// The `lb` binary it runs.
    pub fn bin(&self) -> &std::path::Path {
        &self.bin
    }

    /// SIGKILL, then the same instance started in `ns` from another build's binary `bin` (an
    /// upgrade or a downgrade), which `cli` then runs too.
    pub fn restart_as(&mut self, ns: &NetNs, bin: &std::path::Path) -> Result<()> {
        self.bin = bin.to_path_buf();
        self.restart_in(ns)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        let _ = Command::new(lb_bin())
            .args(["--instance", &self.instance, "--run-dir"])
            .arg(&self.run_dir)
            .arg("detach")
            .output();
        // A BIRD the daemon started but had not yet named in its pid file when it was killed
        // escapes `lb detach`: its command line names the run directory.
        let _ = Command::new("pkill")
            .arg("-f")
            .arg(format!("^bird .*{}/", self.run_dir.display()))
            .output();
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}
