//! NAT connection entries: one per direction of a translated connection, both in `NAT_FLOWS`,
//! keyed by the tuple a packet carries when it reaches the balancer.
//!
//! The forward entry (client -> VIP) rewrites to (client or SNAT address -> backend); the reply
//! entry (backend -> client or SNAT address) rewrites back to (VIP -> client) and remembers the
//! interface and MACs the client's packets came in with. Either entry's key follows from the
//! other's rewritten tuple turned around, so the collector finds pairs without extra state.

use crate::FlowKey;

#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct NatEntry {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the last packet, refreshed at most every
    /// `NAT_TOUCH_NS` so busy flows do not write their entry on every packet.
    pub last_seen_ns: u64,
    /// The tuple after translation. Addresses as in `FlowKey`, ports in network byte order.
    pub src_addr: [u32; 4],
    pub dst_addr: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
    /// Backend slot and its generation when the entry was made (a reused slot is never followed).
    pub backend: u32,
    pub generation: u32,
    /// Service stats id.
    pub service: u32,
    /// Reply entries: the client-facing interface and the MACs to send with.
    pub ifindex: u32,
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// `NAT_F_*`.
    pub flags: u32,
    /// Forward entries (TCP): the acknowledgement number that completes the handshake, the
    /// backend's SYN-ACK sequence number + 1 (host order). It is the high half of the 8-byte
    /// word the flag atomics work on, and they keep it.
    pub ack_expect: u32,
}
const _: () = assert!(core::mem::size_of::<NatEntry>() == 80);

/// The entry translates replies (backend -> client) rather than requests.
pub const NAT_F_REPLY: u32 = 1;
/// The connection's source is translated to the balancer's address and an allocated port.
pub const NAT_F_SNAT: u32 = 2;
/// TCP state, kept on the forward entry (the reply path sets it through the twin): the client
/// sent a FIN, the backend sent a FIN, either sent a RST. Both FINs or a RST: closing.
pub const NAT_F_FIN_CLIENT: u32 = 4;
pub const NAT_F_FIN_BACKEND: u32 = 8;
pub const NAT_F_RST: u32 = 16;
/// On both entries: a reply has passed, so the connection was answered.
pub const NAT_F_ANSWERED: u32 = 32;
/// On the forward entry: its service counts active flows (least connections, power of two,
/// adaptive), and the connection is in its backend's count now. It leaves the count once,
/// when it is closing (a RST, or a FIN each way), or when its entries are removed.
pub const NAT_F_COUNTS: u32 = 64;
pub const NAT_F_COUNTED: u32 = 128;
/// On the forward entry (TCP): the client acknowledged the backend's SYN-ACK (its ACK carried
/// `ack_expect`), so the handshake is complete. Until then a connection keeps the short SYN
/// timeout, answered or not, so clients that never complete a handshake cannot hold the table
/// or SNAT ports; a blind ACK with a guessed number does not count.
pub const NAT_F_ESTABLISHED: u32 = 256;

/// The per-source window of new NAT connections (`NAT_SOURCES`, keyed by `AddrKey`).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct SourceWindow {
    pub start_ns: u64,
    pub count: u32,
    pub _pad: u32,
}

/// The window of `DataPlaneConfig::nat_source_limit`.
pub const NAT_SOURCE_WINDOW_NS: u64 = 1_000_000_000;

/// Whether a forward entry's `flags` say its TCP connection is closing: a RST, or a FIN each
/// way. One FIN alone is a half-close, which may stay idle for long.
#[inline(always)]
pub const fn closing(flags: u32) -> bool {
    let fins = NAT_F_FIN_CLIENT | NAT_F_FIN_BACKEND;
    flags & NAT_F_RST != 0 || flags & fins == fins
}

/// Entries are refreshed at most this often.
pub const NAT_TOUCH_NS: u64 = 100_000_000;

/// Port probes per new SNAT connection before it is dropped (`drop_nat_no_port`).
pub const NAT_PORT_PROBES: u32 = 16;

impl NatEntry {
    pub const fn is_reply(&self) -> bool {
        self.flags & NAT_F_REPLY != 0
    }

    /// A forward entry's TCP handshake completed (see `NAT_F_ESTABLISHED`).
    pub const fn is_established(&self) -> bool {
        self.flags & NAT_F_ESTABLISHED != 0
    }

    /// A forward entry's TCP connection is closing: a RST, or a FIN each way. One FIN alone is
    /// a half-close, which may stay idle for long.
    pub const fn is_closing(&self) -> bool {
        closing(self.flags)
    }

    /// The key of the other direction: this entry's rewritten tuple, turned around.
    pub const fn twin_key(&self, family: u8, proto: u8) -> FlowKey {
        FlowKey::from_words(
            family,
            proto,
            self.dst_addr,
            self.src_addr,
            self.dst_port,
            self.src_port,
        )
    }
}

/// The `probe`-th candidate source port (host order) for a new SNAT connection with flow hash
/// `hash`, in `[first, first + count)`. Successive probes step by a large odd constant, so they
/// spread over the range.
#[inline(always)]
pub const fn snat_port(hash: u32, probe: u32, first: u16, count: u32) -> u16 {
    let h = hash.wrapping_add(probe.wrapping_mul(0x9E37_79B1));
    (first as u32 + h % count) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twins_point_at_each_other() {
        let fwd_key = FlowKey::from_words(4, 6, [1, 0, 0, 0], [2, 0, 0, 0], 10, 20);
        // Forward: client 1:10 -> VIP 2:20 becomes SNAT 9:99 -> backend 3:30.
        let fwd = NatEntry {
            src_addr: [9, 0, 0, 0],
            dst_addr: [3, 0, 0, 0],
            src_port: 99,
            dst_port: 30,
            ..Default::default()
        };
        let rev_key = fwd.twin_key(4, 6);
        assert_eq!(
            rev_key,
            FlowKey::from_words(4, 6, [3, 0, 0, 0], [9, 0, 0, 0], 30, 99)
        );
        let rev = NatEntry {
            src_addr: fwd_key.dst_addr,
            dst_addr: fwd_key.src_addr,
            src_port: fwd_key.dst_port,
            dst_port: fwd_key.src_port,
            flags: NAT_F_REPLY,
            ..Default::default()
        };
        assert_eq!(rev.twin_key(4, 6), fwd_key);
    }

    #[test]
    fn snat_ports_stay_in_range_and_spread() {
        let mut seen = [false; 100];
        for probe in 0..NAT_PORT_PROBES {
            let p = snat_port(12345, probe, 40000, 100);
            assert!((40000..40100).contains(&p));
            seen[(p - 40000) as usize] = true;
        }
        assert!(seen.iter().filter(|s| **s).count() >= 6, "probes collide");
        assert_eq!(snat_port(u32::MAX, 3, 65535, 1), 65535);
    }
}
