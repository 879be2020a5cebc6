//! The TOML config: daemon settings and the services with their backends. Validation is strict
//! and whole-file: one bad field rejects the file and nothing is applied.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use lb_common::maps::{
    DEFAULT_CONNTRACK_SIZE, DEFAULT_EMBRYONIC_SIZE, DEFAULT_NAT_SIZE, DEFAULT_POOL_SLOTS, DEFAULT_TABLE_SIZE,
};
use serde::{Deserialize, Serialize};

pub use crate::model::{
    DEFAULT_WEIGHT, Forwarding, FragmentPolicy, HashMode, HealthSettings, MAX_WEIGHT, Protocol,
    validate_name, validate_services, validate_table_size, validate_weight,
};
use crate::{
    error::{Error, Result},
    model::{Backend, Service},
};

/// A loaded config: the daemon's settings and the services, as the model.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub services: Vec<Service>,
}

/// The file as written; and, from a running daemon, as it runs (`lb config show`).
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub daemon: DaemonConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::model::cluster_settings::ClusterSettings>,
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceSpec>,
}

impl ConfigFile {
    /// A daemon's settings and services as a file: every default of `[daemon]` filled in. A
    /// service with a source is written without the backends it found: they are the source's.
    pub fn effective(daemon: &DaemonConfig, services: &[Service]) -> Self {
        let spec = |s: &Service| {
            let mut spec = ServiceSpec::from(s);
            if s.discovery.is_some() {
                spec.backends.clear();
            }
            spec
        };
        Self {
            daemon: daemon.clone(),
            cluster: daemon.cluster.clone(),
            services: services.iter().map(spec).collect(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Names the pin directory `/sys/fs/bpf/<instance>` and the control socket.
    #[serde(default = "default_instance")]
    pub instance: String,
    /// Interfaces the balancer attaches to.
    pub interfaces: Vec<String>,
    #[serde(default)]
    pub xdp_mode: XdpModeSetting,
    /// Connection-table capacity (flows).
    #[serde(default = "default_conntrack")]
    pub conntrack_size: u32,
    /// Capacity (flows) of the table for flows that have sent one packet (a SYN, a UDP
    /// flow's first datagram); they move to the connection table at their client's next
    /// packet, so a flood of first packets evicts only its own kind.
    #[serde(default = "default_embryonic")]
    pub embryonic_size: u32,
    /// Flood guard: new flows per second one CPU inserts into the connection table. Past it
    /// (a SYN flood), new flows still go to their Maglev table's backend but are not
    /// remembered, so the flood does not evict live flows; counted as
    /// `conntrack_flood_skipped`. 0 turns the guard off.
    #[serde(default = "default_flood_guard")]
    pub flood_guard_per_cpu: u32,
    /// Capacity of the Maglev table pool, in slots (2 bytes each). Each service needs its table
    /// size, and each swap one more table's worth: the default holds 288 tables of 65537.
    #[serde(default = "default_pool")]
    pub table_pool_slots: u32,
    /// Directory of the control socket and the state file.
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    /// Reload the config file whenever it changes (as SIGHUP and `lb reload` do).
    #[serde(default)]
    pub watch_config: bool,
    /// How often backend MACs are re-read from the neighbour table.
    #[serde(default = "default_refresh")]
    pub neighbour_refresh_ms: u64,
    /// Seconds an instance registered with a `ttl` stays, drained, after its heartbeat is
    /// late, before it is removed (a registration may ask for its own).
    #[serde(default = "default_deregister_after")]
    pub deregister_after: f64,
    /// Outer source of IPIP packets: its first two bytes are kept, the last two vary per flow
    /// (receivers spread flows over queues by it). Backends never answer it.
    #[serde(default = "default_encap_source4")]
    pub encap_source4: std::net::Ipv4Addr,
    /// The IPv6 outer source: its first 96 bits are kept, the last 32 vary per flow.
    #[serde(default = "default_encap_source6")]
    pub encap_source6: std::net::Ipv6Addr,
    /// UDP port of GUE encapsulation (`forwarding = "gue"`); backends decapsulate on it.
    #[serde(default = "default_gue_port")]
    pub gue_port: u16,
    /// Packets that encapsulation would make larger than the route MTU: answered with ICMP
    /// "fragmentation needed" / "packet too big" (the client's path MTU discovery then sends
    /// smaller ones), or dropped. Both are counted.
    #[serde(default)]
    pub encap_too_big: TooBigPolicy,
    /// ICMP echo requests to a VIP address: answered by the data plane, or passed to the kernel.
    #[serde(default)]
    pub icmp_echo: EchoPolicy,
    /// NAT services (`forwarding = "nat"`): source addresses and ports, table size, timeouts.
    #[serde(default)]
    pub nat: NatConfig,
    /// `[daemon.geo]`: regions, their failover, the client prefix data (strategy = "geo").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub geo: Option<crate::model::geo_settings::GeoSettings>,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The HTTP control API on TCP (it is always on the Unix socket).
    #[serde(default)]
    pub api: ApiConfig,
    /// Caps and timeouts of every HTTP listener (the socket, the TCP API, metrics).
    #[serde(default)]
    pub http: HttpLimits,
    /// `[daemon.bgp]`: announce the VIPs to routers through BIRD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<crate::model::bgp_settings::BgpSettings>,
    /// `[cluster]` (a top-level table of the file): the desired state lives in etcd.
    #[serde(skip)]
    pub cluster: Option<crate::model::cluster_settings::ClusterSettings>,
}

/// `[daemon.http]`: each listener's connection caps and timeouts.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpLimits {
    /// Connections one listener holds at once; more are closed as they come.
    pub max_connections: u32,
    /// The same for one peer address (TCP listeners); 0: only the listener's cap.
    pub max_connections_per_peer: u32,
    /// Time to receive a request's head (and a TLS handshake).
    pub header_read_timeout_ms: u64,
    /// An open connection with no byte either way is closed after this.
    pub idle_timeout_s: u64,
    /// A request's whole time, body included; past it the answer is 503.
    pub request_timeout_s: u64,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_connections_per_peer: 32,
            header_read_timeout_ms: 10_000,
            idle_timeout_s: 60,
            request_timeout_s: 30,
        }
    }
}

