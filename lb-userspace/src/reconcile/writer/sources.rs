//! The writer's side of discovery: a source's read becomes its service's backends through the
//! pure steps of `discovered` (check, guard, apply), each skipped entry and failed read logged
//! and counted; held shrinks and drains after a source's removal fall due on the writer's
//! timer.

use std::{collections::BTreeMap, time::Instant};

use log::{info, warn};

use super::Writer;
use crate::{
    config::{validate_against, validate_services},
    model::{Backend, BackendRef, Service},
    reconcile::discovered::{self, Guard},
    reconcile::inbox::Command,
    status::{
        BackendStatus,
        discovery::{Held, Report, SourceState, digest},
    },
};

impl Writer {
    /// Takes one source's read. Returns whether it may have changed the services (a pass
    /// that then fails forgets the read, so the same set read again is tried again).
    pub(super) fn discovered(
        &mut self,
        report: Report,
        services: &mut [Service],
        status: &mut BTreeMap<BackendRef, BackendStatus>,
        now: Instant,
    ) -> bool {
        let Some(i) = services.iter().position(|s| s.name == report.service) else {
            return false;
        };
        // Made under settings the service no longer has: its new source reads again.
        if services[i].discovery.as_deref() != Some(&report.settings) {
            return false;
        }
        let name = report.service;
        let kind = report.settings.kind.name();
        let state = self
            .sources
            .entry(name.clone())
            .or_insert_with(|| SourceState::new(report.settings.clone()));
        // The service's settings changed in this pass: its new source starts afresh.
        if state.settings != report.settings {
            *state = SourceState::new(report.settings.clone());
        }
        let entries = match report.outcome {
            Err(e) => {
                self.histograms
                    .discovery_errors
                    .with_label_values(&[name.as_str(), kind, e.reason.name()])
                    .inc();
                if state.error.as_ref().map(|x| &x.message) != Some(&e.message) {
                    warn!(
                        "service {name}: {kind} source: {}; the last known set stays ({} backends)",
                        e.message,
                        crate::status::discovery::live(&services[i], status)
                    );
                }
                state.error = Some(e);
                return false;
            }
            Ok(entries) => entries,
        };
        if state.error.take().is_some() {
            info!("service {name}: {kind} source reads again");
        }
        let read = digest(&entries);
        if state.last == Some(read) {
            return false;
        }
        state.last = Some(read);
        state.updates += 1;
        state.updated_at = Some(now);
        self.histograms
            .discovery_updates
            .with_label_values(&[name.as_str(), kind])
            .inc();
        let checked = discovered::check(&services[i], &self.cfg, entries);
        // Said and counted once while it stays bad: not again with every set that has it.
        for s in checked.skipped.iter().filter(|s| !state.skipped.contains(s)) {
            self.histograms
                .discovery_errors
                .with_label_values(&[name.as_str(), kind, s.reason.name()])
                .inc();
            warn!(
                "service {name}: {kind} source: {}: {}: skipped ({})",
                s.entry,
                s.why,
                s.reason.name()
            );
        }
        state.skipped = checked.skipped;
        self.offer(i, checked.backends, services, status, now);
        true
    }

    /// A checked set for service `i`: applied, or held while it is a suspect shrink.
    fn offer(
        &mut self,
        i: usize,
        set: Vec<Backend>,
        services: &mut [Service],
        status: &mut BTreeMap<BackendRef, BackendStatus>,
        now: Instant,
    ) {
        let name = services[i].name.clone();
        let Some(state) = self.sources.get_mut(&name) else {
            return;
        };
        let kind = state.settings.kind.name();
        let live = crate::status::discovery::live(&services[i], status);
        let since = state.held.as_ref().map(|h| h.since);
        match discovered::guard(live, set.len(), since, state.settings.confirm(), now) {
            Guard::Hold { since, until } => {
                if state.held.is_none() {
                    warn!(
                        "service {name}: {kind} source lists {} backends of {live} live: held as suspect; applied if it persists {:.0} s (confirm_shrink)",
                        set.len(),
                        state.settings.confirm_shrink
                    );
                }
                state.held = Some(Held {
                    set,
                    live: state.held.as_ref().map_or(live, |h| h.live),
                    since,
                    until,
                });
            }
            Guard::Apply => {
                if let Some(h) = state.held.take() {
                    info!(
                        "service {name}: {kind} source's shrink {}",
                        if set.len() * 2 < live {
                            format!(
                                "persisted {:.1} s: applied",
                                now.saturating_duration_since(h.since).as_secs_f64()
                            )
                        } else {
                            "is over: the new set applies".into()
                        }
                    );
                }
                let drain = state.settings.drain();
                self.apply_set(i, set, drain, services, status, now);
            }
        }
    }

