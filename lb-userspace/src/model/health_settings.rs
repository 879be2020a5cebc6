//! `[service.health]` and `[service.backend.health]`: the settings as written (every key
//! optional), and the resolved check of one backend (service settings, then the backend's
//! overrides key by key, then the defaults).

use std::{net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};

use super::{Backend, Protocol, Service};

/// What the checks probe.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    None,
    Tcp,
    Http,
    Udp,
    /// Only the agent (`agent_port`): no check of the service itself.
    Agent,
}

/// Flows pinned to a backend that goes down: picked again from the tables (the default) or
/// left where they are.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DownFlows {
    #[default]
    Repick,
    Keep,
}

/// In panic (no backend up, or fewer than `panic_threshold` of them when it is set), a service
/// spreads over all of them (`all`, Envoy's panic mode) or keeps to the healthy ones
/// (`healthy`).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnPanic {
    #[default]
    All,
    Healthy,
}

/// Where a check goes: to the backend's own address (the default), or to the VIP, steered to
/// this backend by the data plane as client traffic is (DSR, IPIP and GUE services).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Through {
    #[default]
    Backend,
    Vip,
}

/// The keys as written. `None` = not set here.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthSettings {
    pub kind: Option<CheckKind>,
    /// Seconds between checks of a backend in a settled state.
    pub interval: Option<f64>,
    /// Seconds a check may take.
    pub timeout: Option<f64>,
    /// Seconds between checks while a backend is between states (HAProxy's fastinter).
    pub fast_interval: Option<f64>,
    /// Random spread of each interval, as a fraction of it.
    pub jitter: Option<f64>,
    /// Consecutive failures that take a backend down.
    pub error_threshold: Option<u32>,
    /// Consecutive successes that bring it back.
    pub recovery_threshold: Option<u32>,
    /// Port to check (default: the backend's port; with `through = "vip"`, the service's).
    pub port: Option<u16>,
    /// `"backend"` (its own address) or `"vip"` (the VIP and port, steered to this backend
    /// through the data path: proves the backend answers for the VIP as clients reach it).
    pub through: Option<Through>,
    /// `http`: the path to GET, and the Host header (default: the backend's address).
    pub path: Option<String>,
    pub host: Option<String>,
    /// `http`: statuses that pass, `"200-399"` or `"200"`.
    pub expect_status: Option<String>,
    /// `http`: text the body must hold.
    pub expect_body: Option<String>,
    /// `http`: over TLS (HTTPS). Without `tls_ca` the backend's certificate is not checked
    /// (the check is encrypted, not authenticated), as HAProxy's `check-ssl verify none`.
    pub https: Option<bool>,
    /// `http` with `https`: a PEM file of CA certificates the backend's certificate must chain
    /// to, for the name in `host` (default: the backend's address).
    pub tls_ca: Option<String>,
    /// `udp`: the datagram to send, and text the reply must hold.
    pub send: Option<String>,
    pub expect: Option<String>,
    /// HAProxy agent-check: the agent's port (beside any `kind`, or alone with `kind = "agent"`),
    /// what to send it first, and how often to ask (default: `interval`).
    pub agent_port: Option<u16>,
    pub agent_send: Option<String>,
    pub agent_interval: Option<f64>,
    /// The agent's `weight:N` sets the weight as it is. Unset or false: at most 256 % of the
    /// configured weight (HAProxy's bound), so a backend cannot lift itself over the others.
    pub agent_absolute_weights: Option<bool>,
    /// Circuit breaker: consecutive failures that open it (unset: no breaker), seconds it stays
    /// open, and the share of its normal weight it gets while half-open.
    pub breaker_failures: Option<u32>,
    pub breaker_cooldown: Option<f64>,
    pub half_open_share: Option<f64>,
    /// Passive health (TCP services): client SYN retransmits count as failures. On by default.
    pub passive: Option<bool>,
    /// Retransmits per first SYN in an interval (0.5 s) that make one failure.
    pub passive_threshold: Option<f64>,
    /// First SYNs an interval needs to be judged.
    pub passive_min_samples: Option<u32>,
    /// A score below this takes a backend down.
    pub min_score: Option<f64>,
    pub down_flows: Option<DownFlows>,
    /// Seconds over which a recovered backend's weight ramps up linearly (0 = off).
    pub slow_start: Option<f64>,
    /// Service only: the share of backends that must be up to leave panic mode (Envoy's; 0
    /// never panics). Unset: panic only when none is up.
    pub panic_threshold: Option<f64>,
    /// Service only.
    pub on_panic: Option<OnPanic>,
}

