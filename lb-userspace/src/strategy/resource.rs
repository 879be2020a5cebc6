//! Resource-aware weights: a backend's own load (its agent's `N%`, and load reports pushed
//! through the API) becomes a factor on its weight. Each update (every `interval`) smooths the
//! load (EWMA), moves a backend's target factor only when it changed by more than the
//! hysteresis, and steps the applied factors towards the targets by no more than `max_move` of
//! the service's Maglev slots. Pure: the writer keeps the state and calls these.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use log::info;

use crate::{
    maglev::{MaglevBackend, build_table},
    model::{BackendRef, Service},
    status::{AgentState, BackendStatus, load::LoadReport, maxconn},
};

/// This update's load sample of one backend: the highest of its unexpired report and its
/// agent's `N%` (read as 1 − N/100).
pub fn sample(
    report: Option<&(LoadReport, Instant)>,
    agent_percent: Option<u32>,
    maxconn: u32,
    now: Instant,
) -> Option<f64> {
    let reported = report
        .filter(|(_, exp)| *exp > now)
        .and_then(|(r, _)| r.load(maxconn));
    let agent = agent_percent.map(|p| 1.0 - (f64::from(p.min(100)) / 100.0));
    [reported, agent].into_iter().flatten().reduce(f64::max)
}

/// One backend as a step sees it.
#[derive(Clone, Copy, Debug)]
pub struct Member<'a> {
    pub id: &'a str,
    pub weight: u32,
    pub factor: f64,
    pub target: f64,
}

/// A weight with a factor applied: at least 1 while both are positive.
pub fn scaled(weight: u32, factor: f64) -> u32 {
    if weight == 0 || factor <= 0.0 {
        0
    } else {
        ((f64::from(weight) * factor).round() as u32).max(1)
    }
}

