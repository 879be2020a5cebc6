//! The control socket: transport and dispatch (`server`) and the read-only answers (`queries`).

pub mod queries;
pub mod server;
