//! XDP entry points. Thin: parse, select, forward live in their own modules.
#![no_std]
#![no_main]
// Atomic adds (`maps::active_add`): the BPF target has no atomic RMW in core::sync.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod clock;
mod echo;
mod events;
mod forward;
mod headers;
mod maps;
mod select;
mod stats;
mod steer;
mod tx;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use core::mem::MaybeUninit;

use lb_common::{Counter, VipFilter, service::FWD_NAT};
use lb_ebpf::{Flow, FlowKind, Frame, Verdict, parse_flow};

use crate::{maps::VIP_FILTER, select::Choice};

/// The balancer: every frame on the attached interface goes through here.
///
/// A known flow in L2 DSR mode (connection-table hit, MAC rewrite, TX or redirect) runs inline
/// here after the parser. The other paths are functions of their own (#[inline(never)]), so
/// their frames are not stacked on one another: a new flow's choice, echo, encapsulation, NAT.
/// Each takes the flow by reference (it stays in this frame) and returns the counted XDP action.
#[xdp]
pub fn lb(ctx: XdpContext) -> u32 {
    // Read before the parse, which asks it right after the IP header: traffic to other
    // addresses goes no further. Here, not in the parser: there the lookup (a call, to LLVM)
    // would come after the addresses' loads, which would have to outlive it.
    let Some(vips) = VIP_FILTER.get(0) else {
        return stats::finish(Verdict::Pass(Counter::PassNotVip));
    };
    let mut flow = MaybeUninit::<Flow>::uninit();
    let action = parse(&ctx, &mut flow, Some(vips));
    if action != PARSED {
        return action;
    }
    // Read after the call: held across it, the bounds took two stack slots.
    let frame = Frame::new(ctx.data(), ctx.data_end());
    // SAFETY: parse wrote it.
    let flow = unsafe { flow.assume_init_ref() };
    if flow.kind == FlowKind::Echo {
        return echo::reply(&ctx, flow);
    }
    let chosen = match select::choose(flow) {
        Choice::Backend(chosen) => chosen,
        Choice::Nat { entry, backend } => return forward::nat::translate(&ctx, flow, entry, backend),
        Choice::Done(action) => return action,
    };
    // A NAT connection counts once its entries exist (nat::open).
    if chosen.forward < FWD_NAT {
        if flow.kind == FlowKind::IcmpError {
            stats::count(Counter::IcmpErrorForwarded);
        }
        stats::traffic(chosen.service, chosen.slot, frame.len() as u64, chosen.new_flow);
    }
    forward::forward(&ctx, &frame, flow, &chosen)
}

/// What `parse` returns when it wrote the flow (else the counted XDP action).
const PARSED: u32 = u32::MAX;

/// The parser, a function of its own writing into the caller's frame. Inline, LLVM carries the
/// key's words in registers from the parse to their last use and spills them beside the stored
/// flow: the balancer's frame was 200 bytes, against 128 + 72 as two. Returns PARSED or the
/// counted action. `vips`: the VIP filter (see `parse_flow`).
#[inline(never)]
fn parse(ctx: &XdpContext, out: &mut MaybeUninit<Flow>, vips: Option<&VipFilter>) -> u32 {
    match parse_flow(&tx::frame_of(ctx), vips) {
        Ok(flow) => {
            out.write(flow);
            PARSED
        }
        Err(verdict) => stats::finish(verdict),
    }
}

/// Checks through the data path: the check device's egress (see `steer`).
#[classifier]
pub fn steer_mark(ctx: TcContext) -> i32 {
    steer::mark(&ctx)
}

/// Checks through the data path: the check device's peer (see `steer`).
#[xdp]
pub fn steer(ctx: XdpContext) -> u32 {
    let mut flow = MaybeUninit::<Flow>::uninit();
    // No filter: a check packet's counters stay its own (`steer::forward` asks about the VIP).
    let action = parse(&ctx, &mut flow, None);
    if action != PARSED {
        return action;
    }
    // SAFETY: parse wrote it.
    steer::forward(&ctx, unsafe { flow.assume_init_ref() })
}

/// Passes everything. A veth only receives XDP_TX/redirected frames if its peer runs an XDP
/// program, so test topologies attach this to the peers.
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
