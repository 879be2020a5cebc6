//! The `dns` source, through hickory-resolver: a name's SRV records (HAProxy's
//! `server-template`), or a hostname's A (IPv4 VIP) or AAAA (IPv6 VIP) records, asked of the
//! system's resolver or of `server`. Resolved again when the records' TTL runs out, kept within
//! `min_interval` and `max_interval`; after a failure, `min_interval` later.
//!
//! - SRV: the records of the lowest priority number are the set (RFC 2782: the others are
//!   fallbacks for when those cannot be reached; health checks and panic mode do that job
//!   within the set). Each target's addresses come from the answer's additional section or a
//!   query of their own; the record's weight is the backend's weight (0, "rarely", becomes 1),
//!   its port the backend's. A target of "." (no service there) adds nothing.
//! - A/AAAA: every address, on `port` (default: the service's), at the default weight.
//!
//! A backend's id is its address and port (`10.0.1.1-8080`, `fd00__1-8080`): stable while the
//! records are, and unique in the set. SRV backends carry their target's name as the label
//! `target`.
//!
//! A name that does not exist, or has no such records, is an empty set (which the writer's
//! shrink guard holds); a resolver that fails or does not answer is an error, and the writer
//! keeps the last set.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use hickory_resolver::{
    TokioResolver,
    config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts},
    net::{NetError, runtime::TokioRuntimeProvider},
    proto::rr::{RData, Record},
};
use log::debug;

use super::Reporter;
use crate::status::discovery::{Entries, Entry, ErrorReason, Malformed, SourceError};

