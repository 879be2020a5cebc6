//! One change to the desired state, applied to copies of the services and statuses and
//! validated whole. Pure: no maps, no I/O; the writer commits what this accepts.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use log::info;

use super::inbox::{Change, HealthUpdate};
use crate::{
    config::{DaemonConfig, validate_against, validate_services, validate_weight},
    error::{Error, Result},
    model::{BackendRef, Service},
    status::{
        BackendStatus, External, HealthState,
        lease::Lease,
        load::{DEFAULT_REPORT_TTL, MAX_REPORT_TTL},
    },
};

fn unknown_service(name: &str) -> Error {
    Error::NotFound(format!("unknown service {name}"))
}

fn unknown_backend(service: &str, id: &str) -> Error {
    Error::NotFound(format!("service {service} has no backend {id}"))
}

fn find_service<'a>(services: &'a mut [Service], name: &str) -> Result<&'a mut Service> {
    services
        .iter_mut()
        .find(|s| s.name == name)
        .ok_or_else(|| unknown_service(name))
}

/// A change with the config file as last loaded (`file`): a reload is laid over what runs
/// (`layers::reload`) and becomes the file; the answer is the run-time changes its new values
/// replaced, one line each.
pub(crate) fn change_with_file(
    cfg: &DaemonConfig,
    file: &mut Arc<Vec<Service>>,
    services: &mut Vec<Service>,
    status: &mut BTreeMap<BackendRef, BackendStatus>,
    change: Change,
    now: Instant,
) -> Result<Vec<String>> {
    let Change::Reload(after) = change else {
        return change_state(cfg, services, status, change, now).map(|()| Vec::new());
    };
    let laid = super::layers::reload(file, services, status, &after);
    change_state(cfg, services, status, Change::Replace(laid.services), now)?;
    *file = Arc::new(after);
    Ok(laid.notes)
}

