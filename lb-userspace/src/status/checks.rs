//! What the health monitor publishes for readers (`lb health`, metrics): one check's outcome
//! (also what the probes, the passive signals and the tracker pass each other), and each
//! checked backend's check and agent views on the board.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use serde::Serialize;

use super::signals::{AgentState, BreakerState, HealthState};
use crate::model::BackendRef;

/// What one check saw.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Outcome {
    pub ok: bool,
    pub latency: Duration,
    /// One line: what passed or what failed ("connect: connection refused", "status 503").
    pub detail: String,
}

/// What `lb health` shows of one backend's active checks.
#[derive(Clone, Debug, Serialize)]
pub struct CheckView {
    pub kind: &'static str,
    pub target: std::net::SocketAddr,
    pub state: HealthState,
    pub score: f64,
    /// Unix milliseconds of the last state change (or of the check's start).
    pub since_ms: u64,
    /// State changes since the check started (0: `since_ms` is its start, not a change).
    pub transitions: u64,
    pub reason: String,
    pub last: Option<Outcome>,
    pub consecutive_ok: u32,
    pub consecutive_failed: u32,
    pub checks: u64,
    pub failed: u64,
    /// `None`: no breaker configured.
    pub breaker: Option<BreakerState>,
    /// Failures the passive signals (client SYN retransmits) have recorded.
    pub passive_failures: u64,
}

/// What `lb health` shows of one backend's agent.
#[derive(Clone, Debug, Serialize)]
pub struct AgentView {
    pub target: std::net::SocketAddr,
    pub state: AgentState,
    /// The last line the agent sent, or why there was none.
    pub last: Option<String>,
    pub asked: u64,
    pub unreachable: u64,
    pub malformed: u64,
}

/// The checks' and agents' state of every checked backend, for readers.
#[derive(Default)]
pub struct Views {
    pub checks: BTreeMap<BackendRef, CheckView>,
    pub agents: BTreeMap<BackendRef, AgentView>,
}

pub type Board = Arc<RwLock<Views>>;
