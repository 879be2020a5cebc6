//! Control plane of the XDP load balancer. Data runs one way: config or API → `model` →
//! `status` → the writer's plan → maps → XDP → counters → metrics; imports run the same way,
//! producers (`health`, `strategy`) publishing into the value types below them.
//!
//! - `model`: services and backends as declared, and their settings (no I/O); `config` (TOML)
//!   and `api` convert to and from it.
//! - `status`: what producers publish about backends and services (health, agent, breaker,
//!   load, adaptive pick, the checks' board) and the effective weights they make.
//! - `snapshot`: what readers see after each pass: services, slots, next hops, statuses.
//! - `health`, `strategy`, `discovery`: producers: checks and their schedule; resource-aware
//!   weights, adaptive switching, geo data; the instances of services with a registry as
//!   their source (a file, DNS, etcd).
//! - `reconcile`: the one writer: its inbox, the pure change logic and plan, the map writes
//!   (`apply`), next hops, the state file (`persist`).
//! - `dataplane`: loading and pins, and the map handles (`MapWrites` for the writer,
//!   `Readers` for the rest).
//! - `metrics`, `control`, `api`, `status_page`, `serve`: readers and the endpoints that serve
//!   them (`status_page` on the metrics listener and the TCP API); `bgp`
//!   a reader too, announcing the VIPs through BIRD; `cluster` feeds the writer the tier's
//!   desired state from etcd and writes API changes back there.
//! - `daemon` wires it up; `cli` and `top` are the API's clients; `backend_host` prepares
//!   backends; `neigh` (netlink), `link` (interfaces: addresses, veth peers, ethtool
//!   statistics), `maglev`, `nat` (expiry) are leaves.

pub mod api;
pub mod backend_host;
pub mod bgp;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod discovery;
pub mod error;
pub mod failpoints;
pub mod files;
pub mod health;
pub mod link;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod nat;
pub mod neigh;
pub mod preflight;
pub mod privileges;
pub mod reconcile;
pub mod serve;
pub mod snapshot;
pub mod status;
pub mod status_page;
pub mod strategy;
pub mod top;
/// The compiled data plane, embedded at build time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// What `lb --version` says: the package version, the commit built and the data plane's object
/// (FNV-1a 64 of its bytes), so two binaries with the same version can still be told apart.
pub fn version() -> String {
    format!(
        "{} (commit {}, eBPF object {:016x})",
        env!("CARGO_PKG_VERSION"),
        env!("LB_GIT_COMMIT"),
        object_id()
    )
}

/// The data plane's object: FNV-1a 64 of its bytes. The pins record it (`dataplane::layout`):
/// a start whose object differs replaces the pinned program.
pub fn object_id() -> u64 {
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::default();
    h.write(EBPF_OBJECT);
    h.finish()
}

/// The benchmark wrapper and floor programs (`cargo xtask bench`); not used by the daemon.
pub static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench-ebpf"));

/// The backend-side decapsulator (`lb backend setup`).
pub static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap-ebpf"));
