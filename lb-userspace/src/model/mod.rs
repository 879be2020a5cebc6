//! Services and backends as the user declared them: a domain model with no I/O. The TOML file
//! (`config`), the control protocol (`api`) and the state file (`state`) convert to and from it;
//! the reconciler and the health monitor read only this.

use std::{collections::BTreeMap, collections::HashSet, fmt, net::IpAddr};

use lb_common::maps::MAX_SERVICES;
use serde::{Deserialize, Serialize};

pub mod adaptive_settings;
pub mod bgp_settings;
pub mod cluster_settings;
pub mod discovery_settings;
pub mod geo_settings;
pub mod health_settings;
pub mod resource_settings;

pub use health_settings::HealthSettings;

use crate::{
    error::{Error, Result},
    maglev::{MAX_TABLE_SIZE, is_prime},
};

pub const MAX_WEIGHT: u32 = 10_000;
pub const DEFAULT_WEIGHT: u32 = 100;
pub const MAX_BACKENDS_PER_SERVICE: usize = 4096;

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => lb_common::PROTO_TCP,
            Self::Udp => lb_common::PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

impl std::str::FromStr for Protocol {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            _ => Err(Error::invalid(format!(
                "unknown protocol {s:?} (expected tcp or udp)"
            ))),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum HashMode {
    /// Source and destination address and port, and protocol.
    #[default]
    FiveTuple,
    /// Source address only: a client always lands on the same backend.
    Source,
}

/// How a service picks a new flow's backend (the connection table keeps it there after).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Weighted Maglev hashing (consistent hashing): a flow's hash picks its backend.
    #[default]
    Maglev,
    /// Each backend in turn, per CPU.
    RoundRobin,
    /// Smooth weighted round robin (nginx's): in turn, in proportion to effective weights.
    WeightedRoundRobin,
    /// The backend with the fewest active flows per unit of effective weight.
    LeastConnections,
    /// The less loaded of two backends chosen by two hashes of the flow.
    PowerOfTwo,
    /// Maglev, with weights from the backends' own load (agent `N%`, load reports), smoothed
    /// and moved in bounded steps (`[service.resource]`).
    ResourceAware,
    /// The daemon picks maglev, least-connections or resource-aware from measured signals
    /// (`[service.adaptive]`).
    Adaptive,
    /// The client's region (`[daemon.geo]`) picks a Maglev table of that region's backends, or
    /// of the next region in its failover list.
    Geo,
}

impl Strategy {
    /// What the data plane runs: resource-aware is Maglev over its own weights; adaptive is
    /// whatever it picked (see `ServiceWeights::strategy`), Maglev until it picks.
    pub const fn id(self) -> u32 {
        use lb_common::strategy::*;
        match self {
            Self::Maglev | Self::ResourceAware | Self::Adaptive => STRATEGY_MAGLEV,
            Self::Geo => STRATEGY_GEO,
            Self::RoundRobin => STRATEGY_ROUND_ROBIN,
            Self::WeightedRoundRobin => STRATEGY_WEIGHTED_ROUND_ROBIN,
            Self::LeastConnections => STRATEGY_LEAST_CONNECTIONS,
            Self::PowerOfTwo => STRATEGY_POWER_OF_TWO,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Maglev => "maglev",
            Self::RoundRobin => "round-robin",
            Self::WeightedRoundRobin => "weighted-round-robin",
            Self::LeastConnections => "least-connections",
            Self::PowerOfTwo => "power-of-two",
            Self::ResourceAware => "resource-aware",
            Self::Adaptive => "adaptive",
            Self::Geo => "geo",
        }
    }

    /// The kind of pool region its tables are: resource-aware and adaptive (until it picks)
    /// build Maglev tables.
    pub const fn table(self) -> Self {
        match self {
            Self::ResourceAware | Self::Adaptive | Self::Geo => Self::Maglev,
            s => s,
        }
    }

    /// Whether its tables hash flows (so a lost connection-table entry finds its backend again).
    pub const fn hashes(self) -> bool {
        matches!(self.table(), Self::Maglev)
    }

    /// Whether it counts each backend's active flows.
    pub const fn counts(self) -> bool {
        lb_common::strategy::counts(self.id())
    }

    /// Words per entry of its region: a member's (slot, weight, cap), or one slot.
    pub const fn stride(self) -> usize {
        lb_common::strategy::stride(self.id()) as usize
    }

