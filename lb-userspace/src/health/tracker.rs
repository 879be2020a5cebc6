//! One backend's health from its check results: consecutive-count thresholds for up and down,
//! and a graded score. Pure: no clock, no I/O, so unit tests drive it result by result.
//!
//! The score (0..1) is `success × latency`:
//! - `success`: 1 − the share of failures among the last [`WINDOW`] checks (a new backend's
//!   window counts as passed, so one early failure weighs what it does later);
//! - `latency`: 1 while the median latency of the passing checks in the window is at most half
//!   the timeout, falling linearly to 0.5 at the timeout.
//!
//! The reconciler multiplies it with the external score (`lb backend health`). The score it
//! publishes moves in steps of [`STEP`], and only when the raw score is more than
//! [`HYSTERESIS`] away from the published one, so jitter does not rebuild tables.

use std::{collections::VecDeque, time::Duration};

pub use crate::status::checks::Outcome;
use crate::{
    model::health_settings::CheckSpec,
    status::signals::{HealthState, quantize},
};

pub const WINDOW: usize = 10;
pub const HYSTERESIS: f64 = 0.15;

/// The published view changed: the reconciler needs to know.
#[derive(Clone, Debug, PartialEq)]
pub struct Published {
    pub state: HealthState,
    pub score: f64,
    /// Set when `state` changed: why.
    pub transition: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Tracker {
    state: HealthState,
    fails: u32,
    oks: u32,
    window: VecDeque<(bool, Duration)>,
    published: f64,
}

impl Default for Tracker {
    /// A backend is assumed up until its checks say otherwise (as HAProxy starts servers), so
    /// a restart or a new check never takes traffic away by itself.
    fn default() -> Self {
        Self {
            state: HealthState::Up,
            fails: 0,
            oks: 0,
            window: VecDeque::with_capacity(WINDOW),
            published: 1.0,
        }
    }
}

impl Tracker {
    pub fn state(&self) -> HealthState {
        self.state
    }

    pub fn score(&self) -> f64 {
        self.published
    }

    /// Between states: failures counting towards down, or a down backend being checked for
    /// recovery. The scheduler then uses the fast interval.
    pub fn unsettled(&self) -> bool {
        match self.state {
            HealthState::Up => self.fails > 0,
            HealthState::Down => true,
        }
    }

    pub fn consecutive(&self) -> (u32, u32) {
        (self.oks, self.fails)
    }

    /// The unquantized score of the window.
    pub fn raw_score(&self, spec: &CheckSpec) -> f64 {
        if self.window.is_empty() {
            return 1.0;
        }
        let passed: Vec<Duration> = self
            .window
            .iter()
            .filter(|(ok, _)| *ok)
            .map(|(_, l)| *l)
            .collect();
        let failed = self.window.len() - passed.len();
        let success = 1.0 - failed as f64 / WINDOW as f64;
        let latency = if passed.is_empty() {
            1.0
        } else {
            let mut sorted = passed;
            sorted.sort();
            let median = sorted[sorted.len() / 2].as_secs_f64();
            let t = spec.timeout.as_secs_f64().max(1e-9);
            let over = (median / t - 0.5).clamp(0.0, 0.5);
            1.0 - over
        };
        success * latency
    }