impl HttpLimits {
    pub fn validate(&self) -> Result<()> {
        let checks: [(&str, u64, std::ops::RangeInclusive<u64>); 4] = [
            ("max_connections", self.max_connections.into(), 1..=65_536),
            (
                "header_read_timeout_ms",
                self.header_read_timeout_ms,
                100..=600_000,
            ),
            ("idle_timeout_s", self.idle_timeout_s, 1..=86_400),
            ("request_timeout_s", self.request_timeout_s, 1..=3_600),
        ];
        for (name, v, range) in checks {
            if !range.contains(&v) {
                return Err(Error::config(format!(
                    "daemon.http.{name} {v} is out of range {}..={}",
                    range.start(),
                    range.end()
                )));
            }
        }
        if self.max_connections_per_peer > self.max_connections {
            return Err(Error::config(format!(
                "daemon.http.max_connections_per_peer {} is above max_connections {}",
                self.max_connections_per_peer, self.max_connections
            )));
        }
        Ok(())
    }
}

/// `[daemon.api]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Also serve the API on this TCP address (off by default).
    pub listen: Option<std::net::SocketAddr>,
    /// The admin token (every request); required with `listen`.
    pub token_file: Option<PathBuf>,
    /// A token that may only read (GET), but not look up a client's flow by its tuple.
    pub read_token_file: Option<PathBuf>,
    /// A token for backends' reports about themselves: register and deregister instances,
    /// heartbeat, set health and load; nothing else.
    pub report_token_file: Option<PathBuf>,
    /// The services the report token may report for (unset: all).
    pub report_services: Option<Vec<String>>,
    /// TLS on the TCP listener: a PEM certificate chain and its private key (both, or neither).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Allow a non-loopback `listen` without TLS (tokens in clear on the network).
    pub allow_plaintext: bool,
}

/// `[daemon.metrics]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub enabled: bool,
    /// Address of `GET /metrics`; localhost unless set otherwise.
    pub listen: std::net::SocketAddr,
    /// A file holding the bearer token scrapes must present (optional).
    pub token_file: Option<PathBuf>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 9464)),
            token_file: None,
        }
    }
}

/// `[daemon.nat]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NatConfig {
    /// The balancer's address on the backends' IPv4 network: the source of SNAT connections
    /// (`snat = true`). It must be assigned on the backend-facing interface.
    pub source4: Option<std::net::Ipv4Addr>,
    pub source6: Option<std::net::Ipv6Addr>,
    /// SNAT source ports, `"first-last"`. A port is unique per backend address and port, so each
    /// backend can hold this many connections at once. Keep it clear of the kernel's
    /// `ip_local_port_range` on the source address.
    pub ports: PortRange,
    /// Entries (two per connection). Full: new connections are dropped and counted.
    pub table_size: u32,
    /// Idle time after which a TCP connection's entries are removed.
    pub tcp_timeout_s: u64,
    /// The same until the handshake completes: the client's ACK of the backend's SYN-ACK,
    /// answered or not, so a SYN flood (spoofed or not) cannot hold the table or SNAT ports
    /// longer.
    pub tcp_syn_timeout_s: u64,
    /// The same once it closes: a FIN each way, or a RST. At least the backends' TIME_WAIT
    /// (60 s on Linux), so a SNAT port is not reused while the backend still remembers it.
    pub tcp_closing_timeout_s: u64,
    pub udp_timeout_s: u64,
    /// How often the daemon looks for expired entries.
    pub gc_interval_ms: u64,
    /// New connections one client address may open per second; past that they are dropped
    /// and counted (`drop_nat_source_limit`). 0: no limit.
    pub max_new_per_source: u32,
    /// Table fill (percent) from which half-open connections idle for a second are expired
    /// at once, before their `tcp_syn_timeout_s`: under pressure they go first.
    pub pressure_percent: u8,
}

impl Default for NatConfig {
    fn default() -> Self {
        Self {
            source4: None,
            source6: None,
            ports: PortRange {
                first: 10000,
                last: 32767,
            },
            table_size: DEFAULT_NAT_SIZE,
            tcp_timeout_s: 900,
            tcp_syn_timeout_s: 30,
            tcp_closing_timeout_s: 60,
            udp_timeout_s: 30,
            gc_interval_ms: 1000,
            max_new_per_source: 1000,
            pressure_percent: 50,
        }
    }
}

/// A port range written `"first-last"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn len(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn overlaps(&self, first: u16, last: u16) -> bool {
        self.first <= last && first <= self.last
    }
}

impl TryFrom<String> for PortRange {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        let bad =
            || format!("invalid port range {s:?}: write \"first-last\" with 1 <= first <= last <= 65535");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let first: u16 = a.trim().parse().map_err(|_| bad())?;
        let last: u16 = b.trim().parse().map_err(|_| bad())?;
        if first == 0 || first > last {
            return Err(bad());
        }
        Ok(Self { first, last })
    }
}

