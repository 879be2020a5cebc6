//! Prometheus metrics. The data plane's per-CPU counters are summed when Prometheus scrapes,
//! by a collector that reads the readers' own map handles and the writer's last snapshot, so a
//! scrape never waits behind a table build. The histograms (check latency, table builds, map
//! writes) are observed where the work happens.

use std::sync::{Arc, Mutex};

use lb_common::Counter;
use prometheus::{
    Encoder, Registry, TextEncoder,
    core::{Collector, Desc},
    proto::{self, LabelPair, Metric, MetricFamily, MetricType},
};
use tokio::sync::watch;

pub use histograms::Histograms;

pub mod histograms;

use crate::{
    dataplane::Readers,
    health::{State, breaker::BreakerState, monitor::Board},
    model::BackendRef,
    nat::NatStatus,
    reconcile::Snapshot,
};

/// What the collector reads.
pub struct Sources {
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub readers: Arc<Readers>,
    pub board: Board,
    pub nat: Arc<Mutex<NatStatus>>,
    pub nat_capacity: u64,
    pub conntrack_capacity: u64,
    pub conntrack: Arc<Mutex<crate::dataplane::census::ConntrackCensus>>,
}

/// The families the collector builds on each scrape: name, help, type, label names.
const FAMILIES: &[(&str, &str, MetricType, &[&str])] = &[
    (
        "lb_service_packets_total",
        "Packets forwarded for a service.",
        MetricType::COUNTER,
        &["service"],
    ),
    (
        "lb_service_bytes_total",
        "Bytes forwarded for a service.",
        MetricType::COUNTER,
        &["service"],
    ),
    (
        "lb_service_new_flows_total",
        "New flows of a service.",
        MetricType::COUNTER,
        &["service"],
    ),
    (
        "lb_backend_packets_total",
        "Packets forwarded to a backend.",
        MetricType::COUNTER,
        &["service", "backend"],
    ),
    (
        "lb_backend_bytes_total",
        "Bytes forwarded to a backend.",
        MetricType::COUNTER,
        &["service", "backend"],
    ),
    (
        "lb_backend_new_flows_total",
        "New flows sent to a backend.",
        MetricType::COUNTER,
        &["service", "backend"],
    ),
    (
        "lb_dataplane_packets_total",
        "Packets by what the data plane did with them: forwarded, passed or dropped, and why.",
        MetricType::COUNTER,
        &["reason"],
    ),
    (
        "lb_backend_up",
        "1 when a backend's health checks say up.",
        MetricType::GAUGE,
        &["service", "backend"],
    ),
    (
        "lb_backend_health_score",
        "A backend's health score (0..1), external score included.",
        MetricType::GAUGE,
        &["service", "backend"],
    ),
    (
        "lb_backend_effective_weight",
        "A backend's weight in its service's table (0: no new flows).",
        MetricType::GAUGE,
        &["service", "backend"],
    ),
    (
        "lb_backend_breaker_state",
        "A backend's circuit breaker state (the series of the current state, at 1), for backends with a breaker.",
        MetricType::GAUGE,
        &["service", "backend", "state"],
    ),
    (
        "lb_health_checks_total",
        "Active health checks by outcome.",
        MetricType::COUNTER,
        &["service", "backend", "outcome"],
    ),
    (
        "lb_health_agent_replies_total",
        "Agent-check answers by outcome.",
        MetricType::COUNTER,
        &["service", "backend", "outcome"],
    ),
    (
        "lb_service_panic",
        "1 while a service is in panic mode.",
        MetricType::GAUGE,
        &["service"],
    ),
    (
        "lb_service_table_generation",
        "Maglev tables a service has had (swaps since it was created).",
        MetricType::GAUGE,
        &["service"],
    ),
    (
        "lb_reconcile_passes_total",
        "Reconciler passes.",
        MetricType::COUNTER,
        &[],
    ),
    (
        "lb_tables_built_total",
        "Maglev tables built by the reconciler.",
        MetricType::COUNTER,
        &[],
    ),
    (
        "lb_table_pool_slots",
        "Maglev table pool slots.",
        MetricType::GAUGE,
        &["state"],
    ),
    (
        "lb_xdp_attached",
        "1 for each interface the balancer is attached to, by XDP mode.",
        MetricType::GAUGE,
        &["interface", "mode"],
    ),
    (
        "lb_nat_entries",
        "NAT table entries (two per connection), as of the last sweep.",
        MetricType::GAUGE,
        &[],
    ),
    (
        "lb_nat_capacity_entries",
        "NAT table capacity.",
        MetricType::GAUGE,
        &[],
    ),
    (
        "lb_nat_snat_ports_in_use",
        "SNAT source ports in use, as of the last sweep.",
        MetricType::GAUGE,
        &[],
    ),
    (
        "lb_nat_expired_total",
        "NAT connections expired by the collector.",
        MetricType::COUNTER,
        &[],
    ),
    (
        "lb_conntrack_capacity_entries",
        "Connection table capacity.",
        MetricType::GAUGE,
        &[],
    ),
    (
        "lb_conntrack_entries",
        "Connection table entries, as of the last census (every 10 s or more).",
        MetricType::GAUGE,
        &[],
    ),
    (
        "lb_build_info",
        "The daemon's version.",
        MetricType::GAUGE,
        &["version"],
    ),
    (
        "lb_backend_syn_retransmits_total",
        "Client SYN retransmits for flows just pinned to a backend (passive health's signal).",
        MetricType::COUNTER,
        &["service", "backend"],
    ),
    (
        "lb_health_passive_failures_total",
        "Failures passive health recorded for a backend.",
        MetricType::COUNTER,
        &["service", "backend"],
    ),
    (
        "lb_backend_active_flows",
        "Active flows the data plane counts for a backend (services on least-connections or power-of-two).",
        MetricType::GAUGE,
        &["service", "backend"],
    ),
    (
        "lb_active_flow_corrections_total",
        "Backend active-flow counts the connection-table census corrected (flows that left without FIN or RST).",
        MetricType::COUNTER,
        &[],
    ),
    (
        "lb_conntrack_census_duration_seconds",
        "How long the last connection-table census (entry count, active-flow correction) took.",
        MetricType::GAUGE,
        &[],
    ),
    (
        "lb_service_strategy",
        "The strategy a service runs now, at 1 (an adaptive service has a series per strategy it can pick).",
        MetricType::GAUGE,
        &["service", "strategy"],
    ),
    (
        "lb_backend_load",
        "A backend's smoothed load (0..1, from its reports and agent), for services running resource-aware.",
        MetricType::GAUGE,
        &["service", "backend"],
    ),
    (
        "lb_backend_refused_total",
        "NAT services: connections a backend refused (a RST as its first answer to the SYN); passive health counts them.",
        MetricType::COUNTER,
        &["service", "backend"],
    ),
    (
        "lb_backend_load_factor",
        "The factor resource-aware weighting applies to a backend's weight now.",
        MetricType::GAUGE,
        &["service", "backend"],
    ),
    (
        "lb_nat_half_open",
        "NAT TCP connections whose handshake the client has not completed, as of the last sweep.",
        MetricType::GAUGE,
        &[],
    ),
];
/// `families` names each family by its index in FAMILIES.
const _: () = assert!(FAMILIES.len() == 36);

