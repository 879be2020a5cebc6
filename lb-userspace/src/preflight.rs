//! `lb config check`: what the daemon would refuse in a config file, found by the daemon's own
//! code in the daemon's order, without a daemon or root; and what is legal but suspect.
//!
//! Errors: the file's validation (`Config::parse_file`, the first error it finds, as the daemon
//! says it), then what the daemon reads at start or on demand: this host's addresses (a VIP
//! that is one of them), the interfaces, the token files, the API's certificate and key, etcd's
//! CA, client certificate and password file, the geo data and each health check's `tls_ca`.

use std::{collections::BTreeSet, path::Path};

use crate::{
    api::{access, server::tls_acceptor},
    config::{Config, DaemonConfig},
    dataplane,
    health::probe,
    model::{
        Service, Strategy,
        discovery_settings::SourceKind,
        health_settings::{self, Probe},
    },
    reconcile::warnings::{Touched, risky},
    strategy::geo,
};

/// The share of a Maglev table one backend may hold above its own before the check warns.
pub const MAX_IMBALANCE: f64 = 0.01;

/// A health timeout at least this share of its interval is warned about.
pub const TIMEOUT_SHARE: f64 = 0.8;

/// What the check found, each line with where it is (the file, a service, a key).
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

/// The file could not be read at all (`lb config check` exits 2 for it, 1 for an invalid one).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreadable(pub String);

/// Checks the config file at `path`.
pub fn check(path: &Path) -> Result<Report, Unreadable> {
    let text = Config::read(path).map_err(|e| Unreadable(e.to_string()))?;
    let config = match Config::parse_file(&text, path) {
        Ok(config) => config,
        Err(e) => {
            return Ok(Report {
                errors: vec![e.to_string()],
                warnings: Vec::new(),
            });
        }
    };
    Ok(Report {
        errors: host_and_files(&config),
        warnings: warnings(&config),
    })
}

/// What the daemon reads besides the file, in the order it reads them; every failure.
fn host_and_files(config: &Config) -> Vec<String> {
    let cfg = &config.daemon;
    let mut errors = Vec::new();
    // At start, before anything else: this host's addresses as VIPs.
    if let Err(e) = crate::config::check_own_addresses(&[], &config.services) {
        errors.push(e.to_string());
    }
    // dataplane::open.
    for iface in &cfg.interfaces {
        if let Err(e) = dataplane::ifindex(iface) {
            errors.push(e.to_string());
        }
    }
    if cfg.metrics.enabled
        && let Some(path) = &cfg.metrics.token_file
        && let Err(e) = access::read_token(path)
    {
        errors.push(format!("{e:#}"));
    }
    if cfg.api.listen.is_some() {
        if let Err(e) = access::Access::tcp(&cfg.api) {
            errors.push(format!("{e:#}"));
        }
        if let (Some(cert), Some(key)) = (&cfg.api.cert_file, &cfg.api.key_file)
            && let Err(e) = tls_acceptor(cert, key)
        {
            errors.push(format!("{e:#}"));
        }
    }
    // At start, and at each connect to etcd.
    if let Some(c) = &cfg.cluster
        && let Err(e) = crate::cluster::connection::Security::of(c).check()
    {
        errors.push(e);
    }
    // The writer loads it at start (a bad file leaves every client in the default region) and
    // `lb geo reload` refuses it.
    if let Some(g) = &cfg.geo
        && let Some(data) = &g.data
        && let Err(e) = geo::load_configured(data, g)
    {
        errors.push(e);
    }
    // Read by the first check that uses it: a bad one fails every such check.
    for (ca, service) in tls_cas(&config.services) {
        if let Err(e) = load_tls_ca(&ca) {
            errors.push(format!("service {service}: health {e}"));
        }
    }
    errors
}