impl From<PortRange> for String {
    fn from(r: PortRange) -> Self {
        format!("{}-{}", r.first, r.last)
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum TooBigPolicy {
    #[default]
    Icmp,
    Drop,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum EchoPolicy {
    #[default]
    Reply,
    Pass,
}

pub const DEFAULT_GUE_PORT: u16 = 6080;
fn default_gue_port() -> u16 {
    DEFAULT_GUE_PORT
}
fn default_encap_source4() -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(172, 16, 0, 0)
}
fn default_encap_source6() -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::new(0xfd00, 0x4c42, 0, 0, 0, 0, 0, 0)
}

fn default_instance() -> String {
    "default".into()
}
fn default_conntrack() -> u32 {
    DEFAULT_CONNTRACK_SIZE
}
fn default_embryonic() -> u32 {
    DEFAULT_EMBRYONIC_SIZE
}
/// Twice Katran's 125,000: far above what one CPU's legitimate new connections reach.
pub const DEFAULT_FLOOD_GUARD_PER_CPU: u32 = 250_000;
fn default_flood_guard() -> u32 {
    DEFAULT_FLOOD_GUARD_PER_CPU
}
fn default_pool() -> u32 {
    DEFAULT_POOL_SLOTS
}
pub fn default_run_dir() -> PathBuf {
    PathBuf::from("/run/lb")
}
fn default_refresh() -> u64 {
    1000
}
fn default_deregister_after() -> f64 {
    crate::status::lease::DEFAULT_DEREGISTER_AFTER.as_secs_f64()
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeSetting {
    /// Native (driver) mode, falling back to generic with a warning.
    #[default]
    Auto,
    Native,
    Generic,
}

/// A service as written in the config file, sent by the CLI and kept in the state file.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    #[schema(value_type = String, example = "10.0.0.100")]
    pub vip: IpAddr,
    /// 0 = every port of the VIP.
    pub port: u16,
    pub protocol: Protocol,
    #[serde(default = "default_table_size")]
    pub table_size: u32,
    #[serde(default)]
    pub hash: HashMode,
    /// How a new flow picks its backend.
    #[serde(default, skip_serializing_if = "is_default")]
    pub strategy: crate::model::Strategy,
    #[serde(default)]
    pub forwarding: Forwarding,
    /// IP fragments to the VIP: passed to the kernel, or hashed by (source, destination,
    /// protocol) into this service's table so every fragment of a datagram reaches one backend.
    /// At most one service per VIP and protocol may hash them.
    #[serde(default)]
    pub fragments: FragmentPolicy,
    /// NAT only: also rewrite the source to the balancer's NAT address and a port of its range,
    /// so replies return through the balancer whatever the backends' routes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub snat: bool,
    /// The VIP may be one of the balancer host's own addresses: that address's port (every
    /// port, for port 0) then goes to the backends, not to the host's own services.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_own_address: bool,
    /// `[service.health]`: active checks and what health does to traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSettings>,
    /// Load shedding: new flows per second the whole service takes (beyond: dropped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_new_flows_per_s: Option<u32>,
    /// A new flow over its backend's `max_new_flows_per_s`: spill (to the next candidate) or drop.
    #[serde(default, skip_serializing_if = "is_default")]
    pub on_shed: crate::model::OnShed,
    /// `[service.resource]`: how the backends' load becomes weight (resource-aware).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<crate::model::resource_settings::ResourceSettings>,
    /// `[service.adaptive]`: when an adaptive service switches strategy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<crate::model::adaptive_settings::AdaptiveSettings>,
    /// When this node announces the VIP over BGP: `healthy` (while a backend takes new flows)
    /// or `always`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub announce: crate::model::bgp_settings::Announce,
    /// `[service.discovery]`: the backends come from a registry (a file, DNS or etcd); the
    /// service then declares none itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<Box<crate::model::discovery_settings::DiscoverySettings>>,
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendSpec>,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn default_table_size() -> u32 {
    DEFAULT_TABLE_SIZE
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    pub id: String,
    #[schema(value_type = String, example = "10.0.0.11")]
    pub address: IpAddr,
    /// The backend's port; in DSR mode packets keep the service port, so this defaults to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 0 drains the backend: no new flows, existing ones stay.
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// `[service.backend.health]`: this backend's overrides of the service's settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSettings>,
    /// Load shedding: new flows per second this backend takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_new_flows_per_s: Option<u32>,
    /// Most active flows the counting strategies (least-connections, power-of-two) give it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maxconn: Option<u32>,
    /// A link-local address (169.254.0.0/16, fe80::/10) is refused unless this is set: cloud
    /// metadata services answer there, and a check must not query them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_link_local: bool,
}

impl From<ServiceSpec> for Service {
    fn from(s: ServiceSpec) -> Self {
        Service {
            name: s.name,
            vip: s.vip,
            port: s.port,
            protocol: s.protocol,
            table_size: s.table_size,
            hash: s.hash,
            strategy: s.strategy,
            forwarding: s.forwarding,
            fragments: s.fragments,
            snat: s.snat,
            allow_own_address: s.allow_own_address,
            health: s.health,
            max_new_flows_per_s: s.max_new_flows_per_s,
            on_shed: s.on_shed,
            resource: s.resource,
            adaptive: s.adaptive,
            announce: s.announce,
            discovery: s.discovery,
            backends: s.backends.into_iter().map(Backend::from).collect(),
        }
    }
}

impl From<BackendSpec> for Backend {
    fn from(b: BackendSpec) -> Self {
        Backend {
            id: b.id,
            address: b.address,
            port: b.port,
            weight: b.weight,
            region: b.region,
            zone: b.zone,
            labels: b.labels,
            health: b.health,
            max_new_flows_per_s: b.max_new_flows_per_s,
            maxconn: b.maxconn,
            allow_link_local: b.allow_link_local,
        }
    }
}

impl From<&Service> for ServiceSpec {
    fn from(s: &Service) -> Self {
        ServiceSpec {
            name: s.name.clone(),
            vip: s.vip,
            port: s.port,
            protocol: s.protocol,
            table_size: s.table_size,
            hash: s.hash,
            strategy: s.strategy,
            forwarding: s.forwarding,
            fragments: s.fragments,
            snat: s.snat,
            allow_own_address: s.allow_own_address,
            health: s.health.clone(),
            max_new_flows_per_s: s.max_new_flows_per_s,
            on_shed: s.on_shed,
            resource: s.resource,
            adaptive: s.adaptive,
            announce: s.announce,
            discovery: s.discovery.clone(),
            backends: s.backends.iter().map(BackendSpec::from).collect(),
        }
    }
}

impl From<&Backend> for BackendSpec {
    fn from(b: &Backend) -> Self {
        BackendSpec {
            id: b.id.clone(),
            address: b.address,
            port: b.port,
            weight: b.weight,
            region: b.region.clone(),
            zone: b.zone.clone(),
            labels: b.labels.clone(),
            health: b.health.clone(),
            max_new_flows_per_s: b.max_new_flows_per_s,
            maxconn: b.maxconn,
            allow_link_local: b.allow_link_local,
        }
    }
}

fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

impl Config {
    pub fn load(path: &Path) -> Result<Self> {
        Self::parse_file(&Self::read(path)?, path)
    }

    /// The file's text (`load`'s first half).
    pub fn read(path: &Path) -> Result<String> {
        std::fs::read_to_string(path)
            .map_err(|e| Error::config(format!("cannot read {}: {e}", path.display())))
    }

    /// `text`, read from `path`, parsed and validated; errors name the file (`load`'s second half).
    pub fn parse_file(text: &str, path: &Path) -> Result<Self> {
        Self::parse(text).map_err(|e| match e {
            Error::Config(m) | Error::Invalid(m) => Error::config(format!("{}: {m}", path.display())),
            other => Error::config(format!("{}: {other}", path.display())),
        })
    }

    pub fn parse(text: &str) -> Result<Self> {
        let cfg = Self::parse_pushed(text)?;
        validate_against(&cfg.daemon, &cfg.services)?;
        Ok(cfg)
    }

    /// A file as `lb cluster push` sends it: checked whole, its services against each other
    /// but not against the file's own `[daemon]`: each node checks them against its own (a
    /// service reading the cluster's etcd, for one, needs the node's `[cluster]`).
    pub fn parse_pushed(text: &str) -> Result<Self> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| {
            // toml's messages span several lines (with a source excerpt); keep the first.
            let msg = e.message().to_string();
            let at = e
                .span()
                .map(|s| line_of(text, s.start))
                .map(|l| format!("line {l}: "))
                .unwrap_or_default();
            Error::config(format!("{at}{}", msg.lines().next().unwrap_or("invalid TOML")))
        })?;
        let mut daemon = file.daemon;
        daemon.cluster = file.cluster;
        let cfg = Config {
            daemon,
            services: file.services.into_iter().map(Service::from).collect(),
        };
        cfg.daemon.validate()?;
        for s in &cfg.services {
            s.declares_none_beside_its_source()?;
        }
        validate_services(&cfg.services)?;
        Ok(cfg)
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl DaemonConfig {
    /// A registration's terms: its `ttl`, and its own `deregister_after` or this daemon's.
    pub fn registration_terms(
        &self,
        ttl: f64,
        deregister_after: Option<f64>,
    ) -> std::result::Result<crate::status::lease::Terms, String> {
        crate::status::lease::Terms::from_secs(ttl, deregister_after.unwrap_or(self.deregister_after))
    }

    pub fn validate(&self) -> Result<()> {
        validate_instance(&self.instance)?;
        if let Some(g) = &self.geo {
            g.validate().map_err(Error::config)?;
        }
        if self.gue_port == 0 {
            return Err(Error::config("daemon.gue_port must not be 0"));
        }
        if self.interfaces.is_empty() {
            return Err(Error::config(
                "daemon.interfaces is empty: name at least one interface",
            ));
        }
        let mut seen = HashSet::new();
        for i in &self.interfaces {
            if i.is_empty() || i.len() > 15 || i.contains('/') || i.contains(char::is_whitespace) {
                return Err(Error::config(format!("invalid interface name {i:?}")));
            }
            if !seen.insert(i) {
                return Err(Error::config(format!("interface {i} is listed twice")));
            }
        }
        if self.conntrack_size < 1024 {
            return Err(Error::config(format!(
                "daemon.conntrack_size {} is too small (minimum 1024)",
                self.conntrack_size
            )));
        }
        if self.embryonic_size < 1024 {
            return Err(Error::config(format!(
                "daemon.embryonic_size {} is too small (minimum 1024)",
                self.embryonic_size
            )));
        }
        if self.table_pool_slots < 2 * 3 {
            return Err(Error::config("daemon.table_pool_slots is too small"));
        }
        if self.api.listen.is_some() && self.api.token_file.is_none() {
            return Err(Error::config(
                "daemon.api.listen needs daemon.api.token_file: the API on TCP takes bearer tokens only",
            ));
        }
        if self.api.report_services.is_some() && self.api.report_token_file.is_none() {
            return Err(Error::config(
                "daemon.api.report_services needs daemon.api.report_token_file",
            ));
        }
        if self.api.cert_file.is_some() != self.api.key_file.is_some() {
            return Err(Error::config("daemon.api.cert_file and key_file go together"));
        }
        if self.api.cert_file.is_some() && self.api.listen.is_none() {
            return Err(Error::config(
                "daemon.api.cert_file needs daemon.api.listen (TLS is for the TCP listener)",
            ));
        }
        if self.neighbour_refresh_ms < 100 {
            return Err(Error::config("daemon.neighbour_refresh_ms must be at least 100"));
        }
        crate::status::lease::deregister_after_secs(self.deregister_after)
            .map_err(|e| Error::config(format!("daemon.{e}")))?;
        if let Some(addr) = self.api.listen
            && !addr.ip().is_loopback()
            && self.api.cert_file.is_none()
            && !self.api.allow_plaintext
        {
            return Err(Error::config(format!(
                "daemon.api.listen {addr} is not loopback and has no TLS: tokens would cross the network in clear (fix: set cert_file and key_file, or allow_plaintext = true)"
            )));
        }
        if let Some(b) = &self.bgp {
            b.validate().map_err(Error::config)?;
        }
        if let Some(c) = &self.cluster {
            c.validate().map_err(Error::config)?;
        }
        self.http.validate()?;
        self.nat.validate()
    }

    pub fn socket_path(&self) -> PathBuf {
        socket_path(&self.run_dir, &self.instance)
    }

    pub fn state_path(&self) -> PathBuf {
        state_path(&self.run_dir, &self.instance)
    }
}

/// Longest instance name (its first 9 letters and digits name the check device, see
/// `dataplane::steer::device_names`).
pub const MAX_INSTANCE_LEN: usize = 32;

/// Instance names: 1..=32 of `[A-Za-z0-9_-]`. The name is joined into paths that `lb detach`
/// removes (`/sys/fs/bpf/<instance>`, `<run_dir>/<instance>.state.json`), so no `/`, no dots.
pub fn validate_instance(name: &str) -> Result<()> {
    let ok = (1..=MAX_INSTANCE_LEN).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid instance {name:?}: use 1 to {MAX_INSTANCE_LEN} characters of letters, digits, '_' or '-'"
        )))
    }
}

