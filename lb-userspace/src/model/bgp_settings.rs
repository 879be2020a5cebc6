//! `[daemon.bgp]`: how this node announces its VIPs to its routers, through BIRD 2. The
//! daemon writes BIRD's config from these and drives it (`bgp`); routers spread flows over the
//! nodes that announce a VIP by ECMP.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

/// `[daemon.bgp]` as written.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BgpSettings {
    pub local_as: u32,
    /// BGP identifier; by default the first IPv4 address of the node's interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_id: Option<Ipv4Addr>,
    /// Seconds without a keepalive before a session is taken down (0: never, else 3..=65535).
    #[serde(default = "default_hold_time")]
    pub hold_time: u16,
    /// The port BIRD listens on for the peers' connections (it also connects out to theirs).
    #[serde(default = "default_port")]
    pub listen_port: u16,
    /// The BIRD 2 daemon and its client.
    #[serde(default = "default_bird")]
    pub bird: PathBuf,
    #[serde(default = "default_birdc")]
    pub birdc: PathBuf,
    #[serde(rename = "peer")]
    pub peers: Vec<BgpPeer>,
}

/// `[[daemon.bgp.peer]]`: a router this node announces to.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BgpPeer {
    pub address: IpAddr,
    #[serde(rename = "as")]
    pub asn: u32,
    /// Bidirectional forwarding detection: the router drops a dead node in under a second.
    #[serde(default)]
    pub bfd: bool,
    /// The peer's BGP port.
    #[serde(default = "default_port")]
    pub port: u16,
}

fn default_hold_time() -> u16 {
    3
}

fn default_port() -> u16 {
    179
}

fn default_bird() -> PathBuf {
    PathBuf::from("bird")
}

fn default_birdc() -> PathBuf {
    PathBuf::from("birdc")
}

/// When a service's VIP is announced (`announce` of a service).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Announce {
    /// While some backend takes new flows.
    #[default]
    Healthy,
    /// Whenever the data plane is attached and the node is not draining.
    Always,
}

impl BgpSettings {
    pub fn validate(&self) -> Result<(), String> {
        if self.local_as == 0 {
            return Err("daemon.bgp.local_as must not be 0".into());
        }
        if self.hold_time != 0 && self.hold_time < 3 {
            return Err(format!(
                "daemon.bgp.hold_time {} is out of range: 0 or 3..=65535 seconds",
                self.hold_time
            ));
        }
        if self.listen_port == 0 {
            return Err("daemon.bgp.listen_port must not be 0".into());
        }
        if self.peers.is_empty() {
            return Err("daemon.bgp needs at least one [[daemon.bgp.peer]]".into());
        }
        let mut seen = HashSet::new();
        for p in &self.peers {
            if p.asn == 0 {
                return Err(format!("daemon.bgp.peer {}: as must not be 0", p.address));
            }
            if p.port == 0 {
                return Err(format!("daemon.bgp.peer {}: port must not be 0", p.address));
            }
            if p.address.is_unspecified() || p.address.is_multicast() || p.address.is_loopback() {
                return Err(format!("daemon.bgp.peer {} is not a router's address", p.address));
            }
            if !seen.insert(p.address) {
                return Err(format!("daemon.bgp.peer {} is listed twice", p.address));
            }
        }
        Ok(())
    }
}
