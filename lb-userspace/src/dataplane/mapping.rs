//! A BPF_F_MMAPABLE array mapped into the daemon's memory (the table pool, the active-flow
//! counts): shared with the data plane, read and written without a syscall.

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
};

use aya::maps::MapData;

use crate::error::{Error, Result};

pub struct Mapping {
    ptr: NonNull<u8>,
    bytes: usize,
    /// Elements of the array.
    pub entries: u32,
    _map: MapData,
}

// SAFETY: the mapping is owned by this struct; its users touch it through &self/&mut self.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `map`, whose values must be `value_size` bytes (`what` names it in errors). The
    /// kernel lays elements out at a stride of the value size rounded up to 8.
    pub fn new(map: MapData, value_size: u32, what: &str) -> Result<Self> {
        let info = map.info().map_err(Error::dataplane)?;
        if info.value_size() != value_size {
            return Err(Error::dataplane(format!(
                "{what} value size is {}, not {value_size}: a pinned map of another version (run `lb detach`)",
                info.value_size()
            )));
        }
        let entries = info.max_entries();
        let stride = value_size.div_ceil(8) as usize * 8;
        let bytes = (entries as usize * stride).div_ceil(4096) * 4096;
        // SAFETY: mapping a BPF_F_MMAPABLE array fd; length rounded up to pages as the kernel wants.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::io(format!("mmap {what}"), std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| Error::dataplane("mmap returned null"))?;
        Ok(Self {
            ptr,
            bytes,
            entries,
            _map: map,
        })
    }

    /// The start of the mapping (8-aligned: a page).
    pub fn base(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}