/// Applies one change to copies of the services and statuses, validating the result whole.
pub(crate) fn change_state(
    cfg: &DaemonConfig,
    services: &mut Vec<Service>,
    status: &mut BTreeMap<BackendRef, BackendStatus>,
    change: Change,
    now: Instant,
) -> Result<()> {
    match change {
        // Without the file as last loaded (`change_with_file`), a reload replaces.
        Change::Replace(mut next) | Change::Reload(mut next) => {
            super::discovered::keep(cfg, services, &mut next);
            *services = next;
        }
        Change::AddService(s) => {
            s.declares_none_beside_its_source()?;
            if services.iter().any(|x| x.name == s.name) {
                return Err(Error::Exists(format!("service {} already exists", s.name)));
            }
            services.push(s);
        }
        Change::RemoveService(name) => {
            let before = services.len();
            services.retain(|x| x.name != name);
            if services.len() == before {
                return Err(unknown_service(&name));
            }
        }
        Change::AddBackend {
            service,
            backend,
            lease,
        } => {
            let svc = find_service(services, &service)?;
            svc.set_by_hand()?;
            if svc.backend(&backend.id).is_some() {
                return Err(Error::Exists(format!(
                    "service {service} already has a backend {}",
                    backend.id
                )));
            }
            let key = BackendRef::new(&service, &backend.id);
            svc.backends.push(backend);
            // A status left by a backend of that id removed earlier in this pass starts over.
            status.insert(
                key,
                BackendStatus {
                    lease: lease.map(|t| Lease::new(t, now)),
                    ..Default::default()
                },
            );
        }
        Change::Heartbeat { service, id } => {
            let svc = find_service(services, &service)?;
            if svc.backend(&id).is_none() {
                return Err(unknown_backend(&service, &id));
            }
            let st = status.get_mut(&BackendRef::new(&service, &id));
            let Some((lease, up_at)) = st.and_then(|st| st.lease.as_mut().map(|l| (l, &mut st.up_at))) else {
                return Err(Error::invalid(format!(
                    "backend {service}/{id} was registered without a ttl: it has no heartbeat to renew"
                )));
            };
            lease.renewed = now;
            if lease.drained {
                lease.drained = false;
                // Back as from a health recovery: its weight ramps over slow_start.
                *up_at = Some(now);
                info!("backend {service}/{id}: heartbeat again, takes new flows");
            }
        }
        Change::RemoveBackend { service, id } => {
            let svc = find_service(services, &service)?;
            svc.set_by_hand()?;
            let before = svc.backends.len();
            svc.backends.retain(|b| b.id != id);
            if svc.backends.len() == before {
                return Err(unknown_backend(&service, &id));
            }
        }
        Change::SetWeight { service, id, weight } => {
            validate_weight(weight)?;
            let svc = find_service(services, &service)?;
            svc.set_by_hand()?;
            let b = svc
                .backends
                .iter_mut()
                .find(|b| b.id == id)
                .ok_or_else(|| unknown_backend(&service, &id))?;
            b.weight = weight;
        }
        Change::SetDrain { service, id, drained } => {
            let svc = find_service(services, &service)?;
            if svc.backend(&id).is_none() {
                return Err(unknown_backend(&service, &id));
            }
            let st = status.entry(BackendRef::new(&service, &id)).or_default();
            hold(st, &service, &id, drained, now);
        }
        Change::SetStrategy { service, strategy } => {
            find_service(services, &service)?.strategy = strategy;
        }
        Change::SetExternal {
            service,
            id,
            score,
            ttl,
        } => {
            if !(score.is_finite() && (0.0..=1.0).contains(&score)) {
                return Err(Error::invalid(format!(
                    "health score {score} is out of range 0..=1"
                )));
            }
            if let Some(t) = ttl
                && (t.is_zero() || t > Duration::from_secs(30 * 24 * 3600))
            {
                return Err(Error::invalid(format!(
                    "ttl {} s is out of range (0, 2592000]",
                    t.as_secs_f64()
                )));
            }
            let svc = find_service(services, &service)?;
            if svc.backend(&id).is_none() {
                return Err(unknown_backend(&service, &id));
            }
            let st = status.entry(BackendRef::new(&service, &id)).or_default();
            st.external = Some(External {
                score,
                expires: ttl.map(|t| now + t),
            });
            info!(
                "backend {service}/{id}: external score {score}{}",
                ttl.map(|t| format!(" for {} s", t.as_secs_f64()))
                    .unwrap_or_default()
            );
        }
        // The writer loads geo data itself, before any change reaches here.
        Change::ReloadGeo => {}
        Change::ReportLoad {
            service,
            id,
            report,
            ttl,
        } => {
            report.validate().map_err(Error::invalid)?;
            let ttl = ttl.unwrap_or(DEFAULT_REPORT_TTL);
            if ttl.is_zero() || ttl > MAX_REPORT_TTL {
                return Err(Error::invalid(format!(
                    "ttl {} s is out of range (0, {}]",
                    ttl.as_secs_f64(),
                    MAX_REPORT_TTL.as_secs()
                )));
            }
            let svc = find_service(services, &service)?;
            if svc.backend(&id).is_none() {
                return Err(unknown_backend(&service, &id));
            }
            status
                .entry(BackendRef::new(&service, &id))
                .or_default()
                .load
                .report = Some((report, now + ttl));
            log::debug!(
                "backend {service}/{id}: load report {report:?} for {} s",
                ttl.as_secs_f64()
            );
        }
    }
    validate_services(services)?;
    validate_against(cfg, services)?;
    Ok(())
}