/// One family: samples in the order the walk adds them.
struct Family {
    mf: MetricFamily,
    kind: MetricType,
    labels: &'static [&'static str],
    /// The walk's n-th sample is `mf`'s metric `order[n]` (the registry sorts by label values).
    order: Vec<u32>,
    /// `mf` is out with the registry (see `restore`).
    lent: bool,
}

impl Family {
    fn new(
        &(name, help, kind, labels): &(&'static str, &'static str, MetricType, &'static [&'static str]),
    ) -> Self {
        let mut mf = MetricFamily::default();
        mf.set_name(name.to_string());
        mf.set_help(help.to_string());
        mf.set_field_type(kind);
        Self {
            mf,
            kind,
            labels,
            order: Vec::new(),
            lent: false,
        }
    }

    /// Sorts the samples as the registry's `gather` does (by label values, stably), so its sort
    /// leaves them where they are, and records where each of the walk's samples went.
    fn sort(&mut self) {
        let metrics = self.mf.mut_metric();
        let mut idx: Vec<u32> = (0..metrics.len() as u32).collect();
        let values = |m: &Metric| {
            m.get_label()
                .iter()
                .map(|l| l.value().to_string())
                .collect::<Vec<_>>()
        };
        let keys: Vec<Vec<String>> = metrics.iter().map(values).collect();
        idx.sort_by(|&a, &b| keys[a as usize].cmp(&keys[b as usize]));
        let mut taken: Vec<Option<Metric>> = std::mem::take(metrics).into_iter().map(Some).collect();
        self.order = vec![0; idx.len()];
        for (pos, &i) in idx.iter().enumerate() {
            self.order[i as usize] = pos as u32;
            if let Some(m) = taken[i as usize].take() {
                metrics.push(m);
            }
        }
    }

    fn push(&mut self, values: &[&str], v: f64) {
        let labels = self
            .labels
            .iter()
            .zip(values)
            .map(|(n, v)| {
                let mut l = LabelPair::default();
                l.set_name(n.to_string());
                l.set_value(v.to_string());
                l
            })
            .collect();
        let mut m = Metric::from_label(labels);
        set_value(&mut m, self.kind, v);
        self.mf.mut_metric().push(m);
    }
}

