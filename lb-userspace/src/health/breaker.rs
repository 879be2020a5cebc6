//! The circuit breaker of one backend: closed → open after `breaker_failures` consecutive
//! failures; open → half-open after `breaker_cooldown`, with `half_open_share` of its normal
//! share; half-open → closed after `recovery_threshold` successes, or back to open on a failure.
//! Pure: the caller passes the time.

use std::time::Instant;

use crate::{model::health_settings::BreakerSpec, status::signals::BreakerState};

#[derive(Clone, Debug)]
pub struct Breaker {
    state: BreakerState,
    fails: u32,
    oks: u32,
    opened: Option<Instant>,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            state: BreakerState::Closed,
            fails: 0,
            oks: 0,
            opened: None,
        }
    }
}

impl Breaker {
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// When an open breaker turns half-open.
    pub fn reopens_at(&self, spec: &BreakerSpec) -> Option<Instant> {
        (self.state == BreakerState::Open).then(|| self.opened.map(|t| t + spec.cooldown))?
    }

    /// Moves open → half-open once the cooldown has passed. Returns the new state if it moved.
    pub fn tick(&mut self, spec: &BreakerSpec, now: Instant) -> Option<BreakerState> {
        if self.reopens_at(spec).is_some_and(|t| now >= t) {
            self.state = BreakerState::HalfOpen;
            self.oks = 0;
            return Some(self.state);
        }
        None
    }

    /// Takes one result (active or passive). Returns the new state if it moved.
    pub fn record(&mut self, ok: bool, spec: &BreakerSpec, now: Instant) -> Option<BreakerState> {
        let ticked = self.tick(spec, now);
        if ok {
            self.fails = 0;
            self.oks = self.oks.saturating_add(1);
        } else {
            self.oks = 0;
            self.fails = self.fails.saturating_add(1);
        }
        let next = match self.state {
            BreakerState::Closed if self.fails >= spec.failures => BreakerState::Open,
            BreakerState::HalfOpen if !ok => BreakerState::Open,
            BreakerState::HalfOpen if self.oks >= spec.recovery => BreakerState::Closed,
            s => s,
        };
        if next == self.state {
            return ticked;
        }
        self.state = next;
        if next == BreakerState::Open {
            self.opened = Some(now);
        }
        self.fails = 0;
        self.oks = 0;
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn closed_open_half_open_closed_and_back_to_open_on_a_failure() {
        let spec = BreakerSpec {
            failures: 3,
            cooldown: Duration::from_secs(10),
            half_open_share: 0.1,
            recovery: 2,
        };
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut b = Breaker::default();
        assert_eq!(b.record(false, &spec, at(0)), None);
        assert_eq!(b.record(true, &spec, at(0)), None, "a success resets the count");
        b.record(false, &spec, at(1));
        b.record(false, &spec, at(1));
        assert_eq!(b.record(false, &spec, at(1)), Some(BreakerState::Open));
        assert_eq!(b.reopens_at(&spec), Some(at(11)));
        assert_eq!(
            b.record(true, &spec, at(5)),
            None,
            "successes do not close an open breaker"
        );
        assert_eq!(b.tick(&spec, at(10)), None);
        assert_eq!(b.tick(&spec, at(11)), Some(BreakerState::HalfOpen));
        assert_eq!(
            b.record(false, &spec, at(12)),
            Some(BreakerState::Open),
            "half-open fails back"
        );
        assert_eq!(
            b.record(true, &spec, at(23)),
            Some(BreakerState::HalfOpen),
            "cooldown again"
        );
        assert_eq!(b.record(true, &spec, at(23)), Some(BreakerState::Closed));
    }
}
