//! Checks through the data path (`through = "vip"`). A check socket's packet leaves by the
//! check device, whose egress classifier (`mark`) writes the slot its socket mark names into the
//! source MAC; the device's peer runs `forward`, which sends the packet to exactly that
//! backend in its service's mode (L2 DSR, IPIP or GUE), through the same code client traffic
//! takes. So a check passes only if the backend answers for the VIP as clients reach it.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    Counter,
    service::{FWD_GUE, FWD_IPIP, FWD_NAT, FWD_SNAT},
    steer,
};
use lb_ebpf::{Flow, Frame, Verdict};

use crate::{
    forward::{dsr, encap},
    maps::BACKENDS,
    select, stats, tx,
};

/// The check device's egress: a check socket's packet gets its slot in the source MAC;
/// anything else on the device (the kernel's own neighbour discovery) is dropped.
#[inline(always)]
pub fn mark(ctx: &TcContext) -> i32 {
    // SAFETY: the context the kernel handed us.
    let mark = unsafe { (*ctx.skb.skb).mark };
    let Some(slot) = steer::slot_of_mark(mark) else {
        return TC_ACT_SHOT as i32;
    };
    // As two aligned scalars (the MAC's 6 bytes on the stack are not): the tag, then the slot.
    let tag = u16::from_ne_bytes(steer::MAC_TAG);
    let slot = slot.to_be();
    match (ctx.store(6, &tag, 0), ctx.store(8, &slot, 0)) {
        (Ok(()), Ok(())) => TC_ACT_OK as i32,
        _ => TC_ACT_SHOT as i32,
    }
}

/// The check device's peer: forwards a marked check packet to the backend its slot names.
#[inline(always)]
pub fn forward(ctx: &XdpContext, flow: &Flow) -> u32 {
    let frame = tx::frame_of(ctx);
    let Some(src) = frame.ptr_at::<[u8; 6]>(6) else {
        return stats::finish(Verdict::Drop(Counter::DropTruncatedL2));
    };
    // SAFETY: bounds checked by ptr_at.
    let Some(slot) = steer::slot_of_mac(unsafe { &*src }) else {
        return stats::finish(Verdict::Drop(Counter::DropCheckNoTarget));
    };
    let Some(mode) = select::service_mode(&flow.key) else {
        return stats::finish(Verdict::Drop(Counter::DropCheckNoTarget));
    };
    // Down backends are checked too (that is how they come back): the slot need not be active,
    // only addressed.
    let Some(backend) = BACKENDS.get(slot).filter(|b| b.ifindex != 0) else {
        return stats::finish(Verdict::Drop(Counter::DropCheckNoTarget));
    };
    stats::count(Counter::CheckSteered);
    // The bounds read again: held across the lookups above, they took two more stack slots.
    let frame = Frame::new(ctx.data(), ctx.data_end());
    match mode {
        FWD_IPIP => encap::encapsulate(ctx, flow, slot, backend, false),
        FWD_GUE => encap::encapsulate(ctx, flow, slot, backend, true),
        FWD_NAT | FWD_SNAT => stats::finish(Verdict::Drop(Counter::DropCheckNoTarget)),
        _ => stats::finish(dsr::l2(ctx, &frame, backend)),
    }
}