pub const DEFAULT_INTERVAL: f64 = 5.0;
pub const DEFAULT_TIMEOUT: f64 = 1.0;
pub const DEFAULT_FAST_INTERVAL: f64 = 1.0;
pub const DEFAULT_JITTER: f64 = 0.2;
pub const DEFAULT_ERROR_THRESHOLD: u32 = 3;
pub const DEFAULT_RECOVERY_THRESHOLD: u32 = 2;
pub const DEFAULT_MIN_SCORE: f64 = 0.1;
pub const DEFAULT_BREAKER_COOLDOWN: f64 = 30.0;
pub const DEFAULT_HALF_OPEN_SHARE: f64 = 0.1;
pub const DEFAULT_PASSIVE_THRESHOLD: f64 = 0.3;
pub const DEFAULT_PASSIVE_MIN_SAMPLES: u32 = 5;

/// The circuit breaker's settings (`health::breaker`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BreakerSpec {
    pub failures: u32,
    pub cooldown: Duration,
    pub half_open_share: f64,
    pub recovery: u32,
}

/// Passive health's settings (`health::passive`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PassiveSpec {
    /// Retransmits per first SYN that make a failure.
    pub threshold: f64,
    /// First SYNs needed in an interval to judge it.
    pub min_samples: u32,
}

/// What one check does.
#[derive(Clone, Debug, PartialEq)]
pub enum Probe {
    None,
    Tcp,
    Http {
        path: String,
        host: Option<String>,
        status: (u16, u16),
        body: Option<String>,
        /// HTTPS: `Some(ca)`, with the CA file that must vouch for the backend (`None`: not
        /// verified).
        tls: Option<Option<String>>,
    },
    Udp {
        send: Vec<u8>,
        expect: Option<Vec<u8>>,
    },
}

/// One backend's resolved check.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckSpec {
    pub probe: Probe,
    pub target: SocketAddr,
    pub interval: Duration,
    pub timeout: Duration,
    pub fast_interval: Duration,
    pub jitter: f64,
    pub error_threshold: u32,
    pub recovery_threshold: u32,
    pub min_score: f64,
    pub slow_start: Duration,
    pub breaker: Option<BreakerSpec>,
    pub passive: Option<PassiveSpec>,
    /// `through = "vip"`: the backend's address (the target is the VIP); the data path steers
    /// the check to it.
    pub steered_to: Option<std::net::IpAddr>,
}

/// One backend's agent check.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentSpec {
    pub target: SocketAddr,
    pub send: Option<Vec<u8>>,
    pub interval: Duration,
    pub timeout: Duration,
    pub jitter: f64,
}

/// What runs against one backend.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Checks {
    pub check: Option<CheckSpec>,
    pub agent: Option<AgentSpec>,
}

/// A service's panic settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PanicSpec {
    /// `panic_threshold` as set. Unset is not Envoy's 0.5: with one of three backends up, that
    /// sends two thirds of new flows to backends the checks call dead, so by default only a
    /// service with none up (where any answer beats none) panics.
    pub threshold: Option<f64>,
    pub on_panic: OnPanic,
}

impl PanicSpec {
    pub fn of(service: &Service) -> Self {
        let s = service.health.as_ref();
        Self {
            threshold: s.and_then(|s| s.panic_threshold),
            on_panic: s.and_then(|s| s.on_panic).unwrap_or_default(),
        }
    }

    /// Whether `healthy` of `candidates` (reachable, undrained) backends up is panic.
    pub fn panics(&self, healthy: usize, candidates: usize) -> bool {
        candidates > 0
            && match self.threshold {
                Some(t) => (healthy as f64) < t * candidates as f64,
                None => healthy == 0,
            }
    }
}

/// What happens to a down backend's pinned flows.
pub fn down_flows(service: &Service, backend: &Backend) -> DownFlows {
    pick(service.health.as_ref(), backend.health.as_ref(), |h| {
        &h.down_flows
    })
    .unwrap_or_default()
}

