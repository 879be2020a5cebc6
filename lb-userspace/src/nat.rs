//! NAT entry lifetime. The data plane makes a pair of entries per connection and stamps them
//! as packets pass; this collector removes pairs that have been idle longer than their timeout
//! (TCP half-open, established, after FIN/RST; UDP), and entries whose twin is missing. A removed pair frees its
//! SNAT port: ports are not held anywhere else.

use std::{
    collections::HashMap as StdHashMap,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use aya::maps::{HashMap, MapData};
use lb_common::{
    FlowKey, NatEntry, PROTO_TCP,
    nat::{NAT_F_REPLY, NAT_F_SNAT},
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
    /// TCP connections whose handshake the client has not completed.
    pub half_open: u64,
}

impl Census {
    fn add(&mut self, k: &FlowKey, e: &NatEntry) {
        self.entries += 1;
        if !e.is_reply() {
            self.connections += 1;
            if e.flags & NAT_F_SNAT != 0 {
                self.snat_ports_in_use += 1;
            }
            if k.proto == PROTO_TCP && !e.is_established() {
                self.half_open += 1;
            }
        }
    }
}

/// Counts the table now (one pass over it).
pub fn census(map: &NatMap) -> Census {
    let mut c = Census::default();
    for (k, e) in map.iter().filter_map(|r| r.ok()) {
        c.add(&k, &e);
    }
    c
}

/// What the collector last saw, for `lb stats` (which must not walk a large table itself).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct NatStatus {
    #[serde(flatten)]
    pub census: Census,
    /// Connections expired since the daemon started.
    pub expired: u64,
    /// CLOCK_MONOTONIC of the last sweep (0: none yet).
    #[serde(skip)]
    pub swept_ns: u64,
}

/// One sweep's outcome: connections expired, and what is left.
pub struct Sweep {
    pub expired: u64,
    pub left: Census,
    /// Backend slots of the counted connections removed (each leaves its active count).
    pub uncounted: Vec<u32>,
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    crate::dataplane::clock_ns(libc::CLOCK_MONOTONIC)
}

/// How long a half-open connection may idle while the table is under pressure.
const PRESSURE_HALF_OPEN_NS: u64 = 1_000_000_000;

/// A connection's idle timeout. A TCP connection is half-open until the client acknowledged
/// the backend's SYN-ACK, whether or not the backend answered: a client that never completes
/// the handshake gets the SYN timeout, and under `pressure` (the table past
/// `pressure_percent`) only a second, so half-open entries go first.
fn timeout_ns(cfg: &NatConfig, key: &FlowKey, forward: &NatEntry, pressure: bool) -> u64 {
    let s = if key.proto != PROTO_TCP {
        cfg.udp_timeout_s
    } else if !forward.is_established() {
        if pressure {
            return PRESSURE_HALF_OPEN_NS.min(cfg.tcp_syn_timeout_s * 1_000_000_000);
        }
        cfg.tcp_syn_timeout_s
    } else if forward.is_closing() {
        cfg.tcp_closing_timeout_s
    } else {
        cfg.tcp_timeout_s
    };
    s * 1_000_000_000
}

/// When the connection last showed life. A half-open TCP connection counts only the
/// client's packets: the backend retransmits its SYN-ACK for a minute, which must not keep a
/// handshake the client never completes.
fn last_seen(key: &FlowKey, forward: &NatEntry, reply: &NatEntry) -> u64 {
    if key.proto == PROTO_TCP && !forward.is_established() {
        forward.last_seen_ns
    } else {
        forward.last_seen_ns.max(reply.last_seen_ns)
    }
}

