//! Prometheus metrics. The data plane's per-CPU counters are summed when Prometheus scrapes,
//! by a collector that reads the readers' own map handles and the writer's last snapshot, so a
//! scrape never waits behind a table build. The histograms (check latency, table builds, map
//! writes) are observed where the work happens.

use std::sync::{Arc, Mutex};

use lb_common::Counter;
use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
    core::{Collector, Desc},
    proto::MetricFamily,
};
use tokio::sync::watch;

use crate::{
    dataplane::Readers,
    health::{State, breaker::BreakerState, monitor::Board},
    model::BackendRef,
    nat::NatStatus,
    reconcile::Snapshot,
};

/// The histograms observed outside the collector; cheap to clone.
#[derive(Clone)]
pub struct Histograms {
    /// `lb_health_check_duration_seconds{service,kind}`.
    pub check: HistogramVec,
    /// `lb_table_rebuild_duration_seconds`: the table builds of one reconciler pass.
    pub rebuild: HistogramVec,
    /// `lb_map_write_duration_seconds`: one pass's map work, builds included.
    pub map_write: HistogramVec,
}

impl Histograms {
    pub fn new() -> Self {
        let buckets = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ];
        let h = |name: &str, help: &str, labels: &[&str]| {
            HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.clone()), labels)
                .expect("valid histogram")
        };
        Self {
            check: h(
                "lb_health_check_duration_seconds",
                "Duration of active health checks.",
                &["service", "kind"],
            ),
            rebuild: h(
                "lb_table_rebuild_duration_seconds",
                "Time spent building Maglev tables in one reconciler pass that built any.",
                &[],
            ),
            map_write: h(
                "lb_map_write_duration_seconds",
                "Duration of one reconciler pass's map work (table builds included).",
                &[],
            ),
        }
    }
}

impl Default for Histograms {
    fn default() -> Self {
        Self::new()
    }
}

/// What the collector reads.
pub struct Sources {
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub readers: Arc<Readers>,
    pub board: Board,
    pub nat: Arc<Mutex<NatStatus>>,
    pub nat_capacity: u64,
    pub conntrack_capacity: u64,
}

/// Every family the collector fills, made once so their descriptors stay fixed.
struct Families {
    service_packets: IntCounterVec,
    service_bytes: IntCounterVec,
    service_new_flows: IntCounterVec,
    backend_packets: IntCounterVec,
    backend_bytes: IntCounterVec,
    backend_new_flows: IntCounterVec,
    dataplane: IntCounterVec,
    backend_up: IntGaugeVec,
    backend_score: GaugeVec,
    backend_weight: IntGaugeVec,
    backend_effective_weight: IntGaugeVec,
    backend_breaker: IntGaugeVec,
    checks: IntCounterVec,
    agent: IntCounterVec,
    service_panic: IntGaugeVec,
    table_generation: IntGaugeVec,
    reconcile_passes: IntCounterVec,
    tables_built: IntCounterVec,
    pool_slots: IntGaugeVec,
    xdp_attached: IntGaugeVec,
    nat_entries: IntGauge,
    nat_capacity: IntGauge,
    nat_ports: IntGauge,
    nat_expired: IntCounterVec,
    conntrack_capacity: IntGauge,
    build_info: Gauge,
}

struct DataPlaneCollector {
    sources: Sources,
    f: Families,
    /// One scrape at a time: the families are reset and refilled per scrape.
    lock: Mutex<()>,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter")
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge")
}

