//! Backend health: active checks (`probe`), their schedule (`monitor`), the state machine and
//! score of one backend (`tracker`), and the settings (`settings`). The monitor only reports;
//! the reconciler turns health into effective weights (`status`).

pub mod agent;
pub mod breaker;
pub mod monitor;
pub mod outcome;
pub mod passive;
pub mod probe;
pub mod settings;
pub mod through;
pub mod tracker;

pub use settings::{CheckSpec, HealthSettings, validate_service};
pub use tracker::State;
