//! A discovery source's set, applied to its service. Pure: no maps, no I/O, the clock a
//! parameter; the writer (`writer/sources.rs`) runs these and commits what they make.
//!
//! - `check`: each entry becomes a backend or is skipped with its reason (malformed, a bad
//!   address, port 0, an id listed twice, anything else the service refuses); the rest apply.
//! - `guard`: a set with fewer than half the live backends is suspect (a registry glitch must
//!   not empty a service): it applies only once it has persisted `confirm_shrink`.
//! - `apply`: only what changed moves. A new id is added, a changed one updated in place, one
//!   gone is drained (no new flows, its connections go on) and removed `drain_before_remove`
//!   later; one that comes back before that takes new flows again.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::{
    config::{DaemonConfig, validate_against},
    model::{Backend, BackendRef, DEFAULT_WEIGHT, MAX_BACKENDS_PER_SERVICE, Service, validate_name},
    status::{
        BackendStatus,
        discovery::{Entries, Entry, SkipReason, Skipped},
    },
};

/// A set as checked: the backends it makes, and the entries left out.
#[derive(Debug, Default, PartialEq)]
pub struct Checked {
    pub backends: Vec<Backend>,
    pub skipped: Vec<Skipped>,
}

/// Checks every entry against `service` (as declared, its backends aside) and the daemon's
/// settings, as a backend added by hand would be checked.
pub fn check(service: &Service, cfg: &DaemonConfig, entries: Entries) -> Checked {
    let mut out = Checked::default();
    let mut ids = HashSet::new();
    let mut endpoints: HashMap<(IpAddr, u16), String> = HashMap::new();
    // The service alone, to check one backend at a time against it.
    let mut alone = Service {
        backends: Vec::new(),
        ..service.clone()
    };
    for (i, entry) in entries.into_iter().enumerate() {
        let mut skip = |entry: String, reason: SkipReason, why: String| {
            out.skipped.push(Skipped { entry, reason, why });
        };
        let e = match entry {
            Ok(e) => e,
            Err(m) => {
                skip(m.at, SkipReason::Malformed, m.why);
                continue;
            }
        };
        let name = if e.id.is_empty() {
            format!("entry {}", i + 1)
        } else {
            e.id.clone()
        };
        let b = match backend(&e) {
            Ok(b) => b,
            Err((reason, why)) => {
                skip(name, reason, why);
                continue;
            }
        };
        if ids.contains(&b.id) {
            skip(
                name,
                SkipReason::DuplicateId,
                "listed before in the same set (the first is kept)".into(),
            );
            continue;
        }
        alone.backends = vec![b];
        let fits = alone
            .validate()
            .and_then(|()| validate_against(cfg, std::slice::from_ref(&alone)));
        let b = alone.backends.pop().expect("just set");
        if let Err(e) = fits {
            skip(name, SkipReason::Invalid, e.to_string());
            continue;
        }
        let endpoint = (b.address, b.port(service));
        if let Some(first) = endpoints.get(&endpoint) {
            skip(
                name,
                SkipReason::Invalid,
                format!("address {} port {} is {first}'s already", endpoint.0, endpoint.1),
            );
            continue;
        }
        if out.backends.len() == MAX_BACKENDS_PER_SERVICE {
            skip(
                name,
                SkipReason::Invalid,
                format!("more than {MAX_BACKENDS_PER_SERVICE} backends in one service"),
            );
            continue;
        }
        ids.insert(b.id.clone());
        endpoints.insert(endpoint, b.id.clone());
        out.backends.push(b);
    }
    out
}

