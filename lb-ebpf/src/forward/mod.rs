//! Forwarding: the one seam every mode goes through. This file dispatches; each mode lives in
//! its own file (L2 direct server return, IPIP and GUE, NAT) and transmits through `tx`.

pub mod dsr;
pub mod encap;
pub mod nat;
mod too_big;

use aya_ebpf::programs::XdpContext;
use lb_common::{
    Counter,
    service::{FWD_GUE, FWD_IPIP, FWD_NAT, FWD_SNAT},
};
use lb_ebpf::{Flow, Frame, Verdict};

use crate::{maps::NAT_FLOWS, select::Chosen, stats::finish};

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
        _ => finish(dsr::l2(ctx, frame, backend)),
    }
}