fn set_value(m: &mut Metric, kind: MetricType, v: f64) {
    if kind == MetricType::COUNTER {
        let mut c = proto::Counter::default();
        c.set_value(v);
        m.set_counter(c);
    } else {
        let mut g = proto::Gauge::default();
        g.set_value(v);
        m.set_gauge(g);
    }
}

/// Where the walk puts samples: a new layout (labels built) or the cached one (values only).
trait Sink {
    fn add(&mut self, family: usize, labels: &[&str], v: f64);
    /// What the labels that follow depend on (a name, which optional series exist): the
    /// layout's shape. A cached layout fits only a walk with the same shape.
    fn shape(&mut self, part: &[u8]);
}

/// Builds every sample, labels included: when the shape changes.
struct Build {
    families: Vec<Family>,
    shape: Vec<u8>,
}

impl Sink for Build {
    fn add(&mut self, family: usize, labels: &[&str], v: f64) {
        self.families[family].push(labels, v);
    }
    fn shape(&mut self, part: &[u8]) {
        self.shape.extend_from_slice(part);
    }
}

/// Writes values into a cached layout, in the walk's order; `fits` turns false when the walk
/// does not match the layout (the cache is then rebuilt).
struct Fill<'a> {
    families: &'a mut [Family],
    expected: &'a [u8],
    cursor: [usize; FAMILIES.len()],
    shape: usize,
    fits: bool,
}

impl Sink for Fill<'_> {
    fn add(&mut self, family: usize, _labels: &[&str], v: f64) {
        let f = &mut self.families[family];
        let i = self.cursor[family];
        let at = f.order.get(i).map_or(usize::MAX, |&p| p as usize);
        match f.mf.mut_metric().get_mut(at) {
            Some(m) => set_value(m, f.kind, v),
            None => self.fits = false,
        }
        self.cursor[family] = i + 1;
    }
    fn shape(&mut self, part: &[u8]) {
        let end = self.shape + part.len();
        if self.expected.get(self.shape..end) != Some(part) {
            self.fits = false;
        }
        self.shape = end;
    }
}

impl<'a> Fill<'a> {
    fn new(families: &'a mut [Family], expected: &'a [u8]) -> Self {
        Self {
            families,
            expected,
            cursor: [0; FAMILIES.len()],
            shape: 0,
            fits: true,
        }
    }

    fn complete(&self) -> bool {
        self.fits
            && self.shape == self.expected.len()
            && self
                .cursor
                .iter()
                .zip(self.families.iter())
                .all(|(&n, f)| n == f.mf.get_metric().len())
    }
}

/// The samples of the last scrape, labels and all: while the services, backends and optional
/// series stay the same, a scrape only rewrites their values, so its cost is reading the maps
/// and encoding the text.
struct Layout {
    families: Vec<Family>,
    shape: Vec<u8>,
}

