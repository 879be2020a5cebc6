//! The one writer of the control plane and what it needs: its inbox (`inbox`), the pure
//! change logic (`change`), the file's and the run time's layers (`layers`), a discovery source's set (`discovered`) and the plan (`plan`), the map writes (`apply`), next hops (`hops`),
//! the state file (`persist`), warnings, and the adaptive strategy's sampler (`adapt`).
//! Readers work from the snapshot it publishes after each pass, and their own map handles.

pub mod adapt;
pub mod apply;
pub mod change;
pub mod discovered;
pub mod hops;
pub mod inbox;
pub mod layers;
pub mod persist;
pub mod plan;
pub mod warnings;
pub mod writer;

pub use apply::Maps;
pub use inbox::{Change, Command, HealthUpdate};
pub use writer::{Handles, Start, Writer};
