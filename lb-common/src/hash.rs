//! The flow hash, shared so that userspace answers "which backend gets this flow" exactly as the
//! data plane does.

use crate::FlowKey;

const K: u64 = 0x9E37_79B9_7F4A_7C15;

#[inline(always)]
const fn mix(h: u64, w: u32) -> u64 {
    (h ^ w as u64).wrapping_mul(K).rotate_left(31)
}

/// Final avalanche (MurmurHash3 fmix64) so every input bit reaches the low bits used by `% M`.
#[inline(always)]
const fn fmix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// Hash of the whole 5-tuple.
#[inline(always)]
pub const fn flow_hash(k: &FlowKey) -> u32 {
    let mut h = K ^ ((k.family as u64) << 8 | k.proto as u64);
    h = mix(h, k.src_addr[0]);
    h = mix(h, k.src_addr[1]);
    h = mix(h, k.src_addr[2]);
    h = mix(h, k.src_addr[3]);
    h = mix(h, k.dst_addr[0]);
    h = mix(h, k.dst_addr[1]);
    h = mix(h, k.dst_addr[2]);
    h = mix(h, k.dst_addr[3]);
    h = mix(h, (k.src_port as u32) << 16 | k.dst_port as u32);
    fmix(h) as u32
}

/// Hash of the source address only (client affinity).
#[inline(always)]
pub const fn source_hash(k: &FlowKey) -> u32 {
    let mut h = K ^ (k.family as u64) << 8;
    h = mix(h, k.src_addr[0]);
    h = mix(h, k.src_addr[1]);
    h = mix(h, k.src_addr[2]);
    h = mix(h, k.src_addr[3]);
    fmix(h) as u32
}
