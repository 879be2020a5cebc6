//! Transmit: the frame's bounds for a stage that is a function of its own, and sending a frame
//! out. Every forwarding mode, echo and the check steering end here; it depends on no mode.

use aya_ebpf::programs::XdpContext;
use lb_common::Counter;
use lb_ebpf::{Frame, Verdict};

use crate::maps::TX_PORTS;

/// The frame's bounds, for a stage that is a function of its own. Read volatile: LLVM would
/// otherwise move these loads into the caller and pass the values, zero-extending them in the
/// callee, and the verifier refuses arithmetic on a packet-end pointer.
#[inline(always)]
pub fn frame_of(ctx: &XdpContext) -> Frame {
    // SAFETY: the context the kernel handed us.
    unsafe {
        let md = ctx.ctx;
        Frame::new(
            core::ptr::addr_of!((*md).data).read_volatile() as usize,
            core::ptr::addr_of!((*md).data_end).read_volatile() as usize,
        )
    }
}

/// Out through `ifindex`: XDP_TX when it is the ingress interface, else a devmap redirect (the
/// daemon lists every egress interface in TX_PORTS).
#[inline(always)]
pub fn send(ctx: &XdpContext, ifindex: u32) -> Verdict {
    if ifindex == ctx.ingress_ifindex() as u32 {
        return Verdict::Tx;
    }
    match TX_PORTS.redirect(ifindex, 0) {
        Ok(action) => Verdict::Redirect(action),
        Err(_) => Verdict::Drop(Counter::DropRedirectFailed),
    }
}
