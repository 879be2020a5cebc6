//! The desired state's two layers: what the config file declares, and what was changed at run
//! time (API calls, the Python client, registrations with a TTL). One rule, for a reload and for
//! a restart that adopts the running data plane alike (HAProxy's, with its server-state file):
//! - what the file does not declare (services and backends added at run time) is kept, until
//!   the file declares it itself (then it is the file's) or removes its service;
//! - a value the file declares that was changed through the API (a weight, a strategy, a
//!   backend or service removed) stays as the API left it while the file still says what it
//!   said when last loaded; once the file says something new there, the file's value applies,
//!   and the run-time change it replaced is said in one line.
//!
//! So a crash and restart, or a reload of an unchanged file, changes nothing, and an edit to the
//! file always takes effect. Which items are the file's, and what it said, is known from the
//! file as last loaded (the writer keeps it, and the state file carries it over a restart); a
//! service with a discovery source keeps its source's backends instead (`discovered::keep`).

use std::collections::BTreeMap;

use log::info;

use crate::{
    model::{Backend, BackendRef, Service},
    status::BackendStatus,
};

/// The services a reload (or a restart) leads to, and the run-time changes it replaced.
#[derive(Debug)]
pub struct Reloaded {
    pub services: Vec<Service>,
    /// One line per change made through the API that a new value in the file replaced.
    pub notes: Vec<String>,
}

/// Lays the run-time layer over the file's new services (`after`). `before` is the file as
/// last loaded, `running` the services in effect. A run-time registration the file now
/// declares (same id, or same address and port) loses its TTL: it is the file's from then on.
pub fn reload(
    before: &[Service],
    running: &[Service],
    status: &mut BTreeMap<BackendRef, BackendStatus>,
    after: &[Service],
) -> Reloaded {
    let mut next = after.to_vec();
    let mut notes = Vec::new();
    for r in running {
        let declared = before.iter().find(|b| b.name == r.name);
        let added_here = |rb: &Backend| declared.is_none_or(|d| d.backend(&rb.id).is_none());
        let Some(a) = next.iter_mut().find(|a| a.name == r.name) else {
            match declared {
                None => next.push(r.clone()),
                Some(_) => {
                    let lost = r.backends.iter().filter(|rb| added_here(rb)).count();
                    if lost > 0 {
                        notes.push(format!(
                            "service {}: removed by the config file, with {lost} backends registered at run time",
                            r.name
                        ));
                    }
                }
            }
            continue;
        };
        match declared {
            None => info!(
                "service {}: added at run time, now declared in the config file: the file's settings apply",
                r.name
            ),
            Some(d) => keep_api_changes(d, r, a, &mut notes),
        }
        if a.discovery.is_some() || r.discovery.is_some() {
            continue;
        }
        for rb in r.backends.iter().filter(|rb| added_here(rb)) {
            let port = rb.port(r);
            let taken = a
                .backends
                .iter()
                .any(|ab| ab.id == rb.id || (ab.address == rb.address && ab.port(a) == port));
            if !taken {
                a.backends.push(rb.clone());
                continue;
            }
            let key = BackendRef::new(&r.name, &rb.id);
            if status.get_mut(&key).and_then(|st| st.lease.take()).is_some() {
                info!(
                    "backend {key}: now declared in the config file; its registration's ttl no longer applies"
                );
            }
        }
    }
    // Services of the file removed through the API stay removed while the file says the same.
    next.retain(|a| {
        let Some(d) = before.iter().find(|d| d.name == a.name) else {
            return true;
        };
        if running.iter().any(|r| r.name == a.name) {
            return true;
        }
        let changed = d != a;
        if changed {
            notes.push(format!(
                "service {}: removed through the API, restored by the config file's new settings",
                a.name
            ));
        }
        changed
    });
    Reloaded {
        services: next,
        notes,
    }
}