    /// Makes `set` service `i`'s backends, if the services stay valid whole.
    fn apply_set(
        &mut self,
        i: usize,
        set: Vec<Backend>,
        drain: std::time::Duration,
        services: &mut [Service],
        status: &mut BTreeMap<BackendRef, BackendStatus>,
        now: Instant,
    ) {
        let mut next = services[i].clone();
        let mut next_status = status.clone();
        let moves = discovered::apply(&mut next, &mut next_status, set, drain, now);
        if moves.is_empty() {
            return;
        }
        let name = next.name.clone();
        let kind = next.discovery.as_ref().map_or("", |d| d.kind.name());
        let old = std::mem::replace(&mut services[i], next);
        // Each backend was checked alone; the whole must hold too (it does, unless a check is
        // missing there: then the set is refused, not the pass).
        if let Err(e) = validate_services(services).and_then(|()| validate_against(&self.cfg, services)) {
            services[i] = old;
            warn!("service {name}: {kind} source's set refused whole: {e}");
            return;
        }
        *status = next_status;
        info!(
            "service {name}: {kind} source: {} added, {} changed, {} back, {} draining, {} removed{}",
            moves.added.len(),
            moves.changed.len(),
            moves.returned.len(),
            moves.departing.len(),
            moves.removed.len(),
            if moves.departing.is_empty() {
                String::new()
            } else {
                format!(" (drained {:.1} s before removal)", drain.as_secs_f64())
            }
        );
    }

    /// Held shrinks that persisted, and drains after a source's removal that are over.
    pub(super) fn sources_due(
        &mut self,
        services: &mut [Service],
        status: &mut BTreeMap<BackendRef, BackendStatus>,
        now: Instant,
    ) {
        let due: Vec<String> = self
            .sources
            .iter()
            .filter(|(_, s)| s.held.as_ref().is_some_and(|h| h.until <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            let Some(i) = services.iter().position(|s| s.name == name) else {
                continue;
            };
            let Some(held) = self.sources.get_mut(&name).and_then(|s| s.held.take()) else {
                continue;
            };
            let drain = services[i]
                .discovery
                .as_ref()
                .map(|d| d.drain())
                .unwrap_or_default();
            info!(
                "service {name}: the source's shrink to {} backends (of {} live) persisted {:.1} s: applied",
                held.set.len(),
                held.live,
                now.saturating_duration_since(held.since).as_secs_f64()
            );
            self.apply_set(i, held.set, drain, services, status, now);
        }
        for b in discovered::remove_departed(services, status, now) {
            info!("backend {b}: gone from its source, drained: removed");
        }
    }

    /// Forgets what a failed pass took from these sources' reads: the same set read again is
    /// tried again.
    pub(super) fn sources_unread(&mut self, names: &[String]) {
        for n in names {
            if let Some(s) = self.sources.get_mut(n) {
                s.last = None;
            }
        }
    }

    /// When a held shrink or a drain after a source's removal falls due.
    pub(super) fn sources_next(&self) -> Option<Instant> {
        let held = self
            .sources
            .values()
            .filter_map(|s| s.held.as_ref().map(|h| h.until));
        let departing = self.status.values().filter_map(|s| s.departing);
        held.chain(departing).min()
    }
}

/// Forgets the sources of services gone, or whose settings changed (their new source starts
/// from what the service has).
pub(super) fn follow(sources: &mut BTreeMap<String, SourceState>, services: &[Service]) {
    sources.retain(|name, state| {
        services
            .iter()
            .any(|s| &s.name == name && s.discovery.as_deref() == Some(&state.settings))
    });
}

/// A batch with each service's superseded reads left out: a read is a whole set, so of the
/// good reads a source sent while the last pass ran only its last one counts (an etcd source
/// in a burst of puts sends one per revision). Failed reads all stay, to be counted.
pub(super) fn latest_reads(batch: Vec<Command>) -> Vec<Command> {
    let mut seen = std::collections::HashSet::new();
    let mut keep = vec![true; batch.len()];
    for (i, c) in batch.iter().enumerate().rev() {
        if let Command::Discovered(r) = c
            && r.outcome.is_ok()
            && !seen.insert(r.service.as_str())
        {
            keep[i] = false;
        }
    }
    let mut keep = keep.into_iter();
    batch
        .into_iter()
        .filter(|_| keep.next().unwrap_or(true))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::discovery_settings::{DiscoverySettings, SourceKind},
        status::discovery::{ErrorReason, SourceError},
    };

    fn read(service: &str, n: usize) -> Command {
        let entries = (0..n)
            .map(|i| {
                Ok(crate::status::discovery::Entry {
                    id: format!("b{i}"),
                    address: format!("10.0.1.{}", i + 1),
                    port: None,
                    weight: None,
                    zone: None,
                    region: None,
                    labels: BTreeMap::new(),
                })
            })
            .collect();
        Command::Discovered(Report {
            service: service.into(),
            settings: DiscoverySettings::new(SourceKind::Etcd),
            outcome: Ok(entries),
        })
    }

    #[test]
    fn of_a_burst_of_reads_only_each_services_last_good_one_is_taken() {
        let failed = Command::Discovered(Report {
            service: "web".into(),
            settings: DiscoverySettings::new(SourceKind::Etcd),
            outcome: Err(SourceError::new(ErrorReason::Unavailable, "gone")),
        });
        let batch = vec![
            read("web", 1),
            read("api", 1),
            failed,
            read("web", 2),
            read("web", 3),
        ];
        let kept: Vec<(String, Option<usize>)> = latest_reads(batch)
            .into_iter()
            .filter_map(|c| match c {
                Command::Discovered(r) => Some((r.service, r.outcome.ok().map(|e| e.len()))),
                _ => None,
            })
            .collect();
        assert_eq!(
            kept,
            [
                ("api".to_string(), Some(1)),
                ("web".to_string(), None),
                ("web".to_string(), Some(3))
            ]
        );
    }
}