/// The counters a scrape reads, each map in one syscall.
struct Traffic {
    services: Vec<lb_common::TrafficStats>,
    backends: Vec<lb_common::TrafficStats>,
    counters: Vec<u64>,
}

struct DataPlaneCollector {
    sources: Sources,
    descs: Vec<Desc>,
    /// Taken by `collect` and given back by `render` after encoding, so the samples are built
    /// and encoded without a copy.
    layout: Mutex<Option<Layout>>,
}

impl DataPlaneCollector {
    fn new(sources: Sources) -> prometheus::Result<Self> {
        let descs = FAMILIES
            .iter()
            .map(|(name, help, _, labels)| {
                Desc::new(
                    name.to_string(),
                    help.to_string(),
                    labels.iter().map(|l| l.to_string()).collect(),
                    Default::default(),
                )
            })
            .collect::<prometheus::Result<_>>()?;
        Ok(Self {
            sources,
            descs,
            layout: Mutex::new(None),
        })
    }

    fn traffic(&self, snap: &Snapshot) -> Traffic {
        let r = &self.sources.readers;
        let services = snap
            .assignments
            .services
            .values()
            .map(|s| s.id + 1)
            .max()
            .unwrap_or(0);
        let backends = snap
            .assignments
            .backends
            .values()
            .map(|b| b.slot + 1)
            .max()
            .unwrap_or(0);
        fn read<T>(what: &str, v: crate::error::Result<Vec<T>>) -> Vec<T> {
            v.unwrap_or_else(|e| {
                log::warn!("metrics: {what}: {e}");
                Vec::new()
            })
        }
        Traffic {
            services: read("service traffic", r.services_traffic(services)),
            backends: read("backend traffic", r.backends_traffic(backends)),
            counters: read("counters", r.counters()),
        }
    }

    /// This scrape's families: the cached layout with fresh values, or a new layout.
    fn families(&self) -> Vec<MetricFamily> {
        let snap = self.sources.snapshot.borrow().clone();
        let traffic = self.traffic(&snap);
        let mut cached = self.layout.lock().unwrap_or_else(|p| p.into_inner());
        let layout = match cached.take() {
            Some(mut layout) if !layout.families.is_empty() => {
                let mut fill = Fill::new(&mut layout.families, &layout.shape);
                self.walk(&snap, &traffic, &mut fill);
                let fits = fill.complete();
                fits.then_some(layout)
            }
            _ => None,
        };
        let mut layout = layout.unwrap_or_else(|| {
            let mut build = Build {
                families: FAMILIES.iter().map(Family::new).collect(),
                shape: Vec::new(),
            };
            self.walk(&snap, &traffic, &mut build);
            for f in &mut build.families {
                f.sort();
            }
            Layout {
                families: build.families,
                shape: build.shape,
            }
        });
        // Lent to the registry, which gives them back after encoding (`restore`). A family
        // with no sample is left out, as the client library does.
        let mut out = Vec::new();
        for f in &mut layout.families {
            if !f.mf.get_metric().is_empty() {
                f.lent = true;
                out.push(std::mem::take(&mut f.mf));
            }
        }
        *cached = Some(layout);
        out
    }

    /// Gives the families `render` encoded back to the layout they were lent from; if one is
    /// missing or changed size, the layout is rebuilt on the next scrape.
    fn restore(&self, gathered: Vec<MetricFamily>) {
        let mut cached = self.layout.lock().unwrap_or_else(|p| p.into_inner());
        let Some(layout) = cached.as_mut() else { return };
        let mut by_name: std::collections::HashMap<String, MetricFamily> = gathered
            .into_iter()
            .map(|mf| (mf.name().to_string(), mf))
            .collect();
        let mut whole = true;
        for (f, def) in layout.families.iter_mut().zip(FAMILIES) {
            if !f.lent {
                continue;
            }
            f.lent = false;
            match by_name.remove(def.0) {
                Some(mf) if mf.get_metric().len() == f.order.len() => f.mf = mf,
                _ => whole = false,
            }
        }
        if !whole {
            *cached = None;
        }
    }

