//! The one writer of the control plane. A single task owns the desired services, every
//! backend's status and the maps; API changes, health updates and next-hop changes reach it
//! over one channel. What queues up while a pass runs is taken together in the next pass, so a
//! burst of flaps costs one pass; the pass rebuilds only the tables whose inputs changed, and
//! does its map work (table builds included) on a blocking thread, off the async workers.
//! Readers work from the snapshot it publishes after each pass, and their own map handles.

pub mod adapt;
pub mod apply;
pub mod hops;
pub mod plan;
pub mod warnings;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use log::{error, info, warn};
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    config::{DaemonConfig, ServiceSpec, validate_against, validate_services, validate_weight},
    dataplane::{Attachment, DataPlane},
    error::{Error, Result},
    health::{State, agent::AgentState, breaker::BreakerState},
    model::{Backend, BackendRef, Service, Strategy, backend_addresses},
    neigh::{NextHop, Resolver},
    state::Persisted,
    status::{BackendStatus, External, ServiceWeights, effective_weights},
    strategy::{
        adaptive::AdaptiveState,
        resource::{DEFAULT_REPORT_TTL, LoadReport, MAX_REPORT_TTL},
    },
};
pub use apply::Reconciler;
use plan::{Assignments, Desired};

/// A change to the desired state, from the API.
#[derive(Debug)]
pub enum Change {
    /// Replace every service (reload).
    Replace(Vec<Service>),
    AddService(Service),
    RemoveService(String),
    AddBackend {
        service: String,
        backend: Backend,
    },
    RemoveBackend {
        service: String,
        id: String,
    },
    SetWeight {
        service: String,
        id: String,
        weight: u32,
    },
    /// A service's strategy (new flows only).
    SetStrategy {
        service: String,
        strategy: crate::model::Strategy,
    },
    /// The external score of one backend (0..1), optionally for `ttl` only.
    SetExternal {
        service: String,
        id: String,
        score: f64,
        ttl: Option<Duration>,
    },
    /// Read `[daemon.geo] data` again and load it whole, or refuse it and keep what runs.
    ReloadGeo,
    /// A backend's own load report, holding for `ttl` (default 30 s).
    ReportLoad {
        service: String,
        id: String,
        report: LoadReport,
        ttl: Option<Duration>,
    },
}

/// A backend's health as the monitor last published it.
#[derive(Clone, Debug)]
pub struct HealthUpdate {
    pub backend: BackendRef,
    pub state: State,
    pub score: f64,
    pub slow_start: Duration,
    pub breaker: BreakerState,
    /// The weight share while half-open.
    pub half_open_share: f64,
}

pub enum Command {
    Change {
        change: Box<Change>,
        /// The warnings of the pass that applied it, or why it was refused.
        reply: oneshot::Sender<Result<Vec<String>>>,
    },
    /// Next hops looked up again: `None` = no longer resolves.
    Hops(Vec<(IpAddr, Option<NextHop>)>),
    Health(HealthUpdate),
    /// What a backend's agent now says.
    Agent {
        backend: BackendRef,
        state: AgentState,
    },
    /// An adaptive service's switch (`strategy::adaptive`).
    Adapt {
        service: String,
        to: crate::model::Strategy,
        reason: String,
    },
}

/// What readers see: the state as of the last pass.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Arc<Vec<Service>>,
    pub assignments: Assignments,
    pub hops: HashMap<IpAddr, NextHop>,
    pub status: BTreeMap<BackendRef, BackendStatus>,
    pub weights: BTreeMap<String, ServiceWeights>,
    pub pool_capacity: u32,
    pub pool_free: u64,
    pub attachments: Vec<Attachment>,
    pub adopted: bool,
    pub counters: PassCounters,
    /// Each adaptive service's pick, and why.
    pub adaptive: BTreeMap<String, AdaptiveState>,
    /// The geo data in use.
    pub geo: Option<GeoStatus>,
}

