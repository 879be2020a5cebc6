//! Geographic routing: client prefix → region (an LPM trie), and per (service, region) the
//! service value whose Maglev table serves that region's clients (failover already resolved by
//! the daemon).
//!
//! One trie holds both families: its key data is the family word, then the address words as
//! `FlowKey` holds them (bytes in wire order), so an IPv4 prefix of length p is a key of
//! length 32 + p. Two tries, `GEO_A` and `GEO_B`: a reload fills the one not in use, then
//! flips `DP_F_GEO_B`, so every packet sees one whole data set.

use crate::FAMILY_V4;

/// Key data of the region tries: family word, then the address words.
pub type GeoData = [u32; 5];

/// Bits of the family word in a trie key.
pub const FAMILY_BITS: u32 = 32;

/// Most prefixes one data set may hold.
pub const MAX_GEO_PREFIXES: u32 = 1 << 20;
/// Most regions.
pub const MAX_REGIONS: u32 = 64;

/// Key data and prefix length for an address (`addr` as `FlowKey` words) and a prefix length
/// in bits of that address.
#[inline(always)]
pub const fn key(family: u8, addr: [u32; 4], prefix: u32) -> (u32, GeoData) {
    (
        FAMILY_BITS + prefix,
        [family as u32, addr[0], addr[1], addr[2], addr[3]],
    )
}

/// The longest prefix an address of `family` has.
pub const fn max_prefix(family: u8) -> u32 {
    if family == FAMILY_V4 { 32 } else { 128 }
}

/// (service id, region id) → that region's `ServiceValue`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct GeoKey {
    pub service: u32,
    pub region: u32,
}
const _: () = assert!(core::mem::size_of::<GeoKey>() == 8);
