//! The frame the benchmark wrapper restores before every iteration of BPF_PROG_TEST_RUN, and the
//! end-to-end bench's generator and sink.

/// Largest frame the wrapper restores, in 8-byte words.
pub const BENCH_FRAME_WORDS: usize = 16;

/// Program array slots the wrapper tail-calls into.
pub const BENCH_TARGET_LB: u32 = 0;
pub const BENCH_TARGET_FLOOR: u32 = 1;
/// Katran's balancer (default build) and its build with the flood guard held open
/// (tests/src/bench/katran.rs), for the same-run comparison.
pub const BENCH_TARGET_KATRAN: u32 = 2;
pub const BENCH_TARGET_KATRAN_NO_GUARD: u32 = 3;
/// The balancer of a running daemon at scale (1,024 VIPs, 16,384 backends, an 8M-entry
/// connection table; tests/src/bench/scale.rs), its own maps and all.
pub const BENCH_TARGET_SCALE: u32 = 4;
pub const BENCH_TARGETS: u32 = 5;

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
    /// Non-zero: each sequence number is written on two iterations in a row (half the count),
    /// so every flow sends two packets: the first is remembered in the embryonic table, the
    /// second moves it to the connection table.
    pub twice: u32,
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
            twice: 0,
            words,
        })
    }
}

/// The end-to-end bench's traffic generator (XDP, run by BPF_PROG_TEST_RUN in live-frames mode)
/// and its per-backend sink, both in the bench object.
pub const PROG_E2E_GEN: &str = "e2e_gen";
pub const PROG_E2E_SINK: &str = "e2e_sink";
/// Global (`.rodata`, set at load): the generator's `E2eHeaders`.
pub const E2E_GEN_HEADERS: &str = "E2E_GEN_HEADERS";
/// Global (`.rodata`, set at load): the sink's UDP destination port, in network byte order.
pub const E2E_SINK_PORT: &str = "E2E_SINK_PORT";
/// Per-CPU `u64` at index 0: UDP datagrams the sink counted and dropped.
pub const E2E_SINK_COUNT: &str = "E2E_SINK_COUNT";

/// The generator writes source port `E2E_SPORT_BASE + (random & E2E_SPORT_MASK)`: 1024 flows.
pub const E2E_SPORT_BASE: u16 = 10_000;
pub const E2E_SPORT_MASK: u32 = 1023;
/// Ethernet, IPv4 without options, UDP: what the generator rewrites in every frame.
pub const E2E_HEADERS_LEN: usize = 14 + 20 + 8;
/// Where the UDP source port sits in those headers.
pub const E2E_SPORT_OFFSET: usize = 14 + 20;
const _: () = assert!(E2E_SPORT_BASE as u32 + E2E_SPORT_MASK <= u16::MAX as u32);
// The generator stores whole words and one u16 tail.
const _: () = assert!(E2E_HEADERS_LEN % 8 == 2);

/// The generator's template headers, zero-padded to whole words.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct E2eHeaders {
    pub words: [u64; E2E_HEADERS_LEN.div_ceil(8)],
}
const _: () = assert!(core::mem::size_of::<E2eHeaders>() == 48);

impl E2eHeaders {
    /// The first `E2E_HEADERS_LEN` bytes of `frame`; `None` when it is shorter.
    pub fn new(frame: &[u8]) -> Option<Self> {
        let headers = frame.get(..E2E_HEADERS_LEN)?;
        let mut words = [0u64; E2E_HEADERS_LEN.div_ceil(8)];
        for (i, chunk) in headers.chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            words[i] = u64::from_ne_bytes(w);
        }
        Some(Self { words })
    }
}
