//! The frame the benchmark wrapper restores before every iteration of BPF_PROG_TEST_RUN.

/// Largest frame the wrapper restores, in 8-byte words.
pub const BENCH_FRAME_WORDS: usize = 16;

/// Program array slots the wrapper tail-calls into.
pub const BENCH_TARGET_LB: u32 = 0;
pub const BENCH_TARGET_FLOOR: u32 = 1;

#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct BenchFrame {
    /// Frame length in bytes; a multiple of 8, at most `BENCH_FRAME_WORDS * 8`.
    pub len: u32,
    /// Program array slot to tail-call.
    pub target: u32,
    /// When non-zero, a per-iteration sequence number is written as a u32 at this byte offset,
    /// so every iteration is a new flow.
    pub vary_offset: u32,
    pub _pad: u32,
    pub words: [u64; BENCH_FRAME_WORDS],
}
const _: () = assert!(core::mem::size_of::<BenchFrame>() == 16 + 8 * BENCH_FRAME_WORDS);

impl BenchFrame {
    /// Pads `bytes` with zeros to a multiple of 8; `None` when too long.
    pub fn new(bytes: &[u8], target: u32, vary_offset: u32) -> Option<Self> {
        let len = bytes.len().div_ceil(8) * 8;
        if len > BENCH_FRAME_WORDS * 8 || vary_offset as usize + 4 > len {
            return None;
        }
        let mut words = [0u64; BENCH_FRAME_WORDS];
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            words[i] = u64::from_ne_bytes(w);
        }
        Some(Self {
            len: len as u32,
            target,
            vary_offset,
            _pad: 0,
            words,
        })
    }
}
