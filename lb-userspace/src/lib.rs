//! Control plane of the XDP load balancer: config, data-plane loading and map management,
//! Maglev tables, backend next-hop resolution, the daemon and its control API.

pub mod api;
pub mod backend_host;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod error;
pub mod maglev;
pub mod nat;
pub mod neigh;
pub mod state;

/// The compiled data plane, embedded at build time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The benchmark wrapper and floor programs (`cargo xtask bench`); not used by the daemon.
pub static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench-ebpf"));

/// The backend-side decapsulator (`lb backend setup`).
pub static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap-ebpf"));
