//! Reading many slots of a per-CPU array in one syscall (BPF_MAP_LOOKUP_BATCH), for the metrics
//! scrape: 10,000 backends are one call instead of 10,000. aya 0.14 has no batch operations.

use std::os::fd::{AsFd, AsRawFd};

use aya::maps::MapData;
use aya_obj::generated::{bpf_attr, bpf_cmd};

/// Reads slots `0..count` of a per-CPU array whose values are `V`, and folds each slot's
/// per-CPU values with `add` into one value per slot.
///
/// `V` must be plain data whose size is a multiple of 8: the kernel rounds each CPU's value up
/// to 8 bytes, and this reads the buffer as a `V` per CPU.
pub fn per_cpu_sums<V: aya::Pod + Default>(
    map: &MapData,
    count: u32,
    add: impl Fn(&mut V, &V),
) -> std::io::Result<Vec<V>> {
    const { assert!(size_of::<V>().is_multiple_of(8) && size_of::<V>() > 0) };
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    let mut out = Vec::with_capacity(count as usize);
    if count == 0 {
        return Ok(out);
    }
    let mut keys = vec![0u32; count as usize];
    let mut values = vec![V::default(); count as usize * cpus];
    let mut next = 0u32;
    // SAFETY: bpf_attr is a plain C union; zero is valid for every field.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the batch member of the union, whose fields are integers.
    unsafe {
        let b = &mut attr.batch;
        b.in_batch = 0;
        b.out_batch = std::ptr::from_mut(&mut next) as u64;
        b.keys = keys.as_mut_ptr() as u64;
        b.values = values.as_mut_ptr() as u64;
        b.count = count;
        b.map_fd = map.fd().as_fd().as_raw_fd() as u32;
    }
    // SAFETY: the buffers hold `count` keys and `count * cpus` values and outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_MAP_LOOKUP_BATCH as libc::c_long,
            std::ptr::from_mut(&mut attr),
            size_of::<bpf_attr>() as libc::c_long,
        )
    };
    let err = std::io::Error::last_os_error();
    // ENOENT: the batch reached the array's end; what was read is still valid.
    if rc < 0 && err.raw_os_error() != Some(libc::ENOENT) {
        return Err(err);
    }
    // SAFETY: the kernel wrote back how many slots it read.
    let read = unsafe { attr.batch.count } as usize;
    for slot in values.chunks_exact(cpus).take(read.min(count as usize)) {
        let mut sum = V::default();
        for v in slot {
            add(&mut sum, v);
        }
        out.push(sum);
    }
    out.resize(count as usize, V::default());
    Ok(out)
}
