//! The data plane's clock: CLOCK_MONOTONIC_COARSE (bpf_ktime_get_coarse_ns), in nanoseconds.
//!
//! Every use here (next-hop cache TTL of 100 ms, shedding windows of 100 ms, SYN retransmit and
//! NAT idle times in seconds, event rate limits) tolerates the coarse clock's one-tick lag
//! (1-10 ms). The precise clock costs a clocksource read, 20-30 ns per call on a KVM guest,
//! which was a quarter of the IPIP path.
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}
