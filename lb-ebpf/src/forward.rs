//! Forwarding: the one seam every mode goes through: L2 direct server return, IPIP, GUE, NAT.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    Backend, Counter,
    service::{FWD_GUE, FWD_IPIP, FWD_NAT, FWD_SNAT},
};
use lb_ebpf::{Flow, Frame, Verdict};
use network_types::eth::EthHdr;

use crate::{
    encap,
    headers::copy_mac,
    maps::{NAT_FLOWS, TX_PORTS},
    nat,
    select::Chosen,
    stats::finish,
};

/// Forwards in the chosen backend's mode; returns the counted XDP action. L2 DSR inline, the
/// others in functions of their own.
#[inline(always)]
pub fn forward(ctx: &XdpContext, frame: &Frame, flow: &Flow, chosen: &Chosen) -> u32 {
    let (slot, backend) = (chosen.slot, chosen.backend);
    // A new NAT connection of a counting service carries FLOW_COUNTED.
    let counted = chosen.forward & u32::from(lb_common::flow::FLOW_COUNTED) != 0;
    let mode = chosen.forward & !u32::from(lb_common::flow::FLOW_COUNTED);
    match mode {
        FWD_IPIP => encap::encapsulate(ctx, flow, slot, backend, false),
        FWD_GUE => encap::encapsulate(ctx, flow, slot, backend, true),
        FWD_NAT | FWD_SNAT => {
            let how =
                if mode == FWD_SNAT { nat::OPEN_SNAT } else { 0 } | if counted { nat::OPEN_COUNT } else { 0 };
            let action = nat::open(ctx, flow, slot, chosen.service, how);
            if action != nat::RACED {
                return action;
            }
            // Another CPU opened this connection a moment ago: go with its entries.
            match NAT_FLOWS.get_ptr_mut(&flow.key) {
                Some(entry) => nat::translate(ctx, flow, entry, None),
                None => finish(Verdict::Drop(Counter::DropNatCollision)),
            }
        }
        _ => finish(dsr_l2(ctx, frame, backend)),
    }
}

/// Rewrites only the Ethernet addresses; the IP packet reaches the backend as the client sent
/// it, and the backend (VIP on its loopback) answers the client directly.
#[inline(always)]
pub fn dsr_l2(ctx: &XdpContext, frame: &Frame, backend: &Backend) -> Verdict {
    let Some(eth) = frame.ptr_at::<EthHdr>(0) else {
        return Verdict::Drop(Counter::DropTruncatedL2);
    };
    // SAFETY: bounds checked by ptr_at; XDP owns the frame.
    unsafe {
        copy_mac((*eth).dst_addr.as_mut_ptr(), backend.dst_mac.as_ptr());
        copy_mac((*eth).src_addr.as_mut_ptr(), backend.src_mac.as_ptr());
    }
    send(ctx, backend.ifindex)
}

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
