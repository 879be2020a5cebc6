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
];
/// `families` names each family by its index in FAMILIES.
const _: () = assert!(FAMILIES.len() == 28);

/// One family being filled: samples are appended in order, with no per-sample lookup.
struct Family {
    mf: MetricFamily,
    kind: MetricType,
    labels: &'static [&'static str],
}

impl Family {
    fn new(
        &(name, help, kind, labels): &(&'static str, &'static str, MetricType, &'static [&'static str]),
    ) -> Self {
        let mut mf = MetricFamily::default();
        mf.set_name(name.to_string());
        mf.set_help(help.to_string());
        mf.set_field_type(kind);
        Self { mf, kind, labels }
    }

    fn add(&mut self, values: &[&str], v: f64) {
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
        if self.kind == MetricType::COUNTER {
            let mut c = proto::Counter::default();
            c.set_value(v);
            m.set_counter(c);
        } else {
            let mut g = proto::Gauge::default();
            g.set_value(v);
            m.set_gauge(g);
        }
        self.mf.mut_metric().push(m);
    }
}

struct DataPlaneCollector {
    sources: Sources,
    descs: Vec<Desc>,
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
        Ok(Self { sources, descs })
    }

    fn families(&self) -> Vec<MetricFamily> {
        let s = &self.sources;
        let snap = s.snapshot.borrow().clone();
        let mut f: Vec<Family> = FAMILIES.iter().map(Family::new).collect();
        // Indices into `f`, in FAMILIES order.
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
        ]: [usize; 28] = std::array::from_fn(|i| i);
        let board = s.board.read().unwrap_or_else(|p| p.into_inner());
        let default = crate::status::BackendStatus::default();
        // In label order, so the registry's sort of each family finds it sorted already.
        let mut services: Vec<&crate::model::Service> = snap.services.iter().collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        for svc in services {
            let Some(slot) = snap.assignments.services.get(&svc.name) else {
                continue;
            };
            let name = svc.name.as_str();
            let mut backends: Vec<&crate::model::Backend> = svc.backends.iter().collect();
            backends.sort_by(|a, b| a.id.cmp(&b.id));
            if let Ok(t) = s.readers.service_traffic(slot.id) {
                f[service_packets].add(&[name], t.packets as f64);
                f[service_bytes].add(&[name], t.bytes as f64);
                f[service_new_flows].add(&[name], t.new_flows as f64);
            }
            f[table_generation].add(&[name], slot.generation as f64);
            let weights = snap.weights.get(&svc.name);
            f[service_panic].add(&[name], f64::from(u8::from(weights.is_some_and(|w| w.panic))));
            for b in backends {
                let id = b.id.as_str();
                let labels = [name, id];
                if let Some(bs) = snap
                    .assignments
                    .backends
                    .get(&crate::reconcile::plan::backend_key(&svc.name, &b.id))
                    && let Ok(t) = s.readers.backend_traffic(bs.slot)
                {
                    f[backend_packets].add(&labels, t.packets as f64);
                    f[backend_bytes].add(&labels, t.bytes as f64);
                    f[backend_new_flows].add(&labels, t.new_flows as f64);
                    f[backend_syn_retransmits].add(&labels, t.syn_retransmits as f64);
                }
                let key = BackendRef::new(&svc.name, &b.id);
                let st = snap.status.get(&key).unwrap_or(&default);
                f[backend_up].add(&labels, f64::from(u8::from(st.health == State::Up)));
                let external = st.external.map_or(1.0, |e| e.score);
                f[backend_score].add(&labels, st.score * external);
                let effective = weights
                    .and_then(|w| w.backends.get(&b.id))
                    .map_or(0, |e| e.weight);
                f[backend_effective_weight].add(&labels, f64::from(effective));
                if let Some(c) = board.checks.get(&key) {
                    f[passive_failures].add(&labels, c.passive_failures as f64);
                    f[checks].add(&[name, id, "passed"], (c.checks - c.failed) as f64);
                    f[checks].add(&[name, id, "failed"], c.failed as f64);
                    if c.breaker.is_some() {
                        let state = match st.breaker {
                            BreakerState::Closed => "closed",
                            BreakerState::Open => "open",
                            BreakerState::HalfOpen => "half-open",
                        };
                        f[backend_breaker].add(&[name, id, state], 1.0);
                    }
                }
                if let Some(a) = board.agents.get(&key) {
                    let ok = a.asked - a.malformed - a.unreachable;
                    for (outcome, n) in [
                        ("ok", ok),
                        ("malformed", a.malformed),
                        ("unreachable", a.unreachable),
                    ] {
                        f[agent].add(&[name, id, outcome], n as f64);
                    }
                }
            }
        }
        drop(board);
        for &c in Counter::ALL {
            if let Ok(v) = s.readers.counter(c) {
                f[dataplane].add(&[c.name()], v as f64);
            }
        }
        f[reconcile_passes].add(&[], snap.counters.passes as f64);
        f[tables_built].add(&[], snap.counters.tables_built as f64);
        f[pool_slots].add(&["capacity"], f64::from(snap.pool_capacity));
        f[pool_slots].add(&["free"], snap.pool_free as f64);
        for a in &snap.attachments {
            f[xdp_attached].add(&[&a.interface, a.mode], 1.0);
        }
        let nat = *s.nat.lock().unwrap_or_else(|p| p.into_inner());
        f[nat_entries].add(&[], nat.census.entries as f64);
        f[nat_ports].add(&[], nat.census.snat_ports_in_use as f64);
        f[nat_expired].add(&[], nat.expired as f64);
        f[nat_capacity].add(&[], s.nat_capacity as f64);
        f[conntrack_capacity].add(&[], s.conntrack_capacity as f64);
        let census = *s.conntrack.lock().unwrap_or_else(|p| p.into_inner());
        f[conntrack_entries].add(&[], census.entries as f64);
        f[build_info].add(&[env!("CARGO_PKG_VERSION")], 1.0);
        // A family with no sample is left out, as the client library does.
        f.into_iter()
            .map(|f| f.mf)
            .filter(|mf| !mf.get_metric().is_empty())
            .collect()
    }
}

