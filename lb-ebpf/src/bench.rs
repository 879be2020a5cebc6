//! Benchmark programs, built as a separate object so the balancer's object carries none of them.
//!
//! BPF_PROG_TEST_RUN does not reset the packet between repeats, so a rewriting program would see
//! its own output from the second iteration on. `bench_wrap` restores the original frame (length
//! and bytes) from BENCH_FRAME, optionally stamps a sequence number to make every iteration a new
//! flow (one shared counter, so flows stay new when runs land on different CPUs), then tail-calls
//! the program under test. The floor goes through the same
//! wrapper, so the wrapper's own cost cancels out of the ratio.
//!
//! The end-to-end bench (tests/src/bench/e2e) uses `e2e_gen` and `e2e_sink`.
#![no_std]
#![no_main]

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_get_prandom_u32, bpf_xdp_adjust_head},
    macros::{map, xdp},
    maps::{Array, PerCpuArray, ProgramArray},
    programs::XdpContext,
};
use lb_common::bench::{
    BENCH_FRAME_WORDS, BENCH_TARGETS, BenchFrame, E2E_HEADERS_LEN, E2E_SPORT_BASE, E2E_SPORT_MASK,
    E2E_SPORT_OFFSET, E2eHeaders,
};

#[map]
static BENCH_PROGS: ProgramArray = ProgramArray::with_max_entries(BENCH_TARGETS, 0);

#[map]
static BENCH_FRAME: Array<BenchFrame> = Array::with_max_entries(1, 0);

#[map]
static BENCH_SEQ: Array<u32> = Array::with_max_entries(1, 0);

#[xdp]
pub fn bench_wrap(ctx: XdpContext) -> u32 {
    let Some(frame) = BENCH_FRAME.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let want = frame.len as i64;
    let have = (ctx.data_end() - ctx.data()) as i64;
    // An encapsulating program grew the head on the previous iteration: give it back.
    if have != want {
        // SAFETY: plain helper call on our own context.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, (have - want) as i32) } != 0 {
            return xdp_action::XDP_ABORTED;
        }
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    let words = (frame.len / 8) as usize;
    for i in 0..BENCH_FRAME_WORDS {
        if i >= words {
            break;
        }
        let p = data + i * 8;
        if p + 8 > end {
            return xdp_action::XDP_ABORTED;
        }
        // SAFETY: bounds checked above.
        unsafe { (p as *mut u64).write_unaligned(frame.words[i]) };
    }
    if frame.vary_offset != 0 {
        let Some(seq) = BENCH_SEQ.get_ptr_mut(0) else {
            return xdp_action::XDP_ABORTED;
        };
        let p = data + (frame.vary_offset & 0x7f) as usize;
        if p + 4 > end {
            return xdp_action::XDP_ABORTED;
        }
        // SAFETY: one test_run at a time writes the slot; packet bounds checked above.
        unsafe {
            *seq = (*seq).wrapping_add(1);
            let v = if frame.twice != 0 { *seq >> 1 } else { *seq };
            (p as *mut u32).write_unaligned(v);
        }
    }
    // SAFETY: on success control never comes back.
    unsafe { BENCH_PROGS.tail_call(&ctx, frame.target) };
    xdp_action::XDP_ABORTED
}

/// The floor: the least an XDP forwarder does. Parse Ethernet and IPv4, send it back.
#[xdp]
pub fn bench_floor(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + 14 + 20 > end {
        return xdp_action::XDP_DROP;
    }
    // SAFETY: bounds checked above.
    let (ethertype, version) = unsafe { (*((data + 12) as *const u16), *((data + 14) as *const u8) >> 4) };
    if ethertype != 0x0800u16.to_be() || version != 4 {
        return xdp_action::XDP_PASS;
    }
    xdp_action::XDP_TX
}

/// Set at load (`.rodata`, so the verifier sees constants); read volatile so that the compiler
/// does not fold in these zeros.
#[unsafe(no_mangle)]
static E2E_GEN_HEADERS: E2eHeaders = E2eHeaders {
    words: [0; E2E_HEADERS_LEN.div_ceil(8)],
};
#[unsafe(no_mangle)]
static E2E_SINK_PORT: u16 = 0;

#[map]
static E2E_SINK_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The e2e traffic generator, run with BPF_PROG_TEST_RUN in live-frames mode: every repetition
/// transmits the test frame with a random source port out of 1024, so the load is many flows.
/// Live frames reuse pages without resetting them, and the receiver's stack edits frames in place
/// (MACs, TTL, NAT), so every copy gets its headers written anew from E2E_GEN_HEADERS.
#[xdp]
pub fn e2e_gen(ctx: XdpContext) -> u32 {
    // SAFETY: helper without arguments.
    let random = unsafe { bpf_get_prandom_u32() };
    let sport = (E2E_SPORT_BASE + (random & E2E_SPORT_MASK) as u16).to_be();
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + E2E_HEADERS_LEN > end {
        return xdp_action::XDP_TX;
    }
    let words = E2E_HEADERS_LEN / 8;
    // SAFETY: reads of our own global; packet bounds checked above.
    unsafe {
        for i in 0..words {
            let w = read_volatile(addr_of!(E2E_GEN_HEADERS.words[i]));
            ((data + i * 8) as *mut u64).write_unaligned(w);
        }
        let tail = read_volatile(addr_of!(E2E_GEN_HEADERS.words[words])) as u16;
        ((data + words * 8) as *mut u16).write_unaligned(tail);
        ((data + E2E_SPORT_OFFSET) as *mut u16).write_unaligned(sport);
    }
    xdp_action::XDP_TX
}

/// The e2e sink on each backend's veth: counts and drops UDP datagrams to E2E_SINK_PORT (IPv4
/// without options), passes everything else (the TCP servers need it).
#[xdp]
pub fn e2e_sink(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    // Up to the UDP destination port.
    if data + 14 + 20 + 4 > end {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: bounds checked above; reads of our own global.
    let (ethertype, version_ihl, proto, dport, port) = unsafe {
        (
            ((data + 12) as *const u16).read_unaligned(),
            *((data + 14) as *const u8),
            *((data + 23) as *const u8),
            ((data + 36) as *const u16).read_unaligned(),
            read_volatile(addr_of!(E2E_SINK_PORT)),
        )
    };
    if ethertype != 0x0800u16.to_be() || version_ihl != 0x45 || proto != 17 || dport != port {
        return xdp_action::XDP_PASS;
    }
    if let Some(count) = E2E_SINK_COUNT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, no other writer while we run.
        unsafe { *count += 1 };
    }
    xdp_action::XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
