//! Types shared by the XDP data plane and the userspace control plane.
//!
//! Every map key and value is `#[repr(C)]`, has explicit padding fields and a compile-time size
//! assert, so the kernel and userspace agree on the layout byte for byte.
#![no_std]

pub mod backend;
pub mod bench;
pub mod flow;
pub mod hash;
pub mod maps;
pub mod service;
pub mod stats;

pub use backend::Backend;
pub use flow::{FlowKey, FlowState};
pub use service::{ServiceKey, ServiceValue};
pub use stats::{Counter, TrafficStats};

/// Address family tag used in keys (values match the IP version number).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// IP protocol numbers the balancer handles.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all these types are repr(C), Copy, have no implicit padding and accept any bit pattern.
    unsafe impl aya::Pod for crate::FlowKey {}
    unsafe impl aya::Pod for crate::FlowState {}
    unsafe impl aya::Pod for crate::ServiceKey {}
    unsafe impl aya::Pod for crate::ServiceValue {}
    unsafe impl aya::Pod for crate::Backend {}
    unsafe impl aya::Pod for crate::TrafficStats {}
    unsafe impl aya::Pod for crate::bench::BenchFrame {}
}
