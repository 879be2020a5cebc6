//! `[service.discovery]`: a registry the service's backends come from, instead of the file or
//! the API. A source publishes the whole set of instances it knows; the writer checks each
//! entry, moves only what changed, drains what left before removing it, and holds a set that
//! suddenly shrinks below half until it persists (`reconcile::discovered`).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

/// Where the instances are read.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A JSON or TOML list of instances, watched for changes.
    File,
    /// SRV records, or A/AAAA records of a hostname, re-resolved at their TTL.
    Dns,
    /// Keys `/lb/<cluster>/instances/<service>/<id>`, each under its registrant's lease.
    Etcd,
}

impl SourceKind {
    pub const fn name(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Dns => "dns",
            Self::Etcd => "etcd",
        }
    }
}

/// Unless set: a removed instance takes no new flows for this long before it is deleted.
pub const DEFAULT_DRAIN_BEFORE_REMOVE: f64 = 10.0;
/// Unless set: how long a set with fewer than half the live backends must persist.
pub const DEFAULT_CONFIRM_SHRINK: f64 = 30.0;
/// Unless set: the bounds on a DNS record's TTL as the time to the next resolution.
pub const DEFAULT_MIN_INTERVAL: f64 = 5.0;
pub const DEFAULT_MAX_INTERVAL: f64 = 300.0;
/// The longest drain, hold and interval a service may ask for.
pub const MAX_SECONDS: f64 = 86_400.0;
/// The shortest interval between two resolutions: a TTL of 0 must not make a query loop.
pub const MIN_INTERVAL_FLOOR: f64 = 0.1;

/// `[service.discovery]` as written.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiscoverySettings {
    pub kind: SourceKind,
    /// file: the list of instances, an absolute path ending `.json` or `.toml`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub path: Option<PathBuf>,
    /// dns: an SRV name (`_web._tcp.svc.example`, it starts with `_`), or a hostname whose A
    /// (IPv4 VIP) or AAAA (IPv6 VIP) records are the backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// dns: the resolver to ask, `ip:port` (default: the system's, from /etc/resolv.conf).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub server: Option<SocketAddr>,
    /// dns, A/AAAA only: the backends' port (default: the service's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// dns: seconds; the records' TTL, kept within these, is the time to the next resolution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_interval: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_interval: Option<f64>,
    /// etcd: the endpoints (default: `[cluster] etcd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<Vec<String>>,
    /// etcd: the cluster name of the keys (default: `[cluster] name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Seconds a removed instance takes no new flows (its connections go on) before it is
    /// deleted; 0 deletes it at once.
    #[serde(default = "default_drain")]
    pub drain_before_remove: f64,
    /// Seconds a set with fewer than half the live backends must persist before it applies.
    #[serde(default = "default_confirm")]
    pub confirm_shrink: f64,
}

fn default_drain() -> f64 {
    DEFAULT_DRAIN_BEFORE_REMOVE
}

fn default_confirm() -> f64 {
    DEFAULT_CONFIRM_SHRINK
}

impl DiscoverySettings {
    /// A source of `kind` with every default: tests and the docs' examples add what they need.
    pub fn new(kind: SourceKind) -> Self {
        Self {
            kind,
            path: None,
            name: None,
            server: None,
            port: None,
            min_interval: None,
            max_interval: None,
            etcd: None,
            cluster: None,
            drain_before_remove: DEFAULT_DRAIN_BEFORE_REMOVE,
            confirm_shrink: DEFAULT_CONFIRM_SHRINK,
        }
    }

    pub fn drain(&self) -> Duration {
        Duration::from_secs_f64(self.drain_before_remove)
    }

    pub fn confirm(&self) -> Duration {
        Duration::from_secs_f64(self.confirm_shrink)
    }

    /// The bounds a DNS record's TTL is kept within.
    pub fn intervals(&self) -> (Duration, Duration) {
        (
            Duration::from_secs_f64(self.min_interval.unwrap_or(DEFAULT_MIN_INTERVAL)),
            Duration::from_secs_f64(self.max_interval.unwrap_or(DEFAULT_MAX_INTERVAL)),
        )
    }

