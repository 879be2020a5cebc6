//! Service (VIP) key and value.

/// (VIP, port, protocol). Port 0 is the wildcard for all ports of the address.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    /// Address bytes as 32-bit words, like `FlowKey`'s.
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);

impl ServiceKey {
    pub const fn new(family: u8, proto: u8, addr: [u8; 16], port_be: u16) -> Self {
        Self::from_words(family, proto, crate::addr_words(addr), port_be)
    }

    #[inline(always)]
    pub const fn from_words(family: u8, proto: u8, addr: [u32; 4], port_be: u16) -> Self {
        Self {
            addr,
            port: port_be,
            proto,
            family,
        }
    }

    /// The address as bytes.
    pub const fn addr_bytes(&self) -> [u8; 16] {
        crate::addr_bytes(self.addr)
    }
}

/// Hash only the source address (client affinity) instead of the 5-tuple.
pub const SVC_F_HASH_SOURCE: u32 = 1;
/// A new flow over its backend's limit is dropped, not spilled to the next candidate.
pub const SVC_F_SHED_DROP: u32 = 2;
/// Some backend of the service (or the service) has a new-flow limit: check the buckets.
pub const SVC_F_SHED: u32 = 4;
/// Count each backend's active flows even though the strategy does not pick by them (adaptive
/// services measure imbalance with them).
pub const SVC_F_COUNT: u32 = 8;

/// Forwarding modes; the value selects the forwarding seam.
/// L2 direct server return: rewrite MACs only; backends share the balancer's segment.
pub const FWD_DSR_L2: u32 = 0;
/// IPIP: wrap the packet in an outer IPv4 (IPv6) header to the backend, routed by the kernel's
/// FIB; the backend strips it and answers the client directly.
pub const FWD_IPIP: u32 = 1;
/// GUE: as IPIP, inside UDP to the configured port (for networks that filter IP protocols 4 and
/// 41); the UDP source port varies per flow.
pub const FWD_GUE: u32 = 2;
/// NAT: rewrite the destination to the backend's address and port; replies come back through
/// the balancer (the backend routes the client's network via it) and are rewritten back.
pub const FWD_NAT: u32 = 3;
/// As `FWD_NAT`, and the source is rewritten to the balancer's NAT address and a port from its
/// range, so replies come back whatever the backend's routing (full NAT).
pub const FWD_SNAT: u32 = 4;

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
    /// `strategy::STRATEGY_*`: what the region at `table_offset` holds and how a new flow picks.
    pub strategy: u32,
    /// The Maglev table before the last swap (size 0: none, or not Maglev): second chance.
    /// A TCP segment of a flow the connection table does not know goes to that table's owner
    /// of its hash when it is still live and differs from the current one.
    pub prev_offset: u32,
    pub prev_size: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 32);

/// A bitmap over VIP addresses, checked before any hash lookup so that traffic to addresses that
/// are no VIP (most of what reaches an edge host) passes after one array read. A set bit means
/// "maybe a VIP" (collisions just cost the lookups); a clear bit means certainly not.
/// `wildcard` marks addresses that may have an all-ports (port 0) service, so a miss on the exact
/// port only tries the wildcard when one may exist.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct VipFilter {
    pub any: [u64; VIP_FILTER_WORDS],
    pub wildcard: [u64; VIP_FILTER_WORDS],
    /// Addresses NAT entries may be keyed by: VIPs of NAT services (destination of requests)
    /// and their backends (source of replies). Only these packets look in the NAT table.
    pub nat: [u64; VIP_FILTER_WORDS],
    /// Non-zero when any NAT service exists: other traffic skips the NAT bits altogether.
    pub nat_in_use: u64,
}
pub const VIP_FILTER_WORDS: usize = 64;
const _: () = assert!(core::mem::size_of::<VipFilter>() == 24 * VIP_FILTER_WORDS + 8);

impl VipFilter {
    pub const EMPTY: Self = Self {
        any: [0; VIP_FILTER_WORDS],
        wildcard: [0; VIP_FILTER_WORDS],
        nat: [0; VIP_FILTER_WORDS],
        nat_in_use: 0,
    };

    /// The bit for an address: a multiplicative hash of its words, top 12 bits.
    #[inline(always)]
    pub const fn bit(addr: &[u32; 4]) -> usize {
        ((addr[0] ^ addr[1] ^ addr[2] ^ addr[3]).wrapping_mul(0x9E37_79B1) >> 20) as usize
    }

    #[inline(always)]
    pub const fn may_be_vip(&self, bit: usize) -> bool {
        self.any[(bit >> 6) & (VIP_FILTER_WORDS - 1)] & (1 << (bit & 63)) != 0
    }

