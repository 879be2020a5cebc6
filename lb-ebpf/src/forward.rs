//! Forwarding: the one seam every mode goes through: L2 direct server return, IPIP, GUE, NAT.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    Backend, Counter,
    service::{FWD_GUE, FWD_IPIP, FWD_NAT, FWD_SNAT},
};
use lb_ebpf::{Flow, Frame, Verdict};
use network_types::eth::EthHdr;

use crate::{encap, maps::TX_PORTS, nat, select::Chosen};

#[inline(always)]
pub fn forward(ctx: &XdpContext, frame: &Frame, flow: &Flow, chosen: &Chosen) -> Verdict {
    let (slot, backend) = (chosen.slot, &chosen.backend);
    match chosen.forward {
        FWD_IPIP => encap::encapsulate(ctx, frame, flow, slot, backend, false),
        FWD_GUE => encap::encapsulate(ctx, frame, flow, slot, backend, true),
        FWD_NAT => nat::open(ctx, frame, flow, slot, backend, chosen.service, false),
        FWD_SNAT => nat::open(ctx, frame, flow, slot, backend, chosen.service, true),
        _ => dsr_l2(ctx, frame, backend),
    }
}

/// Rewrites only the Ethernet addresses; the IP packet reaches the backend as the client sent
/// it, and the backend (VIP on its loopback) answers the client directly.
#[inline(always)]
fn dsr_l2(ctx: &XdpContext, frame: &Frame, backend: &Backend) -> Verdict {
    let Some(eth) = frame.ptr_at::<EthHdr>(0) else {
        return Verdict::Drop(Counter::DropTruncatedL2);
    };
    // SAFETY: bounds checked by ptr_at; XDP owns the frame.
    unsafe {
        (*eth).dst_addr = backend.dst_mac;
        (*eth).src_addr = backend.src_mac;
    }
    send(ctx, backend.ifindex)
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
