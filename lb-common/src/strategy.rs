//! Strategies: how a service picks a new flow's backend. The arithmetic lives here, shared by
//! the data plane and the daemon (which builds each strategy's region of the table pool and
//! answers "which backend gets this flow" the same way).
//!
//! A service's pool region holds, per strategy:
//! - Maglev: the Maglev table (backend slots), indexed by the flow hash;
//! - round robin: each member's slot once, walked by a per-CPU cursor;
//! - weighted round robin: one period of smooth weighted round robin (nginx's), walked by the
//!   same cursor;
//! - least connections, power of two choices: one pool element (`MEMBER_STRIDE` slots) per
//!   member: slot, effective weight, connection cap (low half, high half), compared on the
//!   active-flow counts (see `member_words`).
//!
//! Pool entries are 16 bits (`maps::POOL_LANES` to an element); a region starts at an element.

pub const STRATEGY_MAGLEV: u32 = 0;
pub const STRATEGY_ROUND_ROBIN: u32 = 1;
pub const STRATEGY_WEIGHTED_ROUND_ROBIN: u32 = 2;
pub const STRATEGY_LEAST_CONNECTIONS: u32 = 3;
pub const STRATEGY_POWER_OF_TWO: u32 = 4;
/// Geographic: the client's region (`geo`) names the service value, and so the Maglev table,
/// that serves it; no region known, this value's own table (the default region's).
pub const STRATEGY_GEO: u32 = 5;

/// Pool slots per member in a counting strategy's region: one element (see `member_words`).
pub const MEMBER_STRIDE: u32 = crate::maps::POOL_LANES;

/// A counting strategy's member as its pool element: backend slot, effective weight (held at
/// 65535: only ratios of weights matter, and configured weights stop at 10,000), connection
/// cap (0: none) in two halves.
pub const fn member_words(slot: u16, weight: u32, cap: u32) -> [u16; 4] {
    let weight = if weight > u16::MAX as u32 {
        u16::MAX
    } else {
        weight as u16
    };
    [slot, weight, cap as u16, (cap >> 16) as u16]
}

/// A member element's (slot, weight, cap), as `member_words` wrote them.
#[inline(always)]
pub const fn member_of(words: &[u16; 4]) -> (u32, u32, u32) {
    (
        words[0] as u32,
        words[1] as u32,
        words[2] as u32 | (words[3] as u32) << 16,
    )
}

/// Least connections compares every member up to this many; above, it compares this many
/// members from a hash-chosen start (a window of the list, not the whole list).
pub const LC_SCAN: u32 = 32;

/// Whether a strategy's region holds `MEMBER_STRIDE` words per member.
pub const fn counts(strategy: u32) -> bool {
    strategy == STRATEGY_LEAST_CONNECTIONS || strategy == STRATEGY_POWER_OF_TWO
}

/// Words per member in a strategy's region: MEMBER_STRIDE for the counting strategies, else
/// one backend slot per entry.
pub const fn stride(strategy: u32) -> u32 {
    if counts(strategy) { MEMBER_STRIDE } else { 1 }
}

/// Which of `n` members a counting strategy compares for a flow of hash `hash`: `loops`
/// members, the i-th being `(first + i * step) % n`. Least connections: every member up to
/// LC_SCAN, from the hash's; power of two choices: the two members `two_choices` names. None
/// of none (and no division by zero: the data plane has no panic path).
#[inline(always)]
pub const fn scan_plan(hash: u32, n: u32, strategy: u32) -> (u32, u32, u32) {
    if n == 0 {
        (0, 1, 0)
    } else if strategy == STRATEGY_POWER_OF_TWO && n > 1 {
        let (a, b) = two_choices(hash, n);
        // The second candidate as the first plus a distance, so one formula walks both.
        (a, if b > a { b - a } else { b + n - a }, 2)
    } else if n < LC_SCAN {
        (hash % n, 1, n)
    } else {
        (hash % n, 1, LC_SCAN)
    }
}

/// The i-th member `scan_plan` names (0 when there are none).
#[inline(always)]
pub const fn scan_member(first: u32, step: u32, i: u32, n: u32) -> u32 {
    match (first as u64 + i as u64 * step as u64).checked_rem(n as u64) {
        Some(m) => m as u32,
        None => 0,
    }
}

/// Whether a strategy walks its region with the per-CPU cursor.
pub const fn cursor(strategy: u32) -> bool {
    strategy == STRATEGY_ROUND_ROBIN || strategy == STRATEGY_WEIGHTED_ROUND_ROBIN
}

/// Whether a member with `active` flows and effective weight `weight` is less loaded than one
/// with `other_active` and `other_weight`: active / weight is lower (compared as products, no
/// division), ties going to the higher weight.
#[inline(always)]
pub const fn less_loaded(active: u64, weight: u32, other_active: u64, other_weight: u32) -> bool {
    // Counts clamped to u32 so the products fit in u64 (the BPF target has no 128-bit multiply).
    let a = min32(active) * other_weight as u64;
    let b = min32(other_active) * weight as u64;
    a < b || (a == b && weight > other_weight)
}

#[inline(always)]
const fn min32(x: u64) -> u64 {
    if x > u32::MAX as u64 { u32::MAX as u64 } else { x }
}

/// Whether a member may take one more flow under its cap (0: no cap).
#[inline(always)]
pub const fn under_cap(active: u64, cap: u32) -> bool {
    cap == 0 || active < cap as u64
}

