//! Per-CPU counters.

use aya_ebpf::bindings::xdp_action;
use lb_common::Counter;
use lb_ebpf::Verdict;

use crate::maps::{BACKEND_STATS, GLOBAL_STATS, SERVICE_STATS};

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(c) = GLOBAL_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no other writer while we run.
        unsafe { *c += 1 };
    }
}

/// Moves this packet's count from one counter to another: both per-CPU slots are this CPU's,
/// and `from` was counted earlier in the same run of the program.
#[inline(always)]
pub fn recount(from: Counter, to: Counter) {
    if let Some(c) = GLOBAL_STATS.get_ptr_mut(from as u32) {
        // SAFETY: per-CPU slot, no other writer while we run.
        unsafe { *c = (*c).wrapping_sub(1) };
    }
    count(to);
}

#[inline(always)]
pub fn traffic(service: u32, backend: u32, bytes: u64, new_flow: bool) {
    let new = new_flow as u64;
    if let Some(s) = SERVICE_STATS.get_ptr_mut(service) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes;
            (*s).new_flows += new;
        }
    }
    if let Some(b) = BACKEND_STATS.get_ptr_mut(backend) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*b).packets += 1;
            (*b).bytes += bytes;
            (*b).new_flows += new;
        }
    }
}

/// A client's SYN retransmit to a backend's flow.
#[inline(always)]
pub fn syn_retransmit(backend: u32) {
    if let Some(b) = BACKEND_STATS.get_ptr_mut(backend) {
        // SAFETY: per-CPU slot.
        unsafe { (*b).syn_retransmits += 1 };
    }
}

/// A backend refused a NAT connection: a RST was its first answer.
#[inline(always)]
pub fn refused(backend: u32) {
    if let Some(b) = BACKEND_STATS.get_ptr_mut(backend) {
        // SAFETY: per-CPU slot.
        unsafe { (*b).refused += 1 };
    }
}

/// Counts the verdict and turns it into the XDP action.
///
/// The per-mode paths (echo, encapsulation, NAT) are stages: BPF-to-BPF calls, so their frames
/// are not added to the balancer's. A stage counts its own verdict and returns the action: a
/// Verdict (an enum with data) would come back through the caller's stack, leaving in r0
/// whatever LLVM had there, and the verifier refuses a stack pointer there on return.
#[inline(always)]
pub fn finish(verdict: Verdict) -> u32 {
    match verdict {
        Verdict::Pass(reason) => {
            count(reason);
            xdp_action::XDP_PASS
        }
        Verdict::Drop(reason) => {
            count(reason);
            xdp_action::XDP_DROP
        }
        Verdict::Tx => {
            count(Counter::Tx);
            xdp_action::XDP_TX
        }
        Verdict::Redirect(action) => {
            count(Counter::Redirect);
            action
        }
    }
}