    /// Every sample, in label order (so the registry's sort finds each family sorted).
    fn walk(&self, snap: &Snapshot, traffic: &Traffic, f: &mut impl Sink) {
        let s = &self.sources;
        // Indices into FAMILIES.
        let [
            service_packets,
            service_bytes,
            service_new_flows,
            backend_packets,
            backend_bytes,
            backend_new_flows,
            dataplane,
            backend_up,
            backend_score,
            backend_effective_weight,
            backend_breaker,
            checks,
            agent,
            service_panic,
            table_generation,
            reconcile_passes,
            tables_built,
            pool_slots,
            xdp_attached,
            nat_entries,
            nat_capacity,
            nat_ports,
            nat_expired,
            conntrack_capacity,
            conntrack_entries,
            build_info,
            backend_syn_retransmits,
            passive_failures,
            backend_active,
            active_corrections,
            census_duration,
            service_strategy,
            backend_load,
            backend_refused,
            backend_load_factor,
            nat_half_open,
        ]: [usize; 36] = std::array::from_fn(|i| i);
        let board = s.board.read().unwrap_or_else(|p| p.into_inner());
        let default = crate::status::BackendStatus::default();
        let mut services: Vec<&crate::model::Service> = snap.services.iter().collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        for svc in services {
            let Some(slot) = snap.assignments.services.get(&svc.name) else {
                continue;
            };
            let name = svc.name.as_str();
            f.shape(name.as_bytes());
            let adaptive = svc.strategy == crate::model::Strategy::Adaptive;
            let counting = svc.strategy.counts() || adaptive;
            let in_effect = snap.in_effect(svc);
            let resource = in_effect == crate::model::Strategy::ResourceAware;
            f.shape(svc.strategy.name().as_bytes());
            f.shape(&[
                0,
                u8::from(traffic.services.get(slot.id as usize).is_some())
                    | u8::from(counting) << 1
                    | u8::from(resource) << 2,
            ]);
            if adaptive {
                for c in [
                    crate::model::Strategy::Maglev,
                    crate::model::Strategy::LeastConnections,
                    crate::model::Strategy::ResourceAware,
                ] {
                    f.add(
                        service_strategy,
                        &[name, c.name()],
                        f64::from(u8::from(c == in_effect)),
                    );
                }
            } else {
                f.add(service_strategy, &[name, svc.strategy.name()], 1.0);
            }
            let mut backends: Vec<&crate::model::Backend> = svc.backends.iter().collect();
            backends.sort_by(|a, b| a.id.cmp(&b.id));
            if let Some(t) = traffic.services.get(slot.id as usize) {
                f.add(service_packets, &[name], t.packets as f64);
                f.add(service_bytes, &[name], t.bytes as f64);
                f.add(service_new_flows, &[name], t.new_flows as f64);
            }
            f.add(table_generation, &[name], slot.generation as f64);
            let weights = snap.weights.get(&svc.name);
            f.add(
                service_panic,
                &[name],
                f64::from(u8::from(weights.is_some_and(|w| w.panic))),
            );
            for b in backends {
                let id = b.id.as_str();
                let labels = [name, id];
                let assigned = snap
                    .assignments
                    .backends
                    .get(&crate::reconcile::plan::backend_key(&svc.name, &b.id));
                let stats = assigned.and_then(|bs| traffic.backends.get(bs.slot as usize));
                if counting {
                    let n = assigned.map_or(0, |bs| s.readers.active.get(bs.slot).max(0));
                    f.add(backend_active, &labels, n as f64);
                }
                if let Some(t) = stats {
                    f.add(backend_packets, &labels, t.packets as f64);
                    f.add(backend_bytes, &labels, t.bytes as f64);
                    f.add(backend_new_flows, &labels, t.new_flows as f64);
                    f.add(backend_syn_retransmits, &labels, t.syn_retransmits as f64);
                    f.add(backend_refused, &labels, t.refused as f64);
                }
                let key = BackendRef::new(&svc.name, &b.id);
                let st = snap.status.get(&key).unwrap_or(&default);
                f.add(backend_up, &labels, f64::from(u8::from(st.health == State::Up)));
                let external = st.external.map_or(1.0, |e| e.score);
                f.add(backend_score, &labels, st.score * external);
                let effective = weights
                    .and_then(|w| w.backends.get(&b.id))
                    .map_or(0, |e| e.weight);
                f.add(backend_effective_weight, &labels, f64::from(effective));
                if resource {
                    f.add(backend_load, &labels, st.load.smoothed);
                    f.add(backend_load_factor, &labels, st.load.factor);
                }
                let check = board.checks.get(&key);
                let agent_view = board.agents.get(&key);
                f.shape(id.as_bytes());
                f.shape(&[
                    0,
                    u8::from(stats.is_some())
                        | u8::from(check.is_some()) << 1
                        | u8::from(check.is_some_and(|c| c.breaker.is_some())) << 2
                        | u8::from(agent_view.is_some()) << 3,
                ]);
                if let Some(c) = check {
                    f.add(passive_failures, &labels, c.passive_failures as f64);
                    f.add(checks, &[name, id, "failed"], c.failed as f64);
                    f.add(checks, &[name, id, "passed"], (c.checks - c.failed) as f64);
                    if c.breaker.is_some() {
                        // A state set: one series per state, the current one at 1.
                        for (label, state) in [
                            ("closed", BreakerState::Closed),
                            ("half-open", BreakerState::HalfOpen),
                            ("open", BreakerState::Open),
                        ] {
                            f.add(
                                backend_breaker,
                                &[name, id, label],
                                f64::from(u8::from(st.breaker == state)),
                            );
                        }
                    }
                }
                if let Some(a) = agent_view {
                    let ok = a.asked - a.malformed - a.unreachable;
                    for (outcome, n) in [
                        ("malformed", a.malformed),
                        ("ok", ok),
                        ("unreachable", a.unreachable),
                    ] {
                        f.add(agent, &[name, id, outcome], n as f64);
                    }
                }
            }
        }
        drop(board);
        let mut counters: Vec<Counter> = Counter::ALL.to_vec();
        counters.sort_by_key(|c| c.name());
        for c in counters {
            if let Some(&v) = traffic.counters.get(c as usize) {
                f.add(dataplane, &[c.name()], v as f64);
            }
        }
        f.add(reconcile_passes, &[], snap.counters.passes as f64);
        f.add(tables_built, &[], snap.counters.tables_built as f64);
        f.add(pool_slots, &["capacity"], f64::from(snap.pool_capacity));
        f.add(pool_slots, &["free"], snap.pool_free as f64);
        for a in &snap.attachments {
            f.shape(a.interface.as_bytes());
            f.shape(&[0]);
            f.shape(a.mode.as_bytes());
            f.shape(&[0]);
            f.add(xdp_attached, &[&a.interface, a.mode], 1.0);
        }
        let nat = *s.nat.lock().unwrap_or_else(|p| p.into_inner());
        f.add(nat_entries, &[], nat.census.entries as f64);
        f.add(nat_ports, &[], nat.census.snat_ports_in_use as f64);
        f.add(nat_half_open, &[], nat.census.half_open as f64);
        f.add(nat_expired, &[], nat.expired as f64);
        f.add(nat_capacity, &[], s.nat_capacity as f64);
        f.add(conntrack_capacity, &[], s.conntrack_capacity as f64);
        let census = *s.conntrack.lock().unwrap_or_else(|p| p.into_inner());
        f.add(conntrack_entries, &[], census.entries as f64);
        f.add(active_corrections, &[], census.active_corrections_total as f64);
        f.add(census_duration, &[], census.took.as_secs_f64());
        f.add(build_info, &[env!("CARGO_PKG_VERSION")], 1.0);
    }
}

