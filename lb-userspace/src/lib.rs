//! Control plane of the XDP load balancer.
//!
//! - `model`: services and backends as declared (no I/O); `config`, `api` and `state` convert
//!   to and from it.
//! - `health`: active checks, their schedule, each backend's state and score.
//! - `status`: per-backend status apart from config, and the effective weights.
//! - `reconcile`: the one writer: plan (pure), apply (maps), next hops, warnings.
//! - `dataplane`: loading, pins, map handles, the table pool.
//! - `control`: the control socket and the read-only answers; `cli` its client.
//! - `neigh` (netlink), `maglev`, `nat` (expiry), `backend_host`.

pub mod api;
pub mod backend_host;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod error;
pub mod files;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod nat;
pub mod neigh;
pub mod privileges;
pub mod reconcile;
pub mod serve;
pub mod state;
pub mod status;
pub mod strategy;
pub mod top;
/// The compiled data plane, embedded at build time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The benchmark wrapper and floor programs (`cargo xtask bench`); not used by the daemon.
pub static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench-ebpf"));

/// The backend-side decapsulator (`lb backend setup`).
pub static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap-ebpf"));