/// Whether a table holding `entries` is past the configured fill.
fn under_pressure(cfg: &NatConfig, entries: usize) -> bool {
    entries as u64 * 100 >= u64::from(cfg.table_size) * u64::from(cfg.pressure_percent)
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

/// One pass: removes expired pairs and orphans.
///
/// Each pair is read again right before it goes, and removed at once, so a packet that
/// refreshes it meanwhile keeps it; a key that now holds another connection is left alone.
pub fn sweep(map: &mut NatMap, cfg: &NatConfig, now: u64) -> Result<Sweep> {
    let snapshot: StdHashMap<FlowKey, NatEntry> = map.iter().filter_map(|r| r.ok()).collect();
    let twin_of = |k: &FlowKey, e: &NatEntry| {
        let t = e.twin_key(k.family, k.proto);
        // A twin counts only if it points back: a stale entry may share a key with a new one.
        snapshot
            .get(&t)
            .filter(|te| te.is_reply() != e.is_reply() && te.twin_key(t.family, t.proto) == *k)
            .map(|te| (t, *te))
    };
    let pressure = under_pressure(cfg, snapshot.len());
    let mut expired = 0;
    let mut uncounted = Vec::new();
    let mut gone = std::collections::HashSet::new();
    for (k, e) in &snapshot {
        let Some((tk, te)) = twin_of(k, e) else {
            if now.saturating_sub(e.last_seen_ns) > ORPHAN_GRACE_NS {
                remove_if_same(map, k, e)?;
                gone.insert(*k);
            }
            continue;
        };
        if e.is_reply() {
            continue; // judged with its forward entry
        }
        if now.saturating_sub(last_seen(k, e, &te)) <= timeout_ns(cfg, k, e, pressure) {
            continue;
        }
        let (Ok(f), Ok(r)) = (map.get(k, 0), map.get(&tk, 0)) else {
            continue; // half gone: the orphan rule takes the rest next time
        };
        if !same(&f, e) || !same(&r, &te) {
            continue;
        }
        if now.saturating_sub(last_seen(k, &f, &r)) > timeout_ns(cfg, k, &f, pressure) {
            // The reply entry first: a new connection on the same tuple, opened between the
            // two removals, then never collides with the old reply entry.
            remove_if_same(map, &tk, &te)?;
            remove_if_same(map, k, e)?;
            gone.extend([tk, *k]);
            expired += 1;
            if f.flags & lb_common::nat::NAT_F_COUNTED != 0 {
                uncounted.push(f.backend);
            }
        }
    }
    let mut left = Census::default();
    for (k, e) in &snapshot {
        if !gone.contains(k) {
            left.add(k, e);
        }
    }
    Ok(Sweep {
        expired,
        left,
        uncounted,
    })
}

/// Runs the collector on its own thread and its own handle to the pinned table, so it never
/// holds up the daemon (a sweep of a large table is many syscalls) and the daemon's tasks never
/// hold it up. Stops when `stop` is set.
pub fn spawn_collector(
    pin: &Path,
    cfg: NatConfig,
    status: Arc<Mutex<NatStatus>>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>> {
    let mut map: NatMap = crate::dataplane::open_pinned(pin)?
        .try_into()
        .map_err(|e| Error::dataplane(format!("NAT table type: {e}")))?;
    let every = Duration::from_millis(cfg.gc_interval_ms);
    let active = match crate::dataplane::open_pinned(&pin.with_file_name(lb_common::maps::ACTIVE))? {
        aya::maps::Map::Array(data) => crate::dataplane::active::ActiveCounts::new(data)?,
        _ => return Err(Error::dataplane("ACTIVE is not an array")),
    };
    std::thread::Builder::new()
        .name("nat-expiry".into())
        .spawn(move || {
            let mut next = std::time::Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let now = std::time::Instant::now();
                if now < next {
                    std::thread::sleep((next - now).min(Duration::from_millis(100)));
                    continue;
                }
                next = now + every;
                let at = monotonic_ns();
                match sweep(&mut map, &cfg, at) {
                    Ok(swept) => {
                        // An expired counted connection leaves its backend's count (the
                        // census corrects a rare race with its own FIN).
                        for &slot in &swept.uncounted {
                            active.add(slot, -1);
                        }
                        let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
                        s.expired += swept.expired;
                        s.census = swept.left;
                        s.swept_ns = at;
                    }
                    Err(e) => warn!("NAT expiry: {e}"),
                }
            }
        })
        .map_err(|e| Error::io("start the NAT expiry thread", e))
}

#[cfg(test)]
mod tests {
    use lb_common::{
        FAMILY_V4, PROTO_UDP,
        nat::{NAT_F_ANSWERED, NAT_F_ESTABLISHED, NAT_F_FIN_BACKEND, NAT_F_FIN_CLIENT},
    };

    use super::*;

    const S: u64 = 1_000_000_000;

    fn key(proto: u8) -> FlowKey {
        FlowKey::from_words(FAMILY_V4, proto, [1, 0, 0, 0], [2, 0, 0, 0], 10, 20)
    }

    fn fwd(flags: u32) -> NatEntry {
        NatEntry {
            flags,
            ..Default::default()
        }
    }

    #[test]
    fn an_answered_connection_is_half_open_until_the_client_acks() {
        let cfg = NatConfig::default();
        let tcp = key(PROTO_TCP);
        // The backend answered every SYN, the client never ACKed: the short timeout.
        assert_eq!(timeout_ns(&cfg, &tcp, &fwd(NAT_F_ANSWERED), false), 30 * S);
        assert_eq!(timeout_ns(&cfg, &tcp, &fwd(0), false), 30 * S);
        let done = NAT_F_ANSWERED | NAT_F_ESTABLISHED;
        assert_eq!(timeout_ns(&cfg, &tcp, &fwd(done), false), 900 * S);
        let closing = done | NAT_F_FIN_CLIENT | NAT_F_FIN_BACKEND;
        assert_eq!(timeout_ns(&cfg, &tcp, &fwd(closing), false), 60 * S);
        assert_eq!(timeout_ns(&cfg, &key(PROTO_UDP), &fwd(0), false), 30 * S);
    }

    #[test]
    fn the_backends_syn_ack_retransmits_do_not_keep_a_half_open_connection() {
        let tcp = key(PROTO_TCP);
        let (client, backend) = (5 * S, 60 * S);
        let reply = NatEntry {
            last_seen_ns: backend,
            ..fwd(NAT_F_ANSWERED)
        };
        let half = NatEntry {
            last_seen_ns: client,
            ..fwd(NAT_F_ANSWERED)
        };
        assert_eq!(last_seen(&tcp, &half, &reply), client);
        let done = NatEntry {
            last_seen_ns: client,
            ..fwd(NAT_F_ANSWERED | NAT_F_ESTABLISHED)
        };
        assert_eq!(last_seen(&tcp, &done, &reply), backend);
        assert_eq!(last_seen(&key(PROTO_UDP), &half, &reply), backend);
    }

    #[test]
    fn under_pressure_half_open_connections_go_first() {
        let cfg = NatConfig {
            table_size: 1000,
            pressure_percent: 50,
            ..Default::default()
        };
        assert!(!under_pressure(&cfg, 499));
        assert!(under_pressure(&cfg, 500));
        let tcp = key(PROTO_TCP);
        assert_eq!(timeout_ns(&cfg, &tcp, &fwd(NAT_F_ANSWERED), true), S);
        // Established and UDP connections keep theirs.
        let done = NAT_F_ANSWERED | NAT_F_ESTABLISHED;
        assert_eq!(timeout_ns(&cfg, &tcp, &fwd(done), true), 900 * S);
        assert_eq!(timeout_ns(&cfg, &key(PROTO_UDP), &fwd(0), true), 30 * S);
    }
}
