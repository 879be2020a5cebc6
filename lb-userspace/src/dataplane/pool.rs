//! The Maglev table pool: one mmap-able BPF array shared by all services, written with memcpy.

use std::{collections::BTreeMap, sync::atomic};

use aya::maps::MapData;
use lb_common::maps::{POOL_LANES, pool_region};

use crate::error::{Error, Result};

/// The pool mapped into our address space: elements of `POOL_LANES` 16-bit slots at the
/// kernel's 8-byte stride, so the mapping is one flat array of slots.
pub struct Pool {
    map: super::mapping::Mapping,
    slots: u32,
}

impl Pool {
    pub fn new(map: MapData) -> Result<Self> {
        let map = super::mapping::Mapping::new(map, 2 * POOL_LANES, "MAGLEV_POOL")?;
        Ok(Self {
            slots: map.entries.saturating_mul(POOL_LANES),
            map,
        })
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Writes a table at `offset`, then fences so the later service-map update publishes it whole.
    pub fn write(&mut self, offset: u32, table: &[u16]) -> Result<()> {
        let end = offset as usize + table.len();
        if end > self.slots as usize {
            return Err(Error::dataplane(format!(
                "table region {offset}..{end} is outside the pool"
            )));
        }
        // SAFETY: bounds checked above; the region is not in use by any service value yet.
        unsafe {
            let at = self.map.base().cast::<u16>().add(offset as usize);
            std::ptr::copy_nonoverlapping(table.as_ptr(), at, table.len());
        }
        atomic::fence(atomic::Ordering::SeqCst);
        Ok(())
    }

    pub fn read(&self, offset: u32, len: u32) -> Option<Vec<u16>> {
        let end = offset as usize + len as usize;
        if end > self.slots as usize {
            return None;
        }
        // SAFETY: bounds checked; reads of a shared mapping the kernel never writes.
        Some(
            unsafe {
                std::slice::from_raw_parts(self.map.base().cast::<u16>().add(offset as usize), len as usize)
            }
            .to_vec(),
        )
    }
}

/// Waits out an RCU grace period: every run of the XDP program (an RCU read-side section)
/// that started before the call has ended after it, so no packet still reads a region the
/// service values stopped naming before the call. membarrier's global command is exactly
/// `synchronize_rcu()`; where the kernel refuses it (nohz_full), a pause far longer than any
/// packet's time in the program.
pub fn grace_period() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: a syscall without pointers.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if r != 0 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// First-fit allocator of pool regions, coalescing freed neighbours. Regions start at an
/// element (sizes are rounded up to `POOL_LANES`). A released region cools until the caller
/// has waited out a grace period (`alloc_after_grace`): a packet that read the service value
/// before it stopped naming the region may still be reading the region.
#[derive(Debug, Clone)]
pub struct RegionAllocator {
    /// offset -> length of each free run.
    free: BTreeMap<u32, u32>,
    /// Released regions not yet past a grace period.
    cooling: Vec<(u32, u32)>,
    capacity: u32,
}

impl RegionAllocator {
    pub fn new(capacity: u32) -> Self {
        let capacity = capacity / POOL_LANES * POOL_LANES;
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Self {
            free,
            cooling: Vec::new(),
            capacity,
        }
    }

    /// Free slots, counting those still cooling (an allocation waits for them if it must).
    pub fn free_slots(&self) -> u64 {
        self.free
            .values()
            .chain(self.cooling.iter().map(|(_, l)| l))
            .map(|&l| l as u64)
            .sum()
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// A free region of `len` slots, from what is past its grace period.
    pub fn alloc(&mut self, len: u32) -> Option<u32> {
        let len = pool_region(len);
        let (&offset, &run) = self.free.iter().find(|&(_, &run)| run >= len)?;
        self.free.remove(&offset);
        if run > len {
            self.free.insert(offset + len, run - len);
        }
        Some(offset)
    }

    /// As `alloc`, and when only cooling regions would make room, waits a grace period
    /// (`grace`, which covers every release so far) and takes them back first.
    pub fn alloc_after_grace(&mut self, len: u32, grace: impl FnOnce()) -> Option<u32> {
        if let Some(offset) = self.alloc(len) {
            return Some(offset);
        }
        if self.cooling.is_empty() {
            return None;
        }
        grace();
        for (offset, len) in std::mem::take(&mut self.cooling) {
            self.give_back(offset, len);
        }
        self.alloc(len)
    }

    /// Marks a region as used (adopting tables found in the maps). False if it is not free.
    pub fn reserve(&mut self, offset: u32, len: u32) -> bool {
        let len = pool_region(len);
        if !offset.is_multiple_of(POOL_LANES) {
            return false;
        }
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

    /// A region no service value names any more: free after the next grace period.
    pub fn release(&mut self, offset: u32, len: u32) {
        self.cooling.push((offset, pool_region(len)));
    }

    fn give_back(&mut self, offset: u32, len: u32) {
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

    /// Takes cooling regions back at once (the tests have no packets in flight).
    fn settle(a: &mut RegionAllocator) {
        // A request no region can meet, so only the settling happens.
        assert!(a.alloc_after_grace(u32::MAX - 3, || {}).is_none());
    }

    #[test]
    fn alloc_release_coalesce() {
        let mut a = RegionAllocator::new(97);
        let x = a.alloc(30).expect("room");
        let y = a.alloc(30).expect("room");
        let z = a.alloc(30).expect("room");
        // Rounded to whole elements of four slots.
        assert_eq!((x, y, z), (0, 32, 64));
        assert!(a.alloc(30).is_none());
        a.release(y, 30);
        // Released is not yet free: a packet may still read it.
        assert!(a.alloc(20).is_none());
        assert_eq!(a.free_slots(), 32, "cooling counts as free");
        let mut graces = 0;
        assert_eq!(a.alloc_after_grace(20, || graces += 1), Some(32));
        assert_eq!(graces, 1);
        a.release(32, 20);
        a.release(x, 30);
        a.release(z, 30);
        settle(&mut a);
        // The capacity is whole elements too.
        assert_eq!(a.free_slots(), 96);
        assert_eq!(a.alloc(96), Some(0));
        // Nothing cooling: no grace period is waited for a request that cannot be met.
        let mut graces = 0;
        assert!(a.alloc_after_grace(4, || graces += 1).is_none());
        assert_eq!(graces, 0);
    }

    #[test]
    fn reserve_splits_free_runs() {
        let mut a = RegionAllocator::new(100);
        assert!(a.reserve(40, 20));
        assert!(!a.reserve(48, 4));
        // Regions start at an element.
        assert!(!a.reserve(2, 4));
        assert_eq!(a.free_slots(), 80);
        assert_eq!(a.alloc(40), Some(0));
        assert_eq!(a.alloc(40), Some(60));
    }
}