/// A change of one backend (`Change::backend_scope`), applied to copies of its service and of
/// that backend's status alone, then put in place: its cost is that service's, not every
/// service's. What `change_state` checks of the whole holds for one service (names, VIPs and
/// ports are not what such a change moves). Returns its warnings.
pub(crate) fn change_one(
    cfg: &DaemonConfig,
    services: &mut [Service],
    status: &mut BTreeMap<BackendRef, BackendStatus>,
    key: BackendRef,
    touched: &super::warnings::Touched,
    change: Change,
    now: Instant,
) -> Result<Vec<String>> {
    let at = services.iter().position(|s| s.name == key.service);
    let before = at.map_or(&[][..], |i| &services[i..=i]);
    let mut next = before.to_vec();
    let mut next_status: BTreeMap<BackendRef, BackendStatus> = status
        .get(&key)
        .map(|st| (key.clone(), st.clone()))
        .into_iter()
        .collect();
    change_state(cfg, &mut next, &mut next_status, change, now)?;
    let risky = super::warnings::risky(before, &next, touched);
    if let (Some(i), Some(s)) = (at, next.pop()) {
        services[i] = s;
    }
    status.extend(next_status);
    Ok(risky)
}

/// Sets or lifts the operator's drain of one backend; again is a no-op (its `since` stays).
/// Lifted, a backend that is up comes back as from a health recovery: its weight ramps over
/// its slow start.
fn hold(st: &mut BackendStatus, service: &str, id: &str, drained: bool, now: Instant) {
    match (drained, st.held.is_some()) {
        (true, false) => {
            st.held = Some(now);
            info!("backend {service}/{id}: drained by the operator: no new flows, established ones go on");
        }
        (false, true) => {
            st.held = None;
            if st.health == HealthState::Up {
                st.up_at = Some(now);
            }
            info!("backend {service}/{id}: undrained by the operator: takes new flows");
        }
        _ => {}
    }
}

