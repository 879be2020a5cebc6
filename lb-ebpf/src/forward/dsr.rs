//! L2 direct server return: only the Ethernet addresses change.

use aya_ebpf::programs::XdpContext;
use lb_common::{Backend, Counter};
use lb_ebpf::{Frame, Verdict};
use network_types::eth::EthHdr;

use crate::{headers::copy_mac, tx::send};

/// Rewrites only the Ethernet addresses; the IP packet reaches the backend as the client sent
/// it, and the backend (VIP on its loopback) answers the client directly.
#[inline(always)]
pub fn l2(ctx: &XdpContext, frame: &Frame, backend: &Backend) -> Verdict {
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
