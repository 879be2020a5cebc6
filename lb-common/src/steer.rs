//! Checks through the data path (`through = "vip"`): a check socket's mark names the backend
//! slot; the check device's egress program writes that slot into the frame's source MAC,
//! and the steering XDP program on the device's peer forwards the frame to exactly that backend,
//! in its service's mode, as client traffic is.

/// The MAC of both ends of the check device pair: a packet sent by the first (which resolves no
/// neighbours, so it addresses its frames to its own MAC) is addressed to the second.
pub const DEVICE_MAC: [u8; 6] = [0x02, 0x4c, 0x42, 0x00, 0x00, 0x01];

/// Marks of check sockets: `MARK_BASE | slot`. Policy routing sends these (and only these) to
/// the check device.
pub const MARK_BASE: u32 = 0x4c42_0000;
pub const MARK_MASK: u32 = 0xffff_0000;
/// The routing table that holds the check device's default routes, and its rules' priority.
pub const ROUTE_TABLE: u32 = 0x4c42;
pub const RULE_PRIORITY: u32 = 100;

/// The first two bytes of a steered frame's source MAC (locally administered); the next four
/// are the slot, big-endian. The destination MAC stays the peer's own, so a frame the steering
/// program passes to the kernel (a next hop to resolve) is taken as addressed to this host.
pub const MAC_TAG: [u8; 2] = [0x02, 0x4c];

/// A check socket's mark for the backend in `slot`, if the slot fits.
pub const fn mark(slot: u32) -> Option<u32> {
    if slot > !MARK_MASK {
        return None;
    }
    Some(MARK_BASE | slot)
}

/// The slot a mark names, if it is a check socket's.
pub const fn slot_of_mark(mark: u32) -> Option<u32> {
    if mark & MARK_MASK != MARK_BASE {
        return None;
    }
    Some(mark & !MARK_MASK)
}

/// The source MAC that carries `slot` from the egress program to the steering program.
pub const fn mac(slot: u32) -> [u8; 6] {
    let s = slot.to_be_bytes();
    [MAC_TAG[0], MAC_TAG[1], s[0], s[1], s[2], s[3]]
}

/// The slot a steered frame's source MAC carries.
pub const fn slot_of_mac(mac: &[u8; 6]) -> Option<u32> {
    if mac[0] != MAC_TAG[0] || mac[1] != MAC_TAG[1] {
        return None;
    }
    Some(u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_and_macs_carry_the_slot_and_nothing_else() {
        for slot in [0, 1, 7, 16383, 0xffff] {
            let m = mark(slot).unwrap();
            assert_eq!(slot_of_mark(m), Some(slot));
            assert_eq!(slot_of_mac(&mac(slot)), Some(slot));
        }
        assert_eq!(mark(0x1_0000), None);
        assert_eq!(slot_of_mark(0), None);
        assert_eq!(slot_of_mark(0x4c43_0001), None);
        assert_eq!(slot_of_mac(&[0x02, 0, 0, 0, 0, 1]), None);
    }
}
