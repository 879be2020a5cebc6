//! The signals producers publish about a backend or a service: its health (the monitor), its
//! agent's word, its breaker, an adaptive service's pick. Values only: the machinery that
//! produces them (`health`, `strategy`) imports these, never the other way round.

use std::time::Instant;

use serde::Serialize;

use crate::model::{MAX_WEIGHT, Strategy};

/// Published scores move in steps of this much (`health::tracker`).
pub const STEP: f64 = 0.1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
/// A backend's health as its checks (or agent) judge it.
pub enum HealthState {
    Up,
    Down,
}

/// A score on the published grid of `STEP`s.
pub fn quantize(score: f64) -> f64 {
    ((score / STEP).round() * STEP).clamp(0.0, 1.0)
}

/// Largest share of its configured weight the agent can give a backend, in percent.
pub const MAX_PERCENT: u32 = 256;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AgentState {
    /// Set by `down`, `fail` or `stopped`, with the reason given.
    pub down: Option<String>,
    pub drain: bool,
    pub maint: bool,
    pub weight: Option<AgentWeight>,
    /// Stored and shown; concurrency limits use it.
    pub maxconn: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentWeight {
    /// Percent of the configured weight.
    Percent(u32),
    Absolute(u32),
}

impl AgentState {
    /// Takes no new flows (down, drained or in maintenance).
    pub fn excluded(&self) -> bool {
        self.down.is_some() || self.drain || self.maint
    }

    /// Pinned flows stay (drain) or go (down, maintenance).
    pub fn keeps_pinned_flows(&self) -> bool {
        self.down.is_none() && !self.maint
    }

    /// The agent's `N%`, if that is how it last gave its weight (resource-aware services read
    /// it as load).
    pub fn percent(&self) -> Option<u32> {
        match self.weight {
            Some(AgentWeight::Percent(p)) => Some(p),
            _ => None,
        }
    }

    /// The weight the agent asks for, from the configured one, at most `MAX_PERCENT` of it.
    pub fn weight(&self, configured: u32) -> u32 {
        self.weight_within(configured, false)
    }

    /// As `weight`; with `absolute` (`agent_absolute_weights = true`), `weight:N` is taken as
    /// it is, beyond `MAX_PERCENT` of the configured weight.
    pub fn weight_within(&self, configured: u32, absolute: bool) -> u32 {
        let percent =
            |p: u32| ((u64::from(configured) * u64::from(p) + 50) / 100).min(u64::from(MAX_WEIGHT)) as u32;
        match self.weight {
            None => configured,
            Some(AgentWeight::Percent(p)) => percent(p),
            Some(AgentWeight::Absolute(w)) if absolute => w,
            Some(AgentWeight::Absolute(w)) => w.min(percent(MAX_PERCENT)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// The strategy in effect of an adaptive service, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct AdaptiveState {
    pub current: Strategy,
    pub reason: String,
    pub since: Instant,
    pub switches: u64,
}

impl AdaptiveState {
    pub fn new(now: Instant) -> Self {
        Self {
            current: Strategy::Maglev,
            reason: "start: calm until measured".into(),
            since: now,
            switches: 0,
        }
    }
}