    /// Takes one result; says what the reconciler must hear, if anything.
    pub fn record(&mut self, outcome: &Outcome, spec: &CheckSpec) -> Option<Published> {
        if self.window.len() == WINDOW {
            self.window.pop_front();
        }
        self.window.push_back((outcome.ok, outcome.latency));
        if outcome.ok {
            self.oks = self.oks.saturating_add(1);
            self.fails = 0;
        } else {
            self.fails = self.fails.saturating_add(1);
            self.oks = 0;
        }
        let raw = self.raw_score(spec);
        let transition = match self.state {
            HealthState::Up if self.fails >= spec.error_threshold => Some(format!(
                "{} consecutive failed checks, last: {}",
                self.fails, outcome.detail
            )),
            HealthState::Up if raw < spec.min_score => Some(format!(
                "score {raw:.2} below min_score {}, last: {}",
                spec.min_score, outcome.detail
            )),
            HealthState::Down if self.oks >= spec.recovery_threshold => {
                Some(format!("{} consecutive passed checks", self.oks))
            }
            _ => None,
        };
        if let Some(reason) = transition {
            self.state = match self.state {
                HealthState::Up => HealthState::Down,
                HealthState::Down => HealthState::Up,
            };
            // A recovered backend starts over with a clean window (slow start, if set, is the
            // ramp); a down one scores 0.
            if self.state == HealthState::Up {
                self.window.retain(|(ok, _)| *ok);
            }
            self.published = if self.state == HealthState::Up {
                quantize(self.raw_score(spec))
            } else {
                0.0
            };
            return Some(Published {
                state: self.state,
                score: self.published,
                transition: Some(reason),
            });
        }
        if self.state == HealthState::Up && (raw - self.published).abs() > HYSTERESIS {
            self.published = quantize(raw);
            return Some(Published {
                state: self.state,
                score: self.published,
                transition: None,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::health_settings::Probe;

    fn spec(errors: u32, recoveries: u32) -> CheckSpec {
        CheckSpec {
            probe: Probe::Tcp,
            target: "10.0.0.1:80".parse().unwrap(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(100),
            fast_interval: Duration::from_secs(1),
            jitter: 0.0,
            error_threshold: errors,
            recovery_threshold: recoveries,
            min_score: 0.1,
            breaker: None,
            passive: None,
            steered_to: None,
            slow_start: Duration::ZERO,
        }
    }

    fn ok(ms: u64) -> Outcome {
        Outcome {
            ok: true,
            latency: Duration::from_millis(ms),
            detail: "ok".into(),
        }
    }

    fn fail() -> Outcome {
        Outcome {
            ok: false,
            latency: Duration::from_millis(100),
            detail: "connect: connection refused".into(),
        }
    }

    #[test]
    fn goes_down_after_error_threshold_and_back_after_recovery_threshold() {
        let s = spec(3, 2);
        let mut t = Tracker::default();
        assert_eq!(t.record(&ok(1), &s), None);
        assert_eq!(t.record(&fail(), &s), None);
        assert!(t.unsettled());
        assert_eq!(
            t.record(&fail(), &s).map(|c| c.state),
            Some(HealthState::Up),
            "score step, still up"
        );
        let down = t.record(&fail(), &s).expect("third failure");
        assert_eq!(down.state, HealthState::Down);
        assert_eq!(down.score, 0.0);
        assert!(
            down.transition
                .unwrap()
                .contains("3 consecutive failed checks, last: connect")
        );
        assert_eq!(t.record(&ok(1), &s), None, "one success is not recovery");
        assert_eq!(t.record(&fail(), &s), None, "a failure resets the count");
        assert_eq!(t.record(&ok(1), &s), None);
        let up = t.record(&ok(1), &s).expect("second success in a row");
        assert_eq!(up.state, HealthState::Up);
        assert_eq!(up.score, 1.0, "a recovered backend starts with a clean window");
        assert!(!t.unsettled());
    }

    #[test]
    fn score_follows_the_window_with_hysteresis() {
        let s = spec(100, 2);
        let mut t = Tracker::default();
        for _ in 0..WINDOW {
            t.record(&ok(1), &s);
        }
        // One failure in ten: raw 0.9, within the hysteresis of 1.0.
        assert_eq!(t.record(&fail(), &s), None);
        assert_eq!(t.score(), 1.0);
        // Two in ten: 0.8 is published.
        let c = t.record(&fail(), &s).expect("moved past the hysteresis");
        assert!((c.score - 0.8).abs() < 1e-9, "{c:?}");
        // Slow answers (at the timeout) halve the latency factor.
        let mut slow = Tracker::default();
        let mut last = None;
        for _ in 0..WINDOW {
            last = slow.record(&ok(100), &s).or(last);
        }
        assert!((slow.score() - 0.5).abs() < 1e-9, "{last:?}");
        // Answers within half the timeout cost nothing.
        let mut quick = Tracker::default();
        for _ in 0..WINDOW {
            assert_eq!(quick.record(&ok(50), &s), None);
        }
    }

    #[test]
    fn a_score_below_min_score_takes_it_down() {
        let mut s = spec(100, 2);
        s.min_score = 0.85;
        let mut t = Tracker::default();
        for _ in 0..WINDOW {
            t.record(&ok(1), &s);
        }
        t.record(&fail(), &s);
        let c = t.record(&fail(), &s).expect("0.8 < 0.85");
        assert_eq!(c.state, HealthState::Down);
        assert!(c.transition.unwrap().contains("below min_score"));
    }
}
