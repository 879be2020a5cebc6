//! The read-only answers (status, list, stats, lookup, pick, health) the API serves.

pub mod queries;
