//! Flow key and connection-table value.

/// A flow's 5-tuple. Addresses are 32-bit words holding the wire bytes (network byte order in
/// memory), so the data plane copies them with word loads; an IPv4 address is word 0, the rest
/// zero. Ports are kept in network byte order, exactly as on the wire.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src_addr: [u32; 4],
    pub dst_addr: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

impl FlowKey {
    /// Builds a key from address bytes, padding zeroed (the kernel hashes every byte of a key).
    pub const fn new(
        family: u8,
        proto: u8,
        src_addr: [u8; 16],
        dst_addr: [u8; 16],
        src_port_be: u16,
        dst_port_be: u16,
    ) -> Self {
        Self::from_words(
            family,
            proto,
            crate::addr_words(src_addr),
            crate::addr_words(dst_addr),
            src_port_be,
            dst_port_be,
        )
    }

    /// As `new`, with addresses already in words.
    #[inline(always)]
    pub const fn from_words(
        family: u8,
        proto: u8,
        src_addr: [u32; 4],
        dst_addr: [u32; 4],
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
/// It also carries what forwarding needs from the service (its stats id and mode), so a packet
/// of a known flow needs no service lookup.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct FlowState {
    pub backend: u32,
    pub generation: u32,
    pub service: u32,
    /// The service's forwarding mode (`FWD_*`), and `FLOW_COUNTED` while the flow counts in its
    /// backend's active flows.
    pub forward: u16,
    /// When the flow's SYN opened the entry, in units of 2^30 ns (about a second), wrapping:
    /// a SYN that finds its own entry this fresh is the client's retransmit.
    pub opened: u16,
    /// The test build's extra field (feature `flow-v2`, layout version 2): nothing reads it; a
    /// migration from version 1 sets it to 0.
    #[cfg(feature = "flow-v2")]
    pub extra: u32,
}

/// The layout version of `FlowState` (the value of `CONNTRACK` and `EMBRYONIC`): bumped on any
/// change of its fields' meaning or place. Version 1 is the 16-byte value; version 2 is the
/// `flow-v2` test build's, 20 bytes: version 1 and `extra` after it.
pub const FLOW_STATE_VERSION: u32 = if cfg!(feature = "flow-v2") { 2 } else { 1 };
/// `FlowState`'s size at each layout version, by version - 1.
pub const FLOW_STATE_SIZES: [usize; 2] = [16, 20];

/// `FlowState::forward` bit: the flow was counted in its backend's active flows (`ACTIVE`) and
/// no FIN or RST has taken it off yet.
pub const FLOW_COUNTED: u16 = 0x8000;

/// `FlowState::forward` bit of a pick, never stored: the SYN was its client's retransmit of a
/// flow already pinned (not a new flow, and no connection-table miss).
pub const FLOW_RETRANSMIT: u16 = 0x4000;

impl FlowState {
    /// The forwarding mode without the flag bits.
    #[inline(always)]
    pub const fn mode(&self) -> u16 {
        self.forward & !(FLOW_COUNTED | FLOW_RETRANSMIT)
    }
}

/// A SYN that finds its flow's entry pinned to the same backend within this many units of
/// `FlowState::opened` (about 3 s) is a retransmit: the backend did not answer the first one.
pub const SYN_RETRANSMIT_WINDOW: u16 = 3;

/// An embryonic entry (a flow that has sent one packet) older than this many units of
/// `FlowState::opened` (about 32 s) is removed by the daemon's census and stops counting toward
/// least connections and `maxconn`: a TCP client whose handshake has not completed by then has
/// given up or retries from scratch, and a UDP flow of one datagram is over.
pub const EMBRYONIC_TTL: u16 = 30;

/// Whether an embryonic entry opened at `opened` has outlived `EMBRYONIC_TTL` at `now` (both
/// `coarse_seconds`, wrapping).
pub const fn embryonic_expired(opened: u16, now: u16) -> bool {
    now.wrapping_sub(opened) > EMBRYONIC_TTL
}

/// `opened`'s clock from a nanosecond time.
pub const fn coarse_seconds(ns: u64) -> u16 {
    (ns >> 30) as u16
}
const _: () = assert!(core::mem::size_of::<FlowState>() == FLOW_STATE_SIZES[FLOW_STATE_VERSION as usize - 1]);
