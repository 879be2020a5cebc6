//! The routed topology shared by every contender, threaded NAPI and CPU pinning.

use std::{fs::File, net::Ipv4Addr, os::fd::AsRawFd, process::Command, thread::JoinHandle};

use anyhow::{Context, Result, bail};

use super::bpf::{Generator, Sink};
use crate::{NetNs, in_ns, netns::run};

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
pub const PORT: u16 = 8080;
pub const BACKENDS: usize = 4;
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 98, 1, 2);
const LB_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 98, 1, 1);
/// Interface names are unique to this bench, so that their `napi/<dev>-<id>` kthreads can be
/// told from others by name (kthread names are global, interface names per namespace).
pub const CLIENT_DEV: &str = "e2c";
/// An idle veth in the client namespace that holds the generator program (see
/// [`Generator::park`]).
const PARKING_DEV: &str = "e2g";
pub const LB_DEV: &str = "e2l";
pub const CLIENT_MAC: [u8; 6] = [0x02, 0xe2, 0, 0, 0, 1];
pub const LB_MAC: [u8; 6] = [0x02, 0xe2, 0, 0, 0, 2];
/// The forwarder's CPU; the generator, the clients, the servers and everything else use CPU 0.
pub const FORWARDER_CPU: usize = 1;
pub const LOAD_CPU: usize = 0;
/// SCHED_FIFO priority of the NAPI threads (that of the kernel's own threaded-IRQ handlers).
const NAPI_PRIORITY: i32 = 50;