/// An entry as a backend, or why it cannot be one.
fn backend(e: &Entry) -> Result<Backend, (SkipReason, String)> {
    validate_name("backend id", &e.id, 64).map_err(|x| (SkipReason::Invalid, x.to_string()))?;
    let address: IpAddr = e.address.parse().map_err(|_| {
        (
            SkipReason::BadAddress,
            format!("address {:?} is not an IP address", e.address),
        )
    })?;
    if e.port == Some(0) {
        return Err((SkipReason::BadPort, "port 0".into()));
    }
    Ok(Backend {
        port: e.port,
        weight: e.weight.unwrap_or(DEFAULT_WEIGHT),
        region: e.region.clone(),
        zone: e.zone.clone(),
        labels: e.labels.clone(),
        ..Backend::new(e.id.clone(), address)
    })
}

/// Whether a set applies now, or is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guard {
    Apply,
    /// Suspect since `since`; it applies at `until` if it is still suspect then.
    Hold {
        since: Instant,
        until: Instant,
    },
}

/// A set of `wanted` backends against `live` ones (not departing): suspect when it has fewer
/// than half of them, and then applied only once suspect sets have come for `confirm` (since
/// `held_since`, the first of them). `confirm` of 0 applies every set at once.
pub fn guard(
    live: usize,
    wanted: usize,
    held_since: Option<Instant>,
    confirm: Duration,
    now: Instant,
) -> Guard {
    let suspect = wanted * 2 < live;
    if !suspect || confirm.is_zero() {
        return Guard::Apply;
    }
    let since = held_since.unwrap_or(now);
    let until = since + confirm;
    if now >= until {
        Guard::Apply
    } else {
        Guard::Hold { since, until }
    }
}

/// What applying a set moved, by id.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Moves {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    /// Departing before, listed again: they take new flows again.
    pub returned: Vec<String>,
    /// Gone from the set: drained until their removal.
    pub departing: Vec<String>,
    /// Gone from the set and removed at once (`drain_before_remove` = 0).
    pub removed: Vec<String>,
}