/// The registry the endpoint serves.
pub fn registry(sources: Sources, histograms: &Histograms) -> prometheus::Result<Metrics> {
    let registry = Registry::new();
    let dataplane = Arc::new(DataPlaneCollector::new(sources)?);
    registry.register(Box::new(Lend(dataplane.clone())))?;
    registry.register(Box::new(histograms.check.clone()))?;
    registry.register(Box::new(histograms.rebuild.clone()))?;
    registry.register(Box::new(histograms.map_write.clone()))?;
    registry.register(Box::new(histograms.switches.clone()))?;
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    Ok(Metrics { registry, dataplane })
}

/// The registry, and the collector whose families come back to it after each scrape.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    dataplane: Arc<DataPlaneCollector>,
}

/// The collector as the registry holds it.
struct Lend(Arc<DataPlaneCollector>);

impl Collector for Lend {
    fn desc(&self) -> Vec<&Desc> {
        self.0.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.0.families()
    }
}

/// The text exposition of everything registered.
pub fn render(metrics: &Metrics) -> Vec<u8> {
    let mut out = Vec::new();
    let gathered = metrics.registry.gather();
    if let Err(e) = TextEncoder::new().encode(&gathered, &mut out) {
        log::warn!("metrics: {e}");
    }
    metrics.dataplane.restore(gathered);
    out
}