pub fn backend_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 98, 10 + i as u8, 2)
}
fn backend_gw(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 98, 10 + i as u8, 1)
}
/// The balancer's interface towards backend `i` (1-based).
pub fn lb_backend_dev(i: usize) -> String {
    format!("e2l{i}")
}
fn backend_dev(i: usize) -> String {
    format!("e2b{i}")
}
fn mac(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Client `cl` -- balancer `lb` -- backends `b1..b4`, one veth pair per link, all routed by the
/// balancer namespace's kernel. Backends hold the VIP on loopback (for DSR) and route
/// everything else, replies included, via the balancer namespace.
pub struct Topology {
    // Field order is drop order: the sink (and its attachments), then the namespaces.
    pub sink: Sink,
    /// Each veth's NAPI kthreads, and whether they belong to the forwarder's side.
    napi: Vec<(String, bool, Vec<i32>)>,
    pub backends: Vec<NetNs>,
    pub client: NetNs,
    pub lb: NetNs,
}

impl Topology {
    pub fn new() -> Result<Self> {
        let lb = NetNs::new("e2lb")?;
        let client = NetNs::new("e2cl")?;
        let mut topo = Self {
            sink: Sink::new(PORT)?,
            napi: Vec::new(),
            backends: Vec::new(),
            client,
            lb,
        };
        let (lb, client) = (&topo.lb, &topo.client);
        lb.sh(&format!(
            "ip link add {LB_DEV} address {} type veth peer name {CLIENT_DEV} address {} netns {} && \
             ip addr add {LB_CLIENT_SIDE}/24 dev {LB_DEV} && ip link set {LB_DEV} up && \
             sysctl -qw net.ipv4.ip_forward=1 net.ipv4.ip_local_port_range='1024 65535'",
            mac(LB_MAC),
            mac(CLIENT_MAC),
            client.name
        ))?;
        client.sh(&format!(
            "ip addr add {CLIENT_IP}/24 dev {CLIENT_DEV} && ip link set {CLIENT_DEV} up && \
             ip route add {VIP}/32 via {LB_CLIENT_SIDE} && \
             sysctl -qw net.ipv4.ip_local_port_range='1024 65535'"
        ))?;
        client.sh(&format!(
            "ip link add {PARKING_DEV} type veth peer name {PARKING_DEV}p"
        ))?;
        for i in 1..=BACKENDS {
            let ns = NetNs::new(&format!("e2b{i}"))?;
            let (lbd, bd) = (lb_backend_dev(i), backend_dev(i));
            lb.sh(&format!(
                "ip link add {lbd} type veth peer name {bd} netns {} && \
                 ip addr add {}/24 dev {lbd} && ip link set {lbd} up",
                ns.name,
                backend_gw(i)
            ))?;
            ns.sh(&format!(
                "ip addr add {}/24 dev {bd} && ip link set {bd} up && ip route add default via {} && \
                 ip addr add {VIP}/32 dev lo && \
                 sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2",
                backend_ip(i),
                backend_gw(i)
            ))?;
            topo.backends.push(ns);
        }
        // NAPI on every veth (a veth without XDP has it only with GRO on), run in kthreads so that
        // receive processing can be pinned; otherwise it runs in softirq on the sender's CPU.
        // Checksum offload (and with it TSO) off everywhere: veth senders leave partial checksums,
        // which frames forwarded by XDP would keep unfilled, and veth hands a TSO-capable
        // sender's forwarded skbs to the peer through netif_rx (softirq on the sending CPU, and
        // no XDP) instead of its NAPI.
        let mut napi = Vec::new();
        for (ns, dev) in topo.all_devs() {
            ns.sh(&format!("ethtool -K {dev} tx off gro on >/dev/null"))?;
            // The kthreads that appear when threading is switched on are this veth's, even if
            // another run of this bench has interfaces of the same name.
            let before = napi_threads(&dev)?;
            set_threaded(ns, &dev)?;
            let mine: Vec<i32> = napi_threads(&dev)?
                .into_iter()
                .filter(|p| !before.contains(p))
                .collect();
            if mine.is_empty() {
                bail!("no napi/{dev}-* kthread appeared when threaded NAPI was enabled on {dev}");
            }
            napi.push((dev, ns.name == topo.lb.name, mine));
        }
        topo.napi = napi;
        for (i, ns) in topo.backends.iter().enumerate() {
            let sink = &mut topo.sink;
            in_ns(ns, || sink.attach(&backend_dev(i + 1)))?;
        }
        topo.pin_napi(false)?;
        Ok(topo)
    }

    /// The UDP generator, parked in the client namespace.
    pub fn generator(&self, frame: Vec<u8>) -> Result<Generator> {
        let mut generator = Generator::new(frame)?;
        in_ns(&self.client, || generator.park(PARKING_DEV))?;
        Ok(generator)
    }

    /// UDP datagrams that reached the backends' own stacks (`Udp: InDatagrams NoPorts InErrors`
    /// of /proc/net/snmp). The sinks take every datagram of the load, so anything here bypassed
    /// them (a veth receiving through netif_rx skips XDP) and would go uncounted.
    pub fn udp_past_sinks(&self) -> Result<u64> {
        let mut total = 0;
        for ns in &self.backends {
            let snmp = ns.sh("cat /proc/net/snmp")?;
            let mut rows = snmp.lines().filter(|l| l.starts_with("Udp: "));
            let (Some(names), Some(values)) = (rows.next(), rows.next()) else {
                bail!("no Udp rows in /proc/net/snmp of {}", ns.name);
            };
            for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
                if matches!(name, "InDatagrams" | "NoPorts" | "InErrors") {
                    total += value.parse::<u64>().unwrap_or(0);
                }
            }
        }
        Ok(total)
    }

    /// Every veth end with its namespace.
    fn all_devs(&self) -> Vec<(&NetNs, String)> {
        let mut v = vec![
            (&self.client, CLIENT_DEV.to_string()),
            (&self.lb, LB_DEV.to_string()),
        ];
        for (i, ns) in self.backends.iter().enumerate() {
            v.push((&self.lb, lb_backend_dev(i + 1)));
            v.push((ns, backend_dev(i + 1)));
        }
        v
    }

    /// Pins the balancer namespace's NAPI threads to the forwarder CPU and the client's and
    /// backends' to the load CPU. With `endpoints_first`, the latter run SCHED_FIFO, taking the
    /// precedence over processes that receive processing has in softirq: the UDP generator
    /// saturates the load CPU, and the backends' receive must still keep up with whatever the
    /// forwarder delivers. Without it (TCP, where the load CPU's processes and receive work
    /// must share it), everything is SCHED_OTHER. Returns the forwarder-side thread ids.
    /// Called before every measurement; fails if a thread went away (the kernel recreates
    /// them only if NAPI is switched off and on, which nothing here should cause).
    pub fn pin_napi(&self, endpoints_first: bool) -> Result<Vec<i32>> {
        let mut forwarder = Vec::new();
        for (dev, forwarder_side, pids) in &self.napi {
            let cpu = if *forwarder_side { FORWARDER_CPU } else { LOAD_CPU };
            for &pid in pids {
                pin(pid, cpu).with_context(|| format!("pin napi/{dev} thread {pid} to CPU {cpu}"))?;
                let (policy, priority) = if endpoints_first && cpu == LOAD_CPU {
                    (libc::SCHED_FIFO, NAPI_PRIORITY)
                } else {
                    (libc::SCHED_OTHER, 0)
                };
                let param = libc::sched_param {
                    sched_priority: priority,
                };
                // SAFETY: a valid sched_param for an existing thread.
                if unsafe { libc::sched_setscheduler(pid, policy, &param) } != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("set the scheduling policy of napi/{dev} thread {pid}"));
                }
            }
            if *forwarder_side {
                forwarder.extend(pids);
            }
        }
        Ok(forwarder)
    }
}