    pub const ALL: [Self; 8] = [
        Self::Maglev,
        Self::RoundRobin,
        Self::WeightedRoundRobin,
        Self::LeastConnections,
        Self::PowerOfTwo,
        Self::ResourceAware,
        Self::Adaptive,
        Self::Geo,
    ];
}

impl std::str::FromStr for Strategy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|x| x.name() == s).ok_or_else(|| {
            Error::invalid(format!(
                "unknown strategy {s:?} (expected maglev, round-robin, weighted-round-robin, least-connections, power-of-two, resource-aware, adaptive or geo)"
            ))
        })
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Forwarding {
    /// L2 direct server return: rewrite MACs, backend answers the client directly.
    #[default]
    Dsr,
    /// IPIP (IPv4-in-IPv4, IPv6-in-IPv6) to routed backends, which strip it (`lb backend-host
    /// setup`) and answer the client directly.
    Ipip,
    /// As IPIP, inside UDP to `gue_port` (GUE), for networks that filter IP protocols 4 and 41.
    Gue,
    /// NAT for unmodified backends: the destination becomes the backend's address and port,
    /// replies come back through the balancer and leave from the VIP. With `snat = true` the
    /// source becomes the balancer's `daemon.nat` address and port too.
    Nat,
}

impl std::str::FromStr for Forwarding {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "dsr" => Ok(Self::Dsr),
            "ipip" => Ok(Self::Ipip),
            "gue" => Ok(Self::Gue),
            "nat" => Ok(Self::Nat),
            _ => Err(Error::invalid(format!(
                "unknown forwarding mode {s:?} (expected dsr, ipip, gue or nat)"
            ))),
        }
    }
}

impl Forwarding {
    /// Whether backends must be on-link with a resolved MAC (else only a route is needed).
    pub fn needs_l2(self) -> bool {
        matches!(self, Forwarding::Dsr | Forwarding::Nat)
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum FragmentPolicy {
    #[default]
    Pass,
    Hash,
}

impl std::str::FromStr for FragmentPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "pass" => Ok(Self::Pass),
            "hash" => Ok(Self::Hash),
            _ => Err(Error::invalid(format!(
                "unknown fragment policy {s:?} (expected pass or hash)"
            ))),
        }
    }
}

/// A service as declared.
#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    pub name: String,
    pub vip: IpAddr,
    /// 0 = every port of the VIP.
    pub port: u16,
    pub protocol: Protocol,
    pub table_size: u32,
    pub hash: HashMode,
    pub strategy: Strategy,
    pub forwarding: Forwarding,
    pub fragments: FragmentPolicy,
    pub snat: bool,
    /// The VIP may be one of this host's own addresses (see `check_own_addresses`).
    pub allow_own_address: bool,
    /// `[service.health]` as written; each backend's own settings override it key by key.
    pub health: Option<HealthSettings>,
    /// Load shedding: new flows per second the whole service takes (beyond: dropped).
    pub max_new_flows_per_s: Option<u32>,
    /// A new flow over its backend's limit: spilled to the next candidate, or dropped.
    pub on_shed: OnShed,
    /// `[service.resource]`: how load becomes weight (resource-aware, and adaptive's pick).
    pub resource: Option<resource_settings::ResourceSettings>,
    /// `[service.adaptive]`: when an adaptive service switches.
    pub adaptive: Option<adaptive_settings::AdaptiveSettings>,
    /// When this node announces the VIP over BGP (`[daemon.bgp]`).
    pub announce: bgp_settings::Announce,
    /// `[service.discovery]`: the backends come from a registry, not from the file or the API.
    /// Boxed: most services have none, and a service is moved whole in every change.
    pub discovery: Option<Box<discovery_settings::DiscoverySettings>>,
    pub backends: Vec<Backend>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnShed {
    #[default]
    Spill,
    Drop,
}

/// Largest new-flow rate a limit may name.
pub const MAX_NEW_FLOWS_PER_S: u32 = 100_000_000;

/// A backend as declared: where it is, its weight, its metadata. Its status (next hop, health)
/// lives apart, in `status`.
#[derive(Clone, Debug, PartialEq)]
pub struct Backend {
    pub id: String,
    pub address: IpAddr,
    /// The backend's port; in DSR mode packets keep the service port, so this defaults to it.
    pub port: Option<u16>,
    /// 0 drains the backend: no new flows, existing ones stay.
    pub weight: u32,
    pub region: Option<String>,
    pub zone: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// `[service.backend.health]`: overrides of the service's health settings.
    pub health: Option<HealthSettings>,
    /// Load shedding: new flows per second this backend takes.
    pub max_new_flows_per_s: Option<u32>,
    /// Most active flows the counting strategies give it (the agent's `maxconn:N` too: the
    /// lower of the two holds).
    pub maxconn: Option<u32>,
    /// A link-local address is allowed (see `Backend::validate`).
    pub allow_link_local: bool,
}

