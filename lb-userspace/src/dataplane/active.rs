//! The data plane's active-flow counts (`ACTIVE`, one i64 per backend slot), mapped into the
//! daemon's memory so it can correct them with atomic writes of its own while every CPU adds to
//! them: a count drifts up when a counted flow leaves the connection table without a FIN or
//! RST (evicted), and the census walk puts it back to what the table holds.

use std::sync::atomic::{AtomicI64, Ordering};

use aya::maps::MapData;

use crate::error::Result;

pub struct ActiveCounts {
    map: super::mapping::Mapping,
}

impl ActiveCounts {
    pub fn new(map: MapData) -> Result<Self> {
        Ok(Self {
            map: super::mapping::Mapping::new(map, 8, "ACTIVE")?,
        })
    }

    fn cell(&self, slot: u32) -> Option<&AtomicI64> {
        // SAFETY: in bounds; an 8-aligned i64 of a shared mapping, accessed only atomically
        // (the data plane's adds are atomic too).
        (slot < self.map.entries).then(|| unsafe { &*self.map.base().cast::<AtomicI64>().add(slot as usize) })
    }

    /// A slot's count as the data plane keeps it.
    pub fn get(&self, slot: u32) -> i64 {
        self.cell(slot).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    pub fn add(&self, slot: u32, delta: i64) {
        if let Some(c) = self.cell(slot) {
            c.fetch_add(delta, Ordering::Relaxed);
        }
    }

    /// `settle` on a slot's count.
    pub fn settle(&self, slot: u32, was: i64, found: i64, waited: &mut u8) -> bool {
        self.cell(slot).is_some_and(|c| settle(c, was, found, waited))
    }

    pub fn slots(&self) -> u32 {
        self.map.entries
    }
}

/// The slots whose live count differs from what the walk found: (slot, the data plane's count
/// when the walk began, the counted flows the walk found).
pub fn corrections(before: &[i64], truth: &std::collections::HashMap<u32, i64>) -> Vec<(u32, i64, i64)> {
    before
        .iter()
        .enumerate()
        .filter_map(|(slot, &b)| {
            let t = truth.get(&(slot as u32)).copied().unwrap_or(0);
            (t != b).then_some((slot as u32, b, t))
        })
        .collect()
}

/// Walks a count may wait for a quiet one before it is corrected anyway (about a minute).
pub const PATIENCE: u8 = 6;

/// Corrects one count to what a walk found, if that is safe. A flow that opens or closes while
/// the walk runs moves the count and may or may not be in the walk's truth: a FIN after the
/// count was read and before its entry was walked would be taken off twice (the count goes
/// negative). So the count is set only if it is still what it was when the walk began, in one
/// compare-and-swap. A count that keeps moving is left to a quieter walk; after `PATIENCE`
/// walks it is corrected by the difference anyway, never below zero. True if it was corrected.
pub fn settle(cell: &AtomicI64, was: i64, found: i64, waited: &mut u8) -> bool {
    if cell
        .compare_exchange(was, found, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
    {
        *waited = 0;
        return true;
    }
    if *waited < PATIENCE {
        *waited += 1;
        return false;
    }
    let now = cell.load(Ordering::Relaxed);
    let fixed = (now + found - was).max(0);
    *waited = 0;
    cell.compare_exchange(now, fixed, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};

    use super::{PATIENCE, settle};

    #[test]
    fn corrections_name_each_count_that_differs_from_the_table() {
        let before = [0, 5, 2, -1];
        let truth = [(1, 3), (2, 2), (7, 4)].into_iter().collect();
        // Slot 1 drifted up by 2 (evictions), slot 3 below 0 (a race), slot 7 is out of range.
        assert_eq!(super::corrections(&before, &truth), vec![(1, 5, 3), (3, -1, 0)]);
    }

    #[test]
    fn a_count_that_did_not_move_during_the_walk_is_set_to_what_it_found() {
        let cell = AtomicI64::new(5);
        let mut waited = 2;
        assert!(settle(&cell, 5, 3, &mut waited));
        assert_eq!((cell.load(Ordering::Relaxed), waited), (3, 0));
    }

    #[test]
    fn fins_during_the_walk_are_not_taken_off_twice() {
        // 240 counted flows when the walk began; all closed (the data plane took them off)
        // before the walk reached their entries, so it found none.
        let cell = AtomicI64::new(0);
        let mut waited = 0;
        assert!(!settle(&cell, 240, 0, &mut waited));
        assert_eq!(cell.load(Ordering::Relaxed), 0, "not -240");
        assert_eq!(waited, 1);
    }

    #[test]
    fn a_count_that_never_rests_is_corrected_after_its_patience_never_below_zero() {
        // Drifted 10 too high (evictions), and busy during every walk.
        let cell = AtomicI64::new(0);
        let mut waited = 0;
        for walk in 0..PATIENCE {
            cell.store(50 + i64::from(walk), Ordering::Relaxed);
            assert!(!settle(&cell, 49, 39, &mut waited));
        }
        cell.store(60, Ordering::Relaxed);
        assert!(settle(&cell, 49, 39, &mut waited));
        assert_eq!((cell.load(Ordering::Relaxed), waited), (50, 0));
        // The same when the estimate would go below zero: the count stops at zero.
        let cell = AtomicI64::new(3);
        let mut waited = PATIENCE;
        assert!(settle(&cell, 20, 0, &mut waited));
        assert_eq!(cell.load(Ordering::Relaxed), 0);
    }
}
