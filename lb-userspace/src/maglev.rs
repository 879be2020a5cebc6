//! Weighted Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software
//! Network Load Balancer", NSDI'16).
//!
//! The lookup table maps a flow hash (`hash % m`) to a backend. Each backend walks its own
//! pseudo-random permutation of the `m` slots, derived only from its id, and claims the first
//! free slot whenever it takes a turn. Because the permutations do not depend on the other
//! backends, adding or removing one backend moves few slots that belonged to the others.
//!
//! Weights are handled in two steps:
//! 1. Quotas: every backend is allotted exactly `floor` or `ceil` of `m * weight / total_weight`
//!    slots (largest-remainder apportionment), so shares are as exact as integers allow.
//! 2. Turn order: backend `i` takes its `k`-th turn (0-based) at virtual time `k / weight_i`,
//!    ties broken by id. This is a credit scheme: a backend of weight 2 takes two turns for each
//!    turn of a backend of weight 1, interleaved evenly. A backend's turn times depend only on
//!    its own weight, so adding or removing a backend does not reorder the others' turns.
//!    The build generates this order without a heap (see `turn_order`): the order repeats
//!    every period in which each backend takes `weight / gcd` turns, so one period is sorted
//!    and replayed. A heap of each backend's next turn, one pop per turn, is kept as the
//!    reference it is checked against.
//!
//! With equal weights this is exactly classic Maglev: round-robin over the backends (sorted by
//! id), each taking one turn per round until the table is full.
//!
//! Everything is deterministic across hosts, builds and Rust versions: the permutation comes
//! from SipHash-2-4 with fixed keys implemented here, and the iteration order comes from the
//! ids, not from the order of the input slice.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Largest accepted table size: the smallest prime above 2^24.
///
/// Bounds the memory of one table (64 MiB of `u32`) and its build time (~8 s for 1000 backends
/// on a slow core, versus milliseconds for 65537), and keeps every intermediate product in
/// `u64` (see the assertion below). Real tables are far smaller (the default is 65537).
pub const MAX_TABLE_SIZE: u32 = 16_777_259;

// Turn-order comparisons multiply a turn count (< m) by a weight (< 2^32); this keeps them in u64.
const _: () = assert!(MAX_TABLE_SIZE <= 1 << 31);

/// One backend as the table builder sees it.
///
/// `id` is the backend's stable, user-given name (e.g. "auth-1"); its permutation is derived
/// from it, so the table depends neither on insertion order nor on slot numbers. Ids should be
/// unique: two backends with the same id share one permutation and compete for the same slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaglevBackend<'a> {
    pub id: &'a str,
    pub weight: u32,
}

