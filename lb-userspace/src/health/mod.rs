//! Backend health, a producer: active checks (`probe`), their schedule (`monitor`), the state
//! machine and score of one backend (`tracker`), the breaker, passive signals and agents. The
//! monitor only reports (into `status` values and the writer's inbox); the writer turns health
//! into effective weights. Settings are `model::health_settings`.

pub mod agent;
pub mod breaker;
pub mod monitor;
pub mod passive;
pub mod probe;
pub mod through;
pub mod tracker;