/// The geo data set in the data plane: counts only (no client is ever named).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GeoStatus {
    pub source: String,
    pub prefixes: usize,
    pub prefixes_per_region: BTreeMap<String, usize>,
    /// Seconds since the Unix epoch.
    pub loaded_at: u64,
}

impl Snapshot {
    /// The strategy a service runs now: the declared one, or an adaptive service's pick.
    pub fn in_effect(&self, s: &Service) -> Strategy {
        in_effect(&self.adaptive, s)
    }
}

fn in_effect(adaptive: &BTreeMap<String, AdaptiveState>, s: &Service) -> Strategy {
    match s.strategy {
        Strategy::Adaptive => adaptive.get(&s.name).map_or(Strategy::Maglev, |a| a.current),
        other => other,
    }
}

/// Totals since the daemon started.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PassCounters {
    pub passes: u64,
    pub commands: u64,
    pub tables_built: u64,
    pub tables_swapped: u64,
    /// Resource-aware updates that changed some backend's weight factor.
    pub resource_steps: u64,
}

struct Engine {
    dp: DataPlane,
    rec: Reconciler,
}

pub struct Writer {
    cfg: DaemonConfig,
    engine: Arc<Mutex<Engine>>,
    resolver: Arc<Resolver>,
    services: Vec<Service>,
    hops: HashMap<IpAddr, NextHop>,
    status: BTreeMap<BackendRef, BackendStatus>,
    panicking: std::collections::BTreeSet<String>,
    counters: PassCounters,
    snapshot: watch::Sender<Arc<Snapshot>>,
    /// The services alone, for the health monitor: it wakes only when they change.
    declared: watch::Sender<Arc<Vec<Service>>>,
    state_path: PathBuf,
    histograms: crate::metrics::histograms::Histograms,
    adaptive: BTreeMap<String, AdaptiveState>,
    geo: Option<GeoStatus>,
    /// The next resource-aware update, while some service has load to follow.
    resource_due: Option<Instant>,
    /// Health and next hops a failed pass could not apply (the monitor and the refresher say
    /// a thing once): the next pass starts from them, and one is due after `RETRY`.
    unapplied: Option<Unapplied>,
}

/// What a failed pass could not apply: statuses, next-hop updates, and when to try again.
type Unapplied = (
    BTreeMap<BackendRef, BackendStatus>,
    HashMap<IpAddr, Option<NextHop>>,
    Instant,
);

/// How soon a failed pass's health and next hops are tried again.
const RETRY: Duration = Duration::from_secs(1);

/// The channels to and from a started writer.
pub struct Handles {
    pub commands: mpsc::Sender<Command>,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub services: watch::Receiver<Arc<Vec<Service>>>,
}

impl Writer {
    /// Applies the first state (restored or from the config) and returns the writer, ready to
    /// run, with its warnings.
    pub async fn start(
        cfg: DaemonConfig,
        dp: DataPlane,
        rec: Reconciler,
        resolver: Arc<Resolver>,
        services: Vec<Service>,
        histograms: crate::metrics::histograms::Histograms,
    ) -> Result<(Self, Handles, mpsc::Receiver<Command>, Vec<String>)> {
        let (snapshot, snapshot_rx) = watch::channel(Arc::new(Snapshot::default()));
        let (declared, declared_rx) = watch::channel(Arc::new(Vec::new()));
        let (tx, rx) = mpsc::channel(4096);
        let mut writer = Self {
            state_path: cfg.state_path(),
            cfg,
            engine: Arc::new(Mutex::new(Engine { dp, rec })),
            resolver,
            services: Vec::new(),
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
        };
        if writer.cfg.geo.as_ref().is_some_and(|g| g.data.is_some()) {
            match writer.load_geo().await {
                Ok(n) => info!("geo: {n} prefixes loaded"),
                Err(e) => {
                    warn!("geo: {e}; every client goes to the default region until `lb geo reload` succeeds")
                }
            }
        }
        let warnings = writer
            .commit(services, writer.status.clone(), HashMap::new(), true)
            .await?;
        let handles = Handles {
            commands: tx,
            snapshot: snapshot_rx,
            services: declared_rx,
        };
        Ok((writer, handles, rx, warnings))
    }