/// How long one query may take before the resolver is said not to answer (a resolver near
/// the balancer answers in milliseconds; UDP, then TCP, each get this long).
const QUERY_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one whole read may take (an SRV query and its targets' queries).
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Resolves now and again as the records' TTL says, until the writer is gone.
pub async fn run(reporter: Reporter, v6: bool) {
    let settings = reporter.settings.clone();
    let Some(name) = settings.name.clone() else {
        return;
    };
    let (min, max) = settings.intervals();
    let resolver = loop {
        match resolver(settings.server) {
            Ok(r) => break r,
            // No system resolver to read: said, and tried again later.
            Err(e) => {
                if !reporter.send(Err(e)).await {
                    return;
                }
                tokio::time::sleep(max).await;
            }
        }
    };
    let query = Query {
        name: fqdn(&name),
        srv: settings.is_srv(),
        port: settings.port,
        v6,
    };
    loop {
        // Every answer fresh from the server: the records' TTL is this loop's to keep.
        resolver.clear_cache();
        let read = match tokio::time::timeout(READ_TIMEOUT, query.read(&resolver)).await {
            Ok(r) => r,
            Err(_) => Err(SourceError::new(
                ErrorReason::Timeout,
                format!("{name}: no answer within {READ_TIMEOUT:?}"),
            )),
        };
        // In one order: servers rotate their answers, and the same records are the same set.
        let read = read.map(|(mut entries, ttl)| {
            entries.sort_by(|x, y| match (x, y) {
                (Ok(x), Ok(y)) => x.id.cmp(&y.id),
                (Err(x), Err(y)) => x.at.cmp(&y.at),
                (Ok(_), Err(_)) => std::cmp::Ordering::Less,
                (Err(_), Ok(_)) => std::cmp::Ordering::Greater,
            });
            (entries, ttl)
        });
        let wait = match &read {
            Ok((entries, ttl)) => {
                let wait = next_read(*ttl, min, max);
                debug!("dns {name}: {} entries, next in {wait:?}", entries.len());
                wait
            }
            Err(_) => min,
        };
        if !reporter.send(read.map(|(entries, _)| entries)).await {
            return;
        }
        tokio::time::sleep(wait).await;
    }
}

/// When to read again after a good read: at the records' shortest TTL, kept within the
/// bounds; with no record (nothing to time it), at the shortest bound.
fn next_read(ttl: Option<Duration>, min: Duration, max: Duration) -> Duration {
    ttl.unwrap_or(min).clamp(min, max)
}

/// The system's resolver (/etc/resolv.conf), or `server` alone, over UDP and TCP; one
/// attempt per query, so a dead resolver is said within `QUERY_TIMEOUT`.
fn resolver(server: Option<SocketAddr>) -> Result<TokioResolver, SourceError> {
    let mut builder = match server {
        Some(addr) => {
            let connections = [ConnectionConfig::udp(), ConnectionConfig::tcp()]
                .into_iter()
                .map(|mut c| {
                    c.port = addr.port();
                    c
                })
                .collect();
            let config =
                ResolverConfig::from_name_servers(vec![NameServerConfig::new(addr.ip(), true, connections)]);
            TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        }
        None => TokioResolver::builder_tokio().map_err(|e| {
            SourceError::new(
                ErrorReason::Resolve,
                format!("no system resolver (/etc/resolv.conf): {e}"),
            )
        })?,
    };
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.timeout = QUERY_TIMEOUT;
    opts.attempts = 1;
    builder
        .build()
        .map_err(|e| SourceError::new(ErrorReason::Resolve, format!("resolver: {e}")))
}

/// A name as a fully qualified one: asked as it is, never with the search domains.
fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

/// What one read asks.
struct Query {
    name: String,
    srv: bool,
    /// A/AAAA: the backends' port.
    port: Option<u16>,
    v6: bool,
}

impl Query {
    /// The set, and the shortest TTL of the records that made it (`None`: no record).
    async fn read(&self, r: &TokioResolver) -> Result<(Entries, Option<Duration>), SourceError> {
        if self.srv {
            self.read_srv(r).await
        } else {
            let (addresses, ttl) = match self.addresses(r, &self.name).await? {
                Some(found) => found,
                None => return Ok((Vec::new(), None)),
            };
            let entries = addresses
                .into_iter()
                .map(|a| Ok(entry(a, self.port, None, None)))
                .collect();
            Ok((entries, ttl))
        }
    }

    async fn read_srv(&self, r: &TokioResolver) -> Result<(Entries, Option<Duration>), SourceError> {
        let lookup = match r.srv_lookup(self.name.as_str()).await {
            Ok(l) => l,
            Err(e) if e.is_no_records_found() => return Ok((Vec::new(), None)),
            Err(e) => return Err(failed(&self.name, &e)),
        };
        let records: Vec<Srv> = lookup
            .answers()
            .iter()
            .filter_map(|rec| match &rec.data {
                RData::SRV(s) => Some(Srv {
                    priority: s.priority,
                    weight: s.weight,
                    port: s.port,
                    target: s.target.to_ascii(),
                    ttl: rec.ttl,
                }),
                _ => None,
            })
            .collect();
        let mut ttl = records.iter().map(|s| s.ttl).min();
        let mut entries = Vec::new();
        for s in lowest_priority(&records) {
            if s.target == "." {
                continue;
            }
            // The server's additional section first (dnsmasq, BIND send it), else a query.
            let (addresses, target_ttl) = match glue(lookup.additionals(), &s.target, self.v6) {
                Some(found) => found,
                None => match self.addresses(r, &s.target).await? {
                    Some((a, t)) => (a, t.map_or(u32::MAX, |t| t.as_secs() as u32)),
                    None => {
                        entries.push(Err(Malformed {
                            at: s.target.trim_end_matches('.').to_string(),
                            why: format!(
                                "target {} has no {} record",
                                s.target,
                                if self.v6 { "AAAA" } else { "A" }
                            ),
                        }));
                        continue;
                    }
                },
            };
            ttl = ttl.map(|t| t.min(target_ttl));
            for a in addresses {
                entries.push(Ok(entry(
                    a,
                    Some(s.port),
                    Some(s.weight.max(1).into()),
                    Some(&s.target),
                )));
            }
        }
        Ok((entries, ttl.map(|t| Duration::from_secs(t.into()))))
    }

    /// A name's addresses of the VIP's family and their shortest TTL; `None` when it has none.
    async fn addresses(
        &self,
        r: &TokioResolver,
        name: &str,
    ) -> Result<Option<(Vec<IpAddr>, Option<Duration>)>, SourceError> {
        let lookup = if self.v6 {
            r.ipv6_lookup(name).await
        } else {
            r.ipv4_lookup(name).await
        };
        let lookup = match lookup {
            Ok(l) => l,
            Err(e) if e.is_no_records_found() => return Ok(None),
            Err(e) => return Err(failed(name, &e)),
        };
        let mut ttl = None::<u32>;
        let mut out = Vec::new();
        for rec in lookup.answers() {
            if let Some(a) = rec.data.ip_addr().filter(|a| a.is_ipv6() == self.v6) {
                out.push(a);
                ttl = Some(ttl.map_or(rec.ttl, |t| t.min(rec.ttl)));
            }
        }
        if out.is_empty() {
            return Ok(None);
        }
        Ok(Some((out, ttl.map(|t| Duration::from_secs(t.into())))))
    }
}

/// One SRV record, as read.
#[derive(Clone, Debug, PartialEq)]
struct Srv {
    priority: u16,
    weight: u16,
    port: u16,
    /// Its target as written, with the final dot.
    target: String,
    ttl: u32,
}

/// The records of the lowest priority number (RFC 2782: the most preferred).
fn lowest_priority(records: &[Srv]) -> Vec<&Srv> {
    let best = records.iter().map(|s| s.priority).min();
    records.iter().filter(|s| Some(s.priority) == best).collect()
}

/// A target's addresses of the VIP's family from an answer's additional section, and their
/// shortest TTL; `None` when it carries none.
fn glue(additionals: &[Record], target: &str, v6: bool) -> Option<(Vec<IpAddr>, u32)> {
    let mut ttl = u32::MAX;
    let found: Vec<IpAddr> = additionals
        .iter()
        .filter(|rec| rec.name.to_ascii().eq_ignore_ascii_case(target))
        .filter_map(|rec| {
            let a = rec.data.ip_addr().filter(|a| a.is_ipv6() == v6)?;
            ttl = ttl.min(rec.ttl);
            Some(a)
        })
        .collect();
    (!found.is_empty()).then_some((found, ttl))
}

/// One backend of the set: its id from its address and port.
fn entry(address: IpAddr, port: Option<u16>, weight: Option<u32>, target: Option<&str>) -> Entry {
    let host = address.to_string().replace(':', "_");
    let id = match port {
        Some(p) => format!("{host}-{p}"),
        None => host,
    };
    let labels = target
        .map(|t| BTreeMap::from([("target".to_string(), t.trim_end_matches('.').to_string())]))
        .unwrap_or_default();
    Entry {
        id,
        address: address.to_string(),
        port,
        weight,
        zone: None,
        region: None,
        labels,
    }
}

/// A failed query as the source says it: timed out, or the resolver's error, on one line.
fn failed(name: &str, e: &NetError) -> SourceError {
    let reason = if matches!(e, NetError::Timeout) {
        ErrorReason::Timeout
    } else {
        ErrorReason::Resolve
    };
    let message = e.to_string();
    SourceError::new(
        reason,
        format!("{name}: {}", message.lines().next().unwrap_or("resolver error")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn srv(priority: u16, weight: u16, target: &str) -> Srv {
        Srv {
            priority,
            weight,
            port: 8080,
            target: target.into(),
            ttl: 30,
        }
    }

    #[test]
    fn the_lowest_priority_number_is_the_set() {
        let records = [srv(20, 5, "c."), srv(10, 1, "a."), srv(10, 0, "b.")];
        let best: Vec<&str> = lowest_priority(&records)
            .iter()
            .map(|s| s.target.as_str())
            .collect();
        assert_eq!(best, ["a.", "b."]);
        assert!(lowest_priority(&[]).is_empty());
    }

    #[test]
    fn the_next_read_is_at_the_ttl_within_the_bounds() {
        let s = Duration::from_secs;
        assert_eq!(next_read(Some(s(30)), s(5), s(300)), s(30));
        assert_eq!(next_read(Some(s(0)), s(5), s(300)), s(5));
        assert_eq!(next_read(Some(s(86_400)), s(5), s(300)), s(300));
        assert_eq!(next_read(None, s(5), s(300)), s(5));
    }

    #[test]
    fn an_entry_is_named_by_its_address_and_port() {
        let e = entry(
            "10.0.1.1".parse().unwrap(),
            Some(8080),
            Some(5),
            Some("web1.svc.example."),
        );
        assert_eq!(
            (e.id.as_str(), e.port, e.weight),
            ("10.0.1.1-8080", Some(8080), Some(5))
        );
        assert_eq!(e.labels["target"], "web1.svc.example");
        let e = entry("fd00::1".parse().unwrap(), None, None, None);
        assert_eq!(e.id, "fd00__1");
        crate::model::validate_name("backend id", &e.id, 64).unwrap();
        assert!(e.labels.is_empty());
        assert_eq!(fqdn("_web._tcp.x"), "_web._tcp.x.");
        assert_eq!(fqdn("x."), "x.");
    }
}
