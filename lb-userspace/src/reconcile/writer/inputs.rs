//! The writer's inputs beside the pass: geo data, resource-aware steps, leases (expiry and
//! the heartbeats that only renew them), and the cluster's external scores.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use log::warn;

use super::{RENEWALS_SHOWN, Writer};
use crate::{
    error::{Error, Result},
    model::{BackendRef, Service, Strategy},
    reconcile::inbox::{Change, Command},
    snapshot::{GeoStatus, in_effect},
    status::{BackendStatus, External, lease::Step},
    strategy::{geo, resource},
};

impl Writer {
    /// Reads, parses and loads the geo data file; on any error nothing changes.
    pub(super) async fn load_geo(&mut self) -> Result<usize> {
        let Some(geo) = self.cfg.geo.clone() else {
            return Err(Error::invalid("no [daemon.geo] in the config"));
        };
        let Some(path) = geo.data.clone() else {
            return Err(Error::invalid("[daemon.geo] names no data file"));
        };
        let source = path.display().to_string();
        let maps = self.maps.clone();
        let (n, per_region) =
            tokio::task::spawn_blocking(move || -> Result<(usize, BTreeMap<String, usize>)> {
                let prefixes = geo::load_configured(&path, &geo).map_err(Error::invalid)?;
                let per_region = geo::per_region(&prefixes, &geo);
                let mut guard = maps.lock().unwrap_or_else(|p| p.into_inner());
                let n = guard.dp.load_geo(&prefixes)?;
                Ok((n, per_region))
            })
            .await
            .map_err(|e| Error::dataplane(format!("geo load task: {e}")))??;
        self.geo = Some(GeoStatus {
            source,
            prefixes: n,
            prefixes_per_region: per_region,
            loaded_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        });
        self.snapshot.send_modify(|s| {
            let mut next = (**s).clone();
            next.geo = self.geo.clone();
            *s = Arc::new(next);
        });
        Ok(n)
    }

    /// One resource-aware update of every service running it, if due (`strategy::resource`).
    pub(super) async fn resource_update(
        &mut self,
        services: &[Service],
        status: &mut BTreeMap<BackendRef, BackendStatus>,
        reported: bool,
        now: Instant,
    ) {
        let due = self.resource_due.is_some_and(|t| t <= now);
        // Idle until a load signal arrives; then every interval while there is load to follow.
        let wake = reported && self.resource_due.is_none();
        if !(due || wake) {
            return;
        }
        let running = services
            .iter()
            .filter(|s| in_effect(&self.adaptive, s) == Strategy::ResourceAware);
        let (jobs, next) = resource::observe(running, status, now);
        self.resource_due = next.map(|d| now + d);
        if jobs.is_empty() {
            return;
        }
        let steps = tokio::task::spawn_blocking(move || {
            jobs.into_iter().map(resource::Job::step).collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for step in steps {
            for (id, f) in step.factors {
                if let Some(st) = status.get_mut(&BackendRef::new(&step.service, &id)) {
                    st.load.factor = f;
                }
            }
            self.counters.resource_steps += 1;
            log::debug!(
                "service {}: resource-aware step moves {:.1}% of the table",
                step.service,
                step.moved * 100.0
            );
        }
    }

    /// Drains the backends whose heartbeat is late by their TTL and removes those late by
    /// `deregister_after` more, as `Lease::step` decides; each once, logged and counted.
    pub(super) fn expire_leases(
        &self,
        services: &mut [Service],
        status: &mut BTreeMap<BackendRef, BackendStatus>,
        now: Instant,
    ) {
        let mut removed = Vec::new();
        for (b, st) in status.iter_mut() {
            let Some(lease) = &mut st.lease else { continue };
            let outcome = match lease.step(now) {
                Step::Keep => continue,
                Step::Drain => {
                    lease.drained = true;
                    warn!(
                        "backend {b}: no heartbeat for {:.1} s (ttl {} s): drained, no new flows",
                        now.saturating_duration_since(lease.renewed).as_secs_f64(),
                        lease.terms.ttl.as_secs_f64()
                    );
                    "drained"
                }
                Step::Remove => {
                    warn!(
                        "backend {b}: no heartbeat for {:.1} s: deregistered",
                        now.saturating_duration_since(lease.renewed).as_secs_f64()
                    );
                    removed.push(b.clone());
                    "removed"
                }
            };
            self.histograms
                .expiries
                .with_label_values(&[b.service.as_str(), outcome])
                .inc();
        }
        for b in removed {
            if let Some(s) = services.iter_mut().find(|s| s.name == b.service) {
                s.backends.retain(|x| x.id != b.id);
            }
            status.remove(&b);
        }
    }

    /// The next-hop epochs of the batch, taken before the pass: one move of the data plane's
    /// epoch for them all (no plan, no table). The rest of the batch is returned.
    pub(super) fn hop_epochs(&mut self, mut batch: Vec<Command>) -> Vec<Command> {
        let before = batch.len();
        batch.retain(|c| !matches!(c, Command::HopEpoch));
        if batch.len() < before {
            let mut guard = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = guard.dp.next_hop_epoch() {
                warn!("the data plane's cached next hops were not renewed: {e}");
            }
        }
        batch
    }

    /// Heartbeats that only renew a live lease, taken before the pass: they change no table,
    /// no file and no answer's warnings, and 10,000 instances at a 10 s TTL send 1,000 a
    /// second. The snapshot shows them within a second (`renewals_due`). The rest of the batch
    /// is returned for the pass.
    pub(super) fn renew(&mut self, batch: Vec<Command>, now: Instant) -> Vec<Command> {
        let mut rest = Vec::with_capacity(batch.len());
        for c in batch {
            let Command::Change { change, reply } = c else {
                rest.push(c);
                continue;
            };
            match *change {
                Change::Heartbeat { service, id } if self.renews(&BackendRef::new(&service, &id), now) => {
                    self.histograms
                        .heartbeats
                        .with_label_values(&[service.as_str()])
                        .inc();
                    let _ = reply.send(Ok(vec![]));
                }
                other => rest.push(Command::Change {
                    change: Box::new(other),
                    reply,
                }),
            }
        }
        rest
    }

    /// Renews `b`'s lease if it is live (not drained): in the applied status, and in what a
    /// failed pass left to apply.
    fn renews(&mut self, b: &BackendRef, now: Instant) -> bool {
        let live = |st: &mut BackendStatus| match &mut st.lease {
            Some(l) if !l.drained => {
                l.renewed = now;
                true
            }
            _ => false,
        };
        if !self.status.get_mut(b).is_some_and(live) {
            return false;
        }
        if let Some(st) = self.unapplied.as_mut().and_then(|u| u.status.get_mut(b)) {
            live(st);
        }
        self.renewals_due.get_or_insert(now + RENEWALS_SHOWN);
        true
    }
}

/// The cluster's external scores on every backend: set where it holds one, gone elsewhere
/// (its expiry is etcd's: a lease deletes the key).
pub(super) fn cluster_scores(
    services: &[Service],
    status: &mut BTreeMap<BackendRef, BackendStatus>,
    set: &BTreeMap<BackendRef, f64>,
) {
    for s in services {
        for b in &s.backends {
            let r = BackendRef::new(&s.name, &b.id);
            let want = set.get(&r).map(|&score| External { score, expires: None });
            match status.get_mut(&r) {
                Some(st) => st.external = want,
                None if want.is_some() => {
                    status.insert(
                        r,
                        BackendStatus {
                            external: want,
                            ..Default::default()
                        },
                    );
                }
                None => {}
            }
        }
    }
}