/// Largest `maxconn`.
pub const MAX_MAXCONN: u32 = 1_000_000_000;

/// Names: 1..=max characters of `[A-Za-z0-9._-]`, but not `.` or `..`: names are URL path
/// segments of the API, where those two mean "this" and "the parent" (a client that
/// normalises `/v1/services/web/instances/..` sends a DELETE of the whole service).
pub fn validate_name(what: &str, name: &str, max: usize) -> Result<()> {
    if matches!(name, "." | "..") {
        return Err(Error::invalid(format!(
            "invalid {what} {name:?}: \".\" and \"..\" are path segments, not names"
        )));
    }
    let ok = !name.is_empty()
        && name.len() <= max
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid {what} {name:?}: use 1 to {max} characters of letters, digits, '.', '_' or '-'"
        )))
    }
}

pub fn validate_weight(weight: u32) -> Result<()> {
    if weight > MAX_WEIGHT {
        return Err(Error::invalid(format!(
            "weight {weight} is out of range 0..={MAX_WEIGHT}"
        )));
    }
    Ok(())
}

pub fn validate_table_size(size: u32) -> Result<()> {
    if !(3..=MAX_TABLE_SIZE).contains(&size) || !is_prime(size) {
        return Err(Error::invalid(format!(
            "table size {size} must be a prime between 3 and {MAX_TABLE_SIZE} (for example 65537)"
        )));
    }
    Ok(())
}

impl Service {
    /// A service as the config file's defaults make it: DSR, Maglev, the default table size,
    /// no health settings and no backends. Tests and benches set what they care about on top.
    pub fn new(name: impl Into<String>, vip: IpAddr, port: u16, protocol: Protocol) -> Self {
        Self {
            name: name.into(),
            vip,
            port,
            protocol,
            table_size: lb_common::maps::DEFAULT_TABLE_SIZE,
            hash: HashMode::default(),
            strategy: Strategy::default(),
            forwarding: Forwarding::default(),
            fragments: FragmentPolicy::default(),
            snat: false,
            allow_own_address: false,
            health: None,
            max_new_flows_per_s: None,
            on_shed: OnShed::default(),
            resource: None,
            adaptive: None,
            announce: Default::default(),
            discovery: None,
            backends: Vec::new(),
        }
    }

