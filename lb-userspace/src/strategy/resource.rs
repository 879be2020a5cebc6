//! Resource-aware weights: a backend's own load (its agent's `N%`, and load reports pushed
//! through the API) becomes a factor on its weight. Each update (every `interval`) smooths the
//! load (EWMA), moves a backend's target factor only when it changed by more than the
//! hysteresis, and steps the applied factors towards the targets by no more than `max_move` of
//! the service's Maglev slots. Pure: the writer keeps the state and calls these.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::maglev::{MaglevBackend, build_table};

/// `[service.resource]` as written; unset keys take the defaults below.
#[derive(Clone, Copy, Debug, Default, PartialEq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourceSettings {
    /// Weight of each new sample in the smoothed load, 0 < a <= 1 (default 0.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smoothing: Option<f64>,
    /// Smallest change of a backend's target factor acted on, 0..0.5 (default 0.05).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hysteresis: Option<f64>,
    /// Most of the service's table one update may move, 0 < m <= 1 (default 0.10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_move: Option<f64>,
    /// The factor a fully loaded backend keeps, 0 < f <= 1 (default 0.05).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<f64>,
    /// Seconds between updates, 0.1..=60 (default 1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<f64>,
}

/// `ResourceSettings` with the defaults filled in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Resource {
    pub smoothing: f64,
    pub hysteresis: f64,
    pub max_move: f64,
    pub floor: f64,
    pub interval: Duration,
}

impl ResourceSettings {
    pub fn resolve(&self) -> Resource {
        Resource {
            smoothing: self.smoothing.unwrap_or(0.5),
            hysteresis: self.hysteresis.unwrap_or(0.05),
            max_move: self.max_move.unwrap_or(0.10),
            floor: self.floor.unwrap_or(0.05),
            interval: Duration::from_secs_f64(self.interval.unwrap_or(1.0).clamp(0.1, 60.0)),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let check = |key: &str, v: Option<f64>, ok: fn(f64) -> bool, range: &str| match v {
            Some(x) if !(x.is_finite() && ok(x)) => {
                Err(format!("resource.{key} = {x} is out of range {range}"))
            }
            _ => Ok(()),
        };
        check("smoothing", self.smoothing, |x| x > 0.0 && x <= 1.0, "(0, 1]")?;
        check(
            "hysteresis",
            self.hysteresis,
            |x| (0.0..0.5).contains(&x),
            "[0, 0.5)",
        )?;
        check("max_move", self.max_move, |x| x > 0.0 && x <= 1.0, "(0, 1]")?;
        check("floor", self.floor, |x| x > 0.0 && x <= 1.0, "(0, 1]")?;
        check(
            "interval",
            self.interval,
            |x| (0.1..=60.0).contains(&x),
            "[0.1, 60] s",
        )
    }
}

/// Most connections a report may name.
pub const MAX_REPORTED_CONNECTIONS: u64 = 1_000_000_000;
/// Longest a report holds.
pub const MAX_REPORT_TTL: Duration = Duration::from_secs(3600);
/// How long a report holds when it names no TTL.
pub const DEFAULT_REPORT_TTL: Duration = Duration::from_secs(30);

/// What a backend says of its own load (`lb backend load`, `PUT .../load`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadReport {
    /// CPU in use, 0..1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    /// Memory in use, 0..1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<f64>,
    /// Open connections; a load of connections ÷ the backend's `maxconn` when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u64>,
}

impl LoadReport {
    pub fn validate(&self) -> Result<(), String> {
        for (key, v) in [("cpu", self.cpu), ("memory", self.memory)] {
            if let Some(x) = v
                && !(x.is_finite() && (0.0..=1.0).contains(&x))
            {
                return Err(format!("{key} {x} is out of range 0..=1"));
            }
        }
        if let Some(c) = self.connections
            && c > MAX_REPORTED_CONNECTIONS
        {
            return Err(format!(
                "connections {c} is out of range 0..={MAX_REPORTED_CONNECTIONS}"
            ));
        }
        if self.cpu.is_none() && self.memory.is_none() && self.connections.is_none() {
            return Err("a load report needs cpu, memory or connections".into());
        }
        Ok(())
    }

    /// Its load, 0..1: the highest of its parts (connections count only against a cap).
    pub fn load(&self, maxconn: u32) -> Option<f64> {
        let conns = match (self.connections, maxconn) {
            (Some(c), m) if m > 0 => Some((c as f64 / f64::from(m)).min(1.0)),
            _ => None,
        };
        [self.cpu, self.memory, conns]
            .into_iter()
            .flatten()
            .reduce(f64::max)
    }
}

/// A backend's load as the controller keeps it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoadState {
    /// The last report, and when it expires.
    pub report: Option<(LoadReport, Instant)>,
    /// The smoothed load, 0..1.
    pub smoothed: f64,
    /// The factor it moves towards, and the one in the tables.
    pub target: f64,
    pub factor: f64,
}

impl Default for LoadState {
    fn default() -> Self {
        Self {
            report: None,
            smoothed: 0.0,
            target: 1.0,
            factor: 1.0,
        }
    }
}

impl LoadState {
    /// Nothing to do: no signal, and the weight is the configured one.
    pub fn settled(&self) -> bool {
        self.report.is_none() && self.smoothed == 0.0 && self.factor == 1.0 && self.target == 1.0
    }

    /// One update's smoothing and target, from this update's sample (`None`: no signal,
    /// which counts as no load, so an expired report lets the weight come back).
    pub fn observe(&mut self, sample: Option<f64>, r: &Resource) {
        let x = sample.unwrap_or(0.0).clamp(0.0, 1.0);
        self.smoothed += r.smoothing * (x - self.smoothed);
        if sample.is_none() && self.smoothed < 0.01 {
            self.smoothed = 0.0;
        }
        let want = (1.0 - self.smoothed).clamp(r.floor, 1.0);
        // Small moves wait until they add up; the ends are always reached.
        if (want - self.target).abs() >= r.hysteresis.max(1e-9) || (want == 1.0 && self.smoothed == 0.0) {
            self.target = want;
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

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
