//! The data plane's active-flow counts (`ACTIVE`, one i64 per backend slot), mapped into the
//! daemon's memory so it can correct them with atomic adds of its own while every CPU adds to
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

    pub fn slots(&self) -> u32 {
        self.map.entries
    }
}

/// What to add to each slot's live count so it says what the connection table holds: `before`
/// is the data plane's count of each slot when the walk began, `truth` the counted flows the
/// walk found per slot. Flows that open or close during the walk may leave an error of their
/// own number, which the next walk corrects.
pub fn corrections(before: &[i64], truth: &std::collections::HashMap<u32, i64>) -> Vec<(u32, i64)> {
    before
        .iter()
        .enumerate()
        .filter_map(|(slot, &b)| {
            let t = truth.get(&(slot as u32)).copied().unwrap_or(0);
            (t != b).then_some((slot as u32, t - b))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn corrections_bring_each_count_to_the_table() {
        let before = [0, 5, 2, -1];
        let truth = [(1, 3), (2, 2), (7, 4)].into_iter().collect();
        // Slot 1 drifted up by 2 (evictions), slot 3 below 0 (a race), slot 7 is out of range.
        assert_eq!(super::corrections(&before, &truth), vec![(1, -2), (3, 1)]);
    }
}
