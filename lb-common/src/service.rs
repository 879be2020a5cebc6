//! Service (VIP) key and value.

/// (VIP, port, protocol). Port 0 is the wildcard for all ports of the address.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);

impl ServiceKey {
    pub const fn new(family: u8, proto: u8, addr: [u8; 16], port_be: u16) -> Self {
        Self {
            addr,
            port: port_be,
            proto,
            family,
        }
    }
}

/// Hash only the source address (client affinity) instead of the 5-tuple.
pub const SVC_F_HASH_SOURCE: u32 = 1;

/// Forwarding modes. Only L2 DSR exists today; the value selects the forwarding seam.
pub const FWD_DSR_L2: u32 = 0;

#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// Index into the per-service stats map.
    pub id: u32,
    /// `SVC_F_*` bits.
    pub flags: u32,
    /// Start of the active Maglev table in `MAGLEV_POOL`.
    pub table_offset: u32,
    /// Size of the active table (prime); 0 means the service has no usable backend.
    pub table_size: u32,
    /// `FWD_*` mode.
    pub forward: u32,
    pub _reserved: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 24);