    pub fn validate(&self) -> Result<()> {
        validate_name("service name", &self.name, 64)?;
        if let Some(d) = &self.discovery {
            d.validate()
                .map_err(|e| Error::invalid(format!("service {}: {e}", self.name)))?;
        }
        validate_table_size(self.table_size)?;
        if self.vip.is_unspecified() || self.vip.is_multicast() {
            return Err(Error::invalid(format!(
                "service {}: invalid VIP {}",
                self.name, self.vip
            )));
        }
        if self.snat && self.forwarding != Forwarding::Nat {
            return Err(Error::invalid(format!(
                "service {}: snat needs forwarding = \"nat\"",
                self.name
            )));
        }
        if self.forwarding == Forwarding::Nat
            && self.port == 0
            && let Some(b) = self.backends.iter().find(|b| b.port.is_none())
        {
            return Err(Error::invalid(format!(
                "service {}: NAT on all ports needs a port for backend {} (the destination is rewritten to it)",
                self.name, b.id
            )));
        }
        if self.forwarding == Forwarding::Nat && self.fragments == FragmentPolicy::Hash {
            return Err(Error::invalid(format!(
                "service {}: NAT cannot translate fragments (later ones carry no ports); use fragments = \"pass\"",
                self.name
            )));
        }
        if let Some(r) = &self.resource {
            r.validate()
                .map_err(|e| Error::invalid(format!("service {}: {e}", self.name)))?;
        }
        if let Some(a) = &self.adaptive {
            a.validate()
                .map_err(|e| Error::invalid(format!("service {}: {e}", self.name)))?;
        }
        if !matches!(self.strategy, Strategy::Maglev | Strategy::ResourceAware)
            && self.fragments == FragmentPolicy::Hash
        {
            return Err(Error::invalid(format!(
                "service {}: fragments = \"hash\" needs strategy = \"maglev\" or \"resource-aware\" (every fragment of a datagram must hash to one backend)",
                self.name
            )));
        }
        if let Some(b) = self
            .backends
            .iter()
            .find(|b| b.maxconn.is_some_and(|m| m == 0 || m > MAX_MAXCONN))
        {
            return Err(Error::invalid(format!(
                "service {}: backend {}: maxconn {} is out of range 1..={MAX_MAXCONN}",
                self.name,
                b.id,
                b.maxconn.unwrap_or(0)
            )));
        }
        if self.backends.len() > MAX_BACKENDS_PER_SERVICE {
            return Err(Error::invalid(format!(
                "service {}: {} backends is more than the maximum {MAX_BACKENDS_PER_SERVICE}",
                self.name,
                self.backends.len()
            )));
        }
        for (what, rate) in std::iter::once((String::from("service"), self.max_new_flows_per_s)).chain(
            self.backends
                .iter()
                .map(|b| (format!("backend {}", b.id), b.max_new_flows_per_s)),
        ) {
            if let Some(r) = rate
                && !(1..=MAX_NEW_FLOWS_PER_S).contains(&r)
            {
                return Err(Error::invalid(format!(
                    "service {}: {what}: max_new_flows_per_s {r} is out of range 1..={MAX_NEW_FLOWS_PER_S}",
                    self.name
                )));
            }
        }
        health_settings::validate_service(self)
            .map_err(|e| Error::invalid(format!("service {}: {e}", self.name)))?;
        let mut ids = HashSet::new();
        let mut endpoints = HashSet::new();
        for b in &self.backends {
            b.validate(self)?;
            if !ids.insert(b.id.as_str()) {
                return Err(Error::invalid(format!(
                    "service {}: duplicate backend id {}",
                    self.name, b.id
                )));
            }
            if !endpoints.insert((b.address, b.port(self))) {
                return Err(Error::invalid(format!(
                    "service {}: backend {} duplicates address {} port {}",
                    self.name,
                    b.id,
                    b.address,
                    b.port(self)
                )));
            }
        }
        Ok(())
    }

    pub fn backend(&self, id: &str) -> Option<&Backend> {
        self.backends.iter().find(|b| b.id == id)
    }

    /// A service whose backends come from a source takes none by hand: refused in one line
    /// naming the source.
    pub fn set_by_hand(&self) -> Result<()> {
        match &self.discovery {
            Some(d) => Err(Error::invalid(format!(
                "service {} takes its backends from its {} source ([service.discovery]): change them there",
                self.name,
                d.kind.name()
            ))),
            None => Ok(()),
        }
    }

    /// Declared backends beside a source are refused: the source's set replaces them.
    pub fn declares_none_beside_its_source(&self) -> Result<()> {
        match &self.discovery {
            Some(d) if !self.backends.is_empty() => Err(Error::invalid(format!(
                "service {}: its backends come from [service.discovery] (kind = \"{}\"): declare none here",
                self.name,
                d.kind.name()
            ))),
            _ => Ok(()),
        }
    }
}

impl Backend {
    /// A backend of the default weight with nothing else set.
    pub fn new(id: impl Into<String>, address: IpAddr) -> Self {
        Self {
            id: id.into(),
            address,
            port: None,
            weight: DEFAULT_WEIGHT,
            region: None,
            zone: None,
            labels: BTreeMap::new(),
            health: None,
            max_new_flows_per_s: None,
            maxconn: None,
            allow_link_local: false,
        }
    }

    pub fn port(&self, service: &Service) -> u16 {
        self.port.unwrap_or(service.port)
    }

