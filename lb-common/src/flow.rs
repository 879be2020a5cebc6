//! Flow key and connection-table value.

/// A flow's 5-tuple. IPv4 addresses sit in the first 4 bytes, the rest zero.
/// Ports are kept in network byte order, exactly as on the wire.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

impl FlowKey {
    /// Builds a key with padding zeroed (the kernel hashes every byte of a key).
    pub const fn new(
        family: u8,
        proto: u8,
        src_addr: [u8; 16],
        dst_addr: [u8; 16],
        src_port_be: u16,
        dst_port_be: u16,
    ) -> Self {
        Self {
            src_addr,
            dst_addr,
            src_port: src_port_be,
            dst_port: dst_port_be,
            proto,
            family,
            _pad: [0; 2],
        }
    }
}

/// Connection-table value: which backend slot a flow is pinned to. `generation` must match the
/// backend's, so a flow never follows a slot that was freed and handed to another backend.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct FlowState {
    pub backend: u32,
    pub generation: u32,
}
const _: () = assert!(core::mem::size_of::<FlowState>() == 8);