/// One render at a time: scrapes that arrive while one is under way wait for it and share
/// its body, so a crowd of scrapers costs one render, not one each.
#[derive(Clone)]
pub struct SharedRender {
    render: Arc<dyn Fn() -> Vec<u8> + Send + Sync>,
    /// Renders finished; read before waiting, so a waiter knows whether one finished since.
    done: Arc<std::sync::atomic::AtomicU64>,
    last: Arc<tokio::sync::Mutex<Arc<Vec<u8>>>>,
}

impl SharedRender {
    pub fn new(metrics: Metrics) -> Self {
        Self::with(move || render(&metrics))
    }

    /// Around any render function (the tests count its calls).
    pub fn with(render: impl Fn() -> Vec<u8> + Send + Sync + 'static) -> Self {
        Self {
            render: Arc::new(render),
            done: Arc::default(),
            last: Arc::default(),
        }
    }

    /// The body of a render that finished after this call began: the one under way when it
    /// came, shared, or its own.
    pub async fn body(&self) -> Option<Arc<Vec<u8>>> {
        use std::sync::atomic::Ordering;
        let seen = self.done.load(Ordering::Acquire);
        let mut last = self.last.lock().await;
        if self.done.load(Ordering::Acquire) != seen {
            // A render finished while this call waited for the lock: its body is no older
            // than the call.
            return Some(last.clone());
        }
        // Reading the maps and encoding take milliseconds: off the async workers.
        let render = self.render.clone();
        let body = Arc::new(tokio::task::spawn_blocking(move || render()).await.ok()?);
        *last = body.clone();
        self.done.fetch_add(1, Ordering::Release);
        Some(body)
    }
}

