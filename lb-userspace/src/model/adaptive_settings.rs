//! `[service.adaptive]`: the keys as written and their resolved values. Apart from the
//! decision (`adaptive`), so the model can hold them without importing the strategy.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[service.adaptive]` as written; unset keys take the defaults below.
#[derive(Clone, Copy, Debug, Default, PartialEq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveSettings {
    /// Least seconds between two switches (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dwell: Option<f64>,
    /// The busiest backend's active flows over its weight's share that switch to
    /// least-connections (default 1.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imbalance: Option<f64>,
    /// Imbalance under which the service is calm again (default 1.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calm: Option<f64>,
    /// Fewest active flows for an imbalance to count (default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_flows: Option<u64>,
    /// Seconds between looks, 0.1..=60 (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adaptive {
    pub dwell: Duration,
    pub imbalance: f64,
    pub calm: f64,
    pub min_flows: u64,
    pub interval: Duration,
}

impl AdaptiveSettings {
    pub fn resolve(&self) -> Adaptive {
        Adaptive {
            dwell: Duration::from_secs_f64(self.dwell.unwrap_or(30.0).clamp(0.0, 86_400.0)),
            imbalance: self.imbalance.unwrap_or(1.5),
            calm: self.calm.unwrap_or(1.2),
            min_flows: self.min_flows.unwrap_or(20),
            interval: Duration::from_secs_f64(self.interval.unwrap_or(1.0).clamp(0.1, 60.0)),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if let Some(d) = self.dwell
            && !(d.is_finite() && (0.0..=86_400.0).contains(&d))
        {
            return Err(format!("adaptive.dwell = {d} is out of range [0, 86400] s"));
        }
        if let Some(i) = self.interval
            && !(i.is_finite() && (0.1..=60.0).contains(&i))
        {
            return Err(format!("adaptive.interval = {i} is out of range [0.1, 60] s"));
        }
        let a = self.resolve();
        if !(a.imbalance.is_finite() && a.calm.is_finite() && a.calm >= 1.0 && a.imbalance > a.calm) {
            return Err(format!(
                "adaptive: need 1 <= calm < imbalance (calm = {}, imbalance = {})",
                a.calm, a.imbalance
            ));
        }
        if a.min_flows > 1_000_000_000 {
            return Err(format!(
                "adaptive.min_flows = {} is out of range 0..=1000000000",
                a.min_flows
            ));
        }
        Ok(())
    }
}