fn table(members: &[Member<'_>], t: f64, size: u32) -> Vec<u32> {
    let backends: Vec<MaglevBackend<'_>> = members
        .iter()
        .map(|m| MaglevBackend {
            id: m.id,
            weight: scaled(m.weight, m.factor + t * (m.target - m.factor)),
        })
        .collect();
    build_table(&backends, size)
}

fn moved(a: &[u32], b: &[u32]) -> f64 {
    if a.len() != b.len() || a.is_empty() {
        return 1.0;
    }
    a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / a.len() as f64
}

/// One update: the factors to apply, as far towards the targets as moves at most `max_move`
/// of the table's slots (found by bisection on real table builds), and the share moved. When
/// even the smallest step moves more (tiny tables), it takes that smallest step, so the
/// factors always get there.
pub fn bounded_step(members: &[Member<'_>], size: u32, max_move: f64) -> (Vec<f64>, f64) {
    let at = |t: f64| -> Vec<f64> {
        members
            .iter()
            .map(|m| {
                if t >= 1.0 {
                    m.target
                } else {
                    m.factor + t * (m.target - m.factor)
                }
            })
            .collect()
    };
    let current = table(members, 0.0, size);
    let full = table(members, 1.0, size);
    let share = moved(&current, &full);
    if share <= max_move {
        return (at(1.0), share);
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    let mut best = None;
    for _ in 0..12 {
        let mid = (lo + hi) / 2.0;
        let m = moved(&current, &table(members, mid, size));
        if m <= max_move {
            lo = mid;
            if m > 0.0 {
                best = Some((mid, m));
            }
        } else {
            hi = mid;
        }
    }
    let (t, m) = best.unwrap_or_else(|| (hi, moved(&current, &table(members, hi, size))));
    (at(t), m)
}

/// One service's step to take: its members as (id, weight, factor, target).
pub struct Job {
    pub service: String,
    pub size: u32,
    pub max_move: f64,
    pub members: Vec<(String, u32, f64, f64)>,
}

/// A step taken: each member's new factor, and the share of the table it moved.
pub struct Step {
    pub service: String,
    pub factors: Vec<(String, f64)>,
    pub moved: f64,
}

impl Job {
    /// Builds the tables the step compares: blocking, off the async workers.
    pub fn step(self) -> Step {
        let view: Vec<_> = self
            .members
            .iter()
            .map(|(id, w, f, t)| Member {
                id,
                weight: *w,
                factor: *f,
                target: *t,
            })
            .collect();
        let (factors, moved) = bounded_step(&view, self.size, self.max_move);
        Step {
            factors: self.members.into_iter().map(|m| m.0).zip(factors).collect(),
            service: self.service,
            moved,
        }
    }
}

/// One update's observation of the services running resource-aware weights: expires old
/// reports, smooths each backend's load and moves its target. Returns the services whose
/// factors must step, and how soon the next update is due (`None`: all settled, so idle).
pub fn observe<'a>(
    services: impl Iterator<Item = &'a Service>,
    status: &mut BTreeMap<BackendRef, BackendStatus>,
    now: Instant,
) -> (Vec<Job>, Option<Duration>) {
    let mut jobs = Vec::new();
    let mut next: Option<Duration> = None;
    for s in services {
        let r = s.resource.unwrap_or_default().resolve();
        let mut members = Vec::new();
        for b in &s.backends {
            let st = status.entry(BackendRef::new(&s.name, &b.id)).or_default();
            if st.load.report.is_some_and(|(_, exp)| exp <= now) {
                info!("backend {}/{}: load report expired", s.name, b.id);
                st.load.report = None;
            }
            let agent = st.agent.as_ref().and_then(AgentState::percent);
            let x = sample(st.load.report.as_ref(), agent, maxconn(b, st.agent.as_ref()), now);
            st.load.observe(x, &r);
            members.push((b.id.clone(), b.weight, st.load.factor, st.load.target));
        }
        let busy = s.backends.iter().any(|b| {
            status
                .get(&BackendRef::new(&s.name, &b.id))
                .is_some_and(|st| !st.load.settled())
        });
        if busy {
            next = Some(next.map_or(r.interval, |n| n.min(r.interval)));
        }
        if members.iter().any(|m| m.2 != m.3) {
            jobs.push(Job {
                service: s.name.clone(),
                size: s.table_size,
                max_move: r.max_move,
                members,
            });
        }
    }
    (jobs, next)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        model::resource_settings::{Resource, ResourceSettings},
        status::load::LoadState,
    };

    fn r() -> Resource {
        ResourceSettings::default().resolve()
    }

    #[test]
    fn reports_are_validated() {
        assert!(
            LoadReport {
                cpu: Some(0.9),
                ..Default::default()
            }
            .validate()
            .is_ok()
        );
        for (bad, msg) in [
            (
                LoadReport {
                    cpu: Some(1.5),
                    ..Default::default()
                },
                "cpu 1.5 is out of range",
            ),
            (
                LoadReport {
                    memory: Some(f64::NAN),
                    ..Default::default()
                },
                "memory NaN",
            ),
            (
                LoadReport {
                    connections: Some(u64::MAX),
                    ..Default::default()
                },
                "connections",
            ),
            (LoadReport::default(), "needs cpu, memory or connections"),
        ] {
            let e = bad.validate().unwrap_err();
            assert!(e.contains(msg), "{e}");
        }
        assert!(
            ResourceSettings {
                max_move: Some(0.0),
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            ResourceSettings {
                smoothing: Some(1.0),
                ..Default::default()
            }
            .validate()
            .is_ok()
        );
    }

    #[test]
    fn load_is_the_highest_signal() {
        let now = Instant::now();
        let rep = (
            LoadReport {
                cpu: Some(0.3),
                memory: Some(0.6),
                connections: Some(50),
            },
            now + Duration::from_secs(5),
        );
        assert_eq!(rep.0.load(0), Some(0.6));
        assert_eq!(rep.0.load(50), Some(1.0));
        assert_eq!(sample(Some(&rep), Some(10), 0, now), Some(0.9));
        assert_eq!(sample(Some(&rep), None, 0, now + Duration::from_secs(6)), None);
    }

    #[test]
    fn smoothing_and_hysteresis() {
        let r = r();
        let mut s = LoadState::default();
        s.observe(Some(0.9), &r);
        assert!((s.smoothed - 0.45).abs() < 1e-9);
        assert!((s.target - 0.55).abs() < 1e-9);
        s.observe(Some(0.9), &r);
        assert!((s.target - 0.325).abs() < 1e-9);
        // A wobble under the hysteresis moves nothing.
        let before = s.target;
        s.observe(Some(s.smoothed + 0.04), &r);
        assert_eq!(s.target, before);
        // No signal: back to 1, and settled once the factor follows.
        for _ in 0..20 {
            s.observe(None, &r);
        }
        assert_eq!((s.smoothed, s.target), (0.0, 1.0));
    }

    #[test]
    fn a_step_moves_at_most_the_bound_and_gets_there() {
        let ids = ["a", "b", "c"];
        let mut factors = [1.0, 1.0, 1.0];
        let targets = [0.1, 1.0, 1.0];
        let mut steps = 0;
        loop {
            let members: Vec<Member<'_>> = (0..3)
                .map(|i| Member {
                    id: ids[i],
                    weight: 100,
                    factor: factors[i],
                    target: targets[i],
                })
                .collect();
            let before = table(&members, 0.0, 65537);
            let (next, share) = bounded_step(&members, 65537, 0.10);
            let after_members: Vec<Member<'_>> = (0..3)
                .map(|i| Member {
                    id: ids[i],
                    weight: 100,
                    factor: next[i],
                    target: next[i],
                })
                .collect();
            let real = moved(&before, &table(&after_members, 0.0, 65537));
            assert!(real <= 0.10 + 1e-9, "step {steps} moved {real}");
            assert!((real - share).abs() < 1e-9);
            factors.copy_from_slice(&next);
            steps += 1;
            if factors == targets {
                break;
            }
            assert!(steps < 10, "no convergence: {factors:?}");
        }
        // a's share 1/3 → 0.1/2.1 moves about 29% of the slots: at least three steps.
        assert!(steps >= 3, "{steps}");
    }
}