impl Collector for DataPlaneCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.families()
    }
}

/// The registry the endpoint serves.
pub fn registry(sources: Sources, histograms: &Histograms) -> prometheus::Result<Registry> {
    let registry = Registry::new();
    registry.register(Box::new(DataPlaneCollector::new(sources)?))?;
    registry.register(Box::new(histograms.check.clone()))?;
    registry.register(Box::new(histograms.rebuild.clone()))?;
    registry.register(Box::new(histograms.map_write.clone()))?;
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    Ok(registry)
}

/// The text exposition of everything registered.
pub fn render(registry: &Registry) -> Vec<u8> {
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut out) {
        log::warn!("metrics: {e}");
    }
    out
}

/// Serves `GET /metrics` on `listener` until `stop` is set. With a token, a scrape must send
/// `Authorization: Bearer <token>` (compared in constant time).
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Registry,
    token: Option<String>,
    mut stop: watch::Receiver<bool>,
) {
    use axum::{
        extract::State,
        http::{HeaderMap, StatusCode, header},
        response::IntoResponse,
        routing::get,
    };
    #[derive(Clone)]
    struct Endpoint {
        registry: Registry,
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
        // Summing per-CPU maps is one syscall per counter: off the async workers.
        let registry = e.registry.clone();
        match tokio::task::spawn_blocking(move || render(&registry)).await {
            Ok(body) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response(),
            Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "scrape failed\n").into_response(),
        }
    }
    let app = axum::Router::new()
        .route("/metrics", get(scrape))
        .with_state(Endpoint {
            registry,
            token: token.map(Arc::new),
        });
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        log::warn!("metrics endpoint: {e}");
    }
}
