//! Each backend's status, kept apart from its config: health (from the monitor), an external
//! score (`lb backend health`), and, beside them in the reconciler, its next hop. One pure
//! function turns a service's config and its backends' status into effective weights.
//!
//! Effective weight = weight (the configured one, or the agent's) × health score × external
//! score × slow-start ramp × half-open share, rounded, at least 1 while all are positive. A
//! backend gets none (no new flows) when it is unresolved, down (checks, agent or an external
//! score of 0), drained (weight 0, the agent's drain or maint, or a [`Drain`]: the operator's,
//! a late heartbeat's, its source's) or its breaker is open. Its
//! slot keeps serving pinned flows unless it is unresolved, in maintenance, or down with
//! `down_flows = "repick"` (the default).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

pub mod bgp;
pub mod checks;
pub mod cluster;
pub mod discovery;
pub mod lease;
pub mod load;
pub mod signals;

pub use signals::{AdaptiveState, AgentState, BreakerState, HealthState};

use crate::model::{
    BackendRef, Service, Strategy,
    health_settings::{DownFlows, OnPanic, PanicSpec, agent_absolute_weights, down_flows},
};
use signals::quantize;

/// Steps of the slow-start ramp: the weight changes (and tables are rebuilt) this many times.
pub const RAMP_STEPS: u32 = 10;

/// A score set from outside (`lb backend health SERVICE ID SCORE [--ttl S]`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct External {
    pub score: f64,
    pub expires: Option<Instant>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BackendStatus {
    pub health: HealthState,
    pub score: f64,
    /// What the backend's agent last said (`None`: no agent, or it has said nothing yet).
    pub agent: Option<AgentState>,
    pub breaker: BreakerState,
    pub half_open_share: f64,
    /// When it last came back up, and over how long its weight ramps from then.
    pub up_at: Option<Instant>,
    pub slow_start: Duration,
    pub external: Option<External>,
    /// Its own load (reports, agent `N%`) and the factor resource-aware weighting gives it.
    pub load: load::LoadState,
    /// Registered with a `ttl`: its heartbeats, and whether a late one drained it.
    pub lease: Option<lease::Lease>,
    /// Gone from its service's discovery source: drained (no new flows) until this moment,
    /// then removed (`drain_before_remove`).
    pub departing: Option<Instant>,
    /// Drained by the operator (`lb backend drain`) since then, until `lb backend undrain`:
    /// operator intent, so a reload and a restart keep it.
    pub held: Option<Instant>,
}

/// Why a backend takes no new flows while its health may be fine. The reasons end apart: the
/// operator's with `undrain`, a late heartbeat's with the next heartbeat, its source's with
/// its removal (or its return to the source).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Drain {
    Operator,
    Heartbeat,
    Source,
}

impl Drain {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Operator => "operator",
            Self::Heartbeat => "heartbeat",
            Self::Source => "source",
        }
    }
}

impl Default for BackendStatus {
    fn default() -> Self {
        Self {
            health: HealthState::Up,
            score: 1.0,
            agent: None,
            breaker: BreakerState::Closed,
            half_open_share: 1.0,
            up_at: None,
            slow_start: Duration::ZERO,
            external: None,
            load: Default::default(),
            lease: None,
            departing: None,
            held: None,
        }
    }
}

impl BackendStatus {
    /// The slow-start factor at `now`, in steps of 1/RAMP_STEPS; 1 when not ramping.
    pub fn ramp(&self, now: Instant) -> f64 {
        match self.up_at {
            Some(at) if !self.slow_start.is_zero() => {
                let done = now.saturating_duration_since(at).as_secs_f64() / self.slow_start.as_secs_f64();
                if done >= 1.0 {
                    1.0
                } else {
                    // Start at the first step, not at 0: a recovered backend takes some flows.
                    ((done * RAMP_STEPS as f64).floor() + 1.0).min(RAMP_STEPS as f64) / RAMP_STEPS as f64
                }
            }
            _ => 1.0,
        }
    }

    /// When the ramp next changes step, if it is ramping.
    pub fn next_ramp_step(&self, now: Instant) -> Option<Instant> {
        let at = self.up_at?;
        if self.slow_start.is_zero() || now >= at + self.slow_start {
            return None;
        }
        let step = self.slow_start / RAMP_STEPS;
        let done = now.saturating_duration_since(at).as_nanos() / step.as_nanos().max(1);
        Some(at + step * (done as u32 + 1))
    }

