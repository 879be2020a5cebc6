//! `lb backend-host`: on a backend, set up, check or undo what IPIP and GUE forwarding need.
//! No daemon is involved.

use std::net::IpAddr;

use clap::{Args, Subcommand};

use crate::{
    backend_host::{self as host, Prefix, Trust},
    config,
};

#[derive(Subcommand, Debug)]
pub enum BackendHostCmd {
    /// Attach the decapsulator to an interface, put the VIPs on lo, set arp_ignore=1,
    /// arp_announce=2 and a non-strict rp_filter. Idempotent.
    Setup(BackendHostArgs),
    /// Say which of those settings is wrong on a backend that receives traffic but does not
    /// answer. Exits 1 if any is.
    Check(BackendHostArgs),
    /// Detach the decapsulator and remove its pins (VIPs and sysctls are left as they are).
    Teardown {
        /// The interface encapsulated traffic arrives on.
        #[arg(long)]
        interface: String,
    },
}

#[derive(Args, Debug)]
pub struct BackendHostArgs {
    /// The interface encapsulated traffic arrives on.
    #[arg(long)]
    pub interface: String,
    /// A VIP this backend serves (repeatable).
    #[arg(long = "vip", required = true)]
    pub vips: Vec<IpAddr>,
    /// UDP port of GUE encapsulation (the balancer's `gue_port`); 0 accepts IPIP only.
    #[arg(long, default_value_t = config::DEFAULT_GUE_PORT)]
    pub gue_port: u16,
    /// A prefix the balancers' outer sources lie in (repeatable; their `encap_source4/6` with
    /// the per-flow part: /16 and /96). Default: the balancer's defaults, 172.16.0.0/16 and
    /// fd00:4c42::/96. Tunnels from anywhere else are never stripped.
    #[arg(long = "source")]
    pub sources: Vec<Prefix>,
    /// This host's outer address the balancers send to (repeatable). Default: the interface's
    /// addresses. Tunnels to any other address are never stripped.
    #[arg(long = "address")]
    pub addresses: Vec<IpAddr>,
}

/// Runs the verb here; returns the exit code (`check`: 1 if a setting is wrong).
pub fn run(cmd: &BackendHostCmd, json: bool) -> anyhow::Result<i32> {
    match cmd {
        BackendHostCmd::Setup(a) => {
            let trust = Trust::new(&a.sources, &a.addresses);
            let changed = host::setup(&a.interface, &a.vips, a.gue_port, &trust)?;
            if json {
                println!("{}", serde_json::json!({ "changed": changed }));
            } else if changed.is_empty() {
                println!("{}: already set up", a.interface);
            } else {
                for c in changed {
                    println!("{c}");
                }
            }
            Ok(0)
        }
        BackendHostCmd::Check(a) => {
            let trust = Trust::new(&a.sources, &a.addresses);
            let findings = host::check(&a.interface, &a.vips, a.gue_port, &trust)?;
            let bad = findings.iter().filter(|f| !f.ok).count();
            if json {
                println!("{}", serde_json::json!({ "ok": bad == 0, "findings": findings }));
            } else {
                for f in &findings {
                    match &f.fix {
                        Some(fix) if !f.ok => println!("FAIL {} (fix: {fix})", f.what),
                        _ => println!("{} {}", if f.ok { "ok  " } else { "FAIL" }, f.what),
                    }
                }
            }
            Ok(if bad == 0 { 0 } else { 1 })
        }
        BackendHostCmd::Teardown { interface } => {
            let removed = host::teardown(interface)?;
            if json {
                println!("{}", serde_json::json!({ "removed": removed }));
            } else if removed {
                println!("{interface}: decapsulator detached");
            } else {
                println!("{interface}: no decapsulator was set up");
            }
            Ok(0)
        }
    }
}
