//! What one check (or one passive judgement) saw: shared by the probes, the passive signals and
//! the tracker that takes them.

use std::time::Duration;

use serde::Serialize;

/// What one check saw.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Outcome {
    pub ok: bool,
    pub latency: Duration,
    /// One line: what passed or what failed ("connect: connection refused", "status 503").
    pub detail: String,
}
