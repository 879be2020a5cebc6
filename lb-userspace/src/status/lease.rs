//! Registrations with a lifetime: an instance registered with a `ttl` must heartbeat within it.
//! Late by its TTL, it is drained (no new flows; established ones keep going); still silent
//! `deregister_after` later, it is removed. A heartbeat before the removal brings it back.
//!
//! The writer owns every lease (it is part of a backend's status) and asks [`Lease::step`]
//! what is due at each pass; the clock is a parameter, so expiry is decided by a pure function.

use std::time::{Duration, Instant};

/// Shortest and longest TTL a registration may ask for: shorter than a second would cost a
/// heartbeat per second per instance for nothing; a day bounds how long a dead one lingers.
pub const MIN_TTL: Duration = Duration::from_secs(1);
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long a drained registration is kept before it is removed, unless set.
pub const DEFAULT_DEREGISTER_AFTER: Duration = Duration::from_secs(60);
pub const MAX_DEREGISTER_AFTER: Duration = Duration::from_secs(24 * 3600);

/// A registration's terms, as the instance asked for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Terms {
    pub ttl: Duration,
    pub deregister_after: Duration,
}

impl Terms {
    /// Checks seconds as the API and the CLI take them; one line naming the range if not.
    pub fn from_secs(ttl: f64, deregister_after: f64) -> Result<Self, String> {
        Ok(Self {
            ttl: secs_in("ttl", ttl, MIN_TTL, MAX_TTL)?,
            deregister_after: deregister_after_secs(deregister_after)?,
        })
    }
}

pub fn deregister_after_secs(v: f64) -> Result<Duration, String> {
    secs_in("deregister_after", v, MIN_TTL, MAX_DEREGISTER_AFTER)
}

fn secs_in(what: &str, v: f64, min: Duration, max: Duration) -> Result<Duration, String> {
    if v.is_finite() && (min.as_secs_f64()..=max.as_secs_f64()).contains(&v) {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!(
            "{what} {v} s is out of range {}..={}",
            min.as_secs(),
            max.as_secs()
        ))
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lease {
    pub terms: Terms,
    /// The registration or the last heartbeat.
    pub renewed: Instant,
    /// The writer drained it for a late heartbeat (and counted that once).
    pub drained: bool,
}

/// What a pass must do about one lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing (live, or already drained and not yet due for removal).
    Keep,
    /// Late by its TTL: take no new flows from now.
    Drain,
    /// Late by its TTL and `deregister_after` more: remove the backend.
    Remove,
}

impl Lease {
    pub fn new(terms: Terms, now: Instant) -> Self {
        Self {
            terms,
            renewed: now,
            drained: false,
        }
    }

    fn drain_at(&self) -> Instant {
        self.renewed + self.terms.ttl
    }

    fn remove_at(&self) -> Instant {
        self.drain_at() + self.terms.deregister_after
    }

    /// What is due at `now`.
    pub fn step(&self, now: Instant) -> Step {
        if now >= self.remove_at() {
            Step::Remove
        } else if now >= self.drain_at() && !self.drained {
            Step::Drain
        } else {
            Step::Keep
        }
    }

    /// When the next step falls due, for the writer's timer.
    pub fn next_due(&self) -> Instant {
        if self.drained {
            self.remove_at()
        } else {
            self.drain_at()
        }
    }

    /// How late the heartbeat is at `now` (zero when it is not).
    pub fn late_by(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.drain_at())
    }

    /// Seconds left before the drain (positive) or since it (negative), for readers.
    pub fn left_s(&self, now: Instant) -> f64 {
        let drain = self.drain_at();
        if now <= drain {
            (drain - now).as_secs_f64()
        } else {
            -(now - drain).as_secs_f64()
        }
    }

    /// Why it takes no new flows, for `lb health` and `lb service list`.
    pub fn reason(&self, now: Instant) -> Option<String> {
        self.drained.then(|| {
            format!(
                "heartbeat late by {:.1} s (ttl {} s); removed in {:.1} s",
                self.late_by(now).as_secs_f64(),
                self.terms.ttl.as_secs_f64(),
                self.remove_at().saturating_duration_since(now).as_secs_f64()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terms(ttl: u64, after: u64) -> Terms {
        Terms {
            ttl: Duration::from_secs(ttl),
            deregister_after: Duration::from_secs(after),
        }
    }

    #[test]
    fn a_late_lease_is_drained_once_then_removed() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut lease = Lease::new(terms(2, 5), t0);
        assert_eq!(lease.next_due(), t0 + s(2));
        assert_eq!(lease.step(t0), Step::Keep);
        assert_eq!(lease.step(t0 + Duration::from_millis(1999)), Step::Keep);
        assert_eq!(lease.step(t0 + s(2)), Step::Drain);
        lease.drained = true;
        // Drained once: the next passes keep it until removal is due.
        assert_eq!(lease.step(t0 + s(3)), Step::Keep);
        assert_eq!(lease.next_due(), t0 + s(7));
        assert!(
            lease
                .reason(t0 + s(3))
                .unwrap()
                .starts_with("heartbeat late by 1.0 s (ttl 2 s)")
        );
        assert_eq!(lease.step(t0 + Duration::from_millis(6999)), Step::Keep);
        assert_eq!(lease.step(t0 + s(7)), Step::Remove);
        // A pass that wakes late for both goes straight to removal.
        assert_eq!(Lease::new(terms(2, 5), t0).step(t0 + s(60)), Step::Remove);
    }

    #[test]
    fn a_heartbeat_moves_the_deadlines() {
        let t0 = Instant::now();
        let mut lease = Lease::new(terms(2, 5), t0);
        lease.renewed = t0 + Duration::from_millis(1500);
        assert_eq!(lease.step(t0 + Duration::from_millis(3000)), Step::Keep);
        assert_eq!(lease.next_due(), t0 + Duration::from_millis(3500));
        assert_eq!(lease.left_s(t0 + Duration::from_millis(3000)), 0.5);
        assert!(lease.reason(t0).is_none(), "not drained: no reason");
    }

    #[test]
    fn terms_refuse_zero_huge_and_non_finite_seconds() {
        assert_eq!(
            Terms::from_secs(10.0, 60.0).unwrap(),
            Terms {
                ttl: Duration::from_secs(10),
                deregister_after: DEFAULT_DEREGISTER_AFTER
            }
        );
        assert_eq!(
            Terms::from_secs(2.0, 3.0).unwrap().deregister_after,
            Duration::from_secs(3)
        );
        for (ttl, after) in [
            (0.0, 60.0),
            (0.5, 60.0),
            (86_401.0, 60.0),
            (f64::NAN, 60.0),
            (-1.0, 60.0),
            (10.0, 0.0),
            (10.0, 1e12),
            (10.0, f64::INFINITY),
        ] {
            let e = Terms::from_secs(ttl, after).expect_err("refused");
            assert!(e.contains("out of range") && !e.contains('\n'), "{e}");
        }
    }
}