/// Each `tls_ca` the services' checks name, once, with the first service naming it.
fn tls_cas(services: &[Service]) -> Vec<(String, String)> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for s in services {
        for b in &s.backends {
            if let Ok(checks) = health_settings::resolve(s, b)
                && let Some(Probe::Http {
                    tls: Some(Some(ca)), ..
                }) = checks.check.map(|c| c.probe)
                && seen.insert(ca.clone())
            {
                out.push((ca, s.name.clone()));
            }
        }
    }
    out
}

/// Reads a CA file as the health checks do (their loader is async).
fn load_tls_ca(ca: &str) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| format!("tls_ca {ca}: {e}"))?;
    rt.block_on(probe::load_tls_ca(ca))
}

/// Legal settings that are likely mistakes.
pub fn warnings(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    plaintext_api(&config.daemon, &mut out);
    unannounced(config, &mut out);
    plaintext_etcd(&config.daemon, &mut out);
    // What a change to these services would be warned about (every weight 0, a port 0 that
    // takes the other ports of a VIP in use).
    out.extend(risky(&[], &config.services, &Touched::All));
    for s in &config.services {
        health(s, &mut out);
        if let Some(w) = maglev_imbalance(s) {
            out.push(w);
        }
        file_source(&config.daemon, s, &mut out);
    }
    out
}

/// A file source read and checked as the daemon would: a file it cannot use leaves the service
/// without backends until it can (a warning: the daemon starts anyway), and each entry it
/// would skip.
fn file_source(cfg: &DaemonConfig, s: &Service, out: &mut Vec<String>) {
    let Some(path) = s
        .discovery
        .as_ref()
        .filter(|d| d.kind == SourceKind::File)
        .and_then(|d| d.path.as_ref())
    else {
        return;
    };
    match crate::discovery::file::load(path) {
        Err(e) => out.push(format!(
            "service {}: discovery: {} (the service has no backends until it can be read)",
            s.name, e.message
        )),
        Ok(entries) => {
            for skipped in crate::reconcile::discovered::check(s, cfg, entries).skipped {
                out.push(format!(
                    "service {}: discovery: {}: {}: would be skipped ({})",
                    s.name,
                    skipped.entry,
                    skipped.why,
                    skipped.reason.name()
                ));
            }
        }
    }
}

/// With BGP set up, a VIP of a family no peer's session carries is never announced.
fn unannounced(config: &Config, out: &mut Vec<String>) {
    let Some(bgp) = &config.daemon.bgp else {
        return;
    };
    for (v6, family) in [(false, "IPv4"), (true, "IPv6")] {
        if bgp.peers.iter().any(|p| p.address.is_ipv6() == v6) {
            continue;
        }
        let names: Vec<&str> = config
            .services
            .iter()
            .filter(|s| s.vip.is_ipv6() == v6)
            .map(|s| s.name.as_str())
            .collect();
        if !names.is_empty() {
            out.push(format!(
                "service {}: {family} VIP and no {family} [[daemon.bgp.peer]]: never announced (fix: add a peer of that family)",
                names.join(", ")
            ));
        }
    }
}

fn plaintext_api(cfg: &DaemonConfig, out: &mut Vec<String>) {
    if let Some(addr) = cfg.api.listen
        && !addr.ip().is_loopback()
        && cfg.api.cert_file.is_none()
    {
        out.push(format!(
            "daemon.api.listen {addr} is not loopback and has no TLS (allow_plaintext = true): tokens cross the network in clear (fix: cert_file and key_file)"
        ));
    }
}

fn plaintext_etcd(cfg: &DaemonConfig, out: &mut Vec<String>) {
    let Some(c) = &cfg.cluster else { return };
    for e in c.plaintext_remote() {
        out.push(format!(
            "cluster.etcd {e} is plaintext and not on this host: the cluster's state{} crosses the network in clear (fix: an https:// endpoint with etcd_ca)",
            if c.etcd_user.is_some() { " and etcd_user's password" } else { "" }
        ));
    }
}