/// Whether the backend's agent may set any weight with `weight:N` (else at most 256 % of the
/// configured one).
pub fn agent_absolute_weights(service: &Service, backend: &Backend) -> bool {
    pick(service.health.as_ref(), backend.health.as_ref(), |h| {
        &h.agent_absolute_weights
    })
    .unwrap_or(false)
}

/// The backend's setting if it has one, else the service's.
fn pick<T: Clone>(
    service: Option<&HealthSettings>,
    backend: Option<&HealthSettings>,
    key: fn(&HealthSettings) -> &Option<T>,
) -> Option<T> {
    backend
        .and_then(|b| key(b).clone())
        .or_else(|| service.and_then(|s| key(s).clone()))
}

fn secs(v: f64) -> Duration {
    Duration::from_secs_f64(v)
}

/// Parses `"200-399"` or `"204"`.
pub fn parse_status_range(text: &str) -> Result<(u16, u16), String> {
    let bad = || {
        format!("expect_status {text:?} must be a status (\"200\") or a range (\"200-399\") within 100..=599")
    };
    let (a, b) = text.split_once('-').unwrap_or((text, text));
    let lo: u16 = a.trim().parse().map_err(|_| bad())?;
    let hi: u16 = b.trim().parse().map_err(|_| bad())?;
    if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

/// What runs against one backend: nothing without `[service.health]` (or with kind `none` and
/// no agent).
pub fn resolve(service: &Service, backend: &Backend) -> Result<Checks, String> {
    let (s, b) = (service.health.as_ref(), backend.health.as_ref());
    if s.is_none() && b.is_none() {
        return Ok(Checks::default());
    }
    let check = resolve_check(service, backend)?;
    let agent = match pick(s, b, |h| &h.agent_port) {
        None if pick(s, b, |h| &h.kind) == Some(CheckKind::Agent) => {
            return Err("kind = \"agent\" needs agent_port".into());
        }
        None if pick(s, b, |h| &h.agent_absolute_weights) == Some(true) => {
            return Err("agent_absolute_weights needs agent_port".into());
        }
        None => None,
        Some(0) => return Err("agent_port must not be 0".into()),
        Some(port) => {
            let interval = pick(s, b, |h| &h.agent_interval)
                .or_else(|| pick(s, b, |h| &h.interval))
                .unwrap_or(DEFAULT_INTERVAL);
            let timeout = pick(s, b, |h| &h.timeout).unwrap_or(DEFAULT_TIMEOUT.min(interval));
            if !interval.is_finite() || !(0.01..=3600.0).contains(&interval) {
                return Err(format!(
                    "health agent_interval {interval} is out of range 0.01..=3600"
                ));
            }
            if timeout > interval {
                return Err(format!(
                    "health timeout {timeout} is longer than the agent_interval {interval}"
                ));
            }
            let jitter = pick(s, b, |h| &h.jitter).unwrap_or(DEFAULT_JITTER);
            if !(0.0..=1.0).contains(&jitter) {
                return Err(format!("health jitter {jitter} is out of range 0..=1"));
            }
            Some(AgentSpec {
                target: SocketAddr::new(backend.address, port),
                send: pick(s, b, |h| &h.agent_send).map(|t| {
                    let mut bytes = t.into_bytes();
                    if !bytes.ends_with(b"\n") {
                        bytes.push(b'\n');
                    }
                    bytes
                }),
                interval: secs(interval),
                timeout: secs(timeout),
                jitter,
            })
        }
    };
    Ok(Checks { check, agent })
}

/// The active check of one backend, if any.
fn resolve_check(service: &Service, backend: &Backend) -> Result<Option<CheckSpec>, String> {
    let (s, b) = (service.health.as_ref(), backend.health.as_ref());
    let kind = match (pick(s, b, |h| &h.kind), service.protocol) {
        (Some(kind), _) => kind,
        (None, Protocol::Tcp) => CheckKind::Tcp,
        // A UDP service has no default probe: what to send is the user's to say.
        (None, Protocol::Udp) => {
            return Err("a UDP service's health check needs kind = \"udp\" (with send) or \"none\"".into());
        }
    };
    let probe = match kind {
        CheckKind::None | CheckKind::Agent => return Ok(None),
        CheckKind::Tcp => Probe::Tcp,
        CheckKind::Http => {
            let path = pick(s, b, |h| &h.path).ok_or("an http check needs a path")?;
            if !path.starts_with('/') || path.chars().any(|c| c.is_control() || c == ' ') {
                return Err(format!(
                    "http check path {path:?} must start with / and hold no spaces or control characters"
                ));
            }
            let host = pick(s, b, |h| &h.host);
            if let Some(h) = &host
                && (h.is_empty() || h.chars().any(|c| c.is_control() || c == ' '))
            {
                return Err(format!("http check host {h:?} is not a host name"));
            }
            let status = match pick(s, b, |h| &h.expect_status) {
                Some(t) => parse_status_range(&t)?,
                None => (200, 399),
            };
            let https = pick(s, b, |h| &h.https).unwrap_or(false);
            let ca = pick(s, b, |h| &h.tls_ca);
            if ca.is_some() && !https {
                return Err("tls_ca needs https = true".into());
            }
            if let Some(c) = &ca
                && c.is_empty()
            {
                return Err("tls_ca must name a PEM file".into());
            }
            Probe::Http {
                path,
                host,
                status,
                body: pick(s, b, |h| &h.expect_body),
                tls: https.then_some(ca),
            }
        }
        CheckKind::Udp => {
            let send = pick(s, b, |h| &h.send).ok_or("a udp check needs send (the datagram to send)")?;
            if send.is_empty() {
                return Err("a udp check's send must not be empty".into());
            }
            Probe::Udp {
                send: send.into_bytes(),
                expect: pick(s, b, |h| &h.expect).map(String::into_bytes),
            }
        }
    };
    let interval = pick(s, b, |h| &h.interval).unwrap_or(DEFAULT_INTERVAL);
    let timeout = pick(s, b, |h| &h.timeout).unwrap_or(DEFAULT_TIMEOUT.min(interval));
    let fast = pick(s, b, |h| &h.fast_interval).unwrap_or(DEFAULT_FAST_INTERVAL.min(interval));
    let jitter = pick(s, b, |h| &h.jitter).unwrap_or(DEFAULT_JITTER);
    let slow_start = pick(s, b, |h| &h.slow_start).unwrap_or(0.0);
    let min_score = pick(s, b, |h| &h.min_score).unwrap_or(DEFAULT_MIN_SCORE);
    for (name, v, lo, hi) in [
        ("interval", interval, 0.01, 3600.0),
        ("timeout", timeout, 0.001, 3600.0),
        ("fast_interval", fast, 0.01, 3600.0),
        ("jitter", jitter, 0.0, 1.0),
        ("slow_start", slow_start, 0.0, 3600.0),
        ("min_score", min_score, 0.0, 1.0),
    ] {
        if !v.is_finite() || v < lo || v > hi {
            return Err(format!("health {name} {v} is out of range {lo}..={hi}"));
        }
    }
    if timeout > interval {
        return Err(format!(
            "health timeout {timeout} is longer than the interval {interval}"
        ));
    }
    if timeout > fast {
        return Err(format!(
            "health timeout {timeout} is longer than the fast_interval {fast}"
        ));
    }
    let error_threshold = pick(s, b, |h| &h.error_threshold).unwrap_or(DEFAULT_ERROR_THRESHOLD);
    let recovery_threshold = pick(s, b, |h| &h.recovery_threshold).unwrap_or(DEFAULT_RECOVERY_THRESHOLD);
    for (name, v) in [
        ("error_threshold", error_threshold),
        ("recovery_threshold", recovery_threshold),
    ] {
        if !(1..=100).contains(&v) {
            return Err(format!("health {name} {v} is out of range 1..=100"));
        }
    }
    let breaker = match pick(s, b, |h| &h.breaker_failures) {
        None => None,
        Some(failures) => {
            let cooldown = pick(s, b, |h| &h.breaker_cooldown).unwrap_or(DEFAULT_BREAKER_COOLDOWN);
            let share = pick(s, b, |h| &h.half_open_share).unwrap_or(DEFAULT_HALF_OPEN_SHARE);
            if !(1..=1000).contains(&failures) {
                return Err(format!(
                    "health breaker_failures {failures} is out of range 1..=1000"
                ));
            }
            if !cooldown.is_finite() || !(0.01..=86400.0).contains(&cooldown) {
                return Err(format!(
                    "health breaker_cooldown {cooldown} is out of range 0.01..=86400"
                ));
            }
            if !share.is_finite() || !(0.0..=1.0).contains(&share) || share == 0.0 {
                return Err(format!("health half_open_share {share} is out of range (0, 1]"));
            }
            Some(BreakerSpec {
                failures,
                cooldown: secs(cooldown),
                half_open_share: share,
                recovery: recovery_threshold,
            })
        }
    };
    let passive = if pick(s, b, |h| &h.passive) != Some(false) && service.protocol == Protocol::Tcp {
        let threshold = pick(s, b, |h| &h.passive_threshold).unwrap_or(DEFAULT_PASSIVE_THRESHOLD);
        let min_samples = pick(s, b, |h| &h.passive_min_samples).unwrap_or(DEFAULT_PASSIVE_MIN_SAMPLES);
        if !threshold.is_finite() || !(0.01..=100.0).contains(&threshold) {
            return Err(format!(
                "health passive_threshold {threshold} is out of range 0.01..=100"
            ));
        }
        if !(1..=1_000_000).contains(&min_samples) {
            return Err(format!(
                "health passive_min_samples {min_samples} is out of range 1..=1000000"
            ));
        }
        Some(PassiveSpec {
            threshold,
            min_samples,
        })
    } else {
        None
    };
    let through = pick(s, b, |h| &h.through).unwrap_or_default();
    let (address, port, steered_to) = match through {
        Through::Backend => (
            backend.address,
            pick(s, b, |h| &h.port).unwrap_or_else(|| backend.port(service)),
            None,
        ),
        Through::Vip => {
            if service.forwarding == crate::model::Forwarding::Nat {
                return Err(
                    "through = \"vip\" is for dsr, ipip and gue services (a NAT service's check of the backend is already what clients reach)"
                        .into(),
                );
            }
            if backend.address.is_ipv4() != service.vip.is_ipv4() {
                return Err("through = \"vip\" needs the backend in the VIP's address family".into());
            }
            let port = match (service.port, pick(s, b, |h| &h.port)) {
                (0, Some(p)) => p,
                (0, None) => 0,
                (p, None) => p,
                (_, Some(_)) => {
                    return Err("health port does not apply with through = \"vip\" (the check goes to the service's port)".into());
                }
            };
            (service.vip, port, Some(backend.address))
        }
    };
    if port == 0 {
        return Err(format!(
            "backend {} has no port to check (the service takes every port): set health port",
            backend.id
        ));
    }
    Ok(Some(CheckSpec {
        probe,
        target: SocketAddr::new(address, port),
        steered_to,
        interval: secs(interval),
        timeout: secs(timeout),
        fast_interval: secs(fast),
        jitter,
        error_threshold,
        recovery_threshold,
        min_score,
        slow_start: secs(slow_start),
        breaker,
        passive,
    }))
}

/// Checks every backend's resolved settings and the service-only keys.
pub fn validate_service(service: &Service) -> Result<(), String> {
    if let Some(t) = service.health.as_ref().and_then(|h| h.panic_threshold)
        && !(t.is_finite() && (0.0..=1.0).contains(&t))
    {
        return Err(format!("health panic_threshold {t} is out of range 0..=1"));
    }
    // The service's own settings, as a backend with none of its own would get them: a bad key
    // is refused before any backend is added.
    if service.health.is_some() {
        let probe = Backend {
            port: Some(service.port.max(1)),
            weight: 0,
            ..Backend::new("probe", service.vip)
        };
        resolve(service, &probe)?;
    }
    for b in &service.backends {
        if let Some(h) = &b.health
            && (h.panic_threshold.is_some() || h.on_panic.is_some())
        {
            return Err(format!(
                "backend {}: panic_threshold and on_panic are service settings ([service.health])",
                b.id
            ));
        }
        resolve(service, b).map_err(|e| format!("backend {}: {e}", b.id))?;
    }
    Ok(())
}
