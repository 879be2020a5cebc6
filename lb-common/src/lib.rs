//! Types shared by the XDP data plane and the userspace control plane.
//!
//! Every map key and value is `#[repr(C)]`, has explicit padding fields and a compile-time size
//! assert, so the kernel and userspace agree on the layout byte for byte.
#![no_std]

pub mod backend;
pub mod bench;
pub mod dpconfig;
pub mod flow;
pub mod geo;
pub mod hash;
pub mod maps;
pub mod nat;
pub mod service;
pub mod shed;
pub mod stats;
pub mod steer;
pub mod strategy;

pub use backend::Backend;
pub use flow::{FlowKey, FlowState};
pub use nat::NatEntry;
pub use service::{ServiceKey, ServiceValue, VipFilter};
pub use stats::{Counter, TrafficStats};

/// Address family tag used in keys (values match the IP version number).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// IP protocol numbers the balancer handles.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// An address alone, as a map key (the decapsulator's local VIPs).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct AddrKey {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<AddrKey>() == 20);

impl AddrKey {
    pub const fn new(family: u8, addr: [u32; 4]) -> Self {
        Self {
            addr,
            family,
            _pad: [0; 3],
        }
    }
}

/// Address bytes (IPv4 in the first 4) as the words keys hold: each word keeps the wire bytes.
pub const fn addr_words(b: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

/// The inverse of `addr_words`.
pub const fn addr_bytes(w: [u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3],
    ]
}

/// The address words of a key (IPv4 in word 0) as an `IpAddr` of `family`.
pub fn ip_addr(family: u8, words: [u32; 4]) -> core::net::IpAddr {
    let b = addr_bytes(words);
    if family == FAMILY_V4 {
        core::net::IpAddr::from([b[0], b[1], b[2], b[3]])
    } else {
        core::net::IpAddr::from(b)
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all these types are repr(C), Copy, have no implicit padding and accept any bit pattern.
    unsafe impl aya::Pod for crate::FlowKey {}
    unsafe impl aya::Pod for crate::FlowState {}
    unsafe impl aya::Pod for crate::ServiceKey {}
    unsafe impl aya::Pod for crate::ServiceValue {}
    unsafe impl aya::Pod for crate::Backend {}
    unsafe impl aya::Pod for crate::geo::GeoKey {}
    unsafe impl aya::Pod for crate::TrafficStats {}
    unsafe impl aya::Pod for crate::shed::ShedBucket {}
    unsafe impl aya::Pod for crate::VipFilter {}
    unsafe impl aya::Pod for crate::dpconfig::DataPlaneConfig {}
    unsafe impl aya::Pod for crate::AddrKey {}
    unsafe impl aya::Pod for crate::NatEntry {}
    unsafe impl aya::Pod for crate::dpconfig::NextHop {}
    unsafe impl aya::Pod for crate::bench::BenchFrame {}
    unsafe impl aya::Pod for crate::bench::E2eHeaders {}
}