/// A service's checks as the daemon resolves them per backend: HTTPS that trusts any
/// certificate, and timeouts that leave no room before the next check. One line per finding
/// and service.
fn health(s: &Service, out: &mut Vec<String>) {
    let mut found = BTreeSet::new();
    for b in &s.backends {
        let Some(check) = health_settings::resolve(s, b).ok().and_then(|c| c.check) else {
            continue;
        };
        if let Probe::Http { tls: Some(None), .. } = check.probe {
            found.insert(format!(
                "service {}: health https = true without tls_ca: the backends' certificates are not checked (fix: tls_ca = a PEM file of their CA)",
                s.name
            ));
        }
        let (timeout, interval) = (check.timeout.as_secs_f64(), check.interval.as_secs_f64());
        if timeout >= TIMEOUT_SHARE * interval {
            found.insert(format!(
                "service {}: health timeout {timeout} is {:.0}% of the interval {interval}: a slow answer runs into the next check (fix: a timeout under {:.0}% of the interval)",
                s.name,
                100.0 * timeout / interval,
                100.0 * TIMEOUT_SHARE
            ));
        }
    }
    out.extend(found);
}

/// A Maglev table hands each of n equal backends ⌊M/n⌋ or ⌈M/n⌉ of its M entries, so one may
/// take ⌈M/n⌉·n/M − 1 more than its share of new flows. Warns past `MAX_IMBALANCE`, with the
/// smallest prime table that keeps under it (M ≥ n / MAX_IMBALANCE is enough).
pub fn maglev_imbalance(s: &Service) -> Option<String> {
    if !matches!(
        s.strategy,
        Strategy::Maglev | Strategy::ResourceAware | Strategy::Adaptive | Strategy::Geo
    ) {
        return None;
    }
    let n = s.backends.iter().filter(|b| b.weight > 0).count() as u64;
    let m = u64::from(s.table_size);
    if n < 2 || m == 0 {
        return None;
    }
    let imbalance = (m.div_ceil(n) * n) as f64 / m as f64 - 1.0;
    if imbalance <= MAX_IMBALANCE {
        return None;
    }
    let enough = (n as f64 / MAX_IMBALANCE).ceil() as u32;
    let suggest = (enough..).find(|&p| crate::maglev::is_prime(p)).unwrap_or(enough);
    Some(format!(
        "service {}: table_size {m} for {n} backends: one may take {:.1}% more than its share of new flows (fix: table_size = {suggest} or another prime of at least {enough})",
        s.name,
        100.0 * imbalance
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(table_size: u32, backends: usize) -> Service {
        let mut text = format!(
            "[daemon]\ninterfaces = [\"lo\"]\n[[service]]\nname = \"web\"\nvip = \"10.0.0.1\"\nport = 80\nprotocol = \"tcp\"\ntable_size = {table_size}\n"
        );
        for i in 0..backends {
            text.push_str(&format!(
                "[[service.backend]]\nid = \"b{i}\"\naddress = \"10.0.1.{}\"\n",
                i + 1
            ));
        }
        Config::parse(&text).expect("valid").services.remove(0)
    }

    #[test]
    fn maglev_imbalance_is_the_largest_share_over_the_fair_one() {
        // 251 entries over 100 backends: some hold 3 where 2.51 is fair, 19.5% more.
        let w = maglev_imbalance(&service(251, 100)).expect("warned");
        assert!(w.contains("19.5% more"), "{w}");
        assert!(w.contains("table_size = 10007"), "{w}");
        // 65537 over 100: 656 against 655.37, under 0.1%.
        assert_eq!(maglev_imbalance(&service(65537, 100)), None);
        // Exactly at the edge: 101 over 100 is 98% more; 10007 over 100 is 0.7%.
        assert!(maglev_imbalance(&service(101, 100)).is_some());
        assert_eq!(maglev_imbalance(&service(10007, 100)), None);
        assert_eq!(maglev_imbalance(&service(7, 1)), None);
    }
}
