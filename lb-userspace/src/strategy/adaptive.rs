//! Adaptive services: the daemon picks the strategy from what it measures, for new flows only
//! (the connection table keeps established flows where they are).
//!
//! - backends report their load (a load report or an agent `N%`) → resource-aware;
//! - else the active flows are unbalanced (the busiest backend holds `imbalance` times its
//!   weight's share, over at least `min_flows` flows) → least-connections;
//! - else, once calm again (under `calm`) → Maglev.
//!
//! A switch waits `dwell` after the last one. `decide` is pure; `reconcile::adapt` is the
//! task that feeds it the data plane's active-flow counts and hands its switches to the writer.

use std::time::Instant;

pub use crate::model::adaptive_settings::{Adaptive, AdaptiveSettings};
use crate::{model::Strategy, status::AdaptiveState};

/// What one look measured.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Signals {
    /// Some backend has an unexpired load report or an agent weight in percent.
    pub reporting: bool,
    /// Active flows of the backends that take new flows.
    pub flows: u64,
    /// The busiest backend's active flows ÷ its weight's share of them (1 = balanced).
    pub imbalance: f64,
}

/// The imbalance of (active flows, effective weight) pairs: max of flows ÷ expected flows,
/// over backends with weight; 1 with no flows.
pub fn imbalance(members: &[(u64, u32)]) -> (u64, f64) {
    let total: u64 = members.iter().filter(|m| m.1 > 0).map(|m| m.0).sum();
    let weight: u64 = members.iter().map(|m| u64::from(m.1)).sum();
    if total == 0 || weight == 0 {
        return (total, 1.0);
    }
    let worst = members
        .iter()
        .filter(|m| m.1 > 0)
        .map(|&(n, w)| n as f64 / (total as f64 * f64::from(w) / weight as f64))
        .fold(0.0, f64::max);
    (total, worst)
}

/// Where the service should be now, and why; `None` to stay (as wanted, or within the dwell).
pub fn decide(state: &AdaptiveState, s: &Signals, a: &Adaptive, now: Instant) -> Option<(Strategy, String)> {
    let (want, reason) = if s.reporting {
        (Strategy::ResourceAware, "backends report their load".to_string())
    } else if s.flows >= a.min_flows && s.imbalance >= a.imbalance {
        (
            Strategy::LeastConnections,
            format!(
                "active-flow imbalance {:.2} >= {} over {} flows",
                s.imbalance, a.imbalance, s.flows
            ),
        )
    } else if state.current == Strategy::LeastConnections && s.flows >= a.min_flows && s.imbalance > a.calm {
        return None;
    } else {
        (
            Strategy::Maglev,
            format!(
                "calm: imbalance {:.2} <= {} over {} flows, no load reports",
                s.imbalance, a.calm, s.flows
            ),
        )
    };
    if want == state.current || now.saturating_duration_since(state.since) < a.dwell {
        return None;
    }
    Some((want, reason))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn imbalance_is_the_busiest_over_its_share() {
        assert_eq!(imbalance(&[(0, 100), (0, 100)]), (0, 1.0));
        assert_eq!(imbalance(&[(50, 100), (50, 100)]), (100, 1.0));
        let (n, i) = imbalance(&[(60, 100), (20, 100), (10, 100)]);
        assert_eq!(n, 90);
        assert!((i - 2.0).abs() < 1e-9);
        // Weights set the shares; weight-0 backends take none.
        let (_, i) = imbalance(&[(60, 200), (30, 100), (99, 0)]);
        assert!((i - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_scripted_scenario_switches_in_order_and_never_within_the_dwell() {
        let a = AdaptiveSettings {
            dwell: Some(10.0),
            ..Default::default()
        }
        .resolve();
        let t0 = Instant::now();
        let mut st = AdaptiveState::new(t0);
        let calm = Signals {
            reporting: false,
            flows: 100,
            imbalance: 1.05,
        };
        let skewed = Signals {
            imbalance: 2.5,
            ..calm
        };
        let settling = Signals {
            imbalance: 1.3,
            ..calm
        };
        let reporting = Signals {
            reporting: true,
            ..calm
        };
        // (seconds, signals, expected switch)
        let script = [
            (1, calm, None),
            (5, skewed, None), // within the dwell of the start
            (11, skewed, Some(Strategy::LeastConnections)),
            (12, calm, None),     // dwell
            (25, settling, None), // hysteresis: not calm enough to leave
            (30, reporting, Some(Strategy::ResourceAware)),
            (35, calm, None),
            (41, calm, Some(Strategy::Maglev)),
            (60, Signals { flows: 5, ..skewed }, None), // too few flows to count
        ];
        let mut switches = Vec::new();
        for (sec, signals, want) in script {
            let now = t0 + Duration::from_secs(sec);
            let got = decide(&st, &signals, &a, now);
            assert_eq!(got.as_ref().map(|g| g.0), want, "at {sec} s: {got:?}");
            if let Some((to, reason)) = got {
                assert!(now.duration_since(st.since) >= a.dwell);
                switches.push((sec, to, reason));
                st = AdaptiveState {
                    current: to,
                    reason: String::new(),
                    since: now,
                    switches: st.switches + 1,
                };
            }
        }
        assert_eq!(switches.len(), 3);
        assert!(switches[0].2.contains("imbalance 2.50"), "{}", switches[0].2);
    }

    #[test]
    fn settings_are_validated() {
        assert!(AdaptiveSettings::default().validate().is_ok());
        let e = AdaptiveSettings {
            calm: Some(2.0),
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("calm < imbalance"), "{e}");
        assert!(
            AdaptiveSettings {
                dwell: Some(-1.0),
                ..Default::default()
            }
            .validate()
            .is_err()
        );
    }
}