    /// Runs until every sender is gone.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
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
            self.pass(batch).await;
        }
    }

    /// Reads, parses and loads the geo data file; on any error nothing changes.
    async fn load_geo(&mut self) -> Result<usize> {
        let Some(geo) = self.cfg.geo.clone() else {
            return Err(Error::invalid("no [daemon.geo] in the config"));
        };
        let Some(path) = geo.data.clone() else {
            return Err(Error::invalid("[daemon.geo] names no data file"));
        };
        let source = path.display().to_string();
        let engine = self.engine.clone();
        let (n, per_region) =
            tokio::task::spawn_blocking(move || -> Result<(usize, BTreeMap<String, usize>)> {
                let prefixes = crate::strategy::geo::load(&path, &geo)
                    .map_err(|e| Error::invalid(format!("geo data {e}")))?;
                let regions = geo.regions();
                let mut per_region: BTreeMap<String, usize> = BTreeMap::new();
                for p in &prefixes {
                    *per_region
                        .entry(regions[p.region as usize].to_string())
                        .or_default() += 1;
                }
                let mut guard = engine.lock().unwrap_or_else(|p| p.into_inner());
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

    /// The next TTL expiry, slow-start step or resource-aware update, if any.
    fn next_timer(&self) -> Option<Instant> {
        let now = Instant::now();
        self.status
            .values()
            .flat_map(|s| [s.external.and_then(|e| e.expires), s.next_ramp_step(now)])
            .flatten()
            .chain(self.resource_due)
            .chain(self.unapplied.as_ref().map(|u| u.2))
            .min()
    }

    /// One resource-aware update of every service running it, if due: smooth each backend's
    /// load, move targets past the hysteresis, and step the factors by at most `max_move` of
    /// the table.
    async fn resource_update(
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
        let mut jobs = Vec::new();
        let mut next: Option<Duration> = None;
        for s in services
            .iter()
            .filter(|s| in_effect(&self.adaptive, s) == Strategy::ResourceAware)
        {
            let r = s.resource.unwrap_or_default().resolve();
            let mut members = Vec::new();
            for b in &s.backends {
                let st = status.entry(BackendRef::new(&s.name, &b.id)).or_default();
                if st.load.report.is_some_and(|(_, exp)| exp <= now) {
                    info!("backend {}/{}: load report expired", s.name, b.id);
                    st.load.report = None;
                }
                let agent = st.agent.as_ref().and_then(AgentState::percent);
                let maxconn = crate::status::maxconn(b, st.agent.as_ref());
                let x = crate::strategy::resource::sample(st.load.report.as_ref(), agent, maxconn, now);
                st.load.observe(x, &r);
                members.push((b.id.clone(), b.weight, st.load.factor, st.load.target));
            }
            let busy = s.backends.iter().any(|b| {
                status
                    .get(&BackendRef::new(&s.name, &b.id))
                    .is_some_and(|st| !st.load.settled())
            });
            if busy {
                next = Some(next.map_or(r.interval, |n| n.min(r.interval)));
            }
            if members.iter().any(|m| m.2 != m.3) {
                jobs.push((s.name.clone(), s.table_size, r.max_move, members));
            }
        }
        self.resource_due = next.map(|d| now + d);
        if jobs.is_empty() {
            return;
        }
        let steps = tokio::task::spawn_blocking(move || {
            jobs.into_iter()
                .map(|(name, size, max_move, members)| {
                    let view: Vec<_> = members
                        .iter()
                        .map(|(id, w, f, t)| crate::strategy::resource::Member {
                            id,
                            weight: *w,
                            factor: *f,
                            target: *t,
                        })
                        .collect();
                    let (factors, moved) = crate::strategy::resource::bounded_step(&view, size, max_move);
                    (name, members, factors, moved)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (name, members, factors, moved) in steps {
            for ((id, ..), f) in members.iter().zip(factors) {
                if let Some(st) = status.get_mut(&BackendRef::new(&name, id)) {
                    st.load.factor = f;
                }
            }
            self.counters.resource_steps += 1;
            log::debug!(
                "service {name}: resource-aware step moves {:.1}% of the table",
                moved * 100.0
            );
        }
    }

    async fn pass(&mut self, batch: Vec<Command>) {
        self.counters.commands += batch.len() as u64;
        let mut services = self.services.clone();
        let (mut status, mut hop_updates) = match self.unapplied.take() {
            Some((status, hops, _)) => (status, hops),
            None => (self.status.clone(), HashMap::new()),
        };
        let mut replies = Vec::new();
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
                    let mut next = services.clone();
                    let mut next_status = status.clone();
                    match change_state(&self.cfg, &mut next, &mut next_status, *change, now) {
                        Ok(()) => {
                            services = next;
                            status = next_status;
                            replies.push(reply);
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Command::Hops(updates) => hop_updates.extend(updates),
                Command::Health(u) => {
                    let st = status.entry(u.backend.clone()).or_default();
                    if st.health == State::Down && u.state == State::Up {
                        st.up_at = Some(now);
                    }
                    st.health = u.state;
                    st.score = u.score;
                    st.slow_start = u.slow_start;
                    st.breaker = u.breaker;
                    st.half_open_share = u.half_open_share;
                }
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
        let changed = services != self.services;
        // Only a change's answer carries warnings: a pass for health or next hops alone skips
        // their sysctl reads, netlink queries and socket binds.
        let answering = !replies.is_empty();
        let mut result = self
            .commit(services, status.clone(), hop_updates.clone(), answering)
            .await;
        if result.is_err() && changed {
            // The changes were refused; health and next hops still apply.
            if let Err(e) = self
                .commit(self.services.clone(), status.clone(), hop_updates.clone(), false)
                .await
            {
                warn!("reconcile: {e}; health and next hops are tried again in {RETRY:?}");
                self.unapplied = Some((status, hop_updates, Instant::now() + RETRY));
            }
        } else if result.is_err() {
            self.unapplied = Some((status, hop_updates, Instant::now() + RETRY));
        }
        if let Err(e) = &mut result {
            *e = Error::invalid(e.to_string());
        }
        for reply in replies {
            let _ = reply.send(match &result {
                Ok(w) => Ok(w.clone()),
                Err(e) => Err(Error::invalid(e.to_string())),
            });
        }
        if let (Err(e), false) = (&result, changed) {
            warn!("reconcile: {e}; health and next hops are tried again in {RETRY:?}");
        }
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
        let mut next_hops = self.hops.clone();
        for (addr, hop) in hop_updates {
            match hop {
                Some(h) => {
                    next_hops.insert(addr, h);
                }
                None => {
                    next_hops.remove(&addr);
                }
            }
        }
        // A backend's needs can change with its services' modes: resolve again then.
        let current = backend_addresses(&self.services);
        next_hops.retain(|a, _| {
            wanted.contains_key(a) && current.get(a).is_none_or(|l2| wanted.get(a) == Some(l2))
        });
        let (found, unresolved) = hops::resolve_missing(&self.resolver, &wanted, &next_hops).await?;
        next_hops.extend(found);
        warnings.extend(unresolved);
        let live: std::collections::BTreeSet<BackendRef> = services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| BackendRef::new(&s.name, &b.id)))
            .collect();
        status.retain(|b, _| live.contains(b));

        let now = Instant::now();
        let weights: BTreeMap<String, ServiceWeights> = services
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
        let engine = self.engine.clone();
        let (plan_services, plan_weights, plan_hops) = (services.clone(), weights.clone(), next_hops.clone());
        let (old_services, old_weights, old_hops) =
            (self.services.clone(), self.last_weights(), self.hops.clone());
        let started = Instant::now();
        let geo = self.cfg.geo.clone();
        let applied = tokio::task::spawn_blocking(move || {
            let mut guard = engine.lock().unwrap_or_else(|p| p.into_inner());
            let Engine { dp, rec } = &mut *guard;
            let desired = Desired {
                services: &plan_services,
                weights: &plan_weights,
                hops: &plan_hops,
                geo: geo.as_ref(),
            };
            let result =
                plan::plan(&desired, &rec.assignments).and_then(|p| rec.apply(dp, &plan_services, p));
            if let Err(e) = &result {
                // Put the maps back as they were.
                let old = Desired {
                    services: &old_services,
                    weights: &old_weights,
                    hops: &old_hops,
                    geo: geo.as_ref(),
                };
                if let Err(undo) =
                    plan::plan(&old, &rec.assignments).and_then(|p| rec.apply(dp, &old_services, p))
                {
                    error!("rollback after \"{e}\" failed: {undo}");
                }
            }
            result.map(|a| {
                (
                    a,
                    rec.assignments.clone(),
                    rec.regions.capacity(),
                    rec.regions.free_slots(),
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
        self.hops = next_hops;
        self.status = status;
        // The change is in the maps already: a failed save is said, not a refused change (the
        // next pass writes the file again).
        if let Err(e) = (Persisted {
            services: self.services.iter().map(ServiceSpec::from).collect(),
            assignments: assignments.clone(),
        })
        .save(&self.state_path)
        {
            warn!("state file not saved (a restart would start from the one before): {e}");
            warnings.push(format!(
                "the change took effect but the state file was not saved: {e}"
            ));
        }
        let (attachments, adopted) = {
            let guard = self.engine.lock().unwrap_or_else(|p| p.into_inner());
            (guard.dp.attachments.clone(), guard.dp.adopted)
        };
        let services = Arc::new(self.services.clone());
        if declared_changed || self.declared.borrow().is_empty() {
            self.declared.send_replace(services.clone());
        }
        self.snapshot.send_replace(Arc::new(Snapshot {
            services,
            assignments,
            hops: self.hops.clone(),
            status: self.status.clone(),
            weights,
            pool_capacity: capacity,
            pool_free: free,
            attachments,
            adopted,
            counters: self.counters,
            adaptive: self.adaptive.clone(),
            geo: self.geo.clone(),
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

/// Applies one change to copies of the services and statuses, validating the result whole.
pub(crate) fn change_state(
    cfg: &DaemonConfig,
    services: &mut Vec<Service>,
    status: &mut BTreeMap<BackendRef, BackendStatus>,
    change: Change,
    now: Instant,
) -> Result<()> {
    match change {
        Change::Replace(next) => *services = next,
        Change::AddService(s) => {
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
        Change::AddBackend { service, backend } => {
            let svc = find_service(services, &service)?;
            if svc.backend(&backend.id).is_some() {
                return Err(Error::Exists(format!(
                    "service {service} already has a backend {}",
                    backend.id
                )));
            }
            svc.backends.push(backend);
        }
        Change::RemoveBackend { service, id } => {
            let svc = find_service(services, &service)?;
            let before = svc.backends.len();
            svc.backends.retain(|b| b.id != id);
            if svc.backends.len() == before {
                return Err(unknown_backend(&service, &id));
            }
        }
        Change::SetWeight { service, id, weight } => {
            validate_weight(weight)?;
            let svc = find_service(services, &service)?;
            let b = svc
                .backends
                .iter_mut()
                .find(|b| b.id == id)
                .ok_or_else(|| unknown_backend(&service, &id))?;
            b.weight = weight;
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
