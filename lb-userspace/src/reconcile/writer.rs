//! The writer: one task owns the desired services, every backend's status and the maps. What
//! queues up while a pass runs is taken together in the next pass, so a burst of flaps costs
//! one pass; the pass rebuilds only the tables whose inputs changed, and does its map work
//! (table builds included) on a blocking thread, off the async workers.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use log::{error, info, warn};
use tokio::sync::{mpsc, watch};

use super::{
    apply::Maps,
    change::{change_one, change_with_file, record_health},
    hops,
    inbox::{Change, Command},
    persist::{FileLayer, KeptStatus, Persisted, SavedDrain, SavedLease},
    plan::{self, Desired},
    warnings,
};
use crate::{
    config::{DaemonConfig, ServiceSpec},
    error::{Error, Result},
    metrics::histograms::Histograms,
    model::{BackendRef, Service, Strategy, backend_addresses},
    neigh::{NextHop, Resolver},
    snapshot::{GeoStatus, PassCounters, Snapshot, in_effect, instance_views, next_instances},
    status::{AdaptiveState, BackendStatus, ServiceWeights, agree, cluster::View, effective_weights, votes},
};

mod inputs;
mod sources;

pub struct Writer {
    cfg: DaemonConfig,
    maps: Arc<Mutex<Maps>>,
    resolver: Arc<Resolver>,
    services: Vec<Service>,
    /// The config file's services as last loaded: which of `services` are the file's (`layers`).
    file: Arc<Vec<Service>>,
    hops: HashMap<IpAddr, NextHop>,
    status: BTreeMap<BackendRef, BackendStatus>,
    panicking: std::collections::BTreeSet<String>,
    counters: PassCounters,
    snapshot: watch::Sender<Arc<Snapshot>>,
    /// The services alone, for the health monitor: it wakes only when they change.
    declared: watch::Sender<Arc<Vec<Service>>>,
    state_path: PathBuf,
    histograms: Histograms,
    adaptive: BTreeMap<String, AdaptiveState>,
    geo: Option<GeoStatus>,
    /// The next resource-aware update, while some service has load to follow.
    resource_due: Option<Instant>,
    /// Health and next hops a failed pass could not apply (the monitor and the refresher say
    /// a thing once): the next pass starts from them, and one is due after `RETRY`.
    unapplied: Option<Unapplied>,
    /// In a cluster, the nodes' votes: the tables take the weights they agree on.
    view: Option<View>,
    /// In a cluster, the external scores it holds (they replace the node's own).
    externals: Option<BTreeMap<BackendRef, f64>>,
    /// Heartbeats renewed apart from a pass (`inputs::renew`): a pass is due then to show them.
    renewals_due: Option<Instant>,
    /// Each discovery source's state: its last read, skipped entries, a shrink it holds.
    sources: BTreeMap<String, crate::status::discovery::SourceState>,
    /// The earliest timer the statuses and sources hold (`status_due`), found after each pass
    /// rather than at each wake: heartbeats wake the writer a thousand times a second at 10,000
    /// instances, and a renewal only moves a lease's due later (such a wake finds nothing due).
    due: Option<Instant>,
}

/// What a failed pass could not apply, and when to try again.
struct Unapplied {
    status: BTreeMap<BackendRef, BackendStatus>,
    hops: HashMap<IpAddr, Option<NextHop>>,
    retry_at: Instant,
}

impl Unapplied {
    fn retry(status: BTreeMap<BackendRef, BackendStatus>, hops: HashMap<IpAddr, Option<NextHop>>) -> Self {
        Self {
            status,
            hops,
            retry_at: Instant::now() + RETRY,
        }
    }
}

/// How soon heartbeats renewed apart from a pass reach the snapshot.
const RENEWALS_SHOWN: Duration = Duration::from_secs(1);

/// How soon a failed pass's health and next hops are tried again.
const RETRY: Duration = Duration::from_secs(1);

