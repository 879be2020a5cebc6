//! `cargo xtask bench`: data-plane cost per packet, end-to-end forwarding against nftables and
//! HAProxy, and control-plane speed. Each part returns plain records; the runner prints them and
//! writes `target/bench/results.json`.

pub mod control;
pub mod dataplane;
pub mod e2e;
pub mod report;
