//! The Maglev table pool: one mmap-able BPF array shared by all services, written with memcpy.

use std::{collections::BTreeMap, sync::atomic};

use aya::maps::MapData;

use crate::error::{Error, Result};

/// The kernel lays array elements out at an 8-byte stride, so slot `i` is the low `u32` of
/// the 8 bytes at `8 * i` in the mapping.
const STRIDE: usize = 2;

/// The pool mapped into our address space.
pub struct Pool {
    map: super::mapping::Mapping,
    slots: u32,
}

impl Pool {
    pub fn new(map: MapData) -> Result<Self> {
        let map = super::mapping::Mapping::new(map, 4, "MAGLEV_POOL")?;
        Ok(Self {
            slots: map.entries,
            map,
        })
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Writes a table at `offset`, then fences so the later service-map update publishes it whole.
    pub fn write(&mut self, offset: u32, table: &[u32]) -> Result<()> {
        let end = offset as usize + table.len();
        if end > self.slots as usize {
            return Err(Error::dataplane(format!(
                "table region {offset}..{end} is outside the pool"
            )));
        }
        let base = self.map.base().cast::<u32>();
        for (i, &slot) in table.iter().enumerate() {
            // SAFETY: bounds checked above; the region is not in use by any service value yet.
            unsafe { base.add((offset as usize + i) * STRIDE).write(slot) };
        }
        atomic::fence(atomic::Ordering::SeqCst);
        Ok(())
    }

    pub fn read(&self, offset: u32, len: u32) -> Option<Vec<u32>> {
        let end = offset as usize + len as usize;
        if end > self.slots as usize {
            return None;
        }
        let base = self.map.base().cast::<u32>();
        // SAFETY: bounds checked; reads of a shared mapping the kernel never writes.
        Some(
            (offset as usize..end)
                .map(|i| unsafe { base.add(i * STRIDE).read() })
                .collect(),
        )
    }
}

/// First-fit allocator of pool regions, coalescing freed neighbours.
#[derive(Debug, Clone)]
pub struct RegionAllocator {
    /// offset -> length of each free run.
    free: BTreeMap<u32, u32>,
    capacity: u32,
}

impl RegionAllocator {
    pub fn new(capacity: u32) -> Self {
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Self { free, capacity }
    }

    pub fn free_slots(&self) -> u64 {
        self.free.values().map(|&l| l as u64).sum()
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    pub fn alloc(&mut self, len: u32) -> Option<u32> {
        let (&offset, &run) = self.free.iter().find(|&(_, &run)| run >= len)?;
        self.free.remove(&offset);
        if run > len {
            self.free.insert(offset + len, run - len);
        }
        Some(offset)
    }

    /// Marks a region as used (adopting tables found in the maps). False if it is not free.
    pub fn reserve(&mut self, offset: u32, len: u32) -> bool {
        let Some((&start, &run)) = self.free.range(..=offset).next_back() else {
            return false;
        };
        if offset + len > start + run {
            return false;
        }
        self.free.remove(&start);
        if offset > start {
            self.free.insert(start, offset - start);
        }
        if start + run > offset + len {
            self.free.insert(offset + len, start + run - (offset + len));
        }
        true
    }

    pub fn release(&mut self, offset: u32, len: u32) {
        let mut start = offset;
        let mut run = len;
        if let Some((&prev, &prev_len)) = self.free.range(..offset).next_back()
            && prev + prev_len == offset
        {
            self.free.remove(&prev);
            start = prev;
            run += prev_len;
        }
        if let Some(&next_len) = self.free.get(&(offset + len)) {
            self.free.remove(&(offset + len));
            run += next_len;
        }
        self.free.insert(start, run);
    }
}

#[cfg(test)]
mod tests {
    use super::RegionAllocator;

    #[test]
    fn alloc_release_coalesce() {
        let mut a = RegionAllocator::new(100);
        let x = a.alloc(30).expect("room");
        let y = a.alloc(30).expect("room");
        let z = a.alloc(30).expect("room");
        assert_eq!((x, y, z), (0, 30, 60));
        assert!(a.alloc(30).is_none());
        a.release(y, 30);
        assert_eq!(a.alloc(20), Some(30));
        a.release(30, 20);
        a.release(x, 30);
        a.release(z, 30);
        assert_eq!(a.free_slots(), 100);
        assert_eq!(a.alloc(100), Some(0));
    }

    #[test]
    fn reserve_splits_free_runs() {
        let mut a = RegionAllocator::new(100);
        assert!(a.reserve(40, 20));
        assert!(!a.reserve(50, 5));
        assert_eq!(a.free_slots(), 80);
        assert_eq!(a.alloc(40), Some(0));
        assert_eq!(a.alloc(40), Some(60));
    }
}
