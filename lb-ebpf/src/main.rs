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
use core::mem::MaybeUninit;

use lb_common::Counter;
use lb_ebpf::{Flow, FlowKind, Frame, Verdict, parse_flow};

use crate::maps::PACKET;

/// The balancer: every frame on the attached interface goes through here.
#[xdp]
pub fn lb(ctx: XdpContext) -> u32 {
    let frame = Frame::new(ctx.data(), ctx.data_end());
    balance(&ctx, &frame)
}

/// One packet's parsed flow and chosen backend, handed from one stage (a BPF-to-BPF call each)
/// to the next. Per-CPU map memory, not the stack: on the stack they and the spills around
/// them took a third of the 512 bytes before the first stage was called.
#[repr(C)]
pub struct Packet {
    flow: MaybeUninit<Flow>,
    chosen: MaybeUninit<select::Chosen>,
}

/// Returns the counted XDP action.
#[inline(always)]
fn balance(ctx: &XdpContext, frame: &Frame) -> u32 {
    let action = |verdict| stats::finish(verdict);
    // One slot per CPU: the lookup does not fail.
    let Some(p) = PACKET.get_ptr_mut(0) else {
        return action(Verdict::Pass(Counter::PassNotIp));
    };
    // SAFETY: this CPU's slot; nothing else runs on this CPU meanwhile.
    let p = unsafe { &mut *p };
    if let Err(verdict) = parse(ctx, p.flow.as_mut_ptr()) {
        return action(verdict);
    }
    // SAFETY: parse wrote it.
    let flow = unsafe { p.flow.assume_init_ref() };
    if flow.kind == FlowKind::Echo {
        return echo::reply(ctx, flow);
    }
    match select::choose(flow, p.chosen.as_mut_ptr()) {
        Ok(select::Found::Backend) => {}
        Ok(select::Found::NatReply(entry)) => return nat::translate(ctx, flow, entry, None),
        Ok(select::Found::NatRequest(entry)) => {
            // SAFETY: choose wrote the backend of a NAT request.
            let backend = unsafe { &(*p.chosen.as_ptr()).backend };
            return nat::translate(ctx, flow, entry, Some(backend));
        }
        Err(verdict) => return action(verdict),
    }
    // SAFETY: choose wrote all of it.
    let chosen = unsafe { p.chosen.assume_init_ref() };
    // A NAT connection counts once its entries exist (nat::open).
    if chosen.forward < lb_common::service::FWD_NAT {
        if flow.kind == FlowKind::IcmpError {
            stats::count(Counter::IcmpErrorForwarded);
        }
        stats::traffic(chosen.service, chosen.slot, frame.len() as u64, chosen.new_flow);
    }
    forward::forward(ctx, frame, flow, chosen)
}

/// The parser in a function of its own (a BPF-to-BPF call): its frame is gone before the
/// per-mode paths run.
#[inline(never)]
fn parse(ctx: &XdpContext, out: *mut Flow) -> Result<(), Verdict> {
    let flow = parse_flow(&forward::frame_of(ctx))?;
    // SAFETY: `out` is the caller's room for one Flow.
    unsafe { out.write(flow) };
    Ok(())
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