/// What the monitor last published about one backend, into its status; a backend back up
/// starts its slow-start ramp now.
pub fn record_health(status: &mut BTreeMap<BackendRef, BackendStatus>, u: HealthUpdate, now: Instant) {
    let st = status.entry(u.backend).or_default();
    if st.health == HealthState::Down && u.state == HealthState::Up {
        st.up_at = Some(now);
    }
    st.health = u.state;
    st.score = u.score;
    st.slow_start = u.slow_start;
    st.breaker = u.breaker;
    st.half_open_share = u.half_open_share;
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::{
        config::Config,
        model::{Backend, Protocol, Strategy},
        status::load::LoadReport,
    };

    fn cfg() -> DaemonConfig {
        Config::parse("[daemon]\ninterfaces = [\"eth0\"]\n")
            .expect("config")
            .daemon
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Two services; `web` has backends b0 and b1.
    fn start() -> (Vec<Service>, BTreeMap<BackendRef, BackendStatus>) {
        let web = Service {
            backends: vec![
                Backend::new("b0", ip("10.0.1.1")),
                Backend::new("b1", ip("10.0.1.2")),
            ],
            ..Service::new("web", ip("10.0.0.1"), 80, Protocol::Tcp)
        };
        let dns = Service::new("dns", ip("10.0.0.2"), 53, Protocol::Udp);
        (vec![web, dns], BTreeMap::new())
    }

    /// Applies `change` to the start state: the result, and the state after (which must be
    /// the start state when the change is refused).
    fn apply(change: Change) -> (Result<()>, Vec<Service>, BTreeMap<BackendRef, BackendStatus>) {
        let (mut services, mut status) = start();
        let r = change_state(&cfg(), &mut services, &mut status, change, Instant::now());
        (r, services, status)
    }

    fn refused(change: Change) -> Error {
        let (r, ..) = apply(change);
        r.expect_err("refused")
    }

    fn web(services: &[Service]) -> &Service {
        services.iter().find(|s| s.name == "web").unwrap()
    }

    #[test]
    fn services_are_added_replaced_and_removed_by_name() {
        let (r, s, _) = apply(Change::AddService(Service::new(
            "api",
            ip("10.0.0.3"),
            443,
            Protocol::Tcp,
        )));
        r.unwrap();
        assert_eq!(
            s.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["web", "dns", "api"]
        );
        let (r, s, _) = apply(Change::RemoveService("dns".into()));
        r.unwrap();
        assert_eq!(s.len(), 1);
        let (r, s, _) = apply(Change::Replace(vec![Service::new(
            "x",
            ip("10.0.0.9"),
            1,
            Protocol::Tcp,
        )]));
        r.unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].name, "x");
        assert!(matches!(
            refused(Change::AddService(Service::new(
                "web",
                ip("10.0.0.3"),
                443,
                Protocol::Tcp
            ))),
            Error::Exists(_)
        ));
        assert!(matches!(
            refused(Change::RemoveService("nope".into())),
            Error::NotFound(_)
        ));
        // Valid alone, refused whole: a second service on web's VIP and port.
        let clash = Service::new("web2", ip("10.0.0.1"), 80, Protocol::Tcp);
        assert!(matches!(refused(Change::AddService(clash)), Error::Invalid(_)));
    }

    #[test]
    fn backends_are_added_removed_and_weighed() {
        let add = |id: &str| Change::AddBackend {
            service: "web".into(),
            backend: Backend::new(id, ip("10.0.1.3")),
            lease: None,
        };
        let (r, s, _) = apply(add("b2"));
        r.unwrap();
        assert_eq!(web(&s).backends.len(), 3);
        assert!(matches!(refused(add("b0")), Error::Exists(_)));
        assert!(matches!(
            refused(Change::AddBackend {
                service: "nope".into(),
                backend: Backend::new("b2", ip("10.0.1.3")),
                lease: None,
            }),
            Error::NotFound(_)
        ));
        let (r, s, _) = apply(Change::RemoveBackend {
            service: "web".into(),
            id: "b1".into(),
        });
        r.unwrap();
        assert_eq!(web(&s).backends.len(), 1);
        assert!(matches!(
            refused(Change::RemoveBackend {
                service: "web".into(),
                id: "b9".into(),
            }),
            Error::NotFound(_)
        ));
        let weight = |id: &str, weight: u32| Change::SetWeight {
            service: "web".into(),
            id: id.into(),
            weight,
        };
        let (r, s, _) = apply(weight("b1", 0));
        r.unwrap();
        assert_eq!(web(&s).backends[1].weight, 0);
        assert!(matches!(refused(weight("b9", 5)), Error::NotFound(_)));
        assert!(matches!(
            refused(weight("b1", crate::model::MAX_WEIGHT + 1)),
            Error::Invalid(_)
        ));
    }

    #[test]
    fn a_strategy_is_set_and_checked_against_the_daemon() {
        let set = |strategy| Change::SetStrategy {
            service: "web".into(),
            strategy,
        };
        let (r, s, _) = apply(set(Strategy::RoundRobin));
        r.unwrap();
        assert_eq!(web(&s).strategy, Strategy::RoundRobin);
        // Geo needs [daemon.geo], which this daemon has not.
        assert!(matches!(refused(set(Strategy::Geo)), Error::Invalid(_)));
        assert!(matches!(
            refused(Change::SetStrategy {
                service: "nope".into(),
                strategy: Strategy::Maglev,
            }),
            Error::NotFound(_)
        ));
    }

    #[test]
    fn external_scores_are_kept_in_range_with_a_bounded_ttl() {
        let score = |id: &str, score: f64, ttl: Option<u64>| Change::SetExternal {
            service: "web".into(),
            id: id.into(),
            score,
            ttl: ttl.map(Duration::from_secs),
        };
        let (r, _, st) = apply(score("b0", 0.5, Some(60)));
        r.unwrap();
        let e = st[&BackendRef::new("web", "b0")]
            .external
            .expect("external score");
        assert_eq!(e.score, 0.5);
        assert!(e.expires.is_some());
        for bad in [
            score("b0", 1.5, None),
            score("b0", f64::NAN, None),
            score("b0", 0.5, Some(0)),
        ] {
            assert!(matches!(refused(bad), Error::Invalid(_)));
        }
        assert!(matches!(
            refused(score("b0", 0.5, Some(31 * 24 * 3600))),
            Error::Invalid(_)
        ));
        assert!(matches!(refused(score("b9", 0.5, None)), Error::NotFound(_)));
    }

    #[test]
    fn load_reports_are_validated_and_expire() {
        let report = |id: &str, cpu: f64, ttl: Option<u64>| Change::ReportLoad {
            service: "web".into(),
            id: id.into(),
            report: LoadReport {
                cpu: Some(cpu),
                ..Default::default()
            },
            ttl: ttl.map(Duration::from_secs),
        };
        let (r, _, st) = apply(report("b1", 0.7, None));
        r.unwrap();
        let (got, _) = st[&BackendRef::new("web", "b1")]
            .load
            .report
            .expect("report kept");
        assert_eq!(got.cpu, Some(0.7));
        assert!(matches!(refused(report("b1", 1.7, None)), Error::Invalid(_)));
        assert!(matches!(refused(report("b1", 0.7, Some(0))), Error::Invalid(_)));
        assert!(matches!(
            refused(report("b1", 0.7, Some(3601))),
            Error::Invalid(_)
        ));
        assert!(matches!(refused(report("b9", 0.7, None)), Error::NotFound(_)));
        let empty = Change::ReportLoad {
            service: "web".into(),
            id: "b1".into(),
            report: LoadReport::default(),
            ttl: None,
        };
        assert!(matches!(refused(empty), Error::Invalid(_)));
    }

    #[test]
    fn a_geo_reload_changes_no_service() {
        let (r, s, st) = apply(Change::ReloadGeo);
        r.unwrap();
        assert_eq!(s, start().0);
        assert!(st.is_empty());
    }

    #[test]
    fn a_health_update_records_the_state_and_starts_the_ramp_when_back_up() {
        let (_, mut st) = start();
        let b = BackendRef::new("web", "b0");
        let update = |state, score| HealthUpdate {
            backend: b.clone(),
            state,
            score,
            slow_start: Duration::from_secs(10),
            breaker: crate::status::BreakerState::Closed,
            half_open_share: 1.0,
        };
        let now = Instant::now();
        record_health(&mut st, update(HealthState::Up, 0.8), now);
        assert_eq!(st[&b].score, 0.8);
        assert_eq!(st[&b].up_at, None, "up all along: no ramp");
        record_health(&mut st, update(HealthState::Down, 0.0), now);
        assert_eq!(st[&b].health, HealthState::Down);
        record_health(&mut st, update(HealthState::Up, 1.0), now);
        assert_eq!(st[&b].up_at, Some(now));
        assert_eq!(st[&b].slow_start, Duration::from_secs(10));
    }

    #[test]
    fn an_operator_drain_is_set_lifted_and_kept_by_a_reload() {
        let (mut services, mut status) = start();
        let drain = |id: &str, drained: bool| Change::SetDrain {
            service: "web".into(),
            id: id.into(),
            drained,
        };
        let b0 = BackendRef::new("web", "b0");
        let t0 = Instant::now();
        change_state(&cfg(), &mut services, &mut status, drain("b0", true), t0).unwrap();
        assert_eq!(status[&b0].held, Some(t0));
        assert_eq!(web(&services).backends[0].weight, 100, "its weight is kept");
        // Again: nothing changes, not even since when.
        let t1 = t0 + Duration::from_secs(1);
        change_state(&cfg(), &mut services, &mut status, drain("b0", true), t1).unwrap();
        assert_eq!(status[&b0].held, Some(t0));
        // A reload of the file as it was keeps it (the backend is still declared).
        change_state(&cfg(), &mut services, &mut status, Change::Replace(start().0), t1).unwrap();
        assert_eq!(status[&b0].held, Some(t0));
        // Unknown service or backend: refused, nothing changed.
        let before = (services.clone(), status.clone());
        let e = change_state(&cfg(), &mut services, &mut status, drain("b9", true), t1).unwrap_err();
        assert!(
            matches!(&e, Error::NotFound(m) if m == "service web has no backend b9"),
            "{e}"
        );
        let e = change_state(
            &cfg(),
            &mut services,
            &mut status,
            Change::SetDrain {
                service: "nope".into(),
                id: "b0".into(),
                drained: true,
            },
            t1,
        )
        .unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e}");
        assert_eq!((services.clone(), status.clone()), before);
        // Lifted: back as from a recovery (the ramp starts), the weight as configured.
        let t2 = t0 + Duration::from_secs(2);
        change_state(&cfg(), &mut services, &mut status, drain("b0", false), t2).unwrap();
        assert_eq!((status[&b0].held, status[&b0].up_at), (None, Some(t2)));
        // Lifting it again, or lifting b1's (never drained): no change, no ramp.
        change_state(&cfg(), &mut services, &mut status, drain("b1", false), t2).unwrap();
        assert_eq!(
            status.get(&BackendRef::new("web", "b1")).and_then(|s| s.up_at),
            None
        );
        // Lifted while down: the recovery starts the ramp, not the undrain.
        status.get_mut(&b0).unwrap().health = HealthState::Down;
        status.get_mut(&b0).unwrap().up_at = None;
        change_state(&cfg(), &mut services, &mut status, drain("b0", true), t2).unwrap();
        change_state(&cfg(), &mut services, &mut status, drain("b0", false), t2).unwrap();
        assert_eq!(status[&b0].up_at, None);
    }

    #[test]
    fn a_service_with_a_source_takes_an_operator_drain() {
        use crate::model::discovery_settings::{DiscoverySettings, SourceKind};
        let (mut services, mut status) = start();
        services[0].discovery = Some(Box::new(DiscoverySettings {
            path: Some("/etc/lb/web.json".into()),
            ..DiscoverySettings::new(SourceKind::File)
        }));
        let drain = Change::SetDrain {
            service: "web".into(),
            id: "b1".into(),
            drained: true,
        };
        change_state(&cfg(), &mut services, &mut status, drain, Instant::now()).unwrap();
        assert!(status[&BackendRef::new("web", "b1")].held.is_some());
    }

    fn terms() -> crate::status::lease::Terms {
        crate::status::lease::Terms {
            ttl: Duration::from_secs(2),
            deregister_after: Duration::from_secs(5),
        }
    }

    /// The start state with `web/r1` registered with a TTL.
    fn registered() -> (Vec<Service>, BTreeMap<BackendRef, BackendStatus>) {
        let (mut services, mut status) = start();
        let add = Change::AddBackend {
            service: "web".into(),
            backend: Backend::new("r1", ip("10.0.1.9")),
            lease: Some(terms()),
        };
        change_state(&cfg(), &mut services, &mut status, add, Instant::now()).unwrap();
        (services, status)
    }

    /// A change of one backend applied to its service alone (`change_one`, the writer's path
    /// for them) leaves the same services and statuses, or the same refusal, as on the whole.
    #[test]
    fn a_change_of_one_backend_does_on_its_service_what_it_does_on_the_whole() {
        let changes = || {
            let id = |s: &str| s.to_string();
            vec![
                Change::AddBackend {
                    service: id("web"),
                    backend: Backend::new("r2", ip("10.0.1.10")),
                    lease: Some(terms()),
                },
                Change::AddBackend {
                    service: id("web"),
                    backend: Backend::new("b0", ip("10.0.1.11")),
                    lease: None,
                },
                Change::AddBackend {
                    service: id("nope"),
                    backend: Backend::new("x", ip("10.0.1.12")),
                    lease: None,
                },
                Change::AddBackend {
                    service: id("web"),
                    backend: Backend::new("bad", ip("0.0.0.0")),
                    lease: None,
                },
                Change::Heartbeat {
                    service: id("web"),
                    id: id("r1"),
                },
                Change::Heartbeat {
                    service: id("web"),
                    id: id("b0"),
                },
                Change::RemoveBackend {
                    service: id("web"),
                    id: id("b1"),
                },
                Change::RemoveBackend {
                    service: id("dns"),
                    id: id("b1"),
                },
                Change::SetWeight {
                    service: id("web"),
                    id: id("b0"),
                    weight: 7,
                },
                Change::SetWeight {
                    service: id("web"),
                    id: id("b0"),
                    weight: 1_000_000,
                },
                Change::SetDrain {
                    service: id("web"),
                    id: id("r1"),
                    drained: true,
                },
                Change::SetExternal {
                    service: id("web"),
                    id: id("b1"),
                    score: 0.5,
                    ttl: None,
                },
                Change::SetExternal {
                    service: id("web"),
                    id: id("b1"),
                    score: 2.0,
                    ttl: None,
                },
            ]
        };
        let now = Instant::now();
        let start = registered();
        let (mut refused, mut applied) = (0, 0);
        for (whole, one) in changes().into_iter().zip(changes()) {
            let what = format!("{whole:?}");
            let (mut services, mut status) = start.clone();
            let whole = change_state(&cfg(), &mut services, &mut status, whole, now);
            let (mut services1, mut status1) = start.clone();
            let (service, id) = one.backend_scope().expect("a change of one backend");
            let key = BackendRef::new(service, id);
            let touched = super::super::warnings::Touched::of(&one);
            let one = change_one(&cfg(), &mut services1, &mut status1, key, &touched, one, now);
            match (whole, one) {
                (Ok(()), Ok(_)) => {
                    applied += 1;
                    assert_eq!(services1, services, "{what}");
                    assert_eq!(format!("{status1:?}"), format!("{status:?}"), "{what}");
                }
                (Err(a), Err(b)) => {
                    refused += 1;
                    assert_eq!(a.to_string(), b.to_string(), "{what}");
                    assert_eq!(services1, start.0, "{what}: refused, nothing changed");
                    assert_eq!(format!("{status1:?}"), format!("{:?}", start.1), "{what}");
                }
                (a, b) => panic!("{what}: on the whole {a:?}, on its service {b:?}"),
            }
        }
        assert_eq!((applied, refused), (6, 7));
    }

    #[test]
    fn a_heartbeat_renews_a_lease_and_undrains_and_is_refused_without_one() {
        let (mut services, mut status) = registered();
        let r1 = BackendRef::new("web", "r1");
        status.get_mut(&r1).unwrap().lease.as_mut().unwrap().drained = true;
        let later = Instant::now() + Duration::from_secs(3);
        let beat = |id: &str| Change::Heartbeat {
            service: "web".into(),
            id: id.into(),
        };
        change_state(&cfg(), &mut services, &mut status, beat("r1"), later).unwrap();
        let lease = status[&r1].lease.unwrap();
        assert_eq!((lease.renewed, lease.drained), (later, false));
        assert_eq!(status[&r1].up_at, Some(later), "back: the usual ramp");
        // Unknown id, unknown service, a backend without a ttl: refused, nothing changed.
        let before = (services.clone(), status.clone());
        let e = change_state(&cfg(), &mut services, &mut status, beat("nope"), later).unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e}");
        let e = change_state(
            &cfg(),
            &mut services,
            &mut status,
            Change::Heartbeat {
                service: "nope".into(),
                id: "r1".into(),
            },
            later,
        )
        .unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e}");
        let e = change_state(&cfg(), &mut services, &mut status, beat("b0"), later).unwrap_err();
        assert!(
            matches!(&e, Error::Invalid(m) if m.contains("without a ttl")),
            "{e}"
        );
        assert_eq!((services, status), before);
    }

    #[test]
    fn a_reload_keeps_registrations_unless_the_file_declares_them() {
        let (services, status) = registered();
        let file = start().0;
        let reload = |s: &mut Vec<Service>, st: &mut BTreeMap<_, _>, next: Vec<Service>| {
            let mut layer = Arc::new(file.clone());
            change_with_file(
                &cfg(),
                &mut layer,
                s,
                st,
                Change::Reload(next.clone()),
                Instant::now(),
            )
            .unwrap();
            assert_eq!(*layer, next, "the file as loaded now");
        };
        // The file as it was: r1 kept, with its lease.
        let (mut s, mut st) = (services.clone(), status.clone());
        reload(&mut s, &mut st, file.clone());
        assert!(web(&s).backend("r1").is_some());
        assert!(st[&BackendRef::new("web", "r1")].lease.is_some());
        // The file now declares r1's address and port under another id: the file's, no lease.
        let mut declares = file.clone();
        declares[0].backends.push(Backend::new("static", ip("10.0.1.9")));
        let (mut s, mut st) = (services.clone(), status.clone());
        reload(&mut s, &mut st, declares);
        assert!(web(&s).backend("r1").is_none());
        assert!(st.values().all(|x| x.lease.is_none()));
        // The service is gone from the file: so is the registration.
        let (mut s, mut st) = (services.clone(), status.clone());
        let only_dns = file.iter().filter(|x| x.name == "dns").cloned().collect();
        reload(&mut s, &mut st, only_dns);
        assert_eq!(s.len(), 1);
        // The cluster's state replaces whole: what it does not hold is gone.
        let (mut s, mut st) = (services, status);
        change_state(
            &cfg(),
            &mut s,
            &mut st,
            Change::Replace(file.clone()),
            Instant::now(),
        )
        .unwrap();
        assert!(web(&s).backend("r1").is_none());
    }

    #[test]
    fn a_service_with_a_source_takes_no_backend_by_hand_and_a_reload_keeps_its_own() {
        use crate::model::discovery_settings::{DiscoverySettings, SourceKind};
        let source = DiscoverySettings {
            path: Some("/etc/lb/web.json".into()),
            ..DiscoverySettings::new(SourceKind::File)
        };
        let (mut services, mut status) = start();
        services[0].discovery = Some(Box::new(source.clone()));
        let before = (services.clone(), status.clone());
        for change in [
            Change::AddBackend {
                service: "web".into(),
                backend: Backend::new("b2", ip("10.0.1.3")),
                lease: None,
            },
            Change::RemoveBackend {
                service: "web".into(),
                id: "b0".into(),
            },
            Change::SetWeight {
                service: "web".into(),
                id: "b0".into(),
                weight: 5,
            },
        ] {
            let e = change_state(&cfg(), &mut services, &mut status, change, Instant::now()).unwrap_err();
            assert!(
                matches!(&e, Error::Invalid(m) if m == "service web takes its backends from its file source ([service.discovery]): change them there"),
                "{e}"
            );
        }
        assert_eq!((services.clone(), status.clone()), before);
        // A service added with a source and backends of its own: refused.
        let mut api = Service::new("api", ip("10.0.0.3"), 443, Protocol::Tcp);
        api.discovery = Some(Box::new(source.clone()));
        api.backends.push(Backend::new("x", ip("10.0.1.9")));
        let e = change_state(
            &cfg(),
            &mut services,
            &mut status,
            Change::AddService(api),
            Instant::now(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("declare none here"), "{e}");
        // The file, reloaded, declares no backends for web: web keeps those its source gave.
        let mut file = start().0;
        file[0].discovery = Some(Box::new(source));
        file[0].backends.clear();
        change_state(
            &cfg(),
            &mut services,
            &mut status,
            Change::Replace(file),
            Instant::now(),
        )
        .unwrap();
        assert_eq!(web(&services).backends, before.0[0].backends);
    }
}
