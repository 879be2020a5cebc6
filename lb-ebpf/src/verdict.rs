//! What the logic decides for a packet; only the entry point turns it into an `xdp_action`.

use lb_common::Counter;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Hand to the kernel unchanged; the counter says why.
    Pass(Counter),
    /// Drop; the counter says why.
    Drop(Counter),
    /// Send back out of the ingress interface.
    Tx,
    /// The `bpf_redirect_map` return value (XDP_REDIRECT on success).
    Redirect(u32),
}
