//! Rare data-plane events, logged through aya-log to the daemon's log: at most one per kind per
//! second per CPU, and never from the path of a packet that is forwarded as usual.

use aya_log_ebpf::warn;

use crate::maps::{EVENT_NEXT, EVENTS};

#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Event {
    /// A connection-table insert failed: the flow is forwarded but not pinned.
    ConntrackInsertFailed = 0,
    /// A new flow was over its backend's or service's limit (`max_new_flows_per_s`).
    Shed = 1,
}

// Every kind has its slot in EVENT_NEXT.
const _: () = assert!((Event::Shed as u32) < EVENTS);

const SECOND_NS: u64 = 1_000_000_000;

/// Logs `event` (with the backend slot it is about) unless this CPU logged one of its kind in
/// the last second.
#[inline(always)]
pub fn note(event: Event, slot: u32) {
    let Some(next) = EVENT_NEXT.get_ptr_mut(event as u32) else {
        return;
    };
    let now = crate::clock::now_ns();
    // SAFETY: this CPU's slot; nothing else writes it while we run.
    unsafe {
        if now < *next {
            return;
        }
        *next = now + SECOND_NS;
    }
    log(event as u32, slot);
}

/// Out of line: the log record's frame stays off the balancer's. Returns 0 (a subprogram's
/// return register must be set).
#[inline(never)]
fn log(event: u32, slot: u32) -> u32 {
    // aya-log's macros take a context they do not use yet; there is none to give here.
    if event == Event::ConntrackInsertFailed as u32 {
        warn!(
            &(),
            "connection table insert failed (full?): new flows forwarded but not pinned"
        );
    } else {
        warn!(&(), "shedding: new flows over the limit (backend slot {})", slot);
    }
    0
}