impl Families {
    fn new() -> Self {
        let sb = ["service", "backend"];
        Self {
            service_packets: counter(
                "lb_service_packets_total",
                "Packets forwarded for a service.",
                &["service"],
            ),
            service_bytes: counter(
                "lb_service_bytes_total",
                "Bytes forwarded for a service.",
                &["service"],
            ),
            service_new_flows: counter(
                "lb_service_new_flows_total",
                "New flows of a service.",
                &["service"],
            ),
            backend_packets: counter("lb_backend_packets_total", "Packets forwarded to a backend.", &sb),
            backend_bytes: counter("lb_backend_bytes_total", "Bytes forwarded to a backend.", &sb),
            backend_new_flows: counter("lb_backend_new_flows_total", "New flows sent to a backend.", &sb),
            dataplane: counter(
                "lb_dataplane_packets_total",
                "Packets by what the data plane did with them: forwarded, passed or dropped, and why.",
                &["reason"],
            ),
            backend_up: gauge("lb_backend_up", "1 when a backend's health checks say up.", &sb),
            backend_score: GaugeVec::new(
                Opts::new(
                    "lb_backend_health_score",
                    "A backend's health score (0..1), external score included.",
                ),
                &sb,
            )
            .expect("valid gauge"),
            backend_weight: gauge("lb_backend_weight", "A backend's configured weight.", &sb),
            backend_effective_weight: gauge(
                "lb_backend_effective_weight",
                "A backend's weight in its service's table (0: no new flows).",
                &sb,
            ),
            backend_breaker: gauge(
                "lb_backend_breaker_state",
                "1 for a backend's circuit breaker state.",
                &["service", "backend", "state"],
            ),
            checks: counter(
                "lb_health_checks_total",
                "Active health checks by outcome.",
                &["service", "backend", "outcome"],
            ),
            agent: counter(
                "lb_health_agent_replies_total",
                "Agent-check answers by outcome.",
                &["service", "backend", "outcome"],
            ),
            service_panic: gauge(
                "lb_service_panic",
                "1 while a service is in panic mode.",
                &["service"],
            ),
            table_generation: gauge(
                "lb_service_table_generation",
                "Maglev tables a service has had (swaps since it was created).",
                &["service"],
            ),
            reconcile_passes: counter("lb_reconcile_passes_total", "Reconciler passes.", &[]),
            tables_built: counter(
                "lb_tables_built_total",
                "Maglev tables built by the reconciler.",
                &[],
            ),
            pool_slots: gauge("lb_table_pool_slots", "Maglev table pool slots.", &["state"]),
            xdp_attached: gauge(
                "lb_xdp_attached",
                "1 for each interface the balancer is attached to, by XDP mode.",
                &["interface", "mode"],
            ),
            nat_entries: IntGauge::new(
                "lb_nat_entries",
                "NAT table entries (two per connection), as of the last sweep.",
            )
            .expect("valid gauge"),
            nat_capacity: IntGauge::new("lb_nat_capacity_entries", "NAT table capacity.")
                .expect("valid gauge"),
            nat_ports: IntGauge::new(
                "lb_nat_snat_ports_in_use",
                "SNAT source ports in use, as of the last sweep.",
            )
            .expect("valid gauge"),
            nat_expired: counter(
                "lb_nat_expired_total",
                "NAT connections expired by the collector.",
                &[],
            ),
            conntrack_capacity: IntGauge::new("lb_conntrack_capacity_entries", "Connection table capacity.")
                .expect("valid gauge"),
            build_info: Gauge::with_opts(
                Opts::new("lb_build_info", "The daemon's version.")
                    .const_label("version", env!("CARGO_PKG_VERSION")),
            )
            .expect("valid gauge"),
        }
    }

    fn collectors(&self) -> Vec<&dyn Collector> {
        vec![
            &self.service_packets,
            &self.service_bytes,
            &self.service_new_flows,
            &self.backend_packets,
            &self.backend_bytes,
            &self.backend_new_flows,
            &self.dataplane,
            &self.backend_up,
            &self.backend_score,
            &self.backend_weight,
            &self.backend_effective_weight,
            &self.backend_breaker,
            &self.checks,
            &self.agent,
            &self.service_panic,
            &self.table_generation,
            &self.reconcile_passes,
            &self.tables_built,
            &self.pool_slots,
            &self.xdp_attached,
            &self.nat_entries,
            &self.nat_capacity,
            &self.nat_ports,
            &self.nat_expired,
            &self.conntrack_capacity,
            &self.build_info,
        ]
    }
}