    pub fn validate(&self, service: &Service) -> Result<()> {
        validate_name("backend id", &self.id, 64)?;
        validate_weight(self.weight).map_err(|e| Error::invalid(format!("backend {}: {e}", self.id)))?;
        // Free text, but shown on terminals: no escape sequences or line breaks.
        let texts = [("region", &self.region), ("zone", &self.zone)]
            .into_iter()
            .filter_map(|(what, t)| t.as_deref().map(|t| (what, t)))
            .chain(
                self.labels
                    .iter()
                    .flat_map(|(k, v)| [("label", k.as_str()), ("label", v.as_str())]),
            );
        for (what, text) in texts {
            if text.contains(char::is_control) {
                return Err(Error::invalid(format!(
                    "backend {}: {what} {text:?} contains a control character",
                    self.id
                )));
            }
        }
        let link_local = match self.address {
            std::net::IpAddr::V4(a) => a.is_link_local(),
            std::net::IpAddr::V6(a) => a.is_unicast_link_local(),
        };
        if link_local && !self.allow_link_local {
            return Err(Error::invalid(format!(
                "backend {} address {} is link-local, where cloud metadata services answer (fix: allow_link_local = true if it really is a backend)",
                self.id, self.address
            )));
        }
        if self.address.is_ipv4() != service.vip.is_ipv4() {
            return Err(Error::invalid(format!(
                "backend {} address {} is not of the same IP family as VIP {}",
                self.id, self.address, service.vip
            )));
        }
        if self.address.is_unspecified() || self.address.is_multicast() || self.address.is_loopback() {
            return Err(Error::invalid(format!(
                "backend {}: invalid address {}",
                self.id, self.address
            )));
        }
        Ok(())
    }
}

/// Checks a whole set of services: each one, and what must be unique across them.
pub fn validate_services(services: &[Service]) -> Result<()> {
    if services.len() > MAX_SERVICES as usize {
        return Err(Error::invalid(format!(
            "{} services is more than the maximum {MAX_SERVICES}",
            services.len()
        )));
    }
    let mut names = HashSet::new();
    let mut keys = HashSet::new();
    let mut fragment_owners = HashSet::new();
    for s in services {
        if s.fragments == FragmentPolicy::Hash && !fragment_owners.insert((s.vip, s.protocol)) {
            return Err(Error::invalid(format!(
                "service {}: another service already hashes the fragments of {} {}",
                s.name, s.vip, s.protocol
            )));
        }
        s.validate()?;
        if !names.insert(s.name.as_str()) {
            return Err(Error::invalid(format!("duplicate service name {}", s.name)));
        }
        if !keys.insert((s.vip, s.port, s.protocol)) {
            return Err(Error::invalid(format!(
                "service {} duplicates VIP {} port {} {}",
                s.name, s.vip, s.port, s.protocol
            )));
        }
    }
    Ok(())
}

/// Refuses a service of `after` whose VIP is one of this host's addresses (`own`) unless it
/// sets `allow_own_address`: the balancer would take that address's port (every port, for
/// port 0) from the host's own services (SSH, the API). Only services new, or whose VIP, port
/// or protocol changed since `before`, are checked, so an address the host gains later does
/// not block unrelated changes.
pub fn check_own_addresses(before: &[Service], after: &[Service], own: &[IpAddr]) -> Result<()> {
    for s in after {
        if s.allow_own_address || !own.contains(&s.vip) {
            continue;
        }
        let kept = before
            .iter()
            .any(|b| b.name == s.name && b.vip == s.vip && b.port == s.port && b.protocol == s.protocol);
        if kept {
            continue;
        }
        let ports = if s.port == 0 {
            format!("all its {} ports", s.protocol)
        } else {
            format!("its port {}/{}", s.port, s.protocol)
        };
        return Err(Error::invalid(format!(
            "service {}: VIP {} is an address of this host: {ports} would go to the backends, \
             not to this host's own services (fix: another VIP, or allow_own_address = true \
             (lb service add --allow-own-address) if that is meant)",
            s.name, s.vip
        )));
    }
    Ok(())
}

/// Every backend address, and whether it must be resolved at L2 (some DSR or NAT service uses
/// it) or only needs a route (encapsulation).
pub fn backend_addresses(services: &[Service]) -> BTreeMap<IpAddr, bool> {
    let mut addrs = BTreeMap::new();
    for s in services {
        for b in &s.backends {
            *addrs.entry(b.address).or_insert(false) |= s.forwarding.needs_l2();
        }
    }
    addrs
}

/// Identifies one backend of one service (ids are unique within a service only).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BackendRef {
    pub service: String,
    pub id: String,
}

impl BackendRef {
    pub fn new(service: &str, id: &str) -> Self {
        Self {
            service: service.to_string(),
            id: id.to_string(),
        }
    }
}