    /// A DNS source's name is an SRV name (else a hostname).
    pub fn is_srv(&self) -> bool {
        self.name.as_deref().is_some_and(|n| n.starts_with('_'))
    }

    /// One line naming the key and its bound when something is off.
    pub fn validate(&self) -> Result<(), String> {
        let kind = self.kind.name();
        for (key, v) in [
            ("drain_before_remove", self.drain_before_remove),
            ("confirm_shrink", self.confirm_shrink),
        ] {
            if !(v.is_finite() && (0.0..=MAX_SECONDS).contains(&v)) {
                return Err(format!("discovery.{key} {v} is out of range 0..={MAX_SECONDS}"));
            }
        }
        // Each key belongs to one kind: a key of another is a mistake, not a no-op.
        let given = [
            ("path", self.path.is_some(), SourceKind::File),
            ("name", self.name.is_some(), SourceKind::Dns),
            ("server", self.server.is_some(), SourceKind::Dns),
            ("port", self.port.is_some(), SourceKind::Dns),
            ("min_interval", self.min_interval.is_some(), SourceKind::Dns),
            ("max_interval", self.max_interval.is_some(), SourceKind::Dns),
            ("etcd", self.etcd.is_some(), SourceKind::Etcd),
            ("cluster", self.cluster.is_some(), SourceKind::Etcd),
        ];
        if let Some((key, _, owner)) = given.iter().find(|(_, set, owner)| *set && *owner != self.kind) {
            return Err(format!(
                "discovery.{key} is for kind = \"{}\", not \"{kind}\"",
                owner.name()
            ));
        }
        match self.kind {
            SourceKind::File => {
                let Some(path) = &self.path else {
                    return Err("discovery kind = \"file\" needs a path".into());
                };
                if !path.is_absolute() {
                    return Err(format!(
                        "discovery.path {} must be absolute (the daemon's directory is not the file's)",
                        path.display()
                    ));
                }
                if !matches!(path.extension().and_then(|e| e.to_str()), Some("json" | "toml")) {
                    return Err(format!(
                        "discovery.path {} must end .json or .toml (its format)",
                        path.display()
                    ));
                }
            }
            SourceKind::Dns => {
                let Some(name) = &self.name else {
                    return Err("discovery kind = \"dns\" needs a name".into());
                };
                validate_dns_name(name)?;
                if self.is_srv() && self.port.is_some() {
                    return Err(
                        "discovery.port is for a hostname's A/AAAA records: an SRV record names its port"
                            .into(),
                    );
                }
                if self.port == Some(0) {
                    return Err("discovery.port must not be 0".into());
                }
                let (min, max) = (
                    self.min_interval.unwrap_or(DEFAULT_MIN_INTERVAL),
                    self.max_interval.unwrap_or(DEFAULT_MAX_INTERVAL),
                );
                for (key, v) in [("min_interval", min), ("max_interval", max)] {
                    if !(v.is_finite() && (MIN_INTERVAL_FLOOR..=MAX_SECONDS).contains(&v)) {
                        return Err(format!(
                            "discovery.{key} {v} is out of range {MIN_INTERVAL_FLOOR}..={MAX_SECONDS}"
                        ));
                    }
                }
                if min > max {
                    return Err(format!(
                        "discovery.min_interval {min} is above max_interval {max}"
                    ));
                }
            }
            SourceKind::Etcd => {
                if let Some(endpoints) = &self.etcd {
                    if endpoints.is_empty() {
                        return Err("discovery.etcd names no endpoint".into());
                    }
                    for e in endpoints {
                        if e.starts_with("https://") {
                            // Its TLS and user are [cluster]'s settings (etcd_ca, ...).
                            return Err(format!(
                                "discovery.etcd {e:?}: a source's own etcd is reached in plaintext only (fix: an http:// endpoint, or leave discovery.etcd and cluster unset to use [cluster]'s etcd with its TLS)"
                            ));
                        }
                        let rest = e.strip_prefix("http://");
                        if rest.is_none_or(|r| r.is_empty() || r.contains(char::is_whitespace)) {
                            return Err(format!("discovery.etcd {e:?} is not an http:// URL"));
                        }
                    }
                }
                if let Some(c) = &self.cluster {
                    super::validate_name("discovery.cluster", c, 64).map_err(|e| e.to_string())?;
                }
                if self.etcd.is_some() != self.cluster.is_some() {
                    return Err(
                        "discovery.etcd and discovery.cluster go together (or neither: [cluster]'s)".into(),
                    );
                }
            }
        }
        Ok(())
    }
}