pub fn state_path(run_dir: &Path, instance: &str) -> PathBuf {
    run_dir.join(format!("{instance}.state.json"))
}

pub fn socket_path(run_dir: &Path, instance: &str) -> PathBuf {
    run_dir.join(format!("{instance}.sock"))
}

impl NatConfig {
    pub fn validate(&self) -> Result<()> {
        if self.table_size < 1024 {
            return Err(Error::config(format!(
                "daemon.nat.table_size {} is too small (minimum 1024)",
                self.table_size
            )));
        }
        if !(10..=60_000).contains(&self.gc_interval_ms) {
            return Err(Error::config(format!(
                "daemon.nat.gc_interval_ms {} is out of range 10..=60000",
                self.gc_interval_ms
            )));
        }
        if !(1..=100).contains(&self.pressure_percent) {
            return Err(Error::config(format!(
                "daemon.nat.pressure_percent {} is out of range 1..=100",
                self.pressure_percent
            )));
        }
        for (name, v) in [
            ("tcp_timeout_s", self.tcp_timeout_s),
            ("tcp_syn_timeout_s", self.tcp_syn_timeout_s),
            ("tcp_closing_timeout_s", self.tcp_closing_timeout_s),
            ("udp_timeout_s", self.udp_timeout_s),
        ] {
            if !(1..=7 * 24 * 3600).contains(&v) {
                return Err(Error::config(format!(
                    "daemon.nat.{name} {v} is out of range 1..=604800"
                )));
            }
        }
        if let Some(a) = self.source4
            && (a.is_unspecified() || a.is_multicast() || a.is_broadcast() || a.is_loopback())
        {
            return Err(Error::config(format!(
                "daemon.nat.source4 {a} is not a unicast address"
            )));
        }
        if let Some(a) = self.source6
            && (a.is_unspecified() || a.is_multicast() || a.is_loopback())
        {
            return Err(Error::config(format!(
                "daemon.nat.source6 {a} is not a unicast address"
            )));
        }
        Ok(())
    }

