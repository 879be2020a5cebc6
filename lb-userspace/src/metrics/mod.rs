//! Prometheus metrics. The data plane's per-CPU counters are summed when Prometheus scrapes,
//! by a collector that reads the readers' own map handles and the writer's last snapshot, so a
//! scrape never waits behind a table build. The histograms (check latency, table builds, map
//! writes) are observed where the work happens.

use std::sync::{Arc, Mutex};

use prometheus::{
    Encoder, Registry, TextEncoder,
    core::{Collector, Desc},
    proto::MetricFamily,
};
use tokio::sync::watch;

mod collector;
mod families;
pub mod histograms;
mod layout;
mod serve;

pub use histograms::Histograms;
pub use serve::{SharedRender, bearer_matches, serve};

use crate::{dataplane::Readers, nat::NatStatus, snapshot::Snapshot, status::checks::Board};
use collector::DataPlaneCollector;

/// What the collector reads.
pub struct Sources {
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub readers: Arc<Readers>,
    pub board: Board,
    pub nat: Arc<Mutex<NatStatus>>,
    pub nat_capacity: u64,
    pub conntrack_capacity: u64,
    pub conntrack: Arc<Mutex<crate::dataplane::census::ConntrackCensus>>,
    pub bgp: Arc<Mutex<crate::status::bgp::BgpStatus>>,
    pub cluster: Arc<Mutex<crate::status::cluster::ClusterStatus>>,
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
    registry.register(Box::new(histograms.heartbeats.clone()))?;
    registry.register(Box::new(histograms.expiries.clone()))?;
    registry.register(Box::new(histograms.discovery_updates.clone()))?;
    registry.register(Box::new(histograms.discovery_errors.clone()))?;
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
