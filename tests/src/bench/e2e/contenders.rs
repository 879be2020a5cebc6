//! The three forwarders, each switched on for its measurements and off (on drop) afterwards.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use super::net::{
    BACKENDS, CLIENT_DEV, FORWARDER_CPU, LB_DEV, PORT, Topology, VIP, backend_ip, lb_backend_dev,
};
use crate::{lb_bin, topology::attach_pass, wait_until};

fn private_dir(what: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("lb-e2e-{}-{what}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

/// Our balancer: `lb daemon` in the balancer namespace, one UDP and one TCP service on
/// VIP:PORT over the 4 backends, attached in native XDP mode. In DSR mode only the client-facing
/// veth has it (replies go through the balancer namespace's kernel); in NAT mode the backend-
/// facing veths too, since replies must be translated, and the client's veth gets a pass
/// program so that it takes the replies the balancer redirects to it.
pub struct Balancer {
    child: Option<Child>,
    instance: String,
    dir: PathBuf,
    _client_pass: Option<aya::Ebpf>,
}

impl Balancer {
    pub fn start(topo: &Topology, nat: bool) -> Result<Self> {
        let instance = format!("e2e{}", std::process::id());
        let dir = private_dir("lb")?;
        let mut interfaces = vec![format!("\"{LB_DEV}\"")];
        if nat {
            interfaces.extend((1..=BACKENDS).map(|i| format!("\"{}\"", lb_backend_dev(i))));
        }
        let mut config = format!(
            "[daemon]\ninstance = \"{instance}\"\ninterfaces = [{}]\nxdp_mode = \"native\"\n\
             run_dir = \"{}\"\nneighbour_refresh_ms = 1000\n\n\
             # One client address makes the whole load: no per-source limit on new connections.\n\
             [daemon.nat]\nmax_new_per_source = 0\n",
            interfaces.join(", "),
            dir.display()
        );
        let forwarding = if nat { "nat" } else { "dsr" };
        for proto in ["udp", "tcp"] {
            config.push_str(&format!(
                "\n[[service]]\nname = \"{proto}\"\nvip = \"{VIP}\"\nport = {PORT}\nprotocol = \"{proto}\"\n\
                 forwarding = \"{forwarding}\"\n"
            ));
            for i in 1..=BACKENDS {
                config.push_str(&format!(
                    "\n[[service.backend]]\nid = \"b{i}\"\naddress = \"{}\"\n",
                    backend_ip(i)
                ));
            }
        }
        let path = dir.join("lb.toml");
        std::fs::write(&path, config).with_context(|| format!("write {}", path.display()))?;
        let log = std::fs::File::create(dir.join("daemon.log")).context("create the daemon log")?;
        let client_pass = if nat {
            Some(attach_pass(&topo.client, CLIENT_DEV)?)
        } else {
            None
        };
        let mut me = Self {
            child: None,
            instance,
            dir,
            _client_pass: client_pass,
        };
        me.child = Some(
            topo.lb
                .command(lb_bin())
                .args(["daemon", "--config"])
                .arg(&path)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("spawn {} daemon", lb_bin().display()))?,
        );
        let socket = me.dir.join(format!("{}.sock", me.instance));
        let up = wait_until(Duration::from_secs(30), || {
            me.exited() || std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        if me.exited() || !up {
            bail!("lb daemon did not come up: {}", me.log());
        }
        // Every backend's next hop (MAC, egress veth) must be resolved before traffic starts.
        let mut last = String::new();
        let resolved = wait_until(Duration::from_secs(10), || {
            match me.cli_json(&["service", "list"]) {
                Ok(v) => {
                    last = v.to_string();
                    let services = v.as_array().cloned().unwrap_or_default();
                    services.len() == 2
                        && services.iter().all(|s| {
                            s["backends"].as_array().is_some_and(|b| {
                                b.len() == BACKENDS && b.iter().all(|b| b["resolved"].as_bool() == Some(true))
                            })
                        })
                }
                Err(e) => {
                    last = format!("{e:#}");
                    false
                }
            }
        });
        if !resolved {
            bail!("lb daemon did not resolve all backends within 10 s: {last}");
        }
        Ok(me)
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(Some(_))))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log"))
            .unwrap_or_default()
            .replace('\n', " | ")
    }

    fn cli(&self) -> Command {
        let mut cmd = Command::new(lb_bin());
        cmd.args(["--instance", &self.instance, "--run-dir"])
            .arg(&self.dir);
        cmd
    }

    fn cli_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let out = self.cli().arg("--json").args(args).output().context("run lb")?;
        if !out.status.success() {
            bail!("lb {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        serde_json::from_slice(&out.stdout).context("parse lb --json output")
    }

    /// Frames the balancer redirected to a backend so far.
    pub fn redirects(&self) -> Result<u64> {
        let stats = self.cli_json(&["stats"])?;
        stats["counters"]["redirect"]
            .as_u64()
            .context("lb stats has no redirect counter")
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The data plane outlives the daemon by design; detach removes XDP and the pins.
        let _ = self.cli().arg("detach").output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const NFT_TABLE: &str = "lb_e2e";

/// The kernel's own path: nftables DNAT in the balancer namespace, round robin per new
/// connection (`numgen inc`; NAT rules only see a flow's first packet), conntrack un-NATs the
/// replies.
pub struct Nftables<'a> {
    topo: &'a Topology,
}

impl<'a> Nftables<'a> {
    pub fn start(topo: &'a Topology) -> Result<Self> {
        let targets: Vec<String> = (1..=BACKENDS)
            .map(|i| format!("{} : {}", i - 1, backend_ip(i)))
            .collect();
        let me = Self { topo };
        topo.lb.sh(&format!(
            "nft add table ip {NFT_TABLE} && \
             nft add chain ip {NFT_TABLE} pre '{{ type nat hook prerouting priority dstnat; policy accept; }}' && \
             nft add rule ip {NFT_TABLE} pre ip daddr {VIP} meta l4proto '{{ tcp, udp }}' th dport {PORT} \
             dnat to numgen inc mod {BACKENDS} map '{{ {} }}'",
            targets.join(", ")
        ))?;
        // The servers close first, so every connection leaves a TIME_WAIT conntrack entry; at
        // the default 120 s the measured connections would fill the table. Linux's own TCP
        // TIME_WAIT already covers the backends; production DNAT boxes shorten this too.
        topo.lb
            .sh("sysctl -qw net.netfilter.nf_conntrack_tcp_timeout_time_wait=1")?;
        Ok(me)
    }
}

impl Drop for Nftables<'_> {
    fn drop(&mut self) {
        let _ = self.topo.lb.sh(&format!("nft delete table ip {NFT_TABLE}"));
    }
}

/// HAProxy in TCP mode on VIP:PORT in the balancer namespace (the VIP is local there only
/// while it runs), one thread pinned to the forwarder CPU, round robin over the backends.
pub struct Haproxy<'a> {
    topo: &'a Topology,
    child: Option<Child>,
    dir: PathBuf,
}

impl<'a> Haproxy<'a> {
    pub fn start(topo: &'a Topology) -> Result<Self> {
        let dir = private_dir("haproxy")?;
        let mut me = Self {
            topo,
            child: None,
            dir,
        };
        let mut cfg = String::from(
            "global\n    nbthread 1\n    maxconn 5000\n\ndefaults\n    mode tcp\n    timeout connect 2s\n    \
             timeout client 5s\n    timeout server 5s\n\n",
        );
        cfg.push_str(&format!(
            "listen e2e\n    bind {VIP}:{PORT}\n    balance roundrobin\n"
        ));
        for i in 1..=BACKENDS {
            cfg.push_str(&format!("    server b{i} {}:{PORT}\n", backend_ip(i)));
        }
        let path = me.dir.join("haproxy.cfg");
        std::fs::write(&path, cfg).with_context(|| format!("write {}", path.display()))?;
        topo.lb.sh(&format!("ip addr add {VIP}/32 dev lo"))?;
        let log = std::fs::File::create(me.dir.join("haproxy.log")).context("create the haproxy log")?;
        me.child = Some(
            topo.lb
                .command("taskset")
                .args(["-c", &FORWARDER_CPU.to_string(), "haproxy", "-db", "-f"])
                .arg(&path)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("spawn haproxy")?,
        );
        let listening = wait_until(Duration::from_secs(10), || {
            matches!(me.child.as_mut().map(|c| c.try_wait()), Some(Ok(Some(_))))
                || me
                    .topo
                    .lb
                    .sh(&format!("ss -Hltn 'sport = :{PORT}'"))
                    .is_ok_and(|s| !s.trim().is_empty())
        });
        if let Some(Ok(Some(status))) = me.child.as_mut().map(|c| c.try_wait()) {
            bail!("haproxy exited with {status}: {}", me.log());
        }
        if !listening {
            bail!("haproxy did not listen on {VIP}:{PORT} within 10 s: {}", me.log());
        }
        Ok(me)
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("haproxy.log"))
            .unwrap_or_default()
            .replace('\n', " | ")
    }
}

impl Drop for Haproxy<'_> {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.topo.lb.sh(&format!("ip addr del {VIP}/32 dev lo"));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
