//! Backend slot contents.

/// The backend is live: new and existing flows may use it.
pub const BACKEND_F_ACTIVE: u8 = 1;

#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    pub addr: [u8; 16],
    pub family: u8,
    pub flags: u8,
    /// Network byte order.
    pub port: u16,
    /// Bumped each time the slot is given to a new backend.
    pub generation: u32,
    /// Interface the backend is reached through (XDP_TX when it is the ingress one).
    pub ifindex: u32,
    /// The backend's MAC, resolved by the daemon from the neighbour table.
    pub dst_mac: [u8; 6],
    /// MAC of `ifindex`, the source of forwarded frames.
    pub src_mac: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<Backend>() == 40);

impl Backend {
    pub const fn is_active(&self) -> bool {
        self.flags & BACKEND_F_ACTIVE != 0
    }

    /// Whether a flow pinned to this slot at `generation` may still use it: the backend is live
    /// and the slot was not given to another one since.
    pub const fn serves(&self, generation: u32) -> bool {
        self.is_active() && self.generation == generation
    }
}