    #[inline(always)]
    pub const fn may_have_wildcard(&self, bit: usize) -> bool {
        self.wildcard[(bit >> 6) & (VIP_FILTER_WORDS - 1)] & (1 << (bit & 63)) != 0
    }

    #[inline(always)]
    pub const fn nat_in_use(&self) -> bool {
        self.nat_in_use != 0
    }

    #[inline(always)]
    pub const fn may_be_nat(&self, bit: usize) -> bool {
        self.nat[(bit >> 6) & (VIP_FILTER_WORDS - 1)] & (1 << (bit & 63)) != 0
    }

    /// Whether a packet from `src` to `dst` may be the balancer's: to an address that may be a
    /// VIP or, while NAT services exist, from or to one that NAT entries may be keyed by. The
    /// parser asks right after the IP header, so anything else goes to the kernel unparsed.
    #[inline(always)]
    pub const fn may_be_ours(&self, src: &[u32; 4], dst: &[u32; 4]) -> bool {
        let bit = Self::bit(dst);
        self.may_be_vip(bit)
            || (self.nat_in_use() && (self.may_be_nat(bit) || self.may_be_nat(Self::bit(src))))
    }

    /// Marks an address that NAT entries may be keyed by (a NAT VIP or a NAT backend).
    pub fn add_nat(&mut self, addr: &[u32; 4]) {
        let bit = Self::bit(addr);
        self.nat[bit >> 6] |= 1 << (bit & 63);
        self.nat_in_use = 1;
    }

    pub fn add(&mut self, key: &ServiceKey) {
        let bit = Self::bit(&key.addr);
        self.any[bit >> 6] |= 1 << (bit & 63);
        if key.port == 0 {
            self.wildcard[bit >> 6] |= 1 << (bit & 63);
        }
    }

    pub fn union(&mut self, other: &Self) {
        for i in 0..VIP_FILTER_WORDS {
            self.any[i] |= other.any[i];
            self.wildcard[i] |= other.wildcard[i];
            self.nat[i] |= other.nat[i];
        }
        self.nat_in_use |= other.nat_in_use;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_knows_its_vips_and_wildcards() {
        let v4 = ServiceKey::new(
            4,
            6,
            [10, 100, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            80u16.to_be(),
        );
        let mut wild = v4;
        wild.addr = crate::addr_words([10, 100, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        wild.port = 0;
        let mut f = VipFilter::EMPTY;
        f.add(&v4);
        f.add(&wild);
        assert!(f.may_be_vip(VipFilter::bit(&v4.addr)));
        assert!(!f.may_have_wildcard(VipFilter::bit(&v4.addr)));
        assert!(f.may_be_vip(VipFilter::bit(&wild.addr)));
        assert!(f.may_have_wildcard(VipFilter::bit(&wild.addr)));
        // Of 1000 other addresses, only collisions pass (2 of 4096 bits are set).
        let passed = (0..1000u32)
            .filter(|i| f.may_be_vip(VipFilter::bit(&[(10 << 24 | 200 << 16 | i).to_be(), 0, 0, 0])))
            .count();
        assert!(
            passed < 10,
            "{passed} of 1000 non-VIP addresses passed the filter"
        );
        let mut g = VipFilter::EMPTY;
        g.union(&f);
        assert_eq!(f, g);
    }

    /// A packet may be ours if it goes to a VIP or, once NAT is in use, comes from or goes to a
    /// NAT address (a backend's reply goes to a client or the SNAT address, neither a VIP).
    #[test]
    fn packets_may_be_ours_by_vip_or_nat_address() {
        let word = |last: u8| [u32::from_ne_bytes([10, 0, 0, last]), 0, 0, 0];
        let (vip, backend, client, other) = (word(1), word(2), word(3), word(4));
        let mut f = VipFilter::EMPTY;
        f.add(&ServiceKey::from_words(4, 6, vip, 80u16.to_be()));
        assert!(f.may_be_ours(&client, &vip));
        assert!(
            !f.may_be_ours(&backend, &client),
            "no NAT service: replies are not ours"
        );
        assert!(!f.may_be_ours(&client, &other));
        f.add_nat(&backend);
        assert!(f.may_be_ours(&backend, &client), "a NAT backend's reply");
        assert!(f.may_be_ours(&client, &backend));
        assert!(!f.may_be_ours(&client, &other));
    }

    #[test]
    fn address_words_round_trip() {
        let b: [u8; 16] = core::array::from_fn(|i| i as u8 * 7);
        assert_eq!(crate::addr_bytes(crate::addr_words(b)), b);
        let k = ServiceKey::new(6, 17, b, 53);
        assert_eq!(k.addr_bytes(), b);
    }
}