/// Serves `GET /metrics` on `listener` within `limits` until `stop` is set. With a token, a
/// scrape must send `Authorization: Bearer <token>` (compared in constant time).
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    token: Option<String>,
    limits: crate::config::HttpLimits,
    stop: watch::Receiver<bool>,
) {
    use axum::{
        extract::State,
        http::{HeaderMap, StatusCode, header},
        response::IntoResponse,
        routing::get,
    };
    #[derive(Clone)]
    struct Endpoint {
        render: SharedRender,
        token: Option<Arc<String>>,
    }
    async fn scrape(State(e): State<Endpoint>, headers: HeaderMap) -> axum::response::Response {
        if let Some(token) = &e.token {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or_default();
            if !bool::from(subtle::ConstantTimeEq::ct_eq(given.as_bytes(), token.as_bytes())) {
                return (StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n").into_response();
            }
        }
        match e.render.body().await {
            Some(body) => (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                body.as_ref().clone(),
            )
                .into_response(),
            None => (StatusCode::INTERNAL_SERVER_ERROR, "scrape failed\n").into_response(),
        }
    }
    let app = axum::Router::new()
        .route("/metrics", get(scrape))
        .with_state(Endpoint {
            render: SharedRender::new(metrics),
            token: token.map(Arc::new),
        });
    crate::serve::serve(
        "metrics",
        crate::serve::Listener::Tcp(listener),
        app,
        None,
        limits,
        stop,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_scrapes_share_one_render() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let renders = Arc::new(AtomicU64::new(0));
        let counted = renders.clone();
        let shared = SharedRender::with(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(200));
            b"lb_up 1\n".to_vec()
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let bodies = rt.block_on(async {
            let scrapes: Vec<_> = (0..32)
                .map(|_| {
                    let s = shared.clone();
                    tokio::spawn(async move { s.body().await })
                })
                .collect();
            let mut out = Vec::new();
            for s in scrapes {
                out.push(s.await.unwrap().expect("body"));
            }
            out
        });
        assert!(bodies.iter().all(|b| b.as_slice() == b"lb_up 1\n"));
        // 32 scrapes at once: the first renders, the rest wait for it and share it (one more
        // at most, for a scrape that came between a render's end and the next waiter).
        let n = renders.load(Ordering::SeqCst);
        assert!(n <= 2, "{n} renders for 32 concurrent scrapes");
    }

    /// What the registry holds in the test: the families lent to it.
    struct Given(Mutex<Vec<MetricFamily>>, Vec<Desc>);

    impl Collector for Given {
        fn desc(&self) -> Vec<&Desc> {
            self.1.iter().collect()
        }
        fn collect(&self) -> Vec<MetricFamily> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    fn value(m: &Metric) -> f64 {
        m.get_counter().get_value()
    }

    /// A cached layout is filled in the walk's order, which is not the exposition's: each value
    /// must still land on its own labels after the registry's sort, scrape after scrape.
    #[test]
    fn a_filled_layout_keeps_each_value_on_its_labels() {
        const PACKETS: usize = 3; // lb_backend_packets_total
        let walk = [("svc-b", "2"), ("svc-a", "10"), ("svc-a", "9"), ("svc-c", "1")];
        let mut build = Build {
            families: FAMILIES.iter().map(Family::new).collect(),
            shape: Vec::new(),
        };
        for (i, (s, b)) in walk.iter().enumerate() {
            build.add(PACKETS, &[s, b], i as f64);
            build.shape(b"x\0\x01");
        }
        for f in &mut build.families {
            f.sort();
        }
        let (mut families, shape) = (build.families, build.shape);
        for round in 1..=3u32 {
            let mut fill = Fill::new(&mut families, &shape);
            for (i, (s, b)) in walk.iter().enumerate() {
                fill.add(PACKETS, &[s, b], f64::from(round * 100) + i as f64);
                fill.shape(b"x\0\x01");
            }
            assert!(fill.complete(), "round {round}: the walk fits its own layout");
            let lent = std::mem::take(&mut families[PACKETS].mf);
            let registry = Registry::new();
            let desc = Desc::new(
                FAMILIES[PACKETS].0.into(),
                "h".into(),
                vec!["service".into(), "backend".into()],
                Default::default(),
            )
            .unwrap();
            registry
                .register(Box::new(Given(Mutex::new(vec![lent]), vec![desc])))
                .unwrap();
            let gathered = registry.gather();
            let metrics = gathered[0].get_metric();
            let seen: Vec<(String, String, f64)> = metrics
                .iter()
                .map(|m| {
                    (
                        m.get_label()[0].value().into(),
                        m.get_label()[1].value().into(),
                        value(m),
                    )
                })
                .collect();
            let mut want: Vec<(String, String, f64)> = walk
                .iter()
                .enumerate()
                .map(|(i, (s, b))| (s.to_string(), b.to_string(), f64::from(round * 100) + i as f64))
                .collect();
            want.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
            assert_eq!(seen, want, "round {round}");
            families[PACKETS].mf = gathered.into_iter().next().unwrap();
        }
        // A walk that differs from the layout (a backend gained a check) does not fit.
        let mut fill = Fill::new(&mut families, &shape);
        for (i, (s, b)) in walk.iter().enumerate() {
            fill.add(PACKETS, &[s, b], 0.0);
            fill.shape(if i == 2 { b"x\0\x03" } else { b"x\0\x01" });
        }
        assert!(!fill.complete());
        // Nor does one with a sample more.
        let mut fill = Fill::new(&mut families, &shape);
        for (s, b) in walk.iter().chain(&[("svc-d", "1")]) {
            fill.add(PACKETS, &[s, b], 0.0);
        }
        assert!(!fill.complete());
    }
}