    /// The SNAT source for a VIP's family, if configured.
    pub fn source_for(&self, vip: IpAddr) -> Option<IpAddr> {
        match vip {
            IpAddr::V4(_) => self.source4.map(IpAddr::V4),
            IpAddr::V6(_) => self.source6.map(IpAddr::V6),
        }
    }
}

/// `model::check_own_addresses` against this host's addresses as they are now (in the calling
/// thread's network namespace).
pub fn check_own_addresses(before: &[Service], after: &[Service]) -> Result<()> {
    let own = crate::link::addresses().map_err(|e| Error::io("read this host's addresses", e))?;
    crate::model::check_own_addresses(before, after, &own)
}

/// Checks services against the daemon settings they depend on (SNAT needs a source address).
pub fn validate_against(daemon: &DaemonConfig, services: &[Service]) -> Result<()> {
    for s in services {
        if let Some(d) = &s.discovery
            && d.kind == crate::model::discovery_settings::SourceKind::Etcd
            && d.etcd.is_none()
            && daemon.cluster.is_none()
        {
            return Err(Error::invalid(format!(
                "service {}: discovery kind = \"etcd\" reads [cluster]'s etcd: add [cluster], or name discovery.etcd and discovery.cluster",
                s.name
            )));
        }
    }
    for s in services
        .iter()
        .filter(|s| s.strategy == crate::model::Strategy::Geo)
    {
        let Some(geo) = &daemon.geo else {
            return Err(Error::invalid(format!(
                "service {}: strategy = \"geo\" needs [daemon.geo] (regions and their failover)",
                s.name
            )));
        };
        if let Some(b) = s
            .backends
            .iter()
            .find(|b| geo.place(b.region.as_deref(), b.zone.as_deref()).is_none())
        {
            return Err(Error::invalid(format!(
                "service {}: backend {} needs a region (or zone) of [daemon.geo] ({}), not {:?}{}",
                s.name,
                b.id,
                geo.regions().join(", "),
                b.region.as_deref().unwrap_or("none"),
                b.zone
                    .as_deref()
                    .map(|z| format!(" (zone {z:?})"))
                    .unwrap_or_default()
            )));
        }
    }
    // Replies to the SNAT source must never be taken for VIP or backend traffic.
    for a in [
        daemon.nat.source4.map(IpAddr::V4),
        daemon.nat.source6.map(IpAddr::V6),
    ]
    .into_iter()
    .flatten()
    {
        if let Some(s) = services.iter().find(|s| s.vip == a) {
            return Err(Error::invalid(format!(
                "daemon.nat source {a} is the VIP of service {}: use the balancer's own address",
                s.name
            )));
        }
        if let Some(s) = services
            .iter()
            .find(|s| s.backends.iter().any(|b| b.address == a))
        {
            return Err(Error::invalid(format!(
                "daemon.nat source {a} is a backend of service {}: use the balancer's own address",
                s.name
            )));
        }
    }
    for s in services.iter().filter(|s| s.snat) {
        if daemon.nat.source_for(s.vip).is_none() {
            let which = if s.vip.is_ipv4() { "source4" } else { "source6" };
            return Err(Error::invalid(format!(
                "service {}: snat needs daemon.nat.{which} (the balancer's address facing the backends)",
                s.name
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[daemon]
instance = "t1"
interfaces = ["eth0"]

[[service]]
name = "auth-service"
vip = "10.0.0.100"
port = 80
protocol = "tcp"

[[service.backend]]
id = "auth-1"
address = "10.0.0.11"
weight = 100
region = "eu-west"

[[service.backend]]
id = "auth-2"
address = "10.0.0.12"
"#;

    #[test]
    fn parses_defaults() {
        let c = Config::parse(GOOD).expect("valid");
        let s = &c.services[0];
        assert_eq!(s.table_size, 65537);
        assert_eq!(s.hash, HashMode::FiveTuple);
        assert_eq!(s.backends[1].weight, DEFAULT_WEIGHT);
        assert_eq!(s.backends[1].port(s), 80);
        assert_eq!(s.backends[0].region.as_deref(), Some("eu-west"));
    }

    fn err(text: &str) -> String {
        Config::parse(text).expect_err("must be rejected").to_string()
    }

    #[test]
    fn rejects_bad_files_with_one_line() {
        let cases = [
            (
                GOOD.replace("65537", "x")
                    .replace("port = 80", "port = 80\ntable_size = 65536"),
                "prime",
            ),
            (GOOD.replace("weight = 100", "weight = 100000"), "out of range"),
            (GOOD.replace("auth-2", "auth-1"), "duplicate backend id"),
            (GOOD.replace("10.0.0.12", "10.0.0.300"), "line"),
            (GOOD.replace("10.0.0.12", "fd00::12"), "same IP family"),
            (GOOD.replace("protocol = \"tcp\"", "protocol = \"sctp\""), "line"),
            (GOOD.replace("[\"eth0\"]", "[]"), "interfaces is empty"),
            (GOOD.replace("region", "regoin"), "unknown field"),
            (GOOD.replace("\"t1\"", "\"..\""), "invalid instance \"..\""),
            (GOOD.replace("\"t1\"", "\"/tmp/x\""), "invalid instance"),
            (GOOD.replace("\"t1\"", "\"a.b\""), "invalid instance"),
            (
                GOOD.replace("interfaces = [\"eth0\"]", "interfaces = [\"eth0\"]\n[daemon.api]\nlisten = \"127.0.0.1:1\""),
                "needs daemon.api.token_file",
            ),
            (
                GOOD.replace(
                    "interfaces = [\"eth0\"]",
                    "interfaces = [\"eth0\"]\n[daemon.api]\nlisten = \"127.0.0.1:1\"\ntoken_file = \"/t\"\ncert_file = \"/c\"",
                ),
                "cert_file and key_file go together",
            ),
            (
                GOOD.replace(
                    "interfaces = [\"eth0\"]",
                    "interfaces = [\"eth0\"]\n[daemon.api]\nlisten = \"10.0.0.1:8443\"\ntoken_file = \"/t\"",
                ),
                "is not loopback and has no TLS",
            ),
            (
                GOOD.replace(
                    "interfaces = [\"eth0\"]",
                    "interfaces = [\"eth0\"]\n[daemon.api]\nreport_services = [\"web\"]",
                ),
                "report_services needs daemon.api.report_token_file",
            ),
            (
                GOOD.replace("interfaces = [\"eth0\"]", "interfaces = [\"eth0\"]\n[daemon.http]\nmax_connections = 0"),
                "daemon.http.max_connections 0 is out of range",
            ),
            (
                GOOD.replace(
                    "interfaces = [\"eth0\"]",
                    "interfaces = [\"eth0\"]\n[daemon.http]\nmax_connections = 8\nmax_connections_per_peer = 9",
                ),
                "above max_connections",
            ),
            (
                GOOD.replace("interfaces = [\"eth0\"]", "interfaces = [\"eth0\"]\n[daemon.nat]\npressure_percent = 0"),
                "pressure_percent 0 is out of range",
            ),
        ];
        for (text, needle) in cases {
            let e = err(&text);
            assert!(e.contains(needle), "{e:?} should mention {needle:?}");
            assert!(!e.contains('\n'), "one line: {e:?}");
        }
        let dup = format!(
            "{GOOD}\n[[service]]\nname = \"auth-service\"\nvip = \"10.0.0.101\"\nport = 80\nprotocol = \"tcp\"\n"
        );
        assert!(err(&dup).contains("duplicate service name"));
        let dupkey = format!(
            "{GOOD}\n[[service]]\nname = \"other\"\nvip = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n"
        );
        assert!(err(&dupkey).contains("duplicates VIP"));
    }

    #[test]
    fn strategies_parse_and_bad_ones_get_one_line() {
        let c = Config::parse(&GOOD.replace(
            "protocol = \"tcp\"",
            "protocol = \"tcp\"\nstrategy = \"power-of-two\"",
        ))
        .expect("valid");
        assert_eq!(c.services[0].strategy, crate::model::Strategy::PowerOfTwo);
        assert_eq!(
            Config::parse(GOOD).unwrap().services[0].strategy,
            crate::model::Strategy::Maglev
        );
        let cases = [
            ("strategy = \"fastest\"", "unknown variant `fastest`"),
            (
                "strategy = \"round-robin\"\nfragments = \"hash\"",
                "needs strategy = \"maglev\"",
            ),
            ("strategy = \"geo\"", "needs [daemon.geo]"),
            (
                "strategy = \"resource-aware\"\nresource = { max_move = 0.0 }",
                "resource.max_move = 0 is out of range (0, 1]",
            ),
            (
                "strategy = \"adaptive\"\nadaptive = { calm = 2.0 }",
                "need 1 <= calm < imbalance",
            ),
        ];
        for (extra, needle) in cases {
            let e = err(&GOOD.replace("protocol = \"tcp\"", &format!("protocol = \"tcp\"\n{extra}")));
            assert!(e.contains(needle), "{e:?} should mention {needle:?}");
            assert!(!e.contains('\n'), "one line: {e:?}");
        }
        for bad in ["0", "1000000001"] {
            let e = err(&GOOD.replace("weight = 100", &format!("weight = 100\nmaxconn = {bad}")));
            assert!(e.contains("maxconn") && e.contains("out of range"), "{e}");
        }
    }

    #[test]
    fn one_fragment_owner_per_vip_and_protocol() {
        let text = |second_port: u16, second_policy: &str| {
            format!(
                "[daemon]\ninterfaces = [\"eth0\"]\n\
                 [[service]]\nname = \"a\"\nvip = \"10.0.0.1\"\nport = 53\nprotocol = \"udp\"\nfragments = \"hash\"\n\
                 [[service]]\nname = \"b\"\nvip = \"10.0.0.1\"\nport = {second_port}\nprotocol = \"udp\"\nfragments = \"{second_policy}\"\n"
            )
        };
        assert!(Config::parse(&text(5353, "pass")).is_ok());
        let err = Config::parse(&text(5353, "hash"))
            .expect_err("two owners")
            .to_string();
        assert!(err.contains("already hashes the fragments"), "{err}");
        let err = Config::parse(&text(5353, "split"))
            .expect_err("bad policy")
            .to_string();
        assert!(err.contains("unknown variant `split`"), "{err}");
    }

    #[test]
    fn health_settings_resolve_and_bad_ones_get_one_line() {
        let with = |service_health: &str, backend_health: &str| {
            format!(
                "[daemon]\ninterfaces = [\"eth0\"]\n[[service]]\nname = \"web\"\nvip = \"10.0.0.1\"\nport = 80\nprotocol = \"tcp\"\n\
                 [service.health]\n{service_health}\n[[service.backend]]\nid = \"b\"\naddress = \"10.0.0.9\"\n{backend_health}\n"
            )
        };
        let c = Config::parse(&with(
            "interval = 2.0",
            "[service.backend.health]\nkind = \"http\"\npath = \"/hc\"\nport = 9000",
        ))
        .expect("valid");
        let s = &c.services[0];
        let checks = crate::model::health_settings::resolve(s, &s.backends[0]).expect("resolves");
        let spec = checks.check.expect("checked");
        assert_eq!(spec.target, "10.0.0.9:9000".parse().unwrap());
        assert_eq!(
            spec.interval,
            std::time::Duration::from_secs(2),
            "the service's key"
        );
        assert_eq!(spec.timeout, std::time::Duration::from_secs(1), "the default");
        assert_eq!((spec.error_threshold, spec.recovery_threshold), (3, 2));
        assert!(
            matches!(spec.probe, crate::model::health_settings::Probe::Http { ref path, status: (200, 399), .. } if path == "/hc")
        );
        assert!(checks.agent.is_none());
        let none = Config::parse(&with("kind = \"none\"", "")).expect("valid");
        assert_eq!(
            crate::model::health_settings::resolve(&none.services[0], &none.services[0].backends[0]).unwrap(),
            Default::default()
        );
        let cases = [
            (with("kind = \"http\"", ""), "needs a path"),
            (
                with("kind = \"http\"\npath = \"no-slash\"", ""),
                "must start with /",
            ),
            (
                with("timeout = 3.0\ninterval = 2.0", ""),
                "longer than the interval",
            ),
            (
                with("error_threshold = 0", ""),
                "error_threshold 0 is out of range",
            ),
            (
                with("recovery_threshold = 0", ""),
                "recovery_threshold 0 is out of range",
            ),
            (with("kind = \"icmp\"", ""), "unknown variant"),
            (
                with("kind = \"http\"\npath = \"/\"\ntls_ca = \"/etc/ca.pem\"", ""),
                "tls_ca needs https = true",
            ),
            (with("min_score = 2.0", ""), "min_score 2 is out of range"),
            (with("jitter = -0.5", ""), "jitter -0.5 is out of range"),
            (with("interval = nan", ""), "out of range"),
            (
                with("kind = \"http\"\npath = \"/\"\nexpect_status = \"600\"", ""),
                "expect_status",
            ),
            (with("kind = \"udp\"", ""), "needs send"),
            (with("kind = \"agent\"", ""), "needs agent_port"),
            (with("agent_port = 0", ""), "agent_port must not be 0"),
            (
                with("agent_absolute_weights = true", ""),
                "agent_absolute_weights needs agent_port",
            ),
            (with("agent_absolute_weights = 1", ""), "line"),
            (
                with("panic_threshold = 1.5", ""),
                "panic_threshold 1.5 is out of range",
            ),
            (
                with("", "[service.backend.health]\npanic_threshold = 0.5"),
                "are service settings",
            ),
            (
                with("breaker_failures = 0", ""),
                "breaker_failures 0 is out of range",
            ),
            (
                with("breaker_failures = 3\nhalf_open_share = 0.0", ""),
                "half_open_share 0 is out of range",
            ),
            (with("intervall = 1.0", ""), "unknown field"),
            (
                with("", "max_new_flows_per_s = 0"),
                "backend b: max_new_flows_per_s 0 is out of range",
            ),
        ];
        for (text, needle) in cases {
            let e = err(&text);
            assert!(e.contains(needle), "{e:?} should mention {needle:?}");
            assert!(!e.contains('\n'), "one line: {e:?}");
        }
        // A UDP service names its probe.
        let udp = with("", "").replace("protocol = \"tcp\"", "protocol = \"udp\"");
        assert!(err(&udp).contains("needs kind = \"udp\""));

        // The agent's absolute weights: opt-in, off by default.
        let c = Config::parse(&with("agent_port = 8082\nagent_absolute_weights = true", "")).expect("valid");
        let s = &c.services[0];
        assert!(crate::model::health_settings::agent_absolute_weights(
            s,
            &s.backends[0]
        ));
        let c = Config::parse(&with("agent_port = 8082", "")).expect("valid");
        let s = &c.services[0];
        assert!(!crate::model::health_settings::agent_absolute_weights(
            s,
            &s.backends[0]
        ));

        // Through the VIP: the VIP and the service's port, steered to the backend's address.
        let c = Config::parse(&with("through = \"vip\"", "")).expect("valid");
        let s = &c.services[0];
        let spec = crate::model::health_settings::resolve(s, &s.backends[0])
            .expect("resolves")
            .check
            .expect("checked");
        assert_eq!(spec.target, "10.0.0.1:80".parse().unwrap());
        assert_eq!(spec.steered_to, Some("10.0.0.9".parse().unwrap()));
        let plain = Config::parse(&with("", "")).expect("valid");
        let p = &plain.services[0];
        let spec = crate::model::health_settings::resolve(p, &p.backends[0])
            .unwrap()
            .check
            .unwrap();
        assert_eq!(
            (spec.target, spec.steered_to),
            ("10.0.0.9:80".parse().unwrap(), None)
        );
        for (text, needle) in [
            (
                with("through = \"vip\"\nport = 81", ""),
                "does not apply with through",
            ),
            (
                with("through = \"vip\"", "").replace("port = 80\n", "port = 80\nforwarding = \"nat\"\n"),
                "for dsr, ipip and gue",
            ),
            (
                with("through = \"vip\"", "").replace("10.0.0.9", "fd00::9"),
                "in the VIP's address family",
            ),
            (with("through = \"tunnel\"", ""), "unknown variant"),
        ] {
            let e = err(&text);
            assert!(e.contains(needle), "{e:?} should mention {needle:?}");
            assert!(!e.contains('\n'), "one line: {e:?}");
        }
    }

    #[test]
    fn nat_settings_are_checked_with_one_line() {
        let nat = |daemon_extra: &str, service_extra: &str| {
            format!(
                "[daemon]\ninterfaces = [\"eth0\"]\n{daemon_extra}\n\
                 [[service]]\nname = \"web\"\nvip = \"10.0.0.1\"\nport = 80\nprotocol = \"tcp\"\n{service_extra}\n"
            )
        };
        let ok = Config::parse(&nat(
            "[daemon.nat]\nsource4 = \"10.97.0.1\"\nports = \"40000-40999\"\nudp_timeout_s = 5",
            "forwarding = \"nat\"\nsnat = true",
        ))
        .expect("valid");
        assert_eq!(ok.daemon.nat.ports.len(), 1000);
        assert_eq!(ok.daemon.nat.udp_timeout_s, 5);
        assert_eq!(ok.daemon.nat.tcp_closing_timeout_s, 60);
        assert!(ok.services[0].snat);
        let cases = [
            (nat("", "forwarding = \"nat\"\nsnat = true"), "daemon.nat.source4"),
            (nat("", "snat = true"), "snat needs forwarding"),
            (
                nat("", "forwarding = \"nat\"\nfragments = \"hash\""),
                "cannot translate fragments",
            ),
            (
                nat("[daemon.nat]\nports = \"5000-4000\"", ""),
                "invalid port range",
            ),
            (nat("[daemon.nat]\nports = \"0-10\"", ""), "invalid port range"),
            (nat("[daemon.nat]\ntcp_timeout_s = 0", ""), "out of range"),
            (nat("[daemon.nat]\nsource4 = \"224.0.0.1\"", ""), "not a unicast"),
            (nat("[daemon.nat]\ntable_size = 10", ""), "too small"),
            (nat("[daemon.nat]\nport_range = \"1-2\"", ""), "unknown field"),
            (
                nat("[daemon.nat]\ngc_interval_ms = 100000000", ""),
                "out of range",
            ),
            (
                nat("[daemon.nat]\nsource4 = \"10.0.0.1\"", "forwarding = \"nat\""),
                "is the VIP of service web",
            ),
            (
                nat(
                    "[daemon.nat]\nsource4 = \"10.0.0.9\"",
                    "forwarding = \"nat\"\n[[service.backend]]\nid = \"b\"\naddress = \"10.0.0.9\"",
                ),
                "is a backend of service web",
            ),
            (
                nat(
                    "",
                    "forwarding = \"nat\"\n[[service.backend]]\nid = \"b\"\naddress = \"10.0.0.9\"",
                )
                .replace("port = 80", "port = 0"),
                "needs a port for backend b",
            ),
        ];
        for (text, needle) in cases {
            let e = err(&text);
            assert!(e.contains(needle), "{e:?} should mention {needle:?}");
            assert!(!e.contains('\n'), "one line: {e:?}");
        }
    }
}