impl DataPlaneCollector {
    fn fill(&self) {
        let f = &self.f;
        let s = &self.sources;
        let snap = s.snapshot.borrow().clone();
        for v in [
            &f.service_packets,
            &f.service_bytes,
            &f.service_new_flows,
            &f.backend_packets,
            &f.backend_bytes,
            &f.backend_new_flows,
            &f.dataplane,
            &f.checks,
            &f.agent,
            &f.reconcile_passes,
            &f.tables_built,
            &f.nat_expired,
        ] {
            v.reset();
        }
        for v in [
            &f.backend_up,
            &f.backend_weight,
            &f.backend_effective_weight,
            &f.backend_breaker,
            &f.service_panic,
            &f.table_generation,
            &f.pool_slots,
            &f.xdp_attached,
        ] {
            v.reset();
        }
        f.backend_score.reset();
        let board = s.board.read().unwrap_or_else(|p| p.into_inner());
        for svc in snap.services.iter() {
            let Some(slot) = snap.assignments.services.get(&svc.name) else {
                continue;
            };
            let name = svc.name.as_str();
            if let Ok(t) = s.readers.service_traffic(slot.id) {
                f.service_packets.with_label_values(&[name]).inc_by(t.packets);
                f.service_bytes.with_label_values(&[name]).inc_by(t.bytes);
                f.service_new_flows.with_label_values(&[name]).inc_by(t.new_flows);
            }
            f.table_generation
                .with_label_values(&[name])
                .set(slot.generation as i64);
            let weights = snap.weights.get(&svc.name);
            f.service_panic
                .with_label_values(&[name])
                .set(i64::from(weights.is_some_and(|w| w.panic)));
            for b in &svc.backends {
                let labels = [name, b.id.as_str()];
                if let Some(bs) = snap
                    .assignments
                    .backends
                    .get(&crate::reconcile::plan::backend_key(&svc.name, &b.id))
                    && let Ok(t) = s.readers.backend_traffic(bs.slot)
                {
                    f.backend_packets.with_label_values(&labels).inc_by(t.packets);
                    f.backend_bytes.with_label_values(&labels).inc_by(t.bytes);
                    f.backend_new_flows.with_label_values(&labels).inc_by(t.new_flows);
                }
                let key = BackendRef::new(&svc.name, &b.id);
                let st = snap.status.get(&key).cloned().unwrap_or_default();
                f.backend_up
                    .with_label_values(&labels)
                    .set(i64::from(st.health == State::Up));
                let external = st.external.map_or(1.0, |e| e.score);
                f.backend_score
                    .with_label_values(&labels)
                    .set(st.score * external);
                f.backend_weight
                    .with_label_values(&labels)
                    .set(i64::from(b.weight));
                let effective = weights
                    .and_then(|w| w.backends.get(&b.id))
                    .map_or(0, |e| e.weight);
                f.backend_effective_weight
                    .with_label_values(&labels)
                    .set(i64::from(effective));
                for (state, label) in [
                    (BreakerState::Closed, "closed"),
                    (BreakerState::Open, "open"),
                    (BreakerState::HalfOpen, "half-open"),
                ] {
                    f.backend_breaker
                        .with_label_values(&[name, b.id.as_str(), label])
                        .set(i64::from(st.breaker == state));
                }
                if let Some(c) = board.checks.get(&key) {
                    f.checks
                        .with_label_values(&[name, b.id.as_str(), "passed"])
                        .inc_by(c.checks - c.failed);
                    f.checks
                        .with_label_values(&[name, b.id.as_str(), "failed"])
                        .inc_by(c.failed);
                }
                if let Some(a) = board.agents.get(&key) {
                    let ok = a.asked - a.malformed - a.unreachable;
                    for (outcome, n) in [
                        ("ok", ok),
                        ("malformed", a.malformed),
                        ("unreachable", a.unreachable),
                    ] {
                        f.agent
                            .with_label_values(&[name, b.id.as_str(), outcome])
                            .inc_by(n);
                    }
                }
            }
        }
        drop(board);
        for &c in Counter::ALL {
            if let Ok(v) = s.readers.counter(c) {
                f.dataplane.with_label_values(&[c.name()]).inc_by(v);
            }
        }
        f.reconcile_passes
            .with_label_values(&[] as &[&str])
            .inc_by(snap.counters.passes);
        f.tables_built
            .with_label_values(&[] as &[&str])
            .inc_by(snap.counters.tables_built);
        f.pool_slots
            .with_label_values(&["capacity"])
            .set(i64::from(snap.pool_capacity));
        f.pool_slots
            .with_label_values(&["free"])
            .set(snap.pool_free as i64);
        for a in &snap.attachments {
            f.xdp_attached.with_label_values(&[&a.interface, a.mode]).set(1);
        }
        let nat = *s.nat.lock().unwrap_or_else(|p| p.into_inner());
        f.nat_entries.set(nat.census.entries as i64);
        f.nat_ports.set(nat.census.snat_ports_in_use as i64);
        f.nat_expired
            .with_label_values(&[] as &[&str])
            .inc_by(nat.expired);
        f.nat_capacity.set(s.nat_capacity as i64);
        f.conntrack_capacity.set(s.conntrack_capacity as i64);
        f.build_info.set(1.0);
    }
}

impl Collector for DataPlaneCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.f.collectors().into_iter().flat_map(|c| c.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _one = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.fill();
        self.f
            .collectors()
            .into_iter()
            .flat_map(|c| c.collect())
            .collect()
    }
}

/// The registry the endpoint serves.
pub fn registry(sources: Sources, histograms: &Histograms) -> prometheus::Result<Registry> {
    let registry = Registry::new();
    registry.register(Box::new(DataPlaneCollector {
        sources,
        f: Families::new(),
        lock: Mutex::new(()),
    }))?;
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
