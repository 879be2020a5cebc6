//! XDP entry points. Thin: parse, select, forward live in their own modules.
#![no_std]
#![no_main]

mod echo;
mod encap;
mod forward;
mod headers;
mod maps;
mod nat;
mod select;
mod stats;
mod too_big;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_ebpf::{FlowKind, Frame, Verdict, parse_flow};

/// The balancer: every frame on the attached interface goes through here.
#[xdp]
pub fn lb(ctx: XdpContext) -> u32 {
    let frame = Frame::new(ctx.data(), ctx.data_end());
    let verdict = balance(&ctx, &frame);
    stats::finish(verdict)
}

#[inline(always)]
fn balance(ctx: &XdpContext, frame: &Frame) -> Verdict {
    let flow = match parse_flow(frame) {
        Ok(flow) => flow,
        Err(verdict) => return verdict,
    };
    if flow.kind == FlowKind::Echo {
        return echo::reply(ctx, frame, &flow);
    }
    let chosen = match select::choose(&flow) {
        Ok(select::Choice::Backend(chosen)) => chosen,
        Ok(select::Choice::Nat { entry, backend }) => {
            return nat::translate(ctx, frame, &flow, entry, backend);
        }
        Err(verdict) => return verdict,
    };
    // A NAT connection counts once its entries exist (nat::open).
    if chosen.forward < lb_common::service::FWD_NAT {
        if flow.kind == FlowKind::IcmpError {
            stats::count(lb_common::Counter::IcmpErrorForwarded);
        }
        stats::traffic(chosen.service, chosen.slot, frame.len() as u64, chosen.new_flow);
    }
    forward::forward(ctx, frame, &flow, &chosen)
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
