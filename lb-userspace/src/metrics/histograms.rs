//! The histograms observed where the work happens (the monitor, the reconciler); the registry
//! serves them beside the collector. Apart from the collector, so the reconciler that observes
//! them does not depend on what reads its snapshot.

use prometheus::{HistogramOpts, HistogramVec};

/// The histograms observed outside the collector; cheap to clone.
#[derive(Clone)]
pub struct Histograms {
    /// `lb_health_check_duration_seconds{service,kind}`.
    pub check: HistogramVec,
    /// `lb_table_rebuild_duration_seconds`: the table builds of one reconciler pass.
    pub rebuild: HistogramVec,
    /// `lb_map_write_duration_seconds`: one pass's map work, builds included.
    pub map_write: HistogramVec,
    /// `lb_strategy_switches_total{service,from,to}`: adaptive services' switches.
    pub switches: prometheus::IntCounterVec,
    /// `lb_registration_heartbeats_total{service}`: heartbeats of instances registered with a
    /// TTL, accepted.
    pub heartbeats: prometheus::IntCounterVec,
    /// `lb_registration_expiries_total{service,outcome}`: late heartbeats that drained
    /// (`drained`) or removed (`removed`) an instance.
    pub expiries: prometheus::IntCounterVec,
    /// `lb_discovery_updates_total{service,source}`: sets a discovery source read that differed
    /// from its last one.
    pub discovery_updates: prometheus::IntCounterVec,
    /// `lb_discovery_errors_total{service,source,reason}`: reads that failed (the last set
    /// kept) and entries skipped (each once while it stays in its source as it is), by reason.
    pub discovery_errors: prometheus::IntCounterVec,
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
            switches: prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "lb_strategy_switches_total",
                    "Strategy switches of adaptive services (the reason is in the log and in lb service list).",
                ),
                &["service", "from", "to"],
            )
            .expect("valid counter"),
            heartbeats: prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "lb_registration_heartbeats_total",
                    "Heartbeats accepted from instances registered with a ttl.",
                ),
                &["service"],
            )
            .expect("valid counter"),
            expiries: prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "lb_registration_expiries_total",
                    "Instances registered with a ttl whose heartbeat was late: drained (no new flows), then removed.",
                ),
                &["service", "outcome"],
            )
            .expect("valid counter"),
            discovery_updates: prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "lb_discovery_updates_total",
                    "Sets of instances a service's discovery source read that differed from its last one.",
                ),
                &["service", "source"],
            )
            .expect("valid counter"),
            discovery_errors: prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "lb_discovery_errors_total",
                    "Discovery reads that failed (the last known set stays) and entries skipped, by reason.",
                ),
                &["service", "source", "reason"],
            )
            .expect("valid counter"),
        }
    }
}

impl Default for Histograms {
    fn default() -> Self {
        Self::new()
    }
}
