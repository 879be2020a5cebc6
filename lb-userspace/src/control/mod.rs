//! The read-only answers (status, list, stats, lookup, pick, health) the API serves.

pub mod preview;
pub mod queries;
