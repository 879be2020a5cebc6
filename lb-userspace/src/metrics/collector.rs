//! The data plane's collector: reads the per-CPU counters through the readers' own map handles
//! and the writer's last snapshot on each scrape, so a scrape never waits behind a table build.

use std::sync::Mutex;

use lb_common::Counter;
use prometheus::{core::Desc, proto::MetricFamily};

use super::{
    Sources,
    families::FAMILIES,
    layout::{Build, Family, Fill, Layout, Sink},
};
use crate::{
    model::BackendRef,
    snapshot::Snapshot,
    status::{BreakerState, HealthState},
};

/// The counters a scrape reads, each map in one syscall.
struct Traffic {
    services: Vec<lb_common::TrafficStats>,
    backends: Vec<lb_common::TrafficStats>,
    counters: Vec<u64>,
}

pub(super) struct DataPlaneCollector {
    sources: Sources,
    pub(super) descs: Vec<Desc>,
    /// Taken by `collect` and given back by `render` after encoding, so the samples are built
    /// and encoded without a copy.
    layout: Mutex<Option<Layout>>,
}

impl DataPlaneCollector {
    pub(super) fn new(sources: Sources) -> prometheus::Result<Self> {
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
    pub(super) fn families(&self) -> Vec<MetricFamily> {
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
    pub(super) fn restore(&self, gathered: Vec<MetricFamily>) {
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
            bgp_session_up,
            vip_announced,
            node_draining,
            cluster_connected,
            cluster_revision,
            cluster_invalid,
            embryonic_entries,
            embryonic_oldest,
            embryonic_expired,
            discovery_backends,
            backend_drained,
            interface_tx_errors,
        ]: [usize; 48] = std::array::from_fn(|i| i);
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
                    | u8::from(resource) << 2
                    | u8::from(svc.discovery.is_some()) << 3,
            ]);
            if svc.discovery.is_some() {
                let live = crate::status::discovery::live(svc, &snap.status);
                f.add(discovery_backends, &[name], live as f64);
            }
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
                let assigned = snap.assignments.slot(&svc.name, &b.id);
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
                f.add(
                    backend_up,
                    &labels,
                    f64::from(u8::from(st.health == HealthState::Up)),
                );
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
                let drain = st.drain();
                f.shape(id.as_bytes());
                f.shape(&[
                    0,
                    u8::from(stats.is_some())
                        | u8::from(check.is_some()) << 1
                        | u8::from(check.is_some_and(|c| c.breaker.is_some())) << 2
                        | u8::from(agent_view.is_some()) << 3,
                    // The reason is a label: a new one is a new series.
                    drain.map_or(0, |d| d as u8 + 1),
                ]);
                if let Some(d) = drain {
                    f.add(backend_drained, &[name, id, d.name()], 1.0);
                }
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
        f.add(
            pool_slots,
            &["second_chance"],
            snap.assignments.second_chance_slots() as f64,
        );
        for a in &snap.attachments {
            f.shape(a.interface.as_bytes());
            f.shape(&[0]);
            f.shape(a.mode.as_bytes());
            f.shape(&[0]);
            f.add(xdp_attached, &[&a.interface, a.mode], 1.0);
            // Read now: the driver's counters, whatever mode or program is attached.
            let tx_errors = crate::link::xdp_tx_errors(&a.interface).ok().flatten();
            f.shape(&[u8::from(tx_errors.is_some())]);
            if let Some(n) = tx_errors {
                f.add(interface_tx_errors, &[&a.interface], n as f64);
            }
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
        f.add(embryonic_entries, &[], census.embryonic as f64);
        f.add(embryonic_oldest, &[], f64::from(census.embryonic_oldest_s));
        f.add(embryonic_expired, &[], census.embryonic_expired_total as f64);
        f.add(build_info, &[env!("CARGO_PKG_VERSION")], 1.0);
        let bgp = s.bgp.lock().unwrap_or_else(|p| p.into_inner());
        f.add(node_draining, &[], f64::from(u8::from(bgp.draining)));
        for session in &bgp.sessions {
            let peer = session.peer.to_string();
            f.shape(peer.as_bytes());
            f.shape(&[0]);
            f.add(bgp_session_up, &[&peer], f64::from(u8::from(session.up)));
        }
        for (service, a) in &bgp.services {
            f.shape(service.as_bytes());
            f.shape(&[0]);
            f.add(vip_announced, &[service], f64::from(u8::from(a.announced)));
        }
        drop(bgp);
        let cluster = s.cluster.lock().unwrap_or_else(|p| p.into_inner());
        if cluster.enabled {
            f.shape(b"cluster");
            f.add(cluster_connected, &[], f64::from(u8::from(cluster.connected)));
            f.add(cluster_revision, &[], cluster.applied_revision as f64);
            f.add(cluster_invalid, &[], cluster.invalid_entries as f64);
        }
    }
}