/// Builds a weighted Maglev lookup table of length `m`; each entry is an index into `backends`.
///
/// Backends with weight 0 get no entries and do not influence the others. Returns an empty
/// `Vec` if no backend has a positive weight, or if `m` is not a prime `<= MAX_TABLE_SIZE`
/// (a prime `m` guarantees each permutation visits every slot). Never panics.
///
/// Cost: O(m log m) slot probes (the table fills up like a coupon collector), the last
/// sqrt(m / 3) turns a search of the free slots instead (see `Fill`), plus O(m) for the turn
/// order (a counting sort of one period, replayed; see `turn_order`).
pub fn build_table(backends: &[MaglevBackend<'_>], m: u32) -> Vec<u32> {
    build(backends, m, true)
}

/// As `build_table`, probing one slot at a time every turn to the end (no two-walk dense phase,
/// no tail search) and, for unequal weights, taking the turns from a heap: the reference the
/// build is checked and benchmarked against. The same table, slot for slot.
pub fn build_table_probing(backends: &[MaglevBackend<'_>], m: u32) -> Vec<u32> {
    build(backends, m, false)
}

fn build(backends: &[MaglevBackend<'_>], m: u32, fast: bool) -> Vec<u32> {
    // `EMPTY` must not be a valid index.
    if m > MAX_TABLE_SIZE || !is_prime(m) || backends.len() >= EMPTY as usize {
        return Vec::new();
    }

    // Iterate in id order so the result does not depend on the order of `backends`.
    let mut order: Vec<usize> = (0..backends.len()).filter(|&i| backends[i].weight > 0).collect();
    if order.is_empty() {
        return Vec::new();
    }
    order.sort_by(|&a, &b| backends[a].id.cmp(backends[b].id).then(a.cmp(&b)));

    let weights: Vec<u32> = order.iter().map(|&i| backends[i].weight).collect();
    let quotas = apportion(&weights, m);

    let m64 = u64::from(m);
    let mut lanes: Vec<Lane> = order
        .iter()
        .zip(&quotas)
        .map(|(&i, &quota)| {
            let id = backends[i].id.as_bytes();
            // Offset and skip are below m, and quota at most m: all fit in u32.
            let skip = (siphash24(SKIP_KEY, id) % (m64 - 1) + 1) as u32;
            Lane {
                // `i < EMPTY` was checked above, so this is lossless.
                index: i as u32,
                pos: (siphash24(OFFSET_KEY, id) % m64) as u32,
                skip,
                back: m - skip,
                inverse: 0,
                quota: quota as u32,
            }
        })
        .collect();

    let mut fill = Fill::new(m, fast);
    // Every turn takes one slot, so the turns where each way of claiming starts are known.
    let (dense_from, tail_from) = (fill.sparse, fill.sparse + fill.dense);
    if weights.iter().all(|&w| w == weights[0]) {
        // Equal weights: every turn time is `taken / w`, so the turn order below is rounds in
        // rank order, each rank taking one turn per round until its quota is spent. The same
        // order without the heap.
        let rounds = lanes.iter().map(|l| l.quota).max().unwrap_or(0);
        // The rounds every lane takes part in run without the quota test.
        let full = lanes.iter().map(|l| l.quota).min().unwrap_or(0);
        // Rounds that lie wholly in one phase call its probe directly.
        let n = lanes.len() as u32;
        let mut turn = 0;
        for _ in 0..full {
            if turn + n <= dense_from {
                lanes.iter_mut().for_each(|l| fill.probe(l));
                fill.sparse -= n;
            } else if turn >= dense_from && turn + n <= tail_from {
                lanes.iter_mut().for_each(|l| fill.probe_dense(l));
                fill.dense -= n;
            } else {
                lanes.iter_mut().for_each(|l| fill.claim(l));
            }
            turn += n;
        }
        for round in full..rounds {
            for lane in lanes.iter_mut().filter(|l| l.quota > round) {
                fill.claim(lane);
            }
        }
        return fill.table;
    }
    if fast {
        // Unequal weights: the same turn order, a chunk of it at a time (`turn_order`), each
        // chunk's turns run through the phase probes directly where they lie wholly in one phase.
        let mut turn = 0;
        turn_order(&weights, &quotas, |turns| {
            let mut rest = turns;
            while let Some(&first) = rest.first() {
                if turn < dense_from {
                    let (now, later) = rest.split_at(rest.len().min((dense_from - turn) as usize));
                    now.iter().for_each(|&r| fill.probe(&mut lanes[r as usize]));
                    (turn, rest) = (turn + now.len() as u32, later);
                    fill.sparse -= now.len() as u32;
                } else if turn < tail_from {
                    let (now, later) = rest.split_at(rest.len().min((tail_from - turn) as usize));
                    now.iter().for_each(|&r| fill.probe_dense(&mut lanes[r as usize]));
                    (turn, rest) = (turn + now.len() as u32, later);
                    fill.dense -= now.len() as u32;
                } else {
                    fill.claim_tail(&mut lanes[first as usize]);
                    (turn, rest) = (turn + 1, &rest[1..]);
                }
            }
        });
    } else {
        heap_turns(&weights, &quotas, |rank| fill.claim(&mut lanes[rank]));
    }
    fill.table
}

/// The turn order by a heap of each backend's next turn: one pop per turn. The reference the
/// build's order (`turn_order`) is checked against; `build_table_probing` uses it.
fn heap_turns(weights: &[u32], quotas: &[u64], mut run: impl FnMut(usize)) {
    let mut heap: BinaryHeap<Turn> = weights
        .iter()
        .zip(quotas)
        .enumerate()
        .filter(|&(_, (_, &quota))| quota > 0)
        .map(|(rank, (&weight, _))| Turn {
            taken: 0,
            weight: u64::from(weight),
            rank,
        })
        .collect();
    while let Some(mut turn) = heap.pop() {
        run(turn.rank);
        turn.taken += 1;
        if turn.taken < quotas[turn.rank] {
            heap.push(turn);
        }
    }
}

/// Turns per chunk handed to the build when a short period is replayed: the build's loop over
/// a chunk has a fixed cost per call.
const REPLAY_CHUNK: usize = 4096;

/// The heap's turn order (see `Turn`), each turn as its backend's rank, in chunks.
///
/// Backend `i`'s turn `k` is due at `k / w_i`. With `g` the weights' gcd, every backend takes
/// exactly `w_i / g` turns in each period of `1 / g`, at the same offsets in every period, so
/// the order within a period is the same in all of them. One period (`sum(w_i) / g` turns) is
/// sorted by `weighted_turns` and replayed: the full periods as they are, the last few, where
/// quotas run out, with each backend's turns past its quota left out. A quota is the floor or
/// ceiling of `m * w_i / sum(w)`, so every backend reaches it within about two periods of the
/// others. Where a period is not much shorter than the table (weights nearly coprime and
/// large), the whole order is sorted instead.
fn turn_order(weights: &[u32], quotas: &[u64], mut run: impl FnMut(&[u32])) {
    let turns: u64 = quotas.iter().sum();
    let g = weights.iter().fold(0u32, |g, &w| gcd(g, w)).max(1);
    let reduced: Vec<u32> = weights.iter().map(|&w| w / g).collect();
    let period: u64 = reduced.iter().map(|&w| u64::from(w)).sum();
    if period.saturating_mul(4) > turns {
        weighted_turns(weights, quotas, |ranks, _| run(ranks));
        return;
    }
    let mut order = Vec::with_capacity(period as usize);
    let one: Vec<u64> = reduced.iter().map(|&w| u64::from(w)).collect();
    weighted_turns(&reduced, &one, |ranks, _| order.extend_from_slice(ranks));
    // Periods in which no backend reaches its quota.
    let full = reduced
        .iter()
        .zip(quotas)
        .map(|(&w, &q)| q / u64::from(w))
        .min()
        .unwrap_or(0);
    // Full periods, as many to a chunk as fit.
    let per_chunk = (REPLAY_CHUNK / order.len()).max(1) as u64;
    let chunk: Vec<u32> = order.repeat(per_chunk as usize);
    let mut left = full;
    while left > 0 {
        let n = left.min(per_chunk);
        run(&chunk[..n as usize * order.len()]);
        left -= n;
    }
    // The rest: each backend's turns counted through the periods, those past its quota left out.
    let mut taken: Vec<u64> = reduced.iter().map(|&w| full * u64::from(w)).collect();
    let mut done = full * period;
    let mut kept = Vec::with_capacity(order.len());
    while done < turns {
        kept.clear();
        for &rank in &order {
            let r = rank as usize;
            if taken[r] < quotas[r] {
                kept.push(rank);
            }
            taken[r] += 1;
        }
        // Every quota is reached within a few periods, so this ends; a period that kept
        // nothing would mean quotas summing to more than they do.
        debug_assert!(!kept.is_empty());
        if kept.is_empty() {
            break;
        }
        done += kept.len() as u64;
        run(&kept);
    }
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Keys per turn: `scale` is this times the total weight, so the `m` turns spread over about
/// this many times `m` keys. Measured: 1 is slower (more buckets hold several turns and need
/// sorting), 2 is what the bench runs.
const KEYS_PER_TURN: u64 = 2;

/// Where a backend's turns are on the scaled time line: turn `k` (0-based) is due at key
/// `floor(k * scale / weight)`, a monotone image of its time `k / weight`: an earlier time never
/// gets a later key, equal times get equal keys.
struct Clock {
    /// The next turn's key; `u64::MAX` once the quota is spent.
    key: u64,
    /// `taken * scale mod weight`.
    rem: u64,
    /// `scale / weight` (at least 1: scale >= total weight) and `scale mod weight`.
    step: u64,
    step_rem: u64,
    weight: u64,
    taken: u32,
    quota: u32,
}

/// The heap's turn order (earliest `taken / weight`, then rank; see `Turn`) without a heap:
/// turns are bucketed by their key a window of keys at a time (a counting sort: lanes emit in
/// rank order, so a bucket's turns are in rank order), and a bucket holding different times is
/// sorted by the exact time. A backend's keys are at least 1 apart (`scale` >= every weight),
/// so a bucket holds at most one turn per backend. Calls `run` with each window's turns in
/// order: their ranks, and beside each, how many turns its backend took before it.
fn weighted_turns(weights: &[u32], quotas: &[u64], mut run: impl FnMut(&[u32], &[u32])) {
    let total: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    // Keys stay below KEYS_PER_TURN * m (a turn's time is below m / total), far inside u64.
    let scale = (total * u128::from(KEYS_PER_TURN)).min(u128::from(u64::MAX)) as u64;
    let mut clocks: Vec<Clock> = weights
        .iter()
        .zip(quotas)
        .map(|(&w, &quota)| {
            let weight = u64::from(w);
            Clock {
                key: if quota > 0 { 0 } else { u64::MAX },
                rem: 0,
                step: scale / weight,
                step_rem: scale % weight,
                weight,
                taken: 0,
                // At most m.
                quota: quota as u32,
            }
        })
        .collect();
    let turns: u64 = quotas.iter().sum();
    // Turns per window: enough that each backend has several in each (the loop over the
    // backends per window is overhead), few enough to stay in L2.
    let window = (KEYS_PER_TURN * (weights.len() as u64 * 8).max(4096)) as usize;
    let mut counts = vec![0u32; window];
    let mut emitted: Vec<(u32, u32, u32)> = Vec::with_capacity(window);
    let mut ranks: Vec<u32> = Vec::with_capacity(window);
    let mut taken: Vec<u32> = Vec::with_capacity(window);
    // The buckets that got a second turn, recorded without a branch (a bucket's count reaches
    // two once): only these can need sorting. At most half the window's turns.
    let mut shared = vec![0u32; window];
    let mut done = 0u64;
    let mut base = 0u64;
    while done < turns {
        let end = base + window as u64;
        counts.fill(0);
        emitted.clear();
        let mut nshared = 0;
        for (rank, clock) in clocks.iter_mut().enumerate() {
            while clock.key < end {
                let bucket = (clock.key - base) as u32;
                let count = &mut counts[bucket as usize];
                *count += 1;
                // Overwritten unless this is the bucket's second turn; nshared < window / 2.
                shared[nshared] = bucket;
                nshared += usize::from(*count == 2);
                // rank < EMPTY, checked by `build`.
                emitted.push((rank as u32, clock.taken, bucket));
                clock.taken += 1;
                clock.rem += clock.step_rem;
                let carry = u64::from(clock.rem >= clock.weight);
                clock.rem -= carry * clock.weight;
                clock.key = if clock.taken < clock.quota {
                    clock.key + clock.step + carry
                } else {
                    u64::MAX
                };
            }
        }
        // counts[b] becomes where bucket b starts (the sum kept in a register: summing in
        // place waits on each store, measured 14 % of the weighted build).
        let mut sum = 0;
        for count in counts.iter_mut() {
            (*count, sum) = (sum, sum + *count);
        }
        ranks.clear();
        ranks.resize(emitted.len(), 0);
        taken.clear();
        taken.resize(emitted.len(), 0);
        for &(rank, k, bucket) in &emitted {
            let at = &mut counts[bucket as usize];
            ranks[*at as usize] = rank;
            taken[*at as usize] = k;
            *at += 1;
        }
        // counts[b] is now where bucket b ends; buckets of two or more turns may hold
        // different times: order them by time, stably (equal times stay in rank order).
        for &bucket in &shared[..nshared] {
            let b = bucket as usize;
            let start = if b == 0 { 0 } else { counts[b - 1] as usize };
            let end = counts[b] as usize;
            sort_by_time(&mut ranks[start..end], &mut taken[start..end], weights);
        }
        done += ranks.len() as u64;
        run(&ranks, &taken);
        base = end;
    }
}

/// Stable insertion sort of one bucket's turns (each its backend's latest emitted turn, at
/// most one per backend) by exact time `k / weight`, cross-multiplied in u64 (k < 2^25).
fn sort_by_time(ranks: &mut [u32], taken: &mut [u32], weights: &[u32]) {
    let time = |rank: u32, k: u32| (u64::from(k), u64::from(weights[rank as usize]));
    for i in 1..ranks.len() {
        let (k, w) = time(ranks[i], taken[i]);
        let mut j = i;
        // Strictly later times move up; equal ones keep their (rank) order.
        while j > 0 && {
            let (k0, w0) = time(ranks[j - 1], taken[j - 1]);
            k0 * w > k * w0
        } {
            ranks.swap(j - 1, j);
            taken.swap(j - 1, j);
            j -= 1;
        }
    }
}

/// Deterministic primality test by trial division over 6k ± 1; at most ~22k divisions for any
/// `u32`, microseconds for table-sized inputs.
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let n = u64::from(n);
    let mut d = 5u64;
    while d * d <= n {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

/// Marks a free slot while building.
const EMPTY: u32 = u32::MAX;

/// SipHash keys for the permutation offset and skip. Arbitrary but fixed forever: changing
/// them reshuffles every table on every host. Distinct keys make offset and skip independent.
const OFFSET_KEY: (u64, u64) = (0x6d61_676c_6576_2d6f, 0x9e37_79b9_7f4a_7c15);
const SKIP_KEY: (u64, u64) = (0x6d61_676c_6576_2d73, 0xc2b2_ae3d_27d4_eb4f);

/// Per-backend walk state; `pos` is the next slot of the permutation `offset + j * skip mod m`.
/// 32-bit fields: m < 2^25, and a smaller lane keeps the 1000 lanes of a large service in L1.
struct Lane {
    index: u32,
    pos: u32,
    skip: u32,
    /// `m - skip`: the next slot is `pos - back` or `pos + skip`, both computed from `pos`.
    back: u32,
    /// `skip`'s inverse mod m, once the tail search needs it (0: not yet).
    inverse: u32,
    quota: u32,
}

/// The table being filled. A turn claims the first free slot of its lane's walk. While many
/// slots are free, probing finds it in a few steps; as the table fills, a probe walk takes
/// about m / free steps (half of all probes come in the last sqrt(m) turns). From sqrt(m / 3)
/// free slots on, the turn instead computes, for every free slot, how many steps the walk needs
/// to reach it (`(slot - pos) * skip⁻¹ mod m`) and takes the nearest: the same slot, found in
/// `free` steps rather than about m / free.
struct Fill {
    table: Vec<u32>,
    /// Which slots are taken, one bit each: the probe loop reads this (8 KiB at m = 65537, in
    /// L1) rather than the table (32 times larger).
    taken: Vec<u64>,
    m: u32,
    /// The free slots, once in the tail, as f64 for `nearest`.
    tail: Option<Vec<f64>>,
    /// Turns left that probe one slot at a time, then two at a time; then the tail search.
    sparse: u32,
    dense: u32,
}

impl Fill {
    /// `fast`: with the two-walk dense phase and the tail search; without, the reference.
    fn new(m: u32, fast: bool) -> Self {
        // One tail step costs about three late probes (which hit taken bits in L1): the search
        // pays off once m / free probes exceed 3 * free. (Measured flat from 1 to 3 times this
        // with the vector search.) At most 2365 for MAX_TABLE_SIZE, so free slots are
        // numbered below `KEY`.
        let tail_at = if fast { (m / 3).isqrt() } else { 0 };
        // Below 1/16 free, a turn takes 16 probes or more, whose branch predicts well; two walks
        // of double steps then halve the chain of dependent position updates (measured: 0.91 of
        // the time at M = 655373; one walk is faster while more is free, four no faster).
        let sparse = if fast { (m - m / 16).min(m - tail_at) } else { m };
        Self {
            table: vec![EMPTY; m as usize],
            taken: vec![0u64; (m as usize).div_ceil(64)],
            m,
            tail: None,
            sparse,
            dense: m - tail_at - sparse,
        }
    }

    /// One turn, in whichever phase the build is.
    #[inline(always)]
    fn claim(&mut self, lane: &mut Lane) {
        if self.sparse > 0 {
            self.sparse -= 1;
            self.probe(lane);
        } else if self.dense > 0 {
            self.dense -= 1;
            self.probe_dense(lane);
        } else {
            self.claim_tail(lane);
        }
    }

    /// A turn in the tail: the nearest free slot along the lane's walk, by search. Kept out of
    /// line so that the probe loop, run for almost every turn, inlines into the turn loop.
    #[inline(never)]
    fn claim_tail(&mut self, lane: &mut Lane) {
        let (m, taken) = (self.m, &self.taken);
        let free = self.tail.get_or_insert_with(|| {
            let mut free = Vec::new();
            for (w, &word) in taken.iter().enumerate() {
                let mut open = !word;
                while open != 0 {
                    let slot = w as u32 * 64 + open.trailing_zeros();
                    if slot >= m {
                        break;
                    }
                    free.push(f64::from(slot));
                    open &= open - 1;
                }
            }
            free
        });
        if lane.inverse == 0 {
            // Below m, so lossless.
            lane.inverse = inverse(u64::from(lane.skip), u64::from(m)) as u32;
        }
        let key = nearest(free, f64::from(lane.pos), f64::from(lane.inverse), f64::from(m));
        // The key is an integer below 2^41 and the slot below m: both casts are exact.
        let slot = free.swap_remove((key as u64 % KEY) as usize) as u32;
        self.table[slot as usize] = lane.index;
        lane.pos = step(slot, lane.skip, lane.back);
    }

    /// As `probe`, testing two slots a step: the walk's even and odd steps, each advancing by
    /// `2 * skip`, so neither position waits for the other. The first free one in walk order
    /// wins, as in `probe`.
    #[inline(always)]
    fn probe_dense(&mut self, lane: &mut Lane) {
        use std::hint::select_unpredictable as pick;
        let (taken, table) = (&mut self.taken[..], &mut self.table[..]);
        let (skip, back) = (lane.skip, lane.back);
        // 2 * skip mod m; nonzero for a prime m > 2 (for m = 2 there is no dense phase).
        let skip2 = step(skip, skip, back);
        let back2 = self.m - skip2;
        let step2 = |p: u32| step(p, skip2, back2);
        let (mut even, mut odd) = (lane.pos, step(lane.pos, skip, back));
        loop {
            let even_free = taken[even as usize / 64] & (1 << (even % 64)) == 0;
            let odd_free = taken[odd as usize / 64] & (1 << (odd % 64)) == 0;
            if even_free | odd_free {
                let slot = pick(even_free, even, odd);
                taken[slot as usize / 64] |= 1 << (slot % 64);
                table[slot as usize] = lane.index;
                lane.pos = pick(even_free, odd, step2(even));
                return;
            }
            even = step2(even);
            odd = step2(odd);
        }
    }

    // Every turn fills exactly one slot and the quotas sum to `m`, so a free slot exists at
    // each turn; a prime `m` and `1 <= skip < m` make the walk visit every slot, so the probe
    // loop ends, and make `skip` invertible mod m.
    /// A turn by probing: the first free slot along the lane's walk, one slot a step.
    #[inline(always)]
    fn probe(&mut self, lane: &mut Lane) {
        let (taken, table) = (&mut self.taken[..], &mut self.table[..]);
        let (skip, back) = (lane.skip, lane.back);
        let mut pos = lane.pos;
        loop {
            let slot = pos;
            pos = step(pos, skip, back);
            let word = taken[slot as usize / 64];
            if word & (1 << (slot % 64)) == 0 {
                taken[slot as usize / 64] = word | (1 << (slot % 64));
                table[slot as usize] = lane.index;
                lane.pos = pos;
                return;
            }
        }
    }
}

/// The slot after `pos` on a walk of `skip` (`back` = m - skip): `pos - back` or `pos + skip`,
/// both computed from `pos`. Whether the walk wraps is a coin flip: a branch would mispredict.
#[inline(always)]
fn step(pos: u32, skip: u32, back: u32) -> u32 {
    std::hint::select_unpredictable(pos >= back, pos.wrapping_sub(back), pos + skip)
}

/// A key packs a free slot's distance along the walk above its index in the free list.
const KEY: u64 = 1 << 16;

/// The least `steps * KEY + i` over the free slots `free[i]`, where `steps` is how far the walk
/// at `pos` is from `free[i]`: `(free[i] - pos) * inverse mod m`. Distances are distinct (the
/// walk is a permutation), so the least key names the nearest slot. Computed in f64, exactly:
/// every operand, product and difference is an integer below 2^51 (m < 2^25), the estimated
/// quotient `floor(y / m)` is at most one off, and the remainder is corrected into [0, m).
fn nearest(free: &[f64], pos: f64, inverse: f64, m: f64) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { nearest_avx2(free, pos, inverse, m) };
    }
    nearest_from(free, 0, pos, inverse, m, f64::INFINITY)
}

/// `nearest` over `free[from..]`, one slot at a time, starting from the key `best`.
#[inline(always)]
fn nearest_from(free: &[f64], from: usize, pos: f64, inverse: f64, m: f64, mut best: f64) -> f64 {
    let rm = 1.0 / m;
    for (i, &slot) in free.iter().enumerate().skip(from) {
        let mut d = slot - pos;
        if d < 0.0 {
            d += m;
        }
        let y = d * inverse;
        let mut r = y - (y * rm).floor() * m;
        if r < 0.0 {
            r += m;
        }
        if r >= m {
            r -= m;
        }
        // i < sqrt(m / 3) < KEY, so the cast is exact.
        let key = r * KEY as f64 + i as f64;
        if key < best {
            best = key;
        }
    }
    best
}

/// `nearest` four slots at a time: the same operations in the same order, so the same key.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn nearest_avx2(free: &[f64], pos: f64, inverse: f64, m: f64) -> f64 {
    use std::arch::x86_64::*;
    let (vpos, vinverse) = (_mm256_set1_pd(pos), _mm256_set1_pd(inverse));
    let (vm, vrm, zero) = (_mm256_set1_pd(m), _mm256_set1_pd(1.0 / m), _mm256_setzero_pd());
    let (vkey, four) = (_mm256_set1_pd(KEY as f64), _mm256_set1_pd(4.0));
    let mut index = _mm256_setr_pd(0.0, 1.0, 2.0, 3.0);
    let mut best = _mm256_set1_pd(f64::INFINITY);
    let mut chunks = free.chunks_exact(4);
    for chunk in &mut chunks {
        // SAFETY: `chunk` holds four f64; an unaligned load reads exactly those.
        let slot = unsafe { _mm256_loadu_pd(chunk.as_ptr()) };
        let mut d = _mm256_sub_pd(slot, vpos);
        d = _mm256_add_pd(d, _mm256_and_pd(_mm256_cmp_pd::<_CMP_LT_OQ>(d, zero), vm));
        let y = _mm256_mul_pd(d, vinverse);
        let q = _mm256_floor_pd(_mm256_mul_pd(y, vrm));
        let mut r = _mm256_sub_pd(y, _mm256_mul_pd(q, vm));
        r = _mm256_add_pd(r, _mm256_and_pd(_mm256_cmp_pd::<_CMP_LT_OQ>(r, zero), vm));
        r = _mm256_sub_pd(r, _mm256_and_pd(_mm256_cmp_pd::<_CMP_GE_OQ>(r, vm), vm));
        let key = _mm256_add_pd(_mm256_mul_pd(r, vkey), index);
        best = _mm256_min_pd(best, key);
        index = _mm256_add_pd(index, four);
    }
    let mut lanes = [0f64; 4];
    // SAFETY: `lanes` has room for four f64.
    unsafe { _mm256_storeu_pd(lanes.as_mut_ptr(), best) };
    let best = lanes.iter().fold(f64::INFINITY, |a, &b| a.min(b));
    nearest_from(free, free.len() - chunks.remainder().len(), pos, inverse, m, best)
}

/// `a`'s inverse mod the prime `m` (`0 < a < m`), by the extended Euclidean algorithm.
fn inverse(a: u64, m: u64) -> u64 {
    let (mut r0, mut r1) = (m as i64, a as i64);
    let (mut t0, mut t1) = (0i64, 1i64);
    while r1 != 0 {
        let q = r0 / r1;
        (r0, r1) = (r1, r0 - q * r1);
        (t0, t1) = (t1, t0 - q * t1);
    }
    t0.rem_euclid(m as i64) as u64
}

/// A backend's next turn, due at virtual time `taken / weight`; `rank` (id order) breaks ties.
/// Ordered so that `BinaryHeap` (a max-heap) pops the earliest turn first.
struct Turn {
    taken: u64,
    weight: u64,
    rank: usize,
}

impl Ord for Turn {
    fn cmp(&self, other: &Self) -> Ordering {
        // self.taken / self.weight vs other.taken / other.weight, cross-multiplied, reversed.
        (other.taken * self.weight)
            .cmp(&(self.taken * other.weight))
            .then(other.rank.cmp(&self.rank))
    }
}

impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Turn {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Turn {}

/// Splits `m` slots in proportion to `weights` (all > 0) by largest remainder: each share is
/// `floor` or `ceil` of its exact value and the shares sum to `m`. Ties go to the lower rank,
/// which with equal weights gives classic Maglev's extra turn to the first backends in order.
fn apportion(weights: &[u32], m: u32) -> Vec<u64> {
    let total: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    let m = u128::from(m);
    let mut quotas = Vec::with_capacity(weights.len());
    let mut remainders = Vec::with_capacity(weights.len());
    let mut assigned = 0u128;
    for (rank, &w) in weights.iter().enumerate() {
        let exact = m * u128::from(w);
        let quota = exact / total;
        assigned += quota;
        // quota <= m < 2^32, so the cast is lossless.
        quotas.push(quota as u64);
        remainders.push((exact % total, rank));
    }
    // The remainders are each < total and sum to (m - assigned) * total, so fewer than
    // `weights.len()` slots are left over.
    let left = (m - assigned) as usize;
    remainders.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, rank) in remainders.iter().take(left) {
        quotas[rank] += 1;
    }
    quotas
}

/// SipHash-2-4 (Aumasson & Bernstein) with a 128-bit key, written from the specification.
/// Chosen for its fixed, well-studied output, unlike std's hashers, which are unspecified.
fn siphash24(key: (u64, u64), data: &[u8]) -> u64 {
    let (k0, k1) = key;
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    let le = |bytes: &[u8]| bytes.iter().rev().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let word = le(chunk);
        v[3] ^= word;
        sip_round(&mut v);
        sip_round(&mut v);
        v[0] ^= word;
    }
    // The last word carries the length's low byte on top of the trailing bytes.
    let word = le(chunks.remainder()) | ((data.len() as u64) << 56);
    v[3] ^= word;
    sip_round(&mut v);
    sip_round(&mut v);
    v[0] ^= word;
    v[2] ^= 0xff;
    for _ in 0..4 {
        sip_round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13) ^ v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16) ^ v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21) ^ v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17) ^ v[2];
    v[2] = v[2].rotate_left(32);
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u32 = 65537;

    /// Zero-padded so that id order equals index order.
    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("backend-{i:04}")).collect()
    }

    fn with_weight(names: &[String], weight: u32) -> Vec<MaglevBackend<'_>> {
        names.iter().map(|id| MaglevBackend { id, weight }).collect()
    }

    /// The table as backend ids, for comparing tables whose indices differ.
    fn owners<'a>(backends: &[MaglevBackend<'a>], table: &[u32]) -> Vec<&'a str> {
        table.iter().map(|&i| backends[i as usize].id).collect()
    }

    fn counts(table: &[u32], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &i in table {
            counts[i as usize] += 1;
        }
        counts
    }

    /// Classic unweighted Maglev (the paper's pseudocode), iterating in slice order.
    fn classic(ids: &[&str], m: u32) -> Vec<u32> {
        let m64 = u64::from(m);
        let perm: Vec<(u64, u64)> = ids
            .iter()
            .map(|id| {
                let offset = siphash24(OFFSET_KEY, id.as_bytes()) % m64;
                let skip = siphash24(SKIP_KEY, id.as_bytes()) % (m64 - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; ids.len()];
        let mut table = vec![EMPTY; m as usize];
        let mut filled = 0;
        loop {
            for (i, &(offset, skip)) in perm.iter().enumerate() {
                let mut c = (offset + next[i] * skip) % m64;
                while table[c as usize] != EMPTY {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m64;
                }
                table[c as usize] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    return table;
                }
            }
        }
    }

    /// Deterministic Fisher-Yates shuffle (xorshift64), no external crates.
    fn shuffle<T>(items: &mut [T], mut seed: u64) {
        for i in (1..items.len()).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            items.swap(i, (seed % (i as u64 + 1)) as usize);
        }
    }

    #[test]
    fn siphash_matches_reference_vector() {
        // From the SipHash paper: key 00..0f, message 00..0e.
        let key = (0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908);
        let msg: Vec<u8> = (0..15).collect();
        assert_eq!(siphash24(key, &msg), 0xa129_ca61_49be_45e5);
        // Several full words plus a tail; value cross-checked once against std's SipHasher.
        let msg = b"a longer message of 37 bytes length!!";
        assert_eq!(siphash24((1, 2), msg), 0xb232_65dc_1f4e_b5bd);
    }

    #[test]
    fn equal_weights_balance() {
        let mut worst: f64 = 0.0;
        for n in [1, 2, 3, 10, 100, 257, 650] {
            let names = names(n);
            let table = build_table(&with_weight(&names, 1), M);
            assert_eq!(table.len(), M as usize);
            let ideal = f64::from(M) / n as f64;
            let counts = counts(&table, n);
            let max = counts.iter().copied().max().unwrap_or(0) as f64;
            let min = counts.iter().copied().min().unwrap_or(0) as f64;
            let ratio = max / ideal;
            assert!(ratio <= 1.01, "n={n}: max/ideal = {ratio}");
            assert!(min >= ideal.floor(), "n={n}: min {min} < floor({ideal})");
            worst = worst.max(ratio);
        }
        eprintln!("worst max/ideal: {worst:.5}");
    }

    #[test]
    fn equal_weights_are_classic_maglev() {
        for (n, m, w) in [(1, 13, 1), (3, 13, 7), (10, 251, 1), (37, M, 5)] {
            let names = names(n);
            let ids: Vec<&str> = names.iter().map(String::as_str).collect();
            assert_eq!(build_table(&with_weight(&names, w), m), classic(&ids, m));
        }
    }

    #[test]
    fn removal_disrupts_little() {
        let mut worst: f64 = 0.0;
        for n in [10, 100, 650] {
            let names = names(n);
            let before_set = with_weight(&names, 1);
            let removed = n / 2;
            let mut after_set = before_set.clone();
            after_set.remove(removed);
            let before = owners(&before_set, &build_table(&before_set, M));
            let after = owners(&after_set, &build_table(&after_set, M));
            let removed_id = before_set[removed].id;
            assert!(!after.contains(&removed_id));
            let kept = before.iter().filter(|&&id| id != removed_id).count();
            let moved = before
                .iter()
                .zip(&after)
                .filter(|&(&b, &a)| b != removed_id && a != b)
                .count();
            let share = moved as f64 / kept as f64;
            assert!(share <= 0.01, "n={n}: {moved}/{kept} kept slots moved");
            worst = worst.max(share);
        }
        eprintln!("worst removal disruption: {:.3}%", worst * 100.0);
    }

    #[test]
    fn addition_moves_about_one_share() {
        let mut worst: f64 = 0.0;
        for n in [1, 10, 100, 650] {
            let mut names = names(n + 1);
            // A new id that sorts into the middle, the hardest place for classic round-robin.
            names[n] = format!("backend-{:04}x", n / 2);
            let after_set = with_weight(&names, 1);
            let before_set = &after_set[..n];
            let before = owners(before_set, &build_table(before_set, M));
            let after = owners(&after_set, &build_table(&after_set, M));
            let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
            let share = moved as f64 / f64::from(M);
            let bound = 1.0 / (n + 1) as f64 + 0.01;
            assert!(share <= bound, "n={n}: moved {share} > {bound}");
            worst = worst.max(share - 1.0 / (n + 1) as f64);
        }
        eprintln!("worst addition excess over 1/(n+1): {:.3}%", worst * 100.0);
    }

    /// Relative error `|count - ideal| / ideal` for each backend.
    fn weight_errors(weights: &[u32], m: u32) -> Vec<f64> {
        let names = names(weights.len());
        let backends: Vec<MaglevBackend<'_>> = names
            .iter()
            .zip(weights)
            .map(|(id, &weight)| MaglevBackend { id, weight })
            .collect();
        let table = build_table(&backends, m);
        let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        counts(&table, weights.len())
            .iter()
            .zip(weights)
            .map(|(&count, &w)| {
                let ideal = f64::from(m) * f64::from(w) / total;
                // Apportionment guarantees floor or ceil of the ideal share.
                assert!((count as f64 - ideal).abs() < 1.0, "{count} vs {ideal}");
                (count as f64 - ideal).abs() / ideal
            })
            .collect()
    }

    #[test]
    fn weighted_shares_within_one_percent_relative() {
        // Relative bound: every backend within 1% of its own ideal share. For weights 1..=100
        // the weight-1 ideal is ~12.98 slots, so this holds only because counts are the
        // floor/ceil of the ideal and the large remainders round up (13 slots, error 0.18%).
        let worst = [
            weight_errors(&[1, 2, 3, 4], M),
            weight_errors(&(1..=100).collect::<Vec<_>>(), M),
        ]
        .iter()
        .flatten()
        .fold(0.0f64, |a, &b| a.max(b));
        assert!(worst <= 0.01, "worst relative error {worst}");
        eprintln!("worst relative weight error: {:.4}%", worst * 100.0);

        // Uneven weights that need not round nicely: still within one slot of ideal.
        let uneven: Vec<u32> = (0..300).map(|i| 1 + (i * 7919) % 97).collect();
        weight_errors(&uneven, M);
        weight_errors(&[u32::MAX, u32::MAX - 1, 1, 3], M);
    }

    #[test]
    fn weights_scale_invariant_and_zero_weight_inert() {
        let names = names(20);
        let base: Vec<MaglevBackend<'_>> = names
            .iter()
            .enumerate()
            .map(|(i, id)| MaglevBackend {
                id,
                weight: 1 + i as u32 % 4,
            })
            .collect();
        let table = build_table(&base, M);
        let tripled: Vec<_> = base
            .iter()
            .map(|b| MaglevBackend {
                weight: b.weight * 3,
                ..*b
            })
            .collect();
        assert_eq!(build_table(&tripled, M), table);

        let mut with_zero = base.clone();
        with_zero.insert(
            7,
            MaglevBackend {
                id: "idle",
                weight: 0,
            },
        );
        let with_zero_table = build_table(&with_zero, M);
        assert!(!with_zero_table.contains(&7));
        assert_eq!(owners(&with_zero, &with_zero_table), owners(&base, &table));
    }

    #[test]
    fn deterministic_and_order_independent() {
        let names = names(50);
        let backends: Vec<MaglevBackend<'_>> = names
            .iter()
            .enumerate()
            .map(|(i, id)| MaglevBackend {
                id,
                weight: 1 + i as u32 % 5,
            })
            .collect();
        let table = build_table(&backends, M);
        assert_eq!(build_table(&backends, M), table);
        let expected = owners(&backends, &table);
        for seed in [1, 0xdead_beef, 42] {
            let mut shuffled = backends.clone();
            shuffle(&mut shuffled, seed);
            assert_ne!(shuffled, backends);
            assert_eq!(owners(&shuffled, &build_table(&shuffled, M)), expected);
        }
    }

    #[test]
    fn the_tail_search_takes_the_slots_probing_takes() {
        let mut seed = 0x5eed_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for m in [2u32, 3, 13, 251, 1031, 65537] {
            for n in [1usize, 2, 7, 100] {
                let ids = names(n);
                for weighted in [false, true] {
                    let backends: Vec<_> = ids
                        .iter()
                        .map(|id| MaglevBackend {
                            id,
                            weight: if weighted { (next() % 1000) as u32 } else { 100 },
                        })
                        .collect();
                    assert_eq!(
                        build_table(&backends, m),
                        build_table_probing(&backends, m),
                        "m {m} n {n} weighted {weighted}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_turn_orders_are_the_heap_order() {
        // Both the windowed sort of the whole order and the build's (one period sorted and
        // replayed where periods are short) against the heap, turn for turn.
        let check = |weights: &[u32], m: u32| {
            let quotas = apportion(weights, m);
            let mut heap = Vec::new();
            heap_turns(weights, &quotas, |rank| heap.push(rank as u32));
            assert_eq!(heap.len(), m as usize);
            let mut windowed = Vec::new();
            let mut taken = vec![0u32; weights.len()];
            weighted_turns(weights, &quotas, |ranks, ks| {
                for (&rank, &k) in ranks.iter().zip(ks) {
                    // Each turn says how many its backend took before it.
                    assert_eq!(k, taken[rank as usize]);
                    taken[rank as usize] += 1;
                    windowed.push(rank);
                }
            });
            assert!(heap == windowed, "windowed: m {m} weights {weights:?}");
            let mut order = Vec::new();
            turn_order(weights, &quotas, |ranks| order.extend_from_slice(ranks));
            assert!(heap == order, "turn_order: m {m} weights {weights:?}");
        };
        let mut seed = 0x7e1e_5c0b_u64;
        let mut next = |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound
        };
        let mut sets = 0;
        for m in [2u32, 13, 251, 1031, 65537, 655_373] {
            for n in [1u64, 2, 3, 7, 100, 1000] {
                // Weights spread 1..=100, the same times 6 (a period of 1/6), 1..=2, over all
                // of u32, and equal.
                for (bound, factor) in [(100u64, 1), (100, 6), (2, 1), (u64::from(u32::MAX), 1), (1, 1)] {
                    if m > 65537 && n < 100 {
                        continue;
                    }
                    let weights: Vec<u32> = (0..n)
                        .map(|_| (1 + next(bound) as u32).saturating_mul(factor))
                        .collect();
                    check(&weights, m);
                    sets += 1;
                }
            }
        }
        // And extremes: one heavy backend among light ones, weights near u32::MAX, a short
        // period ending with a partial one (quotas 9362 or 9363 of weight 1 lanes).
        for weights in [
            vec![1, 1000, 1, 1],
            vec![u32::MAX, u32::MAX - 1, 1, 3],
            vec![7; 5],
            vec![1, 2, 1, 1, 2],
            vec![4, 6, 10, 2],
        ] {
            check(&weights, 65537);
            check(&weights, 13);
            sets += 2;
        }
        eprintln!("{sets} weight sets in heap order");
    }

    #[test]
    fn the_vector_search_matches_integer_arithmetic() {
        // Both paths of `nearest` (the vector one where the CPU has it) against u128 math,
        // including the largest table, where products come closest to 2^53.
        let mut seed = 0x9e37_79b9_u64;
        let mut next = |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound
        };
        for m in [2u32, 13, 65537, 655_373, MAX_TABLE_SIZE] {
            let m64 = u64::from(m);
            for len in [1usize, 3, 4, 5, 17, 2365] {
                let free: Vec<f64> = (0..len).map(|_| next(m64) as f64).collect();
                let (pos, skip) = (next(m64), next(m64 - 1) + 1);
                let inv = inverse(skip, m64);
                assert_eq!(u128::from(skip) * u128::from(inv) % u128::from(m64), 1);
                let want = free
                    .iter()
                    .enumerate()
                    .map(|(i, &s)| {
                        let d = (s as u64 + m64 - pos) % m64;
                        (u128::from(d) * u128::from(inv) % u128::from(m64)) as u64 * KEY + i as u64
                    })
                    .min()
                    .unwrap();
                let (pos, inv, mf) = (pos as f64, inv as f64, f64::from(m));
                assert_eq!(nearest(&free, pos, inv, mf) as u64, want, "m {m} len {len}");
                let scalar = nearest_from(&free, 0, pos, inv, mf, f64::INFINITY);
                assert_eq!(scalar as u64, want, "m {m} len {len}, scalar");
            }
        }
    }

    #[test]
    fn golden_values() {
        // Pins the hash keys and the algorithm: a change here reshuffles deployed tables.
        let backends = [
            MaglevBackend {
                id: "auth-1",
                weight: 1,
            },
            MaglevBackend {
                id: "auth-2",
                weight: 1,
            },
            MaglevBackend {
                id: "auth-3",
                weight: 2,
            },
        ];
        assert_eq!(build_table(&backends, M)[..8], GOLDEN_65537);
        assert_eq!(build_table(&backends, 13), GOLDEN_13);
        assert_eq!(siphash24(OFFSET_KEY, b"auth-1") % 65537, GOLDEN_OFFSET);
    }

    const GOLDEN_65537: [u32; 8] = [2, 0, 2, 1, 1, 2, 1, 0];
    const GOLDEN_13: [u32; 13] = [2, 0, 2, 2, 2, 0, 2, 0, 1, 2, 2, 1, 1];
    const GOLDEN_OFFSET: u64 = 36205;

    #[test]
    fn edge_cases() {
        let zero = [
            MaglevBackend { id: "a", weight: 0 },
            MaglevBackend { id: "b", weight: 0 },
        ];
        assert!(build_table(&zero, M).is_empty());
        assert!(build_table(&[], M).is_empty());

        let one = [
            MaglevBackend { id: "a", weight: 0 },
            MaglevBackend { id: "b", weight: 9 },
        ];
        let table = build_table(&one, M);
        assert_eq!(table.len(), M as usize);
        assert!(table.iter().all(|&i| i == 1));

        // Invalid sizes are refused instead of looping or panicking.
        let two = [
            MaglevBackend { id: "a", weight: 1 },
            MaglevBackend { id: "b", weight: 1 },
        ];
        for m in [0, 1, 4, 65536, 4_294_967_291, u32::MAX] {
            assert!(build_table(&two, m).is_empty(), "m={m}");
        }
        // Tiny primes work, including more backends than slots.
        assert_eq!(counts(&build_table(&two, 2), 2), [1, 1]);
        let many = names(20);
        let table = build_table(&with_weight(&many, 1), 7);
        assert_eq!(table.len(), 7);
        assert!(counts(&table, 20).iter().all(|&c| c <= 1));

        // Duplicate ids do not break anything.
        let dup = [
            MaglevBackend { id: "x", weight: 1 },
            MaglevBackend { id: "x", weight: 1 },
        ];
        assert_eq!(counts(&build_table(&dup, 13), 2), [7, 6]);
    }

    #[test]
    fn primes() {
        for p in [2, 3, 5, 13, 251, 65537, 655_373, MAX_TABLE_SIZE, 4_294_967_291] {
            assert!(is_prime(p), "{p}");
        }
        for c in [0, 1, 4, 9, 25, 49, 65536, 65535, 655_371, 16_777_216, u32::MAX] {
            assert!(!is_prime(c), "{c}");
        }
        // 2^24 < MAX_TABLE_SIZE and nothing prime lies in between.
        assert!((1 << 24..MAX_TABLE_SIZE).all(|n| !is_prime(n)));
        // Cross-check against a sieve.
        let mut sieve = vec![true; 10_000];
        sieve[0] = false;
        sieve[1] = false;
        for i in 2..100 {
            if sieve[i] {
                (i * i..10_000).step_by(i).for_each(|j| sieve[j] = false);
            }
        }
        for (n, &p) in sieve.iter().enumerate() {
            assert_eq!(is_prime(n as u32), p, "{n}");
        }
    }
}