/// What the writer starts from (`Writer::start`).
pub struct Start {
    /// The services in effect: the state file's when the data plane was adopted, else the
    /// config file's.
    pub services: Vec<Service>,
    /// Registrations' terms and drains kept over a restart.
    pub kept: KeptStatus,
    /// The config file's services when `services` were last saved (the config file's own
    /// when unknown).
    pub file_before: Vec<Service>,
    /// The config file's services now.
    pub file: Vec<Service>,
}

/// The channels to and from a started writer.
pub struct Handles {
    pub commands: mpsc::Sender<Command>,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub services: watch::Receiver<Arc<Vec<Service>>>,
}

impl Writer {
    /// Applies the first state and returns the writer, ready to run, with its warnings. A
    /// restart that adopted the data plane starts from the state it kept, with the config
    /// file laid over it as a reload would (`layers`); a fresh start from the file alone.
    pub async fn start(
        cfg: DaemonConfig,
        maps: Maps,
        resolver: Arc<Resolver>,
        start: Start,
        histograms: Histograms,
    ) -> Result<(Self, Handles, mpsc::Receiver<Command>, Vec<String>)> {
        let (snapshot, snapshot_rx) = watch::channel(Arc::new(Snapshot::default()));
        let (declared, declared_rx) = watch::channel(Arc::new(Vec::new()));
        let (tx, rx) = mpsc::channel(4096);
        let mut writer = Self {
            state_path: cfg.state_path(),
            cfg,
            maps: Arc::new(Mutex::new(maps)),
            resolver,
            services: Vec::new(),
            file: Arc::new(Vec::new()),
            hops: HashMap::new(),
            status: BTreeMap::new(),
            panicking: Default::default(),
            counters: PassCounters::default(),
            snapshot,
            declared,
            histograms,
            adaptive: BTreeMap::new(),
            geo: None,
            resource_due: None,
            unapplied: None,
            view: None,
            externals: None,
            renewals_due: None,
            sources: BTreeMap::new(),
            due: None,
        };
        if writer.cfg.geo.as_ref().is_some_and(|g| g.data.is_some()) {
            match writer.load_geo().await {
                Ok(n) => info!("geo: {n} prefixes loaded"),
                Err(e) => {
                    warn!("geo: {e}; every client goes to the default region until `lb geo reload` succeeds")
                }
            }
        }
        let (services, status) = writer.lay_file(start);
        let warnings = writer.commit(services, status, HashMap::new(), true).await?;
        let handles = Handles {
            commands: tx,
            snapshot: snapshot_rx,
            services: declared_rx,
        };
        Ok((writer, handles, rx, warnings))
    }

    /// The first services and statuses: the kept state with the config file laid over it.
    /// Laying it is checked as a reload is; if the file cannot go over the state, the state
    /// runs as it was, and says why.
    fn lay_file(&mut self, start: Start) -> (Vec<Service>, BTreeMap<BackendRef, BackendStatus>) {
        let now = Instant::now();
        let status = start.kept.status(now);
        let (services, before, file) = (start.services, start.file_before, start.file);
        if services == file && before == file {
            self.file = Arc::new(file);
            return (services, status);
        }
        let mut layer = Arc::new(before);
        let (mut next, mut next_status) = (services.clone(), status.clone());
        let laid = change_with_file(
            &self.cfg,
            &mut layer,
            &mut next,
            &mut next_status,
            Change::Reload(file),
            now,
        );
        self.file = layer;
        match laid {
            Ok(reverted) => {
                info!(
                    "the config file laid over the kept state: {} services",
                    next.len()
                );
                for r in reverted {
                    warn!("restart: {r}");
                }
                (next, next_status)
            }
            Err(e) => {
                warn!(
                    "restart: the config file was not laid over the kept state, which runs as it was until a reload: {e}"
                );
                (services, status)
            }
        }
    }