/// Threaded NAPI is switched in sysfs, which shows the devices of the namespace that mounted
/// it: `ip netns exec` mounts the namespace's own sysfs in a private mount namespace.
fn set_threaded(ns: &NetNs, dev: &str) -> Result<()> {
    run(Command::new("ip").args([
        "netns",
        "exec",
        &ns.name,
        "sh",
        "-c",
        &format!("echo 1 > /sys/class/net/{dev}/threaded"),
    ]))
    .with_context(|| format!("enable threaded NAPI on {dev}"))?;
    Ok(())
}

/// Kernel threads named `napi/<dev>-<napi id>`.
fn napi_threads(dev: &str) -> Result<Vec<i32>> {
    let prefix = format!("napi/{dev}-");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").context("read /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim_end().starts_with(&prefix) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// Pins a thread (0 = the calling thread) to one CPU.
pub fn pin(tid: i32, cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays within it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
    }
    Ok(())
}

/// Pins the calling thread to the load CPU for the guard's life (threads and processes it
/// starts inherit that), and restores its previous CPU set on drop.
pub struct PinnedSelf {
    saved: libc::cpu_set_t,
}

impl PinnedSelf {
    pub fn to_load_cpu() -> Result<Self> {
        // SAFETY: sched_getaffinity fills the set it is given.
        let saved = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
            }
            set
        };
        pin(0, LOAD_CPU)?;
        Ok(Self { saved })
    }
}

impl Drop for PinnedSelf {
    fn drop(&mut self) {
        // SAFETY: restores a set read by sched_getaffinity.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.saved) };
    }
}

/// Spawns a long-running thread inside `ns` (unlike `in_ns`, which waits for the closure).
pub fn spawn_in_ns<T: Send + 'static>(
    ns: &NetNs,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<JoinHandle<Result<T>>> {
    let file = File::open(ns.path()).with_context(|| format!("open {}", ns.path().display()))?;
    Ok(std::thread::spawn(move || {
        // SAFETY: setns on this thread only.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns");
        }
        f()
    }))
}

/// Looks for a program in PATH (and the sbin directories); a missing one fails with the
/// Debian package that provides it.
pub fn require_tools() -> Result<()> {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs: Vec<&str> = path.split(':').chain(["/usr/sbin", "/sbin"]).collect();
    for (tool, package) in [
        ("ip", "iproute2"),
        ("ethtool", "ethtool"),
        ("nft", "nftables"),
        ("haproxy", "haproxy"),
        ("taskset", "util-linux"),
        ("sysctl", "procps"),
    ] {
        if !dirs.iter().any(|d| std::path::Path::new(d).join(tool).is_file()) {
            bail!(
                "the e2e bench needs `{tool}`: install the Debian package {package} (apt-get install {package})"
            );
        }
    }
    Ok(())
}