impl fmt::Display for BackendRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.service, self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_refuse_dot_segments_and_control_characters() {
        for good in ["web", "a.b", "...", ".hidden", "x-1_y"] {
            assert!(validate_name("backend id", good, 64).is_ok(), "{good:?}");
        }
        for bad in [
            ".",
            "..",
            "",
            "a/b",
            "a\u{1b}[2J",
            "a\rb",
            "a\u{85}b",
            "a b",
            "\u{e9}",
        ] {
            let e = validate_name("backend id", bad, 64).expect_err(bad).to_string();
            assert!(e.starts_with("invalid backend id"), "{e}");
            assert!(!e.contains(['\n', '\r', '\u{1b}']), "one printable line: {e:?}");
        }
        let e = validate_name("service name", "..", 64).unwrap_err().to_string();
        assert!(e.contains("path segments"), "{e}");
    }

    #[test]
    fn backend_text_refuses_control_characters() {
        let service = Service {
            name: "web".into(),
            vip: "10.0.0.1".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            table_size: 251,
            hash: HashMode::default(),
            strategy: Strategy::default(),
            forwarding: Forwarding::default(),
            fragments: FragmentPolicy::default(),
            snat: false,
            allow_own_address: false,
            health: None,
            max_new_flows_per_s: None,
            on_shed: OnShed::default(),
            resource: None,
            adaptive: None,
            announce: Default::default(),
            discovery: None,
            backends: vec![],
        };
        let backend = Backend {
            id: "b1".into(),
            address: "10.0.0.2".parse().unwrap(),
            port: None,
            weight: DEFAULT_WEIGHT,
            region: Some("eu".into()),
            zone: Some("eu-1a".into()),
            labels: BTreeMap::from([("role".into(), "db primary".into())]),
            health: None,
            max_new_flows_per_s: None,
            maxconn: None,
            allow_link_local: false,
        };
        assert!(backend.validate(&service).is_ok());
        let zone = Backend {
            zone: Some("a\u{1b}]0;owned\u{7}".into()),
            ..backend.clone()
        };
        for metadata in ["169.254.169.254", "fe80::a9fe:a9fe"] {
            let mut b = Backend {
                address: metadata.parse().unwrap(),
                ..backend.clone()
            };
            let mut s = service.clone();
            s.vip = if b.address.is_ipv4() {
                "10.0.0.1"
            } else {
                "fd00::1"
            }
            .parse()
            .unwrap();
            let e = b.validate(&s).unwrap_err().to_string();
            assert!(
                e.contains("is link-local") && e.contains("allow_link_local"),
                "{e}"
            );
            b.allow_link_local = true;
            assert!(b.validate(&s).is_ok(), "{metadata} allowed when asked");
        }
        let e = zone.validate(&service).unwrap_err().to_string();
        assert!(e.contains("zone") && e.contains("control character"), "{e}");
        let label = Backend {
            labels: BTreeMap::from([("k".into(), "v\nw".into())]),
            ..backend
        };
        assert!(
            label
                .validate(&service)
                .unwrap_err()
                .to_string()
                .contains("label")
        );
    }

    #[test]
    fn a_vip_of_this_host_is_refused_unless_allowed_and_only_when_new_or_moved() {
        let own: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        let ssh = Service::new("ssh", "10.0.0.5".parse().unwrap(), 22, Protocol::Tcp);
        let e = check_own_addresses(&[], std::slice::from_ref(&ssh), &own)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "service ssh: VIP 10.0.0.5 is an address of this host: its port 22/tcp would go to the \
             backends, not to this host's own services (fix: another VIP, or allow_own_address = true \
             (lb service add --allow-own-address) if that is meant)"
        );
        let all = Service::new("all", "fd00::5".parse().unwrap(), 0, Protocol::Udp);
        let e = check_own_addresses(&[], &[all], &own).unwrap_err().to_string();
        assert!(
            e.contains("fd00::5 is an address of this host: all its udp ports would go"),
            "{e}"
        );
        let allowed = Service {
            allow_own_address: true,
            ..ssh.clone()
        };
        check_own_addresses(&[], &[allowed], &own).unwrap();
        let elsewhere = Service::new("web", "10.0.0.6".parse().unwrap(), 80, Protocol::Tcp);
        check_own_addresses(&[], std::slice::from_ref(&elsewhere), &own).unwrap();
        // Running already (the host took the address since): kept through other changes.
        check_own_addresses(std::slice::from_ref(&ssh), &[ssh.clone(), elsewhere], &own).unwrap();
        // Moved to another port of the address: checked again.
        let moved = Service {
            port: 2222,
            ..ssh.clone()
        };
        assert!(check_own_addresses(&[ssh], &[moved], &own).is_err());
    }
}
