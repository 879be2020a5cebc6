//! A backend's own load as the writer keeps it: the reports it pushes (`lb backend load`)
//! and the smoothed load and factor resource-aware weighting gives it.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::model::resource_settings::Resource;

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