impl Moves {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Makes `set` the service's backends: only what differs moves (see the module).
pub fn apply(
    service: &mut Service,
    status: &mut BTreeMap<BackendRef, BackendStatus>,
    set: Vec<Backend>,
    drain: Duration,
    now: Instant,
) -> Moves {
    let mut moves = Moves::default();
    let wanted: HashSet<&str> = set.iter().map(|b| b.id.as_str()).collect();
    let name = service.name.clone();
    for b in &service.backends {
        if wanted.contains(b.id.as_str()) {
            continue;
        }
        let st = status.entry(BackendRef::new(&name, &b.id)).or_default();
        if st.departing.is_some() {
            continue;
        }
        if drain.is_zero() {
            moves.removed.push(b.id.clone());
        } else {
            st.departing = Some(now + drain);
            moves.departing.push(b.id.clone());
        }
    }
    service.backends.retain(|b| !moves.removed.contains(&b.id));
    for id in &moves.removed {
        status.remove(&BackendRef::new(&name, id));
    }
    for w in set {
        let key = BackendRef::new(&name, &w.id);
        match service.backends.iter_mut().find(|b| b.id == w.id) {
            Some(b) => {
                let st = status.entry(key).or_default();
                if st.departing.take().is_some() {
                    // Back as from a recovery: its weight ramps over slow_start.
                    st.up_at = Some(now);
                    moves.returned.push(w.id.clone());
                }
                if *b != w {
                    // Elsewhere now: what was learnt about the old address does not hold.
                    if (b.address, b.port) != (w.address, w.port) {
                        *st = BackendStatus::default();
                    }
                    moves.changed.push(w.id.clone());
                    *b = w;
                }
            }
            None => {
                // A status left by an earlier backend of that id starts over.
                status.insert(key, BackendStatus::default());
                moves.added.push(w.id.clone());
                service.backends.push(w);
            }
        }
    }
    moves
}

/// The backends whose drain after leaving their source is over at `now`: removed from their
/// services and statuses; returned by service and id.
pub fn remove_departed(
    services: &mut [Service],
    status: &mut BTreeMap<BackendRef, BackendStatus>,
    now: Instant,
) -> Vec<BackendRef> {
    let done: Vec<BackendRef> = status
        .iter()
        .filter(|(_, st)| st.departing.is_some_and(|t| t <= now))
        .map(|(b, _)| b.clone())
        .collect();
    for b in &done {
        if let Some(s) = services.iter_mut().find(|s| s.name == b.service) {
            s.backends.retain(|x| x.id != b.id);
        }
        status.remove(b);
    }
    done
}

/// A reload's (or the cluster's) service with a source keeps the backends it had: they are
/// the source's, and the file has none. Those the new settings refuse (another address
/// family, a region geo no longer has) are left for the source to bring back.
pub fn keep(cfg: &DaemonConfig, before: &[Service], next: &mut [Service]) {
    for s in next.iter_mut().filter(|s| s.discovery.is_some()) {
        let Some(old) = before.iter().find(|o| o.name == s.name) else {
            continue;
        };
        let mut alone = Service {
            backends: Vec::new(),
            ..s.clone()
        };
        s.backends = old
            .backends
            .iter()
            .filter(|b| {
                alone.backends = vec![(*b).clone()];
                alone.validate().is_ok() && validate_against(cfg, std::slice::from_ref(&alone)).is_ok()
            })
            .cloned()
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::Config,
        model::{
            Protocol,
            discovery_settings::{DiscoverySettings, SourceKind},
        },
        status::discovery::Malformed,
    };

    fn cfg() -> DaemonConfig {
        Config::parse("[daemon]\ninterfaces = [\"eth0\"]\n")
            .expect("config")
            .daemon
    }

    fn web() -> Service {
        Service {
            discovery: Some(Box::new(DiscoverySettings {
                path: Some("/etc/lb/web.json".into()),
                ..DiscoverySettings::new(SourceKind::File)
            })),
            ..Service::new("web", "10.0.0.1".parse().unwrap(), 80, Protocol::Tcp)
        }
    }

    fn entry(id: &str, address: &str) -> Entry {
        Entry {
            id: id.into(),
            address: address.into(),
            port: None,
            weight: None,
            zone: None,
            region: None,
            labels: BTreeMap::new(),
        }
    }

    fn ids(backends: &[Backend]) -> Vec<&str> {
        backends.iter().map(|b| b.id.as_str()).collect()
    }

    #[test]
    fn bad_entries_are_skipped_with_their_reason_and_the_rest_apply() {
        let weighted = Entry {
            weight: Some(7),
            zone: Some("eu-1a".into()),
            region: Some("eu".into()),
            labels: BTreeMap::from([("role".into(), "canary".into())]),
            port: Some(8080),
            ..entry("a", "10.0.1.1")
        };
        let entries = vec![
            Ok(weighted),
            Ok(entry("b", "10.0.1.300")),
            Ok(Entry {
                port: Some(0),
                ..entry("c", "10.0.1.3")
            }),
            Ok(entry("a", "10.0.1.4")),
            Err(Malformed {
                at: "entry 5".into(),
                why: "invalid type: string \"x\", expected u16".into(),
            }),
            Ok(entry("v6", "fd00::1")),
            Ok(Entry {
                weight: Some(10_001),
                ..entry("heavy", "10.0.1.6")
            }),
            Ok(entry("bad id", "10.0.1.7")),
            Ok(Entry {
                port: Some(8080),
                ..entry("twin", "10.0.1.1")
            }),
            Ok(entry("", "10.0.1.8")),
            Ok(entry("d", "10.0.1.9")),
        ];
        let c = check(&web(), &cfg(), entries);
        assert_eq!(ids(&c.backends), ["a", "d"]);
        let a = &c.backends[0];
        // The source's weight is the configured weight; zone, region and labels are kept.
        assert_eq!(
            (a.weight, a.port, a.zone.as_deref(), a.region.as_deref()),
            (7, Some(8080), Some("eu-1a"), Some("eu"))
        );
        assert_eq!(a.labels["role"], "canary");
        assert_eq!(c.backends[1].weight, DEFAULT_WEIGHT);
        let reasons: Vec<(&str, SkipReason)> =
            c.skipped.iter().map(|s| (s.entry.as_str(), s.reason)).collect();
        assert_eq!(
            reasons,
            [
                ("b", SkipReason::BadAddress),
                ("c", SkipReason::BadPort),
                ("a", SkipReason::DuplicateId),
                ("entry 5", SkipReason::Malformed),
                ("v6", SkipReason::Invalid),
                ("heavy", SkipReason::Invalid),
                ("bad id", SkipReason::Invalid),
                ("twin", SkipReason::Invalid),
                ("entry 10", SkipReason::Invalid),
            ]
        );
        for s in &c.skipped {
            assert!(!s.why.is_empty() && !s.why.contains('\n'), "{s:?}");
        }
        assert!(c.skipped[4].why.contains("same IP family"), "{:?}", c.skipped[4]);
        assert!(c.skipped[7].why.contains("is a's already"), "{:?}", c.skipped[7]);
    }

    #[test]
    fn a_geo_service_skips_instances_of_no_known_region() {
        let cfg = Config::parse(
            "[daemon]\ninterfaces = [\"eth0\"]\n[daemon.geo]\ndefault_region = \"eu\"\nfailover = { eu = [] }\n",
        )
        .expect("geo config")
        .daemon;
        let geo = Service {
            strategy: crate::model::Strategy::Geo,
            ..web()
        };
        let entries = vec![
            Ok(Entry {
                region: Some("eu".into()),
                ..entry("a", "10.0.1.1")
            }),
            Ok(Entry {
                region: Some("mars".into()),
                ..entry("b", "10.0.1.2")
            }),
            Ok(entry("c", "10.0.1.3")),
        ];
        let c = check(&geo, &cfg, entries);
        assert_eq!(ids(&c.backends), ["a"]);
        assert!(c.skipped.iter().all(|s| s.reason == SkipReason::Invalid));
        assert!(c.skipped[0].why.contains("needs a region"), "{:?}", c.skipped);
    }

    #[test]
    fn a_shrink_below_half_is_held_until_it_persists() {
        let now = Instant::now();
        let s = Duration::from_secs;
        // Growing, steady, or down to exactly half: at once.
        for (live, wanted) in [(0, 0), (0, 3), (4, 4), (4, 2), (3, 2), (1, 1)] {
            assert_eq!(
                guard(live, wanted, None, s(30), now),
                Guard::Apply,
                "{live} -> {wanted}"
            );
        }
        // Below half, emptied included: held 30 s from the first such set.
        for (live, wanted) in [(4, 1), (3, 1), (1, 0), (10, 0)] {
            assert_eq!(
                guard(live, wanted, None, s(30), now),
                Guard::Hold {
                    since: now,
                    until: now + s(30)
                },
                "{live} -> {wanted}"
            );
        }
        assert_eq!(
            guard(4, 1, Some(now), s(30), now + s(29)),
            Guard::Hold {
                since: now,
                until: now + s(30)
            }
        );
        assert_eq!(guard(4, 1, Some(now), s(30), now + s(30)), Guard::Apply);
        // confirm_shrink = 0: no hold.
        assert_eq!(guard(4, 0, None, Duration::ZERO, now), Guard::Apply);
    }

    fn set(ids: &[(&str, &str)]) -> Vec<Backend> {
        ids.iter()
            .map(|(id, a)| Backend::new(*id, a.parse().unwrap()))
            .collect()
    }

    #[test]
    fn only_what_changed_moves_and_a_removed_instance_drains_first() {
        let now = Instant::now();
        let drain = Duration::from_secs(10);
        let mut s = web();
        let mut st = BTreeMap::new();
        let first = set(&[("a", "10.0.1.1"), ("b", "10.0.1.2"), ("c", "10.0.1.3")]);
        let m = apply(&mut s, &mut st, first, drain, now);
        assert_eq!(m.added, ["a", "b", "c"]);
        // b's health, learnt since, must survive a set that leaves b as it is.
        let b = BackendRef::new("web", "b");
        st.get_mut(&b).unwrap().score = 0.5;
        let mut next = set(&[("a", "10.0.1.1"), ("b", "10.0.1.2"), ("d", "10.0.1.4")]);
        next[0].weight = 50;
        let m = apply(&mut s, &mut st, next.clone(), drain, now);
        assert_eq!(
            m,
            Moves {
                added: vec!["d".into()],
                changed: vec!["a".into()],
                departing: vec!["c".into()],
                ..Default::default()
            }
        );
        assert_eq!(st[&b].score, 0.5, "an unchanged backend keeps its status");
        assert_eq!(s.backend("a").unwrap().weight, 50);
        let c = BackendRef::new("web", "c");
        assert_eq!(st[&c].departing, Some(now + drain));
        assert!(st[&c].drained());
        assert_eq!(crate::status::discovery::live(&s, &st), 3);
        // The same set again moves nothing; c keeps its first deadline.
        let later = now + Duration::from_secs(4);
        assert!(apply(&mut s, &mut st, next.clone(), drain, later).is_empty());
        assert_eq!(st[&c].departing, Some(now + drain));
        // Not yet due, then due: removed from the service and its status.
        let mut services = vec![s.clone()];
        assert!(remove_departed(&mut services, &mut st.clone(), later).is_empty());
        let gone = remove_departed(&mut services, &mut st, now + drain);
        assert_eq!(gone, std::slice::from_ref(&c));
        assert_eq!(ids(&services[0].backends), ["a", "b", "d"]);
        assert!(!st.contains_key(&c));

        // Back before its removal: takes new flows again, its weight ramping.
        let mut s = services.remove(0);
        apply(&mut s, &mut st, set(&[("a", "10.0.1.1")]), drain, now);
        let m = apply(&mut s, &mut st, next.clone(), drain, later);
        assert_eq!(m.returned, ["b", "d"]);
        assert_eq!(st[&b].departing, None);
        assert_eq!(st[&b].up_at, Some(later));

        // Moved to another address: its status starts over.
        st.get_mut(&b).unwrap().score = 0.5;
        let mut moved = next.clone();
        moved[1].address = "10.0.1.22".parse().unwrap();
        let m = apply(&mut s, &mut st, moved, drain, later);
        assert_eq!(m.changed, ["b"]);
        assert_eq!(st[&b], BackendStatus::default());

        // drain_before_remove = 0: gone at once.
        let m = apply(&mut s, &mut st, set(&[("a", "10.0.1.1")]), Duration::ZERO, later);
        assert_eq!(m.removed, ["b", "d"]);
        assert_eq!(ids(&s.backends), ["a"]);
        assert!(!st.contains_key(&b));
    }

    #[test]
    fn a_reload_keeps_the_source_backends_that_still_fit() {
        let mut before = web();
        before.backends = set(&[("a", "10.0.1.1"), ("b", "10.0.1.2")]);
        let mut next = vec![web()];
        keep(&cfg(), std::slice::from_ref(&before), &mut next);
        assert_eq!(ids(&next[0].backends), ["a", "b"]);
        // Now an IPv6 service: the IPv4 backends are left for the source to bring back.
        let mut v6 = vec![Service {
            vip: "fd00::1".parse().unwrap(),
            ..web()
        }];
        keep(&cfg(), &[before.clone()], &mut v6);
        assert!(v6[0].backends.is_empty());
        // A service without a source keeps what its file says.
        let mut plain = vec![Service::new(
            "web",
            "10.0.0.1".parse().unwrap(),
            80,
            Protocol::Tcp,
        )];
        keep(&cfg(), &[before], &mut plain);
        assert!(plain[0].backends.is_empty());
    }
}
