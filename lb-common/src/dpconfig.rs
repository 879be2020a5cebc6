//! Data-plane settings the daemon writes once at start (`DP_CONFIG`, one entry).

#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct DataPlaneConfig {
    /// Outer IPv4 source of encapsulated packets, wire order: the first two bytes are the
    /// configured prefix, the last two vary per flow so receivers spread flows over queues.
    pub encap_src4: u32,
    pub _pad: u32,
    /// Outer IPv6 source: the first 12 bytes are the prefix, the last word varies per flow.
    pub encap_src6: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<DataPlaneConfig>() == 24);

/// The per-flow part of an outer source: source port mixed with the source address, the way
/// Katran spreads flows, so no hash is needed on the packet path.
#[inline(always)]
pub const fn encap_variation(src_word0: u32, src_port: u16) -> u32 {
    let v = src_word0 ^ (src_word0 >> 16) ^ src_port as u32;
    v & 0xffff
}
