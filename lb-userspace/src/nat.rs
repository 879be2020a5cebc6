//! NAT entry lifetime. The data plane makes a pair of entries per connection and stamps them
//! as packets pass; this collector removes pairs that have been idle longer than their timeout
//! (TCP, TCP after FIN/RST, UDP), and entries whose twin is missing. A removed pair frees its
//! SNAT port: ports are not held anywhere else.

use std::{
    collections::HashMap as StdHashMap,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::maps::{HashMap, MapData};
use lb_common::{
    FlowKey, NatEntry, PROTO_TCP,
    nat::{NAT_F_ANSWERED, NAT_F_REPLY, NAT_F_SNAT},
};
use log::warn;
use serde::Serialize;

use crate::{
    config::NatConfig,
    error::{Error, Result},
};

/// An entry whose twin is missing is removed once it is this old: the data plane writes the
/// reply entry a moment before the forward one.
const ORPHAN_GRACE_NS: u64 = 2_000_000_000;

pub type NatMap = HashMap<MapData, FlowKey, NatEntry>;

/// What the table holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Census {
    pub entries: u64,
    /// Forward entries: one per connection.
    pub connections: u64,
    /// Connections holding a SNAT source port.
    pub snat_ports_in_use: u64,
}

pub fn census(map: &NatMap) -> Census {
    let mut c = Census::default();
    for (_, e) in map.iter().filter_map(|r| r.ok()) {
        c.entries += 1;
        if !e.is_reply() {
            c.connections += 1;
            if e.flags & NAT_F_SNAT != 0 {
                c.snat_ports_in_use += 1;
            }
        }
    }
    c
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn timeout_ns(cfg: &NatConfig, key: &FlowKey, forward: &NatEntry, reply: &NatEntry) -> u64 {
    let s = if key.proto != PROTO_TCP {
        cfg.udp_timeout_s
    } else if reply.flags & NAT_F_ANSWERED == 0 {
        cfg.tcp_syn_timeout_s
    } else if forward.is_closing() {
        cfg.tcp_closing_timeout_s
    } else {
        cfg.tcp_timeout_s
    };
    s * 1_000_000_000
}

/// The same connection: a fresh read of a key may hold a newer connection on the same tuple.
fn same(a: &NatEntry, b: &NatEntry) -> bool {
    (
        a.src_addr,
        a.dst_addr,
        a.src_port,
        a.dst_port,
        a.backend,
        a.generation,
        a.flags & NAT_F_REPLY,
    ) == (
        b.src_addr,
        b.dst_addr,
        b.src_port,
        b.dst_port,
        b.backend,
        b.generation,
        b.flags & NAT_F_REPLY,
    )
}

/// Removes `key` if it still holds `entry`'s connection.
fn remove_if_same(map: &mut NatMap, key: &FlowKey, entry: &NatEntry) -> Result<()> {
    if !map.get(key, 0).is_ok_and(|now| same(&now, entry)) {
        return Ok(());
    }
    match map.remove(key) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        Err(e) => Err(Error::dataplane(format!("remove NAT entry: {e}"))),
    }
}

/// One pass: removes expired pairs and orphans. Returns how many connections expired.
///
/// Each pair is read again right before it goes, and removed at once, so a packet that
/// refreshes it meanwhile keeps it; a key that now holds another connection is left alone.
pub fn sweep(map: &mut NatMap, cfg: &NatConfig, now: u64) -> Result<u64> {
    let snapshot: StdHashMap<FlowKey, NatEntry> = map.iter().filter_map(|r| r.ok()).collect();
    let twin_of = |k: &FlowKey, e: &NatEntry| {
        let t = e.twin_key(k.family, k.proto);
        // A twin counts only if it points back: a stale entry may share a key with a new one.
        snapshot
            .get(&t)
            .filter(|te| te.is_reply() != e.is_reply() && te.twin_key(t.family, t.proto) == *k)
            .map(|te| (t, *te))
    };
    let mut expired = 0;
    for (k, e) in &snapshot {
        let Some((tk, te)) = twin_of(k, e) else {
            if now.saturating_sub(e.last_seen_ns) > ORPHAN_GRACE_NS {
                remove_if_same(map, k, e)?;
            }
            continue;
        };
        if e.is_reply() {
            continue; // judged with its forward entry
        }
        if now.saturating_sub(e.last_seen_ns.max(te.last_seen_ns)) <= timeout_ns(cfg, k, e, &te) {
            continue;
        }
        let (Ok(f), Ok(r)) = (map.get(k, 0), map.get(&tk, 0)) else {
            continue; // half gone: the orphan rule takes the rest next time
        };
        if !same(&f, e) || !same(&r, &te) {
            continue;
        }
        if now.saturating_sub(f.last_seen_ns.max(r.last_seen_ns)) > timeout_ns(cfg, k, &f, &r) {
            // The reply entry first: a new connection on the same tuple, opened between the
            // two removals, then never collides with the old reply entry.
            remove_if_same(map, &tk, &te)?;
            remove_if_same(map, k, e)?;
            expired += 1;
        }
    }
    Ok(expired)
}

/// Runs the collector on its own handle to the pinned table, so it never holds up the daemon.
pub async fn collect(pin: &Path, cfg: NatConfig, expired_total: Arc<AtomicU64>) -> Result<()> {
    let data = MapData::from_pin(pin)
        .map_err(|e| Error::dataplane(format!("open pinned {}: {e}", pin.display())))?;
    let mut map: NatMap = aya::maps::Map::HashMap(data)
        .try_into()
        .map_err(|e| Error::dataplane(format!("NAT table type: {e}")))?;
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.gc_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match tokio::task::block_in_place(|| sweep(&mut map, &cfg, monotonic_ns())) {
            Ok(n) => {
                expired_total.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => warn!("NAT expiry: {e}"),
        }
    }
}