/// In a service the file declared (`declared`, as the file said then; `running`, as it is;
/// `next`, the file's new version, edited here): the API's changes to what the file declared
/// stay where the file still says the same, and are replaced, with a note, where it does not.
fn keep_api_changes(declared: &Service, running: &Service, next: &mut Service, notes: &mut Vec<String>) {
    let name = running.name.clone();
    if running.strategy != declared.strategy {
        if next.strategy == declared.strategy {
            next.strategy = running.strategy;
        } else if next.strategy != running.strategy {
            notes.push(format!(
                "service {name}: strategy {} (set through the API) replaced by the file's new {}",
                running.strategy.name(),
                next.strategy.name()
            ));
        }
    }
    for d in &declared.backends {
        let Some(i) = next.backends.iter().position(|a| a.id == d.id) else {
            continue;
        };
        let unchanged = next.backends[i] == *d;
        match running.backend(&d.id) {
            None if unchanged => {
                next.backends.remove(i);
            }
            None => notes.push(format!(
                "backend {name}/{}: removed through the API, restored by the config file's new settings",
                d.id
            )),
            Some(r) if r.weight != d.weight => {
                let a = &mut next.backends[i];
                if a.weight == d.weight {
                    a.weight = r.weight;
                } else if a.weight != r.weight {
                    notes.push(format!(
                        "backend {name}/{}: weight {} (set through the API) replaced by the file's new {}",
                        d.id, r.weight, a.weight
                    ));
                }
            }
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::{
        config::Config,
        model::Strategy,
        status::lease::{Lease, Terms},
    };

    fn file(text: &str) -> Vec<Service> {
        Config::parse(&format!("[daemon]\ninterfaces = [\"eth0\"]\n{text}"))
            .expect("config")
            .services
    }

    const WEB: &str = "[[service]]\nname = \"web\"\nvip = \"10.0.0.1\"\nport = 80\nprotocol = \"tcp\"\n\
        [[service.backend]]\nid = \"b1\"\naddress = \"10.1.0.1\"\n\
        [[service.backend]]\nid = \"b2\"\naddress = \"10.1.0.2\"\n";

    fn backend(id: &str, addr: &str) -> Backend {
        Backend::new(id, addr.parse().unwrap())
    }

    fn svc<'a>(s: &'a [Service], name: &str) -> &'a Service {
        s.iter().find(|s| s.name == name).expect("service")
    }

    /// Through the API: a backend added without a TTL, b1's weight, b2 removed, the strategy,
    /// and a service of its own.
    fn changed_at_run_time(before: &[Service]) -> Vec<Service> {
        let mut running = before.to_vec();
        running[0].backends.push(backend("py1", "10.1.0.9"));
        running[0].backends[0].weight = 7;
        running[0].backends.retain(|b| b.id != "b2");
        running[0].strategy = Strategy::RoundRobin;
        let mut api = before[0].clone();
        api.name = "api".into();
        api.port = 81;
        api.backends = vec![backend("a1", "10.2.0.1")];
        running.push(api);
        running
    }

    #[test]
    fn run_time_changes_stay_while_the_file_says_the_same() {
        let before = file(WEB);
        let running = changed_at_run_time(&before);
        // A crash and restart, or a reload of the same file: nothing moves, nothing is said.
        let r = reload(&before, &running, &mut BTreeMap::new(), &before);
        assert_eq!(r.services, running);
        assert!(r.notes.is_empty(), "{:?}", r.notes);
    }

    #[test]
    fn a_new_value_in_the_file_replaces_the_api_change_and_says_so() {
        let before = file(WEB);
        let running = changed_at_run_time(&before);
        let mut after = before.clone();
        after[0].backends[0].weight = 20;
        after[0].backends[1].weight = 3;
        after[0].strategy = Strategy::PowerOfTwo;
        let r = reload(&before, &running, &mut BTreeMap::new(), &after);
        let web = svc(&r.services, "web");
        let ids: Vec<&str> = web.backends.iter().map(|b| b.id.as_str()).collect();
        assert_eq!(
            ids,
            ["b1", "b2", "py1"],
            "the file's two, and the registration kept"
        );
        assert_eq!((web.backends[0].weight, web.backends[1].weight), (20, 3));
        assert_eq!(web.strategy, Strategy::PowerOfTwo);
        assert_eq!(
            svc(&r.services, "api").backends.len(),
            1,
            "a run-time service stays"
        );
        assert_eq!(
            r.notes,
            [
                "service web: strategy round-robin (set through the API) replaced by the file's new power-of-two",
                "backend web/b1: weight 7 (set through the API) replaced by the file's new 20",
                "backend web/b2: removed through the API, restored by the config file's new settings",
            ]
        );
    }

    #[test]
    fn a_file_change_is_no_revert_and_an_api_value_the_file_now_agrees_with_is_kept_silently() {
        let before = file(WEB);
        let mut running = before.clone();
        running[0].backends[0].weight = 5;
        let mut after = before.clone();
        after[0].backends[0].weight = 5; // the file now says what the API set
        after[0].backends[1].weight = 3; // and changes b2 itself
        let r = reload(&before, &running, &mut BTreeMap::new(), &after);
        assert!(r.notes.is_empty(), "{:?}", r.notes);
        assert_eq!(r.services, after);
    }

    #[test]
    fn a_registration_the_file_declares_becomes_the_files_and_a_removed_service_takes_its_own() {
        let before = file(WEB);
        let mut running = before.clone();
        running[0].backends.push(backend("py1", "10.1.0.9"));
        let key = BackendRef::new("web", "py1");
        let mut status = BTreeMap::new();
        let terms = Terms::from_secs(10.0, 60.0).unwrap();
        status.insert(
            key.clone(),
            BackendStatus {
                lease: Some(Lease::new(terms, Instant::now())),
                ..Default::default()
            },
        );
        // The file declares the same address and port under another id.
        let mut after = before.clone();
        after[0].backends.push(backend("b9", "10.1.0.9"));
        let r = reload(&before, &running, &mut status, &after);
        assert_eq!(r.services, after, "not twice");
        assert!(status[&key].lease.is_none(), "the file's now: no ttl");

        // A file without the service drops it, registrations included, and says so.
        let r = reload(&before, &running, &mut BTreeMap::new(), &[]);
        assert!(r.services.is_empty());
        assert_eq!(
            r.notes,
            ["service web: removed by the config file, with 1 backends registered at run time"]
        );
    }

    #[test]
    fn a_service_removed_through_the_api_comes_back_only_with_new_settings() {
        let before = file(WEB);
        let r = reload(&before, &[], &mut BTreeMap::new(), &before);
        assert!(r.services.is_empty() && r.notes.is_empty(), "{r:?}");
        let mut after = before.clone();
        after[0].port = 8080;
        let r = reload(&before, &[], &mut BTreeMap::new(), &after);
        assert_eq!(r.services, after);
        assert_eq!(
            r.notes,
            ["service web: removed through the API, restored by the config file's new settings"]
        );
        // Nothing run-time and nothing changed: the file, as it is, and no word.
        let r = reload(&before, &before, &mut BTreeMap::new(), &before);
        assert_eq!((r.services, r.notes.len()), (before, 0));
    }
}