    /// Its state for readers: `drained` while a [`Drain`] keeps new flows away, else its health.
    pub fn state_name(&self) -> &'static str {
        match (self.drained(), self.health) {
            (true, _) => "drained",
            (false, HealthState::Up) => "up",
            (false, HealthState::Down) => "down",
        }
    }

    /// Why it takes no new flows for a reason other than its health, if it does: the one that
    /// decides its fate first (its source's removal, then a late heartbeat's, then the
    /// operator's, which only the operator ends).
    pub fn drain(&self) -> Option<Drain> {
        if self.departing.is_some() {
            Some(Drain::Source)
        } else if self.lease.is_some_and(|l| l.drained) {
            Some(Drain::Heartbeat)
        } else if self.held.is_some() {
            Some(Drain::Operator)
        } else {
            None
        }
    }

    /// Takes no new flows for a [`Drain`] (not for its health): no panic candidate either.
    pub fn drained(&self) -> bool {
        self.drain().is_some()
    }

    /// Why it takes no new flows, in one line for `lb health`, `lb service list` and the
    /// status page; `source` names its service's discovery source.
    pub fn drain_detail(&self, source: &str, now: Instant) -> Option<String> {
        match self.drain()? {
            Drain::Source => self.departure(source, now),
            Drain::Heartbeat => self.lease.and_then(|l| l.reason(now)),
            Drain::Operator => self.held.map(|at| {
                format!(
                    "by the operator {:.0} s ago (lb backend undrain ends it)",
                    now.saturating_duration_since(at).as_secs_f64()
                )
            }),
        }
    }

    /// Why a backend gone from its source takes no new flows, for `lb health` and `lb service
    /// list`.
    pub fn departure(&self, source: &str, now: Instant) -> Option<String> {
        self.departing.map(|at| {
            format!(
                "gone from its {source} source; removed in {:.1} s",
                at.saturating_duration_since(now).as_secs_f64()
            )
        })
    }

    fn external_score(&self) -> f64 {
        self.external.map_or(1.0, |e| e.score)
    }
}

/// What the tables and the backend map get for one backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Eligibility {
    /// Weight in the service's tables; 0 = no new flows.
    pub weight: u32,
    /// The slot keeps serving flows pinned to it.
    pub active: bool,
    /// Most active flows the counting strategies give it (0: no cap): the lower of its
    /// configured `maxconn` and its agent's.
    pub maxconn: u32,
}