    /// Runs until every sender is gone.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        self.due = self.status_due();
        loop {
            let timer = self.next_timer();
            let first = tokio::select! {
                c = rx.recv() => match c {
                    Some(c) => Some(c),
                    None => break,
                },
                _ = sleep_until(timer) => None,
            };
            let mut batch: Vec<Command> = first.into_iter().collect();
            while batch.len() < 4096
                && let Ok(c) = rx.try_recv()
            {
                batch.push(c);
            }
            if self.pass(batch).await {
                self.due = self.status_due();
            }
        }
    }

    /// The next TTL expiry, slow-start step, resource-aware update, source's hold, retry or
    /// renewals to show, if any.
    fn next_timer(&self) -> Option<Instant> {
        self.pass_due().into_iter().chain(self.renewals_due).min()
    }

    /// The next timer that takes a pass: the statuses' (as the last pass found them), the
    /// resource-aware update's, or the retry's.
    fn pass_due(&self) -> Option<Instant> {
        [self.due, self.resource_due]
            .into_iter()
            .flatten()
            .chain(self.unapplied.as_ref().map(|u| u.retry_at))
            .min()
    }

    /// The earliest timer in the statuses (a score's expiry, a slow-start step, a lease's due,
    /// a departure) and the sources' holds: one walk of every status.
    fn status_due(&self) -> Option<Instant> {
        let now = Instant::now();
        self.status
            .values()
            .flat_map(|s| {
                [
                    s.external.and_then(|e| e.expires),
                    s.next_ramp_step(now),
                    s.lease.map(|l| l.next_due()),
                ]
            })
            .flatten()
            .chain(self.sources_next())
            .min()
    }

    /// A timer's wake: a pass if a timer the last pass found has come (a slow-start step, a
    /// lease, a score's expiry; one a renewal has since moved later costs a pass, which finds
    /// the new one), or the retry or a resource-aware update; else, with renewals to show, the
    /// snapshot takes the renewed leases, with no pass (no plan, map write or state file:
    /// renewals change none of them). True when a pass is due.
    fn wake(&mut self, now: Instant) -> bool {
        if self.pass_due().is_some_and(|t| t <= now) {
            return true;
        }
        if self.renewals_due.is_some_and(|t| t <= now) {
            self.renewals_due = None;
            let status = self.status.clone();
            self.snapshot.send_modify(|s| {
                let mut next = (**s).clone();
                next.status = status;
                *s = Arc::new(next);
            });
        }
        false
    }

    /// One pass over what queued; false when it changed nothing a timer follows (renewals
    /// alone, or a wake with nothing due).
    async fn pass(&mut self, batch: Vec<Command>) -> bool {
        self.counters.commands += batch.len() as u64;
        let renewing = !batch.is_empty();
        let batch = self.hop_epochs(batch);
        let batch = sources::latest_reads(self.renew(batch, Instant::now()));
        if renewing && batch.is_empty() {
            return false;
        }
        if !renewing && !self.wake(Instant::now()) {
            return false;
        }
        self.renewals_due = None;
        let mut services = self.services.clone();
        let mut file = self.file.clone();
        let (mut status, mut hop_updates) = match self.unapplied.take() {
            Some(u) => (u.status, u.hops),
            None => (self.status.clone(), HashMap::new()),
        };
        let mut replies = Vec::new();
        // Sources whose read this pass took, forgotten if it fails.
        let mut read = Vec::new();
        let now = Instant::now();
        // A load signal arrived: start the resource-aware updates if they are idle.
        let mut reported = false;
        for command in batch {
            match command {
                Command::Change { change, reply } if matches!(*change, Change::ReloadGeo) => {
                    let answer = match self.load_geo().await {
                        Ok(n) => {
                            info!("geo: reloaded, {n} prefixes");
                            Ok(vec![])
                        }
                        Err(e) => {
                            warn!("geo: reload refused, the running data stays: {e}");
                            Err(e)
                        }
                    };
                    let _ = reply.send(answer);
                }
                Command::Change { change, reply } => {
                    reported |= matches!(*change, Change::ReportLoad { .. });
                    let heartbeat = match &*change {
                        Change::Heartbeat { service, .. } => Some(service.clone()),
                        _ => None,
                    };
                    let touched = warnings::Touched::of(&change);
                    let applied = match change.backend_scope() {
                        Some((service, id)) => {
                            let key = BackendRef::new(service, id);
                            change_one(&self.cfg, &mut services, &mut status, key, &touched, *change, now)
                        }
                        None => {
                            let mut next = services.clone();
                            let mut next_status = status.clone();
                            let mut next_file = file.clone();
                            change_with_file(
                                &self.cfg,
                                &mut next_file,
                                &mut next,
                                &mut next_status,
                                *change,
                                now,
                            )
                            .map(|reverted| {
                                let mut risky = warnings::risky(&services, &next, &touched);
                                risky.extend(reverted);
                                file = next_file;
                                services = next;
                                status = next_status;
                                risky
                            })
                        }
                    };
                    match applied {
                        Ok(risky) => {
                            // A reload's and a cluster revision's warnings are logged by
                            // whoever asked (the reload paths, cluster::apply), with the rest.
                            let log = !matches!(touched, warnings::Touched::All);
                            replies.push((reply, risky, log));
                            if let Some(service) = heartbeat {
                                self.histograms
                                    .heartbeats
                                    .with_label_values(&[service.as_str()])
                                    .inc();
                            }
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Command::Hops(updates) => hop_updates.extend(updates),
                // Taken out before the pass (`hop_epochs`).
                Command::HopEpoch => {}
                Command::Discovered(report) => {
                    let name = report.service.clone();
                    if self.discovered(report, &mut services, &mut status, now) {
                        read.push(name);
                    }
                }
                Command::View(view) => self.view = Some(view),
                Command::Externals(set) => self.externals = Some(set),
                Command::Health(u) => record_health(&mut status, u, now),
                Command::Agent { backend, state } => {
                    reported |= state.percent().is_some();
                    status.entry(backend).or_default().agent = Some(state);
                }
                Command::Adapt { service, to, reason } => {
                    let Some(s) = services
                        .iter()
                        .find(|s| s.name == service && s.strategy == Strategy::Adaptive)
                    else {
                        continue;
                    };
                    let st = self
                        .adaptive
                        .entry(s.name.clone())
                        .or_insert_with(|| AdaptiveState::new(now));
                    if st.current != to {
                        info!(
                            "service {service}: adaptive: {} -> {} ({reason})",
                            st.current.name(),
                            to.name()
                        );
                        self.histograms
                            .switches
                            .with_label_values(&[service.as_str(), st.current.name(), to.name()])
                            .inc();
                        *st = AdaptiveState {
                            current: to,
                            reason,
                            since: now,
                            switches: st.switches + 1,
                        };
                    }
                }
            }
        }
        // Adaptive services start calm, on Maglev; the others have no pick.
        self.adaptive.retain(|n, _| {
            services
                .iter()
                .any(|s| &s.name == n && s.strategy == Strategy::Adaptive)
        });
        for s in services.iter().filter(|s| s.strategy == Strategy::Adaptive) {
            self.adaptive
                .entry(s.name.clone())
                .or_insert_with(|| AdaptiveState::new(now));
        }
        if let Some(set) = &self.externals {
            inputs::cluster_scores(&services, &mut status, set);
        }
        self.resource_update(&services, &mut status, reported, now).await;
        for (b, st) in status.iter_mut() {
            if let Some(e) = st.external
                && e.expires.is_some_and(|t| t <= now)
            {
                info!("backend {b}: external score {} expired", e.score);
                st.external = None;
            }
            if st.up_at.is_some() && st.next_ramp_step(now).is_none() {
                st.up_at = None;
            }
        }
        self.expire_leases(&mut services, &mut status, now);
        self.sources_due(&mut services, &mut status, now);
        let changed = services != self.services;
        // Only a change's answer carries warnings: a pass for health or next hops alone skips
        // their sysctl reads, netlink queries and socket binds.
        let answering = !replies.is_empty();
        let file_before = std::mem::replace(&mut self.file, file);
        let mut result = self
            .commit(services, status.clone(), hop_updates.clone(), answering)
            .await;
        if result.is_err() {
            self.file = file_before;
        }
        if result.is_err() && changed {
            // The changes were refused; health and next hops still apply.
            if let Err(e) = self
                .commit(self.services.clone(), status.clone(), hop_updates.clone(), false)
                .await
            {
                warn!("reconcile: {e}; health and next hops are tried again in {RETRY:?}");
                self.unapplied = Some(Unapplied::retry(status, hop_updates));
            }
        } else if result.is_err() {
            self.unapplied = Some(Unapplied::retry(status, hop_updates));
        }
        if result.is_err() {
            self.sources_unread(&read);
        }
        if let Err(e) = &mut result {
            *e = Error::invalid(e.to_string());
        }
        for (reply, risky, log) in replies {
            let _ = reply.send(match &result {
                Ok(w) => {
                    // Said in the log too: the change is in effect, whoever asked for it.
                    for r in risky.iter().filter(|_| log) {
                        warn!("{r}");
                    }
                    Ok(w.iter().cloned().chain(risky).collect())
                }
                Err(e) => Err(Error::invalid(e.to_string())),
            });
        }
        if let (Err(e), false) = (&result, changed) {
            warn!("reconcile: {e}; health and next hops are tried again in {RETRY:?}");
        }
        true
    }

    /// Makes `services` with `status` the applied state: resolves new backends, plans, applies,
    /// persists and publishes. On error the applied state stays as it was.
    async fn commit(
        &mut self,
        services: Vec<Service>,
        mut status: BTreeMap<BackendRef, BackendStatus>,
        hop_updates: HashMap<IpAddr, Option<NextHop>>,
        with_warnings: bool,
    ) -> Result<Vec<String>> {
        let mut warnings = Vec::new();
        let wanted = backend_addresses(&services);
        let mut next_hops = hops::merge(
            &self.hops,
            hop_updates,
            &backend_addresses(&self.services),
            &wanted,
        );
        let (found, unresolved) = hops::resolve_missing(&self.resolver, &wanted, &next_hops).await?;
        next_hops.extend(found);
        warnings.extend(unresolved);
        let live: std::collections::BTreeSet<BackendRef> = services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| BackendRef::new(&s.name, &b.id)))
            .collect();
        status.retain(|b, _| live.contains(b));

        let now = Instant::now();
        let mut weights: BTreeMap<String, ServiceWeights> = services
            .iter()
            .map(|s| {
                let w = effective_weights(
                    s,
                    in_effect(&self.adaptive, s),
                    &status,
                    |a| next_hops.contains_key(&a),
                    now,
                );
                (s.name.clone(), w)
            })
            .collect();
        // Only a node of a cluster votes; a standalone one keeps no copy of its weights.
        let own = if self.cfg.cluster.is_some() {
            votes(&weights)
        } else {
            Default::default()
        };
        if let Some(view) = &self.view {
            for s in &services {
                if let Some(w) = weights.get_mut(&s.name) {
                    let reachable = |id: &str| {
                        s.backends
                            .iter()
                            .any(|b| b.id == id && next_hops.contains_key(&b.address))
                    };
                    agree(w, &s.name, view, reachable);
                }
            }
        }
        let maps = self.maps.clone();
        let (plan_services, plan_weights, plan_hops) = (services.clone(), weights.clone(), next_hops.clone());
        let (old_services, old_weights, old_hops) =
            (self.services.clone(), self.last_weights(), self.hops.clone());
        let started = Instant::now();
        let geo = self.cfg.geo.clone();
        let applied = tokio::task::spawn_blocking(move || {
            let mut guard = maps.lock().unwrap_or_else(|p| p.into_inner());
            let Maps { dp, slots } = &mut *guard;
            let desired = Desired {
                services: &plan_services,
                weights: &plan_weights,
                hops: &plan_hops,
                geo: geo.as_ref(),
            };
            let result =
                plan::plan(&desired, &slots.assignments).and_then(|p| slots.apply(dp, &plan_services, p));
            if let Err(e) = &result {
                // Put the maps back as they were.
                let old = Desired {
                    services: &old_services,
                    weights: &old_weights,
                    hops: &old_hops,
                    geo: geo.as_ref(),
                };
                if let Err(undo) =
                    plan::plan(&old, &slots.assignments).and_then(|p| slots.apply(dp, &old_services, p))
                {
                    error!("rollback after \"{e}\" failed: {undo}");
                }
            }
            result.map(|a| {
                (
                    a,
                    slots.assignments.clone(),
                    slots.regions.capacity(),
                    slots.regions.free_slots(),
                )
            })
        })
        .await
        .map_err(|e| Error::dataplane(format!("reconcile task: {e}")))?;
        let (applied, assignments, capacity, free) = applied?;
        self.counters.passes += 1;
        self.counters.tables_built += applied.built as u64;
        self.counters.tables_swapped += applied.swapped as u64;
        self.histograms
            .map_write
            .with_label_values(&[] as &[&str])
            .observe(started.elapsed().as_secs_f64());
        if applied.built > 0 {
            self.histograms
                .rebuild
                .with_label_values(&[] as &[&str])
                .observe(applied.build_time.as_secs_f64());
            log::debug!(
                "pass: {} tables built in {:?}, {} swapped, {:?} in all",
                applied.built,
                applied.build_time,
                applied.swapped,
                started.elapsed()
            );
        }
        for (name, w) in &weights {
            let was = self.panicking.contains(name);
            if w.panic && !was {
                warn!(
                    "service {name}: panic: no backend is up (or fewer than its panic_threshold); spreading per on_panic"
                );
                self.panicking.insert(name.clone());
            } else if !w.panic && was {
                info!("service {name}: out of panic");
                self.panicking.remove(name);
            }
        }
        self.panicking.retain(|n| weights.contains_key(n));

        if with_warnings {
            warnings.extend(warnings::forwarding(&self.cfg.interfaces, &services));
            warnings.extend(
                warnings::encap_mtu(&self.resolver, &self.cfg.interfaces, &services, &next_hops).await,
            );
            warnings.extend(warnings::nat(&self.cfg, &services));
        }
        let declared_changed = services != self.services;
        self.services = services;
        sources::follow(&mut self.sources, &self.services);
        self.hops = next_hops;
        self.status = status;
        // The change is in the maps already: a failed save is said, not a refused change (the
        // next pass writes the file again).
        if let Err(e) = (Persisted {
            services: self.services.iter().map(ServiceSpec::from).collect(),
            file: FileLayer::of(&self.file, &self.services),
            assignments: assignments.clone(),
            leases: self
                .status
                .iter()
                .filter_map(|(b, st)| st.lease.map(|l| SavedLease::new(b, l.terms)))
                .collect(),
            drains: {
                let (now, wall) = (Instant::now(), std::time::SystemTime::now());
                self.status
                    .iter()
                    .filter_map(|(b, st)| st.held.map(|at| SavedDrain::new(b, at, now, wall)))
                    .collect()
            },
        })
        .save(&self.state_path)
        {
            warn!("state file not saved (a restart would start from the one before): {e}");
            warnings.push(format!(
                "the change took effect but the state file was not saved: {e}"
            ));
        }
        let (attachments, adopted, upgrade) = {
            let guard = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            let upgrade = guard.dp.upgrade.as_ref().map(|u| u.summary());
            (guard.dp.attachments.clone(), guard.dp.adopted, upgrade)
        };
        let instances = next_instances(
            &self.snapshot.borrow().instances,
            self.services.iter().map(|s| {
                let views = instance_views(s, &self.status, weights.get(&s.name));
                (s.name.clone(), views)
            }),
            self.counters.passes,
        );
        let services = Arc::new(self.services.clone());
        if declared_changed || self.declared.borrow().is_empty() {
            self.declared.send_replace(services.clone());
        }
        self.snapshot.send_replace(Arc::new(Snapshot {
            services,
            file: self.file.clone(),
            assignments,
            hops: self.hops.clone(),
            status: self.status.clone(),
            weights,
            votes: own,
            pool_capacity: capacity,
            pool_free: free,
            attachments,
            adopted,
            upgrade,
            counters: self.counters,
            adaptive: self.adaptive.clone(),
            geo: self.geo.clone(),
            instances,
            discovery: self.sources.clone(),
        }));
        Ok(warnings)
    }

    fn last_weights(&self) -> BTreeMap<String, ServiceWeights> {
        self.snapshot.borrow().weights.clone()
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