/// A second hash of a flow, independent of the first in its low bits: power of two choices'
/// other candidate. (MurmurHash3's fmix32 of the first, with a constant folded in.)
#[inline(always)]
pub const fn second_hash(h: u32) -> u32 {
    let mut x = h ^ 0x85eb_ca6b;
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// Power of two choices' two member indices among `n` (n ≥ 2): distinct.
#[inline(always)]
pub const fn two_choices(hash: u32, n: u32) -> (u32, u32) {
    let a = hash % n;
    let b = (a + 1 + second_hash(hash) % (n - 1)) % n;
    (a, b)
}

/// Smooth weighted round robin (nginx's): fills `out` with one period of member indices, in
/// the interleaved order that sends no burst to one member, and returns its length (the sum of
/// the weights, at most `out.len()`). `current` is scratch, one entry per member. A member of
/// weight 0 never appears.
pub fn smooth_wrr(weights: &[u32], current: &mut [i64], out: &mut [u32]) -> usize {
    let total: u64 = weights.iter().map(|&w| w as u64).sum();
    let len = (total as usize).min(out.len());
    for c in current.iter_mut() {
        *c = 0;
    }
    for o in out.iter_mut().take(len) {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            current[i] += w as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        *o = best as u32;
    }
    len
}

/// Weights scaled so they sum to at most `max_period` (each non-zero weight stays at least 1):
/// the period smooth weighted round robin is built over. Divides by their greatest common
/// divisor first, which keeps the ratios exact.
pub fn wrr_weights(weights: &mut [u32], max_period: u32) {
    let g = weights.iter().fold(0u32, |g, &w| gcd(g, w));
    if g > 1 {
        for w in weights.iter_mut() {
            *w /= g;
        }
    }
    let total: u64 = weights.iter().map(|&w| w as u64).sum();
    if total > max_period as u64 {
        let nonzero = weights.iter().filter(|&&w| w > 0).count() as u64;
        // Room left once every member has its floor of 1.
        let room = (max_period as u64).saturating_sub(nonzero);
        for w in weights.iter_mut() {
            if *w > 0 {
                *w = 1 + ((*w as u64 - 1) * room / total) as u32;
            }
        }
    }
}

const fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_elements_round_trip() {
        for (slot, weight, cap) in [
            (0u16, 0u32, 0u32),
            (16383, 10_000, 1_000_000_000),
            (7, 1, u32::MAX),
        ] {
            assert_eq!(
                member_of(&member_words(slot, weight, cap)),
                (slot as u32, weight, cap)
            );
        }
        // Weights above 16 bits are held at the top, not wrapped.
        assert_eq!(member_of(&member_words(1, 70_000, 5)).1, 65_535);
    }

    #[test]
    fn smooth_wrr_interleaves_as_nginx_does() {
        // nginx's example: weights 5, 1, 1 give a a b a c a a.
        let mut cur = [0i64; 3];
        let mut out = [0u32; 7];
        assert_eq!(smooth_wrr(&[5, 1, 1], &mut cur, &mut out), 7);
        assert_eq!(out, [0, 0, 1, 0, 2, 0, 0]);
        // Shares are exact over one period, and no weight-0 member appears.
        let mut cur = [0i64; 4];
        let mut out = [0u32; 100];
        let n = smooth_wrr(&[3, 0, 2, 5], &mut cur, &mut out);
        assert_eq!(n, 10);
        let count = |m| out[..n].iter().filter(|&&i| i == m).count();
        assert_eq!((count(0), count(1), count(2), count(3)), (3, 0, 2, 5));
        // No two picks of the weight-5 member in a row more than its share asks.
        assert!(!out[..n].windows(3).any(|w| w == [3, 3, 3]));
    }

    #[test]
    fn wrr_weights_keep_ratios_within_a_period() {
        let mut w = [100, 200, 300];
        wrr_weights(&mut w, 1000);
        assert_eq!(w, [1, 2, 3]);
        let mut w = [1000, 1, 7919, 0];
        wrr_weights(&mut w, 100);
        assert!(w.iter().map(|&x| x as u64).sum::<u64>() <= 100, "{w:?}");
        assert_eq!((w[1], w[3]), (1, 0));
        assert!(w[2] > 7 * w[0] && w[2] < 9 * w[0], "{w:?}");
    }

    #[test]
    fn less_loaded_compares_per_weight_and_breaks_ties_by_weight() {
        assert!(less_loaded(1, 1, 3, 2)); // 1 < 1.5
        assert!(!less_loaded(4, 2, 3, 2));
        assert!(less_loaded(2, 2, 1, 1)); // equal, heavier wins
        assert!(!less_loaded(1, 1, 2, 2));
        assert!(under_cap(9, 10) && !under_cap(10, 10) && under_cap(u64::MAX, 0));
    }

    #[test]
    fn two_choices_are_distinct_and_cover_every_pair() {
        for n in 2..20u32 {
            let mut seen = [[false; 20]; 20];
            for h in 0..20_000u32 {
                let (a, b) = two_choices(
                    crate::hash::flow_hash(&crate::FlowKey {
                        src_port: h as u16,
                        dst_port: (h >> 16) as u16,
                        ..Default::default()
                    }),
                    n,
                );
                assert!(a < n && b < n && a != b);
                seen[a as usize][b as usize] = true;
            }
            let pairs = seen.iter().flatten().filter(|&&s| s).count() as u32;
            assert_eq!(pairs, n * (n - 1), "n = {n}");
        }
    }
}
