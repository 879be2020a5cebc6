//! A real DNS server for the tests: dnsmasq (Debian's `dnsmasq-base`) in a namespace, serving
//! records from a config of its own, answering on one address. Changing its records restarts
//! it with a new config (dnsmasq reads `srv-host` at start only). Stopped on drop.

use std::{net::Ipv4Addr, path::PathBuf, process::Child, time::Duration};

use anyhow::{Context, Result, bail};

use crate::{netns::NetNs, wait_until};

pub struct Dnsmasq {
    child: Option<Child>,
    dir: PathBuf,
    listen: Ipv4Addr,
}

impl Dnsmasq {
    /// Starts dnsmasq in `ns` on `listen`:53 with `records` (lines of its config: `srv-host=`,
    /// `host-record=`...), authoritative for `svc.example` (an unknown name there is NXDOMAIN),
    /// every answer with a TTL of 1 s.
    pub fn start(ns: &NetNs, listen: Ipv4Addr, records: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{}-dnsmasq", ns.name));
        std::fs::create_dir_all(&dir)?;
        let mut d = Self {
            child: None,
            dir,
            listen,
        };
        d.spawn(ns, records)?;
        Ok(d)
    }

    fn spawn(&mut self, ns: &NetNs, records: &str) -> Result<()> {
        let conf = self.dir.join("dnsmasq.conf");
        std::fs::write(
            &conf,
            format!(
                "no-resolv\nno-hosts\nlisten-address={}\nbind-interfaces\nport=53\nlocal-ttl=1\nlocal=/svc.example/\nlog-facility=-\n{records}\n",
                self.listen
            ),
        )?;
        let log = std::fs::File::create(self.dir.join("dnsmasq.log"))?;
        let child = ns
            .command("dnsmasq")
            .arg("--keep-in-foreground")
            .arg(format!("--conf-file={}", conf.display()))
            .arg(format!("--pid-file={}", self.dir.join("dnsmasq.pid").display()))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .context("start dnsmasq (apt install dnsmasq-base)")?;
        self.child = Some(child);
        let port = format!("{}:53", self.listen);
        let up = wait_until(Duration::from_secs(5), || {
            ns.sh("ss -Hlun").is_ok_and(|o| o.contains(&port))
        });
        if !up {
            bail!("dnsmasq did not listen on {port} within 5 s: {}", self.log());
        }
        Ok(())
    }

    /// Serves `records` from now: dnsmasq restarted with them.
    pub fn serve(&mut self, ns: &NetNs, records: &str) -> Result<()> {
        self.stop();
        self.spawn(ns, records)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dnsmasq.log")).unwrap_or_default()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
