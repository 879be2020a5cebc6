//! Least privilege. The daemon starts with what loading, attaching and binding need; once
//! that is done, and before any other thread exists (threads take their capabilities from the
//! one that makes them), it keeps only what it uses for the rest of its life, in every set,
//! bounding set included, with no_new_privs, so nothing it runs or becomes can regain the rest.
//!
//! What it keeps, found by experiment (the health end-to-end cases, checks through the VIP
//! included, under exactly this set; see docs/security.md):
//! - CAP_BPF: every map read and write, opening pins, loading the check path's programs;
//! - CAP_NET_ADMIN: netlink changes (neighbour triggers, the check path's veth, rules and
//!   routes, XDP and tc attach), SO_MARK on checks through the VIP, /proc/sys/net writes;
//! - CAP_PERFMON: the verifier accepts the check path's programs only with it.
//!
//! Kept as well when `[daemon.bgp]` is set: CAP_NET_BIND_SERVICE, for the BIRD the daemon runs
//! (it takes the daemon's set): BGP listens on port 179 and BFD on 3784.
//!
//! Needed at start only, then dropped: CAP_SYS_ADMIN (the data-plane log finds its ring
//! buffer by program id: BPF_PROG_GET_FD_BY_ID and BPF_MAP_GET_FD_BY_ID), CAP_NET_BIND_SERVICE
//! (a listener on a port below 1024), CAP_SETPCAP (to shrink the bounding set).

use caps::{CapSet, Capability, CapsHashSet};

/// What the daemon keeps after start.
pub const RUNTIME: [Capability; 3] = [
    Capability::CAP_BPF,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_PERFMON,
];

/// Drops every capability but `RUNTIME` and `extra` from the calling thread's bounding, inheritable,
/// ambient, permitted and effective sets, and sets no_new_privs. Call it from the only thread.
/// Returns the capabilities kept (those of `RUNTIME` it had).
pub fn drop_to_runtime(extra: &[Capability]) -> anyhow::Result<Vec<Capability>> {
    let keep: CapsHashSet = RUNTIME.into_iter().chain(extra.iter().copied()).collect();
    let fail = |what: &str, e: caps::errors::CapsError| anyhow::anyhow!("drop capabilities: {what}: {e}");
    // The bounding set first: shrinking it takes CAP_SETPCAP, which goes with the rest below.
    // Without it (a unit that left it out) the unit's own bounding set stands.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        for cap in caps::all() {
            if !keep.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
                caps::drop(None, CapSet::Bounding, cap).map_err(|e| fail(&format!("bounding {cap}"), e))?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(|e| fail("ambient", e))?;
    caps::clear(None, CapSet::Inheritable).map_err(|e| fail("inheritable", e))?;
    let permitted = caps::read(None, CapSet::Permitted).map_err(|e| fail("read permitted", e))?;
    let kept: CapsHashSet = permitted.intersection(&keep).copied().collect();
    caps::set(None, CapSet::Effective, &kept).map_err(|e| fail("effective", e))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(|e| fail("permitted", e))?;
    // SAFETY: prctl with constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        anyhow::bail!(
            "drop capabilities: no_new_privs: {}",
            std::io::Error::last_os_error()
        );
    }
    let mut kept: Vec<Capability> = kept.into_iter().collect();
    kept.sort_by_key(|c| c.index());
    Ok(kept)
}