/// The lower of a backend's configured connection cap and its agent's (0: none).
pub(crate) fn maxconn(b: &crate::model::Backend, agent: Option<&AgentState>) -> u32 {
    match (b.maxconn, agent.and_then(|a| a.maxconn)) {
        (Some(x), Some(y)) => x.min(y),
        (Some(x), None) | (None, Some(x)) => x,
        (None, None) => 0,
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ServiceWeights {
    pub backends: BTreeMap<String, Eligibility>,
    /// What its tables are built as (the strategy in effect's table kind).
    pub strategy: Strategy,
    /// Count active flows though the strategy does not pick by them (adaptive).
    pub count: bool,
    /// No backend was up, or fewer than its `panic_threshold` of them.
    pub panic: bool,
}

/// The effective weights of one service's backends, under the strategy in effect (the
/// declared one, or an adaptive service's pick).
pub fn effective_weights(
    service: &Service,
    in_effect: Strategy,
    status: &BTreeMap<BackendRef, BackendStatus>,
    resolved: impl Fn(std::net::IpAddr) -> bool,
    now: Instant,
) -> ServiceWeights {
    let default = BackendStatus::default();
    let mut out = ServiceWeights {
        strategy: in_effect.table(),
        count: service.strategy == Strategy::Adaptive,
        ..Default::default()
    };
    // Resource-aware reads the agent's `N%` as load, through its bounded steps.
    let resource = in_effect == Strategy::ResourceAware;
    let (mut candidates, mut healthy) = (0usize, 0usize);
    for b in &service.backends {
        let st = status
            .get(&BackendRef::new(&service.name, &b.id))
            .unwrap_or(&default);
        let reachable = resolved(b.address);
        let agent = st.agent.as_ref();
        let configured = match agent {
            Some(a) if !(resource && a.percent().is_some()) => {
                a.weight_within(b.weight, agent_absolute_weights(service, b))
            }
            _ => b.weight,
        };
        let unhealthy = st.health == HealthState::Down || st.external_score() <= 0.0;
        // An open breaker takes no new flows; its pinned flows stay.
        let excluded =
            unhealthy || agent.is_some_and(AgentState::excluded) || st.breaker == BreakerState::Open;
        // Drained (weight 0, the agent's drain, the operator's, a late heartbeat, gone from
        // its source) backends are no panic candidates.
        let drained = st.drained();
        let candidate = reachable && configured > 0 && !drained && !agent.is_some_and(|a| a.drain || a.maint);
        candidates += usize::from(candidate);
        healthy += usize::from(candidate && !excluded);
        let half_open = if st.breaker == BreakerState::HalfOpen {
            st.half_open_share
        } else {
            1.0
        };
        let load = if resource { st.load.factor } else { 1.0 };
        let factor = quantize(st.score * st.external_score()) * st.ramp(now) * half_open * load;
        let weight = if candidate && !excluded {
            ((f64::from(configured) * factor).round() as u32).max(1)
        } else {
            0
        };
        let keeps = if unhealthy || agent.is_some_and(|a| a.down.is_some()) {
            down_flows(service, b) == DownFlows::Keep
        } else {
            agent.is_none_or(AgentState::keeps_pinned_flows)
        };
        let active = reachable && keeps;
        out.backends.insert(
            b.id.clone(),
            Eligibility {
                weight,
                active,
                maxconn: maxconn(b, agent),
            },
        );
    }
    let panic = PanicSpec::of(service);
    if panic.panics(healthy, candidates) {
        out.panic = true;
        if panic.on_panic == OnPanic::All {
            // Spread over every backend that can be reached, at its configured weight: better
            // some answers than none when most of the health checks may be wrong.
            for b in &service.backends {
                let agent = status
                    .get(&BackendRef::new(&service.name, &b.id))
                    .and_then(|s| s.agent.as_ref());
                let configured = agent.map_or(b.weight, |a| {
                    a.weight_within(b.weight, agent_absolute_weights(service, b))
                });
                let drained = agent.is_some_and(|a| a.drain || a.maint)
                    || status
                        .get(&BackendRef::new(&service.name, &b.id))
                        .is_some_and(BackendStatus::drained);
                if resolved(b.address) && configured > 0 && !drained {
                    out.backends.insert(
                        b.id.clone(),
                        Eligibility {
                            weight: configured,
                            active: true,
                            maxconn: maxconn(b, agent),
                        },
                    );
                }
            }
        }
    }
    out
}

/// One service's weights as the cluster agrees on them (`cluster::View`): each backend this
/// node can reach takes the agreed weight; one it cannot reach (no next hop) keeps none here.
pub fn agree(
    weights: &mut ServiceWeights,
    service: &str,
    view: &cluster::View,
    reachable: impl Fn(&str) -> bool,
) {
    for (id, e) in weights.backends.iter_mut() {
        if let Some(w) = view.agreed(service, id)
            && reachable(id)
        {
            e.weight = w;
        }
    }
}

/// Each service's backends' weights, as this node votes them in a cluster.
pub fn votes(weights: &BTreeMap<String, ServiceWeights>) -> cluster::Votes {
    weights
        .iter()
        .map(|(name, w)| {
            let v = w.backends.iter().map(|(id, e)| (id.clone(), e.weight)).collect();
            (name.clone(), v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, HealthSettings, Protocol};
    use signals::AgentWeight;

    fn service(n: usize, panic: Option<f64>) -> Service {
        Service {
            table_size: 13,
            health: Some(HealthSettings {
                panic_threshold: panic,
                ..Default::default()
            }),
            backends: (0..n)
                .map(|i| Backend::new(format!("b{i}"), format!("10.0.1.{}", i + 1).parse().unwrap()))
                .collect(),
            ..Service::new("web", "10.0.0.1".parse().unwrap(), 80, Protocol::Tcp)
        }
    }

    fn down() -> BackendStatus {
        BackendStatus {
            health: HealthState::Down,
            score: 0.0,
            ..Default::default()
        }
    }

    fn weights(w: &ServiceWeights) -> Vec<(u32, bool)> {
        w.backends.values().map(|e| (e.weight, e.active)).collect()
    }

    #[test]
    fn health_external_score_and_drain_shape_weights() {
        let mut s = service(4, Some(0.0));
        s.backends[3].weight = 0;
        s.backends[2].health = Some(HealthSettings {
            down_flows: Some(DownFlows::Keep),
            ..Default::default()
        });
        let mut st = BTreeMap::new();
        st.insert(BackendRef::new("web", "b0"), down());
        st.insert(
            BackendRef::new("web", "b1"),
            BackendStatus {
                external: Some(External {
                    score: 0.2,
                    expires: None,
                }),
                ..Default::default()
            },
        );
        st.insert(BackendRef::new("web", "b2"), down());
        let now = Instant::now();
        let w = effective_weights(&s, s.strategy, &st, |_| true, now);
        assert_eq!(weights(&w), vec![(0, false), (20, true), (0, true), (0, true)]);
        assert!(!w.panic);
        // Unresolved: no flows, no pinned flows.
        let w = effective_weights(&s, s.strategy, &st, |a| a.to_string() != "10.0.1.2", now);
        assert_eq!(
            w.backends["b1"],
            Eligibility {
                weight: 0,
                active: false,
                maxconn: 0,
            }
        );
    }

    #[test]
    fn panic_spreads_over_all_reachable_backends() {
        let s = service(3, Some(0.8));
        let mut st = BTreeMap::new();
        st.insert(BackendRef::new("web", "b0"), down());
        st.insert(BackendRef::new("web", "b1"), down());
        let w = effective_weights(&s, s.strategy, &st, |_| true, Instant::now());
        assert!(w.panic);
        assert_eq!(weights(&w), vec![(100, true), (100, true), (100, true)]);
        // Envoy's 0.5, set: one of three up is panic too; two of three is not.
        let s = service(3, Some(0.5));
        assert!(effective_weights(&s, s.strategy, &st, |_| true, Instant::now()).panic);
        st.remove(&BackendRef::new("web", "b1"));
        let w = effective_weights(&s, s.strategy, &st, |_| true, Instant::now());
        assert!(!w.panic);
        assert_eq!(weights(&w), vec![(0, false), (100, true), (100, true)]);
        // Set to 0: never, not even with none up.
        let s = service(3, Some(0.0));
        let all_down: BTreeMap<_, _> = (0..3)
            .map(|i| (BackendRef::new("web", &format!("b{i}")), down()))
            .collect();
        assert!(!effective_weights(&s, s.strategy, &all_down, |_| true, Instant::now()).panic);
    }

    #[test]
    fn by_default_only_a_service_with_no_backend_up_panics() {
        let s = service(3, None);
        let mut st = BTreeMap::new();
        st.insert(BackendRef::new("web", "b0"), down());
        st.insert(BackendRef::new("web", "b1"), down());
        // One of three up: no panic, every new flow to the healthy one.
        let w = effective_weights(&s, s.strategy, &st, |_| true, Instant::now());
        assert!(!w.panic);
        assert_eq!(weights(&w), vec![(0, false), (0, false), (100, true)]);
        // None up: spread over all three (on_panic = "all").
        st.insert(BackendRef::new("web", "b2"), down());
        let w = effective_weights(&s, s.strategy, &st, |_| true, Instant::now());
        assert!(w.panic);
        assert_eq!(weights(&w), vec![(100, true), (100, true), (100, true)]);
    }

    #[test]
    fn the_agent_drains_weighs_and_takes_down() {
        let s = service(3, Some(0.0));
        // What the agent's `drain`, `50%`, `maint` and `down #disk` leave (`health::agent`).
        let agent = |state: AgentState| BackendStatus {
            agent: Some(state),
            ..Default::default()
        };
        let mut st = BTreeMap::new();
        st.insert(
            BackendRef::new("web", "b0"),
            agent(AgentState {
                drain: true,
                ..Default::default()
            }),
        );
        st.insert(
            BackendRef::new("web", "b1"),
            agent(AgentState {
                weight: Some(AgentWeight::Percent(50)),
                ..Default::default()
            }),
        );
        st.insert(
            BackendRef::new("web", "b2"),
            agent(AgentState {
                maint: true,
                ..Default::default()
            }),
        );
        let w = effective_weights(&s, s.strategy, &st, |_| true, Instant::now());
        assert_eq!(weights(&w), vec![(0, true), (50, true), (0, false)]);
        st.insert(
            BackendRef::new("web", "b2"),
            agent(AgentState {
                down: Some("disk".into()),
                ..Default::default()
            }),
        );
        let w = effective_weights(&s, s.strategy, &st, |_| true, Instant::now());
        assert_eq!(
            w.backends["b2"],
            Eligibility {
                weight: 0,
                active: false,
                maxconn: 0,
            }
        );
    }

    #[test]
    fn the_agent_lifts_a_weight_at_most_256_percent_unless_absolute_weights_are_on() {
        let mut s = service(2, Some(0.0));
        // The agent's `weight:10000` and `weight:150`.
        let st: BTreeMap<_, _> = [("b0", 10_000), ("b1", 150)]
            .into_iter()
            .map(|(id, w)| {
                let agent = AgentState {
                    weight: Some(AgentWeight::Absolute(w)),
                    ..Default::default()
                };
                (
                    BackendRef::new("web", id),
                    BackendStatus {
                        agent: Some(agent),
                        ..Default::default()
                    },
                )
            })
            .collect();
        let w = effective_weights(&s, s.strategy, &st, |_| true, Instant::now());
        assert_eq!(weights(&w), vec![(256, true), (150, true)]);
        // Opted in, for the service or one backend.
        s.health.as_mut().unwrap().agent_absolute_weights = Some(true);
        let w = effective_weights(&s, s.strategy, &st, |_| true, Instant::now());
        assert_eq!(weights(&w), vec![(10_000, true), (150, true)]);
        s.health.as_mut().unwrap().agent_absolute_weights = None;
        s.backends[0].health = Some(HealthSettings {
            agent_absolute_weights: Some(true),
            ..Default::default()
        });
        let w = effective_weights(&s, s.strategy, &st, |_| true, Instant::now());
        assert_eq!(weights(&w), vec![(10_000, true), (150, true)]);
    }

    #[test]
    fn a_late_heartbeat_drains_new_flows_keeps_pinned_ones_and_is_no_panic_candidate() {
        let s = service(2, None);
        let now = Instant::now();
        let terms = lease::Terms {
            ttl: Duration::from_secs(2),
            deregister_after: Duration::from_secs(60),
        };
        let mut st = BTreeMap::new();
        let late = BackendStatus {
            lease: Some(lease::Lease {
                drained: true,
                ..lease::Lease::new(terms, now)
            }),
            ..Default::default()
        };
        st.insert(BackendRef::new("web", "b0"), late);
        let w = effective_weights(&s, s.strategy, &st, |_| true, now);
        assert_eq!(weights(&w), vec![(0, true), (100, true)]);
        // With the other one down, panic spreads over neither of the two: the late one is
        // drained, not unhealthy.
        st.insert(BackendRef::new("web", "b1"), down());
        let w = effective_weights(&s, s.strategy, &st, |_| true, now);
        assert!(w.panic);
        assert_eq!(w.backends["b0"].weight, 0, "{w:?}");
        // Live lease: as if it had none.
        st.get_mut(&BackendRef::new("web", "b0")).unwrap().lease = Some(lease::Lease::new(terms, now));
        let w = effective_weights(&s, s.strategy, &st, |_| true, now);
        assert_eq!(w.backends["b0"].weight, 100);
    }

    #[test]
    fn a_backend_gone_from_its_source_drains_like_a_late_heartbeat() {
        let s = service(2, None);
        let now = Instant::now();
        let mut st = BTreeMap::new();
        st.insert(
            BackendRef::new("web", "b0"),
            BackendStatus {
                departing: Some(now + Duration::from_secs(10)),
                ..Default::default()
            },
        );
        let w = effective_weights(&s, s.strategy, &st, |_| true, now);
        assert_eq!(weights(&w), vec![(0, true), (100, true)]);
        let b0 = &st[&BackendRef::new("web", "b0")];
        assert_eq!(b0.state_name(), "drained");
        assert_eq!(
            b0.departure("file", now).as_deref(),
            Some("gone from its file source; removed in 10.0 s")
        );
        // With the other one down, the departing one is no panic candidate.
        st.insert(BackendRef::new("web", "b1"), down());
        let w = effective_weights(&s, s.strategy, &st, |_| true, now);
        assert!(w.panic);
        assert_eq!(w.backends["b0"].weight, 0);
    }

    #[test]
    fn an_operator_drain_takes_no_new_flows_keeps_pinned_ones_and_its_weight() {
        let s = service(3, None);
        let now = Instant::now();
        let held = BackendStatus {
            held: Some(now - Duration::from_secs(5)),
            ..Default::default()
        };
        let mut st = BTreeMap::new();
        st.insert(BackendRef::new("web", "b0"), held.clone());
        let w = effective_weights(&s, s.strategy, &st, |_| true, now);
        // No new flows, its pinned flows kept; the others keep theirs.
        assert_eq!(weights(&w), vec![(0, true), (100, true), (100, true)]);
        assert_eq!(s.backends[0].weight, 100, "the configured weight is not touched");
        assert_eq!(held.state_name(), "drained");
        assert_eq!(held.drain(), Some(Drain::Operator));
        assert_eq!(
            held.drain_detail("file", now).as_deref(),
            Some("by the operator 5 s ago (lb backend undrain ends it)")
        );
        // No panic candidate: the other two down, the service panics and spreads over neither
        // the drained one (on_panic = "all" keeps drained backends out).
        st.insert(BackendRef::new("web", "b1"), down());
        st.insert(BackendRef::new("web", "b2"), down());
        let w = effective_weights(&s, s.strategy, &st, |_| true, now);
        assert!(w.panic);
        assert_eq!(w.backends["b0"].weight, 0);
        assert_eq!(w.backends["b1"].weight, 100);
        // Undrained, healthy: its weight again, through the ramp when it has slow start.
        let back = BackendStatus {
            up_at: Some(now),
            slow_start: Duration::from_secs(10),
            ..Default::default()
        };
        st.insert(BackendRef::new("web", "b0"), back);
        st.remove(&BackendRef::new("web", "b1"));
        st.remove(&BackendRef::new("web", "b2"));
        let w = effective_weights(&s, s.strategy, &st, |_| true, now);
        assert_eq!(weights(&w), vec![(10, true), (100, true), (100, true)]);
    }

    #[test]
    fn each_drain_keeps_its_own_reason_and_the_one_that_ends_first_shows() {
        let now = Instant::now();
        let terms = lease::Terms {
            ttl: Duration::from_secs(2),
            deregister_after: Duration::from_secs(60),
        };
        let late = lease::Lease {
            drained: true,
            ..lease::Lease::new(terms, now)
        };
        let mut st = BackendStatus {
            held: Some(now),
            ..Default::default()
        };
        assert_eq!(st.drain(), Some(Drain::Operator));
        st.lease = Some(late);
        assert_eq!(st.drain(), Some(Drain::Heartbeat));
        assert!(
            st.drain_detail("file", now)
                .unwrap()
                .starts_with("heartbeat late")
        );
        st.departing = Some(now + Duration::from_secs(3));
        assert_eq!(st.drain(), Some(Drain::Source));
        assert_eq!(
            st.drain_detail("dns", now).as_deref(),
            Some("gone from its dns source; removed in 3.0 s")
        );
        // A heartbeat again, the source's entry back: the operator's drain is still there.
        st.departing = None;
        st.lease = Some(lease::Lease::new(terms, now));
        assert_eq!(st.drain(), Some(Drain::Operator));
        st.held = None;
        assert_eq!((st.drain(), st.drain_detail("file", now)), (None, None));
        assert_eq!(st.state_name(), "up");
    }

    #[test]
    fn slow_start_ramps_in_steps() {
        let at = Instant::now();
        let st = BackendStatus {
            up_at: Some(at),
            slow_start: Duration::from_secs(10),
            ..Default::default()
        };
        assert_eq!(st.ramp(at), 0.1);
        assert_eq!(st.ramp(at + Duration::from_millis(4500)), 0.5);
        assert_eq!(st.ramp(at + Duration::from_secs(10)), 1.0);
        assert_eq!(
            st.next_ramp_step(at + Duration::from_millis(4500)),
            Some(at + Duration::from_secs(5))
        );
        assert_eq!(st.next_ramp_step(at + Duration::from_secs(11)), None);
    }
}
