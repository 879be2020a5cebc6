//! The control plane's side of the strategies that steer by measurements: resource-aware
//! weights from the backends' own load, adaptive switching, and the geo data. Their settings live in `model`. The data plane's side (round
//! robin, least connections, power of two, Maglev) is `lb-ebpf/src/select.rs` over the shared
//! arithmetic in `lb_common::strategy`.

pub mod adaptive;
pub mod geo;
pub mod resource;
