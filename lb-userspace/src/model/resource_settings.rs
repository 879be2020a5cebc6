//! `[service.resource]`: the keys as written and their resolved values, apart from the
//! arithmetic (`strategy::resource`) so the model can hold them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

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