/// A DNS name as a resolver takes it: labels of 1..=63 letters, digits, `-` or `_`, 253
/// characters at most, an optional final dot.
fn validate_dns_name(name: &str) -> Result<(), String> {
    let bare = name.strip_suffix('.').unwrap_or(name);
    let ok = !bare.is_empty()
        && bare.len() <= 253
        && bare.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        });
    if ok {
        Ok(())
    } else {
        Err(format!("discovery.name {name:?} is not a DNS name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_needs_its_keys_and_refuses_the_others() {
        let mut file = DiscoverySettings::new(SourceKind::File);
        assert!(file.validate().unwrap_err().contains("needs a path"));
        file.path = Some("/etc/lb/web.json".into());
        file.validate().unwrap();
        for (path, needle) in [
            ("web.json", "must be absolute"),
            ("/etc/web.yaml", "must end .json or .toml"),
        ] {
            let bad = DiscoverySettings {
                path: Some(path.into()),
                ..file.clone()
            };
            assert!(bad.validate().unwrap_err().contains(needle), "{path}");
        }
        let stray = DiscoverySettings {
            name: Some("_web._tcp.x".into()),
            ..file.clone()
        };
        assert_eq!(
            stray.validate().unwrap_err(),
            "discovery.name is for kind = \"dns\", not \"file\""
        );

        let mut dns = DiscoverySettings::new(SourceKind::Dns);
        assert!(dns.validate().unwrap_err().contains("needs a name"));
        dns.name = Some("_web._tcp.svc.example".into());
        dns.validate().unwrap();
        assert!(dns.is_srv());
        let cases = [
            (
                DiscoverySettings {
                    port: Some(80),
                    ..dns.clone()
                },
                "an SRV record names its port",
            ),
            (
                DiscoverySettings {
                    name: Some("web..example".into()),
                    ..dns.clone()
                },
                "is not a DNS name",
            ),
            (
                DiscoverySettings {
                    min_interval: Some(0.0),
                    ..dns.clone()
                },
                "min_interval 0 is out of range",
            ),
            (
                DiscoverySettings {
                    min_interval: Some(60.0),
                    max_interval: Some(10.0),
                    ..dns.clone()
                },
                "above max_interval",
            ),
            (
                DiscoverySettings {
                    drain_before_remove: -1.0,
                    ..dns.clone()
                },
                "drain_before_remove -1 is out of range",
            ),
            (
                DiscoverySettings {
                    confirm_shrink: f64::NAN,
                    ..dns.clone()
                },
                "confirm_shrink NaN is out of range",
            ),
        ];
        for (bad, needle) in cases {
            let e = bad.validate().unwrap_err();
            assert!(e.contains(needle) && !e.contains('\n'), "{e}");
        }
        let host = DiscoverySettings {
            name: Some("web.svc.example.".into()),
            port: Some(8080),
            ..dns
        };
        host.validate().unwrap();
        assert!(!host.is_srv());

        let mut etcd = DiscoverySettings::new(SourceKind::Etcd);
        etcd.validate().unwrap();
        etcd.etcd = Some(vec!["http://10.0.0.1:2379".into()]);
        assert!(etcd.validate().unwrap_err().contains("go together"));
        etcd.cluster = Some("edge".into());
        etcd.validate().unwrap();
        etcd.etcd = Some(vec!["10.0.0.1:2379".into()]);
        assert!(etcd.validate().unwrap_err().contains("not an http://"));
        etcd.etcd = Some(vec!["https://10.0.0.1:2379".into()]);
        assert!(etcd.validate().unwrap_err().contains("plaintext only"));
    }
}
